"""The open-relay probe set: third-party relay attempts a relay must refuse from a client that
is neither trusted nor authenticated, and what their answers mean.

Each `Probe` is one transaction: ``MAIL FROM`` an outside (or the relay's own) address and
``RCPT TO`` a mailbox whose real destination is outside every domain the relay serves, written
the ways open-relay testers use (plain, null sender, our own domain as sender, percent hack,
bang path, quoted local part, source route, several ``@``, IP literal, upper case, trailing
dot). The outside domain is under ``.invalid`` (RFC 2606), so an open relay that took a probe
could not deliver it; the probes never send DATA. A probe is relayed when its RCPT is answered
2xx; the relay is open when any probe is relayed. A 4xx is "refused for now" (not relayed).

Used by relay.open_relay (``mailrelay open-relay HOST:PORT``, ``mailrelay check --open-relay``
and the relay's periodic self-check). Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from relay.config import RelayConfig
from relay.core.addresses import client_is_trusted
from relay.core.rcpt import decide_rcpt

OUTSIDE = "relay-probe.invalid"
TEST_NET = "192.0.2.1"  # RFC 5737: an address no trusted network should contain


@dataclass(frozen=True)
class Probe:
    name: str
    mail_from: str
    rcpt: str


@dataclass(frozen=True)
class ProbeResult:
    probe: Probe
    mail: int  # reply code to MAIL (0: no answer)
    rcpt: int  # reply code to RCPT (0: not sent, MAIL refused or no answer)
    text: str = ""

    @property
    def relayed(self) -> bool:
        return 200 <= self.rcpt < 300


def probes(ours: str) -> list[Probe]:
    """The probe set against a relay that serves the domain `ours` (its hostname or an accept
    domain): every recipient's real destination is `OUTSIDE` or an IP literal."""
    victim = f"victim@{OUTSIDE}"
    outsider = f"probe@{OUTSIDE}"
    return [
        Probe("plain", outsider, victim),
        Probe("null-sender", "", victim),
        Probe("own-domain-sender", f"postmaster@{ours}", victim),
        Probe("percent-hack", outsider, f"victim%{OUTSIDE}@{ours}"),
        Probe("bang-path", outsider, f"{OUTSIDE}!victim@{ours}"),
        Probe("quoted-local-part", outsider, f'"victim@{OUTSIDE}"@{ours}'),
        Probe("source-route", outsider, f"@{ours}:victim@{OUTSIDE}"),
        Probe("double-at", outsider, f"victim@{OUTSIDE}@{ours}"),
        Probe("ip-literal", outsider, f"victim@[{TEST_NET}]"),
        Probe("upper-case", outsider, f"victim@{OUTSIDE.upper()}"),
        Probe("trailing-dot", outsider, f"victim@{OUTSIDE}."),
        Probe("percent-ip-literal", outsider, f"victim%{OUTSIDE}@[{TEST_NET}]"),
    ]


def is_open(results: Sequence[ProbeResult]) -> bool:
    return any(result.relayed for result in results)


def report(results: Sequence[ProbeResult]) -> list[str]:
    """One line per probe for people: ``relayed``/``refused`` with the codes."""
    lines = []
    for result in results:
        verdict = "RELAYED" if result.relayed else "refused"
        lines.append(
            f"{verdict:8} {result.probe.name:20} MAIL <{result.probe.mail_from}> {result.mail or '-'}"
            f"  RCPT <{result.probe.rcpt}> {result.rcpt or '-'}"
        )
    return lines


def relayed_by_config(config: RelayConfig, ours: str | None = None) -> list[str]:
    """The probes a relay with `config` would accept at RCPT from an outside client (at
    TEST-NET, neither authenticated nor, unless the trusted networks contain it, trusted),
    judged by the relay's own RCPT rule (relay.core.rcpt.decide_rcpt): what the operator's
    ``RelaySafe`` condition reports. The live probe of a running relay is relay.open_relay."""
    plain = [d for d in config.accept_domains if "*" not in d]
    domain = ours or (plain[0] if plain else config.hostname)
    trusted = client_is_trusted(TEST_NET, config.trusted_networks)
    routes = config.ordered_routes()
    relayed = []
    for probe in probes(domain):
        decision = decide_rcpt(
            f"TO:<{probe.rcpt}>",
            mail_from=probe.mail_from,
            smtputf8=False,
            esmtp=True,
            trusted=trusted,
            authenticated=False,
            accepted=(),
            config=config,
            routes=routes,
        )
        if decision.recipient is not None:
            relayed.append(probe.name)
    return relayed
