"""Issue 14, done-when: a scale-down through the real operator (kopf, against the API emulator)
with real `mailrelay relay` processes standing in for the pods, each on the loopback IP the
emulator's kubelet gave its pod; the test plays the kubelet (it starts a relay per pod from the
rendered ConfigMap, mounts the hand-off Secret as a file, updates the file when the ConfigMap
changes, stops a pod's relay when the StatefulSet controller removed the pod) and the Job
controller (it runs a drain Job's `mailrelay drain` command and writes the Job's status). Each
pod's spool claim is a directory of its own.

- 3 -> 1 with mail queued on every pod and the next hop down: the StatefulSet goes to 1 only
  after pods 1 and 2 report empty; once the next hop is back every message arrives exactly once
  with its envelope and DSN parameters, each handed-off message keeps its first arrival time
  (maxLifetime counts from there); the removed pods' claims are deleted only once empty;
- a removed pod's claim that still holds mail (its pod died and the drain timed out) is emptied
  by the drain Job's real `mailrelay drain` into pod 0, then deleted; every message arrives once;
- replicas: 0: nobody to take the mail; the pods stop taking mail, the operator says why, waits
  for the drain timeout, then removes the pods and keeps every claim with its mail.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import yaml

from relay.spool import read_header
from relay_operator import k8s, naming
from tests.relay.apphelp import ConfigMapDir, RelayRun, free_port
from tests.relay.smtpsink import SmtpSink
from tests.relay_operator import crd_tools
from tests.relay_operator.conftest import OperatorProcess

PVCS = k8s.PERSISTENTVOLUMECLAIMS
SMTP_PORT = 2525  # the port of crd_tools.edge_relay
STATES = ("incoming", "active", "deferred", "hold", "corrupt")


def mailrelay(replicas: int, drain_timeout: str) -> dict[str, Any]:
    return crd_tools.edge_relay(
        replicas,
        acceptDomains=["example.com"],
        workers=1,
        queue={"retry": {"minBackoff": "1s", "maxBackoff": "3s", "maxLifetime": "1h"}},
        scaleDown={"drainTimeout": drain_timeout},
    )


def route(sink_port: int) -> dict[str, Any]:
    return {
        "apiVersion": naming.API_VERSION,
        "kind": naming.RELAYROUTE_KIND,
        "metadata": {"name": "to-sink", "labels": {"relay": "edge"}},
        "spec": {
            "match": {"recipientDomains": ["example.com"]},
            "nextHop": {"smarthost": {"host": "127.0.0.1", "port": sink_port, "tls": "none"}},
        },
    }


@dataclass
class PodRun:
    name: str
    ip: str
    root: Path  # the pod's files: its claim (spool) and its mounted ConfigMap and Secret
    run: RelayRun
    configmap: ConfigMapDir


@dataclass
class Cluster:
    """The kubelet and Job controller stand-ins for one namespace."""

    kube: Any
    namespace: str
    base: Path
    runs: list[RelayRun]
    pods: dict[str, PodRun] = field(default_factory=dict)
    stopped: dict[str, PodRun] = field(default_factory=dict)
    rendered: str = ""
    ips: dict[str, str] = field(default_factory=dict)  # pod name -> IP, also of removed pods
    # (StatefulSet replicas, {pod: messages in its claim}) each time the kubelet looked
    seen: list[tuple[int, dict[str, int]]] = field(default_factory=list)
    claims_seen_deleted: dict[str, int] = field(default_factory=dict)  # claim -> messages when gone

    def claim_dir(self, ordinal: int) -> Path:
        return self.base / f"spool-edge-{ordinal}"

    def local_path(self, ordinal: int, value: str) -> str:
        if value.startswith("/var/spool/mailrelay"):
            return str(self.claim_dir(ordinal) / value.lstrip("/"))
        if value.startswith("/etc/mailrelay"):
            return str(self.base / f"etc-edge-{ordinal}" / value.lstrip("/"))
        return value

    def dns(self, host: str) -> str:
        """Cluster DNS for the per-pod names of the headless Service."""
        for name, ip in self.ips.items():
            if host == f"{name}.edge-headless.{self.namespace}.svc.cluster.local":
                return ip
        return host

    def localize(self, ordinal: int, ip: str, text: str) -> dict[str, Any]:
        """The rendered relay.yaml as the pod would see it here: paths under its directories,
        every socket on its pod IP, cluster DNS names resolved."""

        def walk(value: Any) -> Any:
            if isinstance(value, dict):
                return {key: walk(item) for key, item in value.items()}
            if isinstance(value, list):
                return [walk(item) for item in value]
            return self.local_path(ordinal, value) if isinstance(value, str) else value

        document: dict[str, Any] = walk(yaml.safe_load(text))
        for listener in document["listeners"]:
            listener["host"] = ip
        document["metrics"]["host"] = ip
        document["handoff"]["host"] = ip
        for peer in (document.get("drain") or {}).get("peers", []):
            peer["host"] = self.dns(peer["host"])
        return document

    def credential(self) -> str:
        secret = self.kube.get(k8s.SECRETS, self.namespace, naming.handoff_secret_name("edge"))
        return base64.b64decode(secret["data"][naming.HANDOFF_SECRET_KEY]).decode()

    def mount_secret(self, ordinal: int) -> None:
        path = Path(self.local_path(ordinal, "/etc/mailrelay/handoff/credential"))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.credential())

    def step(self) -> None:
        """One kubelet round."""
        configmap = self.kube.get(k8s.CONFIGMAPS, self.namespace, naming.configmap_name("edge"))
        text = configmap["data"][naming.CONFIG_KEY] if configmap else ""
        live = {
            p["metadata"]["name"]: p
            for p in self.kube.list(k8s.PODS, self.namespace)
            if not p["metadata"].get("deletionTimestamp")
        }
        for name, pod in list(self.pods.items()):
            if name not in live:  # the StatefulSet controller removed it: its container stops
                pod.run.signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    pod.run.wait(30)
                pod.run.kill()
                self.stopped[name] = self.pods.pop(name)
        for name, body in live.items():
            ip = (body.get("status") or {}).get("podIP")
            if name in self.pods or not ip or not text:
                continue
            self.ips[name] = ip
            ordinal = int(name.rsplit("-", 1)[1])
            self.mount_secret(ordinal)
            config_dir = Path(self.local_path(ordinal, "/etc/mailrelay/config"))
            configmap_dir = ConfigMapDir(config_dir)
            configmap_dir.publish(self.localize(ordinal, ip, text))
            run = RelayRun(configmap_dir.path, env={naming.POD_NAME_ENV: name}).start()
            self.runs.append(run)
            run.wait_for(r"ready \(pid", timeout=60)
            self.pods[name] = PodRun(name, ip, self.claim_dir(ordinal), run, configmap_dir)
        if text != self.rendered:
            for name, pod in self.pods.items():
                ordinal = int(name.rsplit("-", 1)[1])
                pod.configmap.publish(self.localize(ordinal, pod.ip, text))
            self.rendered = text
        sts = self.kube.get(k8s.STATEFULSETS, self.namespace, "edge")
        if sts is not None:
            self.seen.append((int(sts["spec"]["replicas"]), {n: self.queued(n) for n in self.ips}))
        claims = {c["metadata"]["name"] for c in self.kube.list(PVCS, self.namespace)}
        for ordinal in range(5):
            name = f"spool-edge-{ordinal}"
            if (
                self.claim_dir(ordinal).exists()
                and name not in claims
                and name not in self.claims_seen_deleted
            ):
                self.claims_seen_deleted[name] = self.queued(f"edge-{ordinal}")

    def queued(self, pod: str) -> int:
        spool = self.claim_dir(int(pod.rsplit("-", 1)[1])) / "var/spool/mailrelay/queue"
        return sum(1 for state in STATES if (spool / state).is_dir() for _ in (spool / state).iterdir())

    def headers(self, pod: str) -> dict[str, Any]:
        spool = self.claim_dir(int(pod.rsplit("-", 1)[1])) / "var/spool/mailrelay/queue"
        found = {}
        for state in STATES:
            for path in (spool / state).iterdir() if (spool / state).is_dir() else []:
                try:
                    found[path.name] = read_header(path)
                except FileNotFoundError:  # the relay moved it on (active/ -> deferred/) meanwhile
                    continue
        return found

    def run_job(self, job: Mapping[str, Any]) -> subprocess.CompletedProcess[str]:
        """The Job controller and its pod: the Job's command, with its mounts and DNS as here."""
        (container,) = job["spec"]["template"]["spec"]["containers"]
        claim = next(
            v["persistentVolumeClaim"]["claimName"]
            for v in job["spec"]["template"]["spec"]["volumes"]
            if "persistentVolumeClaim" in v
        )
        ordinal = int(claim.rsplit("-", 1)[1])
        self.mount_secret(ordinal)
        args = [self.local_path(ordinal, a) for a in container["args"]]
        target = args.index("--to") + 1
        host, port = args[target].rsplit(":", 1)
        args[target] = f"{self.dns(host)}:{port}"
        done = subprocess.run(
            [sys.executable, "-m", "relay", *args], capture_output=True, text=True, timeout=120, check=False
        )
        succeeded = done.returncode == 0
        conditions = [{"type": "Complete" if succeeded else "Failed", "status": "True"}]
        status = (
            {"succeeded": 1, "conditions": conditions}
            if succeeded
            else {"failed": 1, "conditions": conditions}
        )
        self.kube.merge_patch(
            k8s.JOBS, self.namespace, job["metadata"]["name"], {"status": status}, subresource="status"
        )
        return done


