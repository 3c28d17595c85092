"""The HTTP submission API on a running relay: an aiohttp client posts raw (message/rfc822) and
JSON messages, a real SMTP sink (tests/relay/smtpsink.py) is the next hop. Every answer the API
gives is checked against relay/openapi.json; a relay killed with SIGKILL right after a 202
delivers the message after its restart."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import signal
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
import jsonschema
import pytest
from prometheus_client import REGISTRY

from relay.app import RelayProcess
from relay.config import parse_config
from relay.core.compose import Attachment, compose
from relay.http_api import OPENAPI, HttpApi
from tests.relay.apphelp import RelayRun, free_port, in_process, relay_to_sink_config, until, write_config
from tests.relay.fronthelp import RawClient, make_certs
from tests.relay.smtpsink import GONE_AND_LATER, SmtpSink

TOKENS = "billing tok-billing-0001 *@billing.example.com\nops tok-ops-000002 *\n"
BILLING = {"Authorization": "Bearer tok-billing-0001"}
OPS = {"Authorization": "Bearer tok-ops-000002"}
RAW = (
    b"From: Billing <invoices@billing.example.com>\r\n"
    b"To: Carol <carol@example.com>\r\n"
    b"Subject: invoice 42\r\n"
    b"Date: Thu, 03 Dec 2026 10:00:00 +0000\r\n"
    b"Message-ID: <inv42@billing.example.com>\r\n"
    b"\r\n"
    b"Your invoice.\r\n.leading dot stays\r\n"
)


def config_data(tmp_path: Path, sink_port: int, **extra: Any) -> dict[str, Any]:
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKENS)
    data = relay_to_sink_config(
        tmp_path,
        hostname="api.relay.test",
        domains=["example.com"],
        sink_port=sink_port,
        api={"tokensFile": str(tokens)},
        **extra,
    )
    data["listeners"].append({"name": "api", "host": "127.0.0.1", "port": free_port(), "mode": "http"})
    data["routes"].append(
        {
            "name": "refused",
            "priority": 10,
            "match": {"recipientDomains": ["blocked.example.com"]},
            "nextHop": {"kind": "reject", "code": 550, "message": "5.7.1 not for you"},
        }
    )
    data["acceptDomains"] = ["example.com", "blocked.example.com"]
    parse_config(data)
    return data


@contextlib.asynccontextmanager
async def running(tmp_path: Path, data: dict[str, Any], grace: float = 2) -> AsyncIterator[RelayProcess]:
    async with in_process(write_config(tmp_path, data), grace=grace) as process:
        yield process


def api_url(data: dict[str, Any], path: str) -> str:
    listener = next(lc for lc in data["listeners"] if lc["mode"] == "http")
    return f"http://127.0.0.1:{listener['port']}{path}"


def _schema(ref: dict[str, Any]) -> dict[str, Any]:
    return {**ref, "components": OPENAPI["components"]}


def check_against_openapi(method: str, path: str, status: int, body: Any) -> None:
    """The answer is one the OpenAPI document declares, with a body its schema accepts."""
    operation = OPENAPI["paths"][path][method]
    assert str(status) in operation["responses"], f"{method} {path} {status} is not in openapi.json"
    schema = operation["responses"][str(status)]["content"]["application/json"]["schema"]
    schema = {**schema, "components": OPENAPI["components"]}
    ref = schema.pop("$ref", None)
    if ref is not None:
        schema["$ref"] = ref
    jsonschema.validate(body, schema)


async def call(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    template: str,
    **kwargs: Any,
) -> tuple[int, Any, aiohttp.typedefs.LooseHeaders]:
    async with session.request(method, url, **kwargs) as response:
        body = await response.json()
        check_against_openapi(method.lower(), template, response.status, body)
        return response.status, body, response.headers


async def post(session: aiohttp.ClientSession, relay: dict[str, Any], **kwargs: Any) -> tuple[int, Any, Any]:
    return await call(session, "POST", api_url(relay, "/v1/messages"), "/v1/messages", **kwargs)


async def state(session: aiohttp.ClientSession, data: dict[str, Any], queue_id: str, headers: Any) -> Any:
    status, body, _ = await call(
        session, "GET", api_url(data, f"/v1/messages/{queue_id}"), "/v1/messages/{queueId}", headers=headers
    )
    assert status == 200, body
    return body


def split_received(content: bytes) -> tuple[bytes, bytes]:
    """(the one Received field this relay added, the rest)."""
    assert content.startswith(b"Received: ")
    end = content.index(b"\r\n", content.index(b"; "))
    return content[: end + 2], content[end + 2 :]


async def test_raw_and_json_messages_arrive_byte_exact_with_their_envelope(tmp_path: Path) -> None:
    sink = await SmtpSink().start()
    data = config_data(tmp_path, sink.port)
    accepted_before = REGISTRY.get_sample_value("mailrelay_messages_accepted_total", {"listener": "api"}) or 0
    async with running(tmp_path, data), aiohttp.ClientSession() as session:
        # raw, envelope from the request headers
        status, body, headers = await post(
            session,
            data,
            data=RAW,
            headers={
                **BILLING,
                "Content-Type": "message/rfc822",
                "X-Mailrelay-From": "bounces@billing.example.com",
                "X-Mailrelay-To": "carol@example.com, dave@example.com",
            },
        )
        assert status == 202, body
        first = body["queueId"]
        assert body["acceptedBy"]  # the replica whose spool holds it (the pod name)
        assert headers["Location"] == f"/v1/messages/{first}"
        assert [(r["address"], r["status"], r["code"]) for r in body["recipients"]] == [
            ("carol@example.com", "accepted", 250),
            ("dave@example.com", "accepted", 250),
        ]
        assert body["recipients"][0]["enhanced"] == "2.0.0" and first in body["recipients"][0]["text"]
        await until(lambda: len(sink.messages) == 1)
        got = sink.messages[0]
        assert got.mail_from == "bounces@billing.example.com"
        assert got.rcpt_tos == ["carol@example.com", "dave@example.com"]
        received, rest = split_received(got.content)
        assert rest == RAW  # byte-exact after the one trace field
        assert received.startswith(b"Received: from billing ([127.0.0.1])\r\n\tby api.relay.test (mailrelay)")
        assert f"with HTTP id {first}".encode() in received
        assert got.content.count(b"Received:") == 1

        # raw, envelope from the message: Sender/From and To/Cc/Bcc; Bcc never leaves
        with_bcc = RAW.replace(b"Subject:", b"Cc: erin@example.com\r\nBcc: frank@example.com\r\nSubject:")
        status, body, _ = await post(
            session, data, data=with_bcc, headers={**OPS, "Content-Type": "message/rfc822"}
        )
        assert status == 202, body
        await until(lambda: len(sink.messages) == 2)
        got = sink.messages[1]
        assert got.mail_from == "invoices@billing.example.com"
        assert sorted(got.rcpt_tos) == ["carol@example.com", "erin@example.com", "frank@example.com"]
        assert split_received(got.content)[1] == with_bcc.replace(b"Bcc: frank@example.com\r\n", b"")

        # JSON, composed by the same library as `mailrelay send`
        request = {
            "from": "Billing <invoices@billing.example.com>",
            "to": ["carol@example.com"],
            "cc": "erin@example.com",
            "bcc": ["frank@example.com"],
            "subject": "Rechnung Nr. 42 — bitte zahlen",
            "text": "Hallo Carol,\nanbei die Rechnung.\n",
            "html": "<p>Hallo Carol</p>",
            "headers": {
                "Date": "Thu, 03 Dec 2026 10:00:00 +0000",
                "Message-ID": "<j42@billing.example.com>",
                "X-Invoice": "42",
            },
            "attachments": [
                {
                    "filename": "rechnung.pdf",
                    "contentType": "application/pdf",
                    "contentBase64": base64.b64encode(b"%PDF-1.4 fake").decode(),
                }
            ],
        }
        status, body, _ = await post(session, data, json=request, headers=BILLING)
        assert status == 202, body
        third = body["queueId"]
        await until(lambda: len(sink.messages) == 3)
        expected = compose(
            mail_from=request["from"],
            to=request["to"],
            cc=[request["cc"]],
            bcc=request["bcc"],
            subject=request["subject"],
            text=request["text"],
            html=request["html"],
            headers=list(request["headers"].items()),
            attachments=[Attachment("rechnung.pdf", b"%PDF-1.4 fake", "application/pdf")],
        )
        got = sink.messages[2]
        assert got.mail_from == "invoices@billing.example.com"
        assert sorted(got.rcpt_tos) == ["carol@example.com", "erin@example.com", "frank@example.com"]
        assert split_received(got.content)[1] == expected.content
        assert b"frank" not in got.content

        # the state per recipient, once delivered: the next hop and its reply
        async def delivered() -> bool:
            view = await state(session, data, third, BILLING)
            return all(r["state"] == "delivered" for r in view["recipients"])

        await until(delivered)
        view = await state(session, data, third, BILLING)
        assert view["queue"] == "done"
        assert {r["address"] for r in view["recipients"]} == {
            "carol@example.com",
            "erin@example.com",
            "frank@example.com",
        }
        assert all(r["code"] == 250 and r["nextHop"] for r in view["recipients"])
        # another client cannot see it
        status, body, _ = await call(
            session, "GET", api_url(data, f"/v1/messages/{third}"), "/v1/messages/{queueId}", headers=OPS
        )
        assert status == 404 and body["error"]["field"] == "queueId"
        # counted like SMTP mail, under the listener's name
        accepted = REGISTRY.get_sample_value("mailrelay_messages_accepted_total", {"listener": "api"})
        assert accepted == accepted_before + 3
        # the OpenAPI document is served as kept in the repository
        async with session.get(api_url(data, "/v1/openapi.json")) as response:
            assert response.status == 200 and await response.json() == OPENAPI
    await sink.stop()


async def test_deferred_and_bounced_states_and_a_partly_refused_message(tmp_path: Path) -> None:
    sink = await SmtpSink(rcpt_replies=GONE_AND_LATER).start()
    data = config_data(tmp_path, sink.port)
    async with running(tmp_path, data), aiohttp.ClientSession() as session:
        request = {
            "from": "app@ops.test",
            "to": ["gone@example.com", "later@example.com", "x@blocked.example.com", "ok@example.com"],
            "text": "hi",
        }
        status, body, _ = await post(session, data, json=request, headers=OPS)
        assert status == 202, body
        answers = {r["address"]: r for r in body["recipients"]}
        assert answers["x@blocked.example.com"] == {
            "address": "x@blocked.example.com",
            "status": "refused",
            "code": 550,
            "enhanced": "5.7.1",
            "text": "not for you",
        }
        assert answers["ok@example.com"]["status"] == "accepted"
        queue_id = body["queueId"]

        async def settled() -> bool:
            view = await state(session, data, queue_id, OPS)
            states = {r["address"]: r["state"] for r in view["recipients"]}
            return states == {
                "gone@example.com": "bounced",
                "later@example.com": "deferred",
                "ok@example.com": "delivered",
            }

        await until(settled)
        view = await state(session, data, queue_id, OPS)
        by = {r["address"]: r for r in view["recipients"]}
        assert view["queue"] in ("deferred", "active", "incoming")
        assert (by["gone@example.com"]["code"], by["gone@example.com"]["enhanced"]) == (550, "5.1.1")
        assert by["later@example.com"]["code"] == 451 and "nextAttempt" in by["later@example.com"]
        # every recipient refused: 422 with the reasons, nothing stored
        status, body, _ = await post(
            session, data, json={"from": "a@ops.test", "to": "y@blocked.example.com"}, headers=OPS
        )
        assert status == 422 and body["recipients"][0]["code"] == 550
    await sink.stop()


async def test_every_error_status(tmp_path: Path) -> None:
    sink = await SmtpSink().start()
    data = config_data(tmp_path, sink.port, limits={"maxMessageSize": 4096})
    # a long grace: the drain at the end waits for the open SMTP transaction, not for the clock
    async with running(tmp_path, data, grace=60) as process, aiohttp.ClientSession() as session:
        good = {"from": "a@billing.example.com", "to": "carol@example.com", "text": "hi"}

        async def error(status: int, field: str | None, **kwargs: Any) -> dict[str, Any]:
            got, body, headers = await post(session, data, **kwargs)
            assert got == status, body
            assert body["error"]["status"] == status
            assert body["error"].get("field") == field, body
            return dict(headers)

        headers = await error(401, "Authorization", json=good)
        assert headers["WWW-Authenticate"].startswith("Bearer")
        await error(401, "Authorization", json=good, headers={"Authorization": "Bearer nope-nope-nope"})
        await error(401, "Authorization", json=good, headers={"Authorization": "Basic Zm9vOmJhcg=="})
        await error(403, "from", json={**good, "from": "ceo@example.com"}, headers=BILLING)
        await error(400, "(body)", data=b"{not json", headers={**OPS, "Content-Type": "application/json"})
        await error(400, "from", json={"to": "carol@example.com"}, headers=OPS)
        await error(400, "to", json={"from": "a@ops.test"}, headers=OPS)
        await error(400, "to", json={"from": "a@ops.test", "to": ["not an address"]}, headers=OPS)
        await error(400, "subjekt", json={**good, "subjekt": "typo"}, headers=OPS)
        await error(
            400,
            "attachments[0].contentBase64",
            headers=OPS,
            json={**good, "attachments": [{"filename": "a.bin", "contentBase64": "***"}]},
        )
        await error(400, "headers", json={**good, "headers": {"X-A": 1}}, headers=OPS)
        await error(
            400,
            "From",
            data=b"Subject: no from\r\nTo: carol@example.com\r\n\r\nx\r\n",
            headers={**OPS, "Content-Type": "message/rfc822"},
        )
        await error(
            400,
            "(body)",
            data=RAW + b"NUL \x00 inside\r\n",
            headers={**OPS, "Content-Type": "message/rfc822"},
        )
        await error(
            400, "(body)", data=RAW + b"x" * 1200 + b"\r\n", headers={**OPS, "Content-Type": "message/rfc822"}
        )
        await error(415, "Content-Type", data=b"hello", headers={**OPS, "Content-Type": "text/plain"})
        await error(413, "(body)", data=RAW + b"y" * 5000, headers={**OPS, "Content-Type": "message/rfc822"})
        await error(413, "(body)", json={**good, "text": "z" * 5000}, headers=OPS)
        status, _body, _ = await call(
            session, "GET", api_url(data, "/v1/messages/..%2Fetc"), "/v1/messages/{queueId}", headers=OPS
        )
        assert status == 400
        status, _body, _ = await call(
            session, "GET", api_url(data, "/v1/messages/0123456789ABCDEF"), "/v1/messages/{queueId}"
        )
        assert status == 401
        assert sink.messages == []  # nothing above was stored or delivered

        # 503 while draining: an SMTP transaction in flight keeps the relay draining
        smtp_port = data["listeners"][0]["port"]
        client = await RawClient.connect("127.0.0.1", smtp_port)
        await client.reply()
        await client.cmd("EHLO c.test")
        assert (await client.cmd("MAIL FROM:<a@example.com>"))[0] == 250
        assert process.front is not None
        process.stop()
        await until(lambda: process.front is not None and process.front.draining)
        headers = await error(503, None, json=good, headers=OPS)
        assert headers["Retry-After"]
        await client.close()
    await sink.stop()


async def test_flow_control_answers_429_and_stores_nothing(tmp_path: Path) -> None:
    sink = await SmtpSink(data_delay=30).start()  # the first delivery holds the only slot
    data = config_data(tmp_path, sink.port)
    data["queue"]["maxConcurrency"] = 1
    async with running(tmp_path, data) as process, aiohttp.ClientSession() as session:
        good = {"from": "a@ops.test", "to": "carol@example.com", "text": "hi"}
        assert (await post(session, data, json=good, headers=OPS))[0] == 202  # in flight
        await until(lambda: sink.connections >= 1)
        assert (await post(session, data, json=good, headers=OPS))[0] == 202  # waits for the slot
        status, body, headers = await post(session, data, json=good, headers=OPS)
        assert status == 429 and headers["Retry-After"] == "1", body
        assert process.spool is not None
        assert sum(process.spool.depth().values()) == 2  # the refused one was not stored
    sink.data_delay = 0
    await sink.stop()


async def test_sender_caps_of_the_listener_count_per_client(tmp_path: Path) -> None:
    """The listener's senderLimits (shared with SMTP's per-login caps) answer 429 over the cap."""
    sink = await SmtpSink().start()
    data = config_data(tmp_path, sink.port)
    data["listeners"][1]["senderLimits"] = {"messagesPerMinute": 2}
    async with running(tmp_path, data), aiohttp.ClientSession() as session:
        good = {"from": "a@billing.example.com", "to": "carol@example.com", "text": "hi"}
        assert [(await post(session, data, json=good, headers=BILLING))[0] for _ in range(2)] == [202, 202]
        status, body, headers = await post(session, data, json=good, headers=BILLING)
        assert status == 429 and "4.7.0" in body["error"]["message"] and headers["Retry-After"] == "60"
        assert (await post(session, data, json=good, headers=OPS))[0] == 202  # another client's budget
        await until(lambda: len(sink.messages) == 3)
    await sink.stop()


async def test_implicit_tls_listener_and_a_tokens_file_that_changes(tmp_path: Path) -> None:
    """tls: implicit serves HTTPS with the relay's certificate (the Received says HTTPS); a new
    line in the tokens file is a new client without a restart."""
    certs = make_certs(tmp_path)
    sink = await SmtpSink().start()
    data = config_data(tmp_path, sink.port, tls=certs.tls)
    data["listeners"][1]["tls"] = "implicit"
    url = api_url(data, "/v1/messages").replace("http://", "https://")
    context = ssl.create_default_context(cafile=str(certs.ca_file))
    async with running(tmp_path, data), aiohttp.ClientSession() as session:
        good = {"from": "a@ops.test", "to": "carol@example.com", "text": "over TLS"}
        async with session.post(url, json=good, headers=OPS, ssl=context) as response:
            assert response.status == 202, await response.text()
            queue_id = (await response.json())["queueId"]
        with pytest.raises(aiohttp.ClientError):  # no plain HTTP on that port
            await session.post(api_url(data, "/v1/messages"), json=good, headers=OPS)
        newcomer = {"Authorization": "Bearer tok-newcomer-03"}
        async with session.post(url, json=good, headers=newcomer, ssl=context) as response:
            assert response.status == 401
        with (tmp_path / "tokens").open("a") as tokens:
            tokens.write("newcomer tok-newcomer-03 *@ops.test\n")

        async def admitted() -> bool:
            async with session.post(url, json=good, headers=newcomer, ssl=context) as response:
                return response.status == 202

        await until(admitted)
        await until(lambda: len(sink.messages) >= 2)
    first = next(m for m in sink.messages if queue_id.encode() in m.content)
    assert f"with HTTPS id {queue_id}".encode() in first.content
    await sink.stop()


async def test_sigkill_right_after_202_loses_nothing(tmp_path: Path, runs: list[RelayRun]) -> None:
    down = free_port()  # nothing listens: the message stays queued
    data = config_data(tmp_path, down)
    path = write_config(tmp_path, data)
    run = RelayRun(path).start()
    runs.append(run)
    await asyncio.to_thread(run.wait_for, r"ready \(pid")
    async with aiohttp.ClientSession() as session:
        status, body, _ = await post(
            session, data, data=RAW, headers={**OPS, "Content-Type": "message/rfc822"}
        )
    assert status == 202, body
    assert run.process is not None
    run.process.send_signal(signal.SIGKILL)
    run.wait()
    sink = await SmtpSink().start()
    data["routes"][0]["nextHop"]["port"] = sink.port
    write_config(tmp_path, data)
    again = RelayRun(path).start()
    runs.append(again)
    await until(lambda: len(sink.messages) == 1, timeout=60)
    assert split_received(sink.messages[0].content)[1] == RAW
    assert sink.messages[0].rcpt_tos == ["carol@example.com"]
    # and its state is known after the restart
    async with aiohttp.ClientSession() as session:

        async def delivered() -> bool:
            view = await state(session, data, body["queueId"], OPS)
            return [r["state"] for r in view["recipients"]] == ["delivered"]

        await until(delivered)
    await sink.stop()


async def test_smtp_and_http_doors_share_the_store_path(tmp_path: Path) -> None:
    """A spool that cannot store: SMTP answers 451, the API 503, neither a success."""
    sink = await SmtpSink().start()
    data = config_data(tmp_path, sink.port)
    async with running(tmp_path, data), aiohttp.ClientSession() as session:
        queue = tmp_path / "queue"
        (queue / "tmp").rename(queue / "tmp.away")
        (queue / "tmp").write_text("")  # a file where the spool writes: every store fails
        status, body, _ = await post(
            session, data, json={"from": "a@ops.test", "to": "c@example.com"}, headers=OPS
        )
        assert status == 503 and "4.3" in body["error"]["message"], body
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=data["listeners"][0]["port"], start_tls=False)
        await smtp.connect()
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await smtp.sendmail("a@example.com", ["c@example.com"], RAW)
        assert refused.value.code == 451
        await smtp.quit()
        (queue / "tmp").unlink()
        (queue / "tmp.away").rename(queue / "tmp")
        assert not list((queue / "status").glob("*.json"))  # the failed submission left no record
    await sink.stop()


def test_openapi_document_is_valid_and_matches_the_routes(tmp_path: Path) -> None:
    """relay/openapi.json is a valid OpenAPI 3.1 document and names exactly the routes the
    server has (the answers are checked against it by every test above)."""
    from openapi_spec_validator import validate

    validate(OPENAPI)
    app = HttpApi.application(parse_config(config_data(tmp_path, free_port())).listeners[1], None)
    routes = {
        (route.method.lower(), route.resource.canonical)  # type: ignore[union-attr]
        for route in app.router.routes()
        if route.method != "HEAD"
    }
    documented = {
        (method, path.replace("{queueId}", "{queue_id}"))
        for path, ops in OPENAPI["paths"].items()
        for method in ops
    }
    assert routes == documented
