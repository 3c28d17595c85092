"""Failover bookkeeping: recipients deferred at one try go on to the next try.

One rule for both places a delivery is tried more than once in an attempt: a route's hops
(nextHop, then each failover hop) and, within an MX hop, the domain's MX hosts and their
addresses (relay.hops runs the one loop over either). A recipient that gets a final outcome
(delivered or bounced) at a try is done: a 5xx is not retried elsewhere. A recipient deferred
(unreachable, 4xx) is passed to the next try; when the tries run out its outcome is the
deferral of the last try that had it. Outcomes come back in the recipients' own order.

Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

from relay.core.model import Disposition, Recipient, RecipientOutcome


class Failover:
    """The recipients still to try, and what each got so far."""

    def __init__(self, recipients: Sequence[Recipient]) -> None:
        self._recipients = tuple(recipients)
        self.pending: list[Recipient] = list(recipients)
        self.tries = 0
        self._final: dict[str, RecipientOutcome] = {}
        self._last: dict[str, RecipientOutcome] = {}

    @property
    def done(self) -> bool:
        """Every recipient has a final outcome: no further try is needed."""
        return not self.pending

    def record(self, outcomes: Sequence[RecipientOutcome]) -> list[Recipient]:
        """The outcomes of one try of `pending` (one each); returns who is still pending."""
        self.tries += 1
        still: list[Recipient] = []
        for result in outcomes:
            address = result.recipient.address
            if result.disposition is Disposition.DEFERRED:
                still.append(result.recipient)
                self._last[address] = result
            else:
                self._final[address] = result
        self.pending = still
        return still

    def outcomes(self) -> list[RecipientOutcome]:
        """One outcome per recipient, in order: its final one, else its last deferral. Only
        after at least one try (`tries`)."""
        return [self._final.get(r.address) or self._last[r.address] for r in self._recipients]
