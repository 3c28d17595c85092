"""The controllers of the Kubernetes API emulator (k8s_emulator): small stand-ins for the
StatefulSet controller, the kubelet and the volume provisioner/resizer, so that the operator's
tests see StatefulSet status the way a cluster writes it instead of writing it by hand.

`run(emulator)` is one level-triggered round, called by the emulator after writes (inside its
event loop); every step writes only what differs, so rounds stop when the world is settled.

- StatefulSet controller: adopts orphaned pods its selector matches, creates pods
  ``<name>-<ordinal>`` from the template (all at once for ``Parallel``, one at a time once the
  lower ordinals are ready for ``OrderedReady``) with the ``controller-revision-hash``,
  ``statefulset.kubernetes.io/pod-name`` and ``apps.kubernetes.io/pod-index`` labels and a
  controller ownerReference, creates each pod's claims ``<template>-<name>-<ordinal>`` (owned by
  the StatefulSet only with ``whenDeleted: Delete``), deletes pods above ``replicas``, and rolls
  a changed template (``RollingUpdate``, partition honoured): once every pod is ready, the
  highest-ordinal pod of an old revision is deleted and created again at the update revision.
  Status: ``observedGeneration``, ``replicas`` and ``availableReplicas`` always, the other
  counts only when non-zero (the API omits zeros), ``currentRevision`` (moved to
  ``updateRevision`` once every pod is updated and ready), ``updateRevision``,
  ``collisionCount: 0``.
- kubelet: a new pod (no status yet) becomes Running and Ready at once with an IP of its own in
  127.244.0.0/16 (loopback: nothing reaches another machine), except in the emulator's
  ``unready_namespaces``, where it stays Pending until a test writes its status.
- provisioner and resizer: a new claim whose StorageClass exists is Bound with the capacity it
  asks for; a Bound claim asking for more than its capacity gets it once its class allows
  expansion (as if the CSI driver had grown the volume online).

Not modelled: Jobs (no Job controller: a test that needs one run plays it and writes the Job's
status), ControllerRevision objects (the revision is a hash of the template), pod
deletion grace periods (a pod goes at once), ``minReadySeconds``, ``maxUnavailable`` other than
one, ``OnDelete`` beyond doing nothing, scheduling and nodes, conditions on the StatefulSet.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections import defaultdict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.relay_operator.k8s_emulator import KubernetesApiEmulator, ObjKey, ResourceType

JSON = dict[str, Any]
REVISION_LABEL = "controller-revision-hash"
POD_NAME_LABEL = "statefulset.kubernetes.io/pod-name"
POD_INDEX_LABEL = "apps.kubernetes.io/pod-index"
OMITTED_WHEN_ZERO = ("readyReplicas", "currentReplicas", "updatedReplicas")


def run(emulator: KubernetesApiEmulator) -> None:
    """One round: StatefulSets, then the kubelet, then claims."""
    by_kind: defaultdict[tuple[str, str], list[tuple[ObjKey, JSON]]] = defaultdict(list)
    for key, obj in emulator.objects.items():
        by_kind[(key[0], key[1])].append((key, obj))
    for key, sts in by_kind[("apps", "statefulsets")]:
        if key[2] not in emulator.unmanaged_namespaces and key in emulator.objects:
            _sync_statefulset(emulator, key, sts)
    for key, _pod in list(by_kind[("", "pods")]):
        if key in emulator.objects and key[2] not in emulator.unmanaged_namespaces:
            _kubelet(emulator, key, emulator.objects[key])
    for key, _claim in list(by_kind[("", "persistentvolumeclaims")]):
        if key in emulator.objects:
            _provision(emulator, key, emulator.objects[key])


def _rt(emulator: KubernetesApiEmulator, group: str, plural: str) -> ResourceType:
    return next(rt for rt in emulator.types.values() if rt.key == (group, plural))


def revision_of(name: str, template: Any) -> str:
    digest = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]
    return f"{name}-{digest}"


def pod_ready(pod: JSON) -> bool:
    status = pod.get("status") or {}
    return status.get("phase") == "Running" and any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []
    )


def _controller_ref(obj: JSON) -> JSON | None:
    refs = obj["metadata"].get("ownerReferences") or []
    return next((ref for ref in refs if ref.get("controller")), None)


def _sync_statefulset(emulator: KubernetesApiEmulator, key: ObjKey, sts: JSON) -> None:
    meta, spec = sts["metadata"], sts.get("spec") or {}
    if meta.get("deletionTimestamp"):
        return
    namespace, name = key[2], key[3]
    replicas = int(spec.get("replicas", 1))
    selector = (spec.get("selector") or {}).get("matchLabels") or {}
    revision = revision_of(name, spec.get("template") or {})
    pods = _owned_pods(emulator, namespace, sts, selector)
    ordinal = re.compile(rf"^{re.escape(name)}-([0-9]+)$")
    by_ordinal = {int(m.group(1)): pod for pod in pods if (m := ordinal.match(pod["metadata"]["name"]))}
    parallel = spec.get("podManagementPolicy") == "Parallel"
    pod_rt = _rt(emulator, "", "pods")
    for index in sorted((i for i in by_ordinal if i >= replicas), reverse=True):
        emulator._remove(pod_rt, ("", "pods", namespace, by_ordinal.pop(index)["metadata"]["name"]))
        if not parallel:
            break
    for index in range(replicas):
        if index in by_ordinal:
            continue
        if not parallel and not all(pod_ready(by_ordinal[i]) for i in range(index) if i in by_ordinal):
            break
        by_ordinal[index] = _create_pod(emulator, sts, index, revision)
        if not parallel:
            break
    strategy = spec.get("updateStrategy") or {}
    partition = int((strategy.get("rollingUpdate") or {}).get("partition") or 0)
    complete = all(i in by_ordinal and pod_ready(by_ordinal[i]) for i in range(replicas))
    if strategy.get("type", "RollingUpdate") == "RollingUpdate" and complete:
        stale = [
            i
            for i in range(partition, replicas)
            if (by_ordinal[i]["metadata"].get("labels") or {}).get(REVISION_LABEL) != revision
        ]
        if stale:
            emulator._remove(pod_rt, ("", "pods", namespace, by_ordinal.pop(max(stale))["metadata"]["name"]))
    _write_status(emulator, key, sts, list(by_ordinal.values()), replicas, revision)


def _owned_pods(
    emulator: KubernetesApiEmulator, namespace: str, sts: JSON, selector: dict[str, str]
) -> list[JSON]:
    """The pods this StatefulSet controls, adopting orphans its selector matches."""
    uid = sts["metadata"]["uid"]
    owned: list[JSON] = []
    pod_rt = _rt(emulator, "", "pods")
    for key, pod in list(emulator.objects.items()):
        if (key[0], key[1], key[2]) != ("", "pods", namespace) or pod["metadata"].get("deletionTimestamp"):
            continue
        ref = _controller_ref(pod)
        if ref is not None and ref.get("uid") == uid:
            owned.append(pod)
        elif (
            ref is None
            and selector
            and all((pod["metadata"].get("labels") or {}).get(k) == v for k, v in selector.items())
        ):
            adopted = copy.deepcopy(pod)
            adopted["metadata"].setdefault("ownerReferences", []).append(_reference(sts))
            owned.append(emulator._replace(pod_rt, key, adopted))
    return owned


def _reference(sts: JSON) -> JSON:
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": sts["metadata"]["name"],
        "uid": sts["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _create_pod(emulator: KubernetesApiEmulator, sts: JSON, index: int, revision: str) -> JSON:
    namespace, name = sts["metadata"]["namespace"], sts["metadata"]["name"]
    spec = sts.get("spec") or {}
    template = copy.deepcopy(spec.get("template") or {})
    pod_name = f"{name}-{index}"
    pod_spec = template.get("spec") or {}
    pod_spec.update(hostname=pod_name, subdomain=spec.get("serviceName", ""))
    policy = spec.get("persistentVolumeClaimRetentionPolicy") or {}
    claim_rt = _rt(emulator, "", "persistentvolumeclaims")
    for claim_template in spec.get("volumeClaimTemplates") or []:
        claim_name = f"{claim_template['metadata']['name']}-{name}-{index}"
        pod_spec.setdefault("volumes", []).append(
            {"name": claim_template["metadata"]["name"], "persistentVolumeClaim": {"claimName": claim_name}}
        )
        if ("", "persistentvolumeclaims", namespace, claim_name) in emulator.objects:
            continue
        labels = {
            **(claim_template["metadata"].get("labels") or {}),
            **((spec.get("selector") or {}).get("matchLabels") or {}),
        }
        claim: JSON = {
            "metadata": {"name": claim_name, "namespace": namespace, "labels": labels},
            "spec": copy.deepcopy(claim_template.get("spec") or {}),
        }
        if policy.get("whenDeleted") == "Delete":
            claim["metadata"]["ownerReferences"] = [dict(_reference(sts), controller=True)]
        emulator._claim_rules(claim_rt, claim, None)
        emulator._store(claim_rt, claim)
    metadata = template.get("metadata") or {}
    pod: JSON = {
        "metadata": {
            "name": pod_name,
            "namespace": namespace,
            "labels": {
                **(metadata.get("labels") or {}),
                REVISION_LABEL: revision,
                POD_NAME_LABEL: pod_name,
                POD_INDEX_LABEL: str(index),
            },
            "annotations": dict(metadata.get("annotations") or {}),
            "ownerReferences": [_reference(sts)],
        },
        "spec": pod_spec,
    }
    return emulator._store(_rt(emulator, "", "pods"), pod)


def _write_status(
    emulator: KubernetesApiEmulator, key: ObjKey, sts: JSON, pods: list[JSON], replicas: int, revision: str
) -> None:
    previous = sts.get("status") or {}
    current = previous.get("currentRevision") or revision

    def at(rev: str) -> int:
        return sum(1 for pod in pods if (pod["metadata"].get("labels") or {}).get(REVISION_LABEL) == rev)

    ready = sum(1 for pod in pods if pod_ready(pod))
    if at(revision) == len(pods) == replicas and ready == replicas:
        current = revision
    status: JSON = {
        "observedGeneration": sts["metadata"].get("generation", 1),
        "replicas": len(pods),
        "readyReplicas": ready,
        "currentReplicas": at(current),
        "updatedReplicas": at(revision),
        "currentRevision": current,
        "updateRevision": revision,
        "collisionCount": 0,
        "availableReplicas": ready,
    }
    for omitted in OMITTED_WHEN_ZERO:
        if not status[omitted]:
            del status[omitted]
    if status != previous:
        new = copy.deepcopy(sts)
        new["status"] = status
        emulator._replace(_rt(emulator, "apps", "statefulsets"), key, new)


def _kubelet(emulator: KubernetesApiEmulator, key: ObjKey, pod: JSON) -> None:
    if pod.get("status") or pod["metadata"].get("deletionTimestamp"):
        return
    new = copy.deepcopy(pod)
    if key[2] in emulator.unready_namespaces:
        new["status"] = {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "True"}]}
    else:
        new["status"] = {
            "phase": "Running",
            "podIP": pod_ip(emulator, pod),
            "conditions": [
                {"type": kind, "status": "True"}
                for kind in ("PodScheduled", "Initialized", "ContainersReady", "Ready")
            ],
        }
    emulator._replace(_rt(emulator, "", "pods"), key, new)


def pod_ip(emulator: KubernetesApiEmulator, pod: JSON) -> str:
    """An address of its own for a new pod, in 127.244.0.0/16: on loopback, so that an operator
    that asks a pod something (GET /queue) never sends a packet off this machine; nothing
    listens there unless a test starts a server standing in for the pod."""
    taken = {
        (other.get("status") or {}).get("podIP")
        for key, other in emulator.objects.items()
        if key[:2] == ("", "pods") and other is not pod
    }
    for index in range(1, 65535):
        address = f"127.244.{index // 256}.{index % 256}"
        if index % 256 and address not in taken:
            return address
    raise RuntimeError("no pod address left in 127.244.0.0/16")


def _provision(emulator: KubernetesApiEmulator, key: ObjKey, claim: JSON) -> None:
    spec, status = claim.get("spec") or {}, claim.get("status") or {}
    requested = ((spec.get("resources") or {}).get("requests") or {}).get("storage")
    class_name = spec.get("storageClassName") or ""
    storage_class = emulator.objects.get(("storage.k8s.io", "storageclasses", "", class_name))
    if storage_class is None or requested is None or claim["metadata"].get("deletionTimestamp"):
        return
    new = copy.deepcopy(claim)
    if not status.get("phase"):
        new["status"] = {
            "phase": "Bound",
            "accessModes": list(spec.get("accessModes") or []),
            "capacity": {"storage": requested},
        }
    elif status.get("phase") == "Bound" and storage_class.get("allowVolumeExpansion"):
        from tests.relay_operator.k8s_emulator import _quantity_amount

        if _quantity_amount(requested) > _quantity_amount((status.get("capacity") or {}).get("storage")):
            new["status"] = dict(status, capacity={"storage": requested})
    if new != claim:
        emulator._replace(_rt(emulator, "", "persistentvolumeclaims"), key, new)
