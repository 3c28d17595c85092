"""Delivery status notifications (Postfix's bounce daemon): RFC 3464 reports for RFC 3461 requests.

After each delivery attempt relay.core.settle calls `reportable` to pick the recipients a
report is owed for; the scheduler then calls `build_dsn` to write the report and `envelope_for`
for its envelope, and queues it as a new message from the null sender ``<>`` to the original
envelope sender.

Rules:
- Never report on a message from ``<>`` (RFC 5321 4.5.5, RFC 3461 6.2: that is how bounce loops
  are prevented); `reportable` returns nothing for it.
- NOTIFY (RFC 3461 4.1): NEVER suppresses every report; without NOTIFY only failures are
  reported; FAILURE, DELAY and SUCCESS ask for "failed", "delayed" and "delivered"/"relayed".
  A message handed to a next hop that supports DSN is not reported as delivered here (that hop
  now owns the request, RFC 3461 6.2.1); handed to a hop without DSN it is "relayed" (6.2.2);
  stored by a gateway (final delivery) it is "delivered". "delayed" goes once per recipient,
  when NOTIFY asks for DELAY and the message is older than the scheduler's delay-warning age.
- The report (RFC 3464 2) is ``multipart/report; report-type=delivery-status``: a human
  readable text part, a ``message/delivery-status`` part (per message: Original-Envelope-Id,
  Reporting-MTA, Received-From-MTA, Arrival-Date; per recipient: Original-Recipient (ORCPT),
  Final-Recipient, Action, Status, Remote-MTA, Diagnostic-Code, Last-Attempt-Date,
  Will-Retry-Until for delays) and the returned content: the whole message
  (``message/rfc822``) or only its header (``text/rfc822-headers``) as RET asks (RFC 3461 4.3).
  Without RET the whole message is returned up to `FULL_RETURN_LIMIT` bytes, the header beyond.

Built with the standard library email package; pure (the caller passes the time and names).
"""

from __future__ import annotations

import email
import email.generator
import email.message
import email.policy
import email.utils
import io
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from email.mime.base import MIMEBase
from email.mime.message import MIMEMessage
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from typing import Literal

from relay.core.headers import header_section
from relay.core.model import Disposition, Envelope, QueueEntry, Recipient, RecipientOutcome
from relay.core.outcome import diagnostic

Action = Literal["failed", "delayed", "delivered", "relayed", "expanded"]

FULL_RETURN_LIMIT = 1024 * 1024  # bytes of original message returned when RET was not given

_POLICY = email.policy.compat32.clone(linesep="\r\n", max_line_length=0)

_XTEXT = re.compile(r"^(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*$")
_XTEXT_ESCAPE = re.compile(r"\+([0-9A-F]{2})")


# --------------------------------------------------------------------------- xtext (RFC 3461 4)
# The front stores ENVID and ORCPT as they came on the wire (xtext); DSN fields carry them decoded.


def is_xtext(value: str) -> bool:
    """Printable ASCII except ``+`` and ``=``, with ``+HH`` escapes (RFC 3461 4)."""
    return bool(_XTEXT.match(value))


def xtext_encode(value: str) -> str:
    """Encode every octet outside ``!``..``~``, and ``+`` and ``=``, as ``+HH``."""
    out = []
    for byte in value.encode("utf-8"):
        if 33 <= byte <= 126 and byte not in (0x2B, 0x3D):
            out.append(chr(byte))
        else:
            out.append(f"+{byte:02X}")
    return "".join(out)


def xtext_decode(value: str) -> str:
    """``a+2Bb`` -> ``a+b`` (escaped octets are UTF-8)."""
    raw = _XTEXT_ESCAPE.sub(lambda m: f"\x00{m.group(1)}", value)
    if "\x00" not in raw:
        return value
    data = bytearray()
    parts = raw.split("\x00")
    data += parts[0].encode("utf-8")
    for part in parts[1:]:
        data.append(int(part[:2], 16))
        data += part[2:].encode("utf-8")
    return data.decode("utf-8", errors="replace")


def as_xtext(value: str) -> str:
    """The wire form of a stored ENVID/ORCPT value: kept when it already is xtext, encoded otherwise."""
    return value if is_xtext(value) else xtext_encode(value)


