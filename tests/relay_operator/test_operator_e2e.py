"""End to end: the real `mailrelay operator` (kopf) against the Kubernetes API emulator.

One operator process serves the whole module (cluster-wide); each test works in a namespace of
its own. Every wait is a bounded poll for an observable state (no fixed sleeps); the
"not touched" assertions compare resourceVersions after the operator has provably reconciled
again (its requests for the object are counted in the emulator)."""

from __future__ import annotations

import base64
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.core.dkim import public_record
from relay.dkim import generate_key
from relay_operator import k8s, naming, reconcile
from tests.relay_operator.conftest import (
    CRDS,
    OPERATOR_IMAGE,
    OPERATOR_TOKEN,
    TOKEN,
    OperatorProcess,
    RawHttp,
    wait_for,
)
from tests.relay_operator.crd_tools import operator_rules
from tests.relay_operator.k8s_emulator import EmulatorThread, KubernetesApiEmulator
from tests.relay_operator.test_operator_drain import force_claim_drain

MERGE = "application/merge-patch+json"
PODS = k8s.Resource("v1", "pods", "Pod")
PVCS = k8s.PERSISTENTVOLUMECLAIMS
LAST_HANDLED = f"{naming.GROUP}/last-handled-configuration"


def mailrelay(name: str, *, port: int = 2525, replicas: int = 1, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": naming.API_VERSION,
        "kind": naming.MAILRELAY_KIND,
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "hostname": f"{name}.mail.example.com",
            "listeners": [{"name": "smtp", "port": port, "mode": "relay"}],
            "trustedNetworks": ["10.0.0.0/8"],
            "routeSelector": {"matchLabels": {"relay": name}},
            **spec,
        },
    }
    return body


def relayroute(
    name: str, relay: str, next_hop: dict[str, Any], *, domains: list[str], priority: int = 100
) -> dict[str, Any]:
    return {
        "apiVersion": naming.API_VERSION,
        "kind": naming.RELAYROUTE_KIND,
        "metadata": {"name": name, "labels": {"relay": relay}},
        "spec": {"priority": priority, "match": {"recipientDomains": domains}, "nextHop": next_hop},
    }


def condition(body: dict[str, Any] | None, type_: str) -> dict[str, Any] | None:
    for entry in ((body or {}).get("status") or {}).get("conditions") or []:
        if entry.get("type") == type_:
            return dict(entry)
    return None


def children(kube: Any, namespace: str, relay: str) -> dict[str, dict[str, Any] | None]:
    return {
        "ServiceAccount": kube.get(k8s.SERVICEACCOUNTS, namespace, naming.serviceaccount_name(relay)),
        "ConfigMap": kube.get(k8s.CONFIGMAPS, namespace, naming.configmap_name(relay)),
        "Service/headless": kube.get(k8s.SERVICES, namespace, naming.headless_service_name(relay)),
        "Service/client": kube.get(k8s.SERVICES, namespace, naming.client_service_name(relay)),
        "StatefulSet": kube.get(k8s.STATEFULSETS, namespace, naming.statefulset_name(relay)),
        "PodDisruptionBudget": kube.get(k8s.PODDISRUPTIONBUDGETS, namespace, naming.pdb_name(relay)),
    }


def relay_config(kube: Any, namespace: str, relay: str) -> dict[str, Any]:
    configmap = kube.get(k8s.CONFIGMAPS, namespace, naming.configmap_name(relay))
    assert configmap is not None
    loaded = yaml.safe_load(configmap["data"][naming.CONFIG_KEY])
    assert isinstance(loaded, dict)
    return loaded


def converged(kube: Any, namespace: str, name: str) -> dict[str, Any] | None:
    """The MailRelay once its status describes its current generation, its children exist and
    kopf has recorded the handled spec (its last write after a change)."""
    body = kube.get(k8s.MAILRELAYS, namespace, name)
    if body is None or (body.get("status") or {}).get("observedGeneration") != body["metadata"]["generation"]:
        return None
    if LAST_HANDLED not in (body["metadata"].get("annotations") or {}):
        return None
    if kube.get(k8s.STATEFULSETS, namespace, name) is None:
        return None
    return dict(body)


def ready_relay(kube: Any, namespace: str, name: str) -> dict[str, Any] | None:
    body = converged(kube, namespace, name)
    found = condition(body, "Ready")
    return body if found and found["status"] == "True" else None


def requests_for(emulator: EmulatorThread, path_part: str) -> int:
    return int(
        emulator.call(lambda: sum(1 for _m, path, _c in emulator.emulator.requests if path_part in path))
    )


def two_more_passes(emulator: EmulatorThread, operator_process: OperatorProcess, namespace: str) -> str:
    """Wait until the operator has read StatefulSet edge twice more (two reconcile passes, at
    least one a resync); returns that StatefulSet's path."""
    sts_path = f"/namespaces/{namespace}/statefulsets/edge"
    seen = requests_for(emulator, sts_path)
    operator_process.until(
        lambda: requests_for(emulator, sts_path) >= seen + 2, "two more reconcile passes", timeout=15
    )
    return sts_path


def events_for(kube: Any, namespace: str, name: str) -> list[tuple[str, str, str]]:
    return [
        (e["type"], e["reason"], e["message"])
        for e in kube.list(k8s.EVENTS, namespace)
        if e["involvedObject"]["name"] == name
    ]


# --------------------------------------------------------------------------- the tests


def test_apply_creates_owned_children_and_status(
    kube: Any, namespace: str, operator_process: OperatorProcess, emulator: EmulatorThread
) -> None:
    emulator.call(lambda: emulator.emulator.unready_namespaces.add(namespace))  # pods stay Pending
    internal = kube.create(k8s.MAILRELAYS, namespace, mailrelay("internal", port=2526))
    edge = kube.create(k8s.MAILRELAYS, namespace, mailrelay("edge"))
    kube.create(
        k8s.RELAYROUTES,
        namespace,
        relayroute("to-internal", "edge", {"relay": {"name": "internal"}}, domains=["corp.example.com"]),
    )
    kube.create(
        k8s.RELAYROUTES,
        namespace,
        relayroute(
            "outbound",
            "edge",
            {"smarthost": {"host": "smtp.example.net", "port": 587}},
            domains=["*"],
            priority=10,
        ),
    )

    def all_children() -> dict[str, dict[str, Any] | None] | None:
        found = children(kube, namespace, "edge")
        return found if all(found.values()) else None

    objects = operator_process.until(all_children, "every child of MailRelay edge")
    for kind, obj in objects.items():
        assert obj is not None
        refs = obj["metadata"]["ownerReferences"]
        assert [(r["kind"], r["name"], r["uid"], r["controller"]) for r in refs] == [
            ("MailRelay", "edge", edge["metadata"]["uid"], True)
        ], kind
    body = operator_process.until(lambda: converged(kube, namespace, "edge"), "MailRelay edge status")
    status = body["status"]
    assert status["selector"] == naming.selector_string("edge")
    assert [r["name"] for r in status["routes"]] == ["to-internal", "outbound"]
    valid = condition(body, "ConfigValid")
    assert valid is not None and valid["status"] == "True"
    ready = condition(body, "Ready")
    assert ready is not None and ready["status"] == "False"  # no pods are ready yet
    applied = condition(body, "Applied")
    assert applied is not None and (applied["status"], applied["reason"]) == ("True", "Applied")
    assert "finalizers" not in body["metadata"]  # nothing holds a MailRelay's deletion
    pod = kube.get(PODS, namespace, "edge-0")  # made by the emulator's StatefulSet controller
    assert pod["metadata"]["ownerReferences"][0]["name"] == "edge"
    assert kube.get(PVCS, namespace, "spool-edge-0") is not None
    (container,) = objects["StatefulSet"]["spec"]["template"]["spec"]["containers"]  # type: ignore[index]
    assert (container["image"], container["imagePullPolicy"]) == (OPERATOR_IMAGE, "Always")  # the flags
    config = relay_config(kube, namespace, "edge")
    hop = config["routes"][0]["nextHop"]
    assert (hop["kind"], hop["host"], hop["port"]) == (
        "relay",
        f"internal.{namespace}.svc.cluster.local",
        2526,
    )
    route = operator_process.until(
        lambda: (r := kube.get(k8s.RELAYROUTES, namespace, "to-internal")) and condition(r, "Resolved") and r,
        "RelayRoute status",
    )
    assert condition(route, "Accepted")["status"] == "True"  # type: ignore[index]
    assert condition(route, "Resolved")["status"] == "True"  # type: ignore[index]
    assert condition(route, "Conflicted")["status"] == "False"  # type: ignore[index]
    assert internal["metadata"]["uid"] != edge["metadata"]["uid"]


