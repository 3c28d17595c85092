"""MailRelay and RelayRoute bodies → typed, frozen specs, or a list of user-facing problems.

The CRD schema (crds/) is what the API server enforces; this module enforces the same contract
again, plus the semantic rules a schema cannot express (listener TLS needs a certificate, retry
backoff ordering, trusted networks that parse, ...). It must, because `mailrelay render`,
`mailrelay check` and `mailrelay up` read manifests from files that no API server has seen, and
because the operator must survive a CRD that was installed in an older version. Defaults here
equal the CRD defaults (a test checks that), so a body reads the same before and after the API
server's defaulting.

Called by `topology` (and through it by the reconcile path and the CLI). Pure: no I/O, no
Kubernetes client; invalid input becomes `InvalidSpec` with one line per problem, never an exception.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from relay.config import (
    DKIM_SELECTOR_PATTERN,
    DURATION_PATTERN,
    SIZE_PATTERN,
    DkimAlgorithm,
    RelayHopTls,
    dkim_keys_problem,
    normalize_domain_pattern,
    parse_duration,
)
from relay_operator import naming

# Shared with the CRD schema (tests/relay_operator/test_spec.py checks they are the same); the
# duration and size grammars are relay.config's (DURATION_PATTERN, SIZE_PATTERN).
LISTENER_NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
HOSTNAME_PATTERN = (
    r"^[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?)*$"
)
MAILDIR_PATH_PATTERN = r"^[A-Za-z0-9_][-._A-Za-z0-9]*(/[A-Za-z0-9_][-._A-Za-z0-9]*)*$"
REJECT_MESSAGE_PATTERN = r"^[45]\.[0-9]{1,3}\.[0-9]{1,3}( [ -~]*)?$"
SECRET_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"

_DURATION = re.compile(DURATION_PATTERN)
_SIZE = re.compile(SIZE_PATTERN)


class _Spec(BaseModel):
    """Frozen; unknown fields are errors (as kubectl's strict field validation); camelCase keys."""

    model_config = ConfigDict(frozen=True, extra="forbid", alias_generator=to_camel, populate_by_name=True)


def _duration(value: Any) -> str:
    if not isinstance(value, str) or not _DURATION.match(value):
        raise ValueError(f"invalid duration {value!r}: use a number with a unit ms, s, m, h or d, e.g. '5m'")
    return value


def _size(value: Any) -> str | int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"invalid quantity {value!r}: use e.g. '25Mi' or a number of bytes")
    if isinstance(value, str) and not _SIZE.match(value):
        raise ValueError(f"invalid quantity {value!r}: use e.g. '25Mi', '5Gi' or a number of bytes")
    if isinstance(value, int) and value < 0:
        raise ValueError("a quantity cannot be negative")
    return value


def _domain(value: Any) -> str:
    return normalize_domain_pattern(str(value))


# --------------------------------------------------------------------------- MailRelay

ListenerMode = Literal["relay", "submission", "http"]
TlsMode = Literal["none", "starttls", "implicit"]
AuthMode = Literal["none", "optional", "required"]


class SenderLimitsSpec(_Spec):
    """Per-sender abuse caps of a listener (rendered to relay.config.SenderLimits)."""

    messages_per_minute: int | None = Field(default=None, ge=1)
    messages_per_hour: int | None = Field(default=None, ge=1)


class ListenerSpec(_Spec):
    name: str = Field(min_length=1, max_length=15, pattern=LISTENER_NAME_PATTERN)
    port: int = Field(ge=1, le=65535)
    mode: ListenerMode = "relay"
    tls: TlsMode = "none"
    auth: AuthMode = "none"
    sender_limits: SenderLimitsSpec | None = None

    @model_validator(mode="after")
    def _submission_needs_auth(self) -> ListenerSpec:
        if self.mode == "submission" and self.auth == "none":
            raise ValueError(f"listener {self.name!r}: a submission listener needs auth optional or required")
        if self.mode == "http" and (self.tls == "starttls" or self.auth != "none"):
            raise ValueError(
                f"listener {self.name!r}: an http listener takes tls none or implicit and auth none "
                "(its clients use the tokens of spec.api.tokensSecretRef)"
            )
        if self.name == naming.METRICS_PORT_NAME:
            raise ValueError(f"listener name {self.name!r} is reserved for the metrics port")
        return self


class TlsSpec(_Spec):
    secret_name: str = Field(min_length=1, max_length=253)


