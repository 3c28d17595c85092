"""What a private Postfix instance is configured with: its main.cf and master.cf, and the
variants of that configuration the benchmark can compare (``--postfix-variant``).

Every variant keeps what the comparison needs from both systems: a durable queue (cleanup
fsyncs the queue file before smtpd answers 250, Postfix's default), smtpd on one loopback port,
nothing delivered locally, every message relayed to the next hop, logging as a real install
logs (default verbosity, every line written to a file, here through Postfix's own postlogd
because no syslog daemon runs on these machines), ``in_flow_delay`` as shipped (1 s), the same
delivery concurrency per destination as the mailrelay under test (Postfix ships 20), and the
retry schedule as shipped (``minimal_backoff_time`` 300 s, ``maximal_backoff_time`` 4000 s).
What the variants change is what an operator tunes on a relay:

- ``debian``: Debian's master.cf (every service, chroot off because a private queue directory
  has no chroot files) and ``smtputf8_enable = yes``;
- ``trimmed``: a master.cf with only the services a relay uses (smtpd, cleanup, qmgr,
  trivial-rewrite, smtp, bounce/defer/trace, error/retry, anvil, scache, postlogd; pickup,
  showq and flush for the operator's own commands; tlsmgr only with TLS), no local, virtual,
  lmtp, postscreen, proxymap, verify or pipe agents, and ``smtputf8_enable = no`` unless the
  caller needs SMTPUTF8;
- ``trimmed-tuned``: ``trimmed`` plus what an operator tunes on a busy relay: long-lived
  daemons (``max_use``), the relayhost's connections always cached, no MIME parsing of mail it
  only relays (see `VARIANTS`). The process limits stay as shipped (100): the benchmark's
  loads never reach them (a reached limit is logged, and `PrivatePostfix.warnings` reports it).

Pure: text in, text out. `bench.systems.PrivatePostfix` writes the files and runs Postfix.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# Postfix's shipped default_destination_concurrency_limit: the per-destination level both
# systems are given unless --destination-concurrency says otherwise.
SHIPPED_DESTINATION_CONCURRENCY = 20
# Postfix's shipped retry schedule (postconf -d), printed next to mailrelay's.
SHIPPED_MINIMAL_BACKOFF = "300s"
SHIPPED_MAXIMAL_BACKOFF = "4000s"


@dataclass(frozen=True)
class PostfixVariant:
    name: str
    summary: str
    trimmed: bool  # master.cf: only the services a relay uses (else Debian's)
    smtputf8: bool  # smtputf8_enable when the caller does not need SMTPUTF8
    settings: tuple[tuple[str, str], ...] = ()  # further main.cf parameters

    def describe(self) -> str:
        master = "trimmed master.cf" if self.trimmed else "Debian's master.cf (chroot off)"
        main = [f"smtputf8_enable = {'yes' if self.smtputf8 else 'no'}"]
        main += [f"{key} = {value}" for key, value in self.settings]
        return f"{self.name}: {master}; " + ", ".join(main)


VARIANTS: dict[str, PostfixVariant] = {
    variant.name: variant
    for variant in (
        PostfixVariant(
            "debian",
            "Debian's master.cf, smtputf8_enable = yes (the benchmark's Postfix before issue 13)",
            trimmed=False,
            smtputf8=True,
        ),
        PostfixVariant(
            "trimmed",
            "master.cf trimmed to what a relay uses, smtputf8_enable = no",
            trimmed=True,
            smtputf8=False,
        ),
        PostfixVariant(
            "trimmed-tuned",
            "trimmed, and the daemons a message passes through live long (max_use), the "
            "relayhost's connections are always cached, no MIME parsing of relayed mail",
            trimmed=True,
            smtputf8=False,
            settings=(
                # cleanup and smtp serve one request per message and exit after max_use (100)
                # of them: at 500 msg/s that is 10 new processes a second.
                ("max_use", "10000"),
                # keep connections to the relayhost open between deliveries, not only when a
                # backlog builds up (CONNECTION_CACHE_README: the relayhost example).
                ("smtp_connection_cache_destinations", "$relayhost"),
                # a relay with no MIME header or body checks need not parse the MIME structure
                # of what it receives (mailrelay does not either); every next hop here offers
                # 8BITMIME, so no 8-bit to 7-bit conversion is ever needed.
                ("disable_mime_input_processing", "yes"),
            ),
        ),
    )
}

# The variant the benchmark uses unless --postfix-variant says otherwise: the best one measured
# (bench/RESULTS.md, "Postfix variants").
DEFAULT_VARIANT = "trimmed-tuned"


def variant_from_spec(spec: str) -> PostfixVariant:
    """A variant by name, or an experiment derived from one: ``BASE+key=value+key=value``
    (``trimmed+max_use=10000``; ``smtputf8_enable=yes|no`` sets the variant's SMTPUTF8)."""
    base_name, *changes = spec.split("+")
    base = VARIANTS.get(base_name.strip())
    if base is None:
        raise ValueError(f"unknown Postfix variant {base_name!r}: one of {', '.join(VARIANTS)}")
    if not changes:
        return base
    smtputf8 = base.smtputf8
    settings = dict(base.settings)
    for change in changes:
        key, sep, value = change.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"Postfix variant {spec!r}: expected BASE+key=value, got {change!r}")
        if key.strip() == "smtputf8_enable":
            smtputf8 = value.strip() == "yes"
        else:
            settings[key.strip()] = value.strip()
    return PostfixVariant(
        spec, f"{base.name} with {', '.join(changes)}", base.trimmed, smtputf8, tuple(settings.items())
    )


