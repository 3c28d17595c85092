"""Fixtures for the fault suite (the DNS server is the one tests/relay uses)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.relay.dnsserver import DnsServer


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    server = DnsServer().start()
    yield server
    server.stop()
