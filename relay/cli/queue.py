"""``mailrelay queue``: list, show, retry, hold and delete a relay's queued mail, safe while the
relay runs (the spool's own admin operations decide; this module parses and prints).

Exit status: 0 done, 1 the message does not exist or the action failed, 2 usage or config error.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click

from relay.cli.run import load_or_exit
from relay.core.headers import header_section

F = TypeVar("F", bound=Callable[..., Any])


# ----------------------------------------------------------------------------- queue


def _spool_options(func: F) -> F:
    func = click.option(
        "--spool",
        "spool_dir",
        type=click.Path(path_type=Path, file_okay=False),
        help="The queue directory (instead of --config).",
    )(func)
    func = click.option(
        "--config",
        "config_path",
        type=click.Path(path_type=Path, dir_okay=False),
        help="The relay configuration whose queue.directory to use.",
    )(func)
    return func


def _open_spool(config_path: Path | None, spool_dir: Path | None) -> Any:
    from relay.spool import Spool

    if (config_path is None) == (spool_dir is None):
        click.echo("mailrelay queue: give exactly one of --config FILE or --spool DIR", err=True)
        raise SystemExit(2)
    directory = spool_dir if spool_dir is not None else load_or_exit(config_path, "queue").queue.directory  # type: ignore[arg-type]
    if not Path(directory).is_dir():
        click.echo(f"mailrelay queue: no queue directory at {directory}", err=True)
        raise SystemExit(1)
    return Spool(Path(directory), threads=1)


def _when(epoch: float) -> str:
    if not epoch:
        return "-"
    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _last_error(entry: Any) -> str:
    from relay.core.model import Disposition

    deferred = [o for o in entry.results if o.disposition is Disposition.DEFERRED]
    if not deferred:
        return ""
    last = deferred[-1]
    return f"{last.code} {last.status} {last.text}".strip()


def _summary(state: str, entry: Any) -> dict[str, Any]:
    return {
        "id": entry.queue_id,
        "state": state,
        "arrival": _when(entry.arrival),
        "sender": entry.envelope.mail_from or "<>",
        "pending": [r.address for r in entry.pending],
        "attempts": entry.attempts,
        "next_attempt": _when(entry.next_attempt)
        if state == "deferred"
        else ("held" if state == "hold" else "now"),
        "last_error": _last_error(entry),
        "size": entry.size,
    }


@click.group("queue")
def queue_group() -> None:
    """Inspect and manage a relay's queue (safe while the relay runs)."""


