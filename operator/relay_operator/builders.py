"""The Kubernetes objects one MailRelay becomes, built from its `topology.RelayPlan`.

`build_objects` returns, in apply order: ServiceAccount, ConfigMap (``relay.yaml``), headless
Service, client Service, StatefulSet (a volume claim template for the spool per pod),
PodDisruptionBudget and NetworkPolicy (unless ``spec.networkPolicy.enabled`` is false). Each
`build_<kind>()` is a pure function of the plan, `BuildOptions` and, during a scale-down, the
`Drain` the reconcile path decided (which pods drain to which peers, and the size the
StatefulSet keeps meanwhile); the caller (the reconcile path, `mailrelay render`) applies or
prints them. Owner references are passed in (the reconcile path has the MailRelay's uid;
`render` has none and omits them). Two more kinds are built for the reconcile path only: the
hand-off Secret (`build_handoff_secret`, its random credential is the caller's) and the Job that
empties the spool claim of a removed pod (`build_drain_job`).

Rules that shape the pods:
- routes live only in the ConfigMap, mounted as a directory (not subPath) so the kubelet
  updates the file and the relay reloads it; the pod template carries `rollout-hash`, which
  covers only listeners, TLS/AUTH and process settings, so a route edit never rolls the pods;
- non-root, read-only root filesystem, no privilege escalation, all capabilities dropped,
  RuntimeDefault seccomp; ports below 1024 are allowed by the namespaced, "safe" sysctl
  ``net.ipv4.ip_unprivileged_port_start`` instead of a capability;
- a termination grace period long enough for a DATA transfer to finish (RFC 5321 4.5.3.2.6
  allows a client 10 minutes after the final dot; the relay stops accepting at SIGTERM and
  finishes what is in flight);
- the spool volume claims are retained by the StatefulSet controller when the relay is scaled
  down or deleted (``persistentVolumeClaimRetentionPolicy`` says so where the server serves it,
  from 1.27; older servers always retain them, see `for_server`): the reconcile path deletes a
  removed pod's claim itself, and only once its queue was verified empty;
- every relay pod knows its own name (``MAILRELAY_POD_NAME`` from the downward API), mounts the
  hand-off Secret and renders ``handoff`` (its peers may hand it their queues on
  `naming.HANDOFF_PORT`); ``drain`` is rendered only while pods are draining;
- a stopping pod (rolling restart, node drain) first stops taking sessions (its preStop hook
  sends the relay SIGUSR1: ``421 4.3.2`` to new sessions, /readyz 503, deliveries go on), waits
  ``shutdown.endpointRemovalDelay`` for the endpoint removal, then the relay's SIGTERM handling
  finishes the transactions in flight and exits; the grace period covers both.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from relay import __version__
from relay.config import (
    DrainConfig,
    GatewayHop,
    HandoffConfig,
    HandoffPeer,
    MxHop,
    RelayConfig,
    RelayHop,
    SmarthostHop,
    dump_config,
    parse_duration,
)
from relay_operator import naming
from relay_operator.topology import RelayPlan

DEFAULT_IMAGE = f"ghcr.io/mailrelay/mailrelay:{__version__}"
DEFAULT_RESOURCES: Mapping[str, Mapping[str, str]] = {
    "requests": {"cpu": "100m", "memory": "128Mi"},
    "limits": {"memory": "512Mi"},
}
RELAY_UID = 10001  # the image's mailrelay user (Dockerfile)
HANDOFF_DIR = "/etc/mailrelay/handoff"
HANDOFF_CREDENTIAL_FILE = f"{HANDOFF_DIR}/{naming.HANDOFF_SECRET_KEY}"
DRAIN_JOB_TTL_SECONDS = 3600  # a finished drain Job stays this long for `kubectl describe`


@dataclass(frozen=True)
class Drain:
    """A scale-down in progress, as the reconcile path decided it: the StatefulSet keeps
    `replicas` pods while the pods named in `pods` hand their queues to `peers` (host, port)."""

    replicas: int
    pods: tuple[str, ...] = ()
    peers: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class BuildOptions:
    """Operator-wide settings (from the operator's flags or the Helm values)."""

    image: str = DEFAULT_IMAGE
    image_pull_policy: str | None = None
    termination_grace_period_seconds: int = 120
    # persistentVolumeClaimRetentionPolicy is served from Kubernetes 1.27 on (beta, on by default);
    # 1.25 and 1.26 drop it unless a feature gate is on, and retain the claims anyway.
    pvc_retention_policy: bool = True


def for_server(options: BuildOptions, version: tuple[int, int] | None) -> BuildOptions:
    """`options` for an API server of `version` (major, minor): below 1.27 the StatefulSet's
    persistentVolumeClaimRetentionPolicy is not sent (the server would drop it, and a field that
    never reads back would look like drift on every pass; those servers retain claims anyway)."""
    if version is not None and version < (1, 27):
        return replace(options, pvc_retention_policy=False)
    return options


def owner_reference(body: Mapping[str, Any]) -> dict[str, Any]:
    """The controller ownerReference to a MailRelay body read from the API (it has a uid)."""
    metadata = body["metadata"]
    if not metadata.get("uid"):
        raise ValueError("an owner reference needs the owner's uid: read the owner from the API first")
    return {
        "apiVersion": body.get("apiVersion", naming.API_VERSION),
        "kind": body.get("kind", naming.MAILRELAY_KIND),
        "name": metadata["name"],
        "uid": metadata["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(
    plan: RelayPlan,
    name: str,
    owners: Sequence[Mapping[str, Any]],
    annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": plan.relay.key.namespace,
        "labels": naming.labels(plan.relay.key.name),
    }
    if annotations:
        metadata["annotations"] = dict(annotations)
    if owners:
        metadata["ownerReferences"] = [dict(owner) for owner in owners]
    return metadata


def build_serviceaccount(plan: RelayPlan, owners: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """The relay pods' identity; they need no API access, so no token is mounted."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(plan, naming.serviceaccount_name(plan.relay.key.name), owners),
        "automountServiceAccountToken": False,
    }


def relay_config(plan: RelayPlan, drain: Drain | None = None) -> RelayConfig:
    """The pod's relay config: the plan's, plus ``handoff`` (always: any pod may become a peer)
    and ``drain`` (while pods drain)."""
    assert plan.config is not None, "no config rendered; see problems"
    handoff = HandoffConfig(port=naming.HANDOFF_PORT, credential_file=Path(HANDOFF_CREDENTIAL_FILE))
    update: dict[str, Any] = {"handoff": handoff}
    if drain is not None and drain.pods:
        update["drain"] = DrainConfig(
            pods=list(drain.pods), peers=[HandoffPeer(host=host, port=port) for host, port in drain.peers]
        )
    return plan.config.model_copy(update=update)


def build_configmap(
    plan: RelayPlan, owners: Sequence[Mapping[str, Any]] = (), drain: Drain | None = None
) -> dict[str, Any]:
    """The rendered relay configuration (routes, hand-off and drain included)."""
    text = dump_config(relay_config(plan, drain))
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(
            plan,
            naming.configmap_name(plan.relay.key.name),
            owners,
            {naming.CONFIG_HASH_ANNOTATION: hashlib.sha256(text.encode()).hexdigest()[:16]},
        ),
        "data": {naming.CONFIG_KEY: text},
    }


def build_handoff_secret(
    plan: RelayPlan, credential: str, owners: Sequence[Mapping[str, Any]] = ()
) -> dict[str, Any]:
    """The per-relay hand-off credential (only pods of this MailRelay mount it)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(plan, naming.handoff_secret_name(plan.relay.key.name), owners),
        "type": "Opaque",
        "stringData": {naming.HANDOFF_SECRET_KEY: credential},
    }


def _listener_ports(plan: RelayPlan) -> list[tuple[str, int, int]]:
    """(name, service port, container port) per listener."""
    return [
        (listener.name, listener.port, plan.context.listener_port(listener.port))
        for listener in plan.relay.spec.listeners
    ]


def build_headless_service(plan: RelayPlan, owners: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """The StatefulSet's governing Service: stable DNS names per pod, metrics for scraping."""
    name = plan.relay.key.name
    ports = [
        {"name": port_name, "port": container, "targetPort": port_name, "protocol": "TCP"}
        for port_name, _, container in _listener_ports(plan)
    ]
    ports.append(
        {
            "name": naming.METRICS_PORT_NAME,
            "port": plan.context.metrics_port,
            "targetPort": naming.METRICS_PORT_NAME,
            "protocol": "TCP",
        }
    )
    ports.append(
        {
            "name": naming.HANDOFF_PORT_NAME,
            "port": naming.HANDOFF_PORT,
            "targetPort": naming.HANDOFF_PORT_NAME,
            "protocol": "TCP",
        }
    )
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(plan, naming.headless_service_name(name), owners),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": naming.selector_labels(name),
            "ports": ports,
        },
    }


def build_client_service(plan: RelayPlan, owners: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """The Service clients and other relays use: one port per listener."""
    name = plan.relay.key.name
    service = plan.relay.spec.service
    spec: dict[str, Any] = {
        "type": service.type,
        "selector": naming.selector_labels(name),
        "ports": [
            {"name": port_name, "port": port, "targetPort": port_name, "protocol": "TCP"}
            for port_name, port, _ in _listener_ports(plan)
        ],
    }
    if service.type != "ClusterIP":
        # Keep the client's address: relay permission depends on it (trustedNetworks).
        spec["externalTrafficPolicy"] = "Local"
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(plan, naming.client_service_name(name), owners, service.annotations or None),
        "spec": spec,
    }


def build_poddisruptionbudget(plan: RelayPlan, owners: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """At most one relay pod away at a time during voluntary disruptions (node drains)."""
    name = plan.relay.key.name
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(plan, naming.pdb_name(name), owners),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": naming.selector_labels(name)}},
    }


_ANYWHERE: list[dict[str, Any]] = []  # a rule without `from`/`to` admits every peer


def _port_of_url(url: str) -> int:
    parsed = urlsplit(url)
    return parsed.port or (443 if parsed.scheme == "https" else 80)


def _public_listeners(plan: RelayPlan) -> set[str]:
    spec = plan.relay.spec
    if spec.network_policy.public_listeners is not None:
        return set(spec.network_policy.public_listeners)
    if spec.service.type != "ClusterIP":
        return {listener.name for listener in spec.listeners}
    return {listener.name for listener in spec.listeners if listener.mode in ("submission", "http")}


def _ingress(plan: RelayPlan) -> list[dict[str, Any]]:
    spec = plan.relay.spec
    name = plan.relay.key.name
    public = _public_listeners(plan)
    ports = {port_name: container for port_name, _port, container in _listener_ports(plan)}
    rules: list[dict[str, Any]] = []
    open_ports = [ports[listener.name] for listener in spec.listeners if listener.name in public]
    if open_ports:
        rules.append({"ports": [{"protocol": "TCP", "port": port} for port in open_ports]})
    closed = [listener for listener in spec.listeners if listener.name not in public]
    if closed:
        if spec.accept_domains:  # anyone in the cluster may send to the accept domains
            peers: list[dict[str, Any]] = [{"namespaceSelector": {}}]
        else:  # trusted networks, the balancer, and the relays of this namespace (their routes)
            networks = [*spec.trusted_networks]
            for listener in closed:
                proxy = spec.proxied(listener)
                networks += proxy.trusted_from if proxy is not None else []
            cidrs = sorted({str(ipaddress.ip_network(n, strict=False)) for n in networks})
            peers = [{"ipBlock": {"cidr": cidr}} for cidr in cidrs]
            peers.append({"podSelector": {"matchLabels": {naming.LABEL_NAME: naming.APP_NAME}}})
        rules.append(
            {
                "from": peers,
                "ports": [{"protocol": "TCP", "port": ports[listener.name]} for listener in closed],
            }
        )
    rules.append(  # hand-off between the relay's own pods (scale-down)
        {
            "from": [{"podSelector": {"matchLabels": naming.selector_labels(name)}}],
            "ports": [{"protocol": "TCP", "port": naming.HANDOFF_PORT}],
        }
    )
    rules.append(  # Prometheus, wherever it runs in the cluster
        {
            "from": [{"namespaceSelector": {}}],
            "ports": [{"protocol": "TCP", "port": naming.METRICS_PORT_NAME}],
        }
    )
    return rules


def _egress(plan: RelayPlan) -> list[dict[str, Any]]:
    config = plan.config
    assert config is not None
    name = plan.relay.key.name
    rules: list[dict[str, Any]] = [
        {"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},  # DNS
        {  # hand-off to a peer pod of the same relay
            "to": [{"podSelector": {"matchLabels": naming.selector_labels(name)}}],
            "ports": [{"protocol": "TCP", "port": naming.HANDOFF_PORT}],
        },
    ]
    relays: set[str] = set()
    anywhere: set[int] = set()
    for route in config.routes:
        for hop in (route.next_hop, *route.failover):
            if isinstance(hop, RelayHop):
                relays.add(hop.name)
            elif isinstance(hop, SmarthostHop | MxHop):
                anywhere.add(hop.port)
                if isinstance(hop, MxHop) and hop.tls == "mta-sts":
                    anywhere.add(443)  # the domain's MTA-STS policy (RFC 8461), over HTTPS
            elif isinstance(hop, GatewayHop) and hop.webhook is not None:
                anywhere.add(_port_of_url(hop.webhook.url))
        if route.events is not None:
            anywhere.add(_port_of_url(route.events.webhook.url))
    if config.events is not None:
        anywhere.add(_port_of_url(config.events.webhook.url))
    for check in config.recipient_checks:
        if check.callout is not None and check.callout.host is not None:
            anywhere.add(check.callout.port)
    for target in sorted(relays):  # every port of the target relay's pods
        rules.append({"to": [{"podSelector": {"matchLabels": naming.selector_labels(target)}}]})
    if anywhere:
        rules.append({"ports": [{"protocol": "TCP", "port": port} for port in sorted(anywhere)]})
    return rules


def build_networkpolicy(plan: RelayPlan, owners: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """Ingress and egress of one relay's pods (issue 17; opt out with spec.networkPolicy.enabled).

    Ingress: public listeners (all listeners of a LoadBalancer or NodePort Service, else the
    submission and http ones, or ``publicListeners``) from anywhere; the other listeners from
    every pod of the cluster when the relay has accept domains (anyone may send to them), else
    from the trusted networks, the PROXY balancer's ``trustedFrom`` and the mailrelay pods of the
    namespace (relays whose routes lead here); the hand-off port from the relay's own pods; the
    metrics port from every namespace. Egress: DNS, the hand-off port of its own pods, every
    port of the pods of the relays its routes name, and the ports its smarthost, MX (and 443 for
    an MX hop's MTA-STS policy), webhook, events and callout hops use, to any address (a
    NetworkPolicy cannot name a host)."""
    name = plan.relay.key.name
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(plan, naming.networkpolicy_name(name), owners),
        "spec": {
            "podSelector": {"matchLabels": naming.selector_labels(name)},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": _ingress(plan),
            "egress": _egress(plan),
        },
    }


def _secret_volumes(plan: RelayPlan) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    seen: set[str] = set()
    for use in plan.secrets:
        # One mount per directory: a Secret used by several routes (or for smarthost AUTH and
        # a webhook) is mounted once under the secrets directory.
        if str(use.mount_dir) in seen:
            continue
        seen.add(str(use.mount_dir))
        volume = naming.secret_volume_name(
            use.purpose if use.purpose in ("tls", "auth") else "secret", use.secret
        )
        volumes.append({"name": volume, "secret": {"secretName": use.secret, "defaultMode": 0o440}})
        mounts.append({"name": volume, "mountPath": str(use.mount_dir), "readOnly": True})
    return volumes, mounts


def _quantity(value: str | int) -> str:
    return str(value)


def _container_security() -> dict[str, Any]:
    """The relay's and the drain Job's container: no privilege escalation, a read-only root
    filesystem, not root, no capabilities."""
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def _resources(plan: RelayPlan) -> dict[str, dict[str, str]]:
    """The relay container's requests and limits: the spec's, else the defaults."""
    spec_resources = plan.relay.spec.resources
    resources: Mapping[str, Mapping[str, Any]] = DEFAULT_RESOURCES
    if spec_resources is not None and (spec_resources.requests or spec_resources.limits):
        resources = {
            key: {k: _quantity(v) for k, v in value.items()}
            for key, value in (("requests", spec_resources.requests), ("limits", spec_resources.limits))
            if value
        }
    return {key: dict(value) for key, value in resources.items()}


def _relay_container(
    plan: RelayPlan, options: BuildOptions, secret_mounts: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """The one container of a relay pod: the relay process, its probes, mounts and limits."""
    spec = plan.relay.spec
    context = plan.context
    container_ports = [
        {"name": port_name, "containerPort": container, "protocol": "TCP"}
        for port_name, _, container in _listener_ports(plan)
    ]
    container_ports.append(
        {"name": naming.METRICS_PORT_NAME, "containerPort": context.metrics_port, "protocol": "TCP"}
    )
    container_ports.append(
        {"name": naming.HANDOFF_PORT_NAME, "containerPort": naming.HANDOFF_PORT, "protocol": "TCP"}
    )
    container: dict[str, Any] = {
        "name": naming.CONTAINER_NAME,
        "image": spec.image or options.image,
        "command": ["mailrelay"],
        "args": ["relay", "--config", str(context.config_file)],
        "env": [
            # the relay field of every JSON log line (relay.logs)
            {"name": "MAILRELAY_RELAY", "value": plan.relay.key.name},
            # the relay's own pod name: whether the ConfigMap's drain.pods names it (issue 14), and
            # the pod field of its JSON log lines
            {"name": naming.POD_NAME_ENV, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        ],
        "ports": container_ports,
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": naming.METRICS_PORT_NAME},
            "periodSeconds": 5,
            "timeoutSeconds": 3,
            "failureThreshold": 3,
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": naming.METRICS_PORT_NAME},
            "initialDelaySeconds": 10,
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": 6,
        },
        "lifecycle": {"preStop": {"exec": {"command": _pre_stop(plan)}}},
        "resources": _resources(plan),
        "securityContext": _container_security(),
        "volumeMounts": [
            {"name": "config", "mountPath": str(context.config_dir), "readOnly": True},
            {"name": naming.SPOOL_VOLUME, "mountPath": str(context.data_dir)},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": naming.HANDOFF_VOLUME, "mountPath": HANDOFF_DIR, "readOnly": True},
            *secret_mounts,
        ],
    }
    pull_policy = spec.image_pull_policy or options.image_pull_policy
    if pull_policy:
        container["imagePullPolicy"] = pull_policy
    return container


def _pre_stop(plan: RelayPlan) -> list[str]:
    """The preStop hook: SIGUSR1 to the relay (PID 1 of its container: no new sessions, deliveries
    go on; relay.app), then the wait for the endpoint removal; SIGTERM follows."""
    return ["/bin/sh", "-c", f"kill -USR1 1; sleep {_endpoint_delay(plan)}"]


def _endpoint_delay(plan: RelayPlan) -> int:
    """Whole seconds the preStop hook waits (``sleep`` takes whole seconds; rounded up)."""
    return math.ceil(parse_duration(plan.relay.spec.shutdown.endpoint_removal_delay))


def _handoff_volume(plan: RelayPlan) -> dict[str, Any]:
    secret = naming.handoff_secret_name(plan.relay.key.name)
    return {"name": naming.HANDOFF_VOLUME, "secret": {"secretName": secret, "defaultMode": 0o440}}


def _pod_security_context(plan: RelayPlan) -> dict[str, Any]:
    """Non-root with the image's user; low listener ports through the namespaced sysctl."""
    pod_security: dict[str, Any] = {
        "runAsNonRoot": True,
        "runAsUser": RELAY_UID,
        "runAsGroup": RELAY_UID,
        "fsGroup": RELAY_UID,
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    lowest = min(port for _, _, port in _listener_ports(plan))
    if lowest < 1024:
        pod_security["sysctls"] = [{"name": "net.ipv4.ip_unprivileged_port_start", "value": str(lowest)}]
    return pod_security


def _pod_spec(plan: RelayPlan, options: BuildOptions) -> dict[str, Any]:
    """The relay pod: identity, security, the container, its volumes and where it may run."""
    spec = plan.relay.spec
    name = plan.relay.key.name
    secret_volumes, secret_mounts = _secret_volumes(plan)
    pod_spec: dict[str, Any] = {
        "serviceAccountName": naming.serviceaccount_name(name),
        "automountServiceAccountToken": False,
        # The preStop wait comes out of the grace period: add it, so that a DATA transfer in
        # flight still gets the whole allowance after SIGTERM.
        "terminationGracePeriodSeconds": options.termination_grace_period_seconds + _endpoint_delay(plan),
        "securityContext": _pod_security_context(plan),
        "containers": [_relay_container(plan, options, secret_mounts)],
        "volumes": [
            {"name": "config", "configMap": {"name": naming.configmap_name(name)}},
            {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
            _handoff_volume(plan),
            *secret_volumes,
        ],
        "affinity": {
            "podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 100,
                        "podAffinityTerm": {
                            "topologyKey": "kubernetes.io/hostname",
                            "labelSelector": {"matchLabels": naming.selector_labels(name)},
                        },
                    }
                ]
            }
        },
    }
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    if spec.priority_class_name:
        pod_spec["priorityClassName"] = spec.priority_class_name
    if spec.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": ref.name} for ref in spec.image_pull_secrets]
    return pod_spec


def spool_claim_template(plan: RelayPlan) -> dict[str, Any]:
    """The spool's volume claim template (each pod gets a claim ``spool-<relay>-<ordinal>``)."""
    storage = plan.relay.spec.queue.storage
    claim_spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": _quantity(storage.size)}},
    }
    if storage.storage_class_name:
        claim_spec["storageClassName"] = storage.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": naming.SPOOL_VOLUME, "labels": naming.labels(plan.relay.key.name)},
        "spec": claim_spec,
    }


