"""`make doctor` (tests/doctor.py): capabilities are checked by using them, a missing one is
reported with what provides it, and a test that needs it fails with that hint."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests import doctor
from tests.doctor import Capability, Result, _run


def test_a_module_missing_behind_a_present_binary_is_missing() -> None:
    # perl is there (Debian's perl-base), the module is not: the check must say missing.
    result = _run(["perl", "-MNo::Such::Module::Mailrelay", "-e1"])
    assert not result.ok and "No/Such/Module/Mailrelay.pm" in result.detail
    assert _run(["perl", "-e1"]).ok


def test_the_report_names_what_provides_a_missing_capability() -> None:
    capabilities = (
        Capability("here", "a test", "nothing", (), lambda: Result(True, "fine")),
        Capability(
            "gone", "tests/x.py", "Debian package gone-pkg", ("gone-pkg",), lambda: _run(["no-such-tool-x"])
        ),
        Capability(
            "root-only",
            "a root test",
            "running as root",
            (),
            lambda: Result(False, "not root"),
            required=False,
        ),
    )
    lines, healthy = doctor.report(capabilities)
    assert not healthy
    assert lines[0].startswith("ok ") and "here" in lines[0]
    assert lines[1].startswith("MISSING") and "no-such-tool-x: not found" in lines[1]
    assert "provided by Debian package gone-pkg; used by tests/x.py" in lines[2]
    assert lines[3].startswith("absent") and "root-only" in lines[3]
    _, healthy = doctor.report(capabilities[::2])
    assert healthy  # an optional capability does not make the doctor fail


def test_require_fails_with_the_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor, "status", lambda name: Result(False, "Can't locate Net/SSLeay.pm"))
    with pytest.raises(pytest.fail.Exception) as failure:
        doctor.require("swaks-tls")
    message = str(failure.value)
    assert (
        "swaks-tls is missing" in message
        and "libnet-ssleay-perl" in message
        and "make system-deps" in message
    )


def test_the_installer_is_asked_for_the_packages_of_missing_capabilities(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(doctor, "status", lambda name: Result(name in {"swaks", "postfix", "smtp-sink"}, ""))
    assert doctor.missing_debian_packages() == ["libnet-ssleay-perl", "postfix", "graphviz", "prometheus"]


def test_every_required_capability_is_here() -> None:
    """What `make test` checks before the suite; here, so a broken install also fails pytest."""
    done = subprocess.run([sys.executable, "-m", "tests.doctor"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    for capability in doctor.CAPABILITIES:
        assert capability.name in done.stdout
