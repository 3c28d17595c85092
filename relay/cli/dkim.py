"""``mailrelay dkim``: DKIM keys for RelayRoute ``spec.dkim``.

``mailrelay dkim keygen --domain D --selector S`` makes a private key, writes it as a Secret
manifest (key ``private.key``, file mode 0600, never overwritten) and prints the TXT record to
publish; ``mailrelay dkim record --key FILE ...`` prints the record of an existing key.
Parsing and printing only: the keys are relay.dkim's, the record format relay.core.dkim's.
Exit status: 0 done, 2 usage error (a bad domain or selector, an existing output file).
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import click
import yaml
from pydantic import ValidationError

from relay.config import DkimKeyConfig, describe_validation_error

ALGORITHMS = ("rsa-sha256", "ed25519-sha256")
SECRET_KEY = "private.key"


def _checked(domain: str, selector: str, algorithm: str) -> DkimKeyConfig:
    try:
        return DkimKeyConfig(domain=domain, selector=selector, key_file=Path(SECRET_KEY), algorithm=algorithm)
    except ValidationError as exc:
        raise click.UsageError(describe_validation_error(exc)) from exc


def default_secret_name(selector: str, domain: str) -> str:
    return f"dkim-{selector}-{domain}".replace(".", "-").replace("_", "-").lower()[:253]


def _print_record(name: str, value: str, config: DkimKeyConfig, secret: str) -> None:
    from relay.core.dkim import split_txt

    click.echo("Publish this DNS record:")
    click.echo(f"  {name}. IN TXT " + " ".join(f'"{part}"' for part in split_txt(value)))
    click.echo("")
    click.echo("and list the key in the RelayRoute:")
    snippet = {
        "dkim": [
            {
                "domain": config.domain,
                "selector": config.selector,
                "algorithm": config.algorithm,
                "privateKeySecretRef": {"name": secret, "key": SECRET_KEY},
            }
        ]
    }
    for line in yaml.safe_dump(snippet, sort_keys=False).splitlines():
        click.echo(f"  {line}")


@click.group("dkim")
def dkim_group() -> None:
    """DKIM signing keys for RelayRoute spec.dkim."""


@dkim_group.command("keygen")
@click.option("--domain", required=True, help="The signing domain (d=), the From domain it covers.")
@click.option("--selector", required=True, help="The selector (s=), e.g. 2026a.")
@click.option("--algorithm", type=click.Choice(ALGORITHMS), default="rsa-sha256", show_default=True)
@click.option("--bits", type=click.IntRange(min=2048, max=4096), default=2048, show_default=True)
@click.option("--secret-name", help="Name of the Secret (default dkim-SELECTOR-DOMAIN).")
@click.option("--namespace", help="metadata.namespace of the Secret.")
@click.option(
    "--output",
    "-o",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Where the Secret manifest goes (default SECRET-NAME.yaml); never overwritten.",
)
def keygen_command(
    domain: str,
    selector: str,
    algorithm: str,
    bits: int,
    secret_name: str | None,
    namespace: str | None,
    output: Path | None,
) -> None:
    """Make a key, write it as a Secret manifest, print the DNS record to publish."""
    from relay.dkim import generate_key, public_record

    config = _checked(domain, selector, algorithm)
    secret = secret_name or default_secret_name(config.selector, config.domain)
    target = output or Path(f"{secret}.yaml")
    pem = generate_key(algorithm, bits)
    metadata: dict[str, str] = {"name": secret}
    if namespace:
        metadata["namespace"] = namespace
    manifest = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata,
        "type": "Opaque",
        "data": {SECRET_KEY: base64.b64encode(pem).decode("ascii")},
    }
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise click.UsageError(f"{target} exists; it may hold a key in use (choose another -o)") from exc
    except OSError as exc:
        raise click.UsageError(f"cannot write {target}: {exc.strerror}") from exc
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        yaml.safe_dump(manifest, out, sort_keys=False)
    click.echo(f"wrote Secret {secret} to {target} (kubectl apply -f {target})")
    name, value = public_record(pem, algorithm, config.selector, config.domain)
    _print_record(name, value, config, secret)


@dkim_group.command("record")
@click.option(
    "--key", "key_file", required=True, type=click.Path(path_type=Path, dir_okay=False, exists=True)
)
@click.option("--domain", required=True)
@click.option("--selector", required=True)
@click.option("--algorithm", type=click.Choice(ALGORITHMS), default="rsa-sha256", show_default=True)
def record_command(key_file: Path, domain: str, selector: str, algorithm: str) -> None:
    """Print the DNS record of an existing PEM private key."""
    from relay.dkim import DkimKeyError, public_record

    config = _checked(domain, selector, algorithm)
    try:
        name, value = public_record(key_file.read_bytes(), algorithm, config.selector, config.domain)
    except DkimKeyError as exc:
        raise click.UsageError(f"{key_file}: {exc}") from exc
    from relay.core.dkim import split_txt

    click.echo(f"{name}. IN TXT " + " ".join(f'"{part}"' for part in split_txt(value)))
