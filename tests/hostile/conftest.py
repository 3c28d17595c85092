"""One relay process for the whole hostile-input suite, the way an attacker meets it:

- listener ``smtp`` (relay mode, 127.0.0.1): clients from 127.0.0.2 are trusted (they may relay
  anywhere), everyone else may only send to ``example.com``;
- listener ``submission`` (STARTTLS with a trustme certificate, AUTH required, at most 3 AUTH
  failures per session);
- routes: ``example.com`` to the ``inbox`` sink, ``bounce.example.com`` to a sink that refuses
  every message with 550 (so the relay writes DSNs), everything else to the ``victim`` sink:
  whatever reaches `victim` from an untrusted client is an open-relay hole;
- small limits so the tests stay fast: 50 recipients, 64 KiB messages, 3 s idle timeout.

Tests check the relay's log for tracebacks at the end (`hostile.relay.assert_no_traceback()`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.faults.harness import Relay, Sink, relay_config, relay_hop
from tests.relay.apphelp import free_port
from tests.relay.fronthelp import Certs, make_certs, write_users

UNTRUSTED = "127.0.0.1"
TRUSTED = "127.0.0.2"
USERS = {"alice": "correct horse battery staple"}


@dataclass
class Hostile:
    relay: Relay
    inbox: Sink
    victim: Sink
    bounce: Sink
    submission_port: int
    certs: Certs

    @property
    def port(self) -> int:
        return self.relay.port

    def health(self) -> dict[str, int]:
        """Measured: relay processes that died (crashes) and tracebacks in the relay's log."""
        process = self.relay.run.process
        return {
            "crashes": int(process is None or process.poll() is not None),
            "tracebacks_in_log": self.relay.log().count("Traceback"),
        }


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    tmp: Path = tmp_path_factory.mktemp("hostile")
    inbox, victim, bounce = Sink().start(), Sink().start(), Sink().start()
    bounce.data_replies = ["550 5.1.1 no such user"] * 1000
    certs = make_certs(tmp)
    users = write_users(tmp, USERS)
    smtp_port, submission_port = free_port(), free_port()

    config = relay_config(
        tmp,
        smtp_port=smtp_port,
        trusted=[f"{TRUSTED}/32"],
        accept_domains=["example.com", "bounce.example.com"],
        routes=[
            {
                "name": "bounce",
                "priority": 20,
                "match": {"recipientDomains": ["bounce.example.com"]},
                "nextHop": relay_hop("bounce", bounce.port),
            },
            {
                "name": "inbox",
                "priority": 10,
                "match": {"recipientDomains": ["example.com", "sender.test"]},
                "nextHop": relay_hop("inbox", inbox.port),
            },
            {"name": "victim", "nextHop": relay_hop("victim", victim.port)},
        ],
        limits={"maxRecipients": 50, "maxMessageSize": "64Ki", "idleTimeout": "3s", "maxErrors": 10},
        tls={"certFile": str(certs.cert_file), "keyFile": str(certs.key_file)},
        auth={"usersFile": str(users), "maxFailures": 3},
        submission_port=submission_port,
    )
    # Two worker processes: the per-address limits these tests count exactly hold across
    # workers (relay.abuse, issue 17).
    config["workers"] = 2
    relay = Relay(tmp, config).start()
    try:
        yield Hostile(relay, inbox, victim, bounce, submission_port, certs)
    finally:
        relay.stop()
        for sink in (inbox, victim, bounce):
            sink.shutdown()
