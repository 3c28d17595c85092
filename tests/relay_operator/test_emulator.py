"""The Kubernetes API emulator is only useful if it is honest: these tests pin the API-server
behaviour the operator's end-to-end tests rely on (see k8s_emulator's docstring), and the
operator's adapter (relay_operator.k8s) against it."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.relay_operator.conftest import TOKEN, RawHttp, wait_for
from tests.relay_operator.k8s_emulator import (
    EmulatorThread,
    KubernetesApiEmulator,
    canonicalize_pod_quantities,
)

WIDGET_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.test.example"},
    "spec": {
        "group": "test.example",
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "shortNames": ["wd"]},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "subresources": {
                    "status": {},
                    "scale": {
                        "specReplicasPath": ".spec.replicas",
                        "statusReplicasPath": ".status.replicas",
                        "labelSelectorPath": ".status.selector",
                    },
                },
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "properties": {
                                    "replicas": {"type": "integer", "minimum": 0, "default": 1},
                                    "colour": {"type": "string", "enum": ["red", "blue"]},
                                },
                            },
                            "status": {
                                "type": "object",
                                "properties": {
                                    "replicas": {"type": "integer"},
                                    "selector": {"type": "string"},
                                    "note": {"type": "string"},
                                },
                            },
                        },
                    }
                },
            }
        ],
    },
}
WIDGETS = "/apis/test.example/v1"


@pytest.fixture(scope="module")
def widgets(emulator: EmulatorThread) -> None:
    status, _ = RawHttp(emulator.url)(
        "POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", WIDGET_CRD
    )
    assert status in (201, 409)


def cm(name: str, **labels: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": labels}, "data": {"k": "v"}}


def test_create_stamps_server_metadata_and_answers_201(http: RawHttp, namespace: str) -> None:
    status, first = http("POST", f"/api/v1/namespaces/{namespace}/configmaps", cm("a"))
    assert status == 201
    meta = first["metadata"]
    assert meta["uid"] and meta["creationTimestamp"] and meta["generation"] == 1
    assert first["kind"] == "ConfigMap" and first["apiVersion"] == "v1"
    status, second = http("POST", f"/api/v1/namespaces/{namespace}/configmaps", cm("b"))
    assert int(second["metadata"]["resourceVersion"]) > int(meta["resourceVersion"])
    assert second["metadata"]["uid"] != meta["uid"]
    status, again = http("POST", f"/api/v1/namespaces/{namespace}/configmaps", cm("a"))
    assert status == 409 and again["reason"] == "AlreadyExists"
    status, _missing = http("POST", "/api/v1/namespaces/nowhere/configmaps", cm("a"))
    assert status == 404


def test_generate_name_gives_distinct_names(http: RawHttp, namespace: str) -> None:
    names = set()
    for _ in range(3):
        status, body = http(
            "POST",
            f"/api/v1/namespaces/{namespace}/events",
            {"metadata": {"generateName": "x."}, "reason": "R", "involvedObject": {"kind": "Pod"}},
        )
        assert status == 201
        names.add(body["metadata"]["name"])
    assert len(names) == 3 and all(n.startswith("x.") for n in names)


def statefulset(name: str, replicas: int = 1, **container: Any) -> dict[str, Any]:
    """A StatefulSet body a real server accepts."""
    labels = {"app": name}
    return {
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "serviceName": name,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "c", "image": "i", **container}]},
            },
        },
    }


def test_writes_change_resource_version_and_generation_honestly(
    http: RawHttp, namespace: str, emulator: EmulatorThread
) -> None:
    emulator.call(lambda: emulator.emulator.unmanaged_namespaces.add(namespace))  # status by hand
    path = f"/apis/apps/v1/namespaces/{namespace}/statefulsets"
    _, sts = http("POST", path, statefulset("s"))
    rv, item = sts["metadata"]["resourceVersion"], f"{path}/s"
    merge = "application/merge-patch+json"
    # A no-op patch changes nothing, not even the resourceVersion.
    _, same = http("PATCH", item, {"spec": {"replicas": 1}}, merge)
    assert same["metadata"]["resourceVersion"] == rv
    # Metadata changes bump the resourceVersion but not the generation.
    _, labelled = http("PATCH", item, {"metadata": {"labels": {"a": "b"}}}, merge)
    assert labelled["metadata"]["generation"] == 1
    assert int(labelled["metadata"]["resourceVersion"]) > int(rv)
    # Spec changes bump both; status written to the main resource is ignored.
    _, scaled = http("PATCH", item, {"spec": {"replicas": 3}, "status": {"readyReplicas": 3}}, merge)
    assert scaled["metadata"]["generation"] == 2 and "readyReplicas" not in scaled.get("status", {})
    # The status subresource changes only status.
    _, ready = http(
        "PATCH", f"{item}/status", {"spec": {"replicas": 9}, "status": {"readyReplicas": 3}}, merge
    )
    assert ready["status"] == {"readyReplicas": 3} and ready["spec"]["replicas"] == 3
    assert ready["metadata"]["generation"] == 2
    # Fields other than replicas, template, updateStrategy, ... cannot change.
    status, frozen = http("PATCH", item, {"spec": {"serviceName": "other"}}, merge)
    assert status == 422 and "Forbidden" in frozen["message"]
    # A stale resourceVersion is a conflict.
    stale = dict(ready, metadata=dict(ready["metadata"], resourceVersion=rv))
    status, conflict = http("PUT", item, stale)
    assert status == 409 and conflict["reason"] == "Conflict"


@pytest.mark.parametrize(
    ("written", "stored"),
    [
        ("0.5", "500m"),
        ("1.5", "1500m"),
        ("1000", "1k"),
        ("1024Mi", "1Gi"),
        ("1.5Gi", "1536Mi"),
        ("0.5Gi", "512Mi"),
        (1073741824, "1073741824"),
        ("12e6", "12e6"),
        ("250m", "250m"),
        ("0", "0"),
    ],
)
def test_statefulset_quantities_are_stored_in_canonical_form(written: Any, stored: str) -> None:
    """As the API server's typed decoding does for resources of pods and claim templates."""
    sts = {
        "spec": {
            "template": {"spec": {"containers": [{"name": "c", "resources": {"limits": {"cpu": written}}}]}},
            "volumeClaimTemplates": [{"spec": {"resources": {"requests": {"storage": written}}}}],
        }
    }
    canonicalize_pod_quantities(sts)
    assert sts["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] == stored
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == stored


def test_statefulset_writes_store_canonical_quantities(
    http: RawHttp, namespace: str, emulator: EmulatorThread
) -> None:
    emulator.call(lambda: emulator.emulator.unmanaged_namespaces.add(namespace))
    path = f"/apis/apps/v1/namespaces/{namespace}/statefulsets"
    body = statefulset("q", resources={"requests": {"cpu": "0.5", "memory": "1024Mi"}})
    status, created = http("POST", path, body)
    assert status == 201
    assert created["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"] == {
        "cpu": "500m",
        "memory": "1Gi",
    }
    # Writing the same amounts in another spelling is a no-op: nothing changes, not even the version.
    _, again = http("PUT", f"{path}/q", dict(body, metadata=created["metadata"]))
    assert again["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]


def test_merge_and_json_patch_including_test_op(http: RawHttp, namespace: str) -> None:
    item = f"/api/v1/namespaces/{namespace}/configmaps/p"
    http("POST", f"/api/v1/namespaces/{namespace}/configmaps", cm("p"))
    _, removed = http("PATCH", item, {"data": {"k": None, "n": "1"}}, "application/merge-patch+json")
    assert removed["data"] == {"n": "1"}
    ops = [
        {"op": "test", "path": "/data/n", "value": "1"},
        {"op": "replace", "path": "/data/n", "value": "2"},
    ]
    status, patched = http("PATCH", item, ops, "application/json-patch+json")
    assert status == 200 and patched["data"] == {"n": "2"}
    status, _failed = http("PATCH", item, ops, "application/json-patch+json")  # the test now fails
    assert status == 422
    status, _ = http("PATCH", item, {"data": {}}, "application/strategic-merge-patch+json")
    assert status == 415
    status, _ = http("PATCH", item, {"data": {}}, "application/apply-patch+yaml")
    assert status == 415


def test_lists_carry_kind_and_honour_label_selectors(http: RawHttp, namespace: str) -> None:
    base = f"/api/v1/namespaces/{namespace}/configmaps"
    http("POST", base, cm("one", tier="a", relay="edge"))
    http("POST", base, cm("two", tier="b"))
    http("POST", base, cm("three"))
    _, listed = http("GET", base)
    assert listed["kind"] == "ConfigMapList" and listed["metadata"]["resourceVersion"]

    def names(selector: str) -> list[str]:
        _, body = http("GET", f"{base}?labelSelector={selector}")
        return sorted(item["metadata"]["name"] for item in body["items"])

    assert names("tier%3Da") == ["one"]
    assert names("tier%20in%20(a,b)") == ["one", "two"]
    assert names("tier") == ["one", "two"]
    assert names("!tier") == ["three"]
    assert names("tier!%3Da") == ["three", "two"]
    assert names("tier%3Da,relay%3Dedge") == ["one"]
    _, field = http("GET", f"{base}?fieldSelector=metadata.name%3Dtwo")
    assert [i["metadata"]["name"] for i in field["items"]] == ["two"]


def test_watch_resumes_from_a_resource_version_and_applies_selectors(
    http: RawHttp, namespace: str, emulator: EmulatorThread
) -> None:
    base = f"/api/v1/namespaces/{namespace}/configmaps"
    _, first = http("POST", base, cm("w1", keep="yes"))
    start = first["metadata"]["resourceVersion"]
    http("PATCH", f"{base}/w1", {"data": {"k": "2"}}, "application/merge-patch+json")
    http("PATCH", f"{base}/w1", {"metadata": {"labels": {"keep": None}}}, "application/merge-patch+json")
    http("DELETE", f"{base}/w1")
    events = http.watch(f"{base}?resourceVersion={start}", count=3)
    assert [e["type"] for e in events] == ["MODIFIED", "MODIFIED", "DELETED"]
    selected = http.watch(f"{base}?resourceVersion={start}&labelSelector=keep%3Dyes", count=2)
    # Leaving the selector looks like a deletion to this watcher; the real deletion is not seen.
    assert [e["type"] for e in selected] == ["MODIFIED", "DELETED"]
    emulator.call(emulator.emulator.compact)
    expired = http.watch(f"{base}?resourceVersion={start}", count=1)
    assert expired[0]["type"] == "ERROR" and expired[0]["object"]["code"] == 410


def test_watch_without_version_lists_then_streams_live(
    http: RawHttp, namespace: str, emulator: EmulatorThread
) -> None:
    import threading

    base = f"/api/v1/namespaces/{namespace}/configmaps"
    http("POST", base, cm("existing"))
    result: list[dict[str, Any]] = []
    watcher = threading.Thread(target=lambda: result.extend(http.watch(base, count=2)))
    watcher.start()
    wait_for(lambda: emulator.call(lambda: bool(emulator.emulator.watchers)), what="the watch to start")
    http("POST", base, cm("live"))
    watcher.join(10)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in result] == [
        ("ADDED", "existing"),
        ("ADDED", "live"),
    ]


def test_finalizers_hold_deletion_until_removed(http: RawHttp, namespace: str) -> None:
    base = f"/api/v1/namespaces/{namespace}/configmaps"
    http("POST", base, {"metadata": {"name": "f", "finalizers": ["test/hold"]}})
    status, marked = http("DELETE", f"{base}/f")
    assert status == 202 and marked["metadata"]["deletionTimestamp"]
    assert http("GET", f"{base}/f")[0] == 200
    ops = [
        {"op": "test", "path": "/metadata/finalizers", "value": ["test/hold"]},
        {"op": "remove", "path": "/metadata/finalizers/0"},
    ]
    assert http("PATCH", f"{base}/f", ops, "application/json-patch+json")[0] == 200
    assert http("GET", f"{base}/f")[0] == 404


def test_garbage_collection_follows_owner_uids(http: RawHttp, namespace: str) -> None:
    base = f"/api/v1/namespaces/{namespace}/configmaps"
    _, owner = http("POST", base, cm("owner"))
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner["metadata"]["uid"]}
    http("POST", base, {"metadata": {"name": "child", "ownerReferences": [ref]}})
    http("POST", base, {"metadata": {"name": "sibling", "ownerReferences": [ref]}})
    bad = dict(ref, uid="00000000-0000-0000-0000-000000000000")
    http("POST", base, {"metadata": {"name": "dangling", "ownerReferences": [bad]}})
    wait_for(lambda: http("GET", f"{base}/dangling")[0] == 404, what="the dangling dependent to be collected")
    assert http("GET", f"{base}/child")[0] == 200
    status, _invalid = http("POST", base, {"metadata": {"name": "x", "ownerReferences": [{"name": "owner"}]}})
    assert status == 422
    # Background deletion of the owner takes every dependent with it ...
    status, _ = http("DELETE", f"{base}/owner", {"propagationPolicy": "Background"})
    assert status == 200
    wait_for(lambda: http("GET", f"{base}/child")[0] == 404, what="the dependent to be collected")
    assert http("GET", f"{base}/sibling")[0] == 404
    # ... while the Orphan policy only cuts the owner references.
    _, owner2 = http("POST", base, cm("owner2"))
    ref2 = dict(ref, name="owner2", uid=owner2["metadata"]["uid"])
    http("POST", base, {"metadata": {"name": "kept", "ownerReferences": [ref2]}})
    http("DELETE", f"{base}/owner2", {"propagationPolicy": "Orphan"})
    _, kept = http("GET", f"{base}/kept")
    assert "ownerReferences" not in kept["metadata"]


