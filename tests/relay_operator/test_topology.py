"""relay_operator.topology: selection, resolution, loops, conflicts and the rendered RelayConfig."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.config import (
    GatewayHop,
    MxHop,
    RejectHop,
    RelayConfig,
    RelayHop,
    RouteConfig,
    SmarthostHop,
    parse_config,
)
from relay.core.routing import route_hops, select_route
from relay_operator import topology
from relay_operator.spec import ObjectKey, ResourcesSpec
from relay_operator.topology import NamespacePlan, RenderContext
from tests.relay_operator import crd_tools


def relay(name: str, *, selector: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    body = crd_tools.relay_body(**spec)
    body["metadata"]["name"] = name
    body["spec"]["hostname"] = f"{name}.example.com"
    body["spec"]["routeSelector"] = selector if selector is not None else {"matchLabels": {"relay": name}}
    return body


def route(name: str, on: str, hop: dict[str, Any], *, priority: int = 0, **spec: Any) -> dict[str, Any]:
    body = crd_tools.route_body(nextHop=hop, priority=priority, **spec)
    body["metadata"]["name"] = name
    body["metadata"]["labels"] = {"relay": on}
    return body


def to(target: str) -> dict[str, Any]:
    return {"relay": {"name": target}}


def plan(relays: list[dict[str, Any]], routes: list[dict[str, Any]], **kwargs: Any) -> NamespacePlan:
    return topology.plan_namespace("mail", relays, routes, **kwargs)


def reasons(result: NamespacePlan, kind: str, name: str) -> list[str]:
    return [p.reason for p in result.problems_for(kind, name)]


def test_samples_plan_without_problems() -> None:
    docs = [b for _, b in crd_tools.samples()]
    result = plan(
        [d for d in docs if d["kind"] == "MailRelay"], [d for d in docs if d["kind"] == "RelayRoute"]
    )
    assert result.problems == ()
    assert all(p.valid for p in result.relays.values())
    assert [r.key.name for r in result.relays["edge"].routes] == [
        "legacy-reject",
        "corp-to-internal",
        "partners-mx",
        "outbound-smarthost",
    ]
    assert result.routes["corp-to-internal"].relays == ("edge",)


def test_route_order_and_selection() -> None:
    result = plan(
        [relay("a"), relay("none", selector={}), relay("nosel")],
        [
            route("z-low", "a", {"mx": {}}, priority=1),
            route("b-high", "a", {"mx": {}}, priority=9, match={"recipientDomains": ["x.example"]}),
            route("a-high", "a", {"mx": {}}, priority=9, match={"recipientDomains": ["y.example"]}),
            route("other", "b", {"mx": {}}),
        ],
    )
    assert [r.key.name for r in result.relays["a"].routes] == ["a-high", "b-high", "z-low"]
    # An empty selector selects every route of the namespace; a missing one selects none.
    assert len(result.relays["none"].routes) == 4
    body = relay("nosel")
    del body["spec"]["routeSelector"]
    assert plan([body], [route("r", "nosel", {"mx": {}})]).relays["nosel"].routes == ()
    config = result.relays["a"].config
    assert config is not None
    assert [r.name for r in config.ordered_routes()] == ["a-high", "b-high", "z-low"]


@pytest.mark.parametrize(
    ("a", "b", "overlap"),
    [
        ("*", "x.example", True),
        ("x.example", "x.example", True),
        ("x.example", "y.example", False),
        ("*.x.example", "a.x.example", True),
        ("*.x.example", "x.example", False),
        ("*.x.example", "*.a.x.example", True),
        ("*.x.example", "*.y.example", False),
        ("a.x.example", "*.y.example", False),
    ],
)
def test_patterns_overlap(a: str, b: str, overlap: bool) -> None:
    assert topology.patterns_overlap(a, b) is overlap
    assert topology.patterns_overlap(b, a) is overlap


def test_two_relay_loop_is_named() -> None:
    result = plan(
        [relay("edge"), relay("internal")],
        [
            route("corp", "edge", to("internal"), match={"recipientDomains": ["corp.example"]}),
            route("out", "internal", to("edge")),
        ],
    )
    (problem,) = [p for p in result.problems_for("MailRelay", "edge")]
    assert problem.reason == "RoutingLoop" and problem.severity == "error"
    assert "corp.example: edge -> internal -> edge" in problem.message
    assert "edge: corp, internal: out" in problem.message
    assert reasons(result, "MailRelay", "internal") == ["RoutingLoop"]
    assert reasons(result, "RelayRoute", "out") == ["RoutingLoop"]
    assert not result.relays["edge"].valid


def test_three_relay_loop_through_failover_and_self_loop() -> None:
    result = plan(
        [relay("a"), relay("b"), relay("c"), relay("d")],
        [
            route("a-b", "a", to("b")),
            route("b-c", "b", {"mx": {}}, failover=[to("c")]),
            route("c-a", "c", to("a")),
            route("d-d", "d", to("d")),
        ],
    )
    loops = {p.message.split(": ", 1)[1].split(" (")[0] for p in result.errors}
    assert loops == {"a -> b -> c -> a", "d -> d"}


@pytest.mark.parametrize(
    "routes",
    [
        # disjoint domains: corp goes to b, b sends only other.example back
        [
            route("a-b", "a", to("b"), match={"recipientDomains": ["corp.example"]}),
            route("b-a", "b", to("a"), match={"recipientDomains": ["*.other.example"]}),
        ],
        # b handles corp itself at a higher priority than its catch-all back to a
        [
            route("a-b", "a", to("b"), match={"recipientDomains": ["corp.example"]}),
            route("b-store", "b", {"mx": {}}, priority=10, match={"recipientDomains": ["corp.example"]}),
            route("b-a", "b", to("a")),
        ],
        # b sends back only mail from one sender domain, and a routes only other senders to b
        [
            route("a-b", "a", to("b"), match={"senderDomains": ["x.example"]}),
            route("b-a", "b", to("a"), match={"senderDomains": ["y.example"]}),
        ],
    ],
    ids=["disjoint-domains", "higher-priority-terminates", "disjoint-senders"],
)
def test_no_false_loops(routes: list[dict[str, Any]]) -> None:
    result = plan([relay("a"), relay("b")], routes)
    assert [p for p in result.problems if p.reason == "RoutingLoop"] == []


def test_loop_through_a_catch_all_sender_pattern_is_found() -> None:
    result = plan(
        [relay("a"), relay("b")],
        [route("a-b", "a", to("b")), route("b-a", "b", to("a"), match={"senderDomains": ["*"]})],
    )
    assert "RoutingLoop" in reasons(result, "MailRelay", "b")


def test_loop_only_for_one_sender_is_found() -> None:
    result = plan(
        [relay("a"), relay("b")],
        [route("a-b", "a", to("b")), route("b-a", "b", to("a"), match={"senderDomains": ["x.example"]})],
    )
    assert "RoutingLoop" in reasons(result, "MailRelay", "a")


def test_a_hop_that_cannot_be_rendered_takes_no_part_in_a_loop() -> None:
    # edge's hop to msa (no relay listener) is rendered as a 451 deferral: mail never reaches
    # msa that way, so msa's route back is no loop (the route's own problem says what is wrong).
    submission_only = relay(
        "msa",
        listeners=[{"name": "sub", "port": 587, "mode": "submission", "auth": "required"}],
        auth={"secretName": "users"},
    )
    result = plan(
        [relay("edge"), submission_only], [route("in", "edge", to("msa")), route("back", "msa", to("edge"))]
    )
    assert reasons(result, "RelayRoute", "in") == ["NoRelayListener"]
    assert [p for p in result.problems if p.reason == "RoutingLoop"] == []


def test_unknown_relay_defers_mail_and_keeps_failover() -> None:
    result = plan(
        [relay("a")],
        [
            route("gone", "a", to("ghost"), match={"recipientDomains": ["g.example"]}),
            route(
                "gone-fo", "a", to("ghost"), failover=[{"mx": {}}], match={"recipientDomains": ["h.example"]}
            ),
        ],
    )
    assert reasons(result, "RelayRoute", "gone") == ["UnknownRelay"]
    assert result.routes["gone"].problems[0].severity == "error"
    config = result.relays["a"].config
    assert config is not None
    routes = {r.name: r for r in config.routes}
    assert isinstance(routes["gone"].next_hop, RejectHop) and routes["gone"].next_hop.code == 451
    assert routes["gone-fo"].next_hop.kind == "mx" and routes["gone-fo"].failover == []
    # The relay itself stays usable: the broken route is the route's problem.
    assert result.relays["a"].valid


def test_target_without_relay_listener_is_unresolved() -> None:
    submission_only = relay(
        "msa",
        listeners=[{"name": "sub", "port": 587, "mode": "submission", "auth": "required"}],
        auth={"secretName": "users"},
    )
    result = plan([relay("a"), submission_only], [route("to-msa", "a", to("msa"))])
    assert reasons(result, "RelayRoute", "to-msa") == ["NoRelayListener"]


def test_conflicting_routes_are_a_warning_on_both() -> None:
    result = plan(
        [relay("a")],
        [
            route("one", "a", {"mx": {}}, priority=5, match={"recipientDomains": ["*.corp.example"]}),
            route("two", "a", {"mx": {}}, priority=5, match={"recipientDomains": ["x.corp.example"]}),
            route("three", "a", {"mx": {}}, priority=6, match={"recipientDomains": ["x.corp.example"]}),
            route("four", "a", {"mx": {}}, priority=5, match={"recipientDomains": ["other.example"]}),
        ],
    )
    assert reasons(result, "RelayRoute", "one") == ["Conflict"]
    assert reasons(result, "RelayRoute", "two") == ["Conflict"]
    assert "RelayRoute two" in result.routes["one"].problems[0].message
    assert "one wins" in result.routes["one"].problems[0].message
    assert reasons(result, "RelayRoute", "three") == []
    assert reasons(result, "RelayRoute", "four") == []
    assert all(p.severity == "warning" for p in result.problems)


def test_cluster_resolution_uses_service_name_and_first_relay_listener() -> None:
    target = relay(
        "internal",
        listeners=[
            {"name": "sub", "port": 587, "mode": "submission", "auth": "required"},
            {"name": "smtp", "port": 2525},
            {"name": "smtp2", "port": 25},
        ],
        auth={"secretName": "u"},
    )
    result = plan([relay("edge"), target], [route("r", "edge", to("internal"))])
    config = result.relays["edge"].config
    assert config is not None
    hop = config.routes[0].next_hop
    assert isinstance(hop, RelayHop)
    assert (hop.name, hop.host, hop.port) == ("internal", "internal.mail.svc.cluster.local", 2525)
    other = plan(
        [relay("edge"), target],
        [route("r", "edge", to("internal"))],
        resolver=topology.cluster_resolver("k8s.corp"),
    ).relays["edge"]
    assert other.config is not None and other.config.routes[0].next_hop.host == "internal.mail.svc.k8s.corp"  # type: ignore[union-attr]


def test_local_contexts_and_resolver_for_up(tmp_path: Path) -> None:
    offsets = {"edge": 10000, "internal": 20000}

    def context_for(key: ObjectKey) -> RenderContext:
        base = PurePosixPath(str(tmp_path)) / key.name
        return RenderContext(
            config_dir=base / "config",
            tls_dir=base / "tls",
            auth_dir=base / "auth",
            secrets_dir=base / "secrets",
            data_dir=base / "data",
            listener_host="127.0.0.1",
            metrics_host="127.0.0.1",
            metrics_port=0,
            port_offset=offsets[key.name],
        )

    edge = relay(
        "edge",
        listeners=[{"name": "smtp", "port": 25, "tls": "starttls"}],
        tls={"secretName": "edge-tls"},
        auth={"secretName": "edge-users", "key": "htpasswd"},
    )
    routes = [
        route("in", "edge", to("internal"), priority=9, match={"recipientDomains": ["corp.example"]}),
        route(
            "out",
            "edge",
            {"smarthost": {"host": "smtp.example.net", "authSecretRef": {"name": "creds"}}},
            failover=[
                {"gateway": {"webhook": {"url": "https://h.example/", "authSecretRef": {"name": "tok"}}}}
            ],
        ),
        route("cap", "internal", {"gateway": {"maildir": {"path": "qa/inbox"}}}),
    ]
    result = plan(
        [edge, relay("internal")],
        routes,
        context_for=context_for,
        resolver=topology.context_resolver(context_for),
    )
    assert result.problems == ()
    config = result.relays["edge"].config
    assert config is not None
    assert (config.listeners[0].host, config.listeners[0].port) == ("127.0.0.1", 10025)
    assert config.tls is not None and config.tls.cert_file == tmp_path / "edge/tls/tls.crt"
    assert config.auth is not None and config.auth.users_file == tmp_path / "edge/auth/htpasswd"
    assert config.queue.directory == tmp_path / "edge/data/queue"
    assert (config.metrics.host, config.metrics.port) == ("127.0.0.1", 0)
    routes_by_name = {r.name: r for r in config.routes}
    assert routes_by_name["in"].next_hop == RelayHop(name="internal", host="127.0.0.1", port=20025)
    smarthost = routes_by_name["out"].next_hop
    assert (
        isinstance(smarthost, SmarthostHop) and smarthost.credentials_dir == tmp_path / "edge/secrets/creds"
    )
    webhook = routes_by_name["out"].failover[0]
    assert isinstance(webhook, GatewayHop) and webhook.webhook is not None
    assert webhook.webhook.auth_header_file == tmp_path / "edge/secrets/tok/authorization"
    internal = result.relays["internal"].config
    assert internal is not None
    maildir = internal.routes[0].next_hop
    assert isinstance(maildir, GatewayHop) and maildir.maildir is not None
    assert maildir.maildir.path == tmp_path / "internal/data/maildir/qa/inbox"
    uses = {(u.secret, u.purpose): u for u in result.relays["edge"].secrets}
    assert set(uses) == {
        ("edge-tls", "tls"),
        ("edge-users", "auth"),
        ("creds", "smarthost"),
        ("tok", "webhook"),
    }
    assert uses[("creds", "smarthost")].keys == ("username", "password")
    assert uses[("edge-users", "auth")].keys == ("htpasswd",)


def test_relay_config_refusals_become_problems() -> None:
    result = plan([relay("a", dns={"nameservers": ["not-an-ip"]})], [])
    (problem,) = result.problems
    assert problem.reason == "ConfigRejected" and "nameserver" in problem.message
    assert "dns.nameservers.0: invalid nameserver 'not-an-ip'" in problem.message
    # The spec allows 1k; relay.config wants at least 1024 bytes: the field as it is on disk.
    small = plan([relay("a", limits={"maxMessageSize": "1k"})], []).relays["a"]
    assert [p.message for p in small.problems] == [
        "the relay would refuse this configuration: limits.maxMessageSize: "
        "Input should be greater than or equal to 1024"
    ]
    assert result.relays["a"].config is None and not result.relays["a"].valid
    clash = plan([relay("b", listeners=[{"name": "smtp", "port": 9090}])], [])
    assert reasons(clash, "MailRelay", "b") == ["PortConflict"]


def test_invalid_documents_and_unselected_routes() -> None:
    broken = relay("a")
    broken["spec"]["listeners"] = []
    result = plan([broken], [route("r", "a", {}), route("lonely", "nobody", {"mx": {}})])
    assert set(result.invalid_relays) == {"a"}
    assert reasons(result, "MailRelay", "a") == ["InvalidSpec"]
    assert reasons(result, "RelayRoute", "r") == ["InvalidSpec"]
    assert result.routes["r"].route is None
    assert reasons(result, "RelayRoute", "lonely") == ["NotSelected"]


def _rollout(relays: list[dict[str, Any]], routes: list[dict[str, Any]]) -> tuple[str, str]:
    relay_plan = plan(relays, routes).relays["a"]
    return relay_plan.rollout_hash, relay_plan.config_hash


def test_rollout_hash_ignores_routes_but_not_listeners_or_tls() -> None:
    base = _rollout([relay("a")], [route("r", "a", {"mx": {}})])
    changed_route = _rollout([relay("a")], [route("r", "a", {"mx": {"port": 2525}})])
    assert changed_route[0] == base[0] and changed_route[1] != base[1]
    changed_listener = _rollout([relay("a", listeners=[{"name": "smtp", "port": 2525}])], [])
    assert changed_listener[0] != base[0]
    with_tls = _rollout(
        [relay("a", listeners=[{"name": "smtp", "port": 25, "tls": "starttls"}], tls={"secretName": "one"})],
        [],
    )
    other_secret = _rollout(
        [relay("a", listeners=[{"name": "smtp", "port": 25, "tls": "starttls"}], tls={"secretName": "two"})],
        [],
    )
    assert len({base[0], with_tls[0], other_secret[0]}) == 3


def test_secret_problems() -> None:
    body = relay(
        "a",
        listeners=[{"name": "smtp", "port": 25, "tls": "starttls"}],
        tls={"secretName": "tls"},
        auth={"secretName": "u"},
    )
    relay_plan = plan([body], []).relays["a"]
    secrets: dict[str, dict[str, bytes]] = {"tls": {"tls.crt": b"x"}}
    found = topology.secret_problems(relay_plan, secrets.get)
    assert [(p.reason, p.severity) for p in found] == [
        ("SecretKeyMissing", "error"),
        ("SecretMissing", "error"),
    ]
    assert "has no key tls.key" in found[0].message
    assert (
        topology.secret_problems(relay_plan, lambda _n: None, missing_severity="warning")[0].severity
        == "warning"
    )


def test_rendered_config_is_what_the_relay_reads_back() -> None:
    """Typed models in, YAML out, the relay's parser back: the same config, routes in the
    relay's order, and the route table the loop check follows is that order."""
    docs = [b for _, b in crd_tools.samples()]
    result = plan(
        [d for d in docs if d["kind"] == "MailRelay"], [d for d in docs if d["kind"] == "RelayRoute"]
    )
    for relay_plan in result.relays.values():
        loaded = parse_config(yaml.safe_load(relay_plan.config_yaml))
        assert loaded == relay_plan.config
        assert relay_plan.route_table == tuple(loaded.ordered_routes()) == tuple(loaded.routes)
        assert [r.key.name for r in relay_plan.routes] == [r.name for r in relay_plan.route_table]


