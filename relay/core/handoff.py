"""The hand-off between peers of one relay (issue 14, safe scale-down): what travels with a
message besides SMTP's envelope, and when the receiving side takes it.

A draining relay sends each queued message to a remaining peer in an ordinary SMTP transaction
on the peer's handoff listener (relay.handoff_server) after AUTH PLAIN with the relay's shared
secret. The envelope and DSN parameters go as usual (MAIL FROM with RET and ENVID, one RCPT
per pending recipient with NOTIFY and ORCPT); the queue state goes in one MAIL parameter that
only the handoff listener accepts::

    MAIL FROM:<a@b.test> SIZE=123 RET=HDRS ENVID=x XQUEUE=<base64url of the queue entry JSON>

The entry (relay.core.model.QueueEntry, as the spool stores it) keeps the queue id, the first
arrival time (so ``maxLifetime`` and delay warnings count from the first acceptance), the
attempt count, the next attempt, earlier results and delay warnings sent, the original client,
and whether it is held. The content is sent as stored: no ``Received:`` header is added and
the hop count is not checked again (the message is not relayed, it changes spool).

`check_transaction` is the receiving side's consistency rule: the sender and the RCPT list
must be the entry's sender and pending recipients (with the same DSN parameters), so the
stored envelope is exactly what was on the wire.

Pure: no I/O.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence

from relay.core.model import QueueEntry, Recipient
from relay.core.status import Reply

PARAMETER = "XQUEUE"  # the MAIL parameter; refused (555) on every other listener
USER = "handoff"  # the AUTH PLAIN user name a peer sends (the secret is what counts)

MISMATCH = Reply(554, "5.5.4", "Hand-off envelope does not match its queue entry")
BAD_ENTRY = Reply(501, "5.5.4", "Invalid XQUEUE parameter")
NEED_ENTRY = Reply(503, "5.5.1", "A hand-off needs the XQUEUE parameter")


def encode_entry(entry: QueueEntry) -> str:
    """The XQUEUE value for `entry`: base64url without padding (no ``=``, no space)."""
    data = json.dumps(entry.to_json(), separators=(",", ":"), ensure_ascii=True).encode("ascii")
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def decode_entry(value: str | None) -> QueueEntry:
    """The queue entry carried by an XQUEUE value; ValueError when it is not one."""
    if not value:
        raise ValueError("XQUEUE needs a value")
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        entry = QueueEntry.from_json(json.loads(raw))
    except (binascii.Error, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"XQUEUE is not a queue entry: {exc}") from exc
    if not entry.queue_id.isalnum() or not entry.pending:
        raise ValueError("XQUEUE entry has no valid queue id or no pending recipient")
    return entry


def check_transaction(entry: QueueEntry, mail_from: str, recipients: Sequence[Recipient]) -> Reply | None:
    """None when the transaction's sender and recipients are the entry's; else the refusal."""
    if mail_from != entry.envelope.mail_from:
        return MISMATCH
    if sorted(recipients, key=lambda r: r.address) != sorted(entry.pending, key=lambda r: r.address):
        return MISMATCH
    return None
