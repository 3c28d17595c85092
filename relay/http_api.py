"""The HTTP submission API: listeners in mode ``http`` (aiohttp), for programs that do not speak
SMTP. The contract is ``relay/openapi.json`` (served at ``/v1/openapi.json``).

- ``POST /v1/messages``: ``Authorization: Bearer TOKEN`` (``api.tokensFile``, re-read when it
  changes); a ``message/rfc822`` body (envelope from ``X-Mailrelay-From`` / ``X-Mailrelay-To``
  or the message's headers) or a JSON body composed like ``mailrelay send``
  (relay.core.http_submit). Each recipient is judged by relay.core.rcpt.decide_rcpt as an
  authenticated SMTP client's would be (routes, RejectHop, recipient limit), the content by the
  DATA decoder's rules, the trace header and queue entry by relay.core.accept (``with HTTP``),
  and the message is stored through relay.front.Front.store, the SMTP front's own store step:
  ``202 Accepted`` with the queue id and per-recipient status only once that returned, as a
  ``250``. Refusals: ``400`` naming the field, ``401`` (no or unknown token), ``403`` (a sender
  the token may not use), ``413`` (size), ``415`` (content type), ``422`` (every recipient
  refused), ``429`` (flow control: the front's intake gate stayed shut for its second; or the
  listener's ``senderLimits`` cap for the token's client, counted like an SMTP login's; nothing
  stored), ``503`` (draining, or the spool could not store).
- ``GET /v1/messages/{queueId}``: per recipient queued / deferred (last reply, next attempt) /
  delivered (next hop and its reply) / bounced, from the queue file while the message is in the
  spool, then from relay.message_status; only the client that submitted it may ask. Each
  replica (pod) has its own spool, so only the one that accepted a message knows it: the 202
  names it in ``acceptedBy`` (the pod name), and another replica answers 404 saying so.

Sockets are bound like the front's (SO_REUSEPORT, so worker processes share the port);
``tls: implicit`` uses the front's certificate (relay.tls), loaded when the listener starts:
unlike SMTP's handshakes, a renewed certificate reaches the HTTP listener only with a restart.
Who calls it: relay.app, one per process with http listeners. What it must not do: store any
other way than Front.store, or answer 2xx before it returned.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import ssl
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import web

from relay import metrics
from relay.config import ListenerConfig
from relay.core import status
from relay.core.accept import Arrival, Refused, prepare_message
from relay.core.compose import Submission
from relay.core.http_submit import (
    ApiClient,
    FieldError,
    authorize,
    decode_content,
    error_body,
    json_submission,
    parse_tokens,
    raw_submission,
    recipient_answer,
)
from relay.core.model import Disposition
from relay.core.rcpt import decide_rcpt
from relay.core.smtp_syntax import CommandError, MailParams, parse_path
from relay.core.throttle import sender_key
from relay.front import Front, bind_socket
from relay.message_status import QUEUE_ID, StatusBook, outcome_view
from relay.spool import new_queue_id, read_header

log = logging.getLogger(__name__)

OPENAPI = json.loads(resources.files("relay").joinpath("openapi.json").read_text(encoding="utf-8"))
LISTENER = web.AppKey("listener", ListenerConfig)
JSON_OVERHEAD = 2.0  # a JSON body may be this many times the size limit (base64, escapes)


class _Tokens:
    """The tokens file, re-read when its modification time changes (checked once a second)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.clients: tuple[ApiClient, ...] = ()
        self._stamp: float | None = None
        self._checked = 0.0

    def current(self) -> tuple[ApiClient, ...]:
        now = time.monotonic()
        if now - self._checked < 1.0 and self._stamp is not None:
            return self.clients
        self._checked = now
        try:
            stamp = os.stat(self.path).st_mtime
            if stamp != self._stamp:
                self.clients = parse_tokens(self.path.read_text(encoding="utf-8"))
                self._stamp = stamp
                log.info("api tokens: %d clients from %s", len(self.clients), self.path)
        except (OSError, ValueError) as exc:
            log.error(
                "api tokens file %s unusable, keeping %d clients: %s", self.path, len(self.clients), exc
            )
        return self.clients