def test_relay_order_is_the_relays_own() -> None:
    routes = [
        RouteConfig(name=name, priority=priority, next_hop={"kind": "mx"})
        for name, priority in [("b", 1), ("a", 1), ("c", 5), ("d", 0)]
    ]
    config = RelayConfig(hostname="h", listeners=[{"name": "smtp", "port": 25}], routes=routes)
    assert topology.relay_order(routes) == tuple(config.ordered_routes())
    assert [r.name for r in topology.relay_order(routes)] == ["c", "a", "b", "d"]


# --------------------------------------------------------------------------- the two planes agree

_RELAYS = ("a", "b", "c")
_RECIPIENT_PATTERNS = ("x.example", "*.x.example", "a.x.example", "*")
_SENDER_PATTERNS = ("s.example", "*.s.example", "*")
_PROBE_DOMAINS = ("x.example", "a.x.example", "b.a.x.example", "other.example")
_PROBE_SENDERS = (None, "s.example", "t.s.example", "other.example")

_hops = st.one_of(
    st.sampled_from([*_RELAYS, "ghost"]).map(to),
    st.just({"mx": {}}),
    st.just({"reject": {"code": 550}}),
)
_failover = st.lists(st.one_of(st.sampled_from(_RELAYS).map(to), st.just({"mx": {}})), max_size=2)
_match = st.fixed_dictionaries(
    {},
    optional={
        "recipientDomains": st.lists(
            st.sampled_from(_RECIPIENT_PATTERNS), min_size=1, max_size=2, unique=True
        ),
        "senderDomains": st.lists(st.sampled_from(_SENDER_PATTERNS), min_size=1, max_size=2, unique=True),
    },
)
_route_sets = st.lists(
    st.tuples(st.sampled_from(_RELAYS), st.integers(0, 2), _match, _hops, _failover), max_size=7
).map(
    lambda items: [
        route(f"r{index}", owner, hop, priority=priority, match=match, failover=failover)
        for index, (owner, priority, match, hop, failover) in enumerate(items)
    ]
)


