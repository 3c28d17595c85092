"""The topology of one namespace: which RelayRoutes each MailRelay selects, where `relay` next
hops point, what is wrong (routing loops, unknown relays, conflicting routes), and the
`relay.config.RelayConfig` each relay runs.

`plan_namespace` is the one entry point. The reconcile path calls it with the bodies it listed
from the API and `cluster_resolver()`; `mailrelay render` and `check` call it with manifests from
files; `mailrelay up` calls it with its own `RenderContext` per relay (folders on this machine
instead of mounted Secrets) and a resolver that answers with local ports. Pure: no I/O, no clock,
no Kubernetes client; problems are values (`Problem`), never exceptions.

Routing semantics mirror the relay's (relay.config.RelayConfig.ordered_routes): routes are tried
by priority, highest first, ties broken by name; the first route whose recipient patterns (and
sender patterns, when given) match takes the message. A loop is found by following, for every
domain pattern that any route names, the route each relay would pick, through `relay` hops and
failover `relay` hops, until a relay repeats (RFC 5321 6.3 leaves loop detection to the MTAs;
the relay's hop limit is the last line of defence, this is the first).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import PurePosixPath
from typing import Any, Literal

from relay.config import ConfigError, RelayConfig, dump_config, parse_config
from relay.core.addresses import domain_matches
from relay_operator import naming
from relay_operator.spec import (
    HopSpec,
    Invalid,
    MailRelay,
    MatchSpec,
    ObjectKey,
    RelayRoute,
    parse_mailrelay,
    parse_relayroute,
)

Severity = Literal["error", "warning"]


@dataclass(frozen=True, order=True)
class ObjectRef:
    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


@dataclass(frozen=True)
class Problem:
    """Something a user can fix. `reason` is a condition reason (CamelCase)."""

    subject: ObjectRef
    reason: str  # InvalidSpec, RoutingLoop, UnknownRelay, NoRelayListener, Conflict, ConfigRejected, ...
    message: str
    severity: Severity = "error"

    def __str__(self) -> str:
        return f"{self.severity}: {self.subject}: {self.message} ({self.reason})"


# --------------------------------------------------------------------------- render context


_ETC = PurePosixPath("/etc/mailrelay")
_SPOOL = PurePosixPath("/var/spool/mailrelay")


@dataclass(frozen=True)
class RenderContext:
    """Where a relay finds its files and binds its ports. Defaults are the pod layout the
    builders mount; `mailrelay up` passes folders under its state directory."""

    config_dir: PurePosixPath = _ETC / "config"
    tls_dir: PurePosixPath = _ETC / "tls"
    auth_dir: PurePosixPath = _ETC / "auth"
    secrets_dir: PurePosixPath = _ETC / "secrets"
    data_dir: PurePosixPath = _SPOOL  # the spool volume
    listener_host: str = "0.0.0.0"
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 9090
    port_offset: int = 0  # a listener binds declared port + offset (`up` shifts ports)

    @property
    def queue_dir(self) -> PurePosixPath:
        return self.data_dir / "queue"

    @property
    def maildir_root(self) -> PurePosixPath:
        return self.data_dir / "maildir"

    @property
    def config_file(self) -> PurePosixPath:
        return self.config_dir / naming.CONFIG_KEY

    def listener_port(self, port: int) -> int:
        return port + self.port_offset

    def secret_dir(self, secret: str) -> PurePosixPath:
        return self.secrets_dir / secret


POD_CONTEXT = RenderContext()


@dataclass(frozen=True)
class RelayAddress:
    host: str
    port: int


RelayResolver = Callable[[MailRelay], "RelayAddress | None"]
ContextFactory = Callable[[ObjectKey], RenderContext]


def cluster_resolver(cluster_domain: str = "cluster.local") -> RelayResolver:
    """In a cluster: the target's client Service DNS name and its first relay-mode listener port."""

    def resolve(target: MailRelay) -> RelayAddress | None:
        listener = target.spec.first_relay_listener()
        if listener is None:
            return None
        host = naming.service_dns_name(target.key.name, target.key.namespace, cluster_domain)
        return RelayAddress(host, listener.port)

    return resolve


def context_resolver(context_for: ContextFactory, host: str = "127.0.0.1") -> RelayResolver:
    """On one machine: the port the target's first relay-mode listener binds in its context."""

    def resolve(target: MailRelay) -> RelayAddress | None:
        listener = target.spec.first_relay_listener()
        if listener is None:
            return None
        return RelayAddress(host, context_for(target.key).listener_port(listener.port))

    return resolve


