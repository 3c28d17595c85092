"""The relay configuration: the one contract between the operator and the relay process.

The operator renders a `RelayConfig` into a ConfigMap (``relay.yaml``); `mailrelay up` renders the
same model into files on this machine; `mailrelay relay --config FILE` loads it. Field names on
disk are camelCase, like the CRDs they come from (DESIGN.md section 1); durations are strings
with a unit (``"5m"``) or seconds, sizes are Kubernetes quantities (``"25Mi"``) or bytes.

This module decides what a valid configuration is and how it is parsed and written. It does no
I/O beyond reading and writing the file it is given, and it never imports the operator, kopf or
any relay adapter: the operator may import it (and only it, plus value types).
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

# --------------------------------------------------------------------------- value formats
# The one definition of the two value grammars of manifests and configs (the operator's spec and
# the CRD schema use the patterns below; tests/relay_operator/test_spec.py checks the CRD's copy):
# - a duration is a number and a unit, ms, s, m, h or d ("250ms", "30s", "5m", "5d");
# - a size is a Kubernetes quantity of bytes, a number with an optional decimal (k, M, G, T) or
#   binary (Ki, Mi, Gi, Ti) suffix ("25Mi", "10M", "1048576").
# A relay config (this file's models) also takes a duration as a plain number of seconds and
# allows blanks around the parts, since configs are also written by hand. CPU quantities
# ("500m", "2") are a third grammar, Kubernetes' own, used only for `workers` (relay.core.cpus).

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_UNITS = {
    "Ki": 1024,
    "Mi": 1024**2,
    "Gi": 1024**3,
    "Ti": 1024**4,
    "k": 1000,
    "K": 1000,
    "M": 1000**2,
    "G": 1000**3,
    "T": 1000**4,
}
_NUMBER = r"[0-9]+(\.[0-9]+)?"
DURATION_PATTERN = rf"^{_NUMBER}({'|'.join(_DURATION_UNITS)})$"
SIZE_PATTERN = rf"^{_NUMBER}({'|'.join(_SIZE_UNITS)})?$"
_DURATION = re.compile(rf"^\s*({_NUMBER})\s*({'|'.join(_DURATION_UNITS)})?\s*$")
_SIZE = re.compile(rf"^\s*({_NUMBER})\s*({'|'.join(_SIZE_UNITS)})?\s*$")


def parse_duration(value: object) -> float:
    """Seconds from ``"2s"``, ``"5m"``, ``"1h"``, ``"5d"``, ``"250ms"`` or a number of seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration must be a string like '5m' or a number of seconds")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            number, _, unit = match.groups()
            return float(number) * _DURATION_UNITS[unit or "s"]
    raise ValueError(f"invalid duration {value!r}: use a number with a unit s, m, h or d, e.g. '5m'")


def parse_size(value: object) -> int:
    """Bytes from a Kubernetes quantity (``"25Mi"``, ``"10M"``) or a plain number of bytes."""
    if isinstance(value, bool):
        raise ValueError("a size must be a quantity like '25Mi' or a number of bytes")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match:
            number, _, unit = match.groups()
            return int(float(number) * (_SIZE_UNITS[unit] if unit else 1))
    raise ValueError(f"invalid size {value!r}: use a Kubernetes quantity such as '25Mi' or a number of bytes")


def format_duration(seconds: float) -> str:
    """The shortest exact string for a duration, the inverse of `parse_duration`."""
    for unit in ("d", "h", "m", "s"):
        size = _DURATION_UNITS[unit]
        if seconds >= size and float(seconds / size).is_integer():
            return f"{int(seconds / size)}{unit}"
    if float(seconds).is_integer():
        return f"{int(seconds)}s"
    return f"{round(seconds * 1000)}ms"


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
]
ByteSize = Annotated[int, BeforeValidator(parse_size)]

