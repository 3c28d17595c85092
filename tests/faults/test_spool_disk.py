"""The spool on a real, small filesystem that fills up or turns read-only under a running relay:
the relay answers ``4xx`` and never ``250`` for what it cannot store, and once space (or write
access) is back it accepts and delivers again without a restart -- including the mail it had
queued before the disk filled.

The spool is a 2 MiB tmpfs mounted by the test on the relay's queue directory (root, as in CI);
``mount -o remount,ro`` makes it read-only. Where mounting is impossible (no CAP_SYS_ADMIN)
the test is skipped and says so."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiosmtplib
import pytest

from tests.faults.harness import (
    Relay,
    delivery_figures,
    message_with_token,
    record_figures,
    relay_config,
    relay_hop,
    running_sink,
    send_one,
)
from tests.relay.apphelp import free_port


@contextlib.contextmanager
def small_tmpfs(directory: Path, size: str = "2m") -> Iterator[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(directory)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for the spool (needs root/CAP_SYS_ADMIN): {result.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


@contextlib.contextmanager
def read_only(directory: Path) -> Iterator[None]:
    """`directory` read-only for every file opened from now on: a read-only bind mount over it.

    A plain ``remount,ro`` is refused (EBUSY) while any file on the tmpfs is open for writing,
    and the relay keeps one open for good (relay.abuse's database in the queue directory); what
    the spool opens for each message goes through the bind mount and gets EROFS, as on a disk
    the kernel made read-only. Lifting it is a lazy unmount (reads may still be open)."""
    target = str(directory)
    subprocess.run(["mount", "--bind", target, target], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", target, target], check=True)
        yield
    finally:
        subprocess.run(["umount", "-l", target], check=True)


def fill(directory: Path, name: str = "filler") -> Path:
    """Write a filler file until the filesystem says ENOSPC (unbuffered: every byte that fits)."""
    filler = directory / name
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (65536, 4096, 1):
            chunk = b"\0" * size
            try:
                while True:
                    os.write(fd, chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


async def attempt(port: int, token: str) -> int:
    """The reply code to the final dot (or to whatever refused the transaction first)."""
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, timeout=30)
    await smtp.connect()
    try:
        await smtp.sendmail("sender@sender.test", ["user@example.com"], message_with_token(token))
    except aiosmtplib.SMTPResponseException as exc:
        return exc.code
    finally:
        with contextlib.suppress(Exception):
            await smtp.quit()
    return 250


async def test_spool_full_or_read_only_says_4xx_and_recovers_without_restart(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "spool") as spool, running_sink() as sink:
        config = relay_config(tmp_path, smtp_port=free_port(), next_hop_port=sink.port)
        config["queue"]["directory"] = str(spool / "queue")
        relay = Relay(tmp_path, config)
        refused: list[int] = []
        accepted: set[str] = set()
        try:
            await relay.astart()
            pid = relay.run.process.pid if relay.run.process else None
            await send_one(relay.port, "before")
            accepted.add("before")
            await asyncio.to_thread(sink.wait_tokens, {"before"}, 60)
            # idle first: a delivery finishing later would free the page a new message needs
            await asyncio.to_thread(relay.wait_queue_empty, 60)
            filler = fill(spool)
            for i in range(5):
                refused.append(await attempt(relay.port, f"full-{i}"))
            filler.unlink()  # space is back: the same process accepts again
            await send_one(relay.port, "after-full")
            accepted.add("after-full")
            await asyncio.to_thread(sink.wait_tokens, {"after-full"}, 60)
            await asyncio.to_thread(relay.wait_queue_empty, 60)

            with read_only(spool):
                for i in range(5):
                    refused.append(await attempt(relay.port, f"ro-{i}"))
            await send_one(relay.port, "after-ro")
            accepted.add("after-ro")
            await asyncio.to_thread(sink.wait_tokens, accepted, 60)
            await asyncio.to_thread(relay.wait_queue_empty, 60)
            assert relay.run.process is not None and relay.run.process.pid == pid  # never restarted
            relay.run.signal(signal.SIGTERM)
            assert await asyncio.to_thread(relay.run.wait, 30) == 0

            arrived = sink.tokens()
            record_figures(
                "faults.spool_full_and_read_only",
                sent=len(accepted) + len(refused),
                **delivery_figures(accepted, arrived),
                refused_4xx=sum(1 for code in refused if 400 <= code < 500),
                answered_250_while_unwritable=sum(1 for code in refused if code == 250),
                restarts=0,
            )
            assert all(400 <= code < 500 for code in refused), refused
            assert set(arrived) == accepted, arrived
            assert "spool full" in relay.log() and "Read-only file system" in relay.log()
            relay.assert_no_traceback()
            assert not os.listdir(spool / "queue" / "tmp")  # no half-written leftovers
        finally:
            relay.stop()


async def test_mail_queued_before_the_disk_filled_is_delivered_without_restart(tmp_path: Path) -> None:
    """Retries that run into the full disk (the deferral cannot be written) must not strand the
    message: once space is back and the next hop answers, it is delivered by the same process."""
    with small_tmpfs(tmp_path / "spool") as spool, running_sink() as sink:
        config = relay_config(tmp_path, smtp_port=free_port(), next_hop_port=sink.port)
        config["queue"]["directory"] = str(spool / "queue")
        relay = Relay(tmp_path, config)
        try:
            await relay.astart()
            sink.stop()  # the next hop is down: the mail is deferred
            for token in ("queued-1", "queued-2"):
                await send_one(relay.port, token)
            await asyncio.to_thread(relay.run.wait_for, r"deferred 1 recipients", occurrences=2)
            fillers = [fill(spool)]
            # the next retry finds the hop still down and cannot write its deferral; if a page
            # came free meanwhile (a temporary file went away) and it could, fill up again
            for attempt_no in range(6):
                try:
                    await asyncio.to_thread(relay.run.wait_for, "cannot record the attempt", timeout=10)
                    break
                except AssertionError:
                    fillers.append(fill(spool, f"filler-{attempt_no}"))
            for filler in fillers:
                filler.unlink()
            sink.start()
            await asyncio.to_thread(sink.wait_tokens, {"queued-1", "queued-2"}, 30)
            assert relay.run.process is not None and relay.run.process.poll() is None  # no restart
            arrived = sink.tokens()
            record_figures(
                "faults.spool_full_strands_nothing",
                sent=2,
                **delivery_figures({"queued-1", "queued-2"}, arrived),
                retries_into_full_disk=relay.run.count("cannot record the attempt"),
                restarts=0,
            )
            assert arrived == {"queued-1": 1, "queued-2": 1}
            assert relay.run.count("cannot record the attempt") >= 1  # the fault really happened
        finally:
            relay.stop()


async def test_a_bounce_on_a_full_spool_still_gets_its_dsn(tmp_path: Path) -> None:
    """A recipient bounces while the spool is full, so the DSN cannot be written: the message
    must stay queued (a duplicate for the delivered recipient is acceptable, a lost DSN is not)
    and the DSN is sent once space is back."""
    with small_tmpfs(tmp_path / "spool") as spool, running_sink() as inbox, running_sink() as refusing:
        refusing.data_replies = ["550 5.1.1 no such user"] * 100
        refusing.stop()
        config = relay_config(
            tmp_path,
            smtp_port=free_port(),
            routes=[
                {
                    "name": "refusing",
                    "priority": 10,
                    "match": {"recipientDomains": ["gone.test"]},
                    "nextHop": relay_hop("refusing", refusing.port),
                },
                {
                    "name": "inbox",
                    "nextHop": relay_hop("inbox", inbox.port),
                },
            ],
        )
        config["queue"]["directory"] = str(spool / "queue")
        relay = Relay(tmp_path, config)
        try:
            await relay.astart()
            await send_one(relay.port, "bounce-me", rcpt="nobody@gone.test")
            await asyncio.to_thread(relay.run.wait_for, r"deferred 1 recipients")
            filler = fill(spool)
            refusing.start()  # the next attempt bounces, and the DSN does not fit
            await asyncio.to_thread(relay.run.wait_for, r"could not queue the DSN", timeout=60)
            filler.unlink()
            await asyncio.to_thread(inbox.wait, lambda s: any(m.mail_from == "" for m in s.messages), 60)
            await asyncio.to_thread(relay.wait_queue_empty, 60)
            dsns = [m for m in inbox.messages if m.mail_from == ""]
            record_figures(
                "faults.spool_full_during_bounce",
                sent=1,
                accepted=1,
                dsns_delivered=len(dsns),
                lost=int(not dsns),
                refusals_at_hop=refusing.transactions,
            )
            assert len(dsns) == 1 and dsns[0].rcpt_tos == ["sender@sender.test"]
            assert b"nobody@gone.test" in dsns[0].content
        finally:
            relay.stop()
