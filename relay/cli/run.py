"""Data-plane commands: ``mailrelay relay`` (run one relay) and ``mailrelay hash-password`` (a
line for the users file); ``mailrelay queue`` is in relay.cli.queue.

Parsing arguments and printing only; the work is in relay.app, relay.spool and relay.users.
Heavy modules are imported inside the commands so ``mailrelay --help`` stays fast.
Exit status: 0 done, 1 the thing asked for does not exist or failed, 2 usage or config error.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from relay.config import ConfigError, load_config

F = TypeVar("F", bound=Callable[..., Any])


def load_or_exit(path: Path, what: str) -> Any:
    try:
        return load_config(path)
    except ConfigError as exc:
        click.echo(f"mailrelay {what}: invalid configuration {exc}", err=True)
        raise SystemExit(2) from exc


# ----------------------------------------------------------------------------- relay


@click.command("relay")
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="The relay configuration (YAML), e.g. examples/standalone/relay.yaml.",
)
@click.option(
    "--grace",
    default=25.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds to finish transactions and deliveries after SIGTERM.",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default=None,
    help="Log lines as text or one JSON object per line (default: the config's logFormat, text).",
)
def relay_command(config_path: Path, grace: float, log_format: str | None) -> None:
    """Run one relay process from a config file (what each relay pod runs).

    Reloads the file on SIGHUP and when it changes; stops cleanly on SIGTERM.
    """
    # A SIGHUP before the event loop installs its handler must not kill a starting relay (nor a
    # starting worker, which inherits the disposition); the file is read after this point anyway.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    config = load_or_exit(config_path, "relay")
    from relay.dkim import check_keys

    try:
        check_keys(config)  # a DKIM key that cannot be used is a config error, not a crash later
    except ConfigError as exc:
        click.echo(f"mailrelay relay: invalid configuration {config_path}:\n{exc}", err=True)
        raise SystemExit(2) from exc
    from relay.app import run_relay

    raise SystemExit(run_relay(config_path, config, grace=grace, log_format=log_format))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- hash-password


@click.command("hash-password")
@click.option("--user", help="Print a whole users-file line 'user:{PBKDF2-SHA256}...'.")
@click.option("--iterations", default=None, type=click.IntRange(min=1000), help="PBKDF2 iterations.")
def hash_password_command(user: str | None, iterations: int | None) -> None:
    """Hash a password for the users file (prompted, or one line on standard input)."""
    from relay.users import DEFAULT_ITERATIONS, hash_password

    if sys.stdin.isatty():
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        click.echo("mailrelay hash-password: empty password", err=True)
        raise SystemExit(2)
    hashed = hash_password(password, iterations=iterations or DEFAULT_ITERATIONS)
    click.echo(f"{user}:{hashed}" if user else hashed)