def test_route_change_rewrites_only_the_configmap(
    kube: Any, namespace: str, operator_process: OperatorProcess, emulator: EmulatorThread
) -> None:
    kube.create(k8s.MAILRELAYS, namespace, mailrelay("edge"))
    kube.create(k8s.RELAYROUTES, namespace, relayroute("out", "edge", {"mx": {}}, domains=["example.org"]))
    operator_process.until(lambda: converged(kube, namespace, "edge"), "MailRelay edge to converge")
    before = children(kube, namespace, "edge")
    start = emulator.call(lambda: len(emulator.emulator.requests))

    kube.merge_patch(
        k8s.RELAYROUTES, namespace, "out", {"spec": {"match": {"recipientDomains": ["example.net"]}}}
    )
    operator_process.until(
        lambda: (
            relay_config(kube, namespace, "edge")["routes"][0]["match"]["recipientDomains"] == ["example.net"]
        ),
        "the ConfigMap to carry the changed route",
    )
    # Let the operator reconcile at least twice more (a resync), then nothing else may have moved.
    two_more_passes(emulator, operator_process, namespace)
    after = children(kube, namespace, "edge")
    for kind in before:
        if kind == "ConfigMap":
            continue
        assert after[kind]["metadata"]["resourceVersion"] == before[kind]["metadata"]["resourceVersion"], kind  # type: ignore[index]
    assert after["StatefulSet"]["spec"]["template"] == before["StatefulSet"]["spec"]["template"]  # type: ignore[index]
    configmap_before, configmap_after = before["ConfigMap"], after["ConfigMap"]
    assert configmap_before is not None and configmap_after is not None
    assert configmap_after["metadata"]["resourceVersion"] != configmap_before["metadata"]["resourceVersion"]
    # The operator's writes since the route edit: the ConfigMap, statuses and Events, nothing else.
    writes = emulator.call(
        lambda: {
            path.removeprefix(f"/api/v1/namespaces/{namespace}/").removeprefix(
                f"/apis/{naming.API_VERSION}/namespaces/{namespace}/"
            )
            for method, path, _ in emulator.emulator.requests[start:]
            if method in ("POST", "PUT", "PATCH", "DELETE") and namespace in path and "/events" not in path
        }
    )
    assert writes == {
        "relayroutes/out",
        "configmaps/edge-config",
        "mailrelays/edge/status",
        "relayroutes/out/status",
    }


def test_quantities_the_server_canonicalizes_are_not_drift(
    kube: Any, namespace: str, operator_process: OperatorProcess, emulator: EmulatorThread
) -> None:
    """The API server stores cpu "0.5" as "500m" and "1024Mi" as "1Gi"; comparing spellings would
    make the operator replace the StatefulSet on every resync."""
    resources = {"requests": {"cpu": "0.5", "memory": "1024Mi"}, "limits": {"memory": "1.5Gi"}}
    kube.create(k8s.MAILRELAYS, namespace, mailrelay("edge", resources=resources))
    operator_process.until(lambda: converged(kube, namespace, "edge"), "MailRelay edge to converge")
    sts = kube.get(k8s.STATEFULSETS, namespace, "edge")
    assert sts["spec"]["template"]["spec"]["containers"][0]["resources"] == {
        "requests": {"cpu": "500m", "memory": "1Gi"},
        "limits": {"memory": "1536Mi"},
    }
    sts_path = two_more_passes(emulator, operator_process, namespace)
    writes = emulator.call(
        lambda: [m for m, path, _ in emulator.emulator.requests if path.endswith(sts_path) and m != "GET"]
    )
    assert writes == []  # created (POST to the collection), never replaced
    assert (
        kube.get(k8s.STATEFULSETS, namespace, "edge")["metadata"]["resourceVersion"]
        == (sts["metadata"]["resourceVersion"])
    )


def test_listener_change_rolls_the_pods(kube: Any, namespace: str, operator_process: OperatorProcess) -> None:
    kube.create(k8s.MAILRELAYS, namespace, mailrelay("edge"))
    operator_process.until(lambda: converged(kube, namespace, "edge"), "MailRelay edge to converge")

    def rollout_hash() -> str:
        sts = kube.get(k8s.STATEFULSETS, namespace, "edge")
        return str(sts["spec"]["template"]["metadata"]["annotations"][naming.ROLLOUT_HASH_ANNOTATION])

    first = rollout_hash()
    listeners = [{"name": "smtp", "port": 2600, "mode": "relay"}]
    kube.merge_patch(k8s.MAILRELAYS, namespace, "edge", {"spec": {"listeners": listeners}})
    operator_process.until(lambda: rollout_hash() != first, "the pod template's rollout hash to change")
    sts = kube.get(k8s.STATEFULSETS, namespace, "edge")
    ports = sts["spec"]["template"]["spec"]["containers"][0]["ports"]
    assert {"name": "smtp", "containerPort": 2600, "protocol": "TCP"} in ports


def test_scale_subresource_drives_the_statefulset_and_ready_follows_it(
    kube: Any, namespace: str, operator_process: OperatorProcess, http: RawHttp
) -> None:
    kube.create(k8s.MAILRELAYS, namespace, mailrelay("edge"))
    operator_process.until(lambda: converged(kube, namespace, "edge"), "MailRelay edge to converge")
    scale_path = f"/apis/{naming.API_VERSION}/namespaces/{namespace}/mailrelays/edge/scale"
    status, _ = http("PATCH", scale_path, {"spec": {"replicas": 3}}, MERGE)  # kubectl scale --replicas=3
    assert status == 200
    operator_process.until(
        lambda: kube.get(k8s.STATEFULSETS, namespace, "edge")["spec"]["replicas"] == 3,
        "the StatefulSet to follow the scale subresource",
    )
    # The emulator's StatefulSet controller makes the pods, its kubelet makes them ready.
    body = operator_process.until(lambda: ready_relay(kube, namespace, "edge"), "Ready=True with 3 pods")
    assert body["status"]["readyReplicas"] == 3 and body["status"]["replicas"] == 3
    assert sorted(p["metadata"]["name"] for p in kube.list(PODS, namespace)) == ["edge-0", "edge-1", "edge-2"]
    _, scale = http("GET", scale_path)
    assert scale["spec"]["replicas"] == 3 and scale["status"]["selector"] == naming.selector_string("edge")
    # A pod stops being ready: Ready follows.
    unready = {"status": {"conditions": [{"type": "Ready", "status": "False"}]}}
    kube.merge_patch(PODS, namespace, "edge-1", unready, subresource="status")
    body = operator_process.until(
        lambda: (
            (b := kube.get(k8s.MAILRELAYS, namespace, "edge"))
            and condition(b, "Ready")["status"] == "False"
            and b
        ),  # type: ignore[index]
        "Ready=False when a replica is not ready",
    )
    assert body["status"]["readyReplicas"] == 2