def _address(domain: str | None) -> str:
    return "" if domain is None else f"postmaster@{domain}"


def _relays_as_they_load_their_configs(result: NamespacePlan) -> dict[str, list[RouteConfig]]:
    """What each relay process would do: its ConfigMap's YAML through the relay's own parser."""
    return {
        name: parse_config(yaml.safe_load(relay_plan.config_yaml)).ordered_routes()
        for name, relay_plan in result.relays.items()
    }


def _relays_on_cycles(tables: dict[str, list[RouteConfig]], probes: list[tuple[str, str | None]]) -> set[str]:
    """An independent walk over the relays' own choices: every relay on a cycle some probe takes."""
    on_cycles: set[str] = set()

    def walk(relay_name: str, rcpt: str, mail_from: str, path: list[str]) -> None:
        if relay_name in path:
            on_cycles.update(path[path.index(relay_name) :])
            return
        chosen = select_route(tables.get(relay_name, []), mail_from, rcpt)
        for hop in route_hops(chosen) if chosen else ():
            if isinstance(hop, RelayHop) and hop.name in tables:
                walk(hop.name, rcpt, mail_from, [*path, relay_name])

    for domain, sender in probes:
        for start in tables:
            walk(start, _address(domain), _address(sender), [])
    return on_cycles


