"""End to end, the operator's side of a scale-down (issue 14): the real `mailrelay operator`
against the API emulator, with a real HTTP server on each pod's IP (loopback addresses the
emulator's kubelet hands out) answering GET /queue the way a relay pod does. What the relay
does while it drains is tested with real relays in test_operator_relay_drain.py; here the
pods' answers are set by the test, so that each step of the operator's decision can be seen:

- 3 -> 1: the ConfigMap names the draining pods and their peer, the StatefulSet keeps 3 pods
  until both report drained, then shrinks; the removed pods' claims (verified empty) are deleted,
  the remaining one is not; status.queue and the Draining condition follow; Events say it;
- a removed pod's claim that may hold mail (the drain timed out) gets a drain Job; once the Job
  succeeded (the test plays the Job controller) the claim is deleted;
- replicas: 0: no peer; the condition and an Event say so, the StatefulSet waits for the drain
  timeout, then shrinks, and every claim is kept.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import yaml

from relay_operator import k8s, naming
from tests.relay_operator import crd_tools
from tests.relay_operator.conftest import OperatorProcess

PVCS = k8s.PERSISTENTVOLUMECLAIMS
METRICS_PORT = 9090  # topology.POD_CONTEXT.metrics_port: what the operator asks on each pod


class PodQueues:
    """HTTP servers standing in for relay pods' health endpoints: GET /queue answers `state[pod]`."""

    def __init__(self) -> None:
        self.state: dict[str, dict[str, Any]] = {}
        self.asked: dict[str, int] = {}
        self._servers: list[ThreadingHTTPServer] = []
        self._lock = threading.Lock()

    def serve(self, pod: str, ip: str, **answer: Any) -> None:
        queues = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path != "/queue":
                    self.send_error(404)
                    return
                with queues._lock:
                    queues.asked[pod] = queues.asked.get(pod, 0) + 1
                    body = json.dumps({"pod": pod, **queues.state[pod]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: Any) -> None:
                pass

        self.set(pod, **answer)
        server = ThreadingHTTPServer((ip, METRICS_PORT), Handler)
        self._servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()

    def set(self, pod: str, *, depth: int = 0, draining: bool = False, deferred: int = 0) -> None:
        with self._lock:
            self.state[pod] = {
                "draining": draining,
                "depth": depth,
                "incoming": 0,
                "active": 0,
                "deferred": deferred,
                "held": 0,
                "oldestAgeSeconds": 30.0 if depth else 0.0,
                "handedOff": 0,
                "drained": draining and depth == 0,
            }

    def times_asked(self, pod: str) -> int:
        with self._lock:
            return self.asked.get(pod, 0)

    def close(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()


@pytest.fixture()
def pod_queues() -> Iterator[PodQueues]:
    queues = PodQueues()
    yield queues
    queues.close()


def mailrelay(replicas: int, **scale_down: Any) -> dict[str, Any]:
    return crd_tools.edge_relay(replicas, scaleDown=scale_down)


def condition(kube: Any, namespace: str, type_: str) -> dict[str, Any] | None:
    body = kube.get(k8s.MAILRELAYS, namespace, "edge") or {}
    return next((c for c in (body.get("status") or {}).get("conditions") or [] if c["type"] == type_), None)


def draining_reason(kube: Any, namespace: str, *reasons: str) -> dict[str, Any] | None:
    found = condition(kube, namespace, "Draining")
    return found if found is not None and found["reason"] in reasons else None


def pod_ips(kube: Any, namespace: str, count: int) -> dict[str, str] | None:
    pods = {
        p["metadata"]["name"]: (p.get("status") or {}).get("podIP")
        for p in kube.list(k8s.PODS, namespace)
        if not p["metadata"].get("deletionTimestamp")
    }
    return pods if len(pods) == count and all(pods.values()) else None  # type: ignore[return-value]


def drain_section(kube: Any, namespace: str) -> dict[str, Any] | None:
    configmap = kube.get(k8s.CONFIGMAPS, namespace, naming.configmap_name("edge"))
    if configmap is None:
        return None
    loaded = yaml.safe_load(configmap["data"][naming.CONFIG_KEY])
    return loaded.get("drain") if isinstance(loaded, dict) else None


def sts_replicas(kube: Any, namespace: str) -> int:
    return int(kube.get(k8s.STATEFULSETS, namespace, "edge")["spec"]["replicas"])


def claim_names(kube: Any, namespace: str) -> list[str]:
    return sorted(c["metadata"]["name"] for c in kube.list(PVCS, namespace))


def events(kube: Any, namespace: str) -> list[tuple[str, str, str]]:
    return [
        (e["type"], e["reason"], e["message"])
        for e in kube.list(k8s.EVENTS, namespace)
        if e["involvedObject"]["name"] == "edge"
    ]


def has_events(kube: Any, namespace: str, *reasons: str) -> bool:
    return set(reasons) <= {e[1] for e in events(kube, namespace)}


def complete_job(kube: Any, namespace: str, job: dict[str, Any]) -> None:
    """What the Job controller writes once the Job's pod exited 0."""
    status = {
        "succeeded": 1,
        "conditions": [
            {"type": "SuccessCriteriaMet", "status": "True"},
            {"type": "Complete", "status": "True"},
        ],
    }
    kube.merge_patch(k8s.JOBS, namespace, job["metadata"]["name"], {"status": status}, subresource="status")


def force_claim_drain(kube: Any, namespace: str, operator_process: OperatorProcess) -> dict[str, Any]:
    """Scale edge (2 pods that never answer /queue) down to 1 with a 1s drain timeout: the
    operator gives up, removes edge-1 and drains its claim with a Job; the test completes the
    Job and the claim goes. Returns the Job."""
    kube.create(k8s.MAILRELAYS, namespace, mailrelay(2, drainTimeout="1s"))
    operator_process.until(lambda: pod_ips(kube, namespace, 2), "2 pods with IPs")
    operator_process.until(lambda: "spool-edge-1" in claim_names(kube, namespace), "the claims")
    kube.merge_patch(k8s.MAILRELAYS, namespace, "edge", {"spec": {"replicas": 1}})
    operator_process.until(
        lambda: draining_reason(kube, namespace, "DrainTimedOut", "DrainingClaims"), "gave up"
    )
    jobs = operator_process.until(lambda: kube.list(k8s.JOBS, namespace), "a drain Job", timeout=30)
    (job,) = jobs
    assert sts_replicas(kube, namespace) == 1
    complete_job(kube, namespace, job)
    operator_process.until(
        lambda: claim_names(kube, namespace) == ["spool-edge-0"],
        "the drained claim to be deleted",
        timeout=30,
    )
    return dict(job)


def test_three_to_one_waits_for_both_pods_to_report_empty(
    kube: Any, namespace: str, operator_process: OperatorProcess, pod_queues: PodQueues
) -> None:
    kube.create(k8s.MAILRELAYS, namespace, mailrelay(3, drainTimeout="10m"))
    ips = operator_process.until(lambda: pod_ips(kube, namespace, 3), "3 pods with IPs")
    secret = kube.get(k8s.SECRETS, namespace, "edge-handoff")
    assert secret is not None and secret["metadata"]["ownerReferences"][0]["kind"] == "MailRelay"
    for pod, ip in ips.items():
        pod_queues.serve(pod, ip, depth=5, deferred=4)
    body = operator_process.until(
        lambda: (
            (b := kube.get(k8s.MAILRELAYS, namespace, "edge"))
            and (b.get("status") or {}).get("queue", {}).get("reporting") == 3
            and b
        ),
        "status.queue from every pod",
    )
    queue = body["status"]["queue"]
    assert (queue["depth"], queue["deferred"], queue["oldestAgeSeconds"]) == (15, 12, 30)
    assert [p["name"] for p in queue["pods"]] == ["edge-0", "edge-1", "edge-2"]
    assert condition(kube, namespace, "Draining")["reason"] == "NoScaleDown"  # type: ignore[index]
    assert drain_section(kube, namespace) is None

    kube.merge_patch(k8s.MAILRELAYS, namespace, "edge", {"spec": {"replicas": 1}})
    drain = operator_process.until(lambda: drain_section(kube, namespace), "the drain section")
    assert drain == {
        "pods": ["edge-1", "edge-2"],
        "peers": [
            {"host": f"edge-0.edge-headless.{namespace}.svc.cluster.local", "port": naming.HANDOFF_PORT}
        ],
    }
    operator_process.until(lambda: draining_reason(kube, namespace, "Draining"), "Draining=True")
    # The pods drain; edge-1 empties first: still three pods while edge-2 holds mail.
    pod_queues.set("edge-1", draining=True, depth=0)
    pod_queues.set("edge-2", draining=True, depth=3)
    seen = pod_queues.times_asked("edge-2")
    operator_process.until(lambda: pod_queues.times_asked("edge-2") >= seen + 3, "three more polls")
    assert sts_replicas(kube, namespace) == 3
    found = draining_reason(kube, namespace, "Draining")
    assert (
        found is not None and "edge-1: empty" in found["message"] and "edge-2: 3 queued" in found["message"]
    )
    assert len(claim_names(kube, namespace)) == 3

    pod_queues.set("edge-2", draining=True, depth=0)
    operator_process.until(lambda: sts_replicas(kube, namespace) == 1, "the StatefulSet to shrink")
    operator_process.until(
        lambda: claim_names(kube, namespace) == ["spool-edge-0"], "the verified claims to go", timeout=30
    )
    operator_process.until(lambda: draining_reason(kube, namespace, "NoScaleDown"), "Draining=False")
    assert drain_section(kube, namespace) is None
    operator_process.until(lambda: has_events(kube, namespace, "Draining", "Drained"), "the Events")
    operator_process.until(
        lambda: any(
            "deleted PersistentVolumeClaim spool-edge-1 (verified empty)" in e[2]
            for e in events(kube, namespace)
        ),
        "the Applied Event naming the deleted claim",
    )
    assert kube.list(k8s.JOBS, namespace) == []  # nothing held mail: no Job


def test_a_removed_pods_claim_that_may_hold_mail_is_drained_by_a_job(
    kube: Any, namespace: str, operator_process: OperatorProcess
) -> None:
    job = force_claim_drain(kube, namespace, operator_process)
    assert job["metadata"]["annotations"][naming.CLAIM_UID_ANNOTATION]
    assert job["metadata"]["ownerReferences"][0]["name"] == "edge"
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"] == [
        "drain",
        "--spool",
        "/var/spool/mailrelay/queue",
        "--to",
        f"edge-0.edge-headless.{namespace}.svc.cluster.local:{naming.HANDOFF_PORT}",
        "--credential-file",
        "/etc/mailrelay/handoff/credential",
    ]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["spool"]["persistentVolumeClaim"]["claimName"] == "spool-edge-1"
    assert volumes["handoff"]["secret"]["secretName"] == "edge-handoff"
    # The Events of a pass are posted after its writes (the claim is gone first).
    operator_process.until(lambda: has_events(kube, namespace, "DrainTimedOut", "ClaimDrained"), "the Events")


def test_scaling_to_zero_says_why_it_cannot_drain_and_keeps_every_claim(
    kube: Any, namespace: str, operator_process: OperatorProcess, pod_queues: PodQueues
) -> None:
    kube.create(k8s.MAILRELAYS, namespace, mailrelay(2, drainTimeout="6s"))
    ips = operator_process.until(lambda: pod_ips(kube, namespace, 2), "2 pods with IPs")
    for pod, ip in ips.items():
        pod_queues.serve(pod, ip, depth=2)
    operator_process.until(lambda: len(claim_names(kube, namespace)) == 2, "the claims")
    kube.merge_patch(k8s.MAILRELAYS, namespace, "edge", {"spec": {"replicas": 0}})
    found = operator_process.until(lambda: draining_reason(kube, namespace, "NoPeer"), "Draining: NoPeer")
    assert "no pod remains" in found["message"]
    assert drain_section(kube, namespace) == {"pods": ["edge-0", "edge-1"], "peers": []}
    assert sts_replicas(kube, namespace) == 2
    for pod in ips:
        pod_queues.set(pod, draining=True, depth=2)
    operator_process.until(lambda: has_events(kube, namespace, "NoPeer"), "the NoPeer Event")
    operator_process.until(
        lambda: sts_replicas(kube, namespace) == 0, "the StatefulSet to shrink after the timeout"
    )
    operator_process.until(
        lambda: draining_reason(kube, namespace, "MailKept"), "Draining: MailKept", timeout=30
    )
    assert claim_names(kube, namespace) == ["spool-edge-0", "spool-edge-1"]
    assert kube.list(k8s.JOBS, namespace) == []
    operator_process.until(lambda: has_events(kube, namespace, "DrainTimedOut", "MailKept"), "the Events")
    warnings = [e for e in events(kube, namespace) if e[:2] == ("Warning", "NoPeer")]
    assert len(warnings) == 1  # when it began, not on every pass