def _error(code: int, field: str | None, message: str, **headers: str) -> web.Response:
    return web.json_response(error_body(code, field, message), status=code, headers=headers or None)


class HttpApi:
    """The HTTP listeners of one relay process."""

    def __init__(
        self, front: Front, listeners: Sequence[ListenerConfig], book: StatusBook, *, pod: str = ""
    ) -> None:
        self.front = front
        self.pod = pod  # named in every answer: only this replica's spool knows the message
        self.listeners = list(listeners)
        self.book = book
        api = front.config.api
        assert api is not None, "relay.config requires api with an http listener"
        self.tokens = _Tokens(api.tokens_file)
        self._runners: list[web.AppRunner] = []
        self._sites: list[web.SockSite] = []
        self.addresses: dict[str, tuple[str, int]] = {}
        self._prune: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self.tokens.current()
        for listener in self.listeners:
            limit = int(self.front.config.limits.max_message_size * JSON_OVERHEAD) + 65536
            app = self.application(listener, self, client_max_size=limit)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            self._runners.append(runner)
            sock = bind_socket(listener.host, listener.port)
            context: ssl.SSLContext | None = None
            if listener.tls == "implicit":
                assert self.front.tls is not None
                context = self.front.tls.current()
            site = web.SockSite(runner, sock, ssl_context=context)
            await site.start()
            self._sites.append(site)
            self.addresses[listener.name] = sock.getsockname()[:2]
            log.info(
                "listener %s (http, tls %s) on %s:%d",
                listener.name,
                listener.tls,
                *self.addresses[listener.name],
            )
        self._prune = asyncio.create_task(self._prune_records(), name="api-status-prune")

    @staticmethod
    def application(
        listener: ListenerConfig, api: HttpApi | None, *, client_max_size: int = 1 << 20
    ) -> web.Application:
        """The routes of one listener (`api` None: the routes alone, for the OpenAPI test)."""
        app = web.Application(client_max_size=client_max_size)
        app[LISTENER] = listener

        async def missing(_request: web.Request) -> web.Response:
            raise RuntimeError("routes only")

        app.router.add_post("/v1/messages", api._post if api else missing)
        app.router.add_get("/v1/messages/{queue_id}", api._get if api else missing)
        app.router.add_get("/v1/openapi.json", api._openapi if api else missing)
        return app

    def serving(self) -> bool:
        return len(self._sites) == len(self.listeners)

    async def close(self) -> None:
        if self._prune is not None:
            self._prune.cancel()
        for runner in self._runners:
            await runner.cleanup()
        self._runners = []
        self._sites = []

    async def _prune_records(self) -> None:
        while True:
            try:
                removed = await asyncio.to_thread(self.book.prune)
                if removed:
                    log.info("api: pruned %d old message status records", removed)
            except Exception:
                log.exception("api: pruning status records failed")
            await asyncio.sleep(3600)

    # ------------------------------------------------------------------ requests

    def _client(self, request: web.Request) -> ApiClient | web.Response:
        client = authorize(self.tokens.current(), request.headers.get("Authorization"))
        if client is None:
            metrics.REJECTED.labels("auth").inc()
            return _error(
                401,
                "Authorization",
                "a valid 'Authorization: Bearer TOKEN' is required",
                **{"WWW-Authenticate": 'Bearer realm="mailrelay"'},
            )
        return client

    async def _openapi(self, _request: web.Request) -> web.Response:
        return web.json_response(OPENAPI)

    async def _read(self, request: web.Request) -> Submission | web.Response:
        config = self.front.config
        content_type = request.content_type
        if content_type not in ("message/rfc822", "application/json"):
            return _error(415, "Content-Type", "use message/rfc822 or application/json")
        limit = config.limits.max_message_size
        if content_type == "message/rfc822" and (request.content_length or 0) > limit:
            metrics.REJECTED.labels("size").inc()
            return _error(413, "(body)", f"{status.SIZE_EXCEEDED} (limit {limit} bytes)")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            metrics.REJECTED.labels("size").inc()
            return _error(413, "(body)", f"{status.SIZE_EXCEEDED} (limit {limit} bytes)")
        if content_type == "message/rfc822" and len(body) > limit:
            metrics.REJECTED.labels("size").inc()
            return _error(413, "(body)", f"{status.SIZE_EXCEEDED} (limit {limit} bytes)")
        try:
            if content_type == "application/json":
                try:
                    data = json.loads(body)
                except (ValueError, UnicodeDecodeError) as exc:
                    raise FieldError("(body)", f"not valid JSON: {exc}") from exc
                return json_submission(data)
            return raw_submission(
                body,
                mail_from=request.headers.get("X-Mailrelay-From"),
                recipients=request.headers.get("X-Mailrelay-To"),
            )
        except FieldError as exc:
            metrics.REJECTED.labels("syntax").inc()
            return _error(400, exc.field, exc.message)

    async def _post(self, request: web.Request) -> web.Response:
        front = self.front
        if front.draining:
            return _error(503, None, str(status.SHUTTING_DOWN), **{"Retry-After": "5"})
        client = self._client(request)
        if isinstance(client, web.Response):
            return client
        submission = await self._read(request)
        if isinstance(submission, web.Response):
            return submission
        config = front.config
        try:
            sender = parse_path(f"FROM:<{submission.mail_from}>", "FROM:", utf8=True, null_allowed=False)
        except CommandError as exc:
            return _error(400, "from", f"{exc.reply} ({exc})")
        if not client.may_send_as(sender.address):
            metrics.REJECTED.labels("sender_denied").inc()
            return _error(403, "from", f"client {client.name!r} may not send as <{sender.address}>")
        listener: ListenerConfig = request.app[LISTENER]
        caps = listener.sender_limits
        if caps is not None and not front.sender_caps.allow(listener.name, caps, sender_key(client.name, "")):
            metrics.REJECTED.labels("sender_rate").inc()
            log.info("api %s: refused: sender cap reached", client.name)
            return _error(
                429, None, f"{status.SENDER_RATE_LIMITED} (client {client.name!r})", **{"Retry-After": "60"}
            )
        queue_id = new_queue_id()
        answers: list[dict[str, Any]] = []
        accepted = []
        seen: set[str] = set()
        for address in submission.recipients:
            decision = decide_rcpt(
                f"TO:<{address}>",
                mail_from=sender.address,
                smtputf8=submission.smtputf8,
                esmtp=True,
                trusted=False,
                authenticated=True,
                accepted=seen,
                config=config,
                routes=front.routes,
            )
            if decision.reason is not None:
                metrics.REJECTED.labels(decision.reason).inc()
            if decision.log is not None:
                log.info("%s: %s", queue_id, decision.log)
            if decision.recipient is not None:
                accepted.append(decision.recipient)
                seen.add(decision.recipient.address)
            answers.append(recipient_answer(address, decision.reply))
        if not accepted:
            body = error_body(422, "to", "no recipient was accepted")
            body["recipients"] = answers
            return web.json_response(body, status=422)
        decoder = decode_content(submission.content, config.limits.max_message_size)
        now = front.clock()
        arrival = Arrival(
            client_ip=request.remote or "",
            helo=client.name,
            esmtp=True,
            secure=listener.tls == "implicit",
            tls=None,
            authenticated=True,
            submission=True,
            arrival=now,
            when=datetime.fromtimestamp(now, tz=UTC).astimezone(),
            protocol="HTTPS" if listener.tls == "implicit" else "HTTP",
        )
        params = MailParams(
            size=None,
            body="8BITMIME" if submission.eight_bit else None,
            smtputf8=submission.smtputf8,
            ret=None,
            envid=None,
        )
        prepared = prepare_message(
            decoder,
            queue_id=queue_id,
            mail_from=sender.address,
            params=params,
            recipients=tuple(accepted),
            arrival=arrival,
            hostname=config.hostname,
            max_hops=config.limits.max_hops,
            new_token=lambda: secrets.token_hex(4),
        )
        if isinstance(prepared, Refused):
            metrics.REJECTED.labels(prepared.reason).inc()
            log.info("%s: %s", queue_id, prepared.log)
            code = 413 if prepared.reply is status.SIZE_EXCEEDED else 400
            return _error(code, "(body)", str(prepared.reply))
        if front.intake_gate is not None and await front.intake_gate() is False:
            metrics.REJECTED.labels("flow_control").inc()
            return _error(
                429, None, "the relay is delivering a backlog; retry shortly", **{"Retry-After": "1"}
            )
        log.info("%s: client=[%s] api=%s from=<%s>", queue_id, arrival.client_ip, client.name, sender.address)
        try:
            await asyncio.to_thread(self.book.created, queue_id, client.name, [r.address for r in accepted])
        except OSError as exc:  # only the status answer is lost, not the message
            log.warning("%s: no status record: %s", queue_id, exc)
        reply = await front.store(prepared, listener.name)
        if reply.code != 250:
            await asyncio.to_thread(self.book.forget, queue_id)
            return _error(503, None, str(reply), **{"Retry-After": "30"})
        for answer in answers:
            if answer["status"] == "accepted":
                answer.update(recipient_answer(answer["address"], reply))
        return web.json_response(
            {"queueId": queue_id, "acceptedBy": self.pod, "recipients": answers},
            status=202,
            headers={"Location": f"/v1/messages/{queue_id}"},
        )

    async def _get(self, request: web.Request) -> web.Response:
        client = self._client(request)
        if isinstance(client, web.Response):
            return client
        queue_id = request.match_info["queue_id"]
        if not QUEUE_ID.match(queue_id):
            return _error(400, "queueId", "not a queue id")
        view = await asyncio.to_thread(self._state, queue_id)
        if view is None or view.get("client", client.name) != client.name:
            return _error(
                404,
                "queueId",
                f"{self.pod}: no message {queue_id} submitted by {client.name!r} (with several replicas, "
                "ask the one the 202 named in acceptedBy)",
            )
        view.pop("client", None)
        view["acceptedBy"] = self.pod
        return web.json_response(view)

    def _state(self, queue_id: str) -> dict[str, Any] | None:
        """The message's state (blocking): from its queue file while it has one, else the record."""
        record = self.book.read(queue_id)
        spool = self.front.spool
        for _ in range(3):  # the file may move between states while it is read
            found = spool.locate(queue_id)
            if found is None:
                break
            state, path = found
            try:
                entry = read_header(path)
            except (OSError, ValueError, KeyError):
                continue
            latest = {o.recipient.address: o for o in entry.results}
            pending = {r.address for r in entry.pending}
            recipients = []
            for recipient in entry.envelope.recipients:
                outcome = latest.get(recipient.address)
                fresh = recipient.address in pending and (
                    outcome is None or outcome.disposition is not Disposition.DEFERRED
                )
                if outcome is None or fresh:
                    recipients.append({"address": recipient.address, "state": "queued"})
                else:
                    recipients.append(outcome_view(outcome, next_attempt=entry.next_attempt))
            view: dict[str, Any] = {"queueId": queue_id, "queue": state, "recipients": recipients}
            if record is not None:
                view["client"] = record.get("client")
            return view
        if record is None:
            return None
        record["queue"] = "done"
        return record
