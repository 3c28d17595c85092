"""The pure core of the relay: decisions and value types, no I/O.

Everything here is a function of its arguments (plus an injected clock or random source where a
rule needs one): no sockets, files, DNS, processes or event loop. `relay.config`, the contract
between operator and relay, is the only module outside this package that core modules import;
import-linter checks both rules (pyproject.toml).
"""
