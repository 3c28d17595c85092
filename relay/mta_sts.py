"""MTA-STS policies (RFC 8461): the ``_mta-sts`` TXT lookup, the HTTPS fetch and the cache.

relay.hops asks `MtaSts.policy(domain, ca_file)` before delivering to the MX hosts of a domain
under ``tls: mta-sts``, and hands the answer to relay.core.mta_sts.plan_tls (the decisions).

What happens (RFC 8461 3, 5.1):
- the TXT record ``_mta-sts.<domain>`` is looked up through the relay's resolver (relay.dns);
  its ``id`` says which policy is current;
- a cached policy that has not outlived its ``max_age`` is used while the TXT record names the
  same id, or has gone (RFC 8461 5.1: a cached policy stays in force until it expires);
- otherwise the policy is fetched from ``https://mta-sts.<domain>/.well-known/mta-sts.txt``: the
  host name resolved by the relay's resolver as well (so a cluster's or a test's DNS answers for
  it), its certificate verified (the system's CAs, or the MX hop's ``caFile``), no redirect
  followed (3.3), at most 64 KiB read, `FETCH_TIMEOUT` seconds;
- a fetch that fails keeps a cached policy that is still valid, else no policy applies (the
  delivery is opportunistic: RFC 8461 does not let a failed fetch block mail).

Counted in ``mailrelay_mta_sts_policies_total{result}`` (fetched, cached, none, failed). One
cache per worker process.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from relay import metrics
from relay.core.mta_sts import Policy, PolicyError, parse_policy, txt_id
from relay.core.mx import LookupStatus
from relay.dns import Resolver

log = logging.getLogger(__name__)

FETCH_TIMEOUT = 10.0
MAX_POLICY_BYTES = 64 * 1024


@dataclass
class _Cached:
    policy: Policy
    expires: float


class _RelayDns(AbstractResolver):
    """aiohttp's host lookups through the relay's own resolver."""

    def __init__(self, resolver: Resolver) -> None:
        self._resolver = resolver

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        answer = await self._resolver.addresses(host)
        if answer.status is not LookupStatus.OK or not answer.addresses:
            raise OSError(f"cannot resolve {host}: {answer.status.value} {answer.detail}".strip())
        return [
            {
                "hostname": host,
                "host": address,
                "port": port,
                "family": socket.AF_INET6 if ":" in address else socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
            for address in answer.addresses
        ]

    async def close(self) -> None:
        return None


class MtaSts:
    """Policy lookups with a cache per domain (max_age)."""

    def __init__(self, resolver: Callable[[], Resolver], *, clock: Callable[[], float] = time.time) -> None:
        self._resolver = resolver
        self._clock = clock
        self._cache: dict[str, _Cached] = {}
        self._contexts: dict[Path | None, ssl.SSLContext] = {}
        self.fetches = 0

    def _context(self, ca_file: Path | None) -> ssl.SSLContext:
        context = self._contexts.get(ca_file)
        if context is None:
            context = self._contexts[ca_file] = ssl.create_default_context(
                cafile=str(ca_file) if ca_file else None
            )
        return context

    async def policy(self, domain: str, ca_file: Path | None = None) -> Policy | None:
        """The MTA-STS policy in force for `domain`, or None."""
        resolver = self._resolver()
        status, records = await resolver.txt(f"_mta-sts.{domain}")
        policy_id = txt_id(records) if status is LookupStatus.OK else None
        now = self._clock()
        cached = self._cache.get(domain)
        if cached is not None and now >= cached.expires:
            del self._cache[domain]
            cached = None
        if cached is not None and (policy_id is None or policy_id == cached.policy.id):
            metrics.MTA_STS_POLICIES.labels(result="cached").inc()
            return cached.policy
        if policy_id is None:
            metrics.MTA_STS_POLICIES.labels(result="none").inc()
            return None
        try:
            text = await self._fetch(domain, resolver, ca_file)
            policy = parse_policy(text, policy_id)
        except (PolicyError, aiohttp.ClientError, OSError, TimeoutError, UnicodeDecodeError) as exc:
            metrics.MTA_STS_POLICIES.labels(result="failed").inc()
            log.warning("MTA-STS policy of %s (id %s) cannot be fetched: %s", domain, policy_id, exc)
            return cached.policy if cached is not None else None
        metrics.MTA_STS_POLICIES.labels(result="fetched").inc()
        log.info(
            "MTA-STS policy of %s: mode %s, mx %s, max_age %ds",
            domain,
            policy.mode,
            policy.mx,
            policy.max_age,
        )
        self._cache[domain] = _Cached(policy, now + policy.max_age)
        return policy

    async def _fetch(self, domain: str, resolver: Resolver, ca_file: Path | None) -> str:
        self.fetches += 1
        url = f"https://mta-sts.{domain}/.well-known/mta-sts.txt"
        connector = aiohttp.TCPConnector(resolver=_RelayDns(resolver), ssl=self._context(ca_file))
        timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT)
        async with (
            aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
            session.get(url, allow_redirects=False) as response,
        ):
            if response.status != 200:
                raise OSError(f"{url} answered HTTP {response.status}")
            body: Any = await asyncio.wait_for(response.content.read(MAX_POLICY_BYTES + 1), FETCH_TIMEOUT)
            if len(body) > MAX_POLICY_BYTES:
                raise OSError(f"{url}: the policy is larger than {MAX_POLICY_BYTES} bytes")
            return bytes(body).decode("utf-8")
