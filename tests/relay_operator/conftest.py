"""Fixtures for the operator's tests: the Kubernetes API emulator on loopback, a client for it,
one fresh namespace per test, and bounded polling helpers (no fixed sleeps)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.relay_operator.k8s_emulator import EmulatorThread

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "crds"
T = TypeVar("T")


class RawHttp:
    """Plain HTTP against the emulator, to check exact status codes and bodies."""

    def __init__(self, base: str) -> None:
        self.base = base

    def __call__(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Content-Type", content_type)
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
        with urllib.request.urlopen(url, timeout=timeout + 5) as response:
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
    with EmulatorThread() as server:
        if any(CRDS.glob("*.y*ml")):
            server.call(lambda: server.emulator.load_crds(CRDS))
        yield server


@pytest.fixture(scope="session")
def kubeconfig(emulator: EmulatorThread, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return emulator.kubeconfig(tmp_path_factory.mktemp("kube") / "config")


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