class AuthSpec(_Spec):
    secret_name: str = Field(min_length=1, max_length=253)
    key: str = Field(default="users", min_length=1, max_length=253, pattern=SECRET_KEY_PATTERN)
    max_failures: int = Field(default=5, ge=1, le=100)


class TokensSecretRef(_Spec):
    """The HTTP API's clients: a Secret key with one ``NAME TOKEN SENDER-PATTERN[,...]`` line each."""

    name: str = Field(min_length=1, max_length=253)
    key: str = Field(default="tokens", min_length=1, max_length=253, pattern=SECRET_KEY_PATTERN)


class ApiSpec(_Spec):
    tokens_secret_ref: TokensSecretRef


class EventSecretRef(_Spec):
    """The HMAC-SHA256 key that signs delivery events."""

    name: str = Field(min_length=1, max_length=253)
    key: str = Field(default="secret", min_length=1, max_length=253, pattern=SECRET_KEY_PATTERN)


class EventWebhookSpec(_Spec):
    url: str = Field(max_length=2048, pattern=r"^https?://")
    secret_ref: EventSecretRef | None = None
    timeout: str = "10s"
    insecure_skip_verify: bool = False

    _timeout = field_validator("timeout", mode="before")(_duration)


class EventsSpec(_Spec):
    webhook: EventWebhookSpec


class LimitsSpec(_Spec):
    max_message_size: str | int = "25Mi"
    max_recipients: int = Field(default=100, ge=1, le=100000)
    max_hops: int = Field(default=100, ge=2, le=1000)
    max_connections: int = Field(default=1000, ge=1, le=100000)
    max_connections_per_client: int = Field(default=50, ge=1, le=100000)
    idle_timeout: str = "5m"

    _size = field_validator("max_message_size", mode="before")(_size)
    _idle = field_validator("idle_timeout", mode="before")(_duration)


class AbuseSpec(_Spec):
    """Per-client-address limits over all worker processes of a pod, kept across restarts
    (relay.config.AbuseConfig; 0 turns a limit off)."""

    window: str = "10m"
    auth_failures: int = Field(default=10, ge=0, le=100000)
    block_for: str = "1h"
    connections: int = Field(default=0, ge=0, le=1000000)
    messages: int = Field(default=0, ge=0, le=1000000)
    pregreet_wait: str = "0s"

    _durations = field_validator("window", "block_for", "pregreet_wait", mode="before")(_duration)


class CalloutSpec(_Spec):
    host: str | None = Field(default=None, max_length=253)
    port: int = Field(default=25, ge=1, le=65535)
    timeout: str = "10s"

    _timeout = field_validator("timeout", mode="before")(_duration)


class RecipientsSecretRef(_Spec):
    name: str = Field(min_length=1, max_length=253)
    key: str = Field(default="recipients", min_length=1, max_length=253, pattern=SECRET_KEY_PATTERN)


class RecipientCheckSpec(_Spec):
    """Valid recipients of some accept domains (relay.config.RecipientCheckConfig)."""

    domains: list[str] = Field(min_length=1, max_length=64)
    recipients: list[str] = Field(default=[], max_length=10000)
    recipients_secret_ref: RecipientsSecretRef | None = None
    callout: CalloutSpec | None = None

    _domains = field_validator("domains", mode="before")(
        lambda value: [_domain(v) for v in value] if isinstance(value, list) else value
    )

    @model_validator(mode="after")
    def _something(self) -> RecipientCheckSpec:
        if not self.recipients and self.recipients_secret_ref is None and self.callout is None:
            raise ValueError("a recipient check needs recipients, recipientsSecretRef or callout")
        return self


class NetworkPolicySpec(_Spec):
    """The NetworkPolicy the operator makes for each relay (builders.build_networkpolicy)."""

    enabled: bool = True
    public_listeners: list[str] | None = Field(
        default=None,
        max_length=16,
        description="listeners open to every source; default: all on a LoadBalancer or NodePort "
        "Service, else the submission and http ones",
    )


class SelfCheckSpec(_Spec):
    """The relay's periodic open-relay self-check (mailrelay_relay_safe); "0s" turns it off."""

    interval: str = "1h"

    _interval = field_validator("interval", mode="before")(_duration)


class StorageSpec(_Spec):
    size: str | int = "1Gi"
    storage_class_name: str | None = Field(default=None, max_length=253)

    _size = field_validator("size", mode="before")(_size)


