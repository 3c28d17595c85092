"""The topology of one namespace: which RelayRoutes each MailRelay selects, where `relay` next
hops point, what is wrong (routing loops, unknown relays, conflicting routes), and the
`relay.config.RelayConfig` each relay runs.

`plan_namespace` is the one entry point. The reconcile path calls it with the bodies it listed
from the API and `cluster_resolver()`; `mailrelay render` and `check` call it with manifests from
files; `mailrelay up` calls it with its own `RenderContext` per relay (folders on this machine
instead of mounted Secrets) and a resolver that answers with local ports. Pure: no I/O, no clock,
no Kubernetes client; problems are values (`Problem`), never exceptions.

Routing semantics are the relay's own, not a copy: every route is first rendered into the
`relay.config.RouteConfig` the relay will load, put in the relay's order
(`RelayConfig.ordered_routes`: priority, highest first, ties broken by name), and the loop check
asks `relay.core.routing.select_route` which route a relay takes (`chosen_route`). A loop is
found by following, for every domain pattern that any route names, the route each relay would
pick, through `relay` hops and failover `relay` hops of the rendered routes, until a relay
repeats (RFC 5321 6.3 leaves loop detection to the MTAs; the relay's hop limit is the last line
of defence, this is the first). Only the selection (routeSelector, a Kubernetes notion) and the
conflict warning (two routes of one priority whose matches overlap) are the operator's own.

`workers` is rendered by `render_workers`: an explicit number, else the CPU limit rounded up,
else ``auto`` (the relay counts its CPUs at start).

The config is built from relay.config's typed models (never camelCase dicts), so a field name
is checked by mypy, and what relay.config refuses becomes a `ConfigRejected` problem naming the
field as it is on disk.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any, Literal, ParamSpec, TypeVar

from pydantic import ValidationError
from pydantic.alias_generators import to_camel

from relay.config import (
    DKIM_DEFAULT_HEADERS,
    AbuseConfig,
    ApiConfig,
    AuthConfig,
    CalloutConfig,
    ConfigError,
    DkimKeyConfig,
    DnsConfig,
    EventsConfig,
    EventWebhookConfig,
    GatewayHop,
    LimitsConfig,
    ListenerConfig,
    MaildirGateway,
    MatchConfig,
    MetricsConfig,
    MxHop,
    PipeGateway,
    ProxyProtocolConfig,
    QueueConfig,
    RecipientCheckConfig,
    RejectHop,
    RelayConfig,
    RelayHop,
    RetryPolicyConfig,
    RouteConfig,
    RouteLimits,
    SelfCheckConfig,
    SenderLimits,
    SmarthostHop,
    TlsConfig,
    WebhookGateway,
    describe_validation_error,
    dump_config,
    parse_duration,
    parse_size,
)
from relay.core.addresses import domain_matches
from relay.core.cpus import workers_for_cpu
from relay.core.dkim import DkimKeyError, parse_private_key, public_record
from relay.core.routing import route_hops, select_route
from relay_operator import naming
from relay_operator.spec import (
    AbuseSpec,
    CaSecretRef,
    DkimSpec,
    EventsSpec,
    GatewaySpec,
    HopSpec,
    InvalidSpec,
    KeyedSecretRef,
    LimitsSpec,
    ListenerSpec,
    MailRelay,
    MailRelaySpec,
    MatchSpec,
    ObjectKey,
    QueueSpec,
    RecipientCheckSpec,
    RelayRoute,
    RelayTarget,
    ResourcesSpec,
    SmarthostSpec,
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
    log_format: Literal["text", "json"] = "json"  # when the spec names none
    log_format_override: Literal["text", "json"] | None = None  # `up --log-format`: wins over the spec

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


RouteTable = tuple[RouteConfig, ...]  # one relay's rendered routes, in the order it tries them


@dataclass(frozen=True)
class SecretUse:
    """A Secret a relay needs mounted: where, for what, and which keys must be in it."""

    secret: str
    purpose: Literal["tls", "auth", "api", "smarthost", "webhook", "ca", "dkim", "events", "recipients"]
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
    # The rendered routes in the order the relay tries them, also when the whole config was
    # refused (the loop check follows them).
    route_table: RouteTable = ()

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
        if spec.api is not None:  # only then, so the hashes of relays without an API stay
            data["api"] = [
                self.config.model_dump(mode="json", by_alias=True)["api"],
                spec.api.tokens_secret_ref.name,
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
    invalid_relays: Mapping[str, InvalidSpec]
    routes: Mapping[str, RoutePlan]
    problems: tuple[Problem, ...] = field(default=())

    def problems_for(self, kind: str, name: str) -> list[Problem]:
        return [p for p in self.problems if p.subject.kind == kind and p.subject.name == name]

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]


# --------------------------------------------------------------------------- conflicts


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


def conflict_problems(relay_name: str, routes: Sequence[RelayRoute]) -> list[Problem]:
    """Routes of one relay (in the order it tries them) with the same priority and overlapping
    matches: the relay breaks the tie by its order, which is rarely what the author meant."""
    problems: list[Problem] = []
    for index, first in enumerate(routes):
        for second in routes[index + 1 :]:
            if first.spec.priority != second.spec.priority or not matches_overlap(
                first.spec.match, second.spec.match
            ):
                continue
            for this, other in ((first, second), (second, first)):
                problems.append(
                    Problem(
                        _ref("RelayRoute", this.key),
                        "Conflict",
                        f"on MailRelay {relay_name}, priority {this.spec.priority} and overlapping "
                        f"match with RelayRoute {other.key.name} (tie broken by name: "
                        f"{first.key.name} wins)",
                        "warning",
                    )
                )
    return problems


# --------------------------------------------------------------------------- loops


def relay_order(routes: Iterable[RouteConfig]) -> RouteTable:
    """Routes in the order the relay tries them: the relay's own `RelayConfig.ordered_routes`,
    applied to routes that need not form a valid config yet (model_construct validates nothing,
    so the placeholder hostname and listeners are never looked at)."""
    holder = RelayConfig.model_construct(hostname="", listeners=[], routes=list(routes))
    return tuple(holder.ordered_routes())


def probe_address(domain: str) -> str:
    return f"postmaster@{domain}"


def chosen_route(
    table: Sequence[RouteConfig], recipient_domain: str, sender_domain: str | None
) -> RouteConfig | None:
    """The route a relay running `table` takes for mail to `recipient_domain` from
    `sender_domain` (None: the null sender ``<>``): the relay's own `select_route`."""
    mail_from = "" if sender_domain is None else probe_address(sender_domain)
    return select_route(table, mail_from, probe_address(recipient_domain))


