"""kopf registrations and the operator's resync loop, and nothing else: every trigger hands its
namespace to the one reconcile path (`relay_operator.reconcile.reconcile_namespace`) and
translates its outcome for kopf.

What triggers a reconcile (the path itself is level-triggered: it reads the namespace fresh,
so any trigger converges everything that is out of date):
- a MailRelay is created, changed (spec, labels, annotations) or found at operator start
  (resume, and kopf's relisting after a watch expired); a retryable outcome (a Secret that does
  not exist yet, a write the API server refused, a StatefulSet being recreated) becomes
  `kopf.TemporaryError` so kopf retries with backoff;
- the resync loop, one thread per operator (not a kopf timer per MailRelay: a kopf timer or
  daemon puts kopf's finalizer on every MailRelay, and once the operator is uninstalled nobody
  removes it, so deleting a MailRelay, its namespace or the CRD hangs). Every
  `resync_interval` seconds it reconciles each namespace where a reconcile last found a
  MailRelay: drift and anything a watch missed. With kopf peering it acts only while kopf
  would (`peering_allows`, the rule kopf applies to the same peering object: no live peer of
  the same or a higher priority);
- any RelayRoute event, and a MailRelay deletion: every relay of that namespace, since routes
  resolve across relays (loops, `relay` next hops);
- an event of a StatefulSet the operator manages: its owner's status (Ready follows the
  rollout) and drift of the StatefulSet itself;
- a scale-down under way (`reconcile.NamespaceOutcome.busy`: pods draining, drain Jobs running,
  claims to delete): the resync loop passes over that namespace again after `drain_poll`
  seconds instead of the whole resync interval, until it is done.

No handler needs a finalizer, so kopf adds none (and removes the one an older operator version
added). Handlers are synchronous: kopf runs them in its thread pool, and a per-namespace lock
keeps two passes (handlers or the resync loop) from reconciling one namespace at the same time.
kopf keeps its own progress in annotations under `mailrelay.dev/` (never in status, which belongs
to the reconcile path) and posts no Events of its own below WARNING; the reconcile path posts
the user-facing ones. At startup the API server's version decides what the builders may send
(`builders.for_server`).
"""

from __future__ import annotations

import getpass
import logging
import os
import socket
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import kopf

from relay_operator import builders, metrics, naming, reconcile
from relay_operator.k8s import (
    CLUSTERKOPFPEERINGS,
    KOPFPEERINGS,
    ClientKubeApi,
    KubeApi,
    KubeError,
    Unavailable,
)
from relay_operator.queues import HttpQueueProbe

MAILRELAYS = (naming.GROUP, naming.VERSION, naming.MAILRELAY_PLURAL)
RELAYROUTES = (naming.GROUP, naming.VERSION, naming.RELAYROUTE_PLURAL)
STATEFULSETS = ("apps", "v1", "statefulsets")
LOG = logging.getLogger("relay_operator.resync")


def own_identity() -> str:
    """This replica's name among kopf peers (kopf's own scheme: $POD_ID, else user@host/random)."""
    return os.environ.get("POD_ID") or f"{getpass.getuser()}@{socket.gethostname()}/{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class OperatorOptions:
    """Tunables of the running operator (`mailrelay operator` flags)."""

    resync_interval: float = 60.0  # seconds between level-triggered passes over every namespace
    retry_delay: float = 15.0  # first backoff after a retryable outcome (kopf grows it)
    kubeconfig: str | None = None  # None: in-cluster, then $KUBECONFIG / ~/.kube/config
    cluster_domain: str = "cluster.local"
    build: builders.BuildOptions = field(default_factory=builders.BuildOptions)
    max_retry_delay: float = 300.0
    peering: str | None = None  # kopf peering object's name; None: standalone
    priority: int = 0  # this replica's peering priority
    clusterwide: bool = True  # ClusterKopfPeering (True) or a KopfPeering per namespace
    identity: str = field(default_factory=own_identity)  # given to kopf as its peering identity
    drain_poll: float = 5.0  # seconds between passes while a scale-down is under way

    def backoff(self, retry: int) -> float:
        """The delay before retry number `retry` (0-based): doubling, capped."""
        return float(min(self.retry_delay * 2 ** min(retry, 16), self.max_retry_delay))