class RetrySpec(_Spec):
    min_backoff: str = "5m"
    max_backoff: str = "1h"
    max_lifetime: str = "5d"

    _durations = field_validator("min_backoff", "max_backoff", "max_lifetime", mode="before")(_duration)

    @model_validator(mode="after")
    def _ordered(self) -> RetrySpec:
        if parse_duration(self.min_backoff) > parse_duration(self.max_backoff):
            raise ValueError(f"minBackoff {self.min_backoff} must not exceed maxBackoff {self.max_backoff}")
        return self


class QueueSpec(_Spec):
    storage: StorageSpec = StorageSpec()
    retry: RetrySpec = RetrySpec()
    max_concurrency: int = Field(default=100, ge=1, le=10000)
    max_per_destination: int = Field(default=20, ge=1, le=10000)


class DnsSpec(_Spec):
    nameservers: list[str] = Field(default=[], max_length=8)


class SelectorRequirement(_Spec):
    key: str = Field(min_length=1, max_length=317)
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[str] = []

    @model_validator(mode="after")
    def _values(self) -> SelectorRequirement:
        if self.operator in ("In", "NotIn") and not self.values:
            raise ValueError(f"{self.key}: In and NotIn need values")
        if self.operator in ("Exists", "DoesNotExist") and self.values:
            raise ValueError(f"{self.key}: Exists and DoesNotExist take none")
        return self


class LabelSelector(_Spec):
    """metav1.LabelSelector: all conditions must hold; an empty selector selects everything."""

    match_labels: dict[str, str] = {}
    match_expressions: list[SelectorRequirement] = []

    def matches(self, labels: Mapping[str, str]) -> bool:
        if any(labels.get(key) != value for key, value in self.match_labels.items()):
            return False
        for requirement in self.match_expressions:
            present = requirement.key in labels
            value = labels.get(requirement.key)
            if requirement.operator == "In" and value not in requirement.values:
                return False
            if requirement.operator == "NotIn" and present and value in requirement.values:
                return False
            if requirement.operator == "Exists" and not present:
                return False
            if requirement.operator == "DoesNotExist" and present:
                return False
        return True


def _cidrs(value: Any) -> Any:
    if isinstance(value, list):
        for item in value:
            try:
                ipaddress.ip_network(str(item), strict=False)
            except ValueError as exc:
                raise ValueError(f"invalid network {item!r}: use CIDR notation like 10.0.0.0/8") from exc
    return value


class ProxyProtocolSpec(_Spec):
    """The load balancer in front of the client Service sends a PROXY header (v1 or v2) from
    `trustedFrom`; the relay then judges the client the header names."""

    version: Literal["v1", "v2", "any"] = "any"
    trusted_from: list[str] = Field(min_length=1, max_length=64)
    listeners: list[str] = Field(default=[], max_length=16, description="empty: every listener")

    _trusted = field_validator("trusted_from", mode="before")(_cidrs)


class ServiceSpec(_Spec):
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    annotations: dict[str, str] = {}
    proxy_protocol: ProxyProtocolSpec | None = None


class NamedRef(_Spec):
    name: str = Field(min_length=1, max_length=253)


class ResourcesSpec(_Spec):
    requests: dict[str, str | int] = {}
    limits: dict[str, str | int] = {}


class ScaleDownSpec(_Spec):
    """How a lower `replicas` is carried out (issue 14): the pods that go first drain their
    queue to the pods that stay; `drainTimeout` is how long the operator waits for that before
    it removes them anyway and keeps their spool claims; `removedClaims` says what happens to
    the spool claim of a removed ordinal once it is verified empty."""

    drain_timeout: str = "1h"
    removed_claims: Literal["Delete", "Retain"] = "Delete"

    _timeout = field_validator("drain_timeout", mode="before")(_duration)


class ShutdownSpec(_Spec):
    """A pod that stops (rolling restart, node drain): its preStop waits `endpointRemovalDelay`
    for the endpoint controllers and load balancers to stop sending it connections, then the
    relay gets SIGTERM, stops accepting and finishes what is in flight within the grace period."""

    endpoint_removal_delay: str = "5s"

    _delay = field_validator("endpoint_removal_delay", mode="before")(_duration)

    @field_validator("endpoint_removal_delay")
    @classmethod
    def _bounded(cls, value: str) -> str:
        if parse_duration(value) > 300:
            raise ValueError(f"endpointRemovalDelay {value} is longer than 5m")
        return value


