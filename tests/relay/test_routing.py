"""relay.core.routing: route selection and grouping, as tables."""

from __future__ import annotations

from typing import Any

import pytest

from relay.config import RelayConfig, RouteConfig, parse_config
from relay.core.model import Recipient
from relay.core.routing import plan_routes, route_hops, select_route


def config(routes: list[dict[str, Any]]) -> RelayConfig:
    return parse_config({"hostname": "r.test", "listeners": [{"name": "smtp", "port": 25}], "routes": routes})


RELAY = {"kind": "relay", "name": "x", "host": "127.0.0.1", "port": 2525}
ROUTES = config(
    [
        {
            "name": "corp",
            "priority": 100,
            "match": {"recipientDomains": ["corp.test", "*.corp.test"]},
            "nextHop": RELAY,
        },
        {
            "name": "from-partner",
            "priority": 50,
            "match": {"senderDomains": ["partner.test"]},
            "nextHop": RELAY,
        },
        {"name": "b-default", "nextHop": {"kind": "mx"}},
        {"name": "a-default", "nextHop": {"kind": "mx"}},  # same priority: name order wins
        {
            "name": "blocked",
            "priority": 200,
            "match": {"recipientDomains": ["spam.test"]},
            "nextHop": {"kind": "reject"},
        },
        {
            "name": "bounces",
            "priority": 10,
            "match": {"senderDomains": ["*"], "recipientDomains": ["null.test"]},
            "nextHop": RELAY,
        },
    ]
).ordered_routes()


@pytest.mark.parametrize(
    ("mail_from", "rcpt", "expected"),
    [
        ("a@x.test", "u@corp.test", "corp"),
        ("a@x.test", "u@eu.corp.test", "corp"),
        ("a@x.test", "u@CORP.test", "corp"),
        ("a@x.test", "u@notcorp.test", "a-default"),
        ("a@partner.test", "u@corp.test", "corp"),  # higher priority first
        ("a@partner.test", "u@else.test", "from-partner"),
        ("a@sub.partner.test", "u@else.test", "a-default"),  # senderDomains partner.test is exact
        ("a@x.test", "u@spam.test", "blocked"),
        ("", "u@null.test", "bounces"),  # the null sender matches "*"
        ("", "u@else.test", "a-default"),
    ],
)
def test_select_route(mail_from: str, rcpt: str, expected: str) -> None:
    route = select_route(ROUTES, mail_from, rcpt)
    assert route is not None and route.name == expected


def test_no_route_matches() -> None:
    routes = config(
        [{"name": "only", "match": {"recipientDomains": ["a.test"]}, "nextHop": RELAY}]
    ).ordered_routes()
    assert select_route(routes, "s@x.test", "u@b.test") is None
    assert select_route(routes, "s@x.test", "no-domain") is None
    assert select_route([], "s@x.test", "u@a.test") is None


def test_sender_domain_excludes_null_sender() -> None:
    routes = config(
        [{"name": "p", "match": {"senderDomains": ["partner.test"]}, "nextHop": RELAY}]
    ).ordered_routes()
    assert select_route(routes, "", "u@a.test") is None


def test_hops_in_order() -> None:
    route = RouteConfig.model_validate(
        {"name": "r", "nextHop": RELAY, "failover": [{"kind": "mx"}, {"kind": "reject", "code": 451}]}
    )
    assert [hop.kind for hop in route_hops(route)] == ["relay", "mx", "reject"]


def test_plan_groups_by_route_and_mx_domain() -> None:
    rcpts = [
        Recipient(a)
        for a in ("1@corp.test", "2@a.test", "3@eu.corp.test", "4@b.test", "5@a.test", "6@spam.test")
    ]
    plan = plan_routes(ROUTES, "s@x.test", rcpts)
    got = [(g.route.name, g.domain, [r.address for r in g.recipients]) for g in plan.groups]
    assert got == [
        ("corp", "", ["1@corp.test", "3@eu.corp.test"]),  # one transaction for the relay hop
        ("a-default", "a.test", ["2@a.test", "5@a.test"]),  # MX: one group per domain
        ("a-default", "b.test", ["4@b.test"]),
        ("blocked", "", ["6@spam.test"]),
    ]
    assert plan.unrouted == ()


def test_plan_reports_unrouted() -> None:
    routes = config(
        [{"name": "only", "match": {"recipientDomains": ["a.test"]}, "nextHop": RELAY}]
    ).ordered_routes()
    plan = plan_routes(routes, "s@x.test", [Recipient("u@a.test"), Recipient("v@b.test")])
    assert [r.address for r in plan.unrouted] == ["v@b.test"]
    assert len(plan.groups) == 1