# --------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class SecretUse:
    """A Secret a relay needs mounted: where, for what, and which keys must be in it."""

    secret: str
    purpose: Literal["tls", "auth", "smarthost", "webhook", "ca"]
    mount_dir: PurePosixPath
    keys: tuple[str, ...]
    used_by: str  # "spec.tls", "spec.auth" or "RelayRoute <name>"


@dataclass(frozen=True)
class RelayPlan:
    """Everything the builders and the status need for one valid MailRelay."""

    relay: MailRelay
    context: RenderContext
    routes: tuple[RelayRoute, ...]  # selected and valid, in the order the relay tries them
    config: RelayConfig | None  # None when relay.config refused the rendering (see problems)
    secrets: tuple[SecretUse, ...]
    problems: tuple[Problem, ...]

    @property
    def valid(self) -> bool:
        return self.config is not None and not any(p.severity == "error" for p in self.problems)

    @property
    def config_yaml(self) -> str:
        assert self.config is not None, "no config rendered; see problems"
        return dump_config(self.config)

    @property
    def config_hash(self) -> str:
        """Hash of the whole rendered relay.yaml (routes included)."""
        return hashlib.sha256(self.config_yaml.encode()).hexdigest()[:16]

    @property
    def rollout_hash(self) -> str:
        """Hash of what a running relay cannot reload: listeners, TLS and AUTH files and
        Secrets, process count, metrics endpoint. Route edits leave it unchanged."""
        assert self.config is not None
        data = self.config.model_dump(
            mode="json", by_alias=True, include={"listeners", "tls", "auth", "workers", "metrics"}
        )
        spec = self.relay.spec
        data["secrets"] = [
            spec.tls.secret_name if spec.tls else None,
            spec.auth.secret_name if spec.auth else None,
        ]
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RoutePlan:
    """What became of one RelayRoute: who selects it and what is wrong with it."""

    key: ObjectKey
    route: RelayRoute | None  # None when the spec is invalid
    relays: tuple[str, ...]  # names of the MailRelays that select it
    problems: tuple[Problem, ...]
    generation: int | None = None

    @property
    def next_hop_summary(self) -> str:
        return self.route.spec.next_hop.summary() if self.route else ""


@dataclass(frozen=True)
class NamespacePlan:
    namespace: str
    relays: Mapping[str, RelayPlan]
    invalid_relays: Mapping[str, Invalid]
    routes: Mapping[str, RoutePlan]
    problems: tuple[Problem, ...] = field(default=())

    def problems_for(self, kind: str, name: str) -> list[Problem]:
        return [p for p in self.problems if p.subject.kind == kind and p.subject.name == name]

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]


# --------------------------------------------------------------------------- matching


def patterns_overlap(a: str, b: str) -> bool:
    """Whether some domain matches both patterns (``name``, ``*.name``, ``*``)."""
    if a == "*" or b == "*":
        return True
    if a.startswith("*.") and b.startswith("*."):
        return a == b or a.endswith(b[1:]) or b.endswith(a[1:])
    if a.startswith("*."):
        return domain_matches(b, a)
    if b.startswith("*."):
        return domain_matches(a, b)
    return a == b


def _lists_overlap(a: Sequence[str], b: Sequence[str]) -> bool:
    if not a or not b:
        return True
    return any(patterns_overlap(x, y) for x in a for y in b)


def matches_overlap(a: MatchSpec, b: MatchSpec) -> bool:
    return _lists_overlap(a.recipient_domains, b.recipient_domains) and _lists_overlap(
        a.sender_domains, b.sender_domains
    )


def _witness(pattern: str) -> str:
    """A domain that a pattern matches and no more specific name in a route is likely to."""
    if pattern == "*":
        return "any-domain.mailrelay.invalid"
    if pattern.startswith("*."):
        return "any-subdomain" + pattern[1:]
    return pattern


def _route_matches(route: RelayRoute, recipient: str, sender: str | None) -> bool:
    match = route.spec.match
    if match.recipient_domains and not any(domain_matches(recipient, p) for p in match.recipient_domains):
        return False
    if match.sender_domains:
        # As relay.core.routing.route_matches: "*" matches every sender, the null sender included.
        return "*" in match.sender_domains or (
            sender is not None and any(domain_matches(sender, p) for p in match.sender_domains)
        )
    return True


