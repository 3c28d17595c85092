"""`mailrelay graph`: a declared topology as a picture (Graphviz DOT, SVG, PNG) and as a text tree.

The input is what the operator renders: per MailRelay its `RelayConfig` with the routes its
routeSelector picked, so the picture shows exactly what the relays will do (routes in the order
they are tried, failover hops in order). Nodes are relays, smarthosts, MX delivery, gateways
(maildir, webhook, pipe) and rejections; each edge is a route labelled with its priority and
match, failover edges are dashed. Relays no other relay routes to get an entry arrow from
"clients" labelled with their listeners.

`to_dot` and `to_text` are pure; `render_image` runs Graphviz's ``dot`` (Debian package
graphviz), which is the only I/O here.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from relay import config as schema
from relay.config import GatewayHop, MxHop, RejectHop, RelayConfig, RelayHop, RouteConfig, SmarthostHop


class GraphvizError(Exception):
    """``dot`` is missing or failed; the message says how to get the picture anyway."""


@dataclass(frozen=True)
class GraphRelay:
    """One MailRelay as drawn: where it lives, how many replicas, what it was rendered into."""

    namespace: str
    name: str
    replicas: int
    config: RelayConfig

    @property
    def relay_id(self) -> str:
        return f"{self.namespace}/{self.name}"


# --------------------------------------------------------------------------- words


def describe_listener(listener: schema.ListenerConfig) -> str:
    extras = []
    if listener.tls != "none":
        extras.append(f"tls {listener.tls}")
    if listener.auth != "none":
        extras.append(f"auth {listener.auth}")
    suffix = f" ({', '.join(extras)})" if extras else ""
    return f"{listener.name} :{listener.port} {listener.mode}{suffix}"


def describe_match(match: schema.MatchConfig) -> str:
    parts = []
    if match.recipient_domains:
        parts.append("to " + ", ".join(match.recipient_domains))
    if match.sender_domains:
        parts.append("from " + ", ".join(match.sender_domains))
    return "; ".join(parts) if parts else "every message"


def describe_hop(hop: schema.NextHop, namespace: str) -> str:
    if isinstance(hop, RelayHop):
        return f"relay {namespace}/{hop.name}"
    if isinstance(hop, SmarthostHop):
        auth = ", authenticated" if hop.credentials_dir is not None else ""
        return f"smarthost {hop.host}:{hop.port} (tls {hop.tls}{auth})"
    if isinstance(hop, MxHop):
        return f"MX lookup, port {hop.port} (tls {hop.tls})"
    if isinstance(hop, GatewayHop):
        if hop.maildir is not None:
            return f"maildir {hop.maildir.path}"
        if hop.webhook is not None:
            return f"webhook {hop.webhook.url} ({hop.webhook.format})"
        if hop.pipe is not None:
            return "pipe " + " ".join(hop.pipe.command)
    if isinstance(hop, RejectHop):
        return f"reject {hop.code} {hop.message}"
    return hop.kind  # pragma: no cover - the union above is exhaustive


# --------------------------------------------------------------------------- text


def to_text(relays: Sequence[GraphRelay]) -> str:
    """A tree per relay: listeners, then routes in the order they are tried, with failovers."""
    lines: list[str] = []
    for relay in sorted(relays, key=lambda r: r.relay_id):
        config = relay.config
        lines.append(f"{relay.relay_id}  ({relay.replicas} replica(s), {config.hostname})")
        listeners = ", ".join(describe_listener(listener) for listener in config.listeners)
        lines.append(f"│  listeners: {listeners}")
        routes = config.ordered_routes()
        if not routes:
            lines.append("└─ no routes: accepted mail stays queued")
        for index, route in enumerate(routes):
            last = index == len(routes) - 1
            lines.append(
                f"{'└─' if last else '├─'} route {route.name} [priority {route.priority}]: "
                f"{describe_match(route.match)}"
            )
            stem = "   " if last else "│  "
            lines.append(f"{stem}  → {describe_hop(route.next_hop, relay.namespace)}")
            for number, hop in enumerate(route.failover, start=1):
                lines.append(f"{stem}  ↳ failover {number}: {describe_hop(hop, relay.namespace)}")
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


# --------------------------------------------------------------------------- DOT


def _quote(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _attributes(**attributes: str) -> str:
    return "[" + ", ".join(f"{key}={_quote(value)}" for key, value in attributes.items()) + "]"


def _target(hop: schema.NextHop, relay: GraphRelay, route: RouteConfig) -> tuple[str, dict[str, str]]:
    """The node id a hop points at, and its attributes."""
    if isinstance(hop, RelayHop):
        return f"relay:{relay.namespace}/{hop.name}", {}
    if isinstance(hop, SmarthostHop):
        auth = "\nauthenticated" if hop.credentials_dir is not None else ""
        label = f"smarthost\n{hop.host}:{hop.port}\ntls {hop.tls}{auth}"
        return f"smarthost:{hop.host}:{hop.port}", {"label": label, "shape": "box3d"}
    if isinstance(hop, MxHop):
        return f"mx:{hop.port}:{hop.tls}", {
            "label": f"MX delivery\nDNS lookup, port {hop.port}\ntls {hop.tls}",
            "shape": "ellipse",
        }
    if isinstance(hop, GatewayHop):
        if hop.maildir is not None:
            return f"maildir:{relay.relay_id}:{hop.maildir.path}", {
                "label": f"maildir\n{hop.maildir.path}",
                "shape": "folder",
            }
        if hop.webhook is not None:
            return f"webhook:{hop.webhook.url}", {"label": f"webhook\n{hop.webhook.url}", "shape": "note"}
        if hop.pipe is not None:
            command = " ".join(hop.pipe.command)
            return f"pipe:{relay.relay_id}:{command}", {"label": f"pipe\n{command}", "shape": "cds"}
    if isinstance(hop, RejectHop):
        return f"reject:{relay.relay_id}:{route.name}", {
            "label": f"reject\n{hop.code} {hop.message}",
            "shape": "octagon",
            "color": "firebrick",
        }
    raise AssertionError(f"unknown hop {hop!r}")  # pragma: no cover


def to_dot(relays: Sequence[GraphRelay]) -> str:
    """The topology as a Graphviz digraph (left to right)."""
    nodes: dict[str, dict[str, str]] = {}
    edges: list[tuple[str, str, dict[str, str]]] = []
    targeted: set[str] = set()
    for relay in sorted(relays, key=lambda r: r.relay_id):
        config = relay.config
        listeners = "\n".join(describe_listener(listener) for listener in config.listeners)
        nodes[f"relay:{relay.relay_id}"] = {
            "label": f"{relay.relay_id}\n{config.hostname}\n× {relay.replicas}\n{listeners}",
            "shape": "box",
            "style": "rounded,filled",
            "fillcolor": "lightblue",
        }
        for route in config.ordered_routes():
            label = f"{route.name} [{route.priority}]\n{describe_match(route.match)}"
            hops = [route.next_hop, *route.failover]
            for number, hop in enumerate(hops):
                target, attributes = _target(hop, relay, route)
                if attributes:
                    nodes.setdefault(target, attributes)
                if isinstance(hop, RelayHop):
                    targeted.add(target)
                if number == 0:
                    edges.append((f"relay:{relay.relay_id}", target, {"label": label}))
                else:
                    edges.append(
                        (
                            f"relay:{relay.relay_id}",
                            target,
                            {"label": f"{route.name}: failover {number}", "style": "dashed"},
                        )
                    )
    for target in targeted:  # a relay hop to a relay that is not declared (check refuses it)
        nodes.setdefault(
            target, {"label": f"{target.removeprefix('relay:')}\n(not declared)", "shape": "box"}
        )
    entries = [
        node
        for node in nodes
        if node.startswith("relay:") and node not in targeted and "(not declared)" not in nodes[node]["label"]
    ]
    lines = [
        "digraph mailrelay {",
        "  rankdir=LR;",
        '  node [fontname="Helvetica", fontsize=10];',
        '  edge [fontname="Helvetica", fontsize=9];',
    ]
    if entries:
        lines.append(f"  {_quote('clients')} {_attributes(label='clients', shape='plaintext')};")
    for node, attributes in nodes.items():
        lines.append(f"  {_quote(node)} {_attributes(**attributes)};")
    for node in entries:
        lines.append(f"  {_quote('clients')} -> {_quote(node)};")
    for source, target, attributes in edges:
        lines.append(f"  {_quote(source)} -> {_quote(target)} {_attributes(**attributes)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_image(dot_source: str, output: Path) -> None:
    """Write an SVG or PNG (by the file's suffix) with Graphviz's ``dot``."""
    image_format = output.suffix.lower().lstrip(".")
    if image_format not in ("svg", "png"):
        raise GraphvizError(f"{output}: choose a .svg, .png or .dot file")
    binary = shutil.which("dot")
    if binary is None:
        raise GraphvizError(
            "Graphviz's `dot` is not installed (Debian: apt-get install graphviz); "
            "write a .dot file instead and render it elsewhere"
        )
    try:
        subprocess.run(
            [binary, f"-T{image_format}", "-o", str(output)],
            input=dot_source.encode(),
            check=True,
            capture_output=True,
            timeout=60,
        )
    except subprocess.CalledProcessError as exc:
        message = exc.stderr.decode("utf-8", "replace").strip()
        raise GraphvizError(f"dot failed: {message}") from exc
    except subprocess.TimeoutExpired as exc:
        raise GraphvizError("dot took longer than 60 s") from exc