def test_ready_means_rolled_out(
    kube: Any, namespace: str, operator_process: OperatorProcess, emulator: EmulatorThread
) -> None:
    """A new pod template is not Ready until the StatefulSet controller has seen it and every pod
    runs it: the old status (everything ready, of the old generation) must not count."""
    kube.create(k8s.MAILRELAYS, namespace, mailrelay("edge", replicas=2))
    operator_process.until(lambda: ready_relay(kube, namespace, "edge"), "Ready=True before the change")
    before = kube.get(k8s.STATEFULSETS, namespace, "edge")
    # The controller is busy elsewhere (it has not seen the new generation yet) ...
    emulator.call(lambda: emulator.emulator.unmanaged_namespaces.add(namespace))
    emulator.call(lambda: emulator.emulator.unready_namespaces.add(namespace))  # new pods stay Pending
    kube.merge_patch(
        k8s.MAILRELAYS, namespace, "edge", {"spec": {"listeners": [{"name": "smtp", "port": 2600}]}}
    )

    def ready_reason() -> str:
        found = condition(kube.get(k8s.MAILRELAYS, namespace, "edge"), "Ready") or {}
        return f"{found.get('status')}/{found.get('reason')}/{found.get('message')}"

    reason = operator_process.until(
        lambda: "generation" in ready_reason() and ready_reason(), "Ready=False, unseen"
    )
    assert reason.startswith("False/Progressing/")
    sts = kube.get(k8s.STATEFULSETS, namespace, "edge")
    assert sts["metadata"]["generation"] > before["metadata"]["generation"]
    assert sts["status"] == before["status"]  # all ready and updated, of the old generation
    # ... then it rolls the pods, one at a time; a replaced pod is not ready yet.
    emulator.call(lambda: emulator.emulator.unmanaged_namespaces.discard(namespace))
    emulator.call(emulator.emulator._schedule_controllers)
    rolling = operator_process.until(
        lambda: (
            (s := kube.get(k8s.STATEFULSETS, namespace, "edge")["status"]).get("observedGeneration")
            == sts["metadata"]["generation"]
            and s
        ),
        "the controller to observe the new generation",
    )
    assert rolling["currentRevision"] != rolling["updateRevision"]
    assert ready_reason().startswith("False/Progressing/")
    ready_pod = {"status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}
    for name in ("edge-1", "edge-0"):  # highest ordinal first, as the controller replaces them
        operator_process.until(
            lambda n=name: (p := kube.get(PODS, namespace, n)) and p["status"]["phase"] == "Pending",
            f"{name} replaced at the new revision",
        )
        assert ready_reason().startswith("False/Progressing/")
        kube.merge_patch(PODS, namespace, name, ready_pod, subresource="status")
    operator_process.until(lambda: ready_relay(kube, namespace, "edge"), "Ready=True once rolled out")
    done = kube.get(k8s.STATEFULSETS, namespace, "edge")["status"]
    assert done["currentRevision"] == done["updateRevision"] == rolling["updateRevision"]


def test_routing_loop_is_a_condition_and_an_event(
    kube: Any, namespace: str, operator_process: OperatorProcess
) -> None:
    kube.create(k8s.MAILRELAYS, namespace, mailrelay("a", port=2525))
    kube.create(k8s.MAILRELAYS, namespace, mailrelay("b", port=2526))
    operator_process.until(lambda: converged(kube, namespace, "a"), "MailRelay a to converge")
    good_config = relay_config(kube, namespace, "a")
    kube.create(
        k8s.RELAYROUTES,
        namespace,
        relayroute("a-to-b", "a", {"relay": {"name": "b"}}, domains=["loop.example"]),
    )
    kube.create(
        k8s.RELAYROUTES,
        namespace,
        relayroute("b-to-a", "b", {"relay": {"name": "a"}}, domains=["loop.example"]),
    )

    def looping(name: str) -> dict[str, Any] | None:
        found = condition(kube.get(k8s.MAILRELAYS, namespace, name), "ConfigValid")
        return found if found and found["status"] == "False" else None

    for name in ("a", "b"):
        valid = operator_process.until(lambda n=name: looping(n), f"ConfigValid=False on {name}")
        assert valid["reason"] == "RoutingLoop"
        assert "loop.example" in valid["message"] and (
            "a -> b -> a" in valid["message"] or "b -> a -> b" in valid["message"]
        )
    warnings = operator_process.until(
        lambda: [e for e in events_for(kube, namespace, "a") if e[:2] == ("Warning", "RoutingLoop")],
        "a Warning Event about the loop",
    )
    assert "loop.example" in warnings[0][2]
    # The running relays keep their last good configuration: the loop never reaches them. (The
    # operator may have rolled out a-to-b alone, a valid route, before b-to-a was created.)
    routes = {n: [r["name"] for r in relay_config(kube, namespace, n)["routes"]] for n in ("a", "b")}
    assert not ("a-to-b" in routes["a"] and "b-to-a" in routes["b"]), routes
    if not routes["a"]:
        assert relay_config(kube, namespace, "a") == good_config
    # Fixing the loop makes the config valid again and rolls out the route.
    kube.delete(k8s.RELAYROUTES, namespace, "b-to-a")
    operator_process.until(
        lambda: condition(kube.get(k8s.MAILRELAYS, namespace, "a"), "ConfigValid")["status"] == "True",  # type: ignore[index]
        "ConfigValid=True after the loop is gone",
    )
    operator_process.until(
        lambda: [r["name"] for r in relay_config(kube, namespace, "a")["routes"]] == ["a-to-b"],
        "the route to be rolled out",
    )


def test_unknown_relay_and_conflicting_routes_show_on_the_routes(
    kube: Any, namespace: str, operator_process: OperatorProcess
) -> None:
    kube.create(k8s.MAILRELAYS, namespace, mailrelay("edge"))
    kube.create(
        k8s.RELAYROUTES,
        namespace,
        relayroute("nowhere", "edge", {"relay": {"name": "nosuch"}}, domains=["x.example"]),
    )
    kube.create(
        k8s.RELAYROUTES, namespace, relayroute("one", "edge", {"mx": {}}, domains=["y.example"], priority=5)
    )
    kube.create(
        k8s.RELAYROUTES,
        namespace,
        relayroute("two", "edge", {"mx": {}}, domains=["*.y.example", "y.example"], priority=5),
    )

    def route_condition(name: str, type_: str, status: str) -> dict[str, Any] | None:
        found = condition(kube.get(k8s.RELAYROUTES, namespace, name), type_)
        return found if found and found["status"] == status else None

    resolved = operator_process.until(
        lambda: route_condition("nowhere", "Resolved", "False"), "Resolved=False"
    )
    assert resolved["reason"] == "UnknownRelay" and "nosuch" in resolved["message"]
    for name in ("one", "two"):
        conflicted = operator_process.until(
            lambda n=name: route_condition(n, "Conflicted", "True"), f"{name} Conflicted"
        )
        assert "priority 5" in conflicted["message"]
    operator_process.until(
        lambda: [e for e in events_for(kube, namespace, "nowhere") if e[:2] == ("Warning", "UnknownRelay")],
        "a Warning Event on the route",
    )
    # The relay itself stays valid: matching mail is deferred (451) until the target exists.
    body = operator_process.until(lambda: converged(kube, namespace, "edge"), "MailRelay edge to converge")
    assert condition(body, "ConfigValid")["status"] == "True"  # type: ignore[index]
    route = next(r for r in relay_config(kube, namespace, "edge")["routes"] if r["name"] == "nowhere")
    assert route["nextHop"]["kind"] == "reject" and route["nextHop"]["code"] == 451
    # Creating the relay resolves the route.
    kube.create(k8s.MAILRELAYS, namespace, mailrelay("nosuch", port=2527))
    operator_process.until(
        lambda: route_condition("nowhere", "Resolved", "True"), "Resolved=True once the relay exists"
    )


def test_missing_secret_is_retried_until_it_exists(
    kube: Any, namespace: str, operator_process: OperatorProcess
) -> None:
    listeners = [{"name": "smtp", "port": 2525, "mode": "relay", "tls": "starttls"}]
    kube.create(
        k8s.MAILRELAYS, namespace, mailrelay("edge", listeners=listeners, tls={"secretName": "edge-tls"})
    )

    def invalid() -> dict[str, Any] | None:
        found = condition(kube.get(k8s.MAILRELAYS, namespace, "edge"), "ConfigValid")
        return found if found and found["status"] == "False" else None

    valid = operator_process.until(invalid, "ConfigValid=False while the Secret is missing")

    assert valid["reason"] == "SecretMissing" and "edge-tls" in valid["message"]
    assert kube.get(k8s.STATEFULSETS, namespace, "edge") is None  # nothing rolled out without it
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "edge-tls"},
        "type": "kubernetes.io/tls",
        "data": {"tls.crt": "Y2VydA==", "tls.key": "a2V5"},
    }
    kube.create(k8s.SECRETS, namespace, secret)  # no event reaches the operator: only its retry can see it

    def rolled_out() -> dict[str, Any] | None:
        found = condition(converged(kube, namespace, "edge"), "ConfigValid")
        return found if found and found["status"] == "True" else None

    operator_process.until(rolled_out, "ConfigValid=True and the relay rolled out after the retry")
    sts = kube.get(k8s.STATEFULSETS, namespace, "edge")
    volumes = sts["spec"]["template"]["spec"]["volumes"]
    assert any((v.get("secret") or {}).get("secretName") == "edge-tls" for v in volumes)


