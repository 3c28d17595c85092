"""DNS adapter: MX and address lookups for direct delivery, on dnspython's async resolver.

The scheduler's MX hops (relay.hops) ask `DnsResolver.mx(domain)`, `DnsResolver.txt(name)`
(the ``_mta-sts`` record, relay.mta_sts) and
`DnsResolver.addresses(host)` and hand the typed answers (relay.core.mx) to the pure MX
planner. This module only talks DNS and maps
dnspython's exceptions onto `LookupStatus`: NXDOMAIN -> NXDOMAIN; NoAnswer -> NO_RECORDS;
NoNameservers (every server answered SERVFAIL/REFUSED), timeouts and other resolver errors ->
TEMPFAIL (RFC 5321 5.1: a temporary lookup failure must not bounce mail).

The resolver is the system one (/etc/resolv.conf) unless ``dns.nameservers`` in the relay config
lists servers as ``"ip"`` or ``"ip:port"``; ``dns.timeout`` bounds each lookup. Answers are
cached by dnspython's `dns.resolver.Cache`, which honours each record set's TTL.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import Protocol

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from relay.config import DnsConfig
from relay.core.mx import AddressAnswer, LookupStatus, MxAnswer, MxRecord

log = logging.getLogger(__name__)


class Resolver(Protocol):
    """What the MX hops need from DNS (tests may pass any object with these methods)."""

    async def mx(self, domain: str) -> MxAnswer: ...

    async def addresses(self, host: str) -> AddressAnswer: ...

    async def txt(self, name: str) -> tuple[LookupStatus, tuple[str, ...]]: ...


def parse_nameserver(text: str) -> tuple[str, int]:
    """``"10.0.0.1"`` -> (10.0.0.1, 53); ``"127.0.0.1:5353"``; ``"[::1]:5353"``; ``"::1"``."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":")
        return host, int(port) if port else 53
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, int(port)
    return text, 53


def build_resolver(config: DnsConfig) -> dns.asyncresolver.Resolver:
    """A dnspython async resolver for `config`, with a TTL-respecting cache."""
    if config.nameservers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [
            dns.nameserver.Do53Nameserver(host, port)
            for host, port in (parse_nameserver(ns) for ns in config.nameservers)
        ]
    else:
        try:
            resolver = dns.asyncresolver.Resolver(configure=True)
        except dns.resolver.NoResolverConfiguration:
            log.warning("no usable /etc/resolv.conf; falling back to 127.0.0.1")
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = ["127.0.0.1"]
    resolver.lifetime = config.timeout
    resolver.timeout = config.timeout
    resolver.cache = dns.resolver.Cache()
    return resolver


def _absolute(name: str) -> dns.name.Name:
    return dns.name.from_text(name.rstrip(".") + ".")


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]


class DnsResolver:
    """MX and A/AAAA lookups with typed results; never raises for DNS failures."""

    def __init__(self, config: DnsConfig) -> None:
        self._resolver = build_resolver(config)

    async def _query(
        self, name: str, rdtype: dns.rdatatype.RdataType
    ) -> tuple[LookupStatus, list[object], str]:
        try:
            answer = await self._resolver.resolve(_absolute(name), rdtype, search=False)
        except dns.resolver.NXDOMAIN as exc:
            return LookupStatus.NXDOMAIN, [], _describe(exc)
        except dns.resolver.NoAnswer as exc:
            return LookupStatus.NO_RECORDS, [], _describe(exc)
        except dns.resolver.NoNameservers:
            return LookupStatus.TEMPFAIL, [], "no nameserver answered (SERVFAIL or REFUSED)"
        except dns.exception.Timeout as exc:
            return LookupStatus.TEMPFAIL, [], f"timed out: {_describe(exc)}"
        except (dns.exception.DNSException, OSError) as exc:
            return LookupStatus.TEMPFAIL, [], _describe(exc)
        return LookupStatus.OK, list(answer), ""

    async def mx(self, domain: str) -> MxAnswer:
        status, rdatas, detail = await self._query(domain, dns.rdatatype.MX)
        records = tuple(
            MxRecord(
                preference=int(getattr(rdata, "preference", 0)),
                exchange=str(getattr(rdata, "exchange", "")).rstrip(".").lower(),
            )
            for rdata in rdatas
        )
        if status is LookupStatus.OK and not records:
            status = LookupStatus.NO_RECORDS
        return MxAnswer(status=status, records=records, detail=detail)

    async def txt(self, name: str) -> tuple[LookupStatus, tuple[str, ...]]:
        """TXT records of `name`, each one's strings joined (RFC 7208 3.3 / RFC 8461 3.1)."""
        status, rdatas, _detail = await self._query(name, dns.rdatatype.TXT)
        texts = tuple(b"".join(getattr(rdata, "strings", ())).decode("utf-8", "replace") for rdata in rdatas)
        return status, texts

    async def addresses(self, host: str) -> AddressAnswer:
        try:
            return AddressAnswer(LookupStatus.OK, (str(ipaddress.ip_address(host)),))
        except ValueError:
            pass
        (v4_status, v4, v4_detail), (v6_status, v6, v6_detail) = await asyncio.gather(
            self._query(host, dns.rdatatype.A), self._query(host, dns.rdatatype.AAAA)
        )
        addresses = tuple(str(getattr(r, "address", r)) for r in (*v4, *v6))
        if addresses:
            return AddressAnswer(LookupStatus.OK, addresses)
        statuses = {v4_status, v6_status}
        detail = v4_detail or v6_detail
        if LookupStatus.TEMPFAIL in statuses:
            return AddressAnswer(LookupStatus.TEMPFAIL, (), detail)
        if statuses == {LookupStatus.NXDOMAIN}:
            return AddressAnswer(LookupStatus.NXDOMAIN, (), detail)
        return AddressAnswer(LookupStatus.NO_RECORDS, (), detail)
