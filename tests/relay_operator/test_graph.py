"""`mailrelay graph`: the topology as DOT (rendered by a real Graphviz) and as a text tree."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.config import parse_config
from relay_operator.local.graph import GraphRelay, GraphvizError, render_image, to_dot, to_text
from tests.doctor import require


def _relays() -> list[GraphRelay]:
    edge = parse_config(
        {
            "hostname": "edge.example.com",
            "listeners": [
                {"name": "smtp", "port": 25},
                {"name": "submission", "port": 587, "mode": "submission", "auth": "required"},
            ],
            "auth": {"usersFile": "/secrets/users"},
            "routes": [
                {
                    "name": "outbound",
                    "priority": 10,
                    "nextHop": {"kind": "smarthost", "host": "smtp.provider.example", "port": 587},
                    "failover": [{"kind": "mx", "port": 25}],
                },
                {
                    "name": "corp",
                    "priority": 100,
                    "match": {"recipientDomains": ["corp.example.com", "*.corp.example.com"]},
                    "nextHop": {"kind": "relay", "name": "internal", "host": "internal.mail", "port": 25},
                },
                {
                    "name": "legacy",
                    "priority": 500,
                    "match": {"senderDomains": ["legacy.example.com"]},
                    "nextHop": {"kind": "reject", "code": 550, "message": "5.7.1 legacy is gone"},
                },
            ],
        }
    )
    internal = parse_config(
        {
            "hostname": "internal.example.com",
            "listeners": [{"name": "smtp", "port": 25}],
            "routes": [
                {
                    "name": "qa",
                    "match": {"recipientDomains": ["qa.corp.example.com"]},
                    "nextHop": {"kind": "gateway", "maildir": {"path": "qa-capture"}},
                },
                {
                    "name": "hook",
                    "priority": -1,
                    "nextHop": {"kind": "gateway", "webhook": {"url": "http://127.0.0.1:9/hook"}},
                },
            ],
        }
    )
    return [GraphRelay("mail", "edge", 2, edge), GraphRelay("mail", "internal", 1, internal)]


def test_text_tree_lists_routes_in_the_order_they_are_tried_with_failovers() -> None:
    text = to_text(_relays())
    lines = text.splitlines()
    assert lines[0] == "mail/edge  (2 replica(s), edge.example.com)"
    assert "listeners: smtp :25 relay, submission :587 submission (auth required)" in lines[1]
    routes = [line for line in lines if " route " in line]
    assert [line.split(" route ")[1].split(" ")[0] for line in routes] == [
        "legacy",
        "corp",
        "outbound",
        "qa",
        "hook",
    ]
    assert "route corp [priority 100]: to corp.example.com, *.corp.example.com" in text
    assert "route legacy [priority 500]: from legacy.example.com" in text
    assert "→ relay mail/internal" in text
    assert "→ smarthost smtp.provider.example:587 (tls starttls)" in text
    assert "↳ failover 1: MX lookup, port 25 (tls mta-sts)" in text
    assert "→ maildir qa-capture" in text
    assert "→ webhook http://127.0.0.1:9/hook (json)" in text
    assert "route hook [priority -1]: every message" in text


def test_dot_has_a_node_per_destination_and_dashed_failover_edges() -> None:
    dot = to_dot(_relays())
    assert dot.startswith("digraph mailrelay {")
    assert '"relay:mail/edge" -> "relay:mail/internal" [label="corp [100]\\nto corp.example.com' in dot
    assert '"relay:mail/edge" -> "mx:25:mta-sts" [label="outbound: failover 1", style="dashed"]' in dot
    assert '"smarthost:smtp.provider.example:587"' in dot
    assert 'shape="folder"' in dot and 'shape="octagon"' in dot and 'shape="note"' in dot
    # the edge is an entry point (no relay routes to it); internal is not
    assert '"clients" -> "relay:mail/edge";' in dot
    assert '"clients" -> "relay:mail/internal";' not in dot


def test_an_undeclared_relay_target_is_drawn_as_such() -> None:
    lonely = parse_config(
        {
            "hostname": "a.example.com",
            "listeners": [{"name": "smtp", "port": 25}],
            "routes": [{"name": "r", "nextHop": {"kind": "relay", "name": "ghost", "host": "x", "port": 25}}],
        }
    )
    dot = to_dot([GraphRelay("ns", "a", 1, lonely)])
    assert '"relay:ns/ghost" [label="ns/ghost\\n(not declared)"' in dot


@pytest.mark.parametrize("suffix, magic", [(".svg", b"<svg"), (".png", b"\x89PNG")])
def test_graphviz_renders_the_dot_source(tmp_path: Path, suffix: str, magic: bytes) -> None:
    require("graphviz-svg" if suffix == ".svg" else "graphviz-png")
    output = tmp_path / f"topology{suffix}"
    render_image(to_dot(_relays()), output)
    data = output.read_bytes()
    assert magic in data[:400]
    if suffix == ".svg":
        assert b"mail/edge" in data and b"smtp.provider.example:587" in data


def test_unknown_image_suffix_is_refused(tmp_path: Path) -> None:
    with pytest.raises(GraphvizError, match=r"choose a \.svg, \.png or \.dot"):
        render_image("digraph {}", tmp_path / "x.gif")
