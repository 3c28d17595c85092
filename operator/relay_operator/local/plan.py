"""What `mailrelay up` runs, decided from the manifests: per MailRelay its replica processes,
each with a rendered relay config file, a spool and a metrics port on this machine.

The manifests are loaded, validated and rendered by the operator's own code
(`relay_operator.manifests.load_manifests`, `relay_operator.topology.plan_namespace`): the same
explanations as `mailrelay check`, the same `RelayConfig` the operator puts into a ConfigMap.
This module only supplies what a cluster would: a `RenderContext` per relay with folders under
the state directory instead of mounted Secrets and volumes, listener ports shifted by
``--port-offset`` and bound to ``--bind``, a resolver that answers a ``relay`` next hop with the
target's local port, and one metrics port and spool per process. A Secret that is referenced
but not given is an error here (`check` only warns: in a cluster it may exist already), because
nothing else would provide it. Called by the `up` and `graph` commands; it starts nothing.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from relay.config import HandoffConfig, RelayConfig, dump_config
from relay_operator import manifests, topology
from relay_operator.local.layout import StateDir
from relay_operator.local.table import ListenerView
from relay_operator.spec import ObjectKey
from relay_operator.topology import NamespacePlan, Problem, RenderContext


@dataclass(frozen=True)
class LocalOptions:
    """The command-line choices that shape the plan."""

    bind: str = "127.0.0.1"
    port_offset: int = 0
    default_namespace: str = "default"
    log_format: Literal["text", "json"] | None = None  # --log-format: every relay's, over its spec

    @property
    def connect_host(self) -> str:
        """Where a relay reaches another one: the bind address, or loopback for a wildcard."""
        return "127.0.0.1" if self.bind in ("0.0.0.0", "::", "") else self.bind


@dataclass(frozen=True)
class ReplicaPlan:
    """One relay process: its name (``edge-0``, like a StatefulSet pod), config and ports."""

    name: str
    config_file: Path
    spool_dir: Path
    config_yaml: str
    metrics_port: int
    handoff_port: int = 0  # the replica's handoff listener (scale-down: peers hand it their queue)


@dataclass(frozen=True)
class LocalRelay:
    """One MailRelay on this machine."""

    namespace: str
    name: str
    listeners: tuple[ListenerView, ...]
    replicas: tuple[ReplicaPlan, ...]
    restart_key: str  # the operator's rollout hash: changes only when processes must restart
    secrets: Mapping[Path, Mapping[str, bytes]] = field(default_factory=dict)
    config: RelayConfig | None = None  # as rendered for this machine, before per-process changes

    @property
    def relay_id(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Plan:
    relays: tuple[LocalRelay, ...]
    sources: tuple[Path, ...]
    warnings: tuple[str, ...] = ()

    def watched(self) -> list[Path]:
        """The manifest files to watch: the given files, and every manifest file in given folders
        (found again on each call, so a new file in a folder is noticed)."""
        try:
            return manifests.manifest_files(self.sources)
        except manifests.ManifestError:
            return [source for source in self.sources if source.exists()]


@dataclass(frozen=True)
class Refused:
    """Why the manifests cannot run: `check`'s lines, and the exit status (1 or 2)."""

    problems: tuple[str, ...]
    status: int = 1


class PortBook:
    """Metrics ports for replica processes: a free loopback port per process name, kept for the
    life of `up` so a restarted process serves on the same port."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._host = host
        self._ports: dict[str, int] = {}

    def port(self, name: str, avoid: frozenset[int] = frozenset()) -> int:
        if name not in self._ports:
            while True:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                    probe.bind((self._host, 0))
                    port = int(probe.getsockname()[1])
                if port not in avoid and port not in self._ports.values():
                    break
            self._ports[name] = port
        return self._ports[name]


def _secret_name(body: Mapping[str, Any] | None, field_name: str) -> str | None:
    spec = (body or {}).get("spec")
    part = spec.get(field_name) if isinstance(spec, dict) else None
    name = part.get("secretName") if isinstance(part, dict) else None
    return str(name) if name else None


def render_context(
    state: StateDir,
    key: ObjectKey,
    body: Mapping[str, Any] | None,
    options: LocalOptions,
    metrics_port: int,
) -> RenderContext:
    """The relay's files under the state directory: Secrets at ``secrets/<secret>/<key>``
    (TLS and AUTH Secrets too, so every Secret is where its name says), data (maildirs) in the
    relay's folder, shared by its replicas as a volume would be."""
    relay_dir = PurePosixPath(state.relay_dir(key.namespace, key.name).resolve())
    secrets = relay_dir / "secrets"
    tls = _secret_name(body, "tls")
    auth = _secret_name(body, "auth")
    return RenderContext(
        config_dir=relay_dir,
        tls_dir=secrets / tls if tls else secrets / "tls",
        auth_dir=secrets / auth if auth else secrets / "auth",
        secrets_dir=secrets,
        data_dir=relay_dir,
        listener_host=options.bind,
        metrics_host="127.0.0.1",
        metrics_port=metrics_port,
        port_offset=options.port_offset,
        log_format="text",
        log_format_override=options.log_format,
    )


def _declared_ports(loaded: manifests.ManifestSet, offset: int) -> frozenset[int]:
    ports: set[int] = set()
    for namespace in loaded.namespaces.values():
        for body in namespace.relays:
            spec = body.get("spec")
            listeners = spec.get("listeners") if isinstance(spec, dict) else None
            for listener in listeners if isinstance(listeners, list) else []:
                if isinstance(listener, dict) and isinstance(listener.get("port"), int):
                    ports.add(listener["port"] + offset)
    return frozenset(ports)


