"""A real aiosmtpd SMTP server for delivery tests: records what it gets, answers as told.

    sink = SmtpSink(rcpt_replies={"bad@d.test": "550 5.1.1 no such user"}, dsn=True)
    await sink.start()          # 127.0.0.1:<free port> (or host="127.0.0.3", port=...)
    ... deliver to sink.host, sink.port ...
    sink.messages[0].rcpt_tos, sink.messages[0].content, sink.connections
    await sink.stop()

Options: advertise DSN (and accept RFC 3461 parameters, recorded raw), hide 8BITMIME or
SMTPUTF8, answer given replies to RCPT (per address) or DATA (a list consumed one per
transaction, then 250), STARTTLS or implicit TLS with a given context, AUTH with a user table.
Only ever listens on 127.0.0.0/8.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

_DSN_MAIL = re.compile(r"\s+(RET|ENVID)=(\S+)", re.IGNORECASE)
_DSN_RCPT = re.compile(r"\s+(NOTIFY|ORCPT)=(\S+)", re.IGNORECASE)

# RCPT replies of a next hop where gone@example.com is unknown and later@example.com busy.
GONE_AND_LATER = {"gone@example.com": "550 5.1.1 no such user", "later@example.com": "451 4.2.0 try later"}


@dataclass
class Received:
    mail_from: str
    mail_options: list[str]
    rcpt_tos: list[str]
    rcpt_options: list[str]
    content: bytes
    dsn_mail: dict[str, str] = field(default_factory=dict)
    dsn_rcpt: dict[str, dict[str, str]] = field(default_factory=dict)
    tls: bool = False
    login: str | None = None
    arrived_at: float = field(default_factory=time.monotonic)  # when the final dot was answered


class _Handler:
    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        out = [r for r in responses if not (not self.sink.eightbit and "8BITMIME" in r)]
        if self.sink.dsn:
            out.insert(len(out) - 1, "250-DSN")
        # the last line must use "250 " and the others "250-"
        out = [("250-" + r[4:]) for r in out[:-1]] + ["250 " + out[-1][4:]]
        return out

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        reply = self.sink.rcpt_replies.get(address)
        if reply is not None and not reply.startswith("2"):
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return reply or "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.sink.data_delay:
            await asyncio.sleep(self.sink.data_delay)
        if self.sink.data_replies:
            reply = self.sink.data_replies.pop(0)
            if not reply.startswith("2"):
                return reply
        else:
            reply = "250 2.0.0 queued"
        proto: Any = server
        content = envelope.original_content or b""
        self.sink.messages.append(
            Received(
                mail_from="" if envelope.mail_from in (None, "<>") else envelope.mail_from,
                mail_options=list(envelope.mail_options),
                rcpt_tos=list(envelope.rcpt_tos),
                rcpt_options=list(envelope.rcpt_options),
                content=content,
                dsn_mail=dict(getattr(proto, "dsn_mail", {})),
                dsn_rcpt=dict(getattr(proto, "dsn_rcpt", {})),
                tls=session.ssl is not None,
                login=session.auth_data.login.decode()
                if isinstance(session.auth_data, LoginPassword)
                else None,
            )
        )
        self.sink.arrived.set()
        return reply


class _SinkSMTP(SMTP):  # type: ignore[misc]
    """Accepts RFC 3461 parameters when the sink advertises DSN, recording them raw."""

    sink: SmtpSink

    def _set_rset_state(self) -> None:
        super()._set_rset_state()
        self.dsn_mail: dict[str, str] = {}
        self.dsn_rcpt: dict[str, dict[str, str]] = {}

    async def smtp_MAIL(self, arg: str | None) -> None:
        if arg and self.sink.dsn:
            self.dsn_mail = {k.upper(): v for k, v in _DSN_MAIL.findall(arg)}
            arg = _DSN_MAIL.sub("", arg)
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str | None) -> None:
        if arg and self.sink.dsn:
            params = {k.upper(): v for k, v in _DSN_RCPT.findall(arg)}
            arg = _DSN_RCPT.sub("", arg)
            address = arg.split(":", 1)[-1].strip().split()[0].strip("<>")
            if params:
                self.dsn_rcpt[address] = params
        await super().smtp_RCPT(arg)


@dataclass(kw_only=True, eq=False)
class SmtpSink:
    host: str = "127.0.0.1"
    port: int = 0
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    data_replies: list[str] = field(default_factory=list)
    dsn: bool = False
    eightbit: bool = True
    smtputf8: bool = True
    starttls_context: ssl.SSLContext | None = None
    implicit_tls_context: ssl.SSLContext | None = None
    users: dict[str, str] | None = None
    hostname: str = "sink.test"
    data_delay: float = 0.0
    messages: list[Received] = field(default_factory=list, init=False)
    connections: int = field(default=0, init=False)
    arrived: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _server: asyncio.base_events.Server | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        assert self.host.startswith("127."), "test sinks listen on loopback only"
        # copies: data_replies are consumed, and a test may share its tables between sinks
        self.rcpt_replies = dict(self.rcpt_replies or {})
        self.data_replies = list(self.data_replies or [])

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        assert self.users is not None
        if isinstance(auth_data, LoginPassword):
            user, password = auth_data.login.decode(), auth_data.password.decode()
            if self.users.get(user) == password:
                return AuthResult(success=True, auth_data=auth_data)
        return AuthResult(success=False, handled=False)

    def _factory(self) -> SMTP:
        self.connections += 1
        kwargs: dict[str, Any] = {
            "hostname": self.hostname,
            "enable_SMTPUTF8": self.smtputf8,
            "decode_data": False,
            "ident": "sink",
        }
        if self.starttls_context is not None:
            kwargs["tls_context"] = self.starttls_context
        if self.users is not None:
            kwargs["authenticator"] = self._authenticate
            kwargs["auth_required"] = True
            kwargs["auth_require_tls"] = self.starttls_context is not None
        protocol = _SinkSMTP(_Handler(self), **kwargs)
        protocol.sink = self
        return protocol

    async def start(self) -> SmtpSink:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._factory, host=self.host, port=self.port, ssl=self.implicit_tls_context
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            if hasattr(self._server, "close_clients"):
                self._server.close_clients()
            await self._server.wait_closed()
            self._server = None

    @property
    def recipients(self) -> list[str]:
        return [r for m in self.messages for r in m.rcpt_tos]