def test_custom_resources_get_discovery_schema_status_and_scale(
    http: RawHttp, namespace: str, widgets: None
) -> None:
    _, discovery = http("GET", WIDGETS)
    names = {r["name"]: r for r in discovery["resources"]}
    assert names["widgets"]["kind"] == "Widget" and names["widgets"]["namespaced"] is True
    assert "watch" in names["widgets"]["verbs"] and {"widgets/status", "widgets/scale"} <= set(names)
    _, groups = http("GET", "/apis")
    assert "test.example" in {g["name"] for g in groups["groups"]}

    base = f"{WIDGETS}/namespaces/{namespace}/widgets"
    status, widget = http("POST", base, {"metadata": {"name": "w"}, "spec": {"colour": "red", "junk": 1}})
    assert status == 201
    assert widget["spec"] == {"colour": "red", "replicas": 1}  # defaulted and pruned
    status, invalid = http("POST", base, {"metadata": {"name": "bad"}, "spec": {"colour": "green"}})
    assert status == 422 and "colour" in invalid["message"]

    merge = "application/merge-patch+json"
    _, with_status = http(
        "PATCH", f"{base}/w/status", {"status": {"replicas": 1, "selector": "app=w"}}, merge
    )
    assert with_status["status"] == {"replicas": 1, "selector": "app=w"}
    status, _ = http("PATCH", f"{base}/w/status", {"status": {"replicas": "many"}}, merge)
    assert status == 422
    _, scale = http("GET", f"{base}/w/scale")
    assert scale["kind"] == "Scale" and scale["spec"] == {"replicas": 1}
    assert scale["status"] == {"replicas": 1, "selector": "app=w"}
    _, scaled = http("PATCH", f"{base}/w/scale", {"spec": {"replicas": 4}}, merge)
    assert scaled["spec"]["replicas"] == 4
    _, after = http("GET", f"{base}/w")
    assert after["spec"]["replicas"] == 4 and after["metadata"]["generation"] == 2
    assert http("PATCH", f"{base}/w/scale", {"spec": {"replicas": -1}}, merge)[0] == 422


