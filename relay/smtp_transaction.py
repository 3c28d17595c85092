"""One SMTP mail transaction as two pure steps around the one await (relay.delivery runs it).

`prepare` decides what to send for a request to a server with the given extensions: the MAIL
and RCPT command lines and the DATA payload, or an answer without sending anything. `interpret`
turns what the server answered (`relay.smtp_client.TransactionReplies`, and the error that
ended the exchange early, if any) into one outcome per recipient and what to do with the
session next. In between, relay.delivery awaits `SmtpConnection.send_mail`.

Rules (RFC 5321 3.3, 4.1.1):
- MAIL FROM with SIZE, BODY=8BITMIME (an 8-bit body, or BODY=8BITMIME from the client),
  SMTPUTF8 and, when the server advertises DSN (RFC 3461), RET and ENVID; one RCPT per recipient
  with NOTIFY and ORCPT when DSN is advertised. Without DSN at the server every delivered
  outcome is ``relayed`` (RFC 3461 4.2).
- A message that needs SMTPUTF8 (a non-ASCII address or header, RFC 6531) is never sent to a
  server without it: bounced 5.6.7. An 8-bit body goes to a server without 8BITMIME converted
  to quoted-printable/base64 (RFC 6152 3); bounced 5.6.3 when it cannot be (8-bit header).
  An address with a control character is never put on the wire (5.1.3).
- Each recipient's own RCPT reply is its outcome when refused; the reply after the final dot
  (or the refusal of DATA) is the outcome of every accepted recipient.
- A session that ended before a reply was read fails the recipients left with 4.4.2; one that
  failed before the server accepted MAIL is marked `before_mail` (a stale pooled session:
  relay.delivery retries on a new one). A refused DATA leaves the transaction open at the
  server, so the session is RSET before reuse; so is one where every RCPT was refused.

Pure: no I/O, no await, no clock.
"""

from __future__ import annotations

import email
import email.encoders
import email.generator
import email.message
import email.policy
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from relay.core import outcome
from relay.core.dkim import SigningPlan
from relay.core.dsn import as_xtext
from relay.core.headers import header_section
from relay.core.model import DeliveryRequest, Envelope, Recipient, RecipientOutcome
from relay.core.smtp_payload import data_payload
from relay.smtp_client import ServerReply, TransactionReplies, UnsafeCommand, command_line

Supports = Callable[[str], bool]  # does the server advertise this EHLO keyword (lower case)?
Sign = Callable[[SigningPlan, bytes], bytes]  # the DKIM-Signature field for this content
After = Literal["reuse", "rset", "drop"]  # what the session is fit for once the transaction ends


class TransactionError(Exception):
    """A failure that applies to every recipient still open in the transaction."""

    def __init__(
        self, code: int, status: str, text: str, *, broken: bool = False, before_mail: bool = False
    ) -> None:
        super().__init__(text)
        self.code = code
        self.status = status
        self.text = text
        self.broken = broken  # the session broke (4.4.2), rather than a refusal
        self.before_mail = before_mail  # the session failed before the server accepted MAIL


def reply_error(reply: ServerReply, *, before_mail: bool = False) -> TransactionError:
    """A refusal (greeting, EHLO, MAIL) that applies to every recipient, worded like an RCPT
    refusal: the enhanced status code apart from the text."""
    status, text = outcome.split_enhanced(reply.code, reply.text)
    return TransactionError(reply.code, status, " ".join(text.split()), before_mail=before_mail)


def failure_outcome(recipient: Recipient, error: TransactionError, remote: str) -> RecipientOutcome:
    """What a transaction-wide failure means for one recipient (`remote`: the Remote-MTA)."""
    if error.status.startswith("4.4.1"):
        return outcome.connection_failed(recipient, error.text, remote_mta=remote)
    if error.broken:
        return outcome.connection_broken(recipient, error.text, remote_mta=remote)
    if error.status.startswith("4."):
        return outcome.deferred(recipient, error.status, error.text, code=error.code, remote_mta=remote)
    if error.status.startswith("5."):
        return outcome.bounced(recipient, error.status, error.text, code=error.code, remote_mta=remote)
    return outcome.from_reply(recipient, error.code, error.text, remote_mta=remote)


@dataclass(frozen=True)
class Prepared:
    """What to send: complete command lines and the DATA payload."""

    mail: bytes
    rcpts: list[bytes]
    payload: bytes
    dsn: bool  # the server advertises DSN (it reports on delivery itself: not "relayed")


