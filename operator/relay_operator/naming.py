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
# Hand-offs between the pods of one MailRelay (issue 14): a draining pod gives its queue to a
# remaining peer on this port, with the per-relay credential mounted from the hand-off Secret.
HANDOFF_PORT = 9025
HANDOFF_PORT_NAME = "handoff"
HANDOFF_SECRET_KEY = "credential"
HANDOFF_VOLUME = "handoff"
# The env var a relay reads its own pod name from (the downward API's metadata.name).
POD_NAME_ENV = "MAILRELAY_POD_NAME"
# On a drain Job: the uid of the spool claim it empties (a Job is trusted only for that claim).
CLAIM_UID_ANNOTATION = f"{GROUP}/claim-uid"

MAX_RELAY_NAME = 40  # "<name>-headless" and StatefulSet pod names stay within 63 characters
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def is_valid_relay_name(name: str) -> bool:
    """A MailRelay name names Services (DNS-1035 labels) and a StatefulSet."""
    return len(name) <= MAX_RELAY_NAME and bool(_DNS_1035.match(name))


def configmap_name(relay: str) -> str:
    return f"{relay}-config"


def statefulset_name(relay: str) -> str:
    """The StatefulSet (and its PodDisruptionBudget and NetworkPolicy) is named after the relay."""
    return relay


def client_service_name(relay: str) -> str:
    """The Service other relays and clients use; a `relay` next hop resolves to it."""
    return relay


def headless_service_name(relay: str) -> str:
    """The StatefulSet's governing Service (stable pod DNS names)."""
    return f"{relay}-headless"


def handoff_secret_name(relay: str) -> str:
    """The Secret with the credential the pods of one MailRelay use for hand-offs."""
    return f"{relay}-handoff"


def pod_name(relay: str, ordinal: int) -> str:
    """A StatefulSet pod's name: ``<relay>-<ordinal>``."""
    return f"{statefulset_name(relay)}-{ordinal}"


def pod_ordinal(relay: str, name: str) -> int | None:
    """The ordinal of a pod (or, with the prefix, a spool claim) name of this relay; None if not one."""
    prefix = f"{statefulset_name(relay)}-"
    rest = name.removeprefix(prefix)
    if rest == name or not rest.isdigit() or (len(rest) > 1 and rest.startswith("0")):
        return None
    return int(rest)


def spool_claim_name(relay: str, ordinal: int) -> str:
    """The claim the StatefulSet controller makes for a pod: ``spool-<relay>-<ordinal>``."""
    return f"{SPOOL_VOLUME}-{pod_name(relay, ordinal)}"


def claim_ordinal(relay: str, claim: str) -> int | None:
    """The ordinal of a spool claim name of this relay; None if it is not one."""
    prefix = f"{SPOOL_VOLUME}-"
    return pod_ordinal(relay, claim.removeprefix(prefix)) if claim.startswith(prefix) else None


def pod_dns_name(relay: str, ordinal: int, namespace: str, cluster_domain: str = "cluster.local") -> str:
    """A StatefulSet pod's own DNS name through the headless Service (stable across restarts)."""
    return f"{pod_name(relay, ordinal)}.{headless_service_name(relay)}.{namespace}.svc.{cluster_domain}"


def drain_job_name(relay: str, ordinal: int, claim_uid: str) -> str:
    """The Job that empties the spool claim of a removed ordinal (one per claim: its uid)."""
    return f"{relay}-drain-{ordinal}-{claim_uid.replace('-', '')[:8]}"


pdb_name = networkpolicy_name = statefulset_name


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