@contextlib.contextmanager
def kubelet(cluster: Cluster) -> Iterator[Callable[[], None]]:
    """The kubelet stand-in in a thread, one round every 0.2 s; yields a function that raises
    what the thread raised."""
    import threading

    stop = threading.Event()
    failure: list[BaseException] = []

    def loop() -> None:
        while not stop.is_set():
            try:
                cluster.step()
            except BaseException as exc:  # reported to the test
                failure.append(exc)
                return
            stop.wait(0.2)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()

    def check() -> None:
        if failure:
            raise failure[0]

    try:
        yield check
    finally:
        stop.set()
        thread.join(60)
    check()


@contextlib.asynccontextmanager
async def relay_pods(
    cluster: Cluster,
    operator: OperatorProcess,
    sink_port: int,
    replicas: int,
    drain_timeout: str,
) -> AsyncIterator[Callable[[], None]]:
    """A MailRelay of `replicas` running pods (the kubelet stand-in at work) whose route goes to
    sink_port (where nothing listens yet: the next hop is down); yields the kubelet's check."""
    cluster.kube.create(k8s.RELAYROUTES, cluster.namespace, route(sink_port))
    cluster.kube.create(k8s.MAILRELAYS, cluster.namespace, mailrelay(replicas, drain_timeout))

    def running() -> bool:
        return len(cluster.pods) == replicas

    with kubelet(cluster) as check:
        await asyncio.to_thread(wait, check, running, f"{replicas} relay pods running", operator)
        yield check


