"""The MailRelay and RelayRoute manifests the benchmark runs mailrelay from, as a user writes
them: every field the spec has a default for is left out, so the relay under test runs with
the defaults users get (``workers: auto``, the listener limits, the retry schedule, log level,
durable spool). What the benchmark sets, and why:

- ``hostname`` and one relay ``listener`` on a free loopback port (the spec requires both);
- ``trustedNetworks: [127.0.0.0/8]``: the load generator may relay, as Postfix's ``mynetworks``;
- ``queue.maxPerDestination``: the delivery concurrency per destination, levelled with
  Postfix's ``default_destination_concurrency_limit`` (see `per_process_destination`);
- RelayRoutes: ``probe.test`` to the latency probe sink (priority 10), everything else to the
  next hop: a loopback smarthost without TLS (the sink), or another MailRelay of the same set by
  name (a chain, resolved by the planner as in a cluster).

Experiments may set further spec fields (``--workers``, ``--mailrelay-set``); the report header
prints them. Pure: builds documents, writes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

NAMESPACE = "bench"
API_VERSION = "mailrelay.dev/v1alpha1"
PROBE_DOMAIN = "probe.test"


class Hop(NamedTuple):
    """Where a relay sends mail next (always loopback)."""

    host: str
    port: int


@dataclass(frozen=True)
class RelayDef:
    """One MailRelay of a benchmark topology."""

    name: str
    port: int
    next_hop: Hop | str  # a loopback smarthost, or the name of another MailRelay of the same set
    probe: Hop | None = None


def per_process_destination(total: int, workers: int) -> int:
    """``queue.maxPerDestination`` is per relay process: the relay's workers together may open
    `total` connections to one destination (rounded up when `total` does not divide)."""
    return max(1, math.ceil(total / max(1, workers)))


def set_path(document: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in nested mappings, creating the levels that are missing."""
    *parents, last = dotted.split(".")
    node = document
    for key in parents:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[last] = value


def _smarthost(hop: Hop) -> dict[str, Any]:
    return {"smarthost": {"host": hop.host, "port": hop.port, "tls": "none"}}


def documents(
    relays: Sequence[RelayDef],
    *,
    max_per_destination: int | None,
    spec_overrides: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """MailRelay + RelayRoute documents for `relays` (one namespace)."""
    docs: list[dict[str, Any]] = []
    for relay in relays:
        spec: dict[str, Any] = {
            "hostname": f"{relay.name}.bench.test",
            "listeners": [{"name": "smtp", "port": relay.port, "mode": "relay"}],
            "trustedNetworks": ["127.0.0.0/8"],
            "routeSelector": {"matchLabels": {"relay": relay.name}},
        }
        if max_per_destination is not None:
            set_path(spec, "queue.maxPerDestination", max_per_destination)
        for dotted, value in (spec_overrides or {}).items():
            set_path(spec, dotted, value)
        docs.append(
            {
                "apiVersion": API_VERSION,
                "kind": "MailRelay",
                "metadata": {"name": relay.name, "namespace": NAMESPACE},
                "spec": spec,
            }
        )
        routes: list[tuple[str, dict[str, Any]]] = []
        if relay.probe is not None:
            routes.append(
                (
                    "probe",
                    {
                        "priority": 10,
                        "match": {"recipientDomains": [PROBE_DOMAIN]},
                        "nextHop": _smarthost(relay.probe),
                    },
                )
            )
        next_hop = (
            {"relay": {"name": relay.next_hop}}
            if isinstance(relay.next_hop, str)
            else _smarthost(relay.next_hop)
        )
        routes.append(("everything", {"nextHop": next_hop}))
        for route_name, route_spec in routes:
            docs.append(
                {
                    "apiVersion": API_VERSION,
                    "kind": "RelayRoute",
                    "metadata": {
                        "name": f"{relay.name}-{route_name}",
                        "namespace": NAMESPACE,
                        "labels": {"relay": relay.name},
                    },
                    "spec": route_spec,
                }
            )
    return docs