def _witness(pattern: str) -> str:
    """A domain that a pattern matches and no more specific name in a route is likely to."""
    if pattern == "*":
        return "any-domain.mailrelay.invalid"
    if pattern.startswith("*."):
        return "any-subdomain" + pattern[1:]
    return pattern


@dataclass(frozen=True, order=True)
class Loop:
    """A routing loop: `relays` starts and ends with the same relay; `pattern` is the recipient
    domain pattern it was found for; `taken` names each step's route (``relay: route``)."""

    relays: tuple[str, ...]
    pattern: str
    taken: tuple[str, ...]

    def message(self) -> str:
        return (
            f"routing loop for recipient domain {self.pattern}: {' -> '.join(self.relays)} "
            f"(routes {', '.join(self.taken)})"
        )


def find_loops(tables: Mapping[str, Sequence[RouteConfig]]) -> list[Loop]:
    """Routing loops among the relays of one namespace, one per distinct cycle. For every
    recipient pattern and sender pattern a route names (and ``*`` and the null sender), follow
    from each relay the route it would choose (`chosen_route`), through its `relay` next hop and
    failover hops, until a relay repeats."""
    patterns = {"*"}
    senders: set[str | None] = {None}
    for table in tables.values():
        for route in table:
            patterns.update(route.match.recipient_domains)
            senders.update(route.match.sender_domains)
    found: dict[tuple[str, ...], Loop] = {}

    def walk(
        relay: str, recipient: str, sender: str | None, pattern: str, path: list[tuple[str, str]]
    ) -> None:
        route = chosen_route(tables.get(relay, ()), recipient, sender)
        if route is None:
            return
        step = [*path, (relay, route.name)]
        names = [name for name, _ in step]
        for hop in route_hops(route):
            if not isinstance(hop, RelayHop):
                continue
            if hop.name in names:
                cycle = step[names.index(hop.name) :]
                relays = tuple(name for name, _ in cycle)
                start = relays.index(min(relays))
                canonical = relays[start:] + relays[:start]
                if canonical not in found:
                    taken = tuple(f"{name}: {route_name}" for name, route_name in cycle)
                    found[canonical] = Loop((*relays, hop.name), pattern, taken)
            elif hop.name in tables:
                walk(hop.name, recipient, sender, pattern, step)

    for pattern in sorted(patterns):
        for sender_pattern in sorted(senders, key=lambda s: s or ""):
            sender = _witness(sender_pattern) if sender_pattern else None
            for relay in sorted(tables):
                walk(relay, _witness(pattern), sender, pattern, [])
    return sorted(found.values())