async def send(ip: str, token: str) -> None:
    """One message with DSN parameters on MAIL (RET, ENVID) and RCPT (NOTIFY, ORCPT)."""
    smtp = aiosmtplib.SMTP(
        hostname=ip, port=SMTP_PORT, start_tls=False, timeout=30, local_hostname="client.test"
    )
    await smtp.connect()
    await smtp.ehlo()
    await smtp.mail("sender@sender.test", options=["RET=HDRS", f"ENVID={token}"])
    await smtp.rcpt("user@example.com", options=["NOTIFY=FAILURE,DELAY", "ORCPT=rfc822;user@example.com"])
    body = f"Subject: {token}\r\nFrom: sender@sender.test\r\nX-Token: {token}\r\n\r\nbody {token}\r\n"
    await smtp.data(body.encode())
    await smtp.quit()


def wait(
    check: Callable[[], None],
    probe: Callable[[], Any],
    what: str,
    operator: OperatorProcess,
    timeout: float = 90,
) -> Any:
    def guarded() -> Any:
        check()
        return probe()

    return operator.until(guarded, what, timeout=timeout)


def condition(kube: Any, namespace: str, reason: str) -> dict[str, Any] | None:
    body = kube.get(k8s.MAILRELAYS, namespace, "edge") or {}
    found = next(
        (c for c in (body.get("status") or {}).get("conditions") or [] if c["type"] == "Draining"), None
    )
    return found if found is not None and found["reason"] == reason else None


def tokens_of(sink: SmtpSink) -> list[str]:
    return sorted(m.content.split(b"X-Token: ")[1].split(b"\r\n")[0].decode() for m in sink.messages)


