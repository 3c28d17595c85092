"""Shared fixtures for relay tests."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.relay.dnsserver import DnsServer


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    """A real authoritative DNS server on 127.0.0.1:<free port> (UDP and TCP); add records with
    ``dns_server.add(name, type, *values)`` and point ``dns.nameservers`` at
    ``dns_server.nameserver``."""
    server = DnsServer().start()
    yield server
    server.stop()


@pytest.fixture
def synced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the files os.fsync is called on (read through /proc, so the name the file
    had when it was synced), in order; the fsyncs still happen."""
    names: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        names.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return names
