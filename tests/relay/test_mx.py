"""relay.core.mx (pure planning) and relay.dns (the resolver adapter) against a real DNS server."""

from __future__ import annotations

import random

import pytest

from relay.config import DnsConfig
from relay.core.mx import (
    AddressAnswer,
    LookupStatus,
    MxAnswer,
    MxFailure,
    MxPlan,
    MxRecord,
    address_failure,
    combine_address_failures,
    is_null_mx,
    order_hosts,
    plan_mx,
)
from relay.dns import DnsResolver, parse_nameserver
from tests.relay.dnsserver import DnsServer

OK = LookupStatus.OK


def answer(*records: tuple[int, str]) -> MxAnswer:
    return MxAnswer(OK, tuple(MxRecord(p, e) for p, e in records))


def test_preference_order() -> None:
    plan = plan_mx("d.test", answer((20, "b.d.test"), (10, "a.d.test"), (30, "c.d.test")))
    assert plan == MxPlan(hosts=("a.d.test", "b.d.test", "c.d.test"))


def test_ties_are_shuffled_with_the_injected_random() -> None:
    records = [MxRecord(10, f"h{i}.d.test") for i in range(6)] + [MxRecord(5, "first.d.test")]
    orders = {order_hosts(records, random.Random(seed)) for seed in range(30)}
    assert all(order[0] == "first.d.test" for order in orders)
    assert all(sorted(order[1:]) == [f"h{i}.d.test" for i in range(6)] for order in orders)
    assert len(orders) > 5  # ties really are shuffled
    assert order_hosts(records, random.Random(7)) == order_hosts(records, random.Random(7))


def test_duplicates_keep_best_preference() -> None:
    assert order_hosts([MxRecord(20, "a.test"), MxRecord(10, "A.test."), MxRecord(15, "b.test")]) == (
        "a.test",
        "b.test",
    )


@pytest.mark.parametrize(
    ("mx_answer", "expected"),
    [
        (answer((0, "")), MxFailure(556, "5.1.10", "domain d.test does not accept mail (null MX, RFC 7505)")),
        (MxAnswer(LookupStatus.NXDOMAIN), MxFailure(550, "5.1.2", "domain d.test does not exist (NXDOMAIN)")),
        (MxAnswer(LookupStatus.NO_RECORDS), MxPlan(hosts=("d.test",), implicit=True)),
    ],
)
def test_plan_outcomes(mx_answer: MxAnswer, expected: MxPlan | MxFailure) -> None:
    assert plan_mx("D.test.", mx_answer) == expected


def test_tempfail_defers_4_4_3() -> None:
    plan = plan_mx("d.test", MxAnswer(LookupStatus.TEMPFAIL, detail="timed out"))
    assert isinstance(plan, MxFailure) and plan.status == "4.4.3" and not plan.permanent
    assert "timed out" in plan.text


def test_null_mx_detection() -> None:
    assert is_null_mx([MxRecord(0, "")])
    assert not is_null_mx([MxRecord(0, ""), MxRecord(10, "mx.test")])
    assert not is_null_mx([MxRecord(0, "mx.test")])


def test_address_failures() -> None:
    nx = AddressAnswer(LookupStatus.NXDOMAIN)
    temp = AddressAnswer(LookupStatus.TEMPFAIL)
    assert address_failure("d.test", "d.test", True, nx).status == "5.1.2"
    assert address_failure("d.test", "mx.d.test", False, nx).status == "5.4.4"
    assert address_failure("d.test", "mx.d.test", False, temp).status == "4.4.3"
    both = [address_failure("d.test", "a", False, nx), address_failure("d.test", "b", False, temp)]
    assert combine_address_failures(both).status == "4.4.3"
    assert combine_address_failures(both[:1]).status == "5.4.4"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.1", ("10.0.0.1", 53)),
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        ("[::1]:54", ("::1", 54)),
        ("::1", ("::1", 53)),
    ],
)
def test_parse_nameserver(text: str, expected: tuple[str, int]) -> None:
    assert parse_nameserver(text) == expected


# --------------------------------------------------------------------------- the adapter


def resolver(server: DnsServer, timeout: float = 1.0) -> DnsResolver:
    return DnsResolver(DnsConfig(nameservers=[server.nameserver], timeout=timeout))


async def test_resolver_maps_answers(dns_server: DnsServer) -> None:
    dns_server.add("d.test", "MX", "10 mx1.d.test.", "20 mx2.d.test.")
    dns_server.add("mx1.d.test", "A", "127.0.0.2", "127.0.0.3")
    dns_server.add("mx1.d.test", "AAAA", "::1")
    dns_server.add("null.test", "MX", "0 .")
    dns_server.add("implicit.test", "A", "127.0.0.4")
    dns_server.servfail("broken.test")
    r = resolver(dns_server)
    mx = await r.mx("d.test")
    assert mx.status is OK and sorted(mx.records) == [MxRecord(10, "mx1.d.test"), MxRecord(20, "mx2.d.test")]
    assert (await r.mx("null.test")).records == (MxRecord(0, ""),)
    assert (await r.mx("implicit.test")).status is LookupStatus.NO_RECORDS
    assert (await r.mx("missing.test")).status is LookupStatus.NXDOMAIN
    assert (await r.mx("broken.test")).status is LookupStatus.TEMPFAIL
    addresses = await r.addresses("mx1.d.test")
    assert addresses.status is OK
    assert set(addresses.addresses[:2]) == {"127.0.0.2", "127.0.0.3"} and addresses.addresses[2] == "::1"
    assert (await r.addresses("mx2.d.test")).status is LookupStatus.NXDOMAIN
    assert (await r.addresses("d.test")).status is LookupStatus.NO_RECORDS
    assert (await r.addresses("127.0.0.9")).addresses == ("127.0.0.9",)


async def test_resolver_timeout_is_a_tempfail(dns_server: DnsServer) -> None:
    dns_server.drop("slow.test")
    result = await resolver(dns_server, timeout=0.3).mx("slow.test")
    assert result.status is LookupStatus.TEMPFAIL
    assert "timed out" in result.detail


async def test_resolver_cache_respects_ttl(dns_server: DnsServer) -> None:
    dns_server.add("cached.test", "MX", "10 mx.cached.test.", ttl=300)
    dns_server.add("short.test", "MX", "10 mx.short.test.", ttl=0)
    r = resolver(dns_server)
    for _ in range(3):
        assert (await r.mx("cached.test")).status is OK
        assert (await r.mx("short.test")).status is OK
    assert dns_server.count("cached.test", "MX") == 1
    assert dns_server.count("short.test", "MX") == 3  # TTL 0 is never served from the cache


async def test_resolver_uses_tcp_when_the_answer_is_truncated(dns_server: DnsServer) -> None:
    hosts = [f"{p} mx{p}-with-a-rather-long-name-to-fill-the-packet.big.test." for p in range(1, 40)]
    dns_server.add("big.test", "MX", *hosts)
    result = await resolver(dns_server).mx("big.test")
    assert result.status is OK and len(result.records) == 39
    assert dns_server.tcp_queries == 1