def orcpt_address(orcpt: str) -> tuple[str, str]:
    """(address type, decoded address) of a stored ``rfc822;xtext`` ORCPT value."""
    addr_type, sep, address = orcpt.partition(";")
    if not sep:
        return "rfc822", xtext_decode(orcpt.strip())
    return addr_type.strip().lower(), xtext_decode(address.strip())


@dataclass(frozen=True)
class Report:
    """One recipient's line in a DSN."""

    outcome: RecipientOutcome
    action: Action


def action_for(
    outcome: RecipientOutcome, *, final_delivery: bool = False, delay_warning: bool = False
) -> Action | None:
    """The DSN action owed for one outcome, or None when no report is due (RFC 3461 4.1, 6.2).

    `final_delivery`: the hop stored the message for good (a gateway), so SUCCESS is answered
    with "delivered". `delay_warning`: relay.core.settle decided a deferred recipient is now late
    enough for a "delayed" report (only sent when NOTIFY explicitly asks for DELAY)."""
    notify = {n.upper() for n in outcome.recipient.notify}
    if "NEVER" in notify:
        return None
    if outcome.disposition is Disposition.BOUNCED:
        return "failed" if not notify or "FAILURE" in notify else None
    if outcome.disposition is Disposition.DELIVERED:
        if "SUCCESS" not in notify:
            return None
        if outcome.relayed:
            return "relayed"
        return "delivered" if final_delivery else None
    if delay_warning and "DELAY" in notify:
        return "delayed"
    return None


def reportable(
    envelope: Envelope,
    outcomes: Sequence[RecipientOutcome],
    *,
    final_delivery: Sequence[bool] | None = None,
    delay_warning: bool = False,
    already_warned: Collection[str] = (),
) -> list[Report]:
    """The reports owed for `outcomes` of one attempt; none at all for a message from ``<>``.

    `delay_warning`: the message is late enough for "delayed" reports; a recipient in
    `already_warned` got its one delay warning before and gets no second one."""
    if envelope.mail_from == "":
        return []
    reports = []
    for index, outcome in enumerate(outcomes):
        final = bool(final_delivery[index]) if final_delivery is not None else False
        warn = delay_warning and outcome.recipient.address not in already_warned
        action = action_for(outcome, final_delivery=final, delay_warning=warn)
        if action is not None:
            reports.append(Report(outcome, action))
    return reports


def _date(timestamp: float) -> str:
    return email.utils.formatdate(timestamp, localtime=False, usegmt=True)


def _address_type(address: str) -> str:
    return "utf-8" if not address.isascii() else "rfc822"


def _human_text(entry: QueueEntry, reports: Sequence[Report], reporting_mta: str) -> str:
    failed = [r for r in reports if r.action == "failed"]
    delayed = [r for r in reports if r.action == "delayed"]
    succeeded = [r for r in reports if r.action in ("delivered", "relayed")]
    lines = [f"This is the mail system at host {reporting_mta}.", ""]
    if failed:
        lines += [
            "I'm sorry to have to inform you that your message could not",
            "be delivered to one or more recipients. It's attached below.",
            "",
        ]
    if delayed:
        lines += [
            "Your message could not be delivered yet to one or more recipients.",
            "The mail system will keep trying; you do not need to send it again.",
            "",
        ]
    if succeeded:
        lines += ["Your message was delivered (or relayed onward) to the recipients listed below.", ""]
    for report in reports:
        outcome = report.outcome
        where = f" (remote host {outcome.remote_mta})" if outcome.remote_mta else ""
        lines.append(f"<{outcome.recipient.address}>: {report.action}{where}:")
        lines.append(f"    {outcome.code} {outcome.status} {outcome.text}")
    lines += ["", f"Queue id of the original message: {entry.queue_id}"]
    return "\r\n".join(lines) + "\r\n"


def _per_message_fields(entry: QueueEntry, reporting_mta: str) -> email.message.Message:
    fields = email.message.Message(policy=_POLICY)
    if entry.envelope.envid:
        fields["Original-Envelope-Id"] = xtext_decode(entry.envelope.envid)
    fields["Reporting-MTA"] = f"dns; {reporting_mta}"
    if entry.helo:
        received_from = f"dns; {entry.helo}"
        if entry.client_address:
            received_from += f" ([{entry.client_address}])"
        fields["Received-From-MTA"] = received_from
    fields["Arrival-Date"] = _date(entry.arrival)
    return fields


