"""relay.core.settle: what one attempt's outcomes mean for the message (expiry, the DSN owed,
done or deferred), as tables; relay/test_scheduler.py runs the same rules end to end."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from relay.config import RetryPolicyConfig
from relay.core import outcome
from relay.core.model import Disposition, Envelope, QueueEntry, Recipient, RecipientOutcome
from relay.core.settle import Attempted, settle, summary

T0 = 1_700_000_000.0
RETRY = RetryPolicyConfig(min_backoff=300, max_backoff=3600, max_lifetime=86400)
WARN_AFTER = 4 * 3600.0


def rcpt(address: str = "a@d.test", *notify: str) -> Recipient:
    return Recipient(address, notify=tuple(notify))


def entry(*recipients: Recipient, mail_from: str = "s@sender.test", **changes: object) -> QueueEntry:
    base = QueueEntry("Q1", Envelope(mail_from, recipients), T0, recipients)
    return base.with_changes(**changes) if changes else base


def delivered(r: Recipient, *, relayed: bool = False) -> RecipientOutcome:
    return outcome.from_reply(r, 250, "2.0.0 ok", remote_mta="mx.d.test", relayed=relayed)


def deferred(r: Recipient) -> RecipientOutcome:
    return outcome.from_reply(r, 451, "4.3.0 later", remote_mta="mx.d.test")


def bounced(r: Recipient) -> RecipientOutcome:
    return outcome.from_reply(r, 550, "5.1.1 unknown", remote_mta="mx.d.test")


def tried(*outcomes: RecipientOutcome, final_delivery: Sequence[bool] = ()) -> list[Attempted]:
    flags = list(final_delivery) or [False] * len(outcomes)
    return [Attempted(o, "all", f) for o, f in zip(outcomes, flags, strict=True)]


A, B = rcpt("a@d.test"), rcpt("b@d.test")


@pytest.mark.parametrize(
    ("message", "results", "age", "reports", "pending"),
    [
        (entry(A), tried(delivered(A)), 10, [], None),  # done, no NOTIFY: no report
        (entry(A), tried(bounced(A)), 10, [("a@d.test", "failed")], None),  # failures by default
        (entry(A, B), tried(delivered(A), deferred(B)), 10, [], ["b@d.test"]),
        (entry(rcpt("a@d.test", "NEVER")), tried(bounced(rcpt("a@d.test", "NEVER"))), 10, [], None),
        (entry(A, mail_from=""), tried(bounced(A)), 10, [], None),  # never a DSN about <>
        # SUCCESS: relayed (a hop without DSN), delivered (a gateway), nothing (a DSN-capable hop)
        (
            entry(rcpt("a@d.test", "SUCCESS")),
            tried(delivered(rcpt("a@d.test", "SUCCESS"), relayed=True)),
            10,
            [("a@d.test", "relayed")],
            None,
        ),
        (
            entry(rcpt("a@d.test", "SUCCESS")),
            tried(delivered(rcpt("a@d.test", "SUCCESS")), final_delivery=[True]),
            10,
            [("a@d.test", "delivered")],
            None,
        ),
        (entry(rcpt("a@d.test", "SUCCESS")), tried(delivered(rcpt("a@d.test", "SUCCESS"))), 10, [], None),
        # DELAY: once the message is late, once per recipient
        (
            entry(rcpt("a@d.test", "DELAY")),
            tried(deferred(rcpt("a@d.test", "DELAY"))),
            WARN_AFTER - 1,
            [],
            ["a@d.test"],
        ),
        (
            entry(rcpt("a@d.test", "DELAY")),
            tried(deferred(rcpt("a@d.test", "DELAY"))),
            WARN_AFTER,
            [("a@d.test", "delayed")],
            ["a@d.test"],
        ),
        (
            entry(rcpt("a@d.test", "DELAY"), dsn_sent=("a@d.test",)),
            tried(deferred(rcpt("a@d.test", "DELAY"))),
            WARN_AFTER + 3600,
            [],
            ["a@d.test"],
        ),
        (entry(A), tried(deferred(A)), WARN_AFTER, [], ["a@d.test"]),  # no DELAY asked: no warning
        # past maxLifetime a deferral bounces 4.4.7 and is reported as failed
        (entry(A, B), tried(delivered(A), deferred(B)), 86400, [("b@d.test", "failed")], None),
    ],
)
def test_settle(
    message: QueueEntry,
    results: list[Attempted],
    age: float,
    reports: list[tuple[str, str]],
    pending: list[str] | None,
) -> None:
    settlement = settle(message, results, now=T0 + age, retry=RETRY, delay_warning_after=WARN_AFTER)
    assert [(r.outcome.recipient.address, r.action) for r in settlement.reports] == reports
    if pending is None:
        assert settlement.deferred is None
    else:
        assert settlement.deferred is not None
        assert [r.address for r in settlement.deferred.pending] == pending


def test_expired_deferrals_bounce_with_4_4_7_keeping_the_last_reason() -> None:
    settlement = settle(
        entry(A), tried(deferred(A)), now=T0 + 86400, retry=RETRY, delay_warning_after=WARN_AFTER
    )
    (result,) = settlement.results
    assert (result.outcome.disposition, result.outcome.status) == (Disposition.BOUNCED, "4.4.7")
    assert "451 4.3.0 later" in result.outcome.text and result.route == "all"
    assert settlement.reports[0].outcome is result.outcome


def test_the_deferred_entry() -> None:
    earlier = RecipientOutcome(A, Disposition.DEFERRED, 421, "4.4.1", "refused")
    message = entry(A, B, attempts=2, results=(earlier,), dsn_sent=("x@d.test",))
    now = T0 + 600
    settlement = settle(
        message, tried(deferred(A), delivered(B)), now=now, retry=RETRY, delay_warning_after=WARN_AFTER
    )
    updated = settlement.deferred
    assert updated is not None
    assert updated.attempts == 3
    assert updated.next_attempt == now + 1200  # minBackoff * 2**(3-1)
    assert updated.results == (deferred(A), delivered(B))  # the latest outcome of each recipient
    assert updated.dsn_sent == ("x@d.test",)
    assert (updated.queue_id, updated.envelope, updated.arrival) == (message.queue_id, message.envelope, T0)


def test_a_delay_warning_is_remembered() -> None:
    late = rcpt("a@d.test", "DELAY")
    message = entry(late, dsn_sent=("x@d.test",))
    settlement = settle(
        message, tried(deferred(late)), now=T0 + WARN_AFTER, retry=RETRY, delay_warning_after=WARN_AFTER
    )
    assert settlement.deferred is not None
    assert settlement.deferred.dsn_sent == ("x@d.test", "a@d.test")


def test_the_next_attempt_is_never_after_expiry() -> None:
    message = entry(A, attempts=10)
    now = T0 + 86400 - 60
    settlement = settle(message, tried(deferred(A)), now=now, retry=RETRY, delay_warning_after=WARN_AFTER)
    assert settlement.deferred is not None and settlement.deferred.next_attempt == T0 + 86400


def test_summary() -> None:
    assert (
        summary(tried(delivered(A), deferred(B)))
        == "a@d.test=delivered 250 2.0.0, b@d.test=deferred 451 4.3.0"
    )
