"""The RCPT decision: whether the front accepts one recipient of the current transaction.

`decide_rcpt` judges one ``RCPT TO:`` argument, in this order:

1. Syntax and parameters (relay.core.smtp_syntax): a path that is not an address is ``553
   5.1.3`` (``501`` for ``<>``), except that a client which may not relay and wrote routing
   characters (several ``@``, ``%``, ``!``) gets ``550 5.7.1``: an open-relay probe, not a typo.
2. ``<postmaster>`` without a domain (RFC 5321 4.5.1) stands for ``postmaster@`` the first plain
   accept domain, else the hostname (relay.core.addresses.postmaster_address), and is relayed
   for anyone.
3. A recipient already accepted is answered ``250`` again and kept once.
4. ``limits.maxRecipients`` reached: ``452 4.5.3`` (the client sends the rest in another
   transaction).
5. Relay permission (relay.core.addresses.relay_permission): trusted network, authenticated or
   an accept domain; else ``554 5.7.1``, or ``550 5.7.1`` for routing characters in the local
   part.
6. A route must match (relay.core.routing.select_route, first of the ordered routes): none is
   ``550 5.4.4``; a RejectHop route answers with its own configured reply.

Whether an accepted recipient of an accept domain exists (recipient verification, no
backscatter) is asked after this, by the front (relay.recipient_verify, relay.core.recipients).
The decision carries the reply, the recipient to add when accepted (and its route), and for a refusal the
``mailrelay_rejected`` reason and the log text. What it must not do: count metrics, log, or
keep the transaction (the front does), or decide anything about delivery. Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from relay.config import RejectHop, RelayConfig, RouteConfig
from relay.core import status
from relay.core.addresses import RelayDecision, domain_of, postmaster_address, relay_permission
from relay.core.model import Recipient
from relay.core.routing import select_route
from relay.core.smtp_syntax import CommandError, parse_path, parse_rcpt_params
from relay.core.status import Reply, reject_reply


@dataclass(frozen=True)
class RcptDecision:
    reply: Reply | str
    recipient: Recipient | None = None  # accepted and new: add it to the transaction
    reason: str | None = None  # refused: the mailrelay_rejected reason
    log: str | None = None  # refused: what to log after the queue id
    route: RouteConfig | None = None  # accepted: the route it takes (a callout may ask its hop)


def routed_text(path_argument: str | None) -> bool:
    """Whether a raw RCPT argument carries source-routing characters (several ``@``, ``%``, ``!``)."""
    text = path_argument or ""
    return text.count("@") > 1 or "%" in text or "!" in text


def decide_rcpt(
    argument: str | None,
    *,
    mail_from: str,
    smtputf8: bool,
    esmtp: bool,
    trusted: bool,
    authenticated: bool,
    accepted: Collection[str],
    config: RelayConfig,
    routes: Sequence[RouteConfig],
) -> RcptDecision:
    """Judge ``RCPT TO:<argument>`` in a transaction from `mail_from` that has already
    `accepted` these recipient addresses; `routes` in `config.ordered_routes()` order."""
    try:
        path = parse_path(argument, "TO:", utf8=smtputf8, null_allowed=False)
        if path.params and not esmtp:
            raise CommandError(status.BAD_ARGUMENTS, "parameters need EHLO")
        params = parse_rcpt_params(path.params)
    except CommandError as exc:
        reply = exc.reply
        if reply == status.BAD_RECIPIENT and not (trusted or authenticated) and routed_text(argument):
            reply = status.ROUTING_CHARACTERS
        return RcptDecision(reply, reason="syntax", log=f"RCPT refused: {reply} ({exc})")
    bare_postmaster = not path.domain
    if bare_postmaster:
        address = postmaster_address(config.hostname, config.accept_domains)
        path = dataclasses.replace(path, address=address, local="postmaster", domain=domain_of(address))
    if path.address in accepted:
        return RcptDecision(status.RECIPIENT_OK)  # a duplicate is delivered once
    if len(accepted) >= config.limits.max_recipients:
        return RcptDecision(status.TOO_MANY_RECIPIENTS, reason="recipients")
    decision = (
        RelayDecision(True, "postmaster")
        if bare_postmaster
        else relay_permission(
            path.local,
            path.domain,
            trusted=trusted,
            authenticated=authenticated,
            accept_domains=config.accept_domains,
        )
    )
    if not decision.allowed:
        reply = status.ROUTING_CHARACTERS if decision.reason == "routing_characters" else status.RELAY_DENIED
        refusal = f"to=<{path.address}> refused: {decision.reason}"
        return RcptDecision(reply, reason=decision.reason, log=refusal)
    route = select_route(routes, mail_from, path.address)
    if route is None:
        return RcptDecision(status.NO_ROUTE, reason="no_route", log=f"to=<{path.address}> refused: no route")
    if isinstance(route.next_hop, RejectHop):
        return RcptDecision(
            reject_reply(route.next_hop.code, route.next_hop.message),
            reason="route_reject",
            log=f"to=<{path.address}> refused by route {route.name}",
        )
    recipient = Recipient(address=path.address, notify=params.notify, orcpt=params.orcpt)
    return RcptDecision(status.RECIPIENT_OK, recipient=recipient, route=route)
