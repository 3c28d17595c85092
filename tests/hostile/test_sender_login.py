"""Senders bound to logins on the wire (Postfix's reject_sender_login_mismatch): a logged-in
user sending as someone else gets 553 5.7.1 at MAIL FROM, and for a From: header outside its
senders after the final dot; its own addresses pass; a user without senders is unrestricted."""

from __future__ import annotations

import ssl
from pathlib import Path

import aiosmtplib
import pytest

from relay.front import Front
from tests.relay.fronthelp import make_certs, make_config, running_front

USERS = """\
alice:
  password: "{PLAIN}wonderland"
  senders: [alice@example.com, "*@team.example.com"]
bob: "{PLAIN}builder"
"""


def submission_config(tmp_path: Path) -> tuple[object, ssl.SSLContext]:
    certs = make_certs(tmp_path)
    users = tmp_path / "users"
    users.write_text(USERS)
    config = make_config(
        tmp_path,
        listeners=[
            {
                "name": "submission",
                "host": "127.0.0.1",
                "port": 2587,
                "mode": "submission",
                "tls": "starttls",
                "auth": "required",
            }
        ],
        tls={"certFile": str(certs.cert_file), "keyFile": str(certs.key_file)},
        auth={"usersFile": str(users)},
    )
    return config, ssl.create_default_context(cafile=str(certs.ca_file))


async def login(front: Front, context: ssl.SSLContext, user: str, password: str) -> aiosmtplib.SMTP:
    host, port = front.addresses["submission"]
    smtp = aiosmtplib.SMTP(hostname=host, port=port, tls_context=context, start_tls=True)
    await smtp.connect()
    await smtp.login(user, password)
    return smtp


async def test_a_logged_in_user_sending_as_someone_else_gets_553(tmp_path: Path) -> None:
    config, context = submission_config(tmp_path)
    async with running_front(config) as front:  # type: ignore[arg-type]
        smtp = await login(front, context, "alice", "wonderland")
        for sender in ("ceo@example.com", "alice@example.org", "x@sub.team.example.com", ""):
            with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
                await smtp.mail(sender)
            assert (refused.value.code, refused.value.message.split()[0]) == (553, "5.7.1"), sender
            assert "not owned by user alice" in refused.value.message
        # Her own addresses pass, with a From: of her own.
        for sender in ("alice@example.com", "Alice@Example.com", "desk@team.example.com"):
            errors, _ = await smtp.sendmail(
                sender, ["friend@elsewhere.org"], f"From: {sender}\r\nSubject: hi\r\n\r\nx\r\n".encode()
            )
            assert errors == {}, sender
        # The envelope is hers, the From: header is not.
        with pytest.raises(aiosmtplib.SMTPDataError) as info:
            await smtp.sendmail(
                "alice@example.com", ["friend@elsewhere.org"], b"From: The CEO <ceo@example.com>\r\n\r\nx\r\n"
            )
        assert info.value.code == 553 and "5.7.1" in info.value.message
        await smtp.quit()
        assert len(front.spool.ids("incoming")) == 3

        # bob's entry lists no senders: not restricted.
        smtp = await login(front, context, "bob", "builder")
        message = b"From: ceo@example.com\r\n\r\nx\r\n"
        errors, _ = await smtp.sendmail("ceo@example.com", ["f@elsewhere.org"], message)
        assert errors == {}
        await smtp.quit()
