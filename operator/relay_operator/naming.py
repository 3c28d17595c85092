"""Names, labels and well-known constants of the objects the operator owns.

Every builder, the reconcile path, `mailrelay render` and the Helm chart agree on these; no
module spells a child object's name or a label key by itself. Pure: no I/O, no Kubernetes client.
"""

from __future__ import annotations

import hashlib
import re

GROUP = "mailrelay.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
MAILRELAY_KIND = "MailRelay"
RELAYROUTE_KIND = "RelayRoute"
MAILRELAY_PLURAL = "mailrelays"
RELAYROUTE_PLURAL = "relayroutes"

APP_NAME = "mailrelay"
MANAGED_BY = "mailrelay-operator"
COMPONENT = "relay"

LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_PART_OF = "app.kubernetes.io/part-of"

# On the pod template: changes (and so rolls the pods) only when listeners or TLS change.
ROLLOUT_HASH_ANNOTATION = f"{GROUP}/rollout-hash"
# On the ConfigMap: the hash of the whole rendered relay.yaml (routes included).
CONFIG_HASH_ANNOTATION = f"{GROUP}/config-hash"

CONFIG_KEY = "relay.yaml"
CONTAINER_NAME = "relay"
SPOOL_VOLUME = "spool"
METRICS_PORT_NAME = "metrics"

MAX_RELAY_NAME = 40  # "<name>-headless" and StatefulSet pod names stay within 63 characters
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def is_valid_relay_name(name: str) -> bool:
    """A MailRelay name names Services (DNS-1035 labels) and a StatefulSet."""
    return len(name) <= MAX_RELAY_NAME and bool(_DNS_1035.match(name))


def configmap_name(relay: str) -> str:
    return f"{relay}-config"


def statefulset_name(relay: str) -> str:
    return relay


def client_service_name(relay: str) -> str:
    """The Service other relays and clients use; a `relay` next hop resolves to it."""
    return relay


def headless_service_name(relay: str) -> str:
    """The StatefulSet's governing Service (stable pod DNS names)."""
    return f"{relay}-headless"


def pdb_name(relay: str) -> str:
    return relay


def serviceaccount_name(relay: str) -> str:
    return f"{relay}-relay"


def service_dns_name(relay: str, namespace: str, cluster_domain: str = "cluster.local") -> str:
    return f"{client_service_name(relay)}.{namespace}.svc.{cluster_domain}"


def selector_labels(relay: str) -> dict[str, str]:
    """The immutable pod selector of the StatefulSet, PDB and Services."""
    return {LABEL_NAME: APP_NAME, LABEL_INSTANCE: relay}


def labels(relay: str) -> dict[str, str]:
    """The standard labels on every object the operator makes for one MailRelay."""
    return {
        **selector_labels(relay),
        LABEL_COMPONENT: COMPONENT,
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_PART_OF: APP_NAME,
    }


def selector_string(relay: str) -> str:
    """``status.selector`` of a MailRelay: what the scale subresource (and an HPA) reads."""
    return ",".join(f"{key}={value}" for key, value in sorted(selector_labels(relay).items()))


def secret_volume_name(purpose: str, secret: str) -> str:
    """A volume name (DNS-1123 label, at most 63) for one mounted Secret; long names get a hash."""
    raw = f"{purpose}-{secret}".lower()
    cleaned = re.sub(r"[^a-z0-9-]", "-", raw).strip("-")
    if len(cleaned) <= 63 and cleaned == raw:
        return cleaned
    digest = hashlib.sha256(raw.encode()).hexdigest()[:8]
    return f"{cleaned[:54].rstrip('-')}-{digest}"