def test_requests_without_the_token_are_unauthorized(emulator: EmulatorThread) -> None:
    assert RawHttp(emulator.url, token=None)("GET", "/api/v1/namespaces")[0] == 401
    assert RawHttp(emulator.url, token="wrong")("GET", "/api/v1/namespaces")[0] == 401


def test_rbac_grants_are_enforced_per_verb_and_resource(emulator: EmulatorThread, namespace: str) -> None:
    rules = [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]
    emulator.call(lambda: emulator.emulator.grants.update({"probe": rules}))
    operator = RawHttp(emulator.url, token="probe")
    assert operator("GET", f"/api/v1/namespaces/{namespace}/secrets/x")[0] == 404  # get: granted
    status, body = operator("GET", f"/api/v1/namespaces/{namespace}/secrets")  # list: not granted
    assert status == 403 and body["reason"] == "Forbidden" and "cannot list" in body["message"]
    status, _ = operator("PUT", f"/apis/{WIDGETS[6:]}/namespaces/{namespace}/widgets/w", {})
    assert status == 403
    assert operator("GET", "/apis")[0] == 200  # discovery is open to every authenticated user
    denied = emulator.call(lambda: [d for d in emulator.emulator.denied if d[0] == "probe"])
    assert [verb for _t, _g, _r, verb in denied] == ["list", "update"]
    emulator.call(
        lambda: emulator.emulator.denied.__setitem__(
            slice(None), [d for d in emulator.emulator.denied if d[0] != "probe"]
        )
    )


