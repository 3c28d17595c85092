"""`mailrelay operator`: run the kopf operator that reconciles MailRelays and RelayRoutes.

Parses flags, builds a fresh kopf registry with `handlers.register`, and runs kopf in this
process until SIGTERM/SIGINT. Namespace-scoped (`--namespace`, repeatable, globs allowed) or
cluster-wide (`--all-namespaces`); kopf's liveness endpoint on `--liveness`; peering so that two
replicas do not both act (`--peering NAME`, which needs kopf's KopfPeering or ClusterKopfPeering
CRD, or `--standalone` for exactly one replica; the operator's resync loop follows the same
peering, under the identity this command gives kopf). Contributed to the `mailrelay` CLI through
the ``mailrelay.commands`` entry point; holds no logic of its own.
"""

from __future__ import annotations

import logging
from typing import Any, cast

import click

from relay.config import parse_duration


def _seconds(_ctx: click.Context, _param: click.Parameter, value: str) -> float:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


@click.command("operator")
@click.option(
    "--namespace",
    "-n",
    "namespaces",
    multiple=True,
    metavar="NS",
    help="Watch this namespace (repeatable; globs like 'mail-*' allowed).",
)
@click.option("--all-namespaces", "-A", is_flag=True, help="Watch every namespace (cluster-wide).")
@click.option(
    "--liveness",
    metavar="URL",
    default=None,
    help="Serve kopf's liveness probe, e.g. http://0.0.0.0:8080/healthz.",
)
@click.option("--peering", "peering_name", metavar="NAME", default=None, help="kopf peering object to join.")
@click.option("--standalone", is_flag=True, help="No peering: the only operator replica.")
@click.option("--priority", type=int, default=0, show_default=True, help="Peering priority of this replica.")
@click.option(
    "--resync-interval",
    default="60s",
    show_default=True,
    callback=_seconds,
    help="How often every MailRelay is reconciled even without a change.",
)
@click.option(
    "--retry-delay",
    default="15s",
    show_default=True,
    callback=_seconds,
    help="First retry delay after a temporary failure (a Secret that does not exist yet); doubles.",
)
@click.option(
    "--drain-poll",
    default="5s",
    show_default=True,
    callback=_seconds,
    help="How often a namespace is reconciled while a scale-down drains pods (their GET /queue).",
)
@click.option("--cluster-domain", default="cluster.local", show_default=True, help="DNS suffix of Services.")
@click.option("--image", default=None, help="Relay image for the pods (default: this version's image).")
@click.option(
    "--image-pull-policy",
    type=click.Choice(["IfNotPresent", "Always", "Never"]),
    default=None,
    help="imagePullPolicy of the relay containers (default: Kubernetes' own; a MailRelay may override).",
)
@click.option(
    "--kubeconfig", default=None, type=click.Path(dir_okay=False), help="Kubeconfig (not in a pod)."
)
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    default=None,
    help="Serve the operator's Prometheus metrics on http://0.0.0.0:PORT/metrics (default: off).",
)
@click.option("--verbose", "-v", is_flag=True, help="Debug logging.")
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Log lines as text or one JSON object per line (kopf's JSON format).",
)
def operator_command(
    namespaces: tuple[str, ...],
    all_namespaces: bool,
    liveness: str | None,
    peering_name: str | None,
    standalone: bool,
    priority: int,
    resync_interval: float,
    retry_delay: float,
    drain_poll: float,
    cluster_domain: str,
    image: str | None,
    image_pull_policy: str | None,
    kubeconfig: str | None,
    metrics_port: int | None,
    verbose: bool,
    log_format: str,
) -> None:
    """Run the MailRelay operator (kopf) against the current cluster.

    \b
    In a pod:        mailrelay operator --all-namespaces --peering mailrelay --liveness http://0.0.0.0:8080/healthz
    On a laptop:     mailrelay operator -n mail --standalone
    """
    if bool(namespaces) == all_namespaces:
        raise click.UsageError("give either --namespace NS (one or more) or --all-namespaces")
    if peering_name and standalone:
        raise click.UsageError("--peering and --standalone exclude each other")
    if kubeconfig:
        import os

        os.environ["KUBECONFIG"] = kubeconfig  # before `kubernetes` reads it (kopf's login handler)

    import kopf

    from relay_operator import builders, handlers

    # kopf installs its own root handler; the one `mailrelay`'s group made would print every
    # line a second time (in the other format)
    logging.getLogger().handlers.clear()
    kopf.configure(
        verbose=verbose,
        debug=verbose,
        log_format=kopf.LogFormat.JSON if log_format == "json" else kopf.LogFormat.FULL,
        log_refkey="object" if log_format == "json" else None,
    )
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    options = handlers.OperatorOptions(
        resync_interval=resync_interval,
        retry_delay=retry_delay,
        drain_poll=drain_poll,
        kubeconfig=kubeconfig,
        cluster_domain=cluster_domain,
        build=builders.BuildOptions(
            image=image or builders.DEFAULT_IMAGE, image_pull_policy=image_pull_policy
        ),
        peering=peering_name,
        priority=priority,
        clusterwide=all_namespaces,
    )
    if metrics_port is not None:
        from relay_operator import metrics

        try:
            metrics.serve(metrics_port)
        except OSError as exc:
            raise click.ClickException(f"cannot serve metrics on port {metrics_port}: {exc}") from exc
    registry = kopf.OperatorRegistry()
    handlers.register(registry, handlers.Runtime(options))
    kopf.run(
        registry=registry,
        settings=handlers.settings(),
        clusterwide=all_namespaces,
        namespaces=namespaces,
        liveness_endpoint=liveness,
        peering_name=peering_name,
        standalone=True if standalone else None,
        priority=priority,
        # kopf's Identity is a NewType of str it does not export; the resync loop reads the
        # peering object as this peer.
        identity=cast(Any, options.identity),
    )