def _per_recipient_fields(report: Report, now: float, retry_until: float | None) -> email.message.Message:
    outcome = report.outcome
    recipient: Recipient = outcome.recipient
    fields = email.message.Message(policy=_POLICY)
    if recipient.orcpt:
        addr_type, address = orcpt_address(recipient.orcpt)
        fields["Original-Recipient"] = f"{addr_type};{address}"
    fields["Final-Recipient"] = f"{_address_type(recipient.address)};{recipient.address}"
    fields["Action"] = report.action
    fields["Status"] = outcome.status
    if outcome.remote_mta:
        fields["Remote-MTA"] = f"dns; {outcome.remote_mta}"
    if outcome.code or outcome.text:
        fields["Diagnostic-Code"] = diagnostic(outcome)
    fields["Last-Attempt-Date"] = _date(now)
    if report.action == "delayed" and retry_until is not None:
        fields["Will-Retry-Until"] = _date(retry_until)
    return fields


def _subject(reports: Sequence[Report]) -> str:
    actions = {r.action for r in reports}
    if "failed" in actions:
        return "Undelivered Mail Returned to Sender"
    if "delayed" in actions:
        return "Delayed Mail (still being retried)"
    return "Successful Mail Delivery Report"


def build_dsn(
    entry: QueueEntry,
    content: bytes,
    reports: Sequence[Report],
    *,
    reporting_mta: str,
    now: float,
    message_id: str,
    retry_until: float | None = None,
) -> bytes:
    """The RFC 3464 report (CRLF line ends) about `reports` for the message `entry`/`content`.

    The caller sends it with ``MAIL FROM:<>`` to `entry.envelope.mail_from` (see `envelope_for`).
    """
    if not reports:
        raise ValueError("a DSN needs at least one recipient report")
    if entry.envelope.mail_from == "":
        raise ValueError("never send a DSN about a message from the null sender")
    report = MIMEMultipart("report", report_type="delivery-status", policy=_POLICY)
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{reporting_mta}>"
    report["To"] = f"<{entry.envelope.mail_from}>"
    report["Subject"] = _subject(reports)
    report["Date"] = _date(now)
    report["Message-ID"] = f"<{message_id}@{reporting_mta}>"
    report["Auto-Submitted"] = "auto-replied"  # RFC 3834 5
    report.preamble = "This is a MIME-encapsulated message."

    human = MIMEText(_human_text(entry, reports, reporting_mta), "plain", "us-ascii", policy=_POLICY)
    human["Content-Description"] = "Notification"
    report.attach(human)

    status = MIMEBase("message", "delivery-status", policy=_POLICY)
    status["Content-Description"] = "Delivery report"
    blocks: list[email.message.Message | str] = [_per_message_fields(entry, reporting_mta)]
    blocks += [_per_recipient_fields(r, now, retry_until) for r in reports]
    status.set_payload(blocks)
    report.attach(status)

    ret = (entry.envelope.ret or "").upper()
    full = ret == "FULL" or (ret != "HDRS" and len(content) <= FULL_RETURN_LIMIT)
    if full:
        original = email.message_from_bytes(content, policy=_POLICY)
        returned: email.message.Message = MIMEMessage(original, policy=_POLICY)
        returned["Content-Description"] = "Undelivered Message"
    else:
        headers = header_section(content).decode("utf-8", errors="replace")
        charset = "us-ascii" if headers.isascii() else "utf-8"
        returned = MIMEText(headers, "rfc822-headers", charset, policy=_POLICY)
        returned["Content-Description"] = "Undelivered Message Headers"
    report.attach(returned)
    for part in (human, status, returned):
        del part["MIME-Version"]

    buffer = io.BytesIO()
    email.generator.BytesGenerator(buffer, mangle_from_=False, policy=_POLICY).flatten(report)
    return buffer.getvalue()


def envelope_for(entry: QueueEntry, content: bytes) -> Envelope:
    """The envelope of a DSN about `entry`: from ``<>`` to the original sender (nobody reports
    on mail from ``<>``, so no NOTIFY is needed); BODY=8BITMIME when the report carries 8-bit
    content (a returned 8-bit message)."""
    return Envelope(
        mail_from="",
        recipients=(Recipient(entry.envelope.mail_from),),
        body="8BITMIME" if not content.isascii() else None,
        smtputf8=not entry.envelope.mail_from.isascii(),
    )