def test_namespace_deletion_removes_its_objects(http: RawHttp, namespace: str) -> None:
    http("POST", f"/api/v1/namespaces/{namespace}/configmaps", cm("n"))
    status, terminating = http("DELETE", f"/api/v1/namespaces/{namespace}")
    assert status == 202 and terminating["status"]["phase"] == "Terminating"
    wait_for(lambda: http("GET", f"/api/v1/namespaces/{namespace}")[0] == 404, what="the namespace to go")
    assert http("GET", f"/api/v1/namespaces/{namespace}/configmaps/n")[0] == 404


# --------------------------------------------------------------------------- the adapter


def test_adapter_maps_answers_to_values_and_typed_errors(kube: Any, namespace: str) -> None:
    from relay_operator import k8s

    created = kube.create(k8s.CONFIGMAPS, namespace, cm("adapter", app="x"))
    assert created["metadata"]["uid"]
    assert kube.get(k8s.CONFIGMAPS, namespace, "missing") is None
    with pytest.raises(k8s.AlreadyExists):
        kube.create(k8s.CONFIGMAPS, namespace, cm("adapter"))
    patched = kube.merge_patch(k8s.CONFIGMAPS, namespace, "adapter", {"data": {"k": "2"}})
    assert patched["data"] == {"k": "2"}
    stale = {"metadata": {"resourceVersion": created["metadata"]["resourceVersion"]}, "data": {"k": "3"}}
    with pytest.raises(k8s.Conflict):
        kube.merge_patch(k8s.CONFIGMAPS, namespace, "adapter", stale)
    with pytest.raises(k8s.NotFound):
        kube.merge_patch(k8s.CONFIGMAPS, namespace, "missing", {"data": {}})
    with pytest.raises(k8s.Invalid):
        kube.create(k8s.CONFIGMAPS, namespace, {"metadata": {"name": "Not_A_Name"}})
    listed = kube.list(k8s.CONFIGMAPS, namespace, "app=x")
    assert [item["metadata"]["name"] for item in listed] == ["adapter"]
    kube.post_event(patched, type_="Warning", reason="Testing", message="hello")
    events = kube.list(k8s.EVENTS, namespace)
    assert [(e["reason"], e["involvedObject"]["uid"]) for e in events] == [
        ("Testing", created["metadata"]["uid"])
    ]
    kube.delete(k8s.CONFIGMAPS, namespace, "adapter")
    kube.delete(k8s.CONFIGMAPS, namespace, "adapter")  # idempotent
    assert kube.get(k8s.CONFIGMAPS, namespace, "adapter") is None


def test_adapter_reports_an_unreachable_server(tmp_path: Any) -> None:
    from relay_operator import k8s
    from tests.relay_operator.k8s_emulator import EmulatorThread as Unused  # noqa: F401

    config = tmp_path / "config"
    config.write_text(
        "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'http://127.0.0.1:1'}}]\n"
        "users: [{name: u, user: {token: t}}]\ncontexts: [{name: c, context: {cluster: c, user: u}}]\n"
        "current-context: c\n"
    )
    api = k8s.ClientKubeApi.from_environment(kubeconfig=str(config))
    with pytest.raises(k8s.Unavailable):
        api.get(k8s.CONFIGMAPS, "default", "x")


# --------------------------------------------------------------------------- what a server refuses


def test_built_in_objects_are_validated_like_a_server_does(http: RawHttp, namespace: str) -> None:
    base = f"/api/v1/namespaces/{namespace}"
    # Names: Services are DNS-1035 labels, most others DNS subdomains.
    assert http("POST", f"{base}/services", {"metadata": {"name": "1edge"}, "spec": {}})[0] == 422
    assert http("POST", f"{base}/services", {"metadata": {"name": "a.b"}, "spec": {}})[0] == 422
    assert http("POST", f"{base}/configmaps", {"metadata": {"name": "a.b"}})[0] == 201
    # Label and annotation keys and values.
    for meta in (
        {"labels": {"bad key": "x"}},
        {"labels": {"k": "not a value"}},
        {"labels": {"k": "v" * 64}},
        {"annotations": {"Example.COM/x": "y"}},
        {"annotations": {"a/b/c": "y"}},
    ):
        status, body = http("POST", f"{base}/configmaps", {"metadata": {"name": "m", **meta}})
        assert status == 422 and "metadata." in body["message"], meta
    status, _ = http(
        "POST", f"{base}/configmaps", {"metadata": {"name": "m", "labels": {"example.com/k": ""}}}
    )
    assert status == 201
    # Required fields and types from the version's OpenAPI schema.
    path = f"/apis/apps/v1/namespaces/{namespace}/statefulsets"
    nameless = statefulset("s")
    del nameless["spec"]["template"]["spec"]["containers"][0]["name"]
    status, body = http("POST", path, nameless)
    assert status == 422 and "'name' is a required property" in body["message"]
    status, body = http("POST", f"{base}/configmaps", {"metadata": {"name": "t"}, "data": {"k": 1}})
    assert status == 422 and "data.k" in body["message"]