@queue_group.command("list")
@_spool_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object per message.")
@click.option(
    "--state",
    "states",
    multiple=True,
    type=click.Choice(["incoming", "active", "deferred", "hold", "corrupt"]),
    help="Only these states (repeatable).",
)
def queue_list(
    config_path: Path | None, spool_dir: Path | None, as_json: bool, states: tuple[str, ...]
) -> None:
    """List queued messages: id, state, arrival, sender, pending recipients, attempts, next
    attempt and last error."""
    from relay.spool import STATES

    spool = _open_spool(config_path, spool_dir)
    try:
        rows: list[dict[str, Any]] = []
        for state in states or STATES:
            if state == "corrupt":
                rows.extend({"id": qid, "state": "corrupt"} for qid in spool.ids("corrupt"))
                continue
            rows.extend(_summary(state, entry) for entry in spool.entries(state))
    finally:
        spool.close()
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
        return
    if not rows:
        click.echo("queue is empty")
        return
    header = ("ID", "STATE", "ARRIVAL", "SENDER", "PENDING", "ATTEMPTS", "NEXT ATTEMPT", "LAST ERROR")
    table = [header]
    for row in rows:
        table.append(
            (
                row["id"],
                row["state"],
                row.get("arrival", "-"),
                row.get("sender", "-"),
                ",".join(row.get("pending", [])) or "-",
                str(row.get("attempts", "-")),
                row.get("next_attempt", "-"),
                row.get("last_error", ""),
            )
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(header) - 1)]
    for r in table:
        click.echo("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(r[:-1])) + "  " + r[-1])
    click.echo(f"{len(rows)} message(s)")


@queue_group.command("show")
@click.argument("queue_id")
@_spool_options
@click.option("--full", is_flag=True, help="Print the whole message, not only its header.")
def queue_show(queue_id: str, config_path: Path | None, spool_dir: Path | None, full: bool) -> None:
    """Show one message: its envelope, delivery state and header (or all of it with --full)."""
    spool = _open_spool(config_path, spool_dir)
    try:
        found = spool.read(queue_id) if queue_id.isalnum() else None
    except (OSError, ValueError, KeyError) as exc:
        click.echo(f"mailrelay queue show: {queue_id} cannot be read: {exc}", err=True)
        raise SystemExit(1) from exc
    finally:
        spool.close()
    if found is None:
        click.echo(f"mailrelay queue show: no message {queue_id}", err=True)
        raise SystemExit(1)
    state, message = found
    entry = message.entry
    summary = _summary(state, entry)
    for key in ("id", "state", "arrival", "sender", "attempts", "next_attempt", "size"):
        click.echo(f"{key.replace('_', ' ')}: {summary[key]}")
    click.echo(f"client: [{entry.client_address}] helo={entry.helo}")
    envelope = entry.envelope
    params = [f"BODY={envelope.body}" if envelope.body else "", "SMTPUTF8" if envelope.smtputf8 else ""]
    params += [
        f"RET={envelope.ret}" if envelope.ret else "",
        f"ENVID={envelope.envid}" if envelope.envid else "",
    ]
    if any(params):
        click.echo("mail parameters: " + " ".join(p for p in params if p))
    click.echo("pending recipients:")
    for recipient in entry.pending:
        extra = f" NOTIFY={','.join(recipient.notify)}" if recipient.notify else ""
        extra += f" ORCPT={recipient.orcpt}" if recipient.orcpt else ""
        click.echo(f"  {recipient.address}{extra}")
    if entry.results:
        click.echo("results:")
        for outcome in entry.results:
            remote = f" via {outcome.remote_mta}" if outcome.remote_mta else ""
            click.echo(
                f"  {outcome.recipient.address}: {outcome.disposition.value} "
                f"{outcome.code} {outcome.status} {outcome.text}{remote}"
            )
    content = message.content
    if not full:
        content = header_section(content)
    click.echo("")
    click.echo(content.decode("utf-8", "replace").replace("\r\n", "\n"), nl=False)


def _admin(action: str, queue_id: str, config_path: Path | None, spool_dir: Path | None) -> None:
    spool = _open_spool(config_path, spool_dir)
    try:
        if not queue_id.isalnum():
            ok = False
        elif action == "retry":
            ok = spool.retry_now(queue_id)
        elif action == "hold":
            ok = spool.hold(queue_id)
        else:
            ok = spool.delete(queue_id)
        where = spool.locate(queue_id) if queue_id.isalnum() else None
    finally:
        spool.close()
    if ok:
        done = {"retry": "queued for delivery now", "hold": "held", "delete": "deleted"}[action]
        click.echo(f"{queue_id}: {done}")
        return
    if where is not None and where[0] == "active":
        click.echo(f"mailrelay queue {action}: {queue_id} is being delivered right now; try again", err=True)
    elif where is not None:
        click.echo(f"mailrelay queue {action}: {queue_id} is in {where[0]}/, nothing to do", err=True)
    else:
        click.echo(f"mailrelay queue {action}: no message {queue_id}", err=True)
    raise SystemExit(1)


@queue_group.command("retry")
@click.argument("queue_id")
@_spool_options
def queue_retry(queue_id: str, config_path: Path | None, spool_dir: Path | None) -> None:
    """Make a deferred or held message due now (the relay picks it up on its next scan)."""
    _admin("retry", queue_id, config_path, spool_dir)


@queue_group.command("hold")
@click.argument("queue_id")
@_spool_options
def queue_hold(queue_id: str, config_path: Path | None, spool_dir: Path | None) -> None:
    """Park a waiting message so no delivery is tried (undo with retry)."""
    _admin("hold", queue_id, config_path, spool_dir)


@queue_group.command("delete")
@click.argument("queue_id")
@_spool_options
def queue_delete(queue_id: str, config_path: Path | None, spool_dir: Path | None) -> None:
    """Remove a waiting message without delivering it and without a bounce."""
    _admin("delete", queue_id, config_path, spool_dir)
