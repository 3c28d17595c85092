"""``mailrelay drain``: hand every message of a spool no relay serves (an orphaned volume of a
removed pod) to a running peer's handoff listener, the same hand-off a draining relay makes
(relay.handoff: queue state kept, no Received header, the local copy removed only after the
peer's 250). The operator runs it in a short-lived Job that mounts the orphaned claim.

    mailrelay drain --spool /var/spool/mailrelay --to edge-0.edge-peers:2526 \\
        --credential-file /etc/mailrelay/handoff/credential [--timeout 5m]

The spool is recovered first (what a crash left in active/ goes back to incoming/), so no relay
may be running on it. Every message (incoming, deferred and held) goes; passes repeat until the
spool is empty or ``--timeout`` has passed. Several ``--to`` are tried in turn.

Exit status: 0 the spool holds no message, 1 some could not be handed off (the count is
printed; they stay in the spool), 2 usage errors (a bad address, an unreadable credential, no
such spool).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import click

from relay.config import HandoffPeer, parse_duration

PASS_PAUSE = 2.0  # seconds between passes while peers refuse or cannot be reached


def parse_peer(value: str) -> HandoffPeer:
    """``host:port`` or ``[v6]:port``; ValueError saying what is wrong."""
    text = value.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
        if not sep:
            raise ValueError(f"{value!r}: missing ']'")
    else:
        host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{value!r}: use HOST:PORT (the peer's handoff port, e.g. edge-0.edge-peers:2526)")
    return HandoffPeer(host=host, port=int(port))


def _peers(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> list[HandoffPeer]:
    try:
        return [parse_peer(value) for value in values]
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


def _duration(_ctx: click.Context, _param: click.Parameter, value: str) -> float:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


@click.command("drain")
@click.option(
    "--spool",
    "spool_dir",
    required=True,
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    help="The queue directory to empty (no relay may be running on it).",
)
@click.option(
    "--to",
    "peers",
    required=True,
    multiple=True,
    callback=_peers,
    metavar="HOST:PORT",
    help="A peer's handoff listener (repeatable: tried in turn).",
)
@click.option(
    "--credential-file",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False, exists=True, readable=True),
    help="The relay's hand-off secret (the Secret's `credential` key).",
)
@click.option(
    "--timeout",
    default="5m",
    callback=_duration,
    show_default=True,
    help="Give up after this long (a duration: 30s, 5m, 1h).",
)
@click.option("--hostname", default="mailrelay-drain", show_default=True, help="The EHLO name to use.")
def drain_command(
    spool_dir: Path, peers: list[HandoffPeer], credential_file: Path, timeout: float, hostname: str
) -> None:
    """Hand every message of an orphaned spool to a peer of the same relay."""
    from relay.handoff_server import read_credential

    try:
        if not read_credential(credential_file):
            raise click.BadParameter("the file is empty", param_hint="--credential-file")
    except (OSError, UnicodeDecodeError) as exc:
        raise click.BadParameter(f"cannot read it: {exc}", param_hint="--credential-file") from exc
    raise SystemExit(asyncio.run(_drain(spool_dir, peers, credential_file, hostname, give_up_after=timeout)))


async def _drain(
    spool_dir: Path, peers: list[HandoffPeer], credential_file: Path, hostname: str, *, give_up_after: float
) -> int:
    from relay.handoff import Drainer, HandoffClient
    from relay.spool import Spool

    spool = Spool(spool_dir)
    try:
        report = await asyncio.to_thread(spool.recover)
        if report.requeued:
            click.echo(f"recovered {report.requeued} message(s) a crash left in active/")
        client = HandoffClient(hostname, credential_file)
        drainer = Drainer(spool, lambda: peers, client, states=("incoming", "deferred", "hold"))
        deadline = time.monotonic() + give_up_after
        targets = ", ".join(f"{p.host}:{p.port}" for p in peers)
        pass_no = 0
        try:
            while True:
                left = await asyncio.to_thread(spool.snapshot)
                movable = left.depth - left.counts.get("corrupt", 0)
                if movable == 0:
                    break
                if pass_no and time.monotonic() >= deadline:
                    break
                pass_no += 1
                sent = await drainer.pass_once()
                after = await asyncio.to_thread(spool.snapshot)
                click.echo(
                    f"pass {pass_no}: handed off {sent} to {targets}; "
                    f"{after.depth - after.counts.get('corrupt', 0)} left"
                    + (" (no peer reachable)" if drainer.stats.unreachable else "")
                )
                if after.depth - after.counts.get("corrupt", 0) and time.monotonic() < deadline:
                    await asyncio.sleep(PASS_PAUSE)
        finally:
            await client.close()
        final = await asyncio.to_thread(spool.snapshot)
    finally:
        spool.close()
    handed = drainer.stats.handed_off
    if final.depth == 0:
        click.echo(f"{spool_dir} is empty: {handed} message(s) handed off")
        return 0
    corrupt = final.counts.get("corrupt", 0)
    click.echo(
        f"{final.depth} message(s) could not be handed off and stay in {spool_dir}"
        + (f" ({corrupt} unreadable, in corrupt/)" if corrupt else "")
        + f"; {handed} handed off",
        err=True,
    )
    return 1
