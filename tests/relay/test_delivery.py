"""relay.delivery: the pooled SMTP client against real aiosmtpd servers on loopback (trustme
certificates for TLS). Every test runs twice: against the sink as it is (aiosmtpd does not
advertise PIPELINING: one command at a time) and with PIPELINING advertised (aiosmtpd reads
pipelined commands in order), so both paths of relay.smtp_client meet a real server.
Wire-level pipelining cases with scripted servers are in test_smtp_client.py."""

from __future__ import annotations

import email
import email.message
import email.policy
import ssl
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import trustme
import uvloop

from relay import smtp_pool
from relay.config import QueueConfig, SmarthostHop
from relay.core.model import (
    DeliveryRequest,
    Disposition,
    Envelope,
    Message,
    QueueEntry,
    Recipient,
    RecipientOutcome,
)
from relay.delivery import (
    SmtpClient,
    SmtpTarget,
    target_for_hop,
)
from tests.relay.smtpsink import SmtpSink, _Handler, _SinkSMTP
from tests.relay.test_scheduler import free_port

CONTENT = b"From: s@sender.test\r\nSubject: hi\r\n\r\nhello\r\n.leading dot\r\n"
QUEUE = QueueConfig(connect_timeout=2, command_timeout=5, data_timeout=5)


def request(
    recipients: Sequence[str | Recipient], content: bytes = CONTENT, **envelope: Any
) -> DeliveryRequest:
    rcpts = tuple(r if isinstance(r, Recipient) else Recipient(r) for r in recipients)
    envelope.setdefault("mail_from", "s@sender.test")
    entry = QueueEntry("Q1", Envelope(recipients=rcpts, **envelope), 0.0, rcpts)
    return DeliveryRequest(Message(entry, content), rcpts)


