"""Table tests for relay.core.rcpt.decide_rcpt: syntax, open-relay probes, postmaster,
duplicates, the recipient limit, relay permission and routes (none, RejectHop, by sender)."""

from __future__ import annotations

from typing import Any

import pytest

from relay.config import RelayConfig, parse_config
from relay.core.rcpt import RcptDecision, decide_rcpt, routed_text

CONFIG = parse_config(
    {
        "hostname": "relay.test",
        "listeners": [{"name": "smtp", "host": "127.0.0.1", "port": 2525, "mode": "relay"}],
        "acceptDomains": ["*.corp.example", "example.com", "blocked.example.com", "other.example"],
        "queue": {"directory": "/nonexistent/queue"},
        "limits": {"maxRecipients": 3},
        "routes": [
            {
                "name": "block",
                "priority": 10,
                "match": {"recipientDomains": ["blocked.example.com"]},
                "nextHop": {"kind": "reject", "code": 550, "message": "5.7.1 Mail to this domain is blocked"},
            },
            {
                "name": "partners",
                "priority": 5,
                "match": {"senderDomains": ["partner.example"], "recipientDomains": ["other.example"]},
                "nextHop": {"kind": "mx"},
            },
            {
                "name": "main",
                "match": {"recipientDomains": ["example.com", "*.corp.example"]},
                "nextHop": {"kind": "mx"},
            },
            {"name": "anywhere-else", "match": {"recipientDomains": ["evil.com"]}, "nextHop": {"kind": "mx"}},
        ],
    }
)


def decide(argument: str, config: RelayConfig = CONFIG, **given: Any) -> RcptDecision:
    facts: dict[str, Any] = {
        "mail_from": "a@sender.org",
        "smtputf8": False,
        "esmtp": True,
        "trusted": False,
        "authenticated": False,
        "accepted": set(),
    }
    facts.update(given)
    return decide_rcpt(argument, config=config, routes=config.ordered_routes(), **facts)


def summary(decision: RcptDecision) -> tuple[str, str | None, str | None]:
    """(reply code and enhanced status, reason, recipient added)."""
    code, enhanced = str(decision.reply).split()[:2]
    recipient = decision.recipient.address if decision.recipient is not None else None
    return f"{code} {enhanced}", decision.reason, recipient


@pytest.mark.parametrize(
    ("argument", "given", "expected"),
    [
        # accepted: an accept domain, from anyone
        ("TO:<u@example.com>", {}, ("250 2.1.5", None, "u@example.com")),
        ("TO:<u@mail.corp.example>", {}, ("250 2.1.5", None, "u@mail.corp.example")),
        ("TO: <u@example.com>", {}, ("250 2.1.5", None, "u@example.com")),  # lenient space
        # relay permission: anywhere else only for trusted or authenticated clients
        ("TO:<victim@evil.com>", {}, ("554 5.7.1", "relay_denied", None)),
        ("TO:<victim@evil.com>", {"trusted": True}, ("250 2.1.5", None, "victim@evil.com")),
        ("TO:<victim@evil.com>", {"authenticated": True}, ("250 2.1.5", None, "victim@evil.com")),
        ("TO:<@example.com:victim@evil.com>", {}, ("554 5.7.1", "relay_denied", None)),  # source route
        ("TO:<victim@[127.0.0.1]>", {}, ("554 5.7.1", "relay_denied", None)),
        # routing characters: an open-relay probe (5.7.1), for a client that may not relay
        ("TO:<victim%evil.com@example.com>", {}, ("550 5.7.1", "routing_characters", None)),
        ('TO:<"victim@evil.com"@example.com>', {}, ("550 5.7.1", "routing_characters", None)),
        ("TO:<victim@evil.com@example.com>", {}, ("550 5.7.1", "syntax", None)),
        ("TO:<victim@evil.com@example.com>", {"trusted": True}, ("553 5.1.3", "syntax", None)),
        # syntax and parameters
        ("TO:<>", {}, ("501 5.1.3", "syntax", None)),
        ("TO:<a\x00b@example.com>", {}, ("553 5.1.3", "syntax", None)),  # (the line check says 501 first)
        ("FROM:<u@example.com>", {}, ("501 5.5.4", "syntax", None)),
        ("TO:<u@example.com> NOTIFY=NEVER", {"esmtp": False}, ("501 5.5.4", "syntax", None)),
        ("TO:<u@example.com> FOO=1", {}, ("555 5.5.4", "syntax", None)),
        ("TO:<ü@example.com>", {}, ("553 5.6.7", "syntax", None)),
        ("TO:<ü@example.com>", {"smtputf8": True}, ("250 2.1.5", None, "ü@example.com")),
        # RFC 5321 4.5.1: <postmaster> without a domain, from anyone
        ("TO:<postmaster>", {}, ("250 2.1.5", None, "postmaster@example.com")),
        ("TO:<Postmaster>", {"accepted": {"postmaster@example.com"}}, ("250 2.1.5", None, None)),
        ("TO:<webmaster>", {}, ("553 5.1.3", "syntax", None)),
        # duplicates are answered 250 and kept once, also at the recipient limit
        ("TO:<u@example.com>", {"accepted": {"u@example.com"}}, ("250 2.1.5", None, None)),
        (
            "TO:<u@example.com>",
            {"accepted": {"a@example.com", "b@example.com", "u@example.com"}},
            ("250 2.1.5", None, None),
        ),
        # the recipient limit comes before relay permission (452 even for a relay probe)
        (
            "TO:<v@example.com>",
            {"accepted": {"a@example.com", "b@example.com", "c@example.com"}},
            ("452 4.5.3", "recipients", None),
        ),
        (
            "TO:<v@evil.com>",
            {"accepted": {"a@example.com", "b@example.com", "c@example.com"}},
            ("452 4.5.3", "recipients", None),
        ),
        # routes: RejectHop answers its own reply, no route is 5.4.4, senders can select a route
        ("TO:<x@blocked.example.com>", {}, ("550 5.7.1", "route_reject", None)),
        ("TO:<x@blocked.example.com>", {"trusted": True}, ("550 5.7.1", "route_reject", None)),
        ("TO:<x@other.example>", {}, ("550 5.4.4", "no_route", None)),
        ("TO:<x@other.example>", {"mail_from": "a@partner.example"}, ("250 2.1.5", None, "x@other.example")),
        ("TO:<x@elsewhere.org>", {"trusted": True}, ("550 5.4.4", "no_route", None)),
    ],
)
def test_decide_rcpt(
    argument: str, given: dict[str, Any], expected: tuple[str, str | None, str | None]
) -> None:
    assert summary(decide(argument, **given)) == expected