def plan_namespaces(
    loaded: manifests.ManifestSet, state: StateDir, options: LocalOptions, ports: PortBook
) -> list[NamespacePlan]:
    """The operator's plan of every namespace, rendered for this machine."""
    avoid = _declared_ports(loaded, options.port_offset)
    plans = []
    for namespace in loaded.namespaces.values():
        bodies = {str((b.get("metadata") or {}).get("name")): b for b in namespace.relays}

        def context_for(key: ObjectKey, bodies: Mapping[str, Mapping[str, Any]] = bodies) -> RenderContext:
            port = ports.port(f"{key.namespace}/{key.name}-0", avoid)
            return render_context(state, key, bodies.get(key.name), options, port)

        resolver = topology.context_resolver(context_for, host=options.connect_host)
        plans.append(
            topology.plan_namespace(
                namespace.namespace,
                namespace.relays,
                namespace.routes,
                resolver=resolver,
                context_for=context_for,
            )
        )
    return plans


def handoff_credential(state: StateDir, key: ObjectKey) -> Path:
    """The relay's hand-off secret, where a pod mounts the operator's ``<relay>-handoff`` Secret
    (`LocalController` writes a random one there if it is missing)."""
    return (state.secret_dir(key.namespace, key.name, f"{key.name}-handoff") / "credential").resolve()


def _replica(
    state: StateDir,
    key: ObjectKey,
    index: int,
    config: RelayConfig,
    metrics_port: int,
    handoff_port: int,
    host: str,
) -> ReplicaPlan:
    """Replica `index`: the rendered config with this process's spool, metrics port and handoff
    listener (on `host`, its own port: a scaled-down replica hands its queue to a given one)."""
    spool = state.spool_dir(key.namespace, key.name, index).resolve()
    handoff = HandoffConfig(host=host, port=handoff_port, credential_file=handoff_credential(state, key))
    local = config.model_copy(
        update={
            "queue": config.queue.model_copy(update={"directory": spool}),
            "metrics": config.metrics.model_copy(update={"port": metrics_port}),
            "handoff": handoff,
        }
    )
    return ReplicaPlan(
        name=f"{key.name}-{index}",
        config_file=state.config_file(key.namespace, key.name, index).resolve(),
        spool_dir=spool,
        config_yaml=dump_config(local),
        metrics_port=metrics_port,
        handoff_port=handoff_port,
    )


def build_plan(
    sources: Sequence[Path], state: StateDir, options: LocalOptions, ports: PortBook
) -> Plan | Refused:
    """Load, validate and render the manifests for this machine; `Refused` explains why not."""
    try:
        loaded = manifests.load_manifests(sources, options.default_namespace)
    except manifests.ManifestError as exc:
        return Refused((f"error: {exc}",), status=2)
    if loaded.relay_count == 0:
        return Refused(("error: no MailRelay found in the given files",))
    avoid = _declared_ports(loaded, options.port_offset)
    problems: list[Problem] = []
    relays: list[LocalRelay] = []
    for plan in plan_namespaces(loaded, state, options, ports):
        namespace = loaded.namespaces[plan.namespace]
        problems.extend(plan.problems)
        for relay_plan in plan.relays.values():

            def lookup(name: str, ns: manifests.NamespaceManifests = namespace) -> dict[str, bytes] | None:
                secret = ns.secret(name)
                return None if secret is None else manifests.secret_data(secret)

            try:
                secret_problems = topology.secret_problems(relay_plan, lookup, missing_severity="error")
            except manifests.ManifestError as exc:
                return Refused((f"error: {exc}",), status=2)
            problems.extend(
                Problem(
                    p.subject, p.reason, p.message + " (mailrelay up needs it in the manifests)", p.severity
                )
                if p.reason == "SecretMissing"
                else p
                for p in secret_problems
            )
            config = relay_plan.config
            if config is None or not relay_plan.valid:
                continue
            key = relay_plan.relay.key
            secrets: dict[Path, Mapping[str, bytes]] = {}
            for use in relay_plan.secrets:
                data = lookup(use.secret)
                if data is not None:
                    secrets[Path(use.mount_dir)] = data
            replicas = tuple(
                _replica(
                    state,
                    key,
                    index,
                    config,
                    ports.port(f"{key.namespace}/{key.name}-{index}", avoid),
                    ports.port(f"{key.namespace}/{key.name}-{index}/handoff", avoid),
                    options.connect_host,
                )
                for index in range(relay_plan.relay.spec.replicas)
            )
            listeners = tuple(
                ListenerView(listener.name, listener.mode, f"{options.bind}:{listener.port}")
                for listener in config.listeners
            )
            relays.append(
                LocalRelay(
                    namespace=key.namespace,
                    name=key.name,
                    listeners=listeners,
                    replicas=replicas,
                    restart_key=relay_plan.rollout_hash,
                    secrets=secrets,
                    config=config,
                )
            )
    errors = [str(p) for p in problems if p.severity == "error"]
    if errors:
        return Refused(tuple(str(p) for p in problems))
    warnings = tuple(str(p) for p in problems)
    return Plan(relays=tuple(relays), sources=tuple(sources), warnings=warnings)
