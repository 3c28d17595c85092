"""relay.core.outcome: reply codes to per-recipient outcomes."""

from __future__ import annotations

import pytest

from relay.core import outcome
from relay.core.model import Disposition, Recipient

R = Recipient("a@d.test")


@pytest.mark.parametrize(
    ("code", "text", "disposition", "status", "rest"),
    [
        (250, "2.0.0 Ok: queued as X", Disposition.DELIVERED, "2.0.0", "Ok: queued as X"),
        (251, "User not local; will forward", Disposition.DELIVERED, "2.0.0", "User not local; will forward"),
        (450, "4.2.1 mailbox busy", Disposition.DEFERRED, "4.2.1", "mailbox busy"),
        (421, "closing", Disposition.DEFERRED, "4.0.0", "closing"),
        (550, "5.1.1 <a@d.test>: unknown", Disposition.BOUNCED, "5.1.1", "<a@d.test>: unknown"),
        (554, "no", Disposition.BOUNCED, "5.0.0", "no"),
        (550, "4.1.1 class mismatch", Disposition.BOUNCED, "5.1.1", "class mismatch"),  # reply code wins
        (552, "5.3.4   too\r\n  big", Disposition.BOUNCED, "5.3.4", "too big"),
    ],
)
def test_from_reply(code: int, text: str, disposition: Disposition, status: str, rest: str) -> None:
    result = outcome.from_reply(R, code, text, remote_mta="mx.d.test")
    assert (result.disposition, result.status, result.text, result.code) == (disposition, status, rest, code)
    assert result.remote_mta == "mx.d.test"


def test_relayed_only_for_delivered() -> None:
    assert outcome.from_reply(R, 250, "ok", relayed=True).relayed is True
    assert outcome.from_reply(R, 550, "no", relayed=True).relayed is False


def test_connection_failures_defer() -> None:
    failed = outcome.connection_failed(R, "refused")
    broken = outcome.connection_broken(R, "reset")
    assert (failed.disposition, failed.status) == (Disposition.DEFERRED, "4.4.1")
    assert (broken.disposition, broken.status) == (Disposition.DEFERRED, "4.4.2")
    assert not outcome.is_final(failed)


def test_expire_bounces_with_4_4_7_keeping_the_reason() -> None:
    last = outcome.from_reply(R, 451, "4.3.0 try later", remote_mta="mx.d.test")
    expired = outcome.expire(last)
    assert (expired.disposition, expired.status) == (Disposition.BOUNCED, "4.4.7")
    assert "451 4.3.0 try later" in expired.text
    assert expired.remote_mta == "mx.d.test"
    assert outcome.is_final(expired)


def test_deferred_needs_a_transient_status() -> None:
    with pytest.raises(ValueError):
        outcome.deferred(R, "5.0.0", "x")


def test_diagnostic() -> None:
    remote = outcome.from_reply(R, 550, "5.1.1 nope", remote_mta="mx.d.test")
    assert outcome.diagnostic(remote) == "smtp; 550 5.1.1 nope"
    local = outcome.connection_failed(R, "refused")
    assert outcome.diagnostic(local) == "x-mailrelay; 421 4.4.1 connection failed: refused"


def test_one_each_defers_the_recipients_a_transport_forgot() -> None:
    other = Recipient("b@d.test")
    given = outcome.from_reply(other, 250, "ok")
    done = outcome.one_each([R, other], [given])
    assert done[1] is given
    assert (done[0].recipient, done[0].disposition, done[0].status) == (R, Disposition.DEFERRED, "4.3.0")


def test_for_all_and_delivered() -> None:
    both = outcome.for_all([R, Recipient("b@d.test")], outcome.delivered, "stored", relayed=True)
    assert [(o.recipient.address, o.code, o.status, o.text, o.relayed) for o in both] == [
        ("a@d.test", 250, "2.0.0", "stored", True),
        ("b@d.test", 250, "2.0.0", "stored", True),
    ]