def test_refusals_carry_their_reply_and_log_text() -> None:
    blocked = decide("TO:<x@blocked.example.com>")
    assert blocked.reply == "550 5.7.1 Mail to this domain is blocked"
    assert blocked.log == "to=<x@blocked.example.com> refused by route block"
    assert decide("TO:<x@other.example>").log == "to=<x@other.example> refused: no route"
    assert decide("TO:<v@evil.com>").log == "to=<v@evil.com> refused: relay_denied"
    assert decide("TO:<>").log == "RCPT refused: 501 5.1.3 The null address is not a valid recipient (" + (
        "The null address is not a valid recipient)"
    )
    full = decide("TO:<v@example.com>", accepted={"a@example.com", "b@example.com", "c@example.com"})
    assert full.log is None  # a client error, not worth a log line
    assert decide("TO:<u@example.com>").log is None


def test_dsn_parameters_are_kept_on_the_recipient() -> None:
    decision = decide("TO:<u@example.com> NOTIFY=FAILURE,DELAY ORCPT=rfc822;u+2Bx@example.com")
    assert decision.recipient is not None
    assert decision.recipient.notify == ("FAILURE", "DELAY")
    assert decision.recipient.orcpt == "rfc822;u+2Bx@example.com"


def test_bare_postmaster_without_a_plain_accept_domain_is_at_the_hostname() -> None:
    config = CONFIG.model_copy(update={"accept_domains": ["*.corp.example"]})
    assert summary(decide("TO:<postmaster>", config)) == ("550 5.4.4", "no_route", None)  # routed
    config = parse_config(
        {
            **CONFIG.model_dump(mode="json", by_alias=True),
            "acceptDomains": ["*.corp.example"],
            "routes": [{"name": "all", "nextHop": {"kind": "mx"}}],
        }
    )
    assert summary(decide("TO:<postmaster>", config)) == ("250 2.1.5", None, "postmaster@relay.test")


@pytest.mark.parametrize(
    ("argument", "routed"),
    [
        ("TO:<a@b>", False),
        ("TO:<a@b@c>", True),
        ("TO:<a%b@c>", True),
        ("TO:<b!a@c>", True),
        (None, False),
    ],
)
def test_routed_text(argument: str | None, routed: bool) -> None:
    assert routed_text(argument) is routed
