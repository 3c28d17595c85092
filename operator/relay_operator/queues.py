"""What each relay pod says about its queue: ``GET http://<podIP>:<metrics port>/queue``.

The relay's health server answers with the pod's queue counts (docs: /work/shared/team/
ISSUE14-INTERFACE.md, relay side): depth, deferred, held, the oldest message's age counted from
its first acceptance, whether it drains and whether it is drained (draining, empty and nothing
in flight). `QueueReport.parse` reads that body strictly; `HttpQueueProbe` is the one adapter
that asks (blocking, short timeouts: the reconcile path runs in kopf's thread pool and must not
hang on a pod that does not answer). A pod that cannot be asked is a report with `error` set,
never an exception.

Called by the reconcile path; decides nothing about scale-downs (`reconcile` does).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class QueueReport:
    """One pod's answer (or why there is none: `error`)."""

    pod: str
    depth: int = 0
    deferred: int = 0
    held: int = 0
    oldest_age_seconds: float = 0.0
    draining: bool = False
    drained: bool = False
    handed_off: int = 0
    relay_safe: bool | None = None  # the pod's last open-relay self-check (None: none ran)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def failed(cls, pod: str, error: str) -> QueueReport:
        return cls(pod=pod, error=error)

    @classmethod
    def parse(cls, pod: str, body: Any) -> QueueReport:
        """A /queue body → a report; a body that is not what the relay sends is an error report."""
        if not isinstance(body, Mapping):
            return cls.failed(pod, "the /queue answer is not a JSON object")
        if body.get("pod") not in (None, pod):
            # The pod's IP now belongs to another pod (or the relay runs under another name).
            return cls.failed(pod, f"the /queue answer is from pod {body.get('pod')!r}, not {pod!r}")
        try:
            counts = {key: _count(body, key) for key in ("depth", "deferred", "held", "handedOff")}
            age = body.get("oldestAgeSeconds", 0)
            if isinstance(age, bool) or not isinstance(age, int | float) or age < 0:
                raise ValueError("oldestAgeSeconds is not a non-negative number")
            flags = {key: body.get(key, False) for key in ("draining", "drained")}
            if not all(isinstance(value, bool) for value in flags.values()):
                raise ValueError("draining and drained must be booleans")
            relay_safe = body.get("relaySafe")
            if relay_safe is not None and not isinstance(relay_safe, bool):
                raise ValueError("relaySafe must be a boolean or null")
        except ValueError as exc:
            return cls.failed(pod, f"the /queue answer is not usable: {exc}")
        return cls(
            pod=pod,
            depth=counts["depth"],
            deferred=counts["deferred"],
            held=counts["held"],
            handed_off=counts["handedOff"],
            oldest_age_seconds=float(age),
            draining=flags["draining"],
            drained=flags["drained"] and counts["depth"] == 0,
            relay_safe=relay_safe,
        )


def _count(body: Mapping[str, Any], key: str) -> int:
    value = body.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key} is not a non-negative integer")
    return value


class QueueProbe(Protocol):
    """Asks one pod for its queue."""

    def __call__(self, pod: str, ip: str, port: int) -> QueueReport: ...


class HttpQueueProbe:
    """`QueueProbe` over plain HTTP to the pod's IP (the metrics port is not TLS)."""

    def __init__(self, timeout: float = 3.0) -> None:
        self.timeout = timeout
        # Straight to the pod: never through an HTTP proxy from the environment.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def __call__(self, pod: str, ip: str, port: int) -> QueueReport:
        host = f"[{ip}]" if ":" in ip else ip
        url = f"http://{host}:{port}/queue"
        try:
            with self._opener.open(url, timeout=self.timeout) as response:
                return QueueReport.parse(pod, json.loads(response.read()))
        except urllib.error.HTTPError as exc:
            return QueueReport.failed(pod, f"GET {url}: HTTP {exc.code}")
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            return QueueReport.failed(pod, f"GET {url}: {reason}")
        except ValueError:
            return QueueReport.failed(pod, f"GET {url}: the answer is not JSON")
