"""The operator's Prometheus metrics: reconcile passes (by result), their errors (by reason)
and duration, the objects it wrote (by kind and action), and the MailRelays by condition.

`handlers.Runtime.converge` records each pass with `record_pass` (or `record_error`); the
relays-by-condition gauge is computed at scrape time from the last pass that saw each relay,
so a deleted MailRelay drops out with the next pass over its namespace. `serve` starts
prometheus_client's HTTP server on the operator's metrics port (``mailrelay operator
--metrics-port``; the chart's ServiceMonitor scrapes it). Decides nothing about relays; talks to
no API.
"""

from __future__ import annotations

import threading
from collections import Counter as Tally
from collections.abc import Iterable, Iterator, Mapping

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

RECONCILES = Counter(
    "mailrelay_operator_reconciles",
    "Reconcile passes over a namespace, by result (ok, retry: a relay waits for something, error)",
    ["result"],
)
RECONCILE_ERRORS = Counter(
    "mailrelay_operator_reconcile_errors",
    "Reconcile passes the Kubernetes API failed, by reason (the error's kind)",
    ["reason"],
)
RECONCILE_SECONDS = Histogram(
    "mailrelay_operator_reconcile_duration_seconds",
    "Duration of one reconcile pass over a namespace",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
OBJECTS_WRITTEN = Counter(
    "mailrelay_operator_objects_written",
    "Objects the operator created, updated or deleted, by kind and action",
    ["kind", "action"],
)
RELAYS_METRIC = "mailrelay_operator_relays"
RELAY_CONDITION_METRIC = "mailrelay_operator_relay_condition"


class RelayConditions(Collector):
    """``mailrelay_operator_relays{condition, status}``: MailRelays whose last reconcile left
    that condition in that status (True, False, Unknown); and, per relay,
    ``mailrelay_operator_relay_condition{relay_namespace, relay, condition, status} 1`` (the
    labels avoid ``namespace``, which a scrape gives the operator's own pod)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_relay: dict[tuple[str, str], dict[str, str]] = {}

    def update(self, namespace: str, relays: Mapping[str, Mapping[str, str]], *, complete: bool) -> None:
        with self._lock:
            if complete:
                for key in [k for k in self._by_relay if k[0] == namespace and k[1] not in relays]:
                    del self._by_relay[key]
            for name, conditions in relays.items():
                self._by_relay[(namespace, name)] = dict(conditions)

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._by_relay.pop((namespace, name), None)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            by_relay = sorted((key, dict(value)) for key, value in self._by_relay.items())
        tally = Tally(
            (condition, status) for _key, conditions in by_relay for condition, status in conditions.items()
        )
        family = GaugeMetricFamily(
            RELAYS_METRIC,
            "MailRelays by condition and status, as last reconciled",
            labels=["condition", "status"],
        )
        for (condition, status), count in sorted(tally.items()):
            family.add_metric([condition, status], count)
        yield family
        each = GaugeMetricFamily(
            RELAY_CONDITION_METRIC,
            "1 for each MailRelay condition's current status, as last reconciled",
            labels=["relay_namespace", "relay", "condition", "status"],
        )
        for (namespace, name), conditions in by_relay:
            for condition, status in sorted(conditions.items()):
                each.add_metric([namespace, name, condition, status], 1)
        yield each


RELAY_CONDITIONS = RelayConditions()
REGISTRY.register(RELAY_CONDITIONS)


def record_pass(
    namespace: str,
    seconds: float,
    *,
    retry: bool,
    changes: Iterable[str],
    relays: Mapping[str, Mapping[str, str]],
    complete: bool,
) -> None:
    """Count one finished pass: its result, duration, the writes it made ("created ConfigMap
    edge-config", "updated StatefulSet edge") and each relay's conditions."""
    RECONCILES.labels(result="retry" if retry else "ok").inc()
    RECONCILE_SECONDS.observe(seconds)
    for change in changes:
        words = change.split()
        if len(words) >= 2 and words[0] in ("created", "updated", "deleted"):
            OBJECTS_WRITTEN.labels(kind=words[1], action=words[0]).inc()
    RELAY_CONDITIONS.update(namespace, relays, complete=complete)


def record_error(seconds: float, reason: str) -> None:
    RECONCILES.labels(result="error").inc()
    RECONCILE_ERRORS.labels(reason=reason).inc()
    RECONCILE_SECONDS.observe(seconds)


def serve(port: int, host: str = "0.0.0.0", registry: CollectorRegistry = REGISTRY) -> None:
    """Serve /metrics on host:port from a daemon thread (prometheus_client's server)."""
    start_http_server(port, addr=host, registry=registry)