def test_services_get_a_cluster_ip_that_an_update_keeps_and_cannot_change(
    http: RawHttp, namespace: str
) -> None:
    base = f"/api/v1/namespaces/{namespace}/services"
    body = {"metadata": {"name": "lb"}, "spec": {"type": "LoadBalancer", "ports": [{"port": 25}]}}
    status, created = http("POST", base, dict(body, spec=dict(body["spec"], externalTrafficPolicy="Local")))
    assert status == 201
    spec = created["spec"]
    assert spec["clusterIP"] and spec["clusterIPs"] == [spec["clusterIP"]]
    assert (
        spec["ports"][0]["nodePort"] and spec["healthCheckNodePort"] and spec["ports"][0]["targetPort"] == 25
    )
    # A PUT that leaves the allocated values out keeps them (what the operator's replace does).
    replaced = {
        "metadata": {"name": "lb", "resourceVersion": created["metadata"]["resourceVersion"]},
        "spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local", "ports": [{"port": 25}]},
    }
    status, kept = http("PUT", f"{base}/lb", replaced)
    assert status == 200 and kept["spec"] == spec
    assert kept["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]  # a no-op
    moved = dict(replaced, spec=dict(replaced["spec"], clusterIP="10.0.0.99"))
    status, refused = http("PUT", f"{base}/lb", moved)
    assert status == 422 and "may not change once set" in refused["message"]
    _, headless = http(
        "POST", base, {"metadata": {"name": "h"}, "spec": {"clusterIP": "None", "ports": [{"port": 1}]}}
    )
    assert headless["spec"]["clusterIPs"] == ["None"]


def test_claims_get_the_default_class_and_grow_only_where_the_class_allows(
    http: RawHttp, namespace: str
) -> None:
    classes = "/apis/storage.k8s.io/v1/storageclasses"
    grow, fixed = f"{namespace}-grow", f"{namespace}-fixed"
    http("POST", classes, {"metadata": {"name": grow}, "provisioner": "p", "allowVolumeExpansion": True})
    http("POST", classes, {"metadata": {"name": fixed}, "provisioner": "p"})
    base = f"/api/v1/namespaces/{namespace}/persistentvolumeclaims"
    merge = "application/merge-patch+json"

    def claim(name: str, class_name: str | None) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": "1Gi"}},
        }
        if class_name:
            spec["storageClassName"] = class_name
        return {"metadata": {"name": name}, "spec": spec}

    for name, class_name in (("grows", grow), ("fixed", fixed)):
        assert http("POST", base, claim(name, class_name))[0] == 201

    def size(name: str, storage: str) -> tuple[int, dict[str, Any]]:
        return http(
            "PATCH", f"{base}/{name}", {"spec": {"resources": {"requests": {"storage": storage}}}}, merge
        )

    assert size("grows", "2Gi")[0] == 200
    status, body = size("grows", "1Gi")
    assert status == 422 and "can not be less than previous value" in body["message"]
    status, body = size("fixed", "2Gi")
    assert status == 403 and "must support resize" in body["message"]
    status, body = http("PATCH", f"{base}/grows", {"spec": {"accessModes": ["ReadWriteMany"]}}, merge)
    assert status == 422 and "spec is immutable" in body["message"]
    wait_for(
        lambda: (http("GET", f"{base}/grows")[1].get("status") or {}).get("capacity") == {"storage": "2Gi"},
        what="the resizer stand-in to grow the volume",
    )