class MailRelaySpec(_Spec):
    replicas: int = Field(default=1, ge=0, le=100)
    hostname: str = Field(min_length=1, max_length=253, pattern=HOSTNAME_PATTERN)
    listeners: list[ListenerSpec] = Field(min_length=1, max_length=16)
    tls: TlsSpec | None = None
    auth: AuthSpec | None = None
    api: ApiSpec | None = None
    events: EventsSpec | None = None
    trusted_networks: list[str] = Field(default=[], max_length=64)
    accept_domains: list[str] = Field(default=[], max_length=256)
    limits: LimitsSpec = LimitsSpec()
    abuse: AbuseSpec = AbuseSpec()
    recipient_checks: list[RecipientCheckSpec] = Field(default=[], max_length=32)
    network_policy: NetworkPolicySpec = NetworkPolicySpec()
    self_check: SelfCheckSpec = SelfCheckSpec()
    queue: QueueSpec = QueueSpec()
    dns: DnsSpec = DnsSpec()
    route_selector: LabelSelector | None = None
    service: ServiceSpec = ServiceSpec()
    image: str | None = Field(default=None, max_length=512)
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    image_pull_secrets: list[NamedRef] = Field(default=[], max_length=8)
    resources: ResourcesSpec | None = None
    node_selector: dict[str, str] = {}
    pod_annotations: dict[str, str] = {}
    priority_class_name: str | None = None
    workers: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] | None = None  # None: the context's (json in pods, text under up)
    scale_down: ScaleDownSpec = ScaleDownSpec()
    shutdown: ShutdownSpec = ShutdownSpec()

    _domains = field_validator("accept_domains", mode="before")(
        lambda value: [_domain(v) for v in value] if isinstance(value, list) else value
    )

    _networks = field_validator("trusted_networks", mode="before")(_cidrs)

    @model_validator(mode="after")
    def _consistent(self) -> MailRelaySpec:
        names = [listener.name for listener in self.listeners]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"listener names must be unique: {', '.join(duplicates)}")
        ports = [listener.port for listener in self.listeners]
        clashes = sorted({p for p in ports if ports.count(p) > 1})
        if clashes:
            raise ValueError(f"two listeners use the same port {', '.join(map(str, clashes))}")
        if naming.HANDOFF_PORT in ports:
            raise ValueError(
                f"port {naming.HANDOFF_PORT} is where the relay pods hand their queues to each other; "
                "use another listener port"
            )
        for listener in self.listeners:
            if listener.tls != "none" and self.tls is None:
                raise ValueError(
                    f"listener {listener.name!r} uses tls {listener.tls}: set spec.tls.secretName"
                )
            if listener.auth != "none" and self.auth is None:
                raise ValueError(
                    f"listener {listener.name!r} uses auth {listener.auth}: set spec.auth.secretName"
                )
            if listener.mode == "http" and self.api is None:
                raise ValueError(
                    f"listener {listener.name!r} is an http listener: set spec.api.tokensSecretRef"
                )
        proxy = self.service.proxy_protocol
        unknown = sorted(set(proxy.listeners) - set(names)) if proxy is not None else []
        if unknown:
            raise ValueError(f"service.proxyProtocol.listeners names no listener: {', '.join(unknown)}")
        unknown = sorted(set(self.network_policy.public_listeners or []) - set(names))
        if unknown:
            raise ValueError(f"networkPolicy.publicListeners names no listener: {', '.join(unknown)}")
        return self

    def proxied(self, listener: ListenerSpec) -> ProxyProtocolSpec | None:
        """The PROXY protocol settings of a listener, if the Service's balancer sends headers to it."""
        proxy = self.service.proxy_protocol
        if proxy is None or (proxy.listeners and listener.name not in proxy.listeners):
            return None
        return proxy

    def first_relay_listener(self) -> ListenerSpec | None:
        """The listener other relays deliver to: the first one in mode relay."""
        return next((listener for listener in self.listeners if listener.mode == "relay"), None)


# --------------------------------------------------------------------------- RelayRoute


class MatchSpec(_Spec):
    recipient_domains: list[str] = Field(default=[], max_length=256)
    sender_domains: list[str] = Field(default=[], max_length=256)

    _domains = field_validator("recipient_domains", "sender_domains", mode="before")(
        lambda value: [_domain(v) for v in value] if isinstance(value, list) else value
    )