@dataclass
class Verdict:
    """How a transaction ended: outcomes by recipient index, an `error` for every recipient
    without one, and what the session is fit for now."""

    results: dict[int, RecipientOutcome] = field(default_factory=dict)
    error: TransactionError | None = None
    after: After = "reuse"


# --------------------------------------------------------------------------- content checks


def orcpt_param(orcpt: str) -> str:
    """``ORCPT=rfc822;a+2Bb@d.test`` from a stored ORCPT (the front keeps the wire form, xtext;
    a value that is not valid xtext is encoded)."""
    addr_type, sep, address = orcpt.partition(";")
    if not sep:
        addr_type, address = "rfc822", orcpt
    return f"ORCPT={addr_type.strip()};{as_xtext(address.strip())}"


def has_8bit(data: bytes) -> bool:
    return not data.isascii()


def needs_smtputf8(envelope: Envelope, recipients: Sequence[Recipient], content: bytes) -> bool:
    """RFC 6531: the message needs SMTPUTF8 when an address or a header field is not ASCII
    (an SMTPUTF8 flag on an all-ASCII message can simply be dropped)."""
    if not envelope.smtputf8:
        return False
    if not envelope.mail_from.isascii() or not all(r.address.isascii() for r in recipients):
        return True
    return has_8bit(header_section(content))


def downgrade_8bit(content: bytes) -> bytes | None:
    """RFC 6152 3 conversion for a server without 8BITMIME: every leaf part with 8-bit content
    is re-encoded (text/* as quoted-printable, the rest as base64); a message without MIME
    headers becomes ``text/plain; charset=unknown-8bit`` (RFC 1428). None when the header itself
    carries 8-bit bytes: that message cannot be made 7-bit (the caller bounces it with 5.6.3)."""
    if has_8bit(header_section(content)):
        return None
    policy = email.policy.compat32.clone(linesep="\r\n", max_line_length=0)
    message = email.message_from_bytes(content, policy=policy)
    if "MIME-Version" not in message:
        message["MIME-Version"] = "1.0"
    if "Content-Type" not in message:
        message["Content-Type"] = "text/plain; charset=unknown-8bit"
    for part in message.walk():
        if part.is_multipart():
            if part.get("Content-Transfer-Encoding", "").lower() in ("8bit", "binary"):
                part.replace_header("Content-Transfer-Encoding", "7bit")
            continue
        raw = part.get_payload(decode=True)
        if not isinstance(raw, bytes) or raw.isascii():
            continue
        del part["Content-Transfer-Encoding"]
        part.set_payload(raw.replace(b"\r\n", b"\n"))
        if part.get_content_maintype() == "text":
            email.encoders.encode_quopri(part)
        else:
            email.encoders.encode_base64(part)
    buffer = io.BytesIO()
    email.generator.BytesGenerator(buffer, mangle_from_=False, policy=policy).flatten(message)
    converted = buffer.getvalue()
    return converted if converted.isascii() else None


def ensure_crlf_end(content: bytes) -> bytes:
    return content if content.endswith(b"\r\n") or not content else content + b"\r\n"


# --------------------------------------------------------------------------- before the await


def _bounce_all(recipients: Sequence[Recipient], status: str, text: str, code: int, remote: str) -> Verdict:
    """Nothing was sent and the session stays as it was."""
    return Verdict(
        {i: outcome.bounced(r, status, text, code=code, remote_mta=remote) for i, r in enumerate(recipients)}
    )


