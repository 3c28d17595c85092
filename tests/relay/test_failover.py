"""relay.core.failover: recipients deferred at one try go to the next; final outcomes stay."""

from __future__ import annotations

from relay.core import outcome
from relay.core.failover import Failover
from relay.core.model import Recipient

A, B, C = Recipient("a@d.test"), Recipient("b@d.test"), Recipient("c@d.test")


def test_deferred_recipients_go_on_and_final_ones_stay() -> None:
    failover = Failover([A, B, C])
    assert failover.pending == [A, B, C] and not failover.done
    first = [
        outcome.from_reply(A, 451, "4.2.0 busy"),
        outcome.from_reply(B, 550, "5.1.1 unknown"),  # a 5xx is final: not tried elsewhere
        outcome.from_reply(C, 421, "4.4.1 down"),
    ]
    assert failover.record(first) == [A, C]
    assert failover.pending == [A, C]
    second = [outcome.from_reply(A, 250, "ok"), outcome.from_reply(C, 452, "4.3.1 full")]
    assert failover.record(second) == [C]
    assert failover.tries == 2 and not failover.done
    got = [(o.recipient, o.code) for o in failover.outcomes()]
    assert got == [(A, 250), (B, 550), (C, 452)]  # in the recipients' order; C: its last deferral


def test_done_when_no_recipient_is_left() -> None:
    failover = Failover([A])
    failover.record([outcome.from_reply(A, 250, "ok")])
    assert failover.done and failover.pending == []
    assert [o.code for o in failover.outcomes()] == [250]


def test_no_try_yet() -> None:
    failover = Failover([A, B])
    assert failover.tries == 0 and failover.pending == [A, B]