class CaSecretRef(_Spec):
    """A Secret key holding the PEM certificate(s) of a private CA (cert-manager's ``ca.crt``)."""

    name: str = Field(min_length=1, max_length=253)
    key: str = Field(default="ca.crt", min_length=1, max_length=253, pattern=SECRET_KEY_PATTERN)


class RelayTarget(_Spec):
    name: str = Field(min_length=1, max_length=63, pattern=r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
    tls: RelayHopTls = "none"
    ca_secret_ref: CaSecretRef | None = None

    @model_validator(mode="after")
    def _ca_needs_verification(self) -> RelayTarget:
        if self.ca_secret_ref is not None and self.tls != "starttls-verify":
            raise ValueError("caSecretRef needs tls starttls-verify")
        return self


class SmarthostSpec(_Spec):
    host: str = Field(min_length=1, max_length=253, pattern=HOSTNAME_PATTERN)
    port: int = Field(default=587, ge=1, le=65535)
    tls: TlsMode = "starttls"
    insecure_skip_verify: bool = False
    auth_secret_ref: NamedRef | None = None
    ca_secret_ref: CaSecretRef | None = None

    @model_validator(mode="after")
    def _ca_needs_verification(self) -> SmarthostSpec:
        if self.ca_secret_ref is not None and (self.tls == "none" or self.insecure_skip_verify):
            raise ValueError("caSecretRef needs tls starttls or implicit, without insecureSkipVerify")
        return self


class MxSpec(_Spec):
    port: int = Field(default=25, ge=1, le=65535)
    tls: Literal["none", "opportunistic", "verify", "mta-sts"] = "mta-sts"
    ca_secret_ref: CaSecretRef | None = None


class KeyedSecretRef(_Spec):
    name: str = Field(min_length=1, max_length=253)
    key: str = Field(default="authorization", min_length=1, max_length=253, pattern=SECRET_KEY_PATTERN)


class WebhookSpec(_Spec):
    url: str = Field(max_length=2048, pattern=r"^https?://")
    format: Literal["json", "rfc822"] = "json"
    auth_secret_ref: KeyedSecretRef | None = None
    insecure_skip_verify: bool = False
    ca_secret_ref: CaSecretRef | None = None
    timeout: str = "30s"

    _timeout = field_validator("timeout", mode="before")(_duration)

    @model_validator(mode="after")
    def _ca_needs_verification(self) -> WebhookSpec:
        if self.ca_secret_ref is not None and (
            not self.url.startswith("https://") or self.insecure_skip_verify
        ):
            raise ValueError("caSecretRef needs an https:// url, without insecureSkipVerify")
        return self


class MaildirSpec(_Spec):
    path: str = Field(min_length=1, max_length=255, pattern=MAILDIR_PATH_PATTERN)
    layout: Literal["perRecipient", "single"] = "perRecipient"

    @field_validator("path")
    @classmethod
    def _no_parent(cls, value: str) -> str:
        if ".." in value.split("/"):
            raise ValueError("the maildir path must stay below the data directory (no '..')")
        return value


class PipeSpec(_Spec):
    command: list[str] = Field(min_length=1, max_length=64)
    timeout: str = "60s"

    _timeout = field_validator("timeout", mode="before")(_duration)


class GatewaySpec(_Spec):
    webhook: WebhookSpec | None = None
    maildir: MaildirSpec | None = None
    pipe: PipeSpec | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> GatewaySpec:
        chosen = [n for n in ("webhook", "maildir", "pipe") if getattr(self, n) is not None]
        if len(chosen) != 1:
            raise ValueError(
                f"a gateway needs exactly one of webhook, maildir, pipe (got {chosen or 'none'})"
            )
        return self

    @property
    def kind(self) -> str:
        return "webhook" if self.webhook else "maildir" if self.maildir else "pipe"


class RejectSpec(_Spec):
    code: int = Field(default=550, ge=400, le=599)
    message: str | None = Field(default=None, min_length=1, max_length=400, pattern=REJECT_MESSAGE_PATTERN)

    @model_validator(mode="after")
    def _same_class(self) -> RejectSpec:
        if self.message is not None and not self.message.startswith(f"{self.code // 100}."):
            raise ValueError(
                f"the enhanced status code in message must have the class of code {self.code} "
                f"(use {self.code // 100}.x.x)"
            )
        return self

    def reply_text(self) -> str:
        if self.message is not None:
            return self.message
        return f"{self.code // 100}.7.1 Recipient rejected by routing policy"


HOP_KINDS = ("relay", "smarthost", "mx", "gateway", "reject")


class HopSpec(_Spec):
    """Exactly one kind of next hop."""

    relay: RelayTarget | None = None
    smarthost: SmarthostSpec | None = None
    mx: MxSpec | None = None
    gateway: GatewaySpec | None = None
    reject: RejectSpec | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> HopSpec:
        chosen = [n for n in HOP_KINDS if getattr(self, n) is not None]
        if len(chosen) != 1:
            raise ValueError(
                "a next hop needs exactly one of relay, smarthost, mx, gateway, reject "
                f"(got {chosen or 'none'})"
            )
        return self

    @property
    def kind(self) -> str:
        return next(n for n in HOP_KINDS if getattr(self, n) is not None)

    def summary(self) -> str:
        """One line for `kubectl get relayroutes` and status: ``relay/internal``, ``mx:25``, ..."""
        if self.relay:
            return f"relay/{self.relay.name}"
        if self.smarthost:
            return f"smarthost/{self.smarthost.host}:{self.smarthost.port}"
        if self.mx:
            return f"mx:{self.mx.port}"
        if self.gateway:
            if self.gateway.webhook:
                return f"webhook/{self.gateway.webhook.url}"
            if self.gateway.maildir:
                return f"maildir/{self.gateway.maildir.path}"
            return "pipe/" + (self.gateway.pipe.command[0] if self.gateway.pipe else "")
        assert self.reject is not None
        return f"reject/{self.reject.code}"


class FailoverHopSpec(HopSpec):
    """A failover hop: delivery happens after the message was accepted, so no reject."""

    @model_validator(mode="after")
    def _no_reject(self) -> FailoverHopSpec:
        if self.reject is not None:
            raise ValueError("a failover hop cannot be reject (it is tried after the message was accepted)")
        return self


class DkimKeySecretRef(_Spec):
    """The Secret key holding a PEM private key (``mailrelay dkim keygen`` writes one)."""

    name: str = Field(min_length=1, max_length=253)
    key: str = Field(default="private.key", min_length=1, max_length=253, pattern=SECRET_KEY_PATTERN)


class DkimSpec(_Spec):
    """One DKIM signing key (relay.config.DkimKeyConfig is what it renders to)."""

    domain: str = Field(min_length=1, max_length=253)
    selector: str = Field(min_length=1, max_length=63, pattern=DKIM_SELECTOR_PATTERN)
    private_key_secret_ref: DkimKeySecretRef
    algorithm: DkimAlgorithm = "rsa-sha256"
    headers: list[str] = Field(default=[], max_length=64)  # empty: relay.config's default set
    active: bool = True

    @field_validator("domain", mode="before")
    @classmethod
    def _dkim_domain(cls, value: Any) -> str:
        domain = _domain(value)
        if "*" in domain:
            raise ValueError(f"a DKIM domain is a name, not a pattern: {value!r}")
        return domain


class RouteLimitsSpec(_Spec):
    """Budgets of a route (rendered to relay.config.RouteLimits)."""

    messages_per_second: float | None = Field(default=None, gt=0, le=100000)
    messages_per_hour: int | None = Field(default=None, ge=1)
    connections: int | None = Field(default=None, ge=1, le=10000)
    per_destination: bool = False


class RelayRouteSpec(_Spec):
    priority: int = Field(default=0, ge=0, le=1000000)
    match: MatchSpec = MatchSpec()
    next_hop: HopSpec
    failover: list[FailoverHopSpec] = Field(default=[], max_length=8)
    dkim: list[DkimSpec] = Field(default=[], max_length=16)
    limits: RouteLimitsSpec = RouteLimitsSpec()
    events: EventsSpec | None = None

    @model_validator(mode="after")
    def _dkim_keys(self) -> RelayRouteSpec:
        problem = dkim_keys_problem([(k.domain, k.selector, k.active) for k in self.dkim])
        if problem:
            raise ValueError(problem)
        return self

    def hops(self) -> list[HopSpec]:
        return [self.next_hop, *self.failover]


# --------------------------------------------------------------------------- documents


@dataclass(frozen=True, order=True)
class ObjectKey:
    """namespace/name of a namespaced object."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


_SpecModel = TypeVar("_SpecModel", bound=BaseModel)


@dataclass(frozen=True)
class _Document(Generic[_SpecModel]):
    """A parsed object: where it is, its typed spec and the metadata the operator uses."""

    key: ObjectKey
    spec: _SpecModel
    labels: Mapping[str, str] = field(default_factory=dict)
    uid: str | None = None
    generation: int | None = None


class MailRelay(_Document[MailRelaySpec]):
    """A valid MailRelay."""


class RelayRoute(_Document[RelayRouteSpec]):
    """A valid RelayRoute."""


@dataclass(frozen=True)
class InvalidSpec:
    """A body that cannot be used; `errors` are lines for a condition message or `mailrelay check`."""

    kind: str
    key: ObjectKey
    errors: tuple[str, ...]
    generation: int | None = None


def _describe(error: ValidationError) -> list[str]:
    lines = []
    for problem in error.errors():
        location = "spec"
        for part in problem["loc"]:
            location += f"[{part}]" if isinstance(part, int) else f".{part}"
        # A failed union member or a literal shows its tag; keep the path readable.
        location = re.sub(r"\.(function-after|function-before|function-plain)\[[^]]*\]", "", location)
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            message = "unknown field"
        lines.append(f"{location}: {message}")
    return lines


def _metadata(body: Mapping[str, Any], default_namespace: str) -> tuple[ObjectKey, dict[str, str], Any, Any]:
    metadata = body.get("metadata") or {}
    if not isinstance(metadata, Mapping):
        metadata = {}
    name = str(metadata.get("name") or "")
    namespace = str(metadata.get("namespace") or default_namespace)
    labels = metadata.get("labels") or {}
    labels = {str(k): str(v) for k, v in labels.items()} if isinstance(labels, Mapping) else {}
    return ObjectKey(namespace, name), labels, metadata.get("uid"), metadata.get("generation")


def _spec_body(body: Mapping[str, Any]) -> tuple[Any, list[str]]:
    spec = body.get("spec")
    if spec is None:
        return None, ["spec: missing"]
    if not isinstance(spec, Mapping):
        return None, ["spec: must be a mapping"]
    return spec, []


def _validated_spec(body: Mapping[str, Any], model: type[_SpecModel]) -> tuple[_SpecModel | None, list[str]]:
    """The body's spec as `model` (None when it has none or it is invalid) and what is wrong."""
    spec_body, errors = _spec_body(body)
    if spec_body is None:
        return None, errors
    try:
        return model.model_validate(dict(spec_body)), errors
    except ValidationError as exc:
        return None, [*errors, *_describe(exc)]


def parse_mailrelay(body: Mapping[str, Any], default_namespace: str = "default") -> MailRelay | InvalidSpec:
    """A MailRelay body (as the API returns it, or as written in a file) → `MailRelay` or `InvalidSpec`."""
    key, labels, uid, generation = _metadata(body, default_namespace)
    errors: list[str] = []
    if not naming.is_valid_relay_name(key.name):
        errors.append(
            f"metadata.name: {key.name!r} is not a DNS-1035 label of at most {naming.MAX_RELAY_NAME} "
            "characters (it names Services and a StatefulSet)"
        )
    spec, spec_errors = _validated_spec(body, MailRelaySpec)
    errors += spec_errors
    if errors or spec is None:
        return InvalidSpec("MailRelay", key, tuple(errors), generation)
    return MailRelay(key=key, spec=spec, labels=labels, uid=uid, generation=generation)


def parse_relayroute(body: Mapping[str, Any], default_namespace: str = "default") -> RelayRoute | InvalidSpec:
    """A RelayRoute body → `RelayRoute` or `InvalidSpec`."""
    key, labels, uid, generation = _metadata(body, default_namespace)
    errors: list[str] = []
    if not key.name:
        errors.append("metadata.name: missing")
    spec, spec_errors = _validated_spec(body, RelayRouteSpec)
    errors += spec_errors
    if errors or spec is None:
        return InvalidSpec("RelayRoute", key, tuple(errors), generation)
    return RelayRoute(key=key, spec=spec, labels=labels, uid=uid, generation=generation)


def messages(items: Sequence[InvalidSpec]) -> list[str]:
    """`kind namespace/name: problem` lines for a batch of invalid documents."""
    return [f"{item.kind} {item.key}: {error}" for item in items for error in item.errors]
