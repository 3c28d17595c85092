"""The Kubernetes API emulator is only useful if it is honest: these tests pin the API-server
behaviour the operator's end-to-end tests rely on (see k8s_emulator's docstring), and the
operator's adapter (relay_operator.k8s) against it."""

from __future__ import annotations

from typing import Any

import pytest

from tests.relay_operator.conftest import RawHttp, wait_for
from tests.relay_operator.k8s_emulator import EmulatorThread, canonicalize_pod_quantities

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
