"""Delivery events for the application that sent the mail: which events one attempt yields,
where each goes, what its body says, how it is signed and when a failed POST is tried again.

- `events_for` turns one attempt's settlement (relay.core.settle) into one event per recipient
  outcome: ``delivered`` (the next hop and its reply), ``deferred`` (the reply and the next
  attempt), ``bounced`` (the reply, and whether a DSN was sent), ``expired`` (a deferral that
  outlived ``maxLifetime``: bounced with 4.4.7, DSN or not). The webhook is the recipient's
  route's ``events`` when it has one, else the relay's; none: no event.
- Signing (`signature`, `verify`): HMAC-SHA256 under the Secret's key over
  ``TIMESTAMP + "." + BODY``, sent as ``X-Mailrelay-Signature: v1=<hex>`` with the timestamp
  (Unix seconds) in ``X-Mailrelay-Timestamp``; a receiver recomputes it and refuses timestamps
  older than `TOLERANCE` (a replayed event). ``X-Mailrelay-Event-Id`` is the event's id, the
  same on every retry (receivers deduplicate with it: delivery is at least once).
- Retries (`retry_delay`): 1 s, 2 s, 4 s, ... at most 10 minutes apart, for `LIFETIME` (3 days);
  then the event is dropped (logged).

Pure: the time is an argument; no I/O. relay.events stores and sends.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from relay.config import EventsConfig, EventWebhookConfig
from relay.core.model import Disposition, QueueEntry
from relay.core.settle import Settlement

TOLERANCE = 300.0  # seconds a receiver accepts a timestamp away from its clock
LIFETIME = 3 * 86400.0  # seconds an undeliverable event is retried
MAX_DELAY = 600.0
SIGNATURE_HEADER = "X-Mailrelay-Signature"
TIMESTAMP_HEADER = "X-Mailrelay-Timestamp"
EVENT_ID_HEADER = "X-Mailrelay-Event-Id"


@dataclass(frozen=True)
class Event:
    """One event and the webhook it goes to."""

    webhook: EventWebhookConfig
    id: str
    body: dict[str, Any]

    def payload(self) -> bytes:
        return json.dumps(self.body, sort_keys=True, separators=(",", ":")).encode()


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def events_for(
    entry: QueueEntry,
    settlement: Settlement,
    *,
    route_events: Mapping[str, EventsConfig | None],
    default: EventsConfig | None,
    now: float,
) -> list[Event]:
    """The events of one attempt at `entry` (see the module doc)."""
    reported = {r.outcome.recipient.address for r in settlement.reports if r.action == "failed"}
    attempt = entry.attempts + 1
    out = []
    for index, result in enumerate(settlement.results):
        config = route_events.get(result.route) or default
        if config is None:
            continue
        outcome = result.outcome
        address = outcome.recipient.address
        kind = outcome.disposition.value
        if outcome.disposition is Disposition.BOUNCED and outcome.status == "4.4.7":
            kind = "expired"
        body: dict[str, Any] = {
            "type": kind,
            "queueId": entry.queue_id,
            "recipient": address,
            "sender": entry.envelope.mail_from,
            "route": result.route,
            "attempt": attempt,
            "time": _iso(now),
            "reply": {"code": outcome.code, "enhanced": outcome.status, "text": outcome.text},
        }
        if outcome.remote_mta:
            body["nextHop"] = outcome.remote_mta
        if kind == "deferred" and settlement.deferred is not None:
            body["nextAttempt"] = _iso(settlement.deferred.next_attempt)
        if kind in ("bounced", "expired"):
            body["dsnSent"] = address in reported
        event_id = f"{entry.queue_id}.{attempt}.{index}"
        body["id"] = event_id
        out.append(Event(config.webhook, event_id, body))
    return out


def signature(key: bytes, timestamp: int, body: bytes) -> str:
    """The ``X-Mailrelay-Signature`` value for `body` sent at `timestamp`."""
    mac = hmac.new(key, str(timestamp).encode() + b"." + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


def verify(key: bytes, timestamp: str, body: bytes, header: str, *, now: float) -> bool:
    """What a receiver checks: the signature matches and the timestamp is recent."""
    if not timestamp.isdigit() or abs(now - int(timestamp)) > TOLERANCE:
        return False
    return hmac.compare_digest(signature(key, int(timestamp), body), header)


def retry_delay(attempts: int) -> float:
    """Seconds before the next POST after `attempts` failed ones (1 s, 2 s, 4 s, ..., 10 min)."""
    return float(min(2.0 ** max(attempts - 1, 0), MAX_DELAY))
