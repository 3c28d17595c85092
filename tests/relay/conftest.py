"""Shared fixtures for relay tests."""

from __future__ import annotations

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
