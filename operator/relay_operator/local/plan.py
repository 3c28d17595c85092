"""What `mailrelay up` runs, decided from the manifests: per MailRelay its replica processes,
each with a rendered relay config file, a spool and a metrics port on this machine.

The manifests are loaded, validated and rendered by the operator's own code
(`relay_operator.manifests`, `relay_operator.topology`): the same explanations as
`mailrelay check`, the same `RelayConfig` the operator would put into a ConfigMap. This module
only supplies what a cluster would: local ports instead of Service DNS names for ``relay`` next
hops, files under the state directory instead of mounted Secrets and volumes, one metrics port
per process. Called by the `up` and `graph` commands; it starts nothing.
"""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from relay.config import RelayConfig, dump_config
from relay_operator.local.layout import StateDir
from relay_operator.local.table import ListenerView

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass(frozen=True)
class ReplicaPlan:
    """One relay process: its name (``edge-0``, like a StatefulSet pod), config and ports."""

    name: str
    config_file: Path
    spool_dir: Path
    config_yaml: str
    metrics_port: int


@dataclass(frozen=True)
class RelayPlan:
    """One MailRelay on this machine."""

    namespace: str
    name: str
    listeners: tuple[ListenerView, ...]
    replicas: tuple[ReplicaPlan, ...]
    restart_key: str  # changes only when the processes must restart (listeners, TLS, ...)
    secrets: Mapping[Path, Mapping[str, bytes]] = field(default_factory=dict)

    @property
    def relay_id(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Plan:
    relays: tuple[RelayPlan, ...]
    sources: tuple[Path, ...]

    def watched(self) -> list[Path]:
        """The manifest files to watch: the given files, and every manifest file in given folders
        (found again on each call, so a new file in a folder is noticed)."""
        return manifest_files(self.sources)


def manifest_files(sources: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for source in sources:
        if source.is_dir():
            files.extend(
                sorted(p for p in source.rglob("*") if p.is_file() and p.suffix in MANIFEST_SUFFIXES)
            )
        else:
            files.append(source)
    return files


class PortBook:
    """Metrics ports for replica processes: a free loopback port per process name, kept for the
    life of `up` so a restarted process serves on the same port."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._host = host
        self._ports: dict[str, int] = {}

    def port(self, name: str) -> int:
        if name not in self._ports:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.bind((self._host, 0))
                self._ports[name] = probe.getsockname()[1]
        return self._ports[name]


def restart_key(config: RelayConfig) -> str:
    """A hash of what a running relay cannot reload: everything but its routes (the same rule as
    the operator's pod-template config hash: route edits reload, the rest rolls the pods)."""
    data = config.model_dump(mode="json", by_alias=True, exclude={"routes"})
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def replica_plan(
    state: StateDir, namespace: str, relay: str, index: int, config: RelayConfig, ports: PortBook
) -> ReplicaPlan:
    """Replica `index` of a relay: the rendered config with this process's spool and metrics port."""
    name = f"{relay}-{index}"
    metrics_port = ports.port(f"{namespace}/{name}")
    spool = state.spool_dir(namespace, relay, index).resolve()
    local = config.model_copy(
        update={
            "queue": config.queue.model_copy(update={"directory": spool}),
            "metrics": config.metrics.model_copy(update={"host": "127.0.0.1", "port": metrics_port}),
            "workers": 1,
        }
    )
    return ReplicaPlan(
        name=name,
        config_file=state.config_file(namespace, relay, index).resolve(),
        spool_dir=spool,
        config_yaml=dump_config(local),
        metrics_port=metrics_port,
    )