def _witness(pattern: str) -> str:
    return {"*": "any-domain.mailrelay.invalid"}.get(pattern, pattern.replace("*.", "any-subdomain.", 1))


@settings(max_examples=150, deadline=None)
@given(_route_sets)
def test_the_loop_check_chooses_what_the_relay_chooses(routes: list[dict[str, Any]]) -> None:
    """The operator's loop check and the relay processes cannot disagree: for every probe, the
    route the loop check follows is the route the relay picks from its loaded ConfigMap, and
    the relays reported in a loop are exactly those an independent walk over the relays' own
    choices finds on a cycle."""
    result = plan([relay(name) for name in _RELAYS], routes)
    assert all(p.valid or p.problems for p in result.relays.values())
    loaded = _relays_as_they_load_their_configs(result)
    for name, relay_plan in result.relays.items():
        for domain in _PROBE_DOMAINS:
            for sender in _PROBE_SENDERS:
                ours = topology.chosen_route(relay_plan.route_table, domain, sender)
                theirs = select_route(loaded[name], _address(sender), _address(domain))
                assert ours == theirs, (name, domain, sender)
    probes = [
        (_witness(pattern), None if sender is None else _witness(sender))
        for pattern in {"*", *_RECIPIENT_PATTERNS}
        for sender in {None, *_SENDER_PATTERNS}
    ]
    flagged = {
        p.subject.name for p in result.problems if p.reason == "RoutingLoop" and p.subject.kind == "MailRelay"
    }
    assert flagged == _relays_on_cycles(loaded, probes)