async def queue_everywhere(
    cluster: Cluster, check: Callable[[], None], operator: OperatorProcess, per_pod: int
) -> list[str]:
    tokens = []
    for name, pod in sorted(cluster.pods.items()):
        for index in range(per_pod):
            token = f"{name}-m{index}"
            await send(pod.ip, token)
            tokens.append(token)
    for name in cluster.pods:
        await asyncio.to_thread(
            wait,
            check,
            lambda n=name: (
                cluster.queued(n) == per_pod and all(h.attempts >= 1 for h in cluster.headers(n).values())
            ),
            f"{name}'s mail deferred (next hop down)",
            operator,
        )
    return tokens


async def next_hop_gets_each_once(
    sink_port: int, tokens: list[str], check: Callable[[], None], operator: OperatorProcess
) -> None:
    """The next hop comes up on sink_port: every message arrives there, once (a duplicate
    would come within the retry backoff, hence the pause), with its envelope and DSN options."""
    sink = await SmtpSink(port=sink_port, dsn=True).start()
    try:
        await asyncio.to_thread(
            wait,
            check,
            lambda: len(sink.messages) >= len(tokens),
            "every message at the next hop",
            operator,
            120,
        )
        await asyncio.sleep(2.0)
        assert_delivered_once(sink, tokens)
    finally:
        await sink.stop()


def assert_delivered_once(sink: SmtpSink, tokens: list[str]) -> None:
    assert tokens_of(sink) == sorted(tokens)
    for message in sink.messages:
        assert message.mail_from == "sender@sender.test" and message.rcpt_tos == ["user@example.com"]
        assert message.content.count(b"Received:") == 1  # its first relay's hop only: no hop for a hand-off
        assert message.dsn_mail["RET"] == "HDRS"
        token = message.content.split(b"X-Token: ")[1].split(b"\r\n")[0].decode()
        assert message.dsn_mail["ENVID"] == token
        assert message.dsn_rcpt["user@example.com"] == {
            "NOTIFY": "FAILURE,DELAY",
            "ORCPT": "rfc822;user@example.com",
        }


@pytest.fixture()
def cluster(kube: Any, namespace: str, tmp_path: Path, runs: list[RelayRun]) -> Cluster:
    return Cluster(kube, namespace, tmp_path, runs)


async def test_three_to_one_with_mail_on_every_pod_and_the_next_hop_down(
    cluster: Cluster, kube: Any, namespace: str, operator_process: OperatorProcess
) -> None:
    sink_port = free_port()
    async with relay_pods(cluster, operator_process, sink_port, 3, "10m") as check:
        tokens = await queue_everywhere(cluster, check, operator_process, per_pod=4)
        before = {name: cluster.headers(name) for name in ("edge-1", "edge-2")}

        kube.merge_patch(k8s.MAILRELAYS, namespace, "edge", {"spec": {"replicas": 1}})
        await asyncio.to_thread(
            wait,
            check,
            lambda: not cluster.pods.get("edge-1") and not cluster.pods.get("edge-2"),
            "pods 1 and 2 to be removed",
            operator_process,
            120,
        )
        # The StatefulSet stayed at 3 until pods 1 and 2 were empty.
        shrunk = [queued for replicas, queued in cluster.seen if replicas < 3]
        assert shrunk, "the kubelet never saw the StatefulSet shrink"
        assert shrunk[0]["edge-1"] == shrunk[0]["edge-2"] == 0
        assert all(queued["edge-1"] == queued["edge-2"] == 0 for queued in shrunk)
        assert any(
            replicas == 3 and queued["edge-1"] + queued["edge-2"] > 0 for replicas, queued in cluster.seen
        )
        assert kube.get(k8s.STATEFULSETS, namespace, "edge")["spec"]["replicas"] == 1
        # Everything is on pod 0 now, each handed-off message with its first arrival and attempts.
        kept = cluster.headers("edge-0")
        assert len(kept) == len(tokens)
        for moved in before.values():
            for queue_id, entry in moved.items():
                assert kept[queue_id].arrival == entry.arrival  # maxLifetime counts from here
                assert kept[queue_id].envelope == entry.envelope
                assert kept[queue_id].attempts >= entry.attempts
        # The removed pods' claims go, and only empty.
        await asyncio.to_thread(
            wait,
            check,
            lambda: set(cluster.claims_seen_deleted) == {"spool-edge-1", "spool-edge-2"},
            "the claims of pods 1 and 2 deleted",
            operator_process,
        )
        assert cluster.claims_seen_deleted == {"spool-edge-1": 0, "spool-edge-2": 0}
        assert [c["metadata"]["name"] for c in kube.list(PVCS, namespace)] == ["spool-edge-0"]
        assert await asyncio.to_thread(
            wait, check, lambda: condition(kube, namespace, "NoScaleDown"), "Draining=False", operator_process
        )

        await next_hop_gets_each_once(sink_port, tokens, check, operator_process)
        await asyncio.to_thread(
            wait, check, lambda: cluster.queued("edge-0") == 0, "pod 0's queue empty", operator_process
        )