def order_routes(routes: Iterable[RelayRoute]) -> list[RelayRoute]:
    """The relay's order: priority descending, then name."""
    return sorted(routes, key=lambda r: (-r.spec.priority, r.key.name))


def select_routes(relay: MailRelay, routes: Iterable[RelayRoute]) -> list[RelayRoute]:
    """The routes a relay's routeSelector picks in its namespace (none when it has no selector)."""
    selector = relay.spec.route_selector
    if selector is None:
        return []
    return order_routes(
        r for r in routes if r.key.namespace == relay.key.namespace and selector.matches(r.labels)
    )


# --------------------------------------------------------------------------- loops


def find_loops(
    selected: Mapping[str, Sequence[RelayRoute]],
) -> list[tuple[tuple[str, ...], str, tuple[str, ...]]]:
    """Routing loops among relays of one namespace: (relays in the cycle, starting and ending
    with the same relay; the domain pattern; the routes taken), one per distinct cycle."""
    patterns = {"*"}
    senders: set[str | None] = {None}
    for routes in selected.values():
        for route in routes:
            patterns.update(route.spec.match.recipient_domains)
            senders.update(route.spec.match.sender_domains)
    found: dict[tuple[str, ...], tuple[tuple[str, ...], str, tuple[str, ...]]] = {}

    def walk(
        relay: str, recipient: str, sender: str | None, pattern: str, path: list[tuple[str, str]]
    ) -> None:
        route = next((r for r in selected.get(relay, ()) if _route_matches(r, recipient, sender)), None)
        if route is None:
            return
        for hop in route.spec.hops():
            if hop.relay is None:
                continue
            target = hop.relay.name
            step = [*path, (relay, route.key.name)]
            names = [name for name, _ in step]
            if target in names:
                cycle = step[names.index(target) :]
                relays = tuple(name for name, _ in cycle)
                start = relays.index(min(relays))
                canonical = relays[start:] + relays[:start]
                if canonical not in found:
                    found[canonical] = (
                        (*relays, target),
                        pattern,
                        tuple(f"{name}: {route_name}" for name, route_name in cycle),
                    )
            elif target in selected:
                walk(target, recipient, sender, pattern, step)

    for pattern in sorted(patterns):
        for sender_pattern in sorted(senders, key=lambda s: s or ""):
            sender = _witness(sender_pattern) if sender_pattern else None
            for relay in sorted(selected):
                walk(relay, _witness(pattern), sender, pattern, [])
    return sorted(found.values())


# --------------------------------------------------------------------------- rendering


def _ref(kind: str, key: ObjectKey) -> ObjectRef:
    return ObjectRef(kind, key.namespace, key.name)


def _hop_config(
    hop: HopSpec,
    route: RelayRoute,
    relays: Mapping[str, MailRelay],
    resolver: RelayResolver,
    context: RenderContext,
) -> tuple[dict[str, Any] | None, Problem | None]:
    if hop.relay is not None:
        target = relays.get(hop.relay.name)
        subject = _ref("RelayRoute", route.key)
        if target is None:
            return None, Problem(
                subject,
                "UnknownRelay",
                f"next hop relay {hop.relay.name!r}: no valid MailRelay of that name in namespace "
                f"{route.key.namespace}",
            )
        address = resolver(target)
        if address is None:
            return None, Problem(
                subject,
                "NoRelayListener",
                f"next hop relay {hop.relay.name!r} has no listener in mode relay to deliver to",
            )
        return {"kind": "relay", "name": hop.relay.name, "host": address.host, "port": address.port}, None
    if hop.smarthost is not None:
        smarthost = hop.smarthost
        data: dict[str, Any] = {
            "kind": "smarthost",
            "host": smarthost.host,
            "port": smarthost.port,
            "tls": smarthost.tls,
            "insecureSkipVerify": smarthost.insecure_skip_verify,
        }
        if smarthost.auth_secret_ref is not None:
            data["credentialsDir"] = str(context.secret_dir(smarthost.auth_secret_ref.name))
        if smarthost.ca_secret_ref is not None:
            data["caFile"] = str(
                context.secret_dir(smarthost.ca_secret_ref.name) / smarthost.ca_secret_ref.key
            )
        return data, None
    if hop.mx is not None:
        return {"kind": "mx", "port": hop.mx.port, "tls": hop.mx.tls}, None
    if hop.gateway is not None:
        gateway = hop.gateway
        if gateway.webhook is not None:
            webhook: dict[str, Any] = {
                "url": gateway.webhook.url,
                "format": gateway.webhook.format,
                "insecureSkipVerify": gateway.webhook.insecure_skip_verify,
                "timeout": gateway.webhook.timeout,
            }
            if gateway.webhook.auth_secret_ref is not None:
                ref = gateway.webhook.auth_secret_ref
                webhook["authHeaderFile"] = str(context.secret_dir(ref.name) / ref.key)
            if gateway.webhook.ca_secret_ref is not None:
                ca = gateway.webhook.ca_secret_ref
                webhook["caFile"] = str(context.secret_dir(ca.name) / ca.key)
            return {"kind": "gateway", "webhook": webhook}, None
        if gateway.maildir is not None:
            path = context.maildir_root / gateway.maildir.path
            return {"kind": "gateway", "maildir": {"path": str(path), "layout": gateway.maildir.layout}}, None
        assert gateway.pipe is not None
        return {
            "kind": "gateway",
            "pipe": {"command": gateway.pipe.command, "timeout": gateway.pipe.timeout},
        }, None
    assert hop.reject is not None
    return {"kind": "reject", "code": hop.reject.code, "message": hop.reject.reply_text()}, None


