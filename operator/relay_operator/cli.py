"""`mailrelay render` and `mailrelay check`: the operator's render step on manifests from files.

`render` prints every object the operator would create for the given MailRelays and
RelayRoutes, as multi-document YAML (for dry runs and GitOps review); `check` validates the
topology (invalid specs, routing loops, unknown relays, conflicting routes, Secrets) and
explains each problem. Both use exactly the code the operator runs (`manifests`, `topology`,
`builders`); this module only parses arguments and prints.

Exit status: 0 when there is no error (warnings are printed), 1 when there is at least one
error (one line each), 2 when the input cannot be read. Registered through the
``mailrelay.commands`` entry-point group (pyproject.toml), so the relay never imports this.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import click
import yaml

from relay_operator import builders, manifests, topology
from relay_operator.topology import NamespacePlan, Problem

_DEFAULT_OPTIONS = builders.BuildOptions()
_F = TypeVar("_F", bound=Callable[..., Any])


def manifest_options(*, stdin: bool, required: bool = True) -> Callable[[_F], _F]:
    """The options of every command that reads manifests: -f/--filename (repeatable; '-' is
    standard input when `stdin`) and -n/--namespace for documents that name none."""
    files = "A manifest file or folder (searched recursively)"
    files += "; '-' reads standard input. Repeatable." if stdin else ". Repeatable."

    def decorate(command: _F) -> _F:
        command = click.option(
            "-n",
            "--namespace",
            "default_namespace",
            default="default",
            show_default=True,
            help="Namespace for documents that name none.",
        )(command)
        return click.option(
            "-f", "--filename", "paths", multiple=True, required=required, metavar="PATH", help=files
        )(command)

    return decorate


def _load(paths: Sequence[str], default_namespace: str) -> manifests.ManifestSet:
    try:
        return manifests.load_manifests(paths, default_namespace)
    except manifests.ManifestError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


def plan_manifests(
    loaded: manifests.ManifestSet, resolver: topology.RelayResolver | None = None
) -> list[NamespacePlan]:
    """One plan per namespace, in namespace order (what the operator would compute in-cluster)."""
    return [
        topology.plan_namespace(ns.namespace, ns.relays, ns.routes, resolver=resolver)
        for ns in loaded.namespaces.values()
    ]


def secret_problems_from_files(
    loaded: manifests.ManifestSet, plans: Sequence[NamespacePlan]
) -> list[Problem]:
    """Secrets referenced but not given are warnings (they may exist in the cluster); given
    Secrets without a needed key are errors."""
    found: list[Problem] = []
    for plan in plans:
        namespace = loaded.namespaces[plan.namespace]

        def lookup(name: str, namespace: manifests.NamespaceManifests = namespace) -> dict[str, bytes] | None:
            secret = namespace.secret(name)
            return None if secret is None else manifests.secret_data(secret)

        for relay_plan in plan.relays.values():
            for problem in topology.secret_problems(relay_plan, lookup, missing_severity="warning"):
                if problem.reason == "SecretMissing":
                    problem = Problem(
                        problem.subject,
                        problem.reason,
                        problem.message.replace("does not exist", "is not among the given manifests")
                        + " (it must exist in the cluster)",
                        "warning",
                    )
                found.append(problem)
    return found


def dump_documents(objects: Sequence[Mapping[str, Any]]) -> str:
    """Multi-document YAML, each document starting with ``---``."""
    return "".join(
        "---\n" + yaml.safe_dump(dict(obj), sort_keys=False, default_flow_style=False) for obj in objects
    )


def render_objects(
    plans: Sequence[NamespacePlan], options: builders.BuildOptions = _DEFAULT_OPTIONS
) -> tuple[list[dict[str, Any]], list[Problem]]:
    """Every object for every relay that has a rendered config, and the errors of the plans."""
    objects: list[dict[str, Any]] = []
    for plan in plans:
        for relay_plan in plan.relays.values():
            if relay_plan.config is not None:
                objects.extend(builders.build_objects(relay_plan, options))
    return objects, [p for plan in plans for p in plan.errors]


def render_documents(
    documents: Sequence[Mapping[str, Any]],
    options: builders.BuildOptions = _DEFAULT_OPTIONS,
    *,
    default_namespace: str = "default",
    cluster_domain: str = "cluster.local",
) -> str:
    """What `mailrelay render` prints for these decoded manifests (errors are not raised)."""
    loaded = manifests.group_documents([("<documents>", d) for d in documents], default_namespace)
    objects, _ = render_objects(plan_manifests(loaded, topology.cluster_resolver(cluster_domain)), options)
    return dump_documents(objects)


@click.command("render")
@manifest_options(stdin=True)
@click.option(
    "--image",
    default=builders.DEFAULT_IMAGE,
    show_default=True,
    help="Relay image for MailRelays that set none.",
)
@click.option(
    "--cluster-domain",
    default="cluster.local",
    show_default=True,
    help="DNS domain of the cluster (for relay next hops).",
)
def render_command(paths: Sequence[str], default_namespace: str, image: str, cluster_domain: str) -> None:
    """Print every object the operator would create, as multi-document YAML.

    \b
    mailrelay render -f examples/quickstart > rendered.yaml
    mailrelay render -f relays/ -f routes/ | kubectl diff -f -

    Owner references are left out (they need the MailRelay's uid, which only the cluster
    knows). Problems go to standard error; the status is 1 when there is an error.
    """
    loaded = _load(paths, default_namespace)
    plans = plan_manifests(loaded, topology.cluster_resolver(cluster_domain))
    objects, errors = render_objects(plans, builders.BuildOptions(image=image))
    click.echo(dump_documents(objects), nl=False)
    for problem in errors:
        click.echo(str(problem), err=True)
    if errors:
        sys.exit(1)


@click.command("check")
@manifest_options(stdin=True, required=False)
@click.option("--strict", is_flag=True, help="Treat warnings as errors.")
@click.option(
    "--open-relay",
    "open_relay",
    metavar="HOST:PORT",
    default=None,
    help="Instead: try third-party relaying through a running listener (mailrelay open-relay).",
)
@click.option("--domain", default=None, help="With --open-relay: a domain the relay serves.")
def check_command(
    paths: Sequence[str], default_namespace: str, strict: bool, open_relay: str | None, domain: str | None
) -> None:
    """Validate MailRelays and RelayRoutes: specs, routing loops, unknown relays, conflicting
    routes and the Secrets they use. One line per problem; status 1 when there is an error.
    With --open-relay HOST:PORT, run the open-relay probe set against a listener instead
    (status 1 when it relayed a probe, 2 when it could not be probed).

    \b
    mailrelay check -f examples/quickstart
    mailrelay check --open-relay mx.example.com:25
    """
    if open_relay is not None:
        # The probe is the relay package's (relay.open_relay); the operator does not import its
        # adapters, so it runs as `mailrelay open-relay`, as `up` runs relay processes.
        command = [sys.executable, "-m", "relay", "open-relay", open_relay]
        sys.exit(subprocess.call(command + (["--domain", domain] if domain else [])))
    if not paths:
        click.echo("error: give manifests with -f PATH (or --open-relay HOST:PORT)", err=True)
        sys.exit(2)
    loaded = _load(paths, default_namespace)
    plans = plan_manifests(loaded)
    problems = [p for plan in plans for p in plan.problems]
    try:
        for namespace in loaded.namespaces.values():
            for secret in namespace.secrets:
                manifests.secret_data(secret)  # the API server would refuse broken base64
        problems += secret_problems_from_files(loaded, plans)
    except manifests.ManifestError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    errors = [p for p in problems if p.severity == "error" or strict]
    for problem in problems:
        click.echo(str(problem))
    namespaces = len(loaded.namespaces)
    summary = (
        f"{loaded.relay_count} MailRelay(s) and {loaded.route_count} RelayRoute(s) in {namespaces} "
        f"namespace(s): {sum(p.severity == 'error' for p in problems)} error(s), "
        f"{sum(p.severity == 'warning' for p in problems)} warning(s)"
    )
    if loaded.relay_count + loaded.route_count == 0:
        click.echo("error: no MailRelay or RelayRoute found in the given files")
        sys.exit(1)
    click.echo(("ok: " if not errors else "failed: ") + summary)
    if errors:
        sys.exit(1)