def build_statefulset(
    plan: RelayPlan,
    options: BuildOptions = BuildOptions(),
    owners: Sequence[Mapping[str, Any]] = (),
    drain: Drain | None = None,
) -> dict[str, Any]:
    """The relay pods: one spool volume claim per pod, config and Secrets mounted as files.
    While pods drain (`drain`), it keeps `drain.replicas` pods instead of ``spec.replicas``."""
    spec = plan.relay.spec
    name = plan.relay.key.name
    sts_spec: dict[str, Any] = {
        "serviceName": naming.headless_service_name(name),
        "replicas": spec.replicas if drain is None else drain.replicas,
        "podManagementPolicy": "Parallel",
        "selector": {"matchLabels": naming.selector_labels(name)},
        "updateStrategy": {"type": "RollingUpdate"},
        "persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Retain", "whenScaled": "Retain"},
        "template": {
            "metadata": {
                "labels": naming.labels(name),
                "annotations": {**spec.pod_annotations, naming.ROLLOUT_HASH_ANNOTATION: plan.rollout_hash},
            },
            "spec": _pod_spec(plan, options),
        },
        "volumeClaimTemplates": [spool_claim_template(plan)],
    }
    if not options.pvc_retention_policy:
        del sts_spec["persistentVolumeClaimRetentionPolicy"]
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _metadata(plan, naming.statefulset_name(name), owners),
        "spec": sts_spec,
    }