def peering_allows(peering: Mapping[str, Any] | None, *, identity: str, priority: int, now: datetime) -> bool:
    """Whether a replica may act, by the rule kopf applies to its peering object (kopf's
    ``process_peering_event``): it pauses while the object is missing, or while any other peer
    whose ``lastseen + lifetime`` is still ahead has the same or a higher priority."""
    if peering is None:
        return False
    for peer, info in (peering.get("status") or {}).items():
        if peer == identity or not isinstance(info, Mapping):
            continue
        try:
            lastseen = datetime.fromisoformat(str(info["lastseen"])) if info.get("lastseen") else now
            lifetime = timedelta(seconds=int(info.get("lifetime", 60)))
            other = int(info.get("priority", 0))
        except (TypeError, ValueError):
            return False  # a peer kopf cannot read either: do not act beside it
        if lastseen.tzinfo is None:
            lastseen = lastseen.replace(tzinfo=UTC)
        if lastseen + lifetime > now and other >= priority:
            return False
    return True


@dataclass
class Runtime:
    """What the handlers and the resync loop share: the API adapter (made at startup), the
    build options for this server, the namespaces worth a resync, and the namespace locks."""

    options: OperatorOptions
    api_factory: Callable[[], KubeApi] | None = None
    api: KubeApi | None = None
    build: builders.BuildOptions | None = None
    namespaces: set[str] = field(default_factory=set)
    _locks: defaultdict[str, threading.Lock] = field(default_factory=lambda: defaultdict(threading.Lock))
    _guard: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _loop: threading.Thread | None = None
    _was_acting: bool = True
    _soon: dict[str, float] = field(default_factory=dict)  # namespace -> monotonic time of a quick pass
    _wake: threading.Event = field(default_factory=threading.Event)

    def lock(self, namespace: str) -> threading.Lock:
        with self._guard:
            return self._locks[namespace]

    def connect(self) -> KubeApi:
        if self.api is None:
            factory = self.api_factory or (lambda: ClientKubeApi.from_environment(self.options.kubeconfig))
            api = factory()
            try:
                version = api.server_version()
            except KubeError as exc:
                LOG.warning(f"the API server's version is unknown ({exc}); assuming a current one")
                version = None
            self.build = builders.for_server(self.options.build, version)
            self.api = api
        return self.api

    def converge(
        self, namespace: str, logger: kopf.Logger, *, relays: tuple[str, ...] | None = None
    ) -> reconcile.NamespaceOutcome:
        """One reconcile pass; KubeErrors become kopf.TemporaryError (retried with backoff)."""
        api = self.connect()
        started = time.monotonic()
        try:
            with self.lock(namespace):
                try:
                    outcome = reconcile.reconcile_namespace(
                        api,
                        namespace,
                        relays=relays,
                        cluster_domain=self.options.cluster_domain,
                        options=self.build,
                        probe=HttpQueueProbe(),
                    )
                except KubeError as exc:
                    metrics.record_error(time.monotonic() - started, type(exc).__name__)
                    raise
                metrics.record_pass(
                    namespace,
                    time.monotonic() - started,
                    retry=bool(outcome.retry_reasons),
                    changes=[change for relay in outcome.relays.values() for change in relay.changes],
                    relays={name: relay.conditions for name, relay in outcome.relays.items()},
                    complete=relays is None,
                )
                with self._guard:
                    if outcome.relay_count:
                        self.namespaces.add(namespace)
                    else:
                        self.namespaces.discard(namespace)
                    if outcome.busy:
                        self._soon.setdefault(namespace, time.monotonic() + self.options.drain_poll)
                        self._wake.set()
                return outcome
        except Unavailable as exc:
            raise kopf.TemporaryError(
                f"Kubernetes API unavailable: {exc}", delay=self.options.retry_delay
            ) from exc
        except KubeError as exc:
            logger.warning(f"reconcile of namespace {namespace} failed: {exc}")
            raise kopf.TemporaryError(str(exc), delay=self.options.retry_delay) from exc

    # -- the resync loop ----------------------------------------------------

    def acting(self) -> bool:
        """Whether this replica may act now (always, without peering)."""
        options = self.options
        if options.peering is None:
            return True
        api = self.connect()
        now = datetime.now(tz=UTC)
        try:
            if options.clusterwide:
                objects = [api.get(CLUSTERKOPFPEERINGS, None, options.peering)]
            else:
                objects = [api.get(KOPFPEERINGS, ns, options.peering) for ns in sorted(self.known())]
        except KubeError as exc:
            LOG.warning(f"cannot read the peering object {options.peering}: {exc}")
            return False
        return all(
            peering_allows(body, identity=options.identity, priority=options.priority, now=now)
            for body in objects
        )

    def known(self) -> set[str]:
        with self._guard:
            return set(self.namespaces)

    def resync(self) -> None:
        """One resync pass over every namespace known to hold MailRelays."""
        acting = self.acting()
        if acting != self._was_acting:
            LOG.info(
                "resync resumed"
                if acting
                else "resync paused: a peer of the same or a higher priority is active (kopf peering)"
            )
            self._was_acting = acting
        if not acting:
            return
        self._converge_each(sorted(self.known()), "resync")

    def _converge_each(self, namespaces: list[str], what: str) -> None:
        """Converge the namespaces in turn until told to stop; a temporary failure is logged
        (as `what` of that namespace) and the next one goes on."""
        for namespace in namespaces:
            if self._stop.is_set():
                return
            try:
                self.converge(namespace, LOG)
            except kopf.TemporaryError as exc:
                LOG.warning(f"{what} of namespace {namespace}: {exc}")

    def quick_passes(self) -> None:
        """The passes over namespaces with a scale-down under way whose time has come."""
        now = time.monotonic()
        with self._guard:
            due = sorted(ns for ns, at in self._soon.items() if at <= now)
            for namespace in due:
                del self._soon[namespace]
        if not due or not self.acting():
            return
        self._converge_each(due, "scale-down pass")

    def start_resync(self) -> None:
        def loop() -> None:
            next_resync = time.monotonic() + self.options.resync_interval
            while not self._stop.is_set():
                with self._guard:
                    soonest = min([next_resync, *self._soon.values()])
                    self._wake.clear()
                self._wake.wait(max(0.0, soonest - time.monotonic()))
                if self._stop.is_set():
                    return
                try:
                    if time.monotonic() >= next_resync:
                        self.resync()
                        next_resync = time.monotonic() + self.options.resync_interval
                    self.quick_passes()
                except Exception:  # the loop must outlive any one pass
                    LOG.exception("resync pass failed")

        self._stop.clear()
        self._loop = threading.Thread(target=loop, name="mailrelay-resync", daemon=True)
        self._loop.start()

    def stop_resync(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._loop is not None:
            self._loop.join(30)
            self._loop = None


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
    # No handler needs it (see the module docstring); named so that kopf recognises and removes
    # the finalizer an operator version with a per-MailRelay timer added.
    settings.persistence.finalizer = f"{naming.GROUP}/operator"
    settings.posting.level = logging.WARNING
    settings.posting.reporting_component = naming.MANAGED_BY
    settings.posting.event_name_prefix = "mailrelay-operator-"
    settings.execution.max_workers = 8
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 30
    settings.watching.chunk_size = 500  # list in pages (limit/continue), as the reconcile path does
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
        runtime.start_resync()

    @kopf.on.cleanup(registry=registry)
    def cleanup(**_: Any) -> None:
        runtime.stop_resync()

    @kopf.on.resume(*MAILRELAYS, id="reconcile", registry=registry)
    @kopf.on.create(*MAILRELAYS, id="reconcile", registry=registry)
    @kopf.on.update(*MAILRELAYS, id="reconcile", registry=registry)
    def mailrelay_changed(
        *, namespace: str | None, name: str, retry: int, logger: kopf.Logger, **_: Any
    ) -> None:
        outcome = runtime.converge(namespace or "default", logger)
        _retry_if_needed(outcome, name, options.backoff(retry))

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