def test_owner_references_permission_enforcement(
    emulator: EmulatorThread, http: RawHttp, namespace: str
) -> None:
    """OwnerReferencesPermissionEnforcement: blockOwnerDeletion needs update on the owner's
    finalizers subresource; changing an object's owner references needs delete on it."""
    base = f"/api/v1/namespaces/{namespace}/configmaps"
    _, owner = http("POST", base, cm("owner"))
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner["metadata"]["uid"]}
    writer = [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create", "get", "update", "patch"]}]
    emulator.call(
        lambda: emulator.emulator.grants.update(
            {
                "writer": writer,
                "finalizer": [
                    *writer,
                    {"apiGroups": [""], "resources": ["configmaps/finalizers"], "verbs": ["update"]},
                ],
            }
        )
    )
    as_writer, as_finalizer = RawHttp(emulator.url, token="writer"), RawHttp(emulator.url, token="finalizer")
    blocking = {"metadata": {"name": "a", "ownerReferences": [dict(ref, blockOwnerDeletion=True)]}}
    status, body = as_writer("POST", base, blocking)
    assert status == 403 and "cannot set blockOwnerDeletion" in body["message"]
    assert as_finalizer("POST", base, blocking)[0] == 201
    assert as_writer("POST", base, {"metadata": {"name": "b", "ownerReferences": [ref]}})[0] == 201
    # Creating may set references; changing them later needs the right to delete the object.
    _, plain = as_writer("POST", base, cm("c"))
    status, body = as_writer(
        "PUT", f"{base}/c", dict(plain, metadata=dict(plain["metadata"], ownerReferences=[ref]))
    )
    assert status == 403 and "can't delete" in body["message"]
    assert as_writer("PATCH", f"{base}/a", {"data": {"k": "2"}}, "application/merge-patch+json")[0] == 200
    emulator.call(
        lambda: emulator.emulator.denied.__setitem__(
            slice(None), [d for d in emulator.emulator.denied if d[0] not in ("writer", "finalizer")]
        )
    )


# --------------------------------------------------------------------------- deletion


def test_namespace_deletion_waits_for_the_finalizers_of_its_objects(http: RawHttp, namespace: str) -> None:
    base = f"/api/v1/namespaces/{namespace}/configmaps"
    http("POST", base, {"metadata": {"name": "held", "finalizers": ["example.com/hold"]}})
    http("POST", base, cm("free"))
    assert http("DELETE", f"/api/v1/namespaces/{namespace}")[0] == 202
    wait_for(lambda: http("GET", f"{base}/free")[0] == 404, what="the namespace's content to be deleted")
    _, held = http("GET", f"{base}/held")
    assert held["metadata"]["deletionTimestamp"]
    _, ns = http("GET", f"/api/v1/namespaces/{namespace}")
    assert ns["status"]["phase"] == "Terminating" and ns["spec"]["finalizers"] == ["kubernetes"]
    status, body = http("POST", base, cm("late"))
    assert status == 403 and "being terminated" in body["message"]
    http("PATCH", f"{base}/held", {"metadata": {"finalizers": None}}, "application/merge-patch+json")
    wait_for(lambda: http("GET", f"/api/v1/namespaces/{namespace}")[0] == 404, what="the namespace to go")


def test_crd_deletion_deletes_its_resources_and_waits_for_their_finalizers(
    http: RawHttp, namespace: str
) -> None:
    crd = json.loads(json.dumps(WIDGET_CRD).replace("widget", "gadget").replace("Widget", "Gadget"))
    crd_path = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd['metadata']['name']}"
    status, created = http("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
    assert status == 201 and "customresourcecleanup.apiextensions.k8s.io" in created["metadata"]["finalizers"]
    base = f"/apis/test.example/v1/namespaces/{namespace}/gadgets"
    http("POST", base, {"metadata": {"name": "held", "finalizers": ["example.com/hold"]}, "spec": {}})
    http("POST", base, {"metadata": {"name": "free"}, "spec": {}})
    assert http("DELETE", crd_path)[0] == 202
    wait_for(lambda: http("GET", f"{base}/free")[0] == 404, what="the custom resources to be deleted")
    assert http("GET", crd_path)[0] == 200  # held by the remaining resource's finalizer
    assert http("POST", base, {"metadata": {"name": "late"}, "spec": {}})[0] == 405
    http("PATCH", f"{base}/held", {"metadata": {"finalizers": None}}, "application/merge-patch+json")
    wait_for(lambda: http("GET", crd_path)[0] == 404, what="the CRD to go")
    assert http("GET", base)[0] == 404  # no longer served


def test_orphan_and_foreground_deletion_and_preconditions(http: RawHttp, namespace: str) -> None:
    base = f"/api/v1/namespaces/{namespace}/configmaps"
    _, owner = http("POST", base, cm("owner"))
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner["metadata"]["uid"]}
    http("POST", base, {"metadata": {"name": "dep", "ownerReferences": [ref]}})
    status, body = http("DELETE", f"{base}/owner", {"preconditions": {"uid": "another"}})
    assert status == 409 and "Precondition failed" in body["message"]
    stale = {"preconditions": {"resourceVersion": "1"}}
    assert http("DELETE", f"{base}/owner", stale)[0] == 409
    precise = {"propagationPolicy": "Orphan", "preconditions": {"uid": owner["metadata"]["uid"]}}
    status, marked = http("DELETE", f"{base}/owner", precise)
    assert status == 202 and marked["metadata"]["finalizers"] == ["orphan"]  # the GC finishes it
    wait_for(lambda: http("GET", f"{base}/owner")[0] == 404, what="the orphaning to finish")
    assert "ownerReferences" not in http("GET", f"{base}/dep")[1]["metadata"]
    _, owner2 = http("POST", base, cm("owner2"))
    ref2 = dict(ref, name="owner2", uid=owner2["metadata"]["uid"])
    http(
        "POST",
        base,
        {"metadata": {"name": "dep2", "ownerReferences": [ref2], "finalizers": ["x.example/hold"]}},
    )
    status, marked = http("DELETE", f"{base}/owner2", {"propagationPolicy": "Foreground"})
    assert status == 202 and marked["metadata"]["finalizers"] == ["foregroundDeletion"]
    wait_for(lambda: http("GET", f"{base}/dep2")[1]["metadata"].get("deletionTimestamp"), what="dep2 deleted")
    assert http("GET", f"{base}/owner2")[0] == 200  # waits for its dependent
    http("PATCH", f"{base}/dep2", {"metadata": {"finalizers": None}}, "application/merge-patch+json")
    wait_for(lambda: http("GET", f"{base}/owner2")[0] == 404, what="the owner to go after its dependent")


# --------------------------------------------------------------------------- controllers