def build_drain_job(
    plan: RelayPlan,
    options: BuildOptions,
    ordinal: int,
    claim: tuple[str, str],
    target: tuple[str, int],
    owners: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """A short-lived Job that mounts the spool claim of a removed pod and hands every message
    in it to `target` (a remaining pod's hand-off port) with ``mailrelay drain``; it exits 0
    only when the spool is empty, so its success is what allows the claim to be deleted.
    `claim` is the claim's (name, uid): the Job carries the uid, a claim recreated under the
    same name is not the one it emptied."""
    assert plan.config is not None, "no config rendered; see problems"
    spec = plan.relay.spec
    name = plan.relay.key.name
    claim_name, claim_uid = claim
    job_name = naming.drain_job_name(name, ordinal, claim_uid)
    metadata = _metadata(plan, job_name, owners, {naming.CLAIM_UID_ANNOTATION: claim_uid})
    container: dict[str, Any] = {
        "name": "drain",
        "image": spec.image or options.image,
        "command": ["mailrelay"],
        "args": [
            "drain",
            "--spool",
            str(plan.config.queue.directory),
            "--to",
            f"{target[0]}:{target[1]}",
            "--credential-file",
            HANDOFF_CREDENTIAL_FILE,
        ],
        "resources": _resources(plan),
        "securityContext": _container_security(),
        "volumeMounts": [
            {"name": naming.SPOOL_VOLUME, "mountPath": str(plan.context.data_dir)},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": naming.HANDOFF_VOLUME, "mountPath": HANDOFF_DIR, "readOnly": True},
        ],
    }
    pull_policy = spec.image_pull_policy or options.image_pull_policy
    if pull_policy:
        container["imagePullPolicy"] = pull_policy
    pod_spec: dict[str, Any] = {
        "serviceAccountName": naming.serviceaccount_name(name),
        "automountServiceAccountToken": False,
        "restartPolicy": "Never",
        "securityContext": {k: v for k, v in _pod_security_context(plan).items() if k != "sysctls"},
        "containers": [container],
        "volumes": [
            {"name": naming.SPOOL_VOLUME, "persistentVolumeClaim": {"claimName": claim_name}},
            {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
            _handoff_volume(plan),
        ],
    }
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    if spec.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": ref.name} for ref in spec.image_pull_secrets]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata,
        "spec": {
            "backoffLimit": 3,
            "ttlSecondsAfterFinished": DRAIN_JOB_TTL_SECONDS,
            "template": {"metadata": {"labels": naming.labels(name)}, "spec": pod_spec},
        },
    }


def build_objects(
    plan: RelayPlan,
    options: BuildOptions = BuildOptions(),
    owners: Sequence[Mapping[str, Any]] = (),
    drain: Drain | None = None,
) -> list[dict[str, Any]]:
    """Every object for one valid MailRelay, in the order to apply them (the hand-off Secret,
    whose credential is random, is the caller's: `build_handoff_secret`)."""
    if plan.config is None:
        raise ValueError(f"MailRelay {plan.relay.key} has no rendered config: {plan.problems}")
    return [
        build_serviceaccount(plan, owners),
        build_configmap(plan, owners, drain),
        build_headless_service(plan, owners),
        build_client_service(plan, owners),
        build_statefulset(plan, options, owners, drain),
        build_poddisruptionbudget(plan, owners),
        *([build_networkpolicy(plan, owners)] if plan.relay.spec.network_policy.enabled else []),
    ]
