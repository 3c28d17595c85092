"""`mailrelay up` and `mailrelay graph`: the commands of the local runtime.

`up` runs MailRelay/RelayRoute/Secret manifests on this machine (relay_operator.local.plan
decides what runs, relay_operator.local.up runs it); `graph` draws a topology. Both load and
validate manifests with the operator's own code, so they refuse what `mailrelay check` refuses,
with the same explanations. This module parses arguments and prints; registered through the
``mailrelay.commands`` entry-point group (pyproject.toml).

Exit status of `up`: 0 after a clean stop (Ctrl-C/SIGTERM, every relay drained or killed after
the timeout), 1 when the topology is refused, 2 when the input cannot be read or the state
directory is in use.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import click

from relay.config import GatewayHop, ListenerConfig, RelayConfig, RelayHop, SmarthostHop
from relay_operator import manifests, topology
from relay_operator.cli import manifest_options, plan_manifests
from relay_operator.local.graph import GraphRelay, GraphvizError, render_image, to_dot, to_text
from relay_operator.local.layout import StateDir, StateDirBusyError, locked
from relay_operator.local.plan import LocalOptions, LocalRelay, Plan, PortBook, Refused, build_plan
from relay_operator.local.up import Console, LocalController, UpOptions, busy_listeners


def _users_hint(relay: LocalRelay) -> str | None:
    """The first user name in the relay's users file, for the hint (never a password)."""
    config = relay.config
    if config is None or config.auth is None:
        return None
    data = relay.secrets.get(config.auth.users_file.parent, {}).get(config.auth.users_file.name, b"")
    for line in data.decode("utf-8", "replace").splitlines():
        if line.strip() and not line.lstrip().startswith("#") and ":" in line:
            return line.split(":", 1)[0].strip()
    return None


def _targeted(plan: Plan) -> set[str]:
    """Relays that other relays deliver to (as a relay hop, or as a smarthost on this machine):
    the others are where mail enters, and get a "send a test message" hint."""
    names: set[str] = set()
    smarthost_ports: set[int] = set()
    for relay in plan.relays:
        for route in relay.config.routes if relay.config else []:
            for hop in (route.next_hop, *route.failover):
                if isinstance(hop, RelayHop):
                    names.add(f"{relay.namespace}/{hop.name}")
                elif isinstance(hop, SmarthostHop) and hop.host in ("127.0.0.1", "localhost", "::1"):
                    smarthost_ports.add(hop.port)
    for relay in plan.relays:
        if relay.config and any(listener.port in smarthost_ports for listener in relay.config.listeners):
            names.add(relay.relay_id)
    return names


def _maildirs(config: RelayConfig) -> list[str]:
    found = []
    for route in config.routes:
        for hop in (route.next_hop, *route.failover):
            if isinstance(hop, GatewayHop) and hop.maildir is not None:
                found.append(str(hop.maildir.path))
    return found


def _describe_listener(listener: ListenerConfig) -> str:
    extras = [f"tls {listener.tls}"] if listener.tls != "none" else []
    extras += [f"auth {listener.auth}"] if listener.auth != "none" else []
    return listener.mode + (f" ({', '.join(extras)})" if extras else "")


def _send_hint(relay: LocalRelay, listener: ListenerConfig, host: str) -> str:
    config = relay.config
    domains = [d for d in (config.accept_domains if config else []) if "*" not in d]
    domain = domains[0] if domains else "example.com"
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    if listener.auth == "none":
        return f"send a test message: swaks --server {host}:{listener.port} --to someone@{domain}"
    user = _users_hint(relay) or "USER"
    tls = {"starttls": "--tls starttls --insecure", "implicit": "--tls implicit --insecure"}
    return (
        f"send a test message: MAILRELAY_PASSWORD=... mailrelay send --server {host}:{listener.port} "
        f"{tls.get(listener.tls, '--tls none')} --user {user} --from {user}@{domain} "
        f"--to someone@{domain} --subject hello --body hi"
    )


def startup_lines(plan: Plan, state: StateDir, bind: str) -> list[str]:
    """Where each listener is, where mail lands, and how to send a test message."""
    lines = []
    hints = []
    targeted = _targeted(plan)
    for relay in plan.relays:
        config = relay.config
        assert config is not None
        processes = len(relay.replicas)
        started = f", workers {config.workers} each" if processes else ", not started"
        lines.append(f"{relay.relay_id}: {processes} process(es){started}")
        for listener in config.listeners:
            address = f"{bind}:{listener.port}"
            lines.append(f"  {listener.name:<12} {address:<22} {_describe_listener(listener)}")
            if relay.relay_id not in targeted and processes:
                hints.append(_send_hint(relay, listener, bind))
        lines.extend(f"  maildir      {path}" for path in _maildirs(config))
    lines.append(f"state (spools, configs, secrets, maildirs): {state.root}/")
    return lines + hints


_F = TypeVar("_F", bound=Callable[..., Any])


def _seconds_option(name: str, default: float, text: str) -> Callable[[_F], _F]:
    """A click option for a number of seconds (0 or more), its default shown in --help."""
    return click.option(name, type=click.FloatRange(min=0), default=default, show_default=True, help=text)