def test_deleting_the_mailrelay_removes_its_children(
    kube: Any, namespace: str, operator_process: OperatorProcess
) -> None:
    kube.create(k8s.MAILRELAYS, namespace, mailrelay("edge"))
    operator_process.until(lambda: converged(kube, namespace, "edge"), "MailRelay edge to converge")
    assert all(children(kube, namespace, "edge").values())
    kube.delete(k8s.MAILRELAYS, namespace, "edge")
    operator_process.until(
        lambda: not any(children(kube, namespace, "edge").values()),
        "the garbage collector to remove the children",
    )
    assert kube.get(k8s.MAILRELAYS, namespace, "edge") is None  # no finalizer holds it


def test_drift_of_a_child_is_repaired_by_the_resync(
    kube: Any, namespace: str, operator_process: OperatorProcess
) -> None:
    kube.create(k8s.MAILRELAYS, namespace, mailrelay("edge"))
    operator_process.until(lambda: converged(kube, namespace, "edge"), "MailRelay edge to converge")
    rendered = relay_config(kube, namespace, "edge")
    # Someone edits the ConfigMap by hand; no watch covers ConfigMaps, only the level-triggered
    # resync sees it.
    kube.merge_patch(k8s.CONFIGMAPS, namespace, "edge-config", {"data": {naming.CONFIG_KEY: "hostname: x\n"}})
    operator_process.until(
        lambda: relay_config(kube, namespace, "edge") == rendered, "the ConfigMap restored"
    )


def storage_class(http: RawHttp, name: str, *, expandable: bool) -> str:
    body = {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {"name": name},
        "provisioner": "csi.example.com",
        "allowVolumeExpansion": expandable,
    }
    assert http("POST", "/apis/storage.k8s.io/v1/storageclasses", body)[0] == 201
    return name


def claim_size(kube: Any, namespace: str, name: str) -> tuple[str, str]:
    """(requested, capacity) of a PersistentVolumeClaim."""
    claim = kube.get(PVCS, namespace, name) or {}
    requested = ((claim.get("spec") or {}).get("resources") or {}).get("requests", {}).get("storage", "")
    return str(requested), str(((claim.get("status") or {}).get("capacity") or {}).get("storage", ""))


