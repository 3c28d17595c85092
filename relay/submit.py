"""Submitting a composed message to a relay over SMTP: the user agent's one network adapter.

`submit()` opens one SMTP session with aiosmtplib (RFC 5321; submission RFC 6409): implicit TLS
(RFC 8314) or STARTTLS (RFC 3207) with certificate verification against the system store or a
given CA file, AUTH (RFC 4954) only over TLS or loopback, SMTPUTF8 (RFC 6531) when the message
needs it (a clear `SubmitError` when the server does not offer it), BODY=8BITMIME (RFC 6152) and
SIZE (RFC 1870) when useful. It sends RCPT for each recipient separately and reports each reply,
so one refused recipient does not hide the others, and it sends DATA when at least one recipient
was accepted.

Called by `relay.cli.send`; it decides nothing about the message (that is `relay.core.compose`) and
prints nothing (progress goes to a callback). Failures that stop the whole submission (cannot
connect, TLS, AUTH, sender refused, missing extension, connection lost) raise `SubmitError` with
the library exception chained; per-recipient refusals are values in the `SubmitResult`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import aiosmtplib

from relay.core.compose import Submission
from relay.tasks import cancel_and_wait

TlsChoice = Literal["none", "starttls", "implicit"]
Progress = Callable[[int, int], None]  # (bytes sent, total bytes)
CONNECT_TIMEOUT = 30.0  # seconds to open the connection (and TLS handshake for implicit TLS)
PROGRESS_INTERVAL = 0.25  # seconds between progress reports while DATA is being written


class SubmitError(Exception):
    """The message could not be submitted at all; the text says why and what to do. `kind` says
    at which step (``connect``, ``greeting``, ``tls``, ``auth``, ``extension``, ``sender``,
    ``session``) and `code` is the server's reply code when it gave one (`mailrelay sendmail`
    maps both to its exit status)."""

    def __init__(self, message: str, *, kind: str = "session", code: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.code = code


@dataclass(frozen=True)
class ServerOptions:
    """Where and how to submit."""

    host: str
    port: int
    tls: TlsChoice = "starttls"
    ca_file: Path | None = None
    insecure: bool = False  # skip certificate verification
    user: str | None = None
    password: str | None = None
    timeout: float = 600.0  # RFC 5321 4.5.3.2.6: 10 minutes for the reply to the final dot
    local_hostname: str | None = None


@dataclass(frozen=True)
class RecipientResult:
    """What the server answered for one recipient (RCPT, or DATA for the accepted ones)."""

    address: str
    accepted: bool
    code: int
    text: str
    stage: str = "rcpt"  # which reply this is: to RCPT, or to DATA for a recipient RCPT accepted


@dataclass(frozen=True)
class SubmitResult:
    recipients: tuple[RecipientResult, ...]
    server: str  # host:port

    @property
    def all_accepted(self) -> bool:
        return all(result.accepted for result in self.recipients)


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def tls_context(options: ServerOptions) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(options.ca_file) if options.ca_file else None)
    if options.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _reply(exc: aiosmtplib.SMTPResponseException) -> str:
    return f"{exc.code} {exc.message}"


async def _connect(client: aiosmtplib.SMTP, options: ServerOptions, context: ssl.SSLContext) -> None:
    where = f"{options.host}:{options.port}"
    try:
        await client.connect(timeout=min(options.timeout, CONNECT_TIMEOUT))
        await client.ehlo()
    except ssl.SSLError as exc:
        raise SubmitError(f"TLS with {where} failed: {exc.reason or exc}", kind="tls") from exc
    except aiosmtplib.SMTPResponseException as exc:
        raise SubmitError(
            f"{where} refused the session: {_reply(exc)}", kind="greeting", code=exc.code
        ) from exc
    except (aiosmtplib.SMTPException, OSError) as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, ssl.SSLError) else exc
        raise SubmitError(f"cannot connect to {where}: {cause}", kind="connect") from exc
    if options.tls != "starttls":
        return
    if not client.supports_extension("starttls"):
        raise SubmitError(
            f"{where} does not offer STARTTLS; use --tls implicit, or --tls none on a trusted network",
            kind="extension",
        )
    try:
        await client.starttls(tls_context=context)
        await client.ehlo()
    except ssl.SSLError as exc:
        raise SubmitError(f"STARTTLS with {where} failed: {exc.reason or exc}", kind="tls") from exc
    except aiosmtplib.SMTPResponseException as exc:
        raise SubmitError(f"STARTTLS with {where} refused: {_reply(exc)}", kind="tls", code=exc.code) from exc
    except (aiosmtplib.SMTPException, OSError) as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, ssl.SSLError) else exc
        raise SubmitError(f"STARTTLS with {where} failed: {cause}", kind="tls") from exc


async def _login(client: aiosmtplib.SMTP, options: ServerOptions) -> None:
    if options.user is None:
        return
    where = f"{options.host}:{options.port}"
    if not client.supports_extension("auth"):
        raise SubmitError(
            f"{where} does not offer AUTH; drop --user or use its submission port", kind="extension"
        )
    try:
        await client.login(options.user, options.password or "")
    except aiosmtplib.SMTPResponseException as exc:
        raise SubmitError(
            f"authentication as {options.user!r} failed: {_reply(exc)}", kind="auth", code=exc.code
        ) from exc
    except aiosmtplib.SMTPException as exc:
        raise SubmitError(f"authentication as {options.user!r} failed: {exc}", kind="auth") from exc


def _mail_options(client: aiosmtplib.SMTP, submission: Submission, where: str) -> list[str]:
    options: list[str] = []
    if submission.smtputf8:
        if not client.supports_extension("smtputf8"):
            raise SubmitError(
                f"the envelope has non-ASCII addresses, which need SMTPUTF8 (RFC 6531), and {where} "
                "does not offer it; use ASCII addresses or another server",
                kind="extension",
            )
        options.append("SMTPUTF8")
    if submission.eight_bit:
        if client.supports_extension("8bitmime"):
            options.append("BODY=8BITMIME")
        elif not submission.smtputf8:
            raise SubmitError(
                f"the message has 8-bit content and {where} does not offer 8BITMIME; "
                "re-encode it (quoted-printable or base64)",
                kind="extension",
            )
    if client.supports_extension("size"):
        limit = client.esmtp_extensions.get("size", "")
        if limit.isdigit() and int(limit) and len(submission.content) > int(limit):
            raise SubmitError(
                f"the message is {len(submission.content)} bytes; {where} accepts at most {limit}",
                kind="extension",
                code=552,
            )
        options.append(f"SIZE={len(submission.content)}")
    return options


async def _report_progress(client: aiosmtplib.SMTP, total: int, progress: Progress) -> None:
    """Bytes still in the transport's write buffer tell how far DATA has got."""
    started = False
    while True:
        transport = client.transport
        pending = transport.get_write_buffer_size() if isinstance(transport, asyncio.WriteTransport) else 0
        if pending:
            started = True
        if started:
            progress(max(0, total - pending), total)
        await asyncio.sleep(PROGRESS_INTERVAL)


