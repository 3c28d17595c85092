"""Fixtures for the operator's tests: the Kubernetes API emulator on loopback, a client for it,
one fresh namespace per test, and bounded polling helpers (no fixed sleeps)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.relay.apphelp import free_port
from tests.relay_operator.crd_tools import operator_rules
from tests.relay_operator.k8s_emulator import EmulatorThread, KubernetesApiEmulator

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "crds"
T = TypeVar("T")
TOKEN = "emulator-token"  # the emulator refuses requests without it (401), like a real server
OPERATOR_IMAGE = "registry.example.com/mailrelay:e2e"  # what the e2e operator gives relay pods
OPERATOR_TOKEN = "operator-token"  # may do only what operator/relay_operator/rbac.yaml grants


class RawHttp:
    """Plain HTTP against the emulator, to check exact status codes and bodies."""

    def __init__(self, base: str, token: str | None = TOKEN) -> None:
        self.base = base
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def __call__(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Content-Type", content_type)
        for key, value in self.headers.items():
            request.add_header(key, value)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def watch(self, path: str, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The first `count` events of a watch (the server closes it after `timeout` seconds)."""
        sep = "&" if "?" in path else "?"
        url = f"{self.base}{path}{sep}watch=true&timeoutSeconds={int(timeout)}"
        events: list[dict[str, Any]] = []
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=self.headers), timeout=timeout + 5
        ) as response:
            for line in response:
                if line.strip():
                    events.append(json.loads(line))
                if len(events) >= count:
                    break
        return events


def wait_for(probe: Callable[[], T | None], *, timeout: float = 20.0, what: str = "condition") -> T:
    """Poll `probe` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")


@pytest.fixture(scope="session")
def emulator() -> Iterator[EmulatorThread]:
    cluster_rules, _ = operator_rules(all_namespaces=True, peering=False)  # the chart's default
    grants = {OPERATOR_TOKEN: cluster_rules}
    with EmulatorThread(KubernetesApiEmulator(token=TOKEN, grants=grants)) as server:
        if any(CRDS.glob("*.y*ml")):
            server.call(lambda: server.emulator.load_crds(CRDS))
        yield server


@pytest.fixture(scope="session")
def kubeconfig(emulator: EmulatorThread, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return emulator.kubeconfig(tmp_path_factory.mktemp("kube") / "config")


@pytest.fixture(scope="session")
def operator_kubeconfig(emulator: EmulatorThread, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The operator's credentials: bound to the RBAC rules the Helm chart installs."""
    return emulator.kubeconfig(tmp_path_factory.mktemp("kube") / "operator", token=OPERATOR_TOKEN)


@pytest.fixture()
def http(emulator: EmulatorThread) -> RawHttp:
    return RawHttp(emulator.url)


@pytest.fixture(scope="session")
def kube(kubeconfig: Path) -> Iterator[Any]:
    from relay_operator.k8s import ClientKubeApi

    api = ClientKubeApi.from_environment(kubeconfig=str(kubeconfig))
    yield api
    api.close()


@pytest.fixture()
def namespace(emulator: EmulatorThread) -> str:
    name = f"t-{uuid.uuid4().hex[:10]}"
    status, _ = RawHttp(emulator.url)("POST", "/api/v1/namespaces", {"metadata": {"name": name}})
    assert status == 201
    return name


class OperatorProcess:
    """`mailrelay operator` as a subprocess against the emulator (the real command, real kopf)."""

    def __init__(
        self, kubeconfig: Path, log: Path, *scope: str, peering: tuple[str, int] | None = None
    ) -> None:
        self.log = log
        self.liveness = f"http://127.0.0.1:{free_port()}/healthz"
        self.metrics_port = free_port()  # its Prometheus metrics (relay_operator.metrics)
        command = [
            str(Path(sys.executable).parent / "mailrelay"),
            "operator",
            *(scope or ("--all-namespaces",)),
            *(
                ("--standalone",)
                if peering is None
                else ("--peering", peering[0], "--priority", str(peering[1]))
            ),
            "--kubeconfig",
            str(kubeconfig),
            "--liveness",
            self.liveness,
            "--resync-interval",
            "3s",
            "--retry-delay",
            "1s",
            "--drain-poll",
            "1s",
            "--image",
            OPERATOR_IMAGE,
            "--image-pull-policy",
            "Always",
            "--metrics-port",
            str(self.metrics_port),
        ]
        env = dict(os.environ, KUBECONFIG=str(kubeconfig), PYTHONUNBUFFERED="1")
        self._log_file = log.open("wb")
        self.process = subprocess.Popen(command, stdout=self._log_file, stderr=subprocess.STDOUT, env=env)

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def wait_alive(self, timeout: float = 30.0) -> None:
        def probe() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"the operator exited with {self.process.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.liveness, timeout=2) as response:
                    return bool(response.status == 200)
            except (urllib.error.URLError, OSError):
                return False

        wait_for(probe, timeout=timeout, what="the operator's liveness endpoint")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._log_file.close()
        return int(self.process.returncode)

    def until(self, probe: Callable[[], T | None], what: str, timeout: float = 20.0) -> T:
        """`wait_for`, with the operator's log in the failure message."""
        try:
            return wait_for(probe, timeout=timeout, what=what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- operator log (tail) ---\n{self.tail()}") from None


@pytest.fixture(scope="session")
def operator_process(
    operator_kubeconfig: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    process = OperatorProcess(operator_kubeconfig, tmp_path_factory.mktemp("operator") / "operator.log")
    try:
        process.wait_alive()
        yield process
    finally:
        code = process.stop()
    assert code == 0, f"the operator did not stop cleanly on SIGTERM ({code}):\n{process.tail()}"