def template_size(kube: Any, namespace: str) -> str:
    sts = kube.get(k8s.STATEFULSETS, namespace, "edge")
    if sts is None:  # being recreated
        return ""
    return str(sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"])


def applied(kube: Any, namespace: str, status: str, reason: str) -> dict[str, Any] | None:
    found = condition(kube.get(k8s.MAILRELAYS, namespace, "edge"), "Applied")
    return found if found and (found["status"], found["reason"]) == (status, reason) else None


def test_a_bigger_queue_volume_grows_the_claims_and_keeps_the_pods(
    kube: Any, namespace: str, operator_process: OperatorProcess, emulator: EmulatorThread, http: RawHttp
) -> None:
    expandable = storage_class(http, f"{namespace}-expandable", expandable=True)
    storage = {"storage": {"size": "1Gi", "storageClassName": expandable}}
    kube.create(k8s.MAILRELAYS, namespace, mailrelay("edge", replicas=2, queue=storage))
    operator_process.until(lambda: ready_relay(kube, namespace, "edge"), "MailRelay edge to be Ready")
    pods = {p["metadata"]["name"]: p["metadata"]["uid"] for p in kube.list(PODS, namespace)}
    first = kube.get(k8s.STATEFULSETS, namespace, "edge")
    assert claim_size(kube, namespace, "spool-edge-1") == ("1Gi", "1Gi")

    kube.merge_patch(k8s.MAILRELAYS, namespace, "edge", {"spec": {"queue": {"storage": {"size": "2Gi"}}}})
    operator_process.until(lambda: template_size(kube, namespace) == "2Gi", "the new claim template")
    operator_process.until(lambda: ready_relay(kube, namespace, "edge"), "Ready again")
    for claim in ("spool-edge-0", "spool-edge-1"):
        assert claim_size(kube, namespace, claim) == ("2Gi", "2Gi")  # patched, then grown by the resizer
    sts = kube.get(k8s.STATEFULSETS, namespace, "edge")
    assert sts["metadata"]["uid"] != first["metadata"]["uid"]  # recreated ...
    assert {
        p["metadata"]["name"]: p["metadata"]["uid"] for p in kube.list(PODS, namespace)
    } == pods  # ... pods kept
    assert all(
        p["metadata"]["ownerReferences"][0]["uid"] == sts["metadata"]["uid"]
        for p in kube.list(PODS, namespace)
    )
    assert applied(kube, namespace, "True", "Applied")
    changes = [e[2] for e in events_for(kube, namespace, "edge") if e[:2] == ("Normal", "Applied")]
    assert any("resized PersistentVolumeClaim spool-edge-0 to 2Gi" in c for c in changes)

    # Shrinking cannot be done: a lasting condition with both sizes, and nothing changes.
    kube.merge_patch(k8s.MAILRELAYS, namespace, "edge", {"spec": {"queue": {"storage": {"size": "1Gi"}}}})
    found = operator_process.until(
        lambda: applied(kube, namespace, "False", "StorageShrink"), "StorageShrink"
    )
    assert "2Gi" in found["message"] and "1Gi" in found["message"]
    two_more_passes(emulator, operator_process, namespace)
    assert applied(kube, namespace, "False", "StorageShrink")
    assert condition(kube.get(k8s.MAILRELAYS, namespace, "edge"), "Ready")["reason"] == "NotApplied"  # type: ignore[index]
    assert template_size(kube, namespace) == "2Gi" and claim_size(kube, namespace, "spool-edge-0")[0] == "2Gi"
    warnings = [e for e in events_for(kube, namespace, "edge") if e[:2] == ("Warning", "StorageShrink")]
    assert len(warnings) == 1  # when it appears, not on every pass
    # Another class cannot be applied to existing claims either.
    other = {"queue": {"storage": {"size": "2Gi", "storageClassName": "other"}}}
    kube.merge_patch(k8s.MAILRELAYS, namespace, "edge", {"spec": other})
    found = operator_process.until(
        lambda: applied(kube, namespace, "False", "StorageClassChange"), "class change"
    )
    assert expandable in found["message"] and "other" in found["message"]


def test_a_storage_class_without_expansion_is_a_lasting_condition(
    kube: Any, namespace: str, operator_process: OperatorProcess, emulator: EmulatorThread, http: RawHttp
) -> None:
    fixed = storage_class(http, f"{namespace}-fixed", expandable=False)
    storage = {"storage": {"size": "1Gi", "storageClassName": fixed}}
    kube.create(k8s.MAILRELAYS, namespace, mailrelay("edge", queue=storage))
    operator_process.until(lambda: ready_relay(kube, namespace, "edge"), "MailRelay edge to be Ready")
    first = kube.get(k8s.STATEFULSETS, namespace, "edge")
    kube.merge_patch(k8s.MAILRELAYS, namespace, "edge", {"spec": {"queue": {"storage": {"size": "5Gi"}}}})
    found = operator_process.until(
        lambda: applied(kube, namespace, "False", "StorageNotExpandable"), "StorageNotExpandable"
    )
    assert all(part in found["message"] for part in ("spool-edge-0", fixed, "1Gi", "5Gi"))
    two_more_passes(emulator, operator_process, namespace)
    assert applied(kube, namespace, "False", "StorageNotExpandable")
    assert claim_size(kube, namespace, "spool-edge-0")[0] == "1Gi"
    assert kube.get(k8s.STATEFULSETS, namespace, "edge")["metadata"]["uid"] == first["metadata"]["uid"]
    # Back to the size it has: applied again.
    kube.merge_patch(k8s.MAILRELAYS, namespace, "edge", {"spec": {"queue": {"storage": {"size": "1Gi"}}}})
    operator_process.until(lambda: applied(kube, namespace, "True", "Applied"), "Applied=True again")


def test_a_refused_child_is_reported_in_status_and_retried(
    kube: Any, namespace: str, operator_process: OperatorProcess
) -> None:
    """The API server refuses the client Service (an annotation key it does not accept): the
    other children are applied, the status says why, and fixing the spec recovers."""
    service = {"type": "ClusterIP", "annotations": {"not a valid key": "x"}}
    kube.create(k8s.MAILRELAYS, namespace, mailrelay("edge", service=service))
    found = operator_process.until(lambda: applied(kube, namespace, "False", "ApiRejected"), "Applied=False")
    assert "Service edge" in found["message"] and "metadata.annotations" in found["message"]
    assert "422" in found["message"]
    body = kube.get(k8s.MAILRELAYS, namespace, "edge")
    assert condition(body, "ConfigValid")["status"] == "True"  # type: ignore[index]
    assert condition(body, "Ready")["reason"] == "NotApplied"  # type: ignore[index]
    assert kube.get(k8s.STATEFULSETS, namespace, "edge") is not None  # the rest is applied
    assert kube.get(k8s.SERVICES, namespace, "edge") is None
    operator_process.until(
        lambda: [e for e in events_for(kube, namespace, "edge") if e[:2] == ("Warning", "ApiRejected")],
        "a Warning Event",
    )
    fixed = {"spec": {"service": {"annotations": {"not a valid key": None, "lb.example/internal": "true"}}}}
    kube.merge_patch(k8s.MAILRELAYS, namespace, "edge", fixed)
    operator_process.until(lambda: applied(kube, namespace, "True", "Applied"), "Applied=True after the fix")
    assert (
        kube.get(k8s.SERVICES, namespace, "edge")["metadata"]["annotations"]["lb.example/internal"] == "true"
    )


def test_removed_labels_and_annotations_go_away_and_foreign_ones_stay(
    kube: Any, namespace: str, operator_process: OperatorProcess
) -> None:
    service = {"type": "LoadBalancer", "annotations": {"lb.example/internal": "true", "lb.example/keep": "1"}}
    kube.create(k8s.MAILRELAYS, namespace, mailrelay("edge", service=service))
    operator_process.until(lambda: converged(kube, namespace, "edge"), "MailRelay edge to converge")
    foreign = {"metadata": {"annotations": {"team.example/owner": "mail"}, "labels": {"team": "mail"}}}
    kube.merge_patch(k8s.SERVICES, namespace, "edge", foreign)  # kubectl annotate / label
    kube.merge_patch(
        k8s.MAILRELAYS,
        namespace,
        "edge",
        {"spec": {"service": {"annotations": {"lb.example/internal": None}}}},
    )

    def annotations() -> dict[str, str]:
        return dict(kube.get(k8s.SERVICES, namespace, "edge")["metadata"].get("annotations") or {})

    operator_process.until(lambda: "lb.example/internal" not in annotations(), "the removed annotation gone")
    found = kube.get(k8s.SERVICES, namespace, "edge")["metadata"]
    assert found["annotations"]["lb.example/keep"] == "1"
    assert found["annotations"]["team.example/owner"] == "mail" and found["labels"]["team"] == "mail"
    assert found["labels"][naming.LABEL_MANAGED_BY] == naming.MANAGED_BY


def _granted(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {
        (g, r, v)
        for rule in rules
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }


def _used(server: EmulatorThread) -> set[tuple[str, str, str]]:
    return set(
        server.call(lambda: {(g, r, v) for t, g, r, v in server.emulator.usage if t == OPERATOR_TOKEN})
    )


def test_the_operator_needs_exactly_its_rbac_rules(
    emulator: EmulatorThread, operator_process: OperatorProcess, kube: Any, namespace: str, http: RawHttp
) -> None:
    """The operator runs with the chart's cluster-wide RBAC rules (operator/relay_operator/rbac.yaml):
    the emulator answers 403 to anything else, and enforces OwnerReferencesPermissionEnforcement
    (blockOwnerDeletion needs `update` on mailrelays/finalizers). Here it also repairs drift of
    every kind of child (a PUT each) and grows the spool volumes (claims listed and patched, the
    StorageClass read, the StatefulSet deleted and created again), creates a hand-off Secret and
    scales down through a drain Job (pods and Jobs listed, a Job created, a claim deleted), so
    afterwards every granted verb has been used: no rule is superfluous."""
    secret = {"metadata": {"name": "edge-tls"}, "data": {"tls.crt": "Y2VydA==", "tls.key": "a2V5"}}
    kube.create(k8s.SECRETS, namespace, {"apiVersion": "v1", "kind": "Secret", **secret})
    listeners = [{"name": "smtp", "port": 2525, "mode": "relay", "tls": "starttls"}]
    kube.create(k8s.RELAYROUTES, namespace, relayroute("out", "edge", {"mx": {}}, domains=["*"]))
    storage = {
        "storage": {"size": "1Gi", "storageClassName": storage_class(http, f"{namespace}-x", expandable=True)}
    }
    kube.create(
        k8s.MAILRELAYS,
        namespace,
        mailrelay("edge", listeners=listeners, tls={"secretName": "edge-tls"}, queue=storage),
    )
    operator_process.until(lambda: converged(kube, namespace, "edge"), "MailRelay edge to converge")
    live = {kind: child for kind, child in children(kube, namespace, "edge").items() if child}
    assert len(live) == 6
    applied = f"{naming.GROUP}/applied-hash"
    for child in live.values():
        resource = k8s.resource_for(child["apiVersion"], child["kind"])
        patch = {"metadata": {"annotations": {applied: "tampered"}}}
        kube.merge_patch(resource, namespace, child["metadata"]["name"], patch)

    def repaired() -> bool:
        now = children(kube, namespace, "edge")
        return all(
            (child or {}).get("metadata", {}).get("annotations", {}).get(applied)
            == live[kind]["metadata"]["annotations"][applied]
            for kind, child in now.items()
        )

    operator_process.until(repaired, "the resync to restore every child")
    kube.merge_patch(k8s.MAILRELAYS, namespace, "edge", {"spec": {"queue": {"storage": {"size": "2Gi"}}}})
    operator_process.until(lambda: template_size(kube, namespace) == "2Gi", "the spool volumes to grow")
    # A scale-down whose drain times out: pods listed (their queues), a drain Job listed and
    # created for the removed pod's claim, the claim deleted once the Job succeeded.
    other = f"{namespace}-drain"
    assert http("POST", "/api/v1/namespaces", {"metadata": {"name": other}})[0] == 201
    force_claim_drain(kube, other, operator_process)
    assert emulator.call(lambda: [d for d in emulator.emulator.denied if d[0] == OPERATOR_TOKEN]) == []
    granted = _granted(operator_rules(all_namespaces=True, peering=False)[0])
    assert _used(emulator) == granted
    assert ("mailrelay.dev", "mailrelays/finalizers", "update") in granted  # asked by the admission plugin


def test_namespace_scoped_operator_leaves_other_namespaces_alone(tmp_path: Path) -> None:
    """`mailrelay operator --namespace mail` on its own API server: it reconciles `mail` only."""
    cluster_rules, role_rules = operator_rules(all_namespaces=False, peering=False)
    grants = {OPERATOR_TOKEN: [*cluster_rules, *role_rules]}  # the emulator binds rules everywhere
    with EmulatorThread(KubernetesApiEmulator(token=TOKEN, grants=grants)) as server:
        server.call(lambda: server.emulator.load_crds(CRDS))
        with_namespaces(server, "mail", "other")
        admin = admin_of(server, tmp_path)
        config = server.kubeconfig(tmp_path / "operator", token=OPERATOR_TOKEN)
        process = OperatorProcess(config, tmp_path / "operator.log", "--namespace", "mail")
        try:
            process.wait_alive()
            for namespace in ("other", "mail"):
                admin.create(k8s.MAILRELAYS, namespace, mailrelay("edge"))
            process.until(lambda: converged(admin, "mail", "edge"), "the relay in the watched namespace")
            # The watched namespace converged after `other` got its MailRelay: nothing there.
            assert admin.get(k8s.STATEFULSETS, "other", "edge") is None
            assert not (admin.get(k8s.MAILRELAYS, "other", "edge") or {}).get("status")
            assert server.call(lambda: list(server.emulator.denied)) == []
            assert ("", "namespaces", "watch") in _used(server)  # what namespaceScoped is for
        finally:
            assert process.stop() == 0, process.tail()
            admin.close()


# --------------------------------------------------------------------------- the API as a cluster runs it


@pytest.fixture()
def quiet(tmp_path: Path) -> Iterator[tuple[EmulatorThread, Any]]:
    """An API server of its own, where no operator runs (the reconcile path is called directly)
    and no StatefulSet controller writes status; with an administrator's client."""
    grants = {OPERATOR_TOKEN: operator_rules(all_namespaces=True, peering=False)[0]}
    with EmulatorThread(KubernetesApiEmulator(token=TOKEN, grants=grants, controllers=False)) as server:
        server.call(lambda: server.emulator.load_crds(CRDS))
        admin = admin_of(server, tmp_path)
        try:
            yield server, admin
        finally:
            admin.close()


def test_without_finalizer_rights_every_child_is_refused_and_the_status_says_so(
    quiet: tuple[EmulatorThread, Any], tmp_path: Path
) -> None:
    """OwnerReferencesPermissionEnforcement on, the operator's role without mailrelays/finalizers:
    every child is refused 403; the pass records it (Applied=False, ApiRejected, the server's
    message), writes status and asks for a retry; with the rule it converges."""
    server, kube = quiet
    rules = operator_rules(all_namespaces=True, peering=False)[0]
    without = [r for r in rules if "mailrelays/finalizers" not in r["resources"]]
    server.call(lambda: server.emulator.grants.update({OPERATOR_TOKEN: without}))
    operator = k8s.ClientKubeApi.from_environment(
        kubeconfig=str(server.kubeconfig(tmp_path / "operator", token=OPERATOR_TOKEN))
    )
    try:
        kube.create(k8s.MAILRELAYS, "default", mailrelay("edge"))
        outcome = reconcile.reconcile_namespace(operator, "default")
        retry = outcome.relays["edge"].retry
        assert retry and "blockOwnerDeletion" in retry
        body = kube.get(k8s.MAILRELAYS, "default", "edge")
        found = condition(body, "Applied")
        assert found is not None and (found["status"], found["reason"]) == ("False", "ApiRejected")
        assert "403" in found["message"] and "mailrelays/finalizers" in found["message"]
        assert condition(body, "Ready")["reason"] == "NotApplied"  # type: ignore[index]
        assert all(child is None for child in children(kube, "default", "edge").values())
        assert [e[:2] for e in events_for(kube, "default", "edge")] == [("Warning", "ApiRejected")]
        # The administrator grants the rule; the retry converges.
        server.call(lambda: server.emulator.grants.update({OPERATOR_TOKEN: rules}))
        outcome = reconcile.reconcile_namespace(operator, "default")
        assert outcome.relays["edge"].retry is None
        assert all(children(kube, "default", "edge").values())
        assert condition(kube.get(k8s.MAILRELAYS, "default", "edge"), "Applied")["status"] == "True"  # type: ignore[index]
    finally:
        operator.close()


def test_a_conflicting_write_is_retried_with_the_new_version(quiet: tuple[EmulatorThread, Any]) -> None:
    """Someone changes the ConfigMap between the operator's read and its replace: the server
    answers 409 Conflict, the pass reads again and replaces the new version, keeping that
    writer's label."""
    emulator, kube = quiet
    namespace = "default"
    kube.create(k8s.MAILRELAYS, namespace, mailrelay("edge"))
    reconcile.reconcile_namespace(kube, namespace)
    kube.merge_patch(k8s.CONFIGMAPS, namespace, "edge-config", {"data": {naming.CONFIG_KEY: "drifted\n"}})
    path = f"/api/v1/namespaces/{namespace}/configmaps/edge-config"
    raced: list[str] = []

    def interloper(method: str, request_path: str) -> None:
        if method == "PUT" and request_path == path and not raced:
            key = ("", "configmaps", namespace, "edge-config")
            live = copy.deepcopy(emulator.emulator.objects[key])
            live["metadata"].setdefault("labels", {})["raced"] = "yes"
            emulator.emulator._replace(emulator.emulator.types[("", "v1", "configmaps")], key, live)
            raced.append(live["metadata"]["resourceVersion"])

    emulator.call(lambda: setattr(emulator.emulator, "before_write", interloper))
    start = emulator.call(lambda: len(emulator.emulator.calls))
    try:
        outcome = reconcile.reconcile_namespace(kube, namespace)
    finally:
        emulator.call(lambda: setattr(emulator.emulator, "before_write", None))
    puts = emulator.call(lambda: [c for c in emulator.emulator.calls[start:] if c[1:3] == ("PUT", path)])
    assert raced and len(puts) == 2  # the first answered 409, the second went through
    assert "updated ConfigMap edge-config" in outcome.relays["edge"].changes
    configmap = kube.get(k8s.CONFIGMAPS, namespace, "edge-config")
    assert (
        configmap["data"][naming.CONFIG_KEY] != "drifted\n"
        and configmap["metadata"]["labels"]["raced"] == "yes"
    )


def test_the_reconcile_path_lists_in_pages(quiet: tuple[EmulatorThread, Any]) -> None:
    emulator, kube = quiet
    namespace = "default"
    kube.create(k8s.MAILRELAYS, namespace, mailrelay("edge"))
    for index in range(5):
        kube.create(
            k8s.RELAYROUTES,
            namespace,
            relayroute(f"r{index}", "edge", {"mx": {}}, domains=[f"d{index}.example"]),
        )
    paged = k8s.ClientKubeApi(kube._client, page_size=2)
    start = emulator.call(lambda: len(emulator.emulator.calls))
    reconcile.reconcile_namespace(paged, namespace)
    lists = emulator.call(
        lambda: [
            q for _t, m, p, q in emulator.emulator.calls[start:] if m == "GET" and p.endswith("/relayroutes")
        ]
    )
    assert len(lists) == 3 and "continue=" in lists[2]
    assert len(relay_config(kube, namespace, "edge")["routes"]) == 5  # every page's routes


def test_an_expired_watch_is_relisted(
    emulator: EmulatorThread, operator_process: OperatorProcess, kube: Any, namespace: str
) -> None:
    """The server ends kopf's watches with 410 Gone (its cache moved on): kopf lists again, in
    pages, and sees what changed meanwhile."""
    kube.create(k8s.MAILRELAYS, namespace, mailrelay("edge"))
    operator_process.until(lambda: converged(kube, namespace, "edge"), "MailRelay edge to converge")
    relays = f"/apis/{naming.API_VERSION}/mailrelays"

    def lists() -> list[str]:
        return list(
            emulator.call(
                lambda: [
                    q
                    for t, m, p, q in emulator.emulator.calls
                    if t == OPERATOR_TOKEN and m == "GET" and p == relays and "watch=" not in q
                ]
            )
        )

    before = len(lists())

    def expire_and_change() -> int:
        ended = emulator.emulator.expire_watches()
        key = (naming.GROUP, naming.MAILRELAY_PLURAL, namespace, "edge")
        body = copy.deepcopy(emulator.emulator.objects[key])
        body["spec"]["replicas"] = 2
        emulator.emulator._replace(emulator.emulator._rt_of(key), key, body)
        return ended

    assert emulator.call(expire_and_change) >= 1
    operator_process.until(lambda: len(lists()) > before, "kopf to list MailRelays again")
    assert all("limit=500" in q for q in lists()[before:])
    operator_process.until(
        lambda: kube.get(k8s.STATEFULSETS, namespace, "edge")["spec"]["replicas"] == 2, "the change applied"
    )


def with_namespaces(server: EmulatorThread, *names: str) -> RawHttp:
    """Create the namespaces (201 each); a raw HTTP client of the emulator."""
    http = RawHttp(server.url)
    for name in names:
        assert http("POST", "/api/v1/namespaces", {"metadata": {"name": name}})[0] == 201
    return http


def admin_of(server: EmulatorThread, tmp_path: Path) -> k8s.ClientKubeApi:
    """A client of the emulator with the admin token."""
    return k8s.ClientKubeApi.from_environment(kubeconfig=str(server.kubeconfig(tmp_path / "admin")))


def operator_of(server: EmulatorThread, tmp_path: Path) -> OperatorProcess:
    """The operator run with its own token, logging to tmp_path/op.log."""
    return OperatorProcess(
        server.kubeconfig(tmp_path / "operator", token=OPERATOR_TOKEN), tmp_path / "op.log"
    )


def test_the_lowest_supported_kubernetes_version(tmp_path: Path) -> None:
    """Kubernetes 1.25 (the floor README and the chart claim): the server drops the StatefulSet's
    persistentVolumeClaimRetentionPolicy, so the operator must not send it, or every resync would
    see drift and replace the StatefulSet."""
    grants = {OPERATOR_TOKEN: operator_rules(all_namespaces=True, peering=False)[0]}
    with EmulatorThread(KubernetesApiEmulator(token=TOKEN, grants=grants, version="1.25")) as server:
        server.call(lambda: server.emulator.load_crds(CRDS))
        admin = admin_of(server, tmp_path)
        process = operator_of(server, tmp_path)
        try:
            process.wait_alive()
            admin.create(k8s.MAILRELAYS, "default", mailrelay("edge"))
            process.until(lambda: ready_relay(admin, "default", "edge"), "Ready on 1.25")
            sts_path = "/apis/apps/v1/namespaces/default/statefulsets/edge"

            def reads() -> int:
                return int(
                    server.call(lambda: sum(1 for c in server.emulator.calls if c[1:3] == ("GET", sts_path)))
                )

            seen = reads()
            process.until(lambda: reads() >= seen + 2, "two more reconcile passes (resyncs)", timeout=15)
            writes = server.call(
                lambda: [c for c in server.emulator.calls if c[2] == sts_path and c[1] != "GET"]
            )
            assert writes == []
            assert (
                "persistentVolumeClaimRetentionPolicy"
                not in admin.get(k8s.STATEFULSETS, "default", "edge")["spec"]
            )
            assert server.call(lambda: list(server.emulator.denied)) == []
        finally:
            assert process.stop() == 0, process.tail()
            admin.close()


def test_after_uninstall_mailrelays_their_namespace_and_the_crd_can_be_deleted(tmp_path: Path) -> None:
    """No finalizer of the operator stays on a MailRelay (kopf adds none: no handler needs one,
    and it removes the one an older version left), so once the operator is gone (helm uninstall),
    deleting a namespace with MailRelays, and the CRD, completes."""
    grants = {OPERATOR_TOKEN: operator_rules(all_namespaces=True, peering=False)[0]}
    with EmulatorThread(KubernetesApiEmulator(token=TOKEN, grants=grants)) as server:
        server.call(lambda: server.emulator.load_crds(CRDS))
        http = with_namespaces(server, "mail", "more")
        admin = admin_of(server, tmp_path)
        old = mailrelay("old")
        old["metadata"]["finalizers"] = [f"{naming.GROUP}/operator"]  # what the per-MailRelay timer left
        admin.create(k8s.MAILRELAYS, "more", old)
        process = operator_of(server, tmp_path)
        try:
            process.wait_alive()
            admin.create(k8s.MAILRELAYS, "mail", mailrelay("edge"))
            process.until(lambda: converged(admin, "mail", "edge"), "MailRelay edge to converge")
            process.until(
                lambda: not admin.get(k8s.MAILRELAYS, "more", "old")["metadata"].get("finalizers"),
                "kopf to remove the finalizer it no longer needs",
            )
            assert not admin.get(k8s.MAILRELAYS, "mail", "edge")["metadata"].get("finalizers")
        finally:
            assert process.stop() == 0, process.tail()  # helm uninstall
        assert http("DELETE", "/api/v1/namespaces/mail")[0] == 202
        wait_for(lambda: http("GET", "/api/v1/namespaces/mail")[0] == 404, what="the namespace to go")
        crd = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/mailrelays.mailrelay.dev"
        assert http("DELETE", crd)[0] == 202
        wait_for(lambda: http("GET", crd)[0] == 404, what="the CRD to go")
        assert admin.get(k8s.MAILRELAYS, "more", "old") is None
        admin.close()


def test_two_peered_operators_only_the_higher_priority_one_acts(tmp_path: Path) -> None:
    """Two replicas with --peering: the one that started first acts alone, then pauses (kopf's
    handlers and its resync loop alike) when one of a higher priority joins, and takes over
    again when that one stops."""
    cluster_rules = operator_rules(all_namespaces=True, peering=True)[0]
    grants = {"high": cluster_rules, "low": cluster_rules}
    with EmulatorThread(KubernetesApiEmulator(token=TOKEN, grants=grants)) as server:
        server.call(lambda: server.emulator.load_crds(CRDS))
        server.call(lambda: server.emulator.load_crds(CRDS.parent / "charts" / "mailrelay" / "crds"))
        http = RawHttp(server.url)
        peering = {
            "apiVersion": "kopf.dev/v1",
            "kind": "ClusterKopfPeering",
            "metadata": {"name": "mailrelay"},
        }
        assert http("POST", "/apis/kopf.dev/v1/clusterkopfpeerings", peering)[0] == 201
        admin = admin_of(server, tmp_path)
        sts_path = "/apis/apps/v1/namespaces/default/statefulsets/edge"

        def operator(token: str, priority: int) -> OperatorProcess:
            config = server.kubeconfig(tmp_path / token, token=token)
            return OperatorProcess(config, tmp_path / f"{token}.log", peering=("mailrelay", priority))

        def calls(token: str) -> list[tuple[str, str]]:
            return list(server.call(lambda: [(m, p) for t, m, p, _q in server.emulator.calls if t == token]))

        def replicas() -> int:
            return int(admin.get(k8s.STATEFULSETS, "default", "edge")["spec"]["replicas"])

        low = operator("low", 0)
        high: OperatorProcess | None = None
        try:
            low.wait_alive()
            admin.create(k8s.MAILRELAYS, "default", mailrelay("edge"))
            low.until(lambda: converged(admin, "default", "edge"), "the only operator to converge")
            high = operator("high", 10)
            high.wait_alive()
            low.until(
                lambda: "Pausing operations in favour of" in low.log.read_text(), "the low one to pause"
            )
            paused_at = len(calls("low"))
            admin.merge_patch(k8s.MAILRELAYS, "default", "edge", {"spec": {"replicas": 2}})
            high.until(lambda: replicas() == 2, "the high-priority operator to apply the change")
            seen = sum(1 for c in calls("high") if c[1] == sts_path)
            high.until(
                lambda: sum(1 for c in calls("high") if c[1] == sts_path) >= seen + 2,
                "two more passes of the high-priority operator (at least one a resync)",
            )
            # The paused replica knows the namespace (it reconciled it) but its resync loop, like
            # kopf, stays quiet: it ticks, sees the peer, and asks nothing in the namespace.
            low.until(lambda: "resync paused" in low.log.read_text(), "the low one's resync loop to tick")
            assert [c for c in calls("low")[paused_at:] if "/namespaces/default/" in c[1]] == []
            assert high.stop() == 0, high.tail()
            admin.merge_patch(k8s.MAILRELAYS, "default", "edge", {"spec": {"replicas": 3}})
            low.until(lambda: replicas() == 3, "the low-priority operator to take over", timeout=60)
        finally:
            if high is not None:
                high.stop()
            assert low.stop() == 0, low.tail()
            admin.close()


def test_dkim_keys_are_checked_mounted_and_their_records_published(
    kube: Any, namespace: str, operator_process: OperatorProcess
) -> None:
    kube.create(k8s.MAILRELAYS, namespace, mailrelay("edge"))
    route = relayroute("signed", "edge", {"mx": {}}, domains=["*"])
    route["spec"]["dkim"] = [
        {"domain": "example.com", "selector": "s1", "privateKeySecretRef": {"name": "dkim-s1"}},
    ]
    kube.create(k8s.RELAYROUTES, namespace, route)
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "dkim-s1"},
        "data": {"private.key": base64.b64encode(b"-----BEGIN PRIVATE KEY-----\nno\n").decode()},
    }
    kube.create(k8s.SECRETS, namespace, secret)

    def valid_is(value: str) -> Any:
        def check() -> dict[str, Any] | None:
            found = condition(kube.get(k8s.MAILRELAYS, namespace, "edge"), "ConfigValid")
            return found if found and found["status"] == value else None

        return check

    invalid = operator_process.until(valid_is("False"), "ConfigValid=False for an invalid DKIM key")
    assert invalid["reason"] == "DkimKeyInvalid" and "dkim-s1" in invalid["message"]
    status = operator_process.until(
        lambda: (kube.get(k8s.RELAYROUTES, namespace, "signed") or {}).get("status", {}).get("dkim"),
        "status.dkim on the route",
    )
    assert "not a PEM private key" in status[0]["error"] and "dnsRecord" not in status[0]
    assert kube.get(k8s.STATEFULSETS, namespace, "edge") is None

    pem = generate_key("rsa-sha256")
    live = kube.get(k8s.SECRETS, namespace, "dkim-s1")
    live["data"] = {"private.key": base64.b64encode(pem).decode()}
    kube.replace(k8s.SECRETS, namespace, "dkim-s1", live)
    operator_process.until(valid_is("True"), "ConfigValid=True once the key is valid")
    name, value = public_record(pem, "rsa-sha256", "s1", "example.com")

    def published() -> list[dict[str, Any]] | None:
        records = ((kube.get(k8s.RELAYROUTES, namespace, "signed") or {}).get("status") or {}).get("dkim")
        return records if records and "dnsRecord" in records[0] else None

    records = operator_process.until(published, "the DNS record in status.dkim")
    assert records == [
        {
            "domain": "example.com",
            "selector": "s1",
            "algorithm": "rsa-sha256",
            "active": True,
            "dnsRecord": {"name": name, "type": "TXT", "value": value},
        }
    ]
    [rendered] = relay_config(kube, namespace, "edge")["routes"][0]["dkim"]
    assert rendered["keyFile"].endswith("/dkim-s1/private.key") and rendered["active"] is True
    sts = operator_process.until(lambda: kube.get(k8s.STATEFULSETS, namespace, "edge"), "the StatefulSet")
    volumes = sts["spec"]["template"]["spec"]["volumes"]
    assert any((v.get("secret") or {}).get("secretName") == "dkim-s1" for v in volumes)


