"""What the hand-off tests share (issue 14): peers of one relay as real `mailrelay relay`
subprocesses on loopback, each with its own spool, metrics port and handoff port, one shared
credential file, and a next hop (a sink) that may be down.

    pair = Peers(tmp_path, sink_port, names=["edge-0", "edge-1"])
    pair.start(runs)                        # RelayRun per pod, MAILRELAY_POD_NAME set
    pair.drain(["edge-1"])                  # publish drain.pods / drain.peers to every pod
    pair.counts("edge-0")                   # messages per spool state, from the files
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiosmtplib

from relay.spool import read_header
from tests.relay.apphelp import ConfigMapDir, RelayRun, free_port, http_get, relay_to_sink_config

SECRET = "s3cret-handoff-credential"
STATES = ("incoming", "active", "deferred", "hold", "corrupt")


class Pod:
    def __init__(
        self,
        base: Path,
        name: str,
        sink_port: int,
        credential: Path,
        retry: dict[str, str] | None = None,
        workers: int = 1,
    ) -> None:
        self.name = name
        self.dir = base / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.smtp_port = free_port()
        self.metrics_port = free_port()
        self.handoff_port = free_port()
        self.spool = self.dir / "queue"
        self.configmap = ConfigMapDir(self.dir / "config")
        self.data = relay_to_sink_config(
            self.dir,
            hostname=f"{name}.relay.test",
            domains=["example.com"],
            smtp_port=self.smtp_port,
            metrics_port=self.metrics_port,
            sink_port=sink_port,
            workers=workers,
            handoff={"host": "127.0.0.1", "port": self.handoff_port, "credentialFile": str(credential)},
        )
        if retry is not None:
            self.data["queue"] = {**self.data["queue"], "retry": retry}
        self.configmap.publish(self.data)
        self.runs: list[RelayRun] = []

    @property
    def run(self) -> RelayRun:
        return self.runs[-1]

    def start(self, runs: list[RelayRun]) -> RelayRun:
        run = RelayRun(self.configmap.path, env={"MAILRELAY_POD_NAME": self.name}).start()
        runs.append(run)
        self.runs.append(run)
        run.wait_for(r"ready \(pid", timeout=60)
        return run

    def publish(self, **changes: Any) -> None:
        self.data = {**self.data, **changes}
        for key, value in list(self.data.items()):
            if value is None:
                del self.data[key]
        self.configmap.publish(self.data)

    def counts(self) -> dict[str, int]:
        result = {}
        for state in STATES:
            folder = self.spool / state
            result[state] = sum(1 for _ in folder.iterdir()) if folder.is_dir() else 0
        return result

    def queued(self) -> int:
        return sum(self.counts().values())

    def ids(self, state: str) -> set[str]:
        folder = self.spool / state
        return {p.name for p in folder.iterdir()} if folder.is_dir() else set()

    def queue(self) -> dict[str, Any]:
        status, body = http_get(self.metrics_port, "/queue")
        assert status == 200, body
        data: dict[str, Any] = json.loads(body)
        return data

    def metric(self, name: str, **labels: str) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        _status, text = http_get(self.metrics_port, "/metrics")
        total = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
        return total

    def headers(self) -> dict[str, Any]:
        """Queue id -> (state, entry) of every message in the spool."""
        found = {}
        for state in STATES:
            folder = self.spool / state
            for path in folder.iterdir() if folder.is_dir() else []:
                found[path.name] = (state, read_header(path))
        return found


class Peers:
    def __init__(
        self,
        tmp_path: Path,
        sink_port: int,
        names: list[str],
        retry: dict[str, str] | None = None,
        workers: dict[str, int] | None = None,
    ) -> None:
        self.credential = tmp_path / "handoff-credential"
        self.credential.write_text(SECRET + "\n")
        self.pods = {
            name: Pod(tmp_path, name, sink_port, self.credential, retry, (workers or {}).get(name, 1))
            for name in names
        }

    def __getitem__(self, name: str) -> Pod:
        return self.pods[name]

    def start(self, runs: list[RelayRun]) -> None:
        for pod in self.pods.values():
            pod.start(runs)

    def drain(self, names: list[str]) -> None:
        """What the operator renders into the one ConfigMap: drain these, to the others."""
        if not names:
            for pod in self.pods.values():
                pod.publish(drain=None)
            return
        peers = [
            {"host": "127.0.0.1", "port": pod.handoff_port}
            for pod in self.pods.values()
            if pod.name not in names
        ]
        for pod in self.pods.values():
            pod.publish(drain={"pods": names, "peers": peers})


async def send_dsn_message(port: int, token: str, rcpts: list[str] | None = None) -> str:
    """One message with DSN parameters on MAIL (RET, ENVID) and RCPT (NOTIFY, ORCPT)."""
    rcpts = rcpts or ["user@example.com"]
    smtp = aiosmtplib.SMTP(
        hostname="127.0.0.1", port=port, start_tls=False, timeout=30, local_hostname="client.test"
    )
    await smtp.connect()
    await smtp.ehlo()
    await smtp.mail("sender@sender.test", options=["RET=HDRS", f"ENVID={token}"])
    for rcpt in rcpts:
        await smtp.rcpt(rcpt, options=["NOTIFY=FAILURE,DELAY", f"ORCPT=rfc822;{rcpt}"])
    body = f"Subject: {token}\r\nFrom: sender@sender.test\r\nX-Token: {token}\r\n\r\nbody {token}\r\n"
    response = await smtp.data(body.encode())
    await smtp.quit()
    return response.message
