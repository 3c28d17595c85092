"""kopf registrations, and nothing else: every handler hands its namespace to the one reconcile
path (`relay_operator.reconcile.reconcile_namespace`) and translates its outcome for kopf.

What triggers a reconcile (the path itself is level-triggered: it reads the namespace fresh,
so any trigger converges everything that is out of date):
- a MailRelay is created, changed (spec, labels, annotations) or found at operator start
  (resume); a retryable outcome (a Secret that does not exist yet) becomes `kopf.TemporaryError`
  so kopf retries with backoff;
- a timer per MailRelay every `resync_interval` seconds: drift and anything a watch missed;
- any RelayRoute event, and a MailRelay deletion: every relay of that namespace, since routes
  resolve across relays (loops, `relay` next hops);
- an event of a StatefulSet the operator manages: its owner's status (Ready follows
  readyReplicas) and drift of the StatefulSet itself.

Handlers are synchronous: kopf runs them in its thread pool, and a per-namespace lock keeps two
of them from reconciling one namespace at the same time. kopf keeps its own progress in
annotations under `mailrelay.dev/` (never in status, which belongs to the reconcile path) and
posts no Events of its own below WARNING; the reconcile path posts the user-facing ones.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import kopf

from relay_operator import builders, naming, reconcile
from relay_operator.k8s import ClientKubeApi, KubeApi, KubeError, Unavailable

MAILRELAYS = (naming.GROUP, naming.VERSION, naming.MAILRELAY_PLURAL)
RELAYROUTES = (naming.GROUP, naming.VERSION, naming.RELAYROUTE_PLURAL)
STATEFULSETS = ("apps", "v1", "statefulsets")


@dataclass(frozen=True)
class OperatorOptions:
    """Tunables of the running operator (`mailrelay operator` flags)."""

    resync_interval: float = 60.0  # seconds between level-triggered passes per MailRelay
    retry_delay: float = 15.0  # first backoff after a retryable outcome (kopf grows it)
    kubeconfig: str | None = None  # None: in-cluster, then $KUBECONFIG / ~/.kube/config
    cluster_domain: str = "cluster.local"
    build: builders.BuildOptions = field(default_factory=builders.BuildOptions)
    max_retry_delay: float = 300.0

    def backoff(self, retry: int) -> float:
        """The delay before retry number `retry` (0-based): doubling, capped."""
        return float(min(self.retry_delay * 2 ** min(retry, 16), self.max_retry_delay))


@dataclass
class Runtime:
    """What the handlers share: the API adapter (made at startup) and the namespace locks."""

    options: OperatorOptions
    api_factory: Callable[[], KubeApi] | None = None
    api: KubeApi | None = None
    _locks: defaultdict[str, threading.Lock] = field(default_factory=lambda: defaultdict(threading.Lock))
    _guard: threading.Lock = field(default_factory=threading.Lock)

    def lock(self, namespace: str) -> threading.Lock:
        with self._guard:
            return self._locks[namespace]

    def connect(self) -> KubeApi:
        if self.api is None:
            factory = self.api_factory or (lambda: ClientKubeApi.from_environment(self.options.kubeconfig))
            self.api = factory()
        return self.api

    def converge(
        self, namespace: str, logger: kopf.Logger, *, relays: tuple[str, ...] | None = None
    ) -> reconcile.NamespaceOutcome:
        """One reconcile pass; KubeErrors become kopf.TemporaryError (retried with backoff)."""
        api = self.connect()
        try:
            with self.lock(namespace):
                return reconcile.reconcile_namespace(
                    api,
                    namespace,
                    relays=relays,
                    cluster_domain=self.options.cluster_domain,
                    options=self.options.build,
                )
        except Unavailable as exc:
            raise kopf.TemporaryError(
                f"Kubernetes API unavailable: {exc}", delay=self.options.retry_delay
            ) from exc
        except KubeError as exc:
            logger.warning(f"reconcile of namespace {namespace} failed: {exc}")
            raise kopf.TemporaryError(str(exc), delay=self.options.retry_delay) from exc


def _retry_if_needed(outcome: reconcile.NamespaceOutcome, name: str, delay: float) -> None:
    reason = outcome.retry_reasons.get(name)
    if reason:
        raise kopf.TemporaryError(reason, delay=delay)


def settings() -> kopf.OperatorSettings:
    """kopf settings the operator relies on."""
    settings = kopf.OperatorSettings()
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=naming.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=naming.GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{naming.GROUP}/operator"
    settings.posting.level = logging.WARNING
    settings.posting.reporting_component = naming.MANAGED_BY
    settings.posting.event_name_prefix = "mailrelay-operator-"
    settings.execution.max_workers = 8
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 30
    settings.networking.request_timeout = 60
    settings.queueing.error_delays = (1, 2, 5, 10, 20, 30)
    return settings


def register(registry: kopf.OperatorRegistry, runtime: Runtime) -> None:
    """Register every handler of the operator in `registry`."""
    options = runtime.options

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> Any:
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(registry=registry)
    def startup(**_: Any) -> None:
        runtime.connect()

    @kopf.on.resume(*MAILRELAYS, id="reconcile", registry=registry)
    @kopf.on.create(*MAILRELAYS, id="reconcile", registry=registry)
    @kopf.on.update(*MAILRELAYS, id="reconcile", registry=registry)
    def mailrelay_changed(
        *, namespace: str | None, name: str, retry: int, logger: kopf.Logger, **_: Any
    ) -> None:
        outcome = runtime.converge(namespace or "default", logger)
        _retry_if_needed(outcome, name, options.backoff(retry))

    @kopf.timer(*MAILRELAYS, id="resync", interval=options.resync_interval, registry=registry)
    def mailrelay_resync(*, namespace: str | None, name: str, logger: kopf.Logger, **kwargs: Any) -> None:
        outcome = runtime.converge(namespace or "default", logger, relays=(name,))
        _retry_if_needed(outcome, name, options.backoff(int(kwargs.get("retry") or 0)))

    @kopf.on.event(*MAILRELAYS, id="relay-deleted", registry=registry)
    def mailrelay_deleted(*, type: str, namespace: str | None, logger: kopf.Logger, **_: Any) -> None:
        if type == "DELETED":  # routes that pointed at it resolve differently now
            runtime.converge(namespace or "default", logger)

    @kopf.on.event(*RELAYROUTES, id="route-changed", registry=registry)
    def relayroute_event(*, type: str | None, namespace: str | None, logger: kopf.Logger, **_: Any) -> None:
        if type is not None:  # None is the initial listing; resume handlers cover it
            runtime.converge(namespace or "default", logger)

    @kopf.on.event(
        *STATEFULSETS,
        id="statefulset-changed",
        labels={naming.LABEL_MANAGED_BY: naming.MANAGED_BY},
        registry=registry,
    )
    def statefulset_event(*, body: kopf.Body, namespace: str | None, logger: kopf.Logger, **_: Any) -> None:
        owners = [
            ref.get("name")
            for ref in body.get("metadata", {}).get("ownerReferences") or []
            if ref.get("kind") == naming.MAILRELAY_KIND and ref.get("apiVersion") == naming.API_VERSION
        ]
        if owners:
            runtime.converge(namespace or "default", logger, relays=tuple(str(o) for o in owners))