def _scrape(port: int) -> dict[str, float]:
    """The operator's /metrics as {'name{labels}': value} (prometheus_client's own parser)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def test_operator_metrics_count_passes_writes_and_relays_by_condition(
    kube: Any, namespace: str, operator_process: OperatorProcess
) -> None:
    kube.create(k8s.MAILRELAYS, namespace, mailrelay("metered"))
    operator_process.until(lambda: converged(kube, namespace, "metered"), "the relay converged")

    def relay_seen() -> dict[str, float] | None:
        samples = _scrape(operator_process.metrics_port)
        key = (
            "mailrelay_operator_relay_condition{condition=ConfigValid,relay=metered,"
            f"relay_namespace={namespace},status=True}}"
        )
        return samples if samples.get(key) == 1 else None

    samples = operator_process.until(relay_seen, "the relay in the operator's metrics")
    assert samples["mailrelay_operator_reconciles_total{result=ok}"] >= 1
    assert samples["mailrelay_operator_reconcile_duration_seconds_count{}"] >= 1
    assert samples["mailrelay_operator_objects_written_total{action=created,kind=StatefulSet}"] >= 1
    assert samples["mailrelay_operator_objects_written_total{action=created,kind=ConfigMap}"] >= 1
    assert samples["mailrelay_operator_relays{condition=ConfigValid,status=True}"] >= 1
    assert any(
        key.startswith("mailrelay_operator_relay_condition{condition=Ready,relay=metered,") for key in samples
    )

    kube.delete(k8s.MAILRELAYS, namespace, "metered")

    def relay_gone() -> bool | None:
        samples = _scrape(operator_process.metrics_port)
        return True if not any(",relay=metered," in key for key in samples) else None

    operator_process.until(relay_gone, "the deleted relay gone from the operator's metrics")
