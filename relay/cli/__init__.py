"""The `mailrelay` command line: one click group, with the data-plane commands defined in relay
modules and the control-plane commands (operator, render, check, up, graph) contributed by the
operator package through the ``mailrelay.commands`` entry-point group, so that this package
never imports the operator (DESIGN.md section 2).

Usage errors exit with status 2 and a message that says what to do; this module holds no logic
beyond parsing arguments and printing results.
"""

from __future__ import annotations

import logging
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import click

from relay import __version__
from relay.cli.dkim import dkim_group
from relay.cli.drain import drain_command
from relay.cli.open_relay import open_relay_command
from relay.cli.queue import queue_group
from relay.cli.run import hash_password_command, relay_command
from relay.cli.send import send_command
from relay.cli.sendmail import run as run_sendmail
from relay.cli.sendmail import sendmail_command


class _Group(click.Group):
    """Loads contributed commands lazily, so `mailrelay relay` does not import kopf."""

    def _contributed(self) -> dict[str, object]:
        return {ep.name: ep for ep in entry_points(group="mailrelay.commands")}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self._contributed()))

    def main(self, args: Any = None, prog_name: str | None = None, *rest: Any, **kwargs: Any) -> Any:
        """Called as ``sendmail`` (a symlink to this program): be sendmail."""
        if args is None and Path(sys.argv[0]).name == "sendmail":
            raise SystemExit(run_sendmail(sys.argv[1:]))
        return super().main(args, prog_name, *rest, **kwargs)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            return command
        point = self._contributed().get(cmd_name)
        if point is None:
            return None
        loaded = point.load()  # type: ignore[attr-defined]
        return loaded if isinstance(loaded, click.Command) else None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mailrelay")
def main() -> None:
    """mailrelay: Kubernetes-native SMTP relays.

    \b
    Run a topology on this machine:   mailrelay up -f examples/quickstart
    Send a message (the user agent):  mailrelay send --server 127.0.0.1:2587 ...
    As sendmail (cron, PHP mail()):   mailrelay sendmail -t < message.eml
    Run one relay from a config:      mailrelay relay --config relay.yaml
    Inspect a relay's queue:          mailrelay queue list --config relay.yaml
    Empty an orphaned spool to a peer: mailrelay drain --spool DIR --to HOST:PORT ...
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


main.add_command(send_command)
main.add_command(sendmail_command)
main.add_command(relay_command)
main.add_command(queue_group)
main.add_command(hash_password_command)
main.add_command(dkim_group)
main.add_command(drain_command)
main.add_command(open_relay_command)
