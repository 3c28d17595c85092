"""``mailrelay open-relay HOST:PORT``: the open-relay probe set against a listener (also what
``mailrelay check --open-relay`` runs). Prints one line per probe; exit 0 when nothing was
relayed, 1 when a probe was relayed (an open relay), 2 when the listener could not be probed."""

from __future__ import annotations

import asyncio
import sys

import click

from relay.core import open_relay
from relay.open_relay import run_probes


def split_target(target: str) -> tuple[str, int]:
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535 or not host:
        raise click.BadParameter(f"{target!r}: use HOST:PORT, e.g. mx.example.com:25", param_hint="HOST:PORT")
    return host.strip("[]"), int(port)


@click.command("open-relay")
@click.argument("target", metavar="HOST:PORT")
@click.option("--domain", default=None, help="A domain the relay serves (default: the host name).")
@click.option("--source", default=None, help="Local address to connect from (an untrusted one).")
@click.option("--proxy-client", default=None, help="Send a PROXY v2 header announcing this IPv4 client.")
@click.option("--timeout", default=10.0, show_default=True, help="Seconds per reply.")
def open_relay_command(
    target: str, domain: str | None, source: str | None, proxy_client: str | None, timeout: float
) -> None:
    """Try third-party relaying through HOST:PORT (MAIL FROM an outside address, RCPT to an
    outside domain in a dozen spellings; never DATA). Status 1 when any probe was relayed.

    \b
    mailrelay open-relay mx.example.com:25 --domain example.com
    """
    host, port = split_target(target)
    try:
        results = asyncio.run(
            run_probes(
                host, port, ours=domain or host, source=source, proxy_client=proxy_client, timeout=timeout
            )
        )
    except (OSError, ConnectionError, TimeoutError) as exc:
        click.echo(f"error: cannot probe {host}:{port}: {exc or type(exc).__name__}", err=True)
        sys.exit(2)
    for line in open_relay.report(results):
        click.echo(line)
    if open_relay.is_open(results):
        click.echo(f"OPEN RELAY: {sum(r.relayed for r in results)} of {len(results)} probes relayed")
        sys.exit(1)
    click.echo(f"ok: {len(results)} probes, none relayed")