def test_statefulset_controller_makes_pods_and_reports_status_like_the_real_one(
    http: RawHttp, namespace: str, emulator: EmulatorThread
) -> None:
    emulator.call(lambda: emulator.emulator.unready_namespaces.add(namespace))
    path = f"/apis/apps/v1/namespaces/{namespace}/statefulsets"
    pods = f"/api/v1/namespaces/{namespace}/pods"
    body = statefulset("s", replicas=2)
    body["spec"]["podManagementPolicy"] = "Parallel"
    claim = {"metadata": {"name": "data"}, "spec": {"resources": {"requests": {"storage": "1Gi"}}}}
    body["spec"]["volumeClaimTemplates"] = [claim]
    http("POST", path, body)

    def sts_status() -> dict[str, Any]:
        return dict(http("GET", f"{path}/s")[1].get("status") or {})

    status = wait_for(lambda: sts_status().get("replicas") == 2 and sts_status(), what="two pods")
    revision = status["updateRevision"]
    # Zero counts are omitted, as the real controller's status does.
    assert status == {
        "observedGeneration": 1,
        "replicas": 2,
        "currentReplicas": 2,
        "updatedReplicas": 2,
        "currentRevision": revision,
        "updateRevision": revision,
        "collisionCount": 0,
        "availableReplicas": 0,
    }
    _, pod = http("GET", f"{pods}/s-1")
    assert pod["metadata"]["labels"]["controller-revision-hash"] == revision
    assert pod["metadata"]["ownerReferences"][0]["kind"] == "StatefulSet"
    assert pod["spec"]["volumes"] == [{"name": "data", "persistentVolumeClaim": {"claimName": "data-s-1"}}]
    assert http("GET", f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/data-s-1")[0] == 200
    ready = {"status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}}
    merge = "application/merge-patch+json"
    for name in ("s-0", "s-1"):
        http("PATCH", f"{pods}/{name}/status", ready, merge)
    wait_for(lambda: sts_status().get("readyReplicas") == 2, what="both pods ready")
    # A new template rolls the pods from the highest ordinal, one at a time.
    http("PATCH", f"{path}/s", {"spec": {"template": {"metadata": {"annotations": {"a": "b"}}}}}, merge)
    rolling = wait_for(
        lambda: sts_status().get("observedGeneration") == 2 and sts_status(), what="the rollout"
    )
    assert rolling["currentRevision"] == revision != rolling["updateRevision"]
    wait_for(lambda: http("GET", f"{pods}/s-1")[1]["status"]["phase"] == "Pending", what="s-1 replaced")
    assert http("GET", f"{pods}/s-0")[1]["metadata"]["labels"]["controller-revision-hash"] == revision
    for name in ("s-1", "s-0"):
        wait_for(
            lambda n=name: http("GET", f"{pods}/{n}")[1]["status"]["phase"] == "Pending", what=f"{name} new"
        )
        http("PATCH", f"{pods}/{name}/status", ready, merge)
    done = wait_for(lambda: sts_status().get("readyReplicas") == 2 and sts_status(), what="rolled out")
    assert done["currentRevision"] == done["updateRevision"] == rolling["updateRevision"]
    # Deleted with Orphan, the pods stay; a new StatefulSet adopts them without restarting them.
    uids = {p["metadata"]["name"]: p["metadata"]["uid"] for p in http("GET", pods)[1]["items"]}
    http("DELETE", f"{path}/s", {"propagationPolicy": "Orphan"})
    wait_for(lambda: http("GET", f"{path}/s")[0] == 404, what="the StatefulSet to go")
    assert all("ownerReferences" not in p["metadata"] for p in http("GET", pods)[1]["items"])
    body["spec"]["template"]["metadata"]["annotations"] = {"a": "b"}
    http("POST", path, body)
    wait_for(lambda: sts_status().get("readyReplicas") == 2, what="the pods adopted")
    assert {p["metadata"]["name"]: p["metadata"]["uid"] for p in http("GET", pods)[1]["items"]} == uids


def test_an_old_server_drops_the_claim_retention_policy(tmp_path: Any) -> None:
    """On 1.25 and 1.26 (StatefulSetAutoDeletePVC off by default) the field does not persist."""
    with EmulatorThread(KubernetesApiEmulator(token="t", version="1.25")) as server:
        http = RawHttp(server.url, token="t")
        assert http("GET", "/version")[1]["minor"] == "25"
        body = statefulset("s")
        body["spec"]["persistentVolumeClaimRetentionPolicy"] = {
            "whenDeleted": "Retain",
            "whenScaled": "Retain",
        }
        status, created = http("POST", "/apis/apps/v1/namespaces/default/statefulsets", body)
        assert status == 201 and "persistentVolumeClaimRetentionPolicy" not in created["spec"]
    with EmulatorThread(KubernetesApiEmulator(token="t", version="1.27")) as server:
        http = RawHttp(server.url, token="t")
        _, created = http("POST", "/apis/apps/v1/namespaces/default/statefulsets", body)
        assert created["spec"]["persistentVolumeClaimRetentionPolicy"]["whenDeleted"] == "Retain"


# --------------------------------------------------------------------------- lists and watches


def test_lists_are_paginated_and_an_old_continue_token_expires(
    http: RawHttp, namespace: str, emulator: EmulatorThread
) -> None:
    base = f"/api/v1/namespaces/{namespace}/configmaps"
    for index in range(5):
        http("POST", base, cm(f"p{index}"))
    _, first = http("GET", f"{base}?limit=2")
    assert [i["metadata"]["name"] for i in first["items"]] == ["p0", "p1"]
    assert first["metadata"]["remainingItemCount"] == 3
    token = first["metadata"]["continue"]
    _, second = http("GET", f"{base}?limit=2&continue={token}")
    assert [i["metadata"]["name"] for i in second["items"]] == ["p2", "p3"]
    assert second["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]
    _, last = http("GET", f"{base}?limit=2&continue={second['metadata']['continue']}")
    assert [i["metadata"]["name"] for i in last["items"]] == ["p4"] and "continue" not in last["metadata"]
    http("POST", base, cm("later"))  # history moves on, then the server compacts it
    emulator.call(emulator.emulator.compact)
    status, expired = http("GET", f"{base}?limit=2&continue={token}")
    assert status == 410 and expired["reason"] == "Expired"


def test_expired_watches_end_with_410(http: RawHttp, namespace: str, emulator: EmulatorThread) -> None:
    import threading
    import urllib.request

    base = f"/api/v1/namespaces/{namespace}/configmaps"
    http("POST", base, cm("w"))
    events: list[dict[str, Any]] = []
    # A long server-side timeout: only the expiry may end this watch, however slow the machine.
    request = urllib.request.Request(f"{http.base}{base}?watch=true&timeoutSeconds=120", headers=http.headers)

    def watch() -> None:
        with urllib.request.urlopen(request, timeout=130) as response:
            for line in response:
                if line.strip():
                    events.append(json.loads(line))

    watcher = threading.Thread(target=watch)
    watcher.start()
    wait_for(lambda: events, what="the watch's first event")  # this watch is open now
    assert emulator.call(emulator.emulator.expire_watches) >= 1
    watcher.join(30)
    assert not watcher.is_alive()  # the server ended it
    assert [e["type"] for e in events] == ["ADDED", "ERROR"] and events[1]["object"]["code"] == 410


def test_adapter_pages_lists_deletes_with_preconditions_and_reads_the_version(
    kubeconfig: Any, namespace: str, emulator: EmulatorThread
) -> None:
    from relay_operator import k8s

    base = k8s.ClientKubeApi.from_environment(kubeconfig=str(kubeconfig))
    api = k8s.ClientKubeApi(base._client, page_size=2)
    for index in range(5):
        api.create(k8s.CONFIGMAPS, namespace, cm(f"a{index}", app="paged"))
    start = emulator.call(lambda: len(emulator.emulator.calls))
    assert [i["metadata"]["name"] for i in api.list(k8s.CONFIGMAPS, namespace, "app=paged")] == [
        f"a{i}" for i in range(5)
    ]
    # Only this test's requests: the session's operator process may be reconciling meanwhile.
    queries = emulator.call(
        lambda: [q for t, _m, p, q in emulator.emulator.calls[start:] if t == TOKEN and f"/{namespace}/" in p]
    )
    assert len(queries) == 3 and all("limit=2" in q for q in queries) and "continue=" in queries[1]
    assert api.server_version() == (1, 30)
    live = api.get(k8s.CONFIGMAPS, namespace, "a0")
    with pytest.raises(k8s.Conflict):
        api.delete(k8s.CONFIGMAPS, namespace, "a0", preconditions={"uid": "someone-else"})
    api.delete(k8s.CONFIGMAPS, namespace, "a0", preconditions={"uid": live["metadata"]["uid"]})
    assert api.get(k8s.CONFIGMAPS, namespace, "a0") is None


def test_secret_string_data_is_stored_as_data(http: RawHttp, namespace: str) -> None:
    body = {"metadata": {"name": "s"}, "data": {"a": "YQ=="}, "stringData": {"b": "bee"}}
    status, created = http("POST", f"/api/v1/namespaces/{namespace}/secrets", body)
    assert status == 201
    assert created["data"] == {"a": "YQ==", "b": "YmVl"} and "stringData" not in created
    _, read = http("GET", f"/api/v1/namespaces/{namespace}/secrets/s")
    assert read["data"] == created["data"] and "stringData" not in read


def test_jobs_get_their_generated_selector_and_an_immutable_template(http: RawHttp, namespace: str) -> None:
    path = f"/apis/batch/v1/namespaces/{namespace}/jobs"
    template = {
        "metadata": {"labels": {"app": "x"}},
        "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]},
    }
    status, job = http("POST", path, {"metadata": {"name": "j"}, "spec": {"template": template}})
    assert status == 201
    uid = job["metadata"]["uid"]
    assert job["spec"]["selector"] == {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert labels == {
        "app": "x",
        "batch.kubernetes.io/controller-uid": uid,
        "batch.kubernetes.io/job-name": "j",
    }
    assert (job["spec"]["backoffLimit"], job["spec"]["completions"], job["spec"]["parallelism"]) == (6, 1, 1)
    changed = {"spec": {"template": {"spec": {"containers": [{"name": "c", "image": "other"}]}}}}
    status, refused = http("PATCH", f"{path}/j", changed, "application/merge-patch+json")
    assert status == 422 and "spec.template" in refused["message"]
    # No Job controller: status is what a test writes.
    done = {"status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}}
    status, updated = http("PATCH", f"{path}/j/status", done, "application/merge-patch+json")
    assert status == 200 and updated["status"]["succeeded"] == 1


def test_each_pod_gets_a_loopback_address_of_its_own(http: RawHttp, namespace: str) -> None:
    path = f"/apis/apps/v1/namespaces/{namespace}/statefulsets"
    http("POST", path, statefulset("s", replicas=3))
    pods = f"/api/v1/namespaces/{namespace}/pods"

    def addresses() -> list[str] | None:
        items = http("GET", pods)[1]["items"]
        found = [(p.get("status") or {}).get("podIP") for p in items]
        return found if len(found) == 3 and all(found) else None  # type: ignore[return-value]

    found = wait_for(addresses, what="three pods with addresses")
    assert len(set(found)) == 3 and all(ip.startswith("127.244.") for ip in found)