def loop_problems(namespace: str, tables: Mapping[str, Sequence[RouteConfig]]) -> list[Problem]:
    """An error on each relay of a loop, a warning on each route it takes."""
    problems: list[Problem] = []
    for loop in find_loops(tables):
        text = loop.message()
        for relay_name in sorted(set(loop.relays)):
            problems.append(Problem(ObjectRef("MailRelay", namespace, relay_name), "RoutingLoop", text))
        for entry in loop.taken:
            route_name = entry.split(": ", 1)[1]
            problems.append(
                Problem(ObjectRef("RelayRoute", namespace, route_name), "RoutingLoop", text, "warning")
            )
    return problems


# --------------------------------------------------------------------------- rendering

_P = ParamSpec("_P")
_T = TypeVar("_T")
Hop = RelayHop | SmarthostHop | MxHop | GatewayHop | RejectHop


def _ref(kind: str, key: ObjectKey) -> ObjectRef:
    return ObjectRef(kind, key.namespace, key.name)


def _typed(path: str, build: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """`build(...)` (a relay.config model, or a function that makes one); what it refuses
    becomes a ConfigError naming the field as it is on disk: ``limits.maxMessageSize: ...``."""
    try:
        return build(*args, **kwargs)
    except ValidationError as exc:
        lines = []
        for line in describe_validation_error(exc).splitlines():
            location, _, message = line.partition(": ")
            parts = [path] if path else []
            if location != "(top level)":
                parts += [to_camel(part) for part in location.split(".")]
            location = ".".join(parts)
            lines.append(f"{location}: {message}" if location else message)
        raise ConfigError("\n".join(lines)) from exc


def _relay_hop(
    hop: RelayTarget,
    route: RelayRoute,
    relays: Mapping[str, MailRelay],
    resolver: RelayResolver,
    context: RenderContext,
) -> RelayHop | Problem:
    target_name = hop.name
    target = relays.get(target_name)
    subject = _ref("RelayRoute", route.key)
    if target is None:
        return Problem(
            subject,
            "UnknownRelay",
            f"next hop relay {target_name!r}: no valid MailRelay of that name in namespace "
            f"{route.key.namespace}",
        )
    address = resolver(target)
    if address is None:
        return Problem(
            subject,
            "NoRelayListener",
            f"next hop relay {target_name!r} has no listener in mode relay to deliver to",
        )
    return RelayHop(
        name=target_name,
        host=address.host,
        port=address.port,
        tls=hop.tls,
        ca_file=_secret_file(context, hop.ca_secret_ref),
    )


def _secret_file(context: RenderContext, ref: CaSecretRef | KeyedSecretRef | None) -> Path | None:
    return None if ref is None else Path(context.secret_dir(ref.name) / ref.key)


def _smarthost_hop(smarthost: SmarthostSpec, context: RenderContext) -> SmarthostHop:
    credentials = smarthost.auth_secret_ref
    return SmarthostHop(
        host=smarthost.host,
        port=smarthost.port,
        tls=smarthost.tls,
        insecure_skip_verify=smarthost.insecure_skip_verify,
        credentials_dir=None if credentials is None else Path(context.secret_dir(credentials.name)),
        ca_file=_secret_file(context, smarthost.ca_secret_ref),
    )


def _gateway_hop(gateway: GatewaySpec, context: RenderContext) -> GatewayHop:
    if gateway.webhook is not None:
        webhook = gateway.webhook
        return GatewayHop(
            webhook=WebhookGateway(
                url=webhook.url,
                format=webhook.format,
                insecure_skip_verify=webhook.insecure_skip_verify,
                timeout=parse_duration(webhook.timeout),
                auth_header_file=_secret_file(context, webhook.auth_secret_ref),
                ca_file=_secret_file(context, webhook.ca_secret_ref),
            )
        )
    if gateway.maildir is not None:
        path = Path(context.maildir_root / gateway.maildir.path)
        return GatewayHop(maildir=MaildirGateway(path=path, layout=gateway.maildir.layout))
    assert gateway.pipe is not None
    pipe = gateway.pipe
    return GatewayHop(pipe=PipeGateway(command=pipe.command, timeout=parse_duration(pipe.timeout)))


def _hop_config(
    hop: HopSpec,
    route: RelayRoute,
    relays: Mapping[str, MailRelay],
    resolver: RelayResolver,
    context: RenderContext,
) -> Hop | Problem:
    """One next hop as relay.config types it, or why it cannot be resolved."""
    if hop.relay is not None:
        return _relay_hop(hop.relay, route, relays, resolver, context)
    if hop.smarthost is not None:
        return _smarthost_hop(hop.smarthost, context)
    if hop.mx is not None:
        return MxHop(port=hop.mx.port, tls=hop.mx.tls, ca_file=_secret_file(context, hop.mx.ca_secret_ref))
    if hop.gateway is not None:
        return _gateway_hop(hop.gateway, context)
    assert hop.reject is not None
    return RejectHop(code=hop.reject.code, message=hop.reject.reply_text())


def _route_config(
    route: RelayRoute,
    relays: Mapping[str, MailRelay],
    resolver: RelayResolver,
    context: RenderContext,
) -> tuple[RouteConfig, list[Problem]]:
    """A route as relay.config types it. Hops that cannot be resolved are left out; when none
    is left, matching mail is refused with a temporary error so that senders retry (mail is
    neither lost nor sent somewhere else while the route is broken). Raises ConfigError for
    what relay.config refuses."""
    path = f"routes[{route.key.name}]"
    hops: list[Hop] = []
    problems: list[Problem] = []
    for index, hop in enumerate(route.spec.hops()):
        where = f"{path}.nextHop" if index == 0 else f"{path}.failover.{index - 1}"
        rendered = _typed(where, _hop_config, hop, route, relays, resolver, context)
        if isinstance(rendered, Problem):
            problems.append(rendered)
        else:
            hops.append(rendered)
    if not hops:
        hops = [RejectHop(code=451, message=f"4.4.0 route {route.key.name}: next hop is not available")]
    match = route.spec.match
    config = _typed(
        path,
        RouteConfig,
        name=route.key.name,
        priority=route.spec.priority,
        match=_typed(
            f"{path}.match",
            MatchConfig,
            recipient_domains=match.recipient_domains,
            sender_domains=match.sender_domains,
        ),
        next_hop=hops[0],
        failover=hops[1:],
        dkim=[_typed(f"{path}.dkim.{i}", _dkim_key, key, context) for i, key in enumerate(route.spec.dkim)],
        limits=_typed(f"{path}.limits", RouteLimits, **route.spec.limits.model_dump()),
        events=_typed(f"{path}.events", _events_config, route.spec.events, context),
    )
    return config, problems


def _events_config(events: EventsSpec | None, context: RenderContext) -> EventsConfig | None:
    """Delivery events: the webhook, its signing key at the Secret's mount."""
    if events is None:
        return None
    hook = events.webhook
    ref = hook.secret_ref
    return EventsConfig(
        webhook=EventWebhookConfig(
            url=hook.url,
            secret_file=Path(context.secret_dir(ref.name) / ref.key) if ref is not None else None,
            timeout=parse_duration(hook.timeout),
            insecure_skip_verify=hook.insecure_skip_verify,
        )
    )


def _dkim_key(key: DkimSpec, context: RenderContext) -> DkimKeyConfig:
    ref = key.private_key_secret_ref
    return DkimKeyConfig(
        domain=key.domain,
        selector=key.selector,
        key_file=Path(context.secret_dir(ref.name) / ref.key),
        algorithm=key.algorithm,
        headers=key.headers or list(DKIM_DEFAULT_HEADERS),
        active=key.active,
    )


def _secret_uses(relay: MailRelay, routes: Sequence[RelayRoute], context: RenderContext) -> list[SecretUse]:
    uses: list[SecretUse] = []
    spec = relay.spec
    if spec.tls is not None:
        uses.append(
            SecretUse(spec.tls.secret_name, "tls", context.tls_dir, ("tls.crt", "tls.key"), "spec.tls")
        )
    if spec.auth is not None:
        uses.append(SecretUse(spec.auth.secret_name, "auth", context.auth_dir, (spec.auth.key,), "spec.auth"))
    if spec.events is not None and spec.events.webhook.secret_ref is not None:
        signing = spec.events.webhook.secret_ref
        uses.append(
            SecretUse(signing.name, "events", context.secret_dir(signing.name), (signing.key,), "spec.events")
        )
    for index, check in enumerate(spec.recipient_checks):
        listed = check.recipients_secret_ref
        if listed is not None:
            where = f"spec.recipientChecks[{index}]"
            uses.append(
                SecretUse(listed.name, "recipients", context.secret_dir(listed.name), (listed.key,), where)
            )
    if spec.api is not None:
        tokens = spec.api.tokens_secret_ref
        uses.append(SecretUse(tokens.name, "api", context.secret_dir(tokens.name), (tokens.key,), "spec.api"))
    for route in routes:
        used_by = f"RelayRoute {route.key.name}"
        if route.spec.events is not None and route.spec.events.webhook.secret_ref is not None:
            signing = route.spec.events.webhook.secret_ref
            uses.append(
                SecretUse(signing.name, "events", context.secret_dir(signing.name), (signing.key,), used_by)
            )
        for hop in route.spec.hops():
            if hop.smarthost is not None and hop.smarthost.auth_secret_ref is not None:
                name = hop.smarthost.auth_secret_ref.name
                uses.append(
                    SecretUse(name, "smarthost", context.secret_dir(name), ("username", "password"), used_by)
                )
            if hop.gateway is not None and hop.gateway.webhook and hop.gateway.webhook.auth_secret_ref:
                ref = hop.gateway.webhook.auth_secret_ref
                uses.append(SecretUse(ref.name, "webhook", context.secret_dir(ref.name), (ref.key,), used_by))
            ca = (
                hop.mx.ca_secret_ref
                if hop.mx is not None
                else hop.relay.ca_secret_ref
                if hop.relay is not None
                else hop.smarthost.ca_secret_ref
                if hop.smarthost is not None
                else hop.gateway.webhook.ca_secret_ref
                if hop.gateway is not None and hop.gateway.webhook is not None
                else None
            )
            if ca is not None:
                uses.append(SecretUse(ca.name, "ca", context.secret_dir(ca.name), (ca.key,), used_by))
        for key in route.spec.dkim:
            secret, name = key.private_key_secret_ref.name, key.private_key_secret_ref.key
            uses.append(SecretUse(secret, "dkim", context.secret_dir(secret), (name,), used_by))
    return uses


def _listener_config(listener: ListenerSpec, context: RenderContext, spec: MailRelaySpec) -> ListenerConfig:
    proxy = spec.proxied(listener)
    return ListenerConfig(
        name=listener.name,
        host=context.listener_host,
        port=context.listener_port(listener.port),
        mode=listener.mode,
        tls=listener.tls,
        auth=listener.auth,
        sender_limits=(
            None if listener.sender_limits is None else SenderLimits(**listener.sender_limits.model_dump())
        ),
        proxy_protocol=(
            ProxyProtocolConfig(
                version=proxy.version,
                trusted_from=[ipaddress.ip_network(n, strict=False) for n in proxy.trusted_from],
            )
            if proxy is not None
            else None
        ),
    )


def _limits_config(limits: LimitsSpec) -> LimitsConfig:
    return LimitsConfig(
        max_message_size=parse_size(limits.max_message_size),
        max_recipients=limits.max_recipients,
        max_hops=limits.max_hops,
        max_connections=limits.max_connections,
        max_connections_per_client=limits.max_connections_per_client,
        idle_timeout=parse_duration(limits.idle_timeout),
    )


def _recipient_check_config(check: RecipientCheckSpec, context: RenderContext) -> RecipientCheckConfig:
    ref = check.recipients_secret_ref
    callout = check.callout
    return RecipientCheckConfig(
        domains=check.domains,
        recipients=check.recipients,
        recipients_file=Path(context.secret_dir(ref.name) / ref.key) if ref is not None else None,
        callout=(
            CalloutConfig(host=callout.host, port=callout.port, timeout=parse_duration(callout.timeout))
            if callout is not None
            else None
        ),
    )


def _abuse_config(abuse: AbuseSpec) -> AbuseConfig:
    return AbuseConfig(
        window=parse_duration(abuse.window),
        auth_failures=abuse.auth_failures,
        block_for=parse_duration(abuse.block_for),
        connections=abuse.connections,
        messages=abuse.messages,
        pregreet_wait=parse_duration(abuse.pregreet_wait),
    )


def _queue_config(queue: QueueSpec, context: RenderContext) -> QueueConfig:
    retry = queue.retry
    return QueueConfig(
        directory=Path(context.queue_dir),
        retry=_typed(
            "queue.retry",
            RetryPolicyConfig,
            min_backoff=parse_duration(retry.min_backoff),
            max_backoff=parse_duration(retry.max_backoff),
            max_lifetime=parse_duration(retry.max_lifetime),
        ),
        max_concurrency=queue.max_concurrency,
        max_per_destination=queue.max_per_destination,
    )


Workers = int | Literal["auto"]


def render_workers(workers: Workers, resources: ResourcesSpec | None) -> Workers:
    """What a relay's config says for `workers`: an explicit number wins; else, with a CPU limit
    (``resources.limits.cpu``), that many CPUs rounded up, 1 to 64 ("500m" → 1, "1500m" → 2,
    relay.core.cpus.workers_for_cpu, the rule the relay applies to its cgroup quota); else
    ``auto``, which the relay resolves at start from the CPUs it may use. Raises ValueError for
    a CPU limit that rule cannot read."""
    if workers != "auto":
        return workers
    cpu = resources.limits.get("cpu") if resources is not None else None
    return "auto" if cpu is None else workers_for_cpu(cpu)


def _workers(relay: MailRelay) -> tuple[Workers, list[Problem]]:
    """`render_workers`, where a CPU limit it cannot read leaves ``auto`` (the relay then
    counts the quota the kubelet set from that same limit) with a warning."""
    spec = relay.spec
    try:
        return render_workers(spec.workers, spec.resources), []
    except ValueError as exc:
        message = f"spec.resources.limits.cpu: {exc}; workers: auto (the relay counts its CPUs at start)"
        return "auto", [Problem(_ref("MailRelay", relay.key), "CpuLimit", message, "warning")]


def _config(
    spec: MailRelaySpec, routes: Sequence[RouteConfig], context: RenderContext, workers: Workers
) -> RelayConfig:
    """The whole RelayConfig from typed parts; raises ConfigError (or ValueError) naming what
    relay.config refuses."""
    tls = auth = None
    if spec.tls is not None:
        tls = TlsConfig(
            cert_file=Path(context.tls_dir / "tls.crt"), key_file=Path(context.tls_dir / "tls.key")
        )
    if spec.auth is not None:
        auth = _typed(
            "auth",
            AuthConfig,
            users_file=Path(context.auth_dir / spec.auth.key),
            max_failures=spec.auth.max_failures,
        )
    api = None
    if spec.api is not None:
        ref = spec.api.tokens_secret_ref
        api = ApiConfig(tokens_file=Path(context.secret_dir(ref.name) / ref.key))
    return _typed(
        "",
        RelayConfig,
        hostname=spec.hostname,
        listeners=[
            _typed(f"listeners.{index}", _listener_config, listener, context, spec)
            for index, listener in enumerate(spec.listeners)
        ],
        tls=tls,
        auth=auth,
        api=api,
        events=_typed("events", _events_config, spec.events, context),
        trusted_networks=[ipaddress.ip_network(network, strict=False) for network in spec.trusted_networks],
        accept_domains=spec.accept_domains,
        limits=_typed("limits", _limits_config, spec.limits),
        abuse=_typed("abuse", _abuse_config, spec.abuse),
        self_check=SelfCheckConfig(interval=parse_duration(spec.self_check.interval)),
        recipient_checks=[
            _typed(f"recipientChecks.{index}", _recipient_check_config, check, context)
            for index, check in enumerate(spec.recipient_checks)
        ],
        queue=_typed("queue", _queue_config, spec.queue, context),
        dns=_typed("dns", DnsConfig, nameservers=spec.dns.nameservers),
        routes=list(routes),
        metrics=_typed("metrics", MetricsConfig, host=context.metrics_host, port=context.metrics_port),
        workers=workers,
        log_level=spec.log_level,
        log_format=context.log_format_override or spec.log_format or context.log_format,
    )


def render_relay_config(
    relay: MailRelay, routes: Sequence[RouteConfig], context: RenderContext, refused: Sequence[str] = ()
) -> tuple[RelayConfig | None, list[Problem]]:
    """The relay.config document for one relay and its rendered routes (in relay order), or
    the problem that keeps it from running. `refused` are the routes' own refusals."""
    subject = _ref("MailRelay", relay.key)
    clashing = [
        listener.name
        for listener in relay.spec.listeners
        if context.listener_port(listener.port) == context.metrics_port
    ]
    if clashing:
        message = f"listener {clashing[0]!r} uses port {context.metrics_port}, the relay's metrics port"
        return None, [Problem(subject, "PortConflict", message)]
    workers, problems = _workers(relay)
    details = list(refused)
    config = None
    try:
        config = _config(relay.spec, routes, context, workers)
    except (ConfigError, ValueError) as exc:
        details.append(str(exc))
    if not details:
        return config, problems
    detail = "; ".join(line for text in details for line in text.splitlines())
    message = f"the relay would refuse this configuration: {detail}"
    return None, [*problems, Problem(subject, "ConfigRejected", message)]


@dataclass(frozen=True)
class _Rendered:
    """One relay's rendering: its routes in the order it tries them, and its config."""

    routes: tuple[RelayRoute, ...]
    table: RouteTable
    config: RelayConfig | None
    problems: list[Problem]


def render_relay(
    relay: MailRelay,
    routes: Sequence[RelayRoute],
    relays: Mapping[str, MailRelay],
    resolver: RelayResolver,
    context: RenderContext,
) -> _Rendered:
    """Routes first (each typed by relay.config, then put in the relay's order), then the whole
    config. A route relay.config refuses is left out of the table and refuses the config."""
    built: dict[str, RouteConfig] = {}
    refused: list[str] = []
    problems: list[Problem] = []
    for route in routes:
        try:
            built[route.key.name], route_problems = _route_config(route, relays, resolver, context)
        except ConfigError as exc:
            refused.append(str(exc))
            continue
        problems += route_problems
    table = relay_order(built.values())
    by_name = {route.key.name: route for route in routes}
    ordered = tuple(by_name[config.name] for config in table)
    ordered += tuple(route for route in routes if route.key.name not in built)
    config, config_problems = render_relay_config(relay, table, context, refused)
    return _Rendered(ordered, table, config, problems + config_problems)


# --------------------------------------------------------------------------- the passes


def select_routes(relay: MailRelay, routes: Iterable[RelayRoute]) -> list[RelayRoute]:
    """The routes a relay's routeSelector picks in its namespace (none when it has no selector),
    by name; the order the relay tries them comes from the rendered routes (`relay_order`)."""
    selector = relay.spec.route_selector
    if selector is None:
        return []
    return sorted(
        (r for r in routes if r.key.namespace == relay.key.namespace and selector.matches(r.labels)),
        key=lambda r: r.key.name,
    )


_Parsed = TypeVar("_Parsed", MailRelay, RelayRoute)


def _parse_all(
    kind: str,
    bodies: Sequence[Mapping[str, Any]],
    parse: Callable[[Mapping[str, Any], str], _Parsed | InvalidSpec],
    namespace: str,
) -> tuple[dict[str, _Parsed], dict[str, InvalidSpec], list[Problem]]:
    """Pass 1: bodies → typed documents by name, invalid ones, and an InvalidSpec per error."""
    valid: dict[str, _Parsed] = {}
    invalid: dict[str, InvalidSpec] = {}
    problems: list[Problem] = []
    for body in bodies:
        parsed = parse(body, namespace)
        if isinstance(parsed, InvalidSpec):
            invalid[parsed.key.name] = parsed
            problems += [Problem(_ref(kind, parsed.key), "InvalidSpec", e) for e in parsed.errors]
        else:
            valid[parsed.key.name] = parsed
    return valid, invalid, problems


def _render_all(
    relays: Mapping[str, MailRelay],
    routes: Mapping[str, RelayRoute],
    resolver: RelayResolver,
    context_of: ContextFactory,
) -> dict[str, RelayPlan]:
    """Pass 2: per relay, select its routes and render them and its config (problems not yet
    attached: `_attach_problems` does that once every pass has run)."""
    plans: dict[str, RelayPlan] = {}
    for name, relay in sorted(relays.items()):
        context = context_of(relay.key)
        chosen = select_routes(relay, routes.values())
        rendered = render_relay(relay, chosen, relays, resolver, context)
        plans[name] = RelayPlan(
            relay=relay,
            context=context,
            routes=rendered.routes,
            config=rendered.config,
            secrets=tuple(_secret_uses(relay, rendered.routes, context)),
            problems=tuple(rendered.problems),
            route_table=rendered.table,
        )
    return plans


def _topology_problems(
    namespace: str, routes: Mapping[str, RelayRoute], plans: Mapping[str, RelayPlan]
) -> list[Problem]:
    """Pass 3, across relays: conflicting routes, routing loops over the rendered route tables,
    routes no relay selects."""
    problems: list[Problem] = []
    for name, plan in plans.items():
        problems += conflict_problems(name, plan.routes)
    problems += loop_problems(namespace, {name: plan.route_table for name, plan in plans.items()})
    for unused in sorted(routes.values(), key=lambda r: r.key.name):
        if not any(unused in plan.routes for plan in plans.values()):
            problems.append(
                Problem(
                    _ref("RelayRoute", unused.key),
                    "NotSelected",
                    "no MailRelay's routeSelector selects this route",
                    "warning",
                )
            )
    return problems


def _route_plans(
    routes: Mapping[str, RelayRoute],
    invalid_routes: Mapping[str, InvalidSpec],
    relay_plans: Mapping[str, RelayPlan],
    problems: Sequence[Problem],
) -> dict[str, RoutePlan]:
    """Pass 4b: what became of each RelayRoute."""
    plans: dict[str, RoutePlan] = {}
    documents: list[tuple[ObjectKey, RelayRoute | InvalidSpec]] = [(r.key, r) for r in routes.values()]
    documents += [(i.key, i) for i in invalid_routes.values()]
    for key, document in sorted(documents, key=lambda item: item[0]):
        ref = _ref("RelayRoute", key)
        route = document if isinstance(document, RelayRoute) else None
        plans[key.name] = RoutePlan(
            key=key,
            route=route,
            relays=tuple(name for name, plan in relay_plans.items() if route in plan.routes) if route else (),
            problems=tuple(p for p in problems if p.subject == ref),
            generation=document.generation,
        )
    return plans


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
    relays, invalid_relays, relay_problems = _parse_all("MailRelay", relay_bodies, parse_mailrelay, namespace)
    routes, invalid_routes, route_problems = _parse_all(
        "RelayRoute", route_bodies, parse_relayroute, namespace
    )
    relay_plans = _render_all(
        relays, routes, resolver or cluster_resolver(), context_for or (lambda _key: POD_CONTEXT)
    )
    problems = [
        *relay_problems,
        *route_problems,
        *_topology_problems(namespace, routes, relay_plans),
        *(p for plan in relay_plans.values() for p in plan.problems),
    ]
    problems = list(dict.fromkeys(problems))  # each problem once, first place kept
    relay_plans = {
        name: replace(
            plan, problems=tuple(p for p in problems if p.subject == _ref("MailRelay", plan.relay.key))
        )
        for name, plan in relay_plans.items()
    }
    return NamespacePlan(
        namespace=namespace,
        relays=relay_plans,
        invalid_relays=invalid_relays,
        routes=_route_plans(routes, invalid_routes, relay_plans, problems),
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
            continue
        if use.purpose == "dkim":
            found += _dkim_key_problems(plan, use, data, subject)
    return found


def secret_bytes(value: Any) -> bytes:
    """A Secret value as the pod sees it: API `data` is base64 text, local manifests give bytes."""
    if isinstance(value, bytes):
        return value
    try:
        return base64.b64decode(str(value), validate=True)
    except ValueError as exc:
        raise DkimKeyError("the value is not base64") from exc


def _dkim_key_problems(
    plan: RelayPlan, use: SecretUse, data: Mapping[str, Any], subject: ObjectRef
) -> list[Problem]:
    found = []
    for route in plan.routes:
        for key in route.spec.dkim:
            ref = key.private_key_secret_ref
            if ref.name != use.secret or f"RelayRoute {route.key.name}" != use.used_by:
                continue
            try:
                parse_private_key(secret_bytes(data[ref.key]), key.algorithm)
            except DkimKeyError as exc:
                found.append(
                    Problem(
                        subject,
                        "DkimKeyInvalid",
                        f"Secret {ref.name} key {ref.key} (DKIM {key.selector}._domainkey.{key.domain} "
                        f"of RelayRoute {route.key.name}): {exc}",
                    )
                )
    return found


def dkim_records(
    route: RelayRoute, lookup: Callable[[str], Mapping[str, Any] | None]
) -> list[dict[str, Any]]:
    """``status.dkim`` of a RelayRoute: for each key, the TXT record to publish (from the public
    half of the key in its Secret), or why it cannot be computed."""
    records = []
    for key in route.spec.dkim:
        ref = key.private_key_secret_ref
        entry: dict[str, Any] = {
            "domain": key.domain,
            "selector": key.selector,
            "algorithm": key.algorithm,
            "active": key.active,
        }
        data = lookup(ref.name)
        if data is None:
            entry["error"] = f"Secret {ref.name} does not exist"
        elif ref.key not in data:
            entry["error"] = f"Secret {ref.name} has no key {ref.key}"
        else:
            try:
                pem = secret_bytes(data[ref.key])
                name, value = public_record(pem, key.algorithm, key.selector, key.domain)
            except DkimKeyError as exc:
                entry["error"] = f"Secret {ref.name} key {ref.key}: {exc}"
            else:
                entry["dnsRecord"] = {"name": name, "type": "TXT", "value": value}
        records.append(entry)
    return records