# --------------------------------------------------------------------------- workers


@pytest.mark.parametrize(
    ("workers", "limits", "expected"),
    [
        (3, {"cpu": "500m"}, 3),  # an explicit number wins
        (1, {"cpu": "8"}, 1),
        ("auto", None, "auto"),  # no resources at all
        ("auto", {"memory": "1Gi"}, "auto"),  # limits, but no CPU limit
        ("auto", {"cpu": "500m"}, 1),
        ("auto", {"cpu": "1"}, 1),
        ("auto", {"cpu": "1500m"}, 2),
        ("auto", {"cpu": "2"}, 2),
        ("auto", {"cpu": 2}, 2),
        ("auto", {"cpu": "2.5"}, 3),
        ("auto", {"cpu": "100m"}, 1),
        ("auto", {"cpu": "100"}, 64),  # capped at the relay's maximum
    ],
)
def test_render_workers(
    workers: topology.Workers, limits: dict[str, Any] | None, expected: topology.Workers
) -> None:
    resources = None if limits is None else ResourcesSpec(limits=limits)
    assert topology.render_workers(workers, resources) == expected


def test_workers_in_the_rendered_config() -> None:
    def rendered(**spec: Any) -> tuple[Any, list[str]]:
        relay_plan = plan([relay("a", **spec)], []).relays["a"]
        assert relay_plan.config is not None
        return relay_plan.config.workers, [f"{p.severity} {p.reason}" for p in relay_plan.problems]

    assert rendered() == ("auto", [])
    assert rendered(resources={"requests": {"cpu": "4"}}) == ("auto", [])  # a request is no limit
    assert rendered(resources={"limits": {"cpu": "1500m"}}) == (2, [])
    assert rendered(workers=3, resources={"limits": {"cpu": "1500m"}}) == (3, [])
    # A quantity Kubernetes accepts but the rule cannot read: the relay counts its quota itself.
    assert rendered(resources={"limits": {"cpu": "2e0"}}) == ("auto", ["warning CpuLimit"])
    # Processes are something a running relay cannot change: a new count rolls the pods.
    one = plan([relay("a", resources={"limits": {"cpu": "1"}})], []).relays["a"]
    two = plan([relay("a", resources={"limits": {"cpu": "2"}})], []).relays["a"]
    assert one.rollout_hash != two.rollout_hash