def _route_config(
    route: RelayRoute,
    relays: Mapping[str, MailRelay],
    resolver: RelayResolver,
    context: RenderContext,
) -> tuple[dict[str, Any], list[Problem]]:
    """A route as relay.config wants it. Hops that cannot be resolved are left out; when none
    is left, matching mail is refused with a temporary error so that senders retry (mail is
    neither lost nor sent somewhere else while the route is broken)."""
    hops: list[dict[str, Any]] = []
    problems: list[Problem] = []
    for hop in route.spec.hops():
        data, problem = _hop_config(hop, route, relays, resolver, context)
        if problem is not None:
            problems.append(problem)
        if data is not None:
            hops.append(data)
    if not hops:
        hops = [
            {
                "kind": "reject",
                "code": 451,
                "message": f"4.4.0 route {route.key.name}: next hop is not available",
            }
        ]
    match = route.spec.match
    return {
        "name": route.key.name,
        "priority": route.spec.priority,
        "match": {"recipientDomains": match.recipient_domains, "senderDomains": match.sender_domains},
        "nextHop": hops[0],
        "failover": hops[1:],
    }, problems


def _secret_uses(relay: MailRelay, routes: Sequence[RelayRoute], context: RenderContext) -> list[SecretUse]:
    uses: list[SecretUse] = []
    spec = relay.spec
    if spec.tls is not None:
        uses.append(
            SecretUse(spec.tls.secret_name, "tls", context.tls_dir, ("tls.crt", "tls.key"), "spec.tls")
        )
    if spec.auth is not None:
        uses.append(SecretUse(spec.auth.secret_name, "auth", context.auth_dir, (spec.auth.key,), "spec.auth"))
    for route in routes:
        for hop in route.spec.hops():
            if hop.smarthost is not None and hop.smarthost.auth_secret_ref is not None:
                name = hop.smarthost.auth_secret_ref.name
                uses.append(
                    SecretUse(
                        name,
                        "smarthost",
                        context.secret_dir(name),
                        ("username", "password"),
                        f"RelayRoute {route.key.name}",
                    )
                )
            if hop.gateway is not None and hop.gateway.webhook and hop.gateway.webhook.auth_secret_ref:
                ref = hop.gateway.webhook.auth_secret_ref
                uses.append(
                    SecretUse(
                        ref.name,
                        "webhook",
                        context.secret_dir(ref.name),
                        (ref.key,),
                        f"RelayRoute {route.key.name}",
                    )
                )
            ca = (
                hop.smarthost.ca_secret_ref
                if hop.smarthost is not None
                else hop.gateway.webhook.ca_secret_ref
                if hop.gateway is not None and hop.gateway.webhook is not None
                else None
            )
            if ca is not None:
                uses.append(
                    SecretUse(
                        ca.name, "ca", context.secret_dir(ca.name), (ca.key,), f"RelayRoute {route.key.name}"
                    )
                )
    return uses