def debian_master_cf(text: str, port: int) -> str:
    """Debian's master.cf with smtpd on 127.0.0.1:port and chroot off (the private queue
    directory has no chroot files)."""
    lines = []
    for line in text.splitlines():
        fields = line.split()
        if line[:1].isalnum() and len(fields) >= 8:
            if fields[0] == "smtp" and fields[1] == "inet":
                line = f"127.0.0.1:{port} inet n - n - - smtpd"
            elif fields[4] == "y":
                fields[4] = "n"
                line = " ".join(fields)
        lines.append(line)
    return "\n".join(lines) + "\n"


# service, type, private, unpriv, chroot, wakeup, maxproc, command: Debian's lines for these
# services, chroot off.
_TRIMMED = (
    ("pickup", "unix", "n", "-", "n", "60", "1", "pickup"),
    ("cleanup", "unix", "n", "-", "n", "-", "0", "cleanup"),
    ("qmgr", "unix", "n", "-", "n", "300", "1", "qmgr"),
    ("rewrite", "unix", "-", "-", "n", "-", "-", "trivial-rewrite"),
    ("bounce", "unix", "-", "-", "n", "-", "0", "bounce"),
    ("defer", "unix", "-", "-", "n", "-", "0", "bounce"),
    ("trace", "unix", "-", "-", "n", "-", "0", "bounce"),
    ("flush", "unix", "n", "-", "n", "1000?", "0", "flush"),
    ("smtp", "unix", "-", "-", "n", "-", "-", "smtp"),
    ("showq", "unix", "n", "-", "n", "-", "-", "showq"),
    ("error", "unix", "-", "-", "n", "-", "-", "error"),
    ("retry", "unix", "-", "-", "n", "-", "-", "error"),
    ("anvil", "unix", "-", "-", "n", "-", "1", "anvil"),
    ("scache", "unix", "-", "-", "n", "-", "1", "scache"),
    ("postlog", "unix-dgram", "n", "-", "n", "-", "1", "postlogd"),
)
_TLSMGR = ("tlsmgr", "unix", "-", "-", "n", "1000?", "1", "tlsmgr")


def trimmed_master_cf(port: int, *, tls: bool) -> str:
    """Only the services a relay uses: smtpd on 127.0.0.1:port and the daemons behind it."""
    rows = [(f"127.0.0.1:{port}", "inet", "n", "-", "n", "-", "-", "smtpd"), *_TRIMMED]
    if tls:
        rows.append(_TLSMGR)
    lines = ["# a relay's services only (bench.postfix_config.trimmed_master_cf)"]
    lines += ["  ".join(row) for row in rows]
    return "\n".join(lines) + "\n"


def master_cf(variant: PostfixVariant, port: int, *, tls: bool, debian_text: str | None) -> str:
    if variant.trimmed:
        return trimmed_master_cf(port, tls=tls)
    if debian_text is None:
        raise ValueError(f"variant {variant.name} needs Debian's master.cf (/etc/postfix/master.cf)")
    return debian_master_cf(debian_text, port)


@dataclass(frozen=True)
class TlsFiles:
    cert_file: Path
    key_file: Path


def main_cf(
    *,
    variant: PostfixVariant,
    directory: Path,
    hostname: str,
    relayhost: str,
    transports: Mapping[str, str],
    tls: TlsFiles | None,
    smtputf8: bool,
    destination_concurrency: int | None,
    overrides: Mapping[str, str] | None = None,
) -> str:
    """main.cf for a private instance under `directory` (queue/, data/, maillog)."""
    lines = [
        "compatibility_level = 3.6",
        f"queue_directory = {directory}/queue",
        f"data_directory = {directory}/data",
        f"myhostname = {hostname}",
        "mydestination =",
        "mynetworks = 127.0.0.0/8",
        "inet_interfaces = 127.0.0.1",
        "inet_protocols = ipv4",
        f"relayhost = {relayhost}",
    ]
    if transports:
        inline = ", ".join(f"{domain}={target}" for domain, target in transports.items())
        lines.append(f"transport_maps = inline:{{{inline}}}")
    if tls is not None:
        lines += [
            f"smtpd_tls_cert_file = {tls.cert_file}",
            f"smtpd_tls_key_file = {tls.key_file}",
            "smtpd_tls_security_level = may",
            "smtp_tls_security_level = may",
        ]
    lines += [
        "smtpd_relay_restrictions = permit_mynetworks, reject",
        f"smtputf8_enable = {'yes' if smtputf8 else 'no'}",
        "alias_maps =",
        "alias_database =",
    ]
    if variant.trimmed:
        # no local domains: no local recipient table (and no proxymap service to ask for one)
        lines.append("local_recipient_maps =")
    lines += [
        "local_transport = error:local delivery disabled",
        "biff = no",
        f"maillog_file_prefixes = {directory}",
        f"maillog_file = {directory}/maillog",
        "smtp_connect_timeout = 5s",
    ]
    if destination_concurrency is not None:
        lines.append(f"default_destination_concurrency_limit = {destination_concurrency}")
    lines += [f"{key} = {value}" for key, value in variant.settings]
    # experiments (--postfix-set): Postfix takes the last value of a parameter
    lines += [f"{key} = {value}" for key, value in (overrides or {}).items()]
    return "\n".join(lines) + "\n"