@click.command("up")
@manifest_options(stdin=False)
@click.option("--bind", default="127.0.0.1", show_default=True, help="Address every listener binds.")
@click.option(
    "--port-offset",
    type=click.IntRange(-65534, 65534),
    default=0,
    show_default=True,
    help="Added to every declared listener port (e.g. 10000 to run port 25 as non-root).",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(".mailrelay"),
    show_default=True,
    help="Spools, rendered configs, Secrets as files, maildirs.",
)
@_seconds_option("--drain-timeout", 30.0, "Seconds a relay may take to drain on stop before it is killed.")
@_seconds_option(
    "--scale-down-timeout",
    600.0,
    "Seconds a replica removed by lowering replicas may take to hand its queue to the others "
    "before it is stopped anyway (its queue then stays in its spool).",
)
@click.option("--check-only", is_flag=True, help="Validate and show what would run; start nothing.")
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default=None,
    help="Every relay's log lines, over its spec's logFormat (default: the spec's, else text).",
)
def up_command(
    paths: Sequence[str],
    default_namespace: str,
    bind: str,
    port_offset: int,
    state_dir: Path,
    drain_timeout: float,
    scale_down_timeout: float,
    check_only: bool,
    log_format: Literal["text", "json"] | None,
) -> None:
    """Run MailRelays, RelayRoutes and Secrets on this machine, as a cluster would.

    \b
    mailrelay up -f examples/quickstart
    mailrelay up -f relays/ -f routes.yaml --port-offset 10000

    Each MailRelay runs as `replicas` relay processes sharing each listener port (SO_REUSEPORT),
    each with its own spool under --state-dir (kept across runs). Editing a RelayRoute while it
    runs reloads the routes; lowering replicas first hands the removed processes' queues to the
    remaining ones; Ctrl-C drains and stops every relay.
    """
    state = StateDir(state_dir)
    options = LocalOptions(
        bind=bind, port_offset=port_offset, default_namespace=default_namespace, log_format=log_format
    )
    ports = PortBook()
    sources = [Path(p) for p in paths]

    def planner() -> Plan | Refused:
        return build_plan(sources, state, options, ports)

    first = planner()
    if isinstance(first, Refused):
        for line in first.problems:
            click.echo(line)
        click.echo("refused: fix the problems above (the same as `mailrelay check` reports)")
        sys.exit(first.status)
    for warning in first.warnings:
        click.echo(warning)
    if check_only:
        for line in startup_lines(first, state, bind):
            click.echo(line)
        click.echo(f"ok: {len(first.relays)} MailRelay(s) would run")
        return
    sys.exit(
        _run(
            planner,
            first,
            state,
            bind,
            UpOptions(state, drain_timeout, scale_down_timeout=scale_down_timeout),
        )
    )


def _run(
    planner: Callable[[], Plan | Refused], first: Plan, state: StateDir, bind: str, options: UpOptions
) -> int:
    """Hold the state directory, refuse taken ports, then run the plan until stopped."""
    console = Console(sys.stdout)
    try:
        with locked(state):
            busy = busy_listeners(first)
            if busy:
                for line in busy:
                    click.echo(f"error: {line}", err=True)
                click.echo(
                    "error: a port is taken (another `mailrelay up`?); stop it, or pass --port-offset",
                    err=True,
                )
                return 2
            for line in startup_lines(first, state, bind):
                console.line(f"[up] {line}")
            console.line("[up] Ctrl-C stops every relay (queued mail stays for the next run)")
            controller = LocalController(planner, first, options, console)
            return asyncio.run(controller.run())
    except StateDirBusyError as exc:
        click.echo(f"error: {exc}", err=True)
        return 2


# --------------------------------------------------------------------------- graph


def graph_relays(plans: Sequence[topology.NamespacePlan]) -> list[GraphRelay]:
    return [
        GraphRelay(plan.namespace, name, relay_plan.relay.spec.replicas, relay_plan.config)
        for plan in plans
        for name, relay_plan in plan.relays.items()
        if relay_plan.config is not None
    ]


@click.command("graph")
@manifest_options(stdin=False)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the picture: FILE.svg or FILE.png (Graphviz's dot) or FILE.dot (DOT text).",
)
@click.option("--dot", "print_dot", is_flag=True, help="Print the DOT source instead of the text tree.")
def graph_command(paths: Sequence[str], default_namespace: str, output: Path | None, print_dot: bool) -> None:
    """Draw a topology: relays, routes with their matches, smarthosts, MX, gateways.

    \b
    mailrelay graph -f examples/quickstart
    mailrelay graph -f examples/quickstart -o topology.svg

    The text tree goes to the terminal; -o writes a picture. Problems (as `mailrelay check`
    reports them) go to standard error and make the status 1; what is valid is drawn anyway.
    """
    try:
        loaded = manifests.load_manifests(paths, default_namespace)
    except manifests.ManifestError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    plans = plan_manifests(loaded)
    relays = graph_relays(plans)
    dot = to_dot(relays)
    click.echo(dot if print_dot else to_text(relays), nl=False)
    if output is not None:
        try:
            if output.suffix.lower() == ".dot":
                output.write_text(dot)
            else:
                render_image(dot, output)
        except (GraphvizError, OSError) as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        click.echo(f"wrote {output}", err=True)
    problems = [p for plan in plans for p in plan.problems]
    for problem in problems:
        click.echo(str(problem), err=True)
    if not relays:
        click.echo("error: no MailRelay to draw in the given files", err=True)
        sys.exit(1)
    if any(p.severity == "error" for p in problems):
        sys.exit(1)