def prepare(
    request: DeliveryRequest,
    supports: Supports,
    *,
    label: str,
    remote: str,
    sign: Sign | None = None,
    extra_mail: Sequence[bytes] = (),
) -> Prepared | Verdict:
    """What to send for `request` to a server with these extensions, or the answer when nothing
    may be sent (`label` names the server in diagnostics, `remote` is the Remote-MTA). With a
    DKIM plan in the request, `sign(plan, content)` gives the DKIM-Signature field, computed
    over the content as it goes on the wire (after any 8BITMIME conversion). `extra_mail`:
    further MAIL parameters (the hand-off's queue entry)."""
    envelope = request.message.entry.envelope
    recipients = request.recipients
    content = ensure_crlf_end(request.message.content)
    utf8 = needs_smtputf8(envelope, recipients, content)
    if utf8 and not supports("smtputf8"):
        text = f"{label} does not support SMTPUTF8, which this message requires (RFC 6531)"
        return _bounce_all(recipients, "5.6.7", text, 553, remote)
    eight_bit = has_8bit(content)
    if eight_bit and not supports("8bitmime") and not utf8:
        converted = downgrade_8bit(content)
        if converted is None:
            text = f"{label} does not support 8BITMIME and the message cannot be converted to 7 bit"
            return _bounce_all(recipients, "5.6.3", text, 554, remote)
        content, eight_bit = converted, False
    if request.dkim is not None and sign is not None:
        content = sign(request.dkim, content) + content

    dsn = supports("dsn")
    mail_options: list[bytes] = []
    if supports("size"):
        mail_options.append(b"SIZE=%d" % len(content))
    if supports("8bitmime") and (eight_bit or envelope.body == "8BITMIME"):
        mail_options.append(b"BODY=8BITMIME")
    if utf8:
        mail_options.append(b"SMTPUTF8")
    if dsn:
        if envelope.ret:
            mail_options.append(f"RET={envelope.ret}".encode())
        if envelope.envid:
            mail_options.append(f"ENVID={as_xtext(envelope.envid)}".encode())
    mail_options.extend(extra_mail)
    encoding = "utf-8" if utf8 else "ascii"
    try:
        mail = command_line(b"MAIL FROM:<" + envelope.mail_from.encode(encoding) + b">", *mail_options)
        rcpts = [
            command_line(b"RCPT TO:<" + r.address.encode(encoding) + b">", *_rcpt_options(r, dsn))
            for r in recipients
        ]
    except UnicodeEncodeError as exc:  # pragma: no cover - needs_smtputf8 covers this
        error = TransactionError(553, "5.6.7", f"address cannot be sent without SMTPUTF8: {exc}")
        return Verdict(error=error, after="drop")
    except UnsafeCommand as exc:  # the front refuses such addresses; never put them on the wire
        return Verdict(error=TransactionError(553, "5.1.3", f"address cannot be sent: {exc}"), after="drop")
    # The front's check of the stored content holds while the content is the stored one.
    wire_ready = request.message.entry.wire_ready and content is request.message.content
    return Prepared(mail, rcpts, data_payload(content, wire_ready=wire_ready), dsn)


def _rcpt_options(recipient: Recipient, dsn: bool) -> list[bytes]:
    options: list[bytes] = []
    if dsn:
        if recipient.notify:
            options.append(("NOTIFY=" + ",".join(recipient.notify)).encode())
        if recipient.orcpt:
            options.append(orcpt_param(recipient.orcpt).encode())
    return options


# --------------------------------------------------------------------------- after the await


def interpret(
    prepared: Prepared,
    recipients: Sequence[Recipient],
    replies: TransactionReplies,
    *,
    failure: Exception | None,
    connected: bool,
    remote: str,
) -> Verdict:
    """The outcome of every recipient from the replies read (`failure`: what ended the exchange
    before all of them were, `connected`: whether the session is still up)."""
    mail = replies.mail
    if mail is None:
        return Verdict(
            error=TransactionError(421, "4.4.2", f"MAIL failed: {failure}", broken=True, before_mail=True),
            after="drop",
        )
    if mail.code != 250:
        return Verdict(error=reply_error(mail, before_mail=mail.code == 421), after="drop")  # 421: closing

    verdict = Verdict()
    accepted: list[int] = []
    for index, reply in enumerate(replies.recipients):
        if reply.code in (250, 251):
            accepted.append(index)
        else:
            verdict.results[index] = outcome.from_reply(
                recipients[index], reply.code, reply.text, remote_mta=remote
            )
    if len(replies.recipients) < len(recipients):  # 421 at RCPT, or the connection broke
        text = f"RCPT failed: {failure}" if failure else replies.recipients[-1].text
        verdict.error, verdict.after = TransactionError(421, "4.4.2", text, broken=True), "drop"
        return verdict
    if not accepted:  # no content was sent; the transaction is still open at the server
        verdict.after = "drop" if failure is not None else "rset"
        return verdict

    data = replies.data
    final = replies.final if data is not None and data.code == 354 else data
    if final is None:
        step = "DATA" if data is None or not replies.content_sent else "the reply to the final dot"
        verdict.error = TransactionError(421, "4.4.2", f"{step} failed: {failure}", broken=True)
        verdict.after = "drop"
        return verdict
    for index in accepted:
        verdict.results[index] = outcome.from_reply(
            recipients[index], final.code, final.text, remote_mta=remote, relayed=not prepared.dsn
        )
    if not connected:
        verdict.after = "drop"
    elif final is data:  # DATA refused: the transaction (MAIL, RCPT) is still open at the server
        verdict.after = "rset"
    return verdict