@pytest.fixture(autouse=True, params=["lockstep", "pipelined"])
def pipelining(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """In the "pipelined" run the sinks advertise PIPELINING (RFC 2920)."""
    if request.param == "lockstep":
        return False
    original = _Handler.handle_EHLO

    async def handle_ehlo(
        self: _Handler, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        out = await original(self, server, session, envelope, hostname, responses)
        return [*out[:-1], "250-PIPELINING", out[-1]]

    monkeypatch.setattr(_Handler, "handle_EHLO", handle_ehlo)
    return True


@pytest.fixture
async def client() -> AsyncIterator[SmtpClient]:
    c = SmtpClient("relay.test", QUEUE)
    yield c
    await c.close()


@pytest.fixture
async def sinks() -> AsyncIterator[list[SmtpSink]]:
    started: list[SmtpSink] = []
    yield started
    for sink in started:
        await sink.stop()


async def start(sinks: list[SmtpSink], **kwargs: Any) -> SmtpSink:
    sink = await SmtpSink(**kwargs).start()
    sinks.append(sink)
    return sink


def dispositions(outcomes: Sequence[RecipientOutcome]) -> list[tuple[str, str]]:
    return [(o.disposition.value, o.status) for o in outcomes]


# --------------------------------------------------------------------------- transactions


async def test_delivers_with_exact_content_and_one_outcome_per_recipient(
    client: SmtpClient, sinks: list[SmtpSink]
) -> None:
    sink = await start(sinks)
    outcomes = await client.deliver(SmtpTarget("127.0.0.1", sink.port), request(["a@d.test", "b@d.test"]))
    assert dispositions(outcomes) == [("delivered", "2.0.0"), ("delivered", "2.0.0")]
    assert sink.messages[0].content == CONTENT  # dot-stuffing undone by the server
    assert sink.messages[0].rcpt_tos == ["a@d.test", "b@d.test"]
    assert outcomes[0].remote_mta == "127.0.0.1"


async def test_the_client_pipelines_exactly_when_advertised(
    client: SmtpClient, sinks: list[SmtpSink], pipelining: bool
) -> None:
    sink = await start(sinks)
    target = SmtpTarget("127.0.0.1", sink.port)
    await client.deliver(target, request(["a@d.test"]))
    (connection,) = client.pool.destination(target).idle
    assert connection.supports("pipelining") is pipelining


async def test_content_with_bare_line_ends_still_goes_out_with_crlf(
    client: SmtpClient, sinks: list[SmtpSink]
) -> None:
    sink = await start(sinks)
    content = b"Subject: odd\n\nline one\rline two\n.dot\r\n"
    outcomes = await client.deliver(SmtpTarget("127.0.0.1", sink.port), request(["a@d.test"], content))
    assert dispositions(outcomes) == [("delivered", "2.0.0")]
    assert sink.messages[0].content == b"Subject: odd\r\n\r\nline one\r\nline two\r\n.dot\r\n"


async def test_per_recipient_rcpt_results(client: SmtpClient, sinks: list[SmtpSink]) -> None:
    sink = await start(
        sinks, rcpt_replies={"bad@d.test": "550 5.1.1 no such user", "busy@d.test": "452 4.2.2 full"}
    )
    outcomes = await client.deliver(
        SmtpTarget("127.0.0.1", sink.port), request(["ok@d.test", "bad@d.test", "busy@d.test"])
    )
    assert dispositions(outcomes) == [("delivered", "2.0.0"), ("bounced", "5.1.1"), ("deferred", "4.2.2")]
    assert outcomes[1].code == 550 and outcomes[1].text == "no such user"
    assert sink.messages[0].rcpt_tos == ["ok@d.test"]


async def test_all_recipients_refused_sends_no_data_and_keeps_the_connection(
    client: SmtpClient, sinks: list[SmtpSink]
) -> None:
    sink = await start(sinks, rcpt_replies={"bad@d.test": "550 5.1.1 no such user"})
    target = SmtpTarget("127.0.0.1", sink.port)
    assert dispositions(await client.deliver(target, request(["bad@d.test"]))) == [("bounced", "5.1.1")]
    assert dispositions(await client.deliver(target, request(["ok@d.test"]))) == [("delivered", "2.0.0")]
    assert len(sink.messages) == 1
    assert sink.connections == 1


async def test_data_reply_applies_to_every_accepted_recipient(
    client: SmtpClient, sinks: list[SmtpSink]
) -> None:
    sink = await start(sinks, data_replies=["554 5.6.0 content rejected"])
    outcomes = await client.deliver(SmtpTarget("127.0.0.1", sink.port), request(["a@d.test", "b@d.test"]))
    assert dispositions(outcomes) == [("bounced", "5.6.0"), ("bounced", "5.6.0")]


async def test_connection_pool_reuses_one_connection_with_rset(
    client: SmtpClient, sinks: list[SmtpSink]
) -> None:
    sink = await start(sinks)
    target = SmtpTarget("127.0.0.1", sink.port)
    for i in range(5):
        outcomes = await client.deliver(target, request([f"r{i}@d.test"]))
        assert outcomes[0].disposition is Disposition.DELIVERED
    assert len(sink.messages) == 5
    assert sink.connections == 1
    assert client.connections_opened == 1
    assert client.idle_connections() == 1


async def test_busy_pooled_connection_is_reused_without_rset_and_idle_one_is_probed(
    client: SmtpClient, sinks: list[SmtpSink], monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = await start(sinks)
    target = SmtpTarget("127.0.0.1", sink.port)
    rsets: list[str] = []
    original = _SinkSMTP.smtp_RSET

    async def counting_rset(self: _SinkSMTP, arg: str | None) -> None:
        rsets.append("RSET")
        await original(self, arg)

    monkeypatch.setattr(_SinkSMTP, "smtp_RSET", counting_rset)
    for i in range(3):
        outcomes = await client.deliver(target, request([f"r{i}@d.test"]))
        assert outcomes[0].disposition is Disposition.DELIVERED
    assert rsets == []  # reused straight away: no RSET round trip per message
    for connection in client.pool.destination(target).idle:  # as if it had idled for a while
        connection.idle_since -= smtp_pool.PROBE_AFTER_IDLE + 1
    outcomes = await client.deliver(target, request(["late@d.test"]))
    assert outcomes[0].disposition is Disposition.DELIVERED
    assert rsets == ["RSET"]
    assert sink.connections == 1 and len(sink.messages) == 4


async def test_pooled_connection_closing_at_mail_is_retried_on_a_new_one(
    client: SmtpClient, sinks: list[SmtpSink], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server ends a reused session at MAIL (421, as when it shuts down): the message goes
    out on a fresh connection instead of being deferred."""
    sink = await start(sinks)
    target = SmtpTarget("127.0.0.1", sink.port)
    original = _SinkSMTP.smtp_MAIL

    async def mail(self: _SinkSMTP, arg: str | None) -> None:
        served = getattr(self, "served", 0)
        self.served = served + 1
        if served == 1:
            await self.push("421 4.3.2 shutting down")
            self.transport.close()
            return
        await original(self, arg)

    monkeypatch.setattr(_SinkSMTP, "smtp_MAIL", mail)
    first = await client.deliver(target, request(["a@d.test"]))
    second = await client.deliver(target, request(["b@d.test"]))
    assert dispositions(first) == [("delivered", "2.0.0")]
    assert second[0].disposition is Disposition.DELIVERED
    assert [m.rcpt_tos for m in sink.messages] == [["a@d.test"], ["b@d.test"]]
    assert sink.connections == 2


async def test_broken_pooled_connection_is_replaced(client: SmtpClient, sinks: list[SmtpSink]) -> None:
    sink = await start(sinks)
    target = SmtpTarget("127.0.0.1", sink.port)
    await client.deliver(target, request(["a@d.test"]))
    for connection in client.pool.destination(target).idle:  # the server side goes away while it idles
        assert connection.smtp.transport is not None
        connection.smtp.transport.abort()
    outcomes = await client.deliver(target, request(["b@d.test"]))
    assert outcomes[0].disposition is Disposition.DELIVERED
    assert sink.connections == 2


async def test_connection_refused_defers_4_4_1(client: SmtpClient) -> None:
    outcomes = await client.deliver(SmtpTarget("127.0.0.1", free_port()), request(["a@d.test", "b@d.test"]))
    assert dispositions(outcomes) == [("deferred", "4.4.1"), ("deferred", "4.4.1")]


async def test_waits_data_timeout_not_command_timeout_after_final_dot(sinks: list[SmtpSink]) -> None:
    """RFC 5321 4.5.3.2.6: a slow answer after the final dot must not be given up on (a retry
    would deliver a duplicate)."""
    sink = await start(sinks, data_delay=0.8)
    client = SmtpClient("relay.test", QueueConfig(connect_timeout=2, command_timeout=0.3, data_timeout=10))
    try:
        outcomes = await client.deliver(SmtpTarget("127.0.0.1", sink.port), request(["a@d.test"]))
    finally:
        await client.close()
    assert dispositions(outcomes) == [("delivered", "2.0.0")]
    assert len(sink.messages) == 1


async def test_data_timeout_expiry_defers_4_4_2(sinks: list[SmtpSink]) -> None:
    sink = await start(sinks, data_delay=1.0)
    client = SmtpClient("relay.test", QueueConfig(connect_timeout=2, command_timeout=2, data_timeout=0.2))
    try:
        outcomes = await client.deliver(SmtpTarget("127.0.0.1", sink.port), request(["a@d.test"]))
    finally:
        await client.close()
    assert dispositions(outcomes) == [("deferred", "4.4.2")]


# --------------------------------------------------------------------------- DSN parameters


async def test_dsn_parameters_passed_when_advertised(client: SmtpClient, sinks: list[SmtpSink]) -> None:
    sink = await start(sinks, dsn=True)
    rcpt = Recipient("a@d.test", notify=("SUCCESS", "FAILURE"), orcpt="rfc822;A+x@d.test")
    outcomes = await client.deliver(
        SmtpTarget("127.0.0.1", sink.port), request([rcpt, "b@d.test"], ret="HDRS", envid="id=1 x")
    )
    assert [o.relayed for o in outcomes] == [False, False]
    received = sink.messages[0]
    assert received.dsn_mail == {"RET": "HDRS", "ENVID": "id+3D1+20x"}
    assert received.dsn_rcpt == {"a@d.test": {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;A+2Bx@d.test"}}


async def test_dsn_parameters_in_wire_form_are_passed_unchanged(
    client: SmtpClient, sinks: list[SmtpSink]
) -> None:
    sink = await start(sinks, dsn=True)
    rcpt = Recipient("a@d.test", notify=("NEVER",), orcpt="rfc822;a+2Bx@d.test")
    await client.deliver(SmtpTarget("127.0.0.1", sink.port), request([rcpt], envid="id+3D1"))
    received = sink.messages[0]
    assert received.dsn_mail == {"ENVID": "id+3D1"}
    assert received.dsn_rcpt == {"a@d.test": {"NOTIFY": "NEVER", "ORCPT": "rfc822;a+2Bx@d.test"}}


async def test_no_dsn_parameters_and_relayed_without_the_extension(
    client: SmtpClient, sinks: list[SmtpSink]
) -> None:
    sink = await start(sinks, dsn=False)  # would answer 555 to unknown parameters
    rcpt = Recipient("a@d.test", notify=("SUCCESS",), orcpt="rfc822;a@d.test")
    outcomes = await client.deliver(
        SmtpTarget("127.0.0.1", sink.port), request([rcpt], ret="FULL", envid="x")
    )
    assert dispositions(outcomes) == [("delivered", "2.0.0")]
    assert outcomes[0].relayed is True
    assert sink.messages[0].mail_options == [f"SIZE={len(CONTENT)}"]


# --------------------------------------------------------------------------- 8BITMIME / SMTPUTF8

EIGHT_BIT = (
    "From: s@sender.test\r\nSubject: hi\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nGrüße, café\r\n"
).encode()


async def test_8bit_sent_with_body_8bitmime_when_supported(client: SmtpClient, sinks: list[SmtpSink]) -> None:
    sink = await start(sinks)
    outcomes = await client.deliver(
        SmtpTarget("127.0.0.1", sink.port), request(["a@d.test"], content=EIGHT_BIT, body="8BITMIME")
    )
    assert outcomes[0].disposition is Disposition.DELIVERED
    assert "BODY=8BITMIME" in sink.messages[0].mail_options
    assert sink.messages[0].content == EIGHT_BIT


async def test_8bit_converted_for_server_without_8bitmime(client: SmtpClient, sinks: list[SmtpSink]) -> None:
    sink = await start(sinks, eightbit=False)
    outcomes = await client.deliver(
        SmtpTarget("127.0.0.1", sink.port), request(["a@d.test"], content=EIGHT_BIT, body="8BITMIME")
    )
    assert outcomes[0].disposition is Disposition.DELIVERED
    received = sink.messages[0]
    assert received.content.isascii()
    assert not any(o.startswith("BODY=") for o in received.mail_options)
    parsed = email.message_from_bytes(received.content, policy=email.policy.default)
    assert isinstance(parsed, email.message.EmailMessage)
    assert parsed["Content-Transfer-Encoding"] == "quoted-printable"
    assert parsed.get_content().replace("\r\n", "\n") == "Grüße, café\n"
    assert parsed["Subject"] == "hi"


async def test_8bit_header_cannot_be_converted_bounces_5_6_3(
    client: SmtpClient, sinks: list[SmtpSink]
) -> None:
    sink = await start(sinks, eightbit=False)
    content = "From: s@sender.test\r\nSubject: Grüße\r\n\r\nbody\r\n".encode()
    outcomes = await client.deliver(
        SmtpTarget("127.0.0.1", sink.port), request(["a@d.test"], content=content)
    )
    assert dispositions(outcomes) == [("bounced", "5.6.3")]
    assert sink.messages == []


async def test_smtputf8_message_bounces_5_6_7_at_server_without_it(
    client: SmtpClient, sinks: list[SmtpSink]
) -> None:
    sink = await start(sinks, smtputf8=False)
    outcomes = await client.deliver(
        SmtpTarget("127.0.0.1", sink.port), request(["jürgen@d.test"], smtputf8=True, body="8BITMIME")
    )
    assert dispositions(outcomes) == [("bounced", "5.6.7")]
    assert sink.messages == []


async def test_smtputf8_passed_when_supported(client: SmtpClient, sinks: list[SmtpSink]) -> None:
    sink = await start(sinks, smtputf8=True)
    outcomes = await client.deliver(
        SmtpTarget("127.0.0.1", sink.port), request(["jürgen@d.test"], smtputf8=True)
    )
    assert dispositions(outcomes) == [("delivered", "2.0.0")]
    assert "SMTPUTF8" in sink.messages[0].mail_options
    assert sink.messages[0].rcpt_tos == ["jürgen@d.test"]


async def test_ascii_message_with_smtputf8_flag_goes_to_server_without_it(
    client: SmtpClient, sinks: list[SmtpSink]
) -> None:
    sink = await start(sinks, smtputf8=False)
    outcomes = await client.deliver(SmtpTarget("127.0.0.1", sink.port), request(["a@d.test"], smtputf8=True))
    assert dispositions(outcomes) == [("delivered", "2.0.0")]
    assert "SMTPUTF8" not in sink.messages[0].mail_options


# --------------------------------------------------------------------------- TLS and AUTH


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "smarthost.test").configure_cert(context)
    return context


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


async def test_starttls_verified_with_ca_file(
    client: SmtpClient, sinks: list[SmtpSink], server_context: ssl.SSLContext, ca_file: Path
) -> None:
    sink = await start(sinks, starttls_context=server_context)
    hop = SmarthostHop(host="127.0.0.1", port=sink.port, tls="starttls", ca_file=ca_file)
    outcomes = await client.deliver(target_for_hop(hop), request(["a@d.test"]))
    assert dispositions(outcomes) == [("delivered", "2.0.0")]
    assert sink.messages[0].tls is True


async def test_starttls_unverifiable_certificate_defers(
    client: SmtpClient, sinks: list[SmtpSink], server_context: ssl.SSLContext
) -> None:
    sink = await start(sinks, starttls_context=server_context)
    hop = SmarthostHop(host="127.0.0.1", port=sink.port, tls="starttls")  # system store: unknown CA
    outcomes = await client.deliver(target_for_hop(hop), request(["a@d.test"]))
    assert dispositions(outcomes) == [("deferred", "4.7.5")]
    assert sink.messages == []


async def test_starttls_insecure_skip_verify(
    client: SmtpClient, sinks: list[SmtpSink], server_context: ssl.SSLContext
) -> None:
    sink = await start(sinks, starttls_context=server_context)
    hop = SmarthostHop(host="127.0.0.1", port=sink.port, tls="starttls", insecure_skip_verify=True)
    outcomes = await client.deliver(target_for_hop(hop), request(["a@d.test"]))
    assert dispositions(outcomes) == [("delivered", "2.0.0")]
    assert sink.messages[0].tls is True


async def test_starttls_required_but_not_offered_defers(client: SmtpClient, sinks: list[SmtpSink]) -> None:
    sink = await start(sinks)
    hop = SmarthostHop(host="127.0.0.1", port=sink.port, tls="starttls")
    outcomes = await client.deliver(target_for_hop(hop), request(["a@d.test"]))
    assert dispositions(outcomes) == [("deferred", "4.7.10")]
    assert sink.messages == []


async def test_opportunistic_tls_used_when_offered_without_verification(
    client: SmtpClient, sinks: list[SmtpSink], server_context: ssl.SSLContext
) -> None:
    sink = await start(sinks, starttls_context=server_context)
    target = SmtpTarget("127.0.0.1", sink.port, tls="opportunistic", server_name="mx.d.test", verify=False)
    outcomes = await client.deliver(target, request(["a@d.test"]))
    assert dispositions(outcomes) == [("delivered", "2.0.0")]
    assert sink.messages[0].tls is True
    assert outcomes[0].remote_mta == "mx.d.test"


async def test_opportunistic_tls_falls_back_to_cleartext_when_the_handshake_fails(
    client: SmtpClient, sinks: list[SmtpSink], ca: trustme.CA
) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    ca.configure_trust(context)
    context.verify_mode = ssl.CERT_REQUIRED  # we present no client certificate: handshake fails
    sink = await start(sinks, starttls_context=context)
    target = SmtpTarget("127.0.0.1", sink.port, tls="opportunistic", server_name="mx.d.test", verify=False)
    outcomes = await client.deliver(target, request(["a@d.test"]))
    assert dispositions(outcomes) == [("delivered", "2.0.0")]
    assert sink.messages[0].tls is False
    assert sink.connections == 2


async def test_implicit_tls(
    client: SmtpClient, sinks: list[SmtpSink], server_context: ssl.SSLContext, ca_file: Path
) -> None:
    sink = await start(sinks, implicit_tls_context=server_context)
    hop = SmarthostHop(host="127.0.0.1", port=sink.port, tls="implicit", ca_file=ca_file)
    outcomes = await client.deliver(target_for_hop(hop), request(["a@d.test"]))
    assert dispositions(outcomes) == [("delivered", "2.0.0")]


def credentials(tmp_path: Path, username: str, password: str) -> Path:
    directory = tmp_path / "creds"
    directory.mkdir(exist_ok=True)
    (directory / "username").write_text(username + "\n")
    (directory / "password").write_text(password + "\n")
    return directory


async def test_auth_to_smarthost(
    client: SmtpClient, sinks: list[SmtpSink], server_context: ssl.SSLContext, ca_file: Path, tmp_path: Path
) -> None:
    sink = await start(sinks, starttls_context=server_context, users={"relay": "s3cret"})
    hop = SmarthostHop(
        host="127.0.0.1",
        port=sink.port,
        ca_file=ca_file,
        credentials_dir=credentials(tmp_path, "relay", "s3cret"),
    )
    outcomes = await client.deliver(target_for_hop(hop), request(["a@d.test"]))
    assert dispositions(outcomes) == [("delivered", "2.0.0")]
    assert sink.messages[0].login == "relay"


async def test_auth_failure_defers_4_7_8(
    client: SmtpClient, sinks: list[SmtpSink], server_context: ssl.SSLContext, ca_file: Path, tmp_path: Path
) -> None:
    sink = await start(sinks, starttls_context=server_context, users={"relay": "s3cret"})
    hop = SmarthostHop(
        host="127.0.0.1",
        port=sink.port,
        ca_file=ca_file,
        credentials_dir=credentials(tmp_path, "relay", "wrong"),
    )
    outcomes = await client.deliver(target_for_hop(hop), request(["a@d.test"]))
    assert dispositions(outcomes) == [("deferred", "4.7.8")]
    assert sink.messages == []


async def test_without_auth_the_smarthost_refuses(
    client: SmtpClient, sinks: list[SmtpSink], server_context: ssl.SSLContext, ca_file: Path
) -> None:
    sink = await start(sinks, starttls_context=server_context, users={"relay": "s3cret"})
    hop = SmarthostHop(host="127.0.0.1", port=sink.port, ca_file=ca_file)
    outcomes = await client.deliver(target_for_hop(hop), request(["a@d.test"]))
    assert outcomes[0].disposition is Disposition.BOUNCED  # 530 5.7.0 Authentication required
    assert outcomes[0].code == 530


# --------------------------------------------------------------------------- uvloop


def test_starttls_auth_and_reuse_under_uvloop(
    server_context: ssl.SSLContext, ca_file: Path, tmp_path: Path, pipelining: bool
) -> None:
    """The relay process runs on uvloop: STARTTLS (loop.start_tls), AUTH and a pooled
    connection reused for a second message must work there too."""

    async def scenario() -> tuple[list[tuple[str, str]], int, list[bool]]:
        sink = await SmtpSink(starttls_context=server_context, users={"relay": "s3cret"}).start()
        client = SmtpClient("relay.test", QUEUE)
        try:
            hop = SmarthostHop(
                host="127.0.0.1",
                port=sink.port,
                ca_file=ca_file,
                credentials_dir=credentials(tmp_path, "relay", "s3cret"),
            )
            outcomes = [
                *await client.deliver(target_for_hop(hop), request(["a@d.test"])),
                *await client.deliver(target_for_hop(hop), request(["b@d.test"])),
            ]
            return dispositions(outcomes), sink.connections, [m.tls for m in sink.messages]
        finally:
            await client.close()
            await sink.stop()

    assert uvloop.run(scenario()) == ([("delivered", "2.0.0")] * 2, 1, [True, True])