def render_relay_config(
    relay: MailRelay,
    routes: Sequence[RelayRoute],
    relays: Mapping[str, MailRelay],
    resolver: RelayResolver,
    context: RenderContext,
) -> tuple[RelayConfig | None, list[Problem]]:
    """The relay.config document for one relay and its selected routes (in relay order)."""
    spec = relay.spec
    problems: list[Problem] = []
    route_docs = []
    for route in routes:
        doc, route_problems = _route_config(route, relays, resolver, context)
        route_docs.append(doc)
        problems += route_problems
    document: dict[str, Any] = {
        "version": 1,
        "hostname": spec.hostname,
        "listeners": [
            {
                "name": listener.name,
                "host": context.listener_host,
                "port": context.listener_port(listener.port),
                "mode": listener.mode,
                "tls": listener.tls,
                "auth": listener.auth,
            }
            for listener in spec.listeners
        ],
        "trustedNetworks": spec.trusted_networks,
        "acceptDomains": spec.accept_domains,
        "limits": {
            "maxMessageSize": spec.limits.max_message_size,
            "maxRecipients": spec.limits.max_recipients,
            "maxHops": spec.limits.max_hops,
            "maxConnections": spec.limits.max_connections,
            "maxConnectionsPerClient": spec.limits.max_connections_per_client,
            "idleTimeout": spec.limits.idle_timeout,
        },
        "queue": {
            "directory": str(context.queue_dir),
            "retry": {
                "minBackoff": spec.queue.retry.min_backoff,
                "maxBackoff": spec.queue.retry.max_backoff,
                "maxLifetime": spec.queue.retry.max_lifetime,
            },
            "maxConcurrency": spec.queue.max_concurrency,
            "maxPerDestination": spec.queue.max_per_destination,
        },
        "dns": {"nameservers": spec.dns.nameservers},
        "routes": route_docs,
        "metrics": {"host": context.metrics_host, "port": context.metrics_port},
        "workers": spec.workers,
        "logLevel": spec.log_level,
    }
    if spec.tls is not None:
        document["tls"] = {
            "certFile": str(context.tls_dir / "tls.crt"),
            "keyFile": str(context.tls_dir / "tls.key"),
        }
    if spec.auth is not None:
        document["auth"] = {
            "usersFile": str(context.auth_dir / spec.auth.key),
            "maxFailures": spec.auth.max_failures,
        }
    subject = _ref("MailRelay", relay.key)
    clashing = [
        listener.name
        for listener in spec.listeners
        if context.listener_port(listener.port) == context.metrics_port
    ]
    if clashing:
        problems.append(
            Problem(
                subject,
                "PortConflict",
                f"listener {clashing[0]!r} uses port {context.metrics_port}, the relay's metrics port",
            )
        )
        return None, problems
    try:
        return parse_config(document), problems
    except ConfigError as exc:
        detail = "; ".join(str(exc).splitlines())
        problems.append(
            Problem(subject, "ConfigRejected", f"the relay would refuse this configuration: {detail}")
        )
        return None, problems


