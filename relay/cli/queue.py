"""``mailrelay queue``: list, show, retry, hold, release, delete and flush a relay's queued
mail, safe while the relay runs (the spool's own admin operations decide; this module parses
and prints). Admin commands take queue ids or a selection (``--all``, ``--sender``,
``--recipient``, ``--older-than``: relay.core.queue_select decides what matches). Without
``--config`` or ``--spool`` the config is ``$MAILRELAY_CONFIG``, else the path a relay pod
mounts, so ``kubectl exec`` needs no path.

Exit status: 0 done, 1 the message does not exist or the action failed, 2 usage or config error.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click

from relay.cli.run import load_or_exit
from relay.config import parse_duration
from relay.core.headers import header_section
from relay.core.queue_select import Selector

F = TypeVar("F", bound=Callable[..., Any])

# The config a relay pod mounts (the operator's ConfigMap; the image sets MAILRELAY_CONFIG to
# it), so `kubectl exec POD -- mailrelay queue list` needs no path.
DEFAULT_CONFIG = Path("/etc/mailrelay/config/relay.yaml")


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
        help="The relay configuration whose queue.directory to use "
        f"(default: $MAILRELAY_CONFIG, else {DEFAULT_CONFIG}, what a relay pod mounts).",
    )(func)
    return func


def _open_spool(config_path: Path | None, spool_dir: Path | None) -> Any:
    from relay.spool import Spool

    if config_path is not None and spool_dir is not None:
        click.echo("mailrelay queue: give one of --config FILE or --spool DIR, not both", err=True)
        raise SystemExit(2)
    if config_path is None and spool_dir is None:
        config_path = Path(os.environ.get("MAILRELAY_CONFIG") or DEFAULT_CONFIG)
        if not config_path.is_file():
            click.echo(
                f"mailrelay queue: no relay configuration at {config_path}: "
                "give --config FILE or --spool DIR",
                err=True,
            )
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


# Where each action takes messages from (the spool's own admin moves decide; see relay.spool).
_SOURCES = {
    "retry": ("deferred", "hold"),
    "hold": ("incoming", "deferred"),
    "release": ("hold",),
    "delete": ("incoming", "deferred", "hold"),
    "flush": ("deferred",),
}
_DONE = {
    "retry": "queued for delivery now",
    "hold": "held",
    "release": "released (queued for delivery now)",
    "delete": "deleted",
    "flush": "queued for delivery now",
}


def _move(spool: Any, action: str, queue_id: str) -> bool:
    if action in ("retry", "flush"):
        return bool(spool.retry_now(queue_id))
    return bool(getattr(spool, action)(queue_id))


def _explain(action: str, queue_id: str, where: tuple[str, Path] | None) -> str:
    if where is not None and where[0] == "active":
        return f"mailrelay queue {action}: {queue_id} is being delivered right now; try again"
    if where is not None:
        return f"mailrelay queue {action}: {queue_id} is in {where[0]}/, nothing to do"
    return f"mailrelay queue {action}: no message {queue_id}"


def _admin(action: str, queue_id: str, config_path: Path | None, spool_dir: Path | None) -> None:
    spool = _open_spool(config_path, spool_dir)
    try:
        ok = queue_id.isalnum() and _move(spool, action, queue_id)
        where = spool.locate(queue_id) if queue_id.isalnum() else None
    finally:
        spool.close()
    if ok:
        click.echo(f"{queue_id}: {_DONE[action]}")
        return
    click.echo(_explain(action, queue_id, where), err=True)
    raise SystemExit(1)


def _bulk(action: str, selector: Selector, config_path: Path | None, spool_dir: Path | None) -> None:
    """Apply `action` to every message in the action's source states that `selector` matches.
    A message that moved meanwhile (a scheduler claimed it) is counted as skipped."""
    spool = _open_spool(config_path, spool_dir)
    now = time.time()
    done = skipped = 0
    try:
        for state in _SOURCES[action]:
            for entry in list(spool.entries(state)):
                if not selector.matches(entry, now):
                    continue
                if _move(spool, action, entry.queue_id):
                    done += 1
                    click.echo(f"{entry.queue_id}: {_DONE[action]}")
                else:
                    skipped += 1
    finally:
        spool.close()
    tail = f" ({skipped} skipped: being delivered or gone)" if skipped else ""
    click.echo(f"{done} message(s) {_DONE[action].split(' (')[0]}{tail}")


def _older_than(_ctx: click.Context, _param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


def _selection_options(func: F) -> F:
    func = click.option(
        "--older-than",
        metavar="DURATION",
        callback=_older_than,
        help="Only messages that arrived at least this long ago (30m, 2h, 1d).",
    )(func)
    func = click.option(
        "--recipient", metavar="PATTERN", help="Only messages with a pending recipient matching this glob."
    )(func)
    func = click.option(
        "--sender", metavar="PATTERN", help="Only messages from a sender matching this glob (<> for bounces)."
    )(func)
    func = click.option("--all", "select_all", is_flag=True, help="Every message the action applies to.")(
        func
    )
    return func


def _admin_command(action: str, doc: str) -> click.Command:
    @click.argument("queue_ids", nargs=-1, metavar="[QUEUE_ID]...")
    @_spool_options
    @_selection_options
    def command(
        queue_ids: tuple[str, ...],
        config_path: Path | None,
        spool_dir: Path | None,
        select_all: bool,
        sender: str | None,
        recipient: str | None,
        older_than: float | None,
    ) -> None:
        selector = Selector(sender=sender, recipient=recipient, older_than=older_than)
        if queue_ids and (select_all or not selector.empty):
            click.echo(f"mailrelay queue {action}: give queue ids or a selection, not both", err=True)
            raise SystemExit(2)
        if not queue_ids and not select_all and selector.empty:
            click.echo(
                f"mailrelay queue {action}: give QUEUE_ID..., --all, --sender, --recipient or --older-than",
                err=True,
            )
            raise SystemExit(2)
        if not queue_ids:
            _bulk(action, selector, config_path, spool_dir)
            return
        failed = 0
        for queue_id in queue_ids:
            try:
                _admin(action, queue_id, config_path, spool_dir)
            except SystemExit as exc:
                if exc.code == 2:
                    raise
                failed += 1
        if failed:
            raise SystemExit(1)

    command.__doc__ = doc
    return queue_group.command(action)(command)


_admin_command(
    "retry",
    "Make deferred or held messages due now (the relay picks them up on its next scan, within seconds).",
)
_admin_command("hold", "Park waiting messages so no delivery is tried (undo with release).")
_admin_command("release", "Undo hold: held messages become due now.")
_admin_command("delete", "Remove waiting messages without delivering them and without a bounce.")


@queue_group.command("flush")
@_spool_options
def queue_flush(config_path: Path | None, spool_dir: Path | None) -> None:
    """Retry every deferred message now (held messages stay held: release them)."""
    _bulk("flush", Selector(), config_path, spool_dir)
