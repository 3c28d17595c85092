"""`mailrelay up -f examples/quickstart` end to end: real relay processes on loopback.

The example's ports are moved to free ones (so that concurrent test runs do not clash); nothing
else is changed. A message submitted to the edge (STARTTLS + AUTH, the user from the example's
Secret) crosses edge → internal → capture and lands in the capture maildir with three Received
headers, newest first; mail for example.net leaves through the smarthost route to the provider
stand-in. The edge's two replicas share its listener ports (SO_REUSEPORT): both processes
accept sessions. Ctrl-C drains everything and leaves no process behind.
"""

from __future__ import annotations

import json
import signal
import smtplib
import ssl
import urllib.request
from pathlib import Path
from typing import Any

from tests.relay_operator.up_harness import (
    Up,
    alive,
    find_by_subject,
    maildir_messages,
    message,
    relocated_example,
    running,
    send,
    wait_for,
)


def _submit(port: int, recipient: str, subject: str) -> None:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the example's self-signed demo certificate
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("laptop.test")
        client.starttls(context=context)
        client.ehlo("laptop.test")
        client.login("dev", "quickstart-password")
        client.send_message(message("dev@example.com", recipient, subject))


def _post_to_the_api(port: int, recipient: str, subject: str) -> dict[str, Any]:
    """What README's curl example does: a JSON message to the edge's HTTP API."""
    body = {"from": "app@example.com", "to": [recipient], "subject": subject, "text": "from an app\n"}
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/messages",
        data=json.dumps(body).encode(),
        headers={"Authorization": "Bearer quickstart-api-token", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 202
        answer: dict[str, Any] = json.loads(response.read())
        return answer


def _received_by(mail: Any) -> list[str]:
    return [" ".join(header.split()).split(" by ")[1].split()[0] for header in mail.get_all("Received")]


# the hops before the last (edge, then internal), as the Received headers list them: newest first
THROUGH_THE_EDGE = ["internal.quickstart.test", "edge.quickstart.test"]


def _arrived(up: Up, maildir: Path, subject: str, what: str) -> Any:
    """The message with `subject` once it is in `maildir` (30 s at the most)."""
    return wait_for(lambda: find_by_subject(maildir, subject), 30, what, up.output)


def test_quickstart_chain_smarthost_replicas_and_clean_stop(tmp_path: Path) -> None:
    manifest, ports = relocated_example("quickstart", tmp_path)
    state = tmp_path / ".mailrelay"
    with running(Up(tmp_path, [manifest], "--drain-timeout", "10")) as up:
        up.wait_ready()
        _submit(ports[2587], "alice@example.com", "through three relays")
        _submit(ports[2587], "bob@example.net", "via the smarthost")
        answer = _post_to_the_api(ports[2580], "alice@example.com", "through the API")
        assert [r["status"] for r in answer["recipients"]] == ["accepted"]

        capture = state / "quickstart/capture/maildir/capture/example.com/alice"
        mail = _arrived(up, capture, "through three relays", "the capture maildir")
        assert _received_by(mail) == ["capture.quickstart.test", *THROUGH_THE_EDGE]
        assert mail["Delivered-To"] == "alice@example.com"
        from_app = _arrived(up, capture, "through the API", "the API's message")
        assert _received_by(from_app)[-1] == "edge.quickstart.test"
        assert f"with HTTP id {answer['queueId']}" in " ".join(from_app.get_all("Received")[-1].split())

        outbox = state / "quickstart/provider/maildir/outbox/example.net/bob"
        outside = _arrived(up, outbox, "via the smarthost", "the provider")
        assert _received_by(outside) == ["smtp.provider.test", *THROUGH_THE_EDGE]
        assert "ESMTPSA" in " ".join(outside.get_all("Received")[0].split())  # logged in to the smarthost

        # Replicas share the port: sixteen separate connections to the edge's relay listener
        # are spread by the kernel over both processes (each gets some with p = 1 - 2**-15).
        for number in range(16):
            send(ports[2525], "someone@elsewhere.test", "carol@example.com", f"spread {number}")
        carol = state / "quickstart/capture/maildir/capture/example.com/carol"
        wait_for(lambda: len(maildir_messages(carol)) == 16, 30, "16 messages for carol", up.output)

        def both_accepted() -> list[dict[str, Any]] | None:
            edge = up.processes("edge")
            counts = [(p["metrics"] or {}).get("accepted", 0) for p in edge]
            return edge if len(edge) == 2 and all(counts) and sum(counts) >= 17 else None

        edge = wait_for(both_accepted, 20, "both edge processes to report accepted mail", up.output)
        assert len({p["pid"] for p in edge}) == 2
        assert len({p["metricsPort"] for p in edge}) == 2

        pids = up.pids()
        assert len(pids) == 5  # edge ×2, internal, capture, provider
        assert up.stop(signal.SIGINT) == 0
    assert not [pid for pid in pids if alive(pid)]
    assert "[up] stopped: 5 drained" in up.output()
    assert any(line.startswith("[edge-1] ") for line in up.lines)
    assert any(line.startswith("[status] quickstart/edge ") for line in up.lines)