def test_proxy_protocol_from_the_service_reaches_the_listeners() -> None:
    """spec.service.proxyProtocol becomes each named listener's proxyProtocol (all when no
    names are given); the relay reads the rendered file back the same; a name that is no
    listener is a spec problem."""
    listeners = [
        {"name": "smtp", "port": 25},
        {"name": "submission", "port": 587, "mode": "submission", "auth": "required"},
    ]
    common = {"listeners": listeners, "auth": {"secretName": "users"}}

    def rendered(proxy: dict[str, Any]) -> dict[str, Any]:
        relay_plan = plan(
            [relay("a", service={"type": "LoadBalancer", "proxyProtocol": proxy}, **common)], []
        ).relays["a"]
        assert relay_plan.config is not None, relay_plan.problems
        assert parse_config(yaml.safe_load(relay_plan.config_yaml)) == relay_plan.config
        return {
            lc.name: (lc.proxy_protocol.version, [str(n) for n in lc.proxy_protocol.trusted_from])
            if lc.proxy_protocol is not None
            else None
            for lc in relay_plan.config.listeners
        }

    assert rendered({"trustedFrom": ["10.0.0.0/8"]}) == {
        "smtp": ("any", ["10.0.0.0/8"]),
        "submission": ("any", ["10.0.0.0/8"]),
    }
    assert rendered({"version": "v2", "trustedFrom": ["10.1.2.3"], "listeners": ["smtp"]}) == {
        "smtp": ("v2", ["10.1.2.3/32"]),
        "submission": None,
    }
    for proxy in (
        {"trustedFrom": ["10.0.0.0/8"], "listeners": ["nope"]},
        {"trustedFrom": ["x"]},
        {"trustedFrom": []},
    ):
        bad = plan([relay("a", service={"proxyProtocol": proxy}, **common)], [])
        assert set(bad.invalid_relays) == {"a"}, proxy
        assert reasons(bad, "MailRelay", "a") == ["InvalidSpec"]


