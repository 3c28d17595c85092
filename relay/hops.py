"""Hop iteration (Postfix's qmgr delivery to its transports): one route group through its hops.

The scheduler calls `Hops.deliver_group(message, group)` for each group of relay.core.routing's
plan and gets one `Attempted` per recipient of the group back. What happens in between:

- the route's hops are tried in order (nextHop, then failover); recipients deferred at a hop
  (unreachable, 4xx) go on to the next one, final ones stay (relay.core.failover). The same
  loop, `fail_over`, runs over an MX hop's hosts and addresses;
- every SMTP hop (relay, smarthost, MX) carries the route's DKIM plan (relay.core.dkim:
  which key, which header fields; relay.delivery signs); gateways and reject hops are not
  signed;
- every SMTP transaction first takes its place in the route's budget (relay.throttle: rate
  limits, connections, adaptive backoff per destination; a destination is the MX rollup of an
  MX hop, relay.core.throttle.rollup, or the host of a relay or smarthost hop) and reports
  what the destination answered; a place further out than relay.throttle.MAX_WAIT defers the
  recipients with 451 4.7.0;
- a relay or smarthost hop is one transaction through the injected SMTP client
  (relay.delivery); a reject hop answers with its configured reply; a gateway hop goes to its
  transport from the `GatewayCache`, at most ``queue.maxPerDestination`` at a time, and a
  gateway that raises or cannot be built defers (4.3.0);
- an MX hop looks up the domain with the injected resolver (relay.dns) and relay.core.mx
  orders the hosts; up to `MAX_MX_HOSTS` hosts and `MAX_ADDRESSES_PER_HOST` addresses of each
  are tried, the next after a connection failure or a 4xx; a permanent DNS answer (null MX,
  NXDOMAIN) bounces, a failed lookup defers. TLS per the hop's ``tls`` (relay.core.mta_sts
  plan_tls; the MTA-STS policy from relay.mta_sts): opportunistic, verified, or under an
  enforced policy only the matching hosts with verified STARTTLS (none matching defers 4.7.5).

Every transport's answer passes `relay.core.outcome.one_each`: exactly one outcome per
recipient. No queue or spool work here (that is the scheduler's), and no decision beyond
sequencing: the decisions are in the pure modules named above.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import random
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Protocol

from relay import metrics
from relay.config import (
    GatewayHop,
    MxHop,
    NextHop,
    RejectHop,
    RelayConfig,
    RelayHop,
    RouteConfig,
    SmarthostHop,
)
from relay.core import dkim, mta_sts, outcome, routing, throttle
from relay.core import mx as mxplan
from relay.core.failover import Failover
from relay.core.model import DeliveryRequest, Disposition, Message, Recipient, RecipientOutcome
from relay.core.settle import Attempted
from relay.delivery import SmtpTarget, TargetTls, target_for_hop
from relay.dns import Resolver
from relay.gateways.cache import GatewayCache
from relay.mta_sts import MtaSts
from relay.throttle import Limiter

log = logging.getLogger(__name__)

MAX_MX_HOSTS = 10  # hosts of one domain tried per attempt
MAX_ADDRESSES_PER_HOST = 4

Try = Callable[[list[Recipient]], Awaitable[Sequence[RecipientOutcome]]]


class SmtpDelivery(Protocol):
    """What the hops need of an SMTP client (relay.delivery.SmtpClient)."""

    async def deliver(self, target: SmtpTarget, request: DeliveryRequest) -> list[RecipientOutcome]: ...


async def fail_over(recipients: Sequence[Recipient], tries: AsyncGenerator[Try, None]) -> Failover:
    """Give the recipients still deferred to each try in turn, until none is left or the tries
    run out (the one failover loop)."""
    failover = Failover(recipients)
    async with contextlib.aclosing(tries):
        async for attempt in tries:
            pending = list(failover.pending)
            failover.record(outcome.one_each(pending, await attempt(pending)))
            if failover.done:
                break
    return failover


class Hops:
    """Delivers route groups; shared by every delivery of one scheduler."""

    def __init__(
        self,
        config: Callable[[], RelayConfig],
        client: SmtpDelivery,
        resolver: Callable[[], Resolver],
        gateways: GatewayCache,
        rng: random.Random,
        limiter: Limiter | None = None,
        mta_sts: MtaSts | None = None,
    ) -> None:
        self._config = config  # the current one: a reload applies to the next delivery
        self._client = client
        self._limiter = limiter
        self._mta_sts = mta_sts
        self._resolver = resolver
        self._gateways = gateways
        self._rng = rng

    async def deliver_group(self, message: Message, group: routing.RouteGroup) -> list[Attempted]:
        """Try the group's hops in order; recipients deferred at one hop go to the next."""
        stored: set[str] = set()  # delivered by a gateway: a final delivery

        async def tries() -> AsyncGenerator[Try, None]:
            for hop in group.hops:
                yield functools.partial(self._try_hop, message, group, hop, stored)

        failover = await fail_over(group.recipients, tries())
        route = group.route.name
        return [Attempted(o, route, o.recipient.address in stored) for o in failover.outcomes()]

    async def _try_hop(
        self,
        message: Message,
        group: routing.RouteGroup,
        hop: NextHop,
        stored: set[str],
        recipients: list[Recipient],
    ) -> list[RecipientOutcome]:
        outcomes = await self._deliver_hop(message, hop, group, recipients)
        if isinstance(hop, GatewayHop):
            stored.update(o.recipient.address for o in outcomes if o.disposition is Disposition.DELIVERED)
        deferred = sum(1 for o in outcomes if o.disposition is Disposition.DEFERRED)
        if deferred:
            log.info(
                "[%s] %s: %d recipients deferred at %s%s",
                message.entry.queue_id,
                group.route.name,
                deferred,
                routing.hop_label(hop),
                "; trying the next hop" if hop is not group.hops[-1] else "",
            )
        return outcomes

    async def _deliver_hop(
        self, message: Message, hop: NextHop, group: routing.RouteGroup, recipients: list[Recipient]
    ) -> list[RecipientOutcome]:
        if isinstance(hop, RejectHop):
            return [outcome.from_reply(r, hop.code, hop.message) for r in recipients]
        if isinstance(hop, RelayHop | SmarthostHop):
            return await self._smtp(target_for_hop(hop), message, group.route, hop.host, recipients)
        if isinstance(hop, MxHop):
            return await self._deliver_mx(message, hop, group, recipients)
        return await self._deliver_gateway(
            hop, DeliveryRequest(message=message, recipients=tuple(recipients))
        )

    async def _smtp(
        self,
        target: SmtpTarget,
        message: Message,
        route: RouteConfig,
        destination: str,
        recipients: list[Recipient],
    ) -> list[RecipientOutcome]:
        plan = dkim.plan_signature(route.dkim, message.content)
        request = DeliveryRequest(message=message, recipients=tuple(recipients), dkim=plan)
        limiter = self._limiter
        if limiter is None:
            return outcome.one_each(recipients, await self._client.deliver(target, request))
        connections = self._config().queue.max_per_destination
        async with limiter.acquire(route, destination, connections) as refusal:
            if refusal is not None:
                log.info("[%s] %s: %s; deferring", message.entry.queue_id, route.name, refusal)
                return outcome.for_all(recipients, outcome.deferred, "4.7.0", f"rate limited: {refusal}")
            outcomes = outcome.one_each(recipients, await self._client.deliver(target, request))
        limiter.record(route, destination, outcomes)
        return outcomes

    async def _smtp_testing(
        self,
        target: SmtpTarget,
        message: Message,
        route: RouteConfig,
        destination: str,
        recipients: list[Recipient],
    ) -> list[RecipientOutcome]:
        """MTA-STS mode testing (RFC 8461 5.2): verified STARTTLS first; where that fails the
        failure is logged and counted, and the mail goes opportunistically."""
        outcomes = await self._smtp(target, message, route, destination, recipients)
        failed = [o.recipient for o in outcomes if o.status.startswith(("4.7.5", "4.7.10"))]
        if not failed:
            return outcomes
        log.warning(
            "[%s] MTA-STS testing: verified TLS with %s failed (%s); enforce would defer, "
            "sending opportunistically",
            message.entry.queue_id,
            target.label,
            next(o.text for o in outcomes if o.recipient is failed[0]),
        )
        retry = dataclasses.replace(target, tls="opportunistic", verify=False)
        again = await self._smtp(retry, message, route, destination, failed)
        by_address = {o.recipient.address: o for o in again}
        return [by_address.get(o.recipient.address, o) for o in outcomes]

    async def _deliver_gateway(self, hop: GatewayHop, request: DeliveryRequest) -> list[RecipientOutcome]:
        recipients = list(request.recipients)
        try:
            transport, limit = self._gateways.get(hop, self._config())
        except Exception as exc:
            log.error("gateway %s cannot be built: %s", routing.hop_label(hop), exc)
            text = f"gateway {routing.hop_label(hop)} unavailable: {exc}"
            return outcome.for_all(recipients, outcome.deferred, "4.3.0", text)
        async with limit:
            try:
                outcomes = await transport.deliver(request)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception(
                    "[%s] gateway %s raised", request.message.entry.queue_id, routing.hop_label(hop)
                )
                return outcome.for_all(recipients, outcome.deferred, "4.3.0", f"gateway failed: {exc}")
        return outcome.one_each(recipients, outcomes)

    async def _deliver_mx(
        self, message: Message, hop: MxHop, group: routing.RouteGroup, recipients: list[Recipient]
    ) -> list[RecipientOutcome]:
        domain = group.domain
        resolver = self._resolver()
        plan = mxplan.plan_mx(domain, await resolver.mx(domain), self._rng)
        if isinstance(plan, mxplan.MxFailure):
            return [_failure(r, plan) for r in recipients]
        failures: list[mxplan.MxFailure] = []
        destination = throttle.rollup(plan.hosts)  # every MX host of a provider: one destination
        policy = None
        if hop.tls == "mta-sts" and self._mta_sts is not None:
            policy = await self._mta_sts.policy(domain, hop.ca_file)
        tls_plan = mta_sts.plan_tls(hop.tls, plan.hosts[:MAX_MX_HOSTS], policy)
        if tls_plan.refused:
            log.warning(
                "[%s] MTA-STS %s of %s: MX %s not in the policy (%s)%s",
                message.entry.queue_id,
                tls_plan.policy,
                domain,
                ", ".join(tls_plan.refused),
                ", ".join(policy.mx) if policy else "",
                "; not tried" if tls_plan.policy == "mta-sts-enforce" else "; delivering anyway (testing)",
            )
            result = "failed" if tls_plan.policy == "mta-sts-enforce" else "mx-mismatch"
            metrics.TLS_SESSIONS.labels(domain=domain, policy=tls_plan.policy, result=result).inc()
        if not tls_plan.hosts:
            text = f"no MX host of {domain} matches its MTA-STS policy (mode enforce): not sent"
            return outcome.for_all(recipients, outcome.deferred, "4.7.5", text)

        async def tries() -> AsyncGenerator[Try, None]:
            for host, host_tls in tls_plan.hosts:
                addresses = await resolver.addresses(host)
                if addresses.status is not mxplan.LookupStatus.OK or not addresses.addresses:
                    failures.append(mxplan.address_failure(domain, host, plan.implicit, addresses))
                    continue
                for address in addresses.addresses[:MAX_ADDRESSES_PER_HOST]:
                    target = _mx_target(hop, host, address, host_tls, tls_plan.policy, domain)
                    if host_tls == "testing":
                        yield functools.partial(self._smtp_testing, target, message, group.route, destination)
                    else:
                        yield functools.partial(self._smtp, target, message, group.route, destination)

        failover = await fail_over(recipients, tries())
        if not failover.tries:  # no host had an address
            failure = mxplan.combine_address_failures(failures)
            return [_failure(r, failure) for r in recipients]
        return failover.outcomes()


def _mx_target(
    hop: MxHop, host: str, address: str, tls: mta_sts.HostTls, policy: str, domain: str
) -> SmtpTarget:
    """One MX address as an SMTP target: `tls` from relay.core.mta_sts.plan_tls."""
    verified = tls in ("verify", "testing")
    mode: TargetTls = "none" if tls == "none" else "starttls" if verified else "opportunistic"
    return SmtpTarget(
        host=address,
        port=hop.port,
        tls=mode,
        server_name=host,
        verify=verified,
        ca_file=hop.ca_file,
        policy=policy,
        report_domain=domain,
    )


def _failure(recipient: Recipient, failure: mxplan.MxFailure) -> RecipientOutcome:
    if failure.permanent:
        return outcome.bounced(recipient, failure.status, failure.text, code=failure.code)
    return outcome.deferred(recipient, failure.status, failure.text, code=failure.code)
