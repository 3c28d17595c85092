"""Routing: which route a recipient takes, and which recipients share one transaction.

Postfix's trivial-rewrite in a few pure functions. The front calls `select_route` at RCPT time
(a `RejectHop` refuses the recipient there); the scheduler calls `plan_routes` before each
delivery attempt with the *current* route table (a reloaded table applies to queued mail too).

Rules (docs/DESIGN.md section 1): routes are tried in `RelayConfig.ordered_routes()` order (priority
descending, ties by name); a route matches when its recipientDomains (empty = all) match the
recipient's domain and its senderDomains (empty = all) match the sender's domain (the null
sender ``<>`` has the empty domain, which only an empty list or ``*`` matches). A route's hops
are its nextHop followed by its failover hops, tried in that order.

Grouping: recipients that take the same route to the same destination travel in one SMTP
transaction (RFC 5321 3.3: one MAIL, many RCPT). For an MX hop the destination is the
recipient's domain (each domain has its own MX hosts); for every other hop it is the route.

No I/O, no DNS, no clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from relay.config import (
    GatewayHop,
    MxHop,
    NextHop,
    RelayHop,
    RouteConfig,
    SmarthostHop,
)
from relay.core.addresses import domain_matches, domain_of
from relay.core.model import Recipient


def route_matches(route: RouteConfig, mail_from: str, rcpt: str) -> bool:
    """Whether one route applies to one (sender, recipient) pair."""
    recipient_domains = route.match.recipient_domains
    sender_domains = route.match.sender_domains
    if recipient_domains:
        domain = domain_of(rcpt)
        if not domain or not any(domain_matches(domain, p) for p in recipient_domains):
            return False
    if sender_domains:
        domain = domain_of(mail_from)
        if not any(p == "*" or (domain and domain_matches(domain, p)) for p in sender_domains):
            return False
    return True


def select_route(routes: Sequence[RouteConfig], mail_from: str, rcpt: str) -> RouteConfig | None:
    """The first matching route of `routes` (already in `ordered_routes()` order), or None."""
    for route in routes:
        if route_matches(route, mail_from, rcpt):
            return route
    return None


def route_hops(route: RouteConfig) -> tuple[NextHop, ...]:
    """The hops of a route in the order they are tried: nextHop, then each failover hop."""
    return (route.next_hop, *route.failover)


def hop_label(hop: NextHop) -> str:
    """A short human-readable name for logs and DSN diagnostics."""
    if isinstance(hop, RelayHop):
        return f"relay {hop.name} ({hop.host}:{hop.port})"
    if isinstance(hop, SmarthostHop):
        return f"smarthost {hop.host}:{hop.port}"
    if isinstance(hop, MxHop):
        return f"mx port {hop.port}"
    if isinstance(hop, GatewayHop):
        if hop.webhook is not None:
            return f"webhook {hop.webhook.url}"
        if hop.maildir is not None:
            return f"maildir {hop.maildir.path}"
        if hop.pipe is not None:
            return f"pipe {hop.pipe.command[0]}"
        return "gateway"
    return f"reject {hop.code}"


@dataclass(frozen=True)
class RouteGroup:
    """Recipients of one message that share a route and a destination: one transaction.

    `domain` is set for groups whose first hop is MX (the domain whose MX hosts are looked up)
    and empty otherwise.
    """

    route: RouteConfig
    domain: str
    recipients: tuple[Recipient, ...]

    @property
    def hops(self) -> tuple[NextHop, ...]:
        return route_hops(self.route)

    @property
    def key(self) -> tuple[str, str]:
        return (self.route.name, self.domain)


@dataclass(frozen=True)
class RoutingPlan:
    """Every pending recipient of a message, grouped; `unrouted` matched no route at all."""

    groups: tuple[RouteGroup, ...]
    unrouted: tuple[Recipient, ...]


def _needs_domain(route: RouteConfig) -> bool:
    return any(isinstance(hop, MxHop) for hop in route_hops(route))


def plan_routes(
    routes: Sequence[RouteConfig], mail_from: str, recipients: Sequence[Recipient]
) -> RoutingPlan:
    """Group `recipients` by (route, destination), keeping the envelope's recipient order."""
    grouped: dict[tuple[str, str], list[Recipient]] = {}
    chosen: dict[tuple[str, str], RouteConfig] = {}
    unrouted: list[Recipient] = []
    for recipient in recipients:
        route = select_route(routes, mail_from, recipient.address)
        if route is None:
            unrouted.append(recipient)
            continue
        domain = domain_of(recipient.address) if _needs_domain(route) else ""
        key = (route.name, domain)
        grouped.setdefault(key, []).append(recipient)
        chosen[key] = route
    groups = tuple(
        RouteGroup(route=chosen[key], domain=key[1], recipients=tuple(rcpts))
        for key, rcpts in grouped.items()
    )
    return RoutingPlan(groups=groups, unrouted=tuple(unrouted))