def plan_namespace(
    namespace: str,
    relay_bodies: Sequence[Mapping[str, Any]],
    route_bodies: Sequence[Mapping[str, Any]],
    *,
    resolver: RelayResolver | None = None,
    context_for: ContextFactory | None = None,
) -> NamespacePlan:
    """Parse, select, resolve, validate and render every MailRelay and RelayRoute of a namespace.

    `resolver` defaults to `cluster_resolver()`; `context_for` to the pod layout. Bodies whose
    metadata.namespace is empty are taken to be in `namespace`.
    """
    resolve = resolver or cluster_resolver()
    context_of: ContextFactory = context_for or (lambda _key: POD_CONTEXT)
    problems: list[Problem] = []

    relays: dict[str, MailRelay] = {}
    invalid_relays: dict[str, Invalid] = {}
    for body in relay_bodies:
        parsed = parse_mailrelay(body, namespace)
        if isinstance(parsed, Invalid):
            invalid_relays[parsed.key.name] = parsed
            problems += [Problem(_ref("MailRelay", parsed.key), "InvalidSpec", e) for e in parsed.errors]
        else:
            relays[parsed.key.name] = parsed

    routes: dict[str, RelayRoute] = {}
    invalid_routes: dict[str, Invalid] = {}
    for body in route_bodies:
        parsed_route = parse_relayroute(body, namespace)
        if isinstance(parsed_route, Invalid):
            invalid_routes[parsed_route.key.name] = parsed_route
            problems += [
                Problem(_ref("RelayRoute", parsed_route.key), "InvalidSpec", e) for e in parsed_route.errors
            ]
        else:
            routes[parsed_route.key.name] = parsed_route

    selected = {name: select_routes(relay, routes.values()) for name, relay in sorted(relays.items())}

    # Conflicts: same priority, overlapping match, on one relay (the relay breaks the tie by
    # name, which is rarely what the author meant).
    for relay_name, relay_routes in selected.items():
        for index, first in enumerate(relay_routes):
            for second in relay_routes[index + 1 :]:
                if first.spec.priority == second.spec.priority and matches_overlap(
                    first.spec.match, second.spec.match
                ):
                    for this, other in ((first, second), (second, first)):
                        problems.append(
                            Problem(
                                _ref("RelayRoute", this.key),
                                "Conflict",
                                f"on MailRelay {relay_name}, priority {this.spec.priority} and overlapping "
                                f"match with RelayRoute {other.key.name} (tie broken by name: "
                                f"{min(first.key.name, second.key.name)} wins)",
                                "warning",
                            )
                        )

    for cycle, pattern, taken in find_loops(selected):
        text = (
            f"routing loop for recipient domain {pattern}: {' -> '.join(cycle)} (routes {', '.join(taken)})"
        )
        for relay_name in sorted(set(cycle)):
            problems.append(Problem(ObjectRef("MailRelay", namespace, relay_name), "RoutingLoop", text))
        for entry in taken:
            route_name = entry.split(": ", 1)[1]
            problems.append(
                Problem(ObjectRef("RelayRoute", namespace, route_name), "RoutingLoop", text, "warning")
            )

    for unused in sorted(routes.values(), key=lambda r: r.key.name):
        if not any(unused in chosen for chosen in selected.values()):
            problems.append(
                Problem(
                    _ref("RelayRoute", unused.key),
                    "NotSelected",
                    "no MailRelay's routeSelector selects this route",
                    "warning",
                )
            )

    relay_plans: dict[str, RelayPlan] = {}
    for name, relay in sorted(relays.items()):
        context = context_of(relay.key)
        config, render_problems = render_relay_config(relay, selected[name], relays, resolve, context)
        problems += render_problems
        relay_plans[name] = RelayPlan(
            relay=relay,
            context=context,
            routes=tuple(selected[name]),
            config=config,
            secrets=tuple(_secret_uses(relay, selected[name], context)),
            problems=(),
        )

    unique: list[Problem] = []
    for problem in problems:
        if problem not in unique:
            unique.append(problem)
    problems = unique

    relay_plans = {
        name: replace(
            plan, problems=tuple(p for p in problems if p.subject == _ref("MailRelay", plan.relay.key))
        )
        for name, plan in relay_plans.items()
    }
    route_plans: dict[str, RoutePlan] = {}
    for key, route_or_invalid in sorted(
        [(r.key, r) for r in routes.values()] + [(i.key, i) for i in invalid_routes.values()]
    ):
        ref = _ref("RelayRoute", key)
        route = route_or_invalid if isinstance(route_or_invalid, RelayRoute) else None
        route_plans[key.name] = RoutePlan(
            key=key,
            route=route,
            relays=tuple(name for name, chosen in selected.items() if route in chosen) if route else (),
            problems=tuple(p for p in problems if p.subject == ref),
            generation=route_or_invalid.generation,
        )
    return NamespacePlan(
        namespace=namespace,
        relays=relay_plans,
        invalid_relays=invalid_relays,
        routes=route_plans,
        problems=tuple(problems),
    )


def secret_problems(
    plan: RelayPlan,
    lookup: Callable[[str], Mapping[str, Any] | None],
    *,
    missing_severity: Severity = "error",
) -> list[Problem]:
    """Problems with the Secrets a relay needs: `lookup(name)` returns the Secret's data keys
    (a mapping of key → anything) or None when the Secret does not exist."""
    found: list[Problem] = []
    subject = _ref("MailRelay", plan.relay.key)
    for use in plan.secrets:
        data = lookup(use.secret)
        if data is None:
            found.append(
                Problem(
                    subject,
                    "SecretMissing",
                    f"Secret {use.secret} (for {use.used_by}) does not exist",
                    missing_severity,
                )
            )
            continue
        missing = [key for key in use.keys if key not in data]
        if missing:
            found.append(
                Problem(
                    subject,
                    "SecretKeyMissing",
                    f"Secret {use.secret} (for {use.used_by}) has no key {', '.join(missing)}",
                )
            )
    return found