async def _send_data(
    client: aiosmtplib.SMTP, content: bytes, progress: Progress | None
) -> aiosmtplib.SMTPResponse:
    if progress is None:
        return await client.data(content)
    watcher = asyncio.create_task(_report_progress(client, len(content), progress))
    try:
        response = await client.data(content)
    finally:
        await cancel_and_wait(watcher)
    progress(len(content), len(content))
    return response


async def submit(
    submission: Submission, options: ServerOptions, *, progress: Progress | None = None
) -> SubmitResult:
    """One SMTP transaction for the submission; per-recipient results, or SubmitError."""
    where = f"{options.host}:{options.port}"
    if options.user is not None and options.tls == "none" and not is_loopback(options.host):
        raise SubmitError(
            f"refusing to send the password for {options.user!r} unencrypted to {where}; "
            "use --tls starttls or --tls implicit"
        )
    context = tls_context(options)
    client = aiosmtplib.SMTP(
        hostname=options.host,
        port=options.port,
        use_tls=options.tls == "implicit",
        start_tls=False,
        tls_context=context,
        timeout=options.timeout,
        local_hostname=options.local_hostname,
    )
    encoding = "utf-8" if submission.smtputf8 else "ascii"
    try:
        await _connect(client, options, context)
        await _login(client, options)
        mail_options = _mail_options(client, submission, where)
        try:
            await client.mail(submission.mail_from, options=mail_options, encoding=encoding)
        except aiosmtplib.SMTPResponseException as exc:
            raise SubmitError(
                f"{where} refused the sender <{submission.mail_from}>: {_reply(exc)}",
                kind="sender",
                code=exc.code,
            ) from exc
        results: list[RecipientResult] = []
        for address in submission.recipients:
            try:
                reply = await client.rcpt(address, encoding=encoding)
            except aiosmtplib.SMTPResponseException as exc:
                results.append(RecipientResult(address, False, exc.code, exc.message))
            else:
                results.append(RecipientResult(address, True, reply.code, reply.message))
        if not any(result.accepted for result in results):
            with contextlib.suppress(aiosmtplib.SMTPException):
                await client.rset()
            return SubmitResult(tuple(results), where)
        try:
            reply = await _send_data(client, submission.content, progress)
        except aiosmtplib.SMTPResponseException as exc:
            results = [
                RecipientResult(r.address, False, exc.code, exc.message, "data") if r.accepted else r
                for r in results
            ]
        else:
            results = [
                RecipientResult(r.address, True, reply.code, reply.message, "data") if r.accepted else r
                for r in results
            ]
        with contextlib.suppress(aiosmtplib.SMTPException):
            await client.quit()
        return SubmitResult(tuple(results), where)
    except aiosmtplib.SMTPException as exc:  # disconnects and timeouts mid-transaction
        raise SubmitError(f"the session with {where} failed, the message was not accepted: {exc}") from exc
    except OSError as exc:
        raise SubmitError(f"the session with {where} failed, the message was not accepted: {exc}") from exc
    finally:
        client.close()