async def test_a_removed_pods_claim_with_mail_is_drained_by_the_job_then_deleted(
    cluster: Cluster, kube: Any, namespace: str, operator_process: OperatorProcess
) -> None:
    sink_port = free_port()
    async with relay_pods(cluster, operator_process, sink_port, 2, "3s") as check:
        tokens = await queue_everywhere(cluster, check, operator_process, per_pod=3)
        # edge-1's relay dies (its node is gone): it cannot drain, its claim keeps its mail.
        cluster.pods["edge-1"].run.kill()
        kube.merge_patch(k8s.MAILRELAYS, namespace, "edge", {"spec": {"replicas": 1}})
        jobs = await asyncio.to_thread(
            wait, check, lambda: kube.list(k8s.JOBS, namespace), "a drain Job", operator_process, 120
        )
        assert condition(kube, namespace, "DrainingClaims") or condition(kube, namespace, "DrainTimedOut")
        assert cluster.queued("edge-1") == 3 and "spool-edge-1" not in cluster.claims_seen_deleted
        (job,) = jobs
        done = await asyncio.to_thread(cluster.run_job, job)
        assert done.returncode == 0, done.stdout + done.stderr
        assert cluster.queued("edge-1") == 0
        await asyncio.to_thread(
            wait,
            check,
            lambda: "spool-edge-1" in cluster.claims_seen_deleted,
            "the drained claim deleted",
            operator_process,
        )
        assert cluster.claims_seen_deleted == {"spool-edge-1": 0}
        assert cluster.queued("edge-0") == len(tokens)
        await next_hop_gets_each_once(sink_port, tokens, check, operator_process)


async def test_scaling_to_zero_keeps_every_claim_with_its_mail(
    cluster: Cluster, kube: Any, namespace: str, operator_process: OperatorProcess
) -> None:
    async with relay_pods(cluster, operator_process, free_port(), 2, "8s") as check:
        await queue_everywhere(cluster, check, operator_process, per_pod=2)
        started = time.monotonic()
        kube.merge_patch(k8s.MAILRELAYS, namespace, "edge", {"spec": {"replicas": 0}})
        found = await asyncio.to_thread(
            wait, check, lambda: condition(kube, namespace, "NoPeer"), "Draining: NoPeer", operator_process
        )
        assert "no pod remains" in found["message"]
        # The pods drain (no new mail) but keep their queue: nobody can take it.
        for pod in list(cluster.pods.values()):
            await asyncio.to_thread(
                pod.run.wait_for, "draining \\(pod edge-[01] is in drain.pods\\)", timeout=60
            )
            with pytest.raises(aiosmtplib.SMTPException):
                await send(pod.ip, "refused")
        await asyncio.to_thread(
            wait,
            check,
            lambda: not cluster.pods,
            "the pods removed after the drain timeout",
            operator_process,
            120,
        )
        assert time.monotonic() - started >= 8  # not before the drain timeout
        await asyncio.to_thread(
            wait,
            check,
            lambda: condition(kube, namespace, "MailKept"),
            "Draining: MailKept",
            operator_process,
        )
        assert sorted(c["metadata"]["name"] for c in kube.list(PVCS, namespace)) == [
            "spool-edge-0",
            "spool-edge-1",
        ]
        assert cluster.queued("edge-0") == cluster.queued("edge-1") == 2
        assert kube.list(k8s.JOBS, namespace) == []