def test_relay_hop_tls_renders_the_ca_of_its_secret() -> None:
    hop = {"relay": {"name": "b", "tls": "starttls-verify", "caSecretRef": {"name": "b-tls"}}}
    result = plan([relay("a"), relay("b")], [route("to-b", "a", hop)])
    relay_plan = result.relays["a"]
    assert relay_plan.valid, result.problems
    assert relay_plan.config is not None
    rendered = relay_plan.config.routes[0].next_hop
    assert isinstance(rendered, RelayHop)
    assert rendered.tls == "starttls-verify" and str(rendered.ca_file).endswith("/b-tls/ca.crt")
    assert [(u.secret, u.purpose, u.keys) for u in relay_plan.secrets] == [("b-tls", "ca", ("ca.crt",))]
    bad = plan(
        [relay("a"), relay("b")], [route("to-b", "a", {"relay": {"name": "b", "caSecretRef": {"name": "x"}}})]
    )
    assert "InvalidSpec" in reasons(bad, "RelayRoute", "to-b")


def test_recipient_checks_are_rendered_with_their_secret_mounted() -> None:
    checks = [
        {
            "domains": ["example.com"],
            "recipients": ["a@example.com"],
            "recipientsSecretRef": {"name": "valid"},
        },
        {"domains": ["*.example.org"], "callout": {"host": "store.mail.svc", "timeout": "5s"}},
    ]
    relay_plan = plan([relay("a", recipientChecks=checks)], []).relays["a"]
    assert relay_plan.config is not None, relay_plan.problems
    assert parse_config(yaml.safe_load(relay_plan.config_yaml)) == relay_plan.config
    first, second = relay_plan.config.recipient_checks
    assert first.recipients == ["a@example.com"] and first.recipients_file is not None
    assert str(first.recipients_file).endswith("/valid/recipients")
    assert [(u.secret, u.purpose, u.keys) for u in relay_plan.secrets if u.purpose == "recipients"] == [
        ("valid", "recipients", ("recipients",))
    ]
    assert (
        second.callout is not None and second.callout.host == "store.mail.svc" and second.callout.timeout == 5
    )
    bad = plan([relay("a", recipientChecks=[{"domains": ["example.com"]}])], [])
    assert reasons(bad, "MailRelay", "a") == ["InvalidSpec"]


def test_mx_hop_tls_policy_and_its_ca_render() -> None:
    hop = {"mx": {"tls": "verify", "caSecretRef": {"name": "private-ca", "key": "bundle.pem"}}}
    relay_plan = plan([relay("a")], [route("out", "a", hop)]).relays["a"]
    assert relay_plan.valid and relay_plan.config is not None
    rendered = relay_plan.config.routes[0].next_hop
    assert isinstance(rendered, MxHop)
    assert rendered.tls == "verify" and str(rendered.ca_file).endswith("/private-ca/bundle.pem")
    uses = [(u.secret, u.purpose, u.keys) for u in relay_plan.secrets]
    assert uses == [("private-ca", "ca", ("bundle.pem",))]
    default = plan([relay("a")], [route("out", "a", {"mx": {}})]).relays["a"].config
    assert default is not None and isinstance(default.routes[0].next_hop, MxHop)
    assert default.routes[0].next_hop.tls == "mta-sts"
    dane = plan([relay("a")], [route("out", "a", {"mx": {"tls": "dane"}})])
    assert "InvalidSpec" in reasons(dane, "RelayRoute", "out")  # not built: refused, not ignored
