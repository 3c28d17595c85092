"""The pure rules of the hand-off (relay.core.handoff), the /queue document
(relay.queue_status) and the spool's id time and snapshot, as tables."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from relay.core.handoff import MISMATCH, check_transaction, decode_entry, encode_entry
from relay.core.model import Disposition, Envelope, QueueEntry, Recipient, RecipientOutcome
from relay.queue_status import metrics_text, queue_status
from relay.spool import QueueSnapshot, Spool, new_queue_id, queue_id_time

ALICE = Recipient("alice@example.com", notify=("SUCCESS", "FAILURE"), orcpt="rfc822;alice+2Bx@example.com")
BOB = Recipient("bob@example.com")
ENTRY = QueueEntry(
    queue_id="18B3F2A9C1D04E7A3F0",
    envelope=Envelope(
        "s@sender.test", (ALICE, BOB), body="8BITMIME", smtputf8=True, ret="HDRS", envid="x+2By"
    ),
    arrival=1_800_000_000.5,
    pending=(ALICE, BOB),
    attempts=7,
    next_attempt=1_800_003_600.0,
    results=(RecipientOutcome(BOB, Disposition.DEFERRED, 451, "4.4.1", "down", "mx.test"),),
    client_address="10.0.0.9",
    helo="client.test",
    dsn_sent=("bob@example.com",),
    held=True,
)


def test_the_queue_entry_travels_whole() -> None:
    value = encode_entry(ENTRY)
    assert " " not in value and "=" not in value and "+" not in value
    assert decode_entry(value) == ENTRY


@pytest.mark.parametrize("value", [None, "", "!!!", "e30", encode_entry(ENTRY.with_changes(pending=()))])
def test_what_is_not_a_queue_entry(value: str | None) -> None:
    with pytest.raises(ValueError):
        decode_entry(value)


@pytest.mark.parametrize(
    ("mail_from", "rcpts", "ok"),
    [
        ("s@sender.test", [BOB, ALICE], True),  # order does not matter
        ("other@sender.test", [ALICE, BOB], False),
        ("s@sender.test", [ALICE], False),
        ("s@sender.test", [ALICE, BOB, Recipient("eve@example.com")], False),
        ("s@sender.test", [Recipient("alice@example.com"), BOB], False),  # DSN parameters lost
    ],
)
def test_the_transaction_must_be_the_entrys(mail_from: str, rcpts: list[Recipient], ok: bool) -> None:
    assert check_transaction(ENTRY, mail_from, rcpts) == (None if ok else MISMATCH)


def test_queue_ids_carry_their_time() -> None:
    queue_id = new_queue_id()
    when = queue_id_time(queue_id)
    assert when is not None and abs(when - time.time()) < 60
    assert queue_id_time("not-an-id") is None and queue_id_time("ZZZZZZZZZZZZZ123456") is None


@pytest.mark.parametrize(
    ("counts", "draining", "busy", "drained"),
    [
        ({}, True, False, True),
        ({}, True, True, False),  # a session may be in a transaction
        ({}, False, False, False),  # not draining: never "drained"
        ({"active": 1}, True, False, False),
        ({"corrupt": 1}, True, False, False),  # a quarantined file keeps the volume
    ],
)
def test_drained_means_draining_empty_and_idle(
    counts: dict[str, int], draining: bool, busy: bool, drained: bool
) -> None:
    full = {state: counts.get(state, 0) for state in ("incoming", "active", "deferred", "hold", "corrupt")}
    snapshot = QueueSnapshot(full, 100.0 if sum(full.values()) else None)
    report = queue_status(snapshot, pod="edge-1", draining=draining, busy=busy, handed_off=3, now=160.0)
    assert report["drained"] is drained
    assert report["depth"] == sum(full.values()) and report["handedOff"] == 3
    assert report["oldestAgeSeconds"] == (60.0 if sum(full.values()) else 0.0)


def test_snapshot_counts_states_and_finds_the_oldest(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "q")
    spool.prepare()
    old, new = "00000000F4240000000", new_queue_id()  # 1,000,000 microseconds: 1 s after the epoch
    (tmp_path / "q" / "deferred" / old).write_bytes(b"x")
    (tmp_path / "q" / "hold" / new).write_bytes(b"x")
    snapshot = spool.snapshot()
    spool.close()
    assert snapshot.counts["deferred"] == 1 and snapshot.counts["hold"] == 1 and snapshot.depth == 2
    assert snapshot.oldest == 1.0
    text = metrics_text(snapshot, now=50.0)
    assert "mailrelay_queue_depth 2\n" in text and "mailrelay_queue_oldest_age_seconds 49.0\n" in text