_DOMAIN_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def normalize_domain_pattern(pattern: str) -> str:
    """Lower-case a domain pattern and check its form: ``name``, ``*.name`` or ``*``."""
    value = pattern.strip().lower().rstrip(".")
    if value == "*":
        return value
    name = value[2:] if value.startswith("*.") else value
    try:
        name = name.encode("idna").decode("ascii") if not name.isascii() else name
    except UnicodeError as exc:
        raise ValueError(f"invalid domain pattern {pattern!r}") from exc
    labels = name.split(".")
    if not name or not all(_DOMAIN_LABEL.match(label) for label in labels):
        raise ValueError(f"invalid domain pattern {pattern!r}: use a name, '*.name' or '*'")
    return ("*." + name) if value.startswith("*.") else name


DomainPattern = Annotated[str, BeforeValidator(lambda v: normalize_domain_pattern(str(v)))]


class _Model(BaseModel):
    """Frozen, strict about unknown fields, camelCase on disk, snake_case in Python."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=True,
    )


# --------------------------------------------------------------------------- listeners, TLS, auth

ListenerMode = Literal["relay", "submission", "http"]
TlsMode = Literal["none", "starttls", "implicit"]
AuthMode = Literal["none", "optional", "required"]


IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _parse_networks(value: Any) -> Any:
    if isinstance(value, list):
        return [ipaddress.ip_network(str(v), strict=False) for v in value]
    return value


class ProxyProtocolConfig(_Model):
    """The listener sits behind a load balancer that speaks the PROXY protocol (HAProxy's
    proxy-protocol.txt, v1 text or v2 binary): a connection from `trustedFrom` must begin with
    a header, and the client address it announces is the session's client address. A
    connection from anywhere else, or without a valid header within `timeout`, is dropped."""

    version: Literal["v1", "v2", "any"] = "any"
    trusted_from: list[IpNetwork] = Field(min_length=1)
    timeout: Duration = 5.0

    _networks = field_validator("trusted_from", mode="before")(_parse_networks)


class SenderLimits(_Model):
    """Abuse caps per sender on one listener (relay.core.throttle.sender_cap): messages each
    authenticated user (else each MAIL FROM domain) may start per minute and per hour, held
    across the worker processes; over the cap MAIL is answered 450 4.7.0."""

    messages_per_minute: int | None = Field(default=None, ge=1)
    messages_per_hour: int | None = Field(default=None, ge=1)


class ListenerConfig(_Model):
    """One listener. `mode` relay is an MTA (port 25); submission is an MSA (RFC 6409); http is
    the HTTP submission API (relay.http_api: bearer tokens from `api.tokensFile`, tls none or
    implicit, no SMTP AUTH)."""

    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=15)
    host: str = "0.0.0.0"
    port: int = Field(ge=1, le=65535)
    mode: ListenerMode = "relay"
    tls: TlsMode = "none"
    auth: AuthMode = "none"
    proxy_protocol: ProxyProtocolConfig | None = None
    sender_limits: SenderLimits | None = None

    @model_validator(mode="after")
    def _submission_needs_auth(self) -> ListenerConfig:
        if self.mode == "submission" and self.auth == "none":
            raise ValueError(f"listener {self.name!r}: a submission listener needs auth optional or required")
        if self.mode == "http" and self.tls == "starttls":
            raise ValueError(f"listener {self.name!r}: an http listener takes tls none or implicit")
        if self.mode == "http" and self.auth != "none":
            raise ValueError(
                f"listener {self.name!r}: an http listener authenticates with api tokens, auth none"
            )
        return self


class ApiConfig(_Model):
    """The HTTP submission API's clients: one ``NAME TOKEN SENDER-PATTERN[,...]`` per line
    (relay.core.http_submit.parse_tokens), re-read when the file changes."""

    tokens_file: Path


class EventWebhookConfig(_Model):
    """Where delivery events are POSTed (relay.events), signed with HMAC-SHA256 under the key in
    `secretFile` (a mounted Secret key; unsigned without one)."""

    url: str = Field(pattern=r"^https?://")
    secret_file: Path | None = None
    timeout: Duration = 10.0
    insecure_skip_verify: bool = False
    ca_file: Path | None = None


class EventsConfig(_Model):
    """Delivery events (delivered, deferred, bounced, expired) per recipient."""

    webhook: EventWebhookConfig


class TlsConfig(_Model):
    """Certificate and key files (PEM), as a kubernetes.io/tls Secret mounts them."""

    cert_file: Path
    key_file: Path


class AuthConfig(_Model):
    """The users file: one ``user:hash`` per line (see relay.users for the hash formats)."""

    users_file: Path
    max_failures: int = Field(
        default=5, ge=1, description="failed AUTH attempts before the session is dropped"
    )


# --------------------------------------------------------------------------- limits, queue, dns


class LimitsConfig(_Model):
    """Per-session and per-message limits, each with the reply code the front uses."""

    max_message_size: ByteSize = Field(default=25 * 1024**2, ge=1024)  # 552 5.3.4
    max_recipients: int = Field(default=100, ge=1)  # 452 4.5.3
    max_hops: int = Field(default=100, ge=2, le=1000)  # 554 5.4.6 (RFC 5321 6.3)
    max_command_line: int = Field(default=2048, ge=512)  # 500 5.5.2
    max_errors: int = Field(default=10, ge=1)  # 421 4.7.0
    idle_timeout: Duration = 300.0  # RFC 5321 4.5.3.2: at least 5 minutes
    max_connections: int = Field(default=1000, ge=1)  # 421 4.7.0
    max_connections_per_client: int = Field(default=50, ge=1)  # 421 4.7.0


class AbuseConfig(_Model):
    """Limits per client address that hold across every worker process of a relay and across
    restarts (relay.abuse keeps the counts in ``abuse.sqlite3`` in the queue directory).
    Counts are per fixed `window`; 0 turns a limit off. Trusted networks are exempt from the
    rate limits and the pregreet test (as Postfix exempts ``$mynetworks``), not from blocks."""

    window: Duration = 600.0
    auth_failures: int = Field(default=10, ge=0, description="failed AUTH per window, then blocked")
    block_for: Duration = 3600.0  # 421 4.7.0 for every connection of a blocked address
    connections: int = Field(default=0, ge=0, description="new connections per window (421 4.7.0)")
    messages: int = Field(default=0, ge=0, description="MAIL commands per window (421 4.7.0)")
    pregreet_wait: Duration = 0.0  # relay listeners: talking before the banner is 554 5.5.1
    pregreet_pass_for: Duration = 86400.0  # an address that waited is not tested again for this long


class CalloutConfig(_Model):
    """Ask the next hop whether a recipient exists (RCPT with no DATA, as Postfix's
    ``reject_unverified_recipient``): `host`/`port`, else the first hop of the recipient's
    route when that is another relay. Answers are cached per process."""

    host: str | None = None
    port: int = Field(default=25, ge=1, le=65535)
    timeout: Duration = 10.0
    positive_ttl: Duration = 86400.0  # a recipient the next hop accepted
    negative_ttl: Duration = 3600.0  # one it refused with 5xx


class RecipientCheckConfig(_Model):
    """Valid recipients of some accept domains, checked before ``250`` at RCPT (no backscatter):
    addresses or patterns (relay.core.addresses.address_matches) inline and/or in a file (one a
    line, ``#`` comments; a mounted ConfigMap or Secret, re-read when it changes), and/or a
    callout. Unknown: ``550 5.1.1``; a callout that cannot answer: ``450 4.1.1``."""

    domains: list[DomainPattern] = Field(min_length=1)
    recipients: list[str] = []
    recipients_file: Path | None = None
    callout: CalloutConfig | None = None

    @model_validator(mode="after")
    def _something(self) -> RecipientCheckConfig:
        if not self.recipients and self.recipients_file is None and self.callout is None:
            raise ValueError("a recipient check needs recipients, recipientsFile or callout")
        bad = [r for r in self.recipients if r != "*" and "@" not in r]
        if bad:
            raise ValueError(f"recipient pattern {bad[0]!r} needs an @ (local@domain, *@domain)")
        return self


class SelfCheckConfig(_Model):
    """The periodic open-relay self-check (relay.open_relay.SelfCheck); `interval` 0 is off."""

    interval: Duration = 0.0
    first_after: Duration = 300.0


class RetryPolicyConfig(_Model):
    """Exponential backoff between min and max; after maxLifetime a deferred recipient bounces."""

    min_backoff: Duration = 300.0
    max_backoff: Duration = 3600.0
    max_lifetime: Duration = 5 * 86400.0

    @model_validator(mode="after")
    def _ordered(self) -> RetryPolicyConfig:
        if self.min_backoff > self.max_backoff:
            raise ValueError("minBackoff must not exceed maxBackoff")
        return self


class QueueConfig(_Model):
    """Where the spool lives and how the scheduler drains it."""

    directory: Path = Path("/var/spool/mailrelay")
    retry: RetryPolicyConfig = RetryPolicyConfig()
    max_concurrency: int = Field(default=100, ge=1, description="deliveries in flight per process")
    max_per_destination: int = Field(default=20, ge=1, description="connections per next hop")
    connect_timeout: Duration = 30.0
    data_timeout: Duration = 600.0  # RFC 5321 4.5.3.2.6: wait 10 minutes after the final dot
    command_timeout: Duration = 300.0


def _parse_nameserver(value: object) -> str:
    text = str(value).strip()
    host, port = text, None
    if text.startswith("["):  # [v6]:port
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":") or None
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        ipaddress.ip_address(host)
    except ValueError as exc:
        raise ValueError(f"invalid nameserver {text!r}: use 'ip' or 'ip:port'") from exc
    if port is not None and not (port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"invalid nameserver port in {text!r}")
    return text


Nameserver = Annotated[str, BeforeValidator(_parse_nameserver)]


class DnsConfig(_Model):
    """Resolver override; an empty list uses the system resolver (/etc/resolv.conf)."""

    nameservers: list[Nameserver] = []
    timeout: Duration = 5.0


class MetricsConfig(_Model):
    """The HTTP endpoint serving /metrics, /healthz and /readyz."""

    host: str = "0.0.0.0"
    port: int = Field(default=9090, ge=0, le=65535)


# --------------------------------------------------------------------------- routes and next hops

HopTls = Literal["none", "starttls", "implicit"]


RelayHopTls = Literal["none", "starttls", "starttls-verify"]


class RelayHop(_Model):
    """Another MailRelay; the renderer resolves its name to the Service host and port. `tls`:
    none, starttls (encrypted, the certificate not checked) or starttls-verify (the certificate
    must be valid for `host` and chain to `caFile`, e.g. the ca.crt of a cert-manager Secret,
    else to the system's CAs); with TLS required, a hop without STARTTLS defers (4.7.10)."""

    kind: Literal["relay"] = "relay"
    name: str
    host: str
    port: int = Field(default=25, ge=1, le=65535)
    tls: RelayHopTls = "none"
    ca_file: Path | None = None

    @model_validator(mode="after")
    def _ca_needs_verification(self) -> RelayHop:
        if self.ca_file is not None and self.tls != "starttls-verify":
            raise ValueError("caFile needs tls starttls-verify")
        return self


class SmarthostHop(_Model):
    """A provider's submission server. `credentialsDir` is a mounted kubernetes.io/basic-auth
    Secret: a directory holding the files ``username`` and ``password``."""

    kind: Literal["smarthost"] = "smarthost"
    host: str
    port: int = Field(default=587, ge=1, le=65535)
    tls: HopTls = "starttls"
    insecure_skip_verify: bool = False
    ca_file: Path | None = None
    credentials_dir: Path | None = None


class MxHop(_Model):
    """Direct delivery to the recipient domain's MX hosts (RFC 5321 5.1). `tls`: none,
    opportunistic (STARTTLS when offered, unverified), verify (STARTTLS required, the
    certificate valid for the MX name) or mta-sts (RFC 8461: the domain's policy decides;
    opportunistic without one). `caFile` replaces the system's CAs for MX certificates and
    MTA-STS policy hosts (private networks, tests). DANE (RFC 7672) is not implemented."""

    kind: Literal["mx"] = "mx"
    port: int = Field(default=25, ge=1, le=65535)
    tls: Literal["none", "opportunistic", "verify", "mta-sts"] = "mta-sts"
    ca_file: Path | None = None


class WebhookGateway(_Model):
    """POST each message to an HTTP endpoint."""

    url: str = Field(pattern=r"^https?://")
    format: Literal["json", "rfc822"] = "json"
    auth_header_file: Path | None = None  # file content is the Authorization header value
    insecure_skip_verify: bool = False
    ca_file: Path | None = None
    timeout: Duration = 30.0


class MaildirGateway(_Model):
    """Store each message in a Maildir; `layout` perDomain uses ``{domain}/{local}`` folders."""

    path: Path
    layout: Literal["perRecipient", "single"] = "perRecipient"


class PipeGateway(_Model):
    """Run a command with the message on stdin and the envelope in the environment."""

    command: list[str] = Field(min_length=1)
    timeout: Duration = 60.0


class GatewayHop(_Model):
    """A mail gateway to a system that does not speak SMTP: exactly one of the three."""

    kind: Literal["gateway"] = "gateway"
    webhook: WebhookGateway | None = None
    maildir: MaildirGateway | None = None
    pipe: PipeGateway | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> GatewayHop:
        chosen = [n for n in ("webhook", "maildir", "pipe") if getattr(self, n) is not None]
        if len(chosen) != 1:
            raise ValueError(
                f"a gateway needs exactly one of webhook, maildir, pipe (got {chosen or 'none'})"
            )
        return self


class RejectHop(_Model):
    """Refuse matching recipients at RCPT time with this reply."""

    kind: Literal["reject"] = "reject"
    code: int = Field(default=550, ge=400, le=599)
    message: str = "5.7.1 Recipient rejected by routing policy"


NextHop = Annotated[
    RelayHop | SmarthostHop | MxHop | GatewayHop | RejectHop,
    Field(discriminator="kind"),
]


class MatchConfig(_Model):
    """Empty lists match everything."""

    recipient_domains: list[DomainPattern] = []
    sender_domains: list[DomainPattern] = []


DkimAlgorithm = Literal["rsa-sha256", "ed25519-sha256"]

# RFC 6376 5.4.1's recommended set; From is always signed (5.4), the rest when present.
DKIM_DEFAULT_HEADERS = (
    "from",
    "to",
    "cc",
    "subject",
    "date",
    "message-id",
    "reply-to",
    "in-reply-to",
    "references",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "list-id",
    "list-unsubscribe",
    "list-unsubscribe-post",
)


def _header_name(value: object) -> str:
    name = str(value).strip().lower()
    if not re.fullmatch(r"[!-9;-~]+", name):
        raise ValueError(f"invalid header field name {value!r}")
    return name


_SELECTOR_LABEL = r"[A-Za-z0-9]([-A-Za-z0-9_]*[A-Za-z0-9])?"
DKIM_SELECTOR_PATTERN = rf"^{_SELECTOR_LABEL}(\.{_SELECTOR_LABEL})*$"


class DkimKeyConfig(_Model):
    """One DKIM signing key (RFC 6376): mail whose From domain is `domain` is signed with it
    while it is `active`; an inactive key is kept listed (its DNS record stays published) for
    the overlap of a rotation. `keyFile` is the PEM private key (a mounted Secret's key)."""

    domain: str
    selector: str = Field(pattern=DKIM_SELECTOR_PATTERN, max_length=63)
    key_file: Path
    algorithm: DkimAlgorithm = "rsa-sha256"
    headers: list[Annotated[str, BeforeValidator(_header_name)]] = list(DKIM_DEFAULT_HEADERS)
    active: bool = True

    @field_validator("domain", mode="before")
    @classmethod
    def _domain(cls, value: Any) -> str:
        domain = normalize_domain_pattern(str(value))
        if "*" in domain:
            raise ValueError(f"a DKIM domain is a name, not a pattern: {value!r}")
        return domain


class RouteLimits(_Model):
    """Budgets of one route (relay.core.throttle): messages per second and per hour, and
    connections (split over the worker processes); with `perDestination` every destination
    (MX rollup, or the hop's host) has its own budget. Unset means unlimited."""

    messages_per_second: float | None = Field(default=None, gt=0, le=100000)
    messages_per_hour: int | None = Field(default=None, ge=1)
    connections: int | None = Field(default=None, ge=1, le=10000)
    per_destination: bool = False


def dkim_keys_problem(keys: list[tuple[str, str, bool]]) -> str | None:
    """What is wrong with a route's (domain, selector, active) DKIM keys: a selector listed
    twice for one domain, or more than one active key for a domain (the operator's spec check
    asks the same)."""
    seen: set[tuple[str, str]] = set()
    active: set[str] = set()
    for domain, selector, is_active in keys:
        if (domain, selector) in seen:
            return f"dkim: selector {selector!r} of {domain} is listed twice"
        seen.add((domain, selector))
        if is_active:
            if domain in active:
                return f"dkim: more than one active key for {domain} (mark the old one active: false)"
            active.add(domain)
    return None


class RouteConfig(_Model):
    """One resolved RelayRoute. The relay orders routes by priority (desc), then name."""

    name: str
    priority: int = 0
    match: MatchConfig = MatchConfig()
    next_hop: NextHop
    failover: list[NextHop] = []
    events: EventsConfig | None = None  # overrides the relay's `events` for this route's mail
    dkim: list[DkimKeyConfig] = []
    limits: RouteLimits = RouteLimits()

    @model_validator(mode="after")
    def _one_active_key_per_domain(self) -> RouteConfig:
        problem = dkim_keys_problem([(k.domain, k.selector, k.active) for k in self.dkim])
        if problem:
            raise ValueError(problem)
        return self


# --------------------------------------------------------------------------- scale-down hand-off


class HandoffConfig(_Model):
    """The peer-only SMTP listener that takes queued mail from a draining peer of the same
    relay (issue 14). Only a client that authenticates (AUTH PLAIN) with the shared secret in
    `credentialFile` may use it; it keeps each message's queue state (relay.handoff_server)."""

    host: str = "0.0.0.0"
    port: int = Field(default=2526, ge=1, le=65535)
    credential_file: Path = Path("/etc/mailrelay/handoff/credential")


class HandoffPeer(_Model):
    """Where a draining relay hands its queue: another pod of the same relay, its handoff port."""

    host: str = Field(min_length=1)
    port: int = Field(default=2526, ge=1, le=65535)


class DrainConfig(_Model):
    """The pods named in `pods` drain: no new mail, queued mail delivered or handed to `peers`."""

    pods: list[str] = []
    peers: list[HandoffPeer] = []


# --------------------------------------------------------------------------- the whole relay


class RelayConfig(_Model):
    """Everything one relay process needs. `version` lets a relay refuse a config it cannot read."""

    version: Literal[1] = 1
    hostname: str = Field(min_length=1, max_length=253)
    listeners: list[ListenerConfig] = Field(min_length=1)
    tls: TlsConfig | None = None
    auth: AuthConfig | None = None
    api: ApiConfig | None = None  # tokens of the http listeners
    events: EventsConfig | None = None  # delivery events of mail no route's `events` covers
    trusted_networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    accept_domains: list[DomainPattern] = []
    limits: LimitsConfig = LimitsConfig()
    abuse: AbuseConfig = AbuseConfig()
    recipient_checks: list[RecipientCheckConfig] = []
    self_check: SelfCheckConfig = SelfCheckConfig()
    queue: QueueConfig = QueueConfig()
    dns: DnsConfig = DnsConfig()
    routes: list[RouteConfig] = []
    metrics: MetricsConfig = MetricsConfig()
    workers: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = Field(
        default="auto",
        description="processes sharing each listener port; auto: the CPUs this process may use "
        "(cgroup CPU quota rounded up, else the affinity mask; relay.core.cpus)",
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    handoff: HandoffConfig | None = None
    drain: DrainConfig | None = None
    log_format: Literal["text", "json"] = Field(
        default="text", description="text lines, or one JSON object per line (relay.logs)"
    )

    @field_validator("trusted_networks", mode="before")
    @classmethod
    def _networks(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [ipaddress.ip_network(str(v), strict=False) for v in value]
        return value

    @model_validator(mode="after")
    def _consistent(self) -> RelayConfig:
        names = [listener.name for listener in self.listeners]
        if len(set(names)) != len(names):
            raise ValueError("listener names must be unique")
        ports = [(listener.host, listener.port) for listener in self.listeners]
        if len(set(ports)) != len(ports):
            raise ValueError("two listeners use the same host and port")
        for listener in self.listeners:
            if listener.tls != "none" and self.tls is None:
                raise ValueError(f"listener {listener.name!r} uses TLS but no tls certificate is configured")
            if listener.auth != "none" and self.auth is None:
                raise ValueError(f"listener {listener.name!r} uses AUTH but no auth usersFile is configured")
            if listener.mode == "http" and self.api is None:
                raise ValueError(
                    f"listener {listener.name!r} is an http listener but no api tokensFile is configured"
                )
        if self.handoff is not None and any(
            listener.port == self.handoff.port
            and (listener.host == self.handoff.host or "0.0.0.0" in (listener.host, self.handoff.host))
            for listener in self.listeners
        ):
            raise ValueError(f"handoff.port {self.handoff.port} is already used by a listener")
        route_names = [route.name for route in self.routes]
        if len(set(route_names)) != len(route_names):
            raise ValueError("route names must be unique")
        return self

    def draining(self, pod: str) -> bool:
        """Whether the pod named `pod` is asked to drain (listed in ``drain.pods``)."""
        return self.drain is not None and pod in self.drain.pods

    def ordered_routes(self) -> list[RouteConfig]:
        """Routes in the order they are tried: higher priority first, ties broken by name."""
        return sorted(self.routes, key=lambda route: (-route.priority, route.name))


# --------------------------------------------------------------------------- files


class ConfigError(Exception):
    """A configuration that cannot be used; the message names the field and the problem."""


def describe_validation_error(error: ValidationError) -> str:
    """One line per problem: ``listeners.0.port: Input should be less than or equal to 65535``."""
    lines = []
    for problem in error.errors():
        location = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        message = problem["msg"].removeprefix("Value error, ")
        lines.append(f"{location}: {message}")
    return "\n".join(lines)


def parse_config(data: Any) -> RelayConfig:
    """Validate a decoded document; raise ConfigError naming each bad field."""
    if not isinstance(data, dict):
        raise ConfigError("the config must be a mapping at the top level")
    try:
        return RelayConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc)) from exc


def load_config(path: Path) -> RelayConfig:
    """Read and validate a YAML (or JSON) config file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    try:
        return parse_config(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}:\n{exc}") from exc


def dump_config(config: RelayConfig) -> str:
    """The YAML document the operator puts into the ConfigMap; `parse_config` reads it back."""
    data = config.model_dump(mode="json", by_alias=True, exclude_none=True)
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
