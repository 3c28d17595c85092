"""Prometheus metric definitions shared by every part of the relay process.

Only the metric objects live here (names, help, labels), so the front, the scheduler and the
gateways count into the same series. Serving them over HTTP (with /healthz and /readyz) is the
job of the process shell, not of this module.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

ACCEPTED = Counter("mailrelay_messages_accepted", "Messages answered 250 after DATA", ["listener"])
REJECTED = Counter(
    "mailrelay_rejected",
    "Commands or messages refused, by reason (relay_denied, size, syntax, loop, recipients, auth, ...)",
    ["reason"],
)
DELIVERED = Counter("mailrelay_recipients_delivered", "Recipients delivered to a next hop", ["route"])
DEFERRED = Counter(
    "mailrelay_recipients_deferred", "Recipient attempts deferred (4xx, unreachable)", ["route"]
)
BOUNCED = Counter("mailrelay_recipients_bounced", "Recipients bounced (5xx, lifetime expired)", ["route"])
DELIVERY_SECONDS = Histogram(
    "mailrelay_delivery_seconds",
    "Time from acceptance to final delivery of a recipient",
    ["route"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600, 86400),
)
# With several worker processes (PROMETHEUS_MULTIPROC_DIR) every worker scans the same shared
# spool: the most recent scan of a live worker is the depth (not a sum, no stale dead pids).
QUEUE_DEPTH = Gauge(
    "mailrelay_queue_messages",
    "Messages in the spool by state",
    ["state"],
    multiprocess_mode="livemostrecent",
)
TLS_NOT_AFTER = Gauge(
    "mailrelay_tls_certificate_expiry_timestamp_seconds",
    "When the TLS certificate the listeners serve expires (its notAfter, Unix time)",
    multiprocess_mode="livemostrecent",
)
INTAKE_DELAYED = Counter(
    "mailrelay_intake_delayed",
    "250 replies held back because new mail waited for delivery slots (in-flow control)",
)
CONFIG_RELOADS = Counter(
    "mailrelay_config_reloads", "Configuration reloads by result (ok, invalid)", ["result"]
)
SESSIONS = Gauge("mailrelay_smtp_sessions", "Open SMTP sessions", ["listener"], multiprocess_mode="livesum")
PROXY_DROPPED = Counter(
    "mailrelay_proxy_dropped",
    "Connections dropped on a PROXY-protocol listener, by reason (untrusted_source, missing, "
    "invalid, version, timeout)",
    ["listener", "reason"],
)
# Issue 14 (scale-down hand-off). mailrelay_queue_depth and mailrelay_queue_oldest_age_seconds
# are computed from the spool when /metrics is scraped (relay.queue_status.metrics_text).
HANDOFF = Counter(
    "mailrelay_handoff_messages",
    "Messages of a draining relay handed to a peer (sent), not handed (failed), or taken from a "
    "draining peer (received)",
    ["result"],
)
HANDOFF_DUPLICATES = Counter(
    "mailrelay_handoff_duplicates",
    "Hand-offs of a message whose queue id this spool already held (kept once, answered 250)",
)
HANDOFF_REFUSED = Counter(
    "mailrelay_handoff_refused",
    "Hand-off sessions or commands refused (auth: wrong or missing credential, draining)",
    ["reason"],
)

# Per destination (relay.throttle): a destination is the MX rollup of an MX hop (every MX host
# of a provider is one) or the host of a relay or smarthost hop.
DESTINATION_ATTEMPTS = Counter(
    "mailrelay_destination_transactions",
    "SMTP transactions attempted per destination",
    ["route", "destination"],
)
DESTINATION_THROTTLED = Counter(
    "mailrelay_destination_throttled",
    "Deliveries slowed or held back per destination, by reason (messagesPerSecond, messagesPerHour, "
    "backoff, connections, waiting: our limits; remote: the destination asked us to slow down)",
    ["route", "destination", "reason"],
)
DESTINATION_DEFERRED = Counter(
    "mailrelay_destination_deferred",
    "Recipients deferred per destination, by reason (throttled, connection, tls, policy, rate_limit, other)",
    ["route", "destination", "reason"],
)
DESTINATION_FACTOR = Gauge(
    "mailrelay_destination_rate_factor",
    "Adaptive backoff per destination: 1 is full rate, lower after throttling replies",
    ["route", "destination"],
    multiprocess_mode="livemostrecent",
)
EVENTS = Counter(
    "mailrelay_events",
    "Delivery event POSTs (issue 15) by result: sent, retry, dropped (too old), lost (not stored)",
    ["result"],
)
ABUSE_BLOCKS = Counter(
    "mailrelay_abuse_blocks",
    "Client addresses blocked (abuse.blockFor), by reason (auth_failures); counted once, by the "
    "worker that saw the last failure",
    ["reason"],
)
ABUSE_STORE_ERRORS = Counter(
    "mailrelay_abuse_store_errors", "Abuse store operations that failed (the front then admits)"
)
RECIPIENT_CHECKS = Counter(
    "mailrelay_recipient_checks",
    "Recipient verification refusals and callouts, by outcome (unknown, callout_valid, "
    "callout_unknown, callout_unavailable)",
    ["outcome"],
)

# TLS on MX hops (relay.hops, relay.delivery, relay.mta_sts), TLS-RPT style (RFC 8460): per
# recipient domain and policy, sessions whose TLS was verified, unverified (opportunistic),
# cleartext (no STARTTLS offered) or failed (handshake, certificate, STARTTLS missing when
# required, or no MX host matching an MTA-STS policy).
TLS_SESSIONS = Counter(
    "mailrelay_tls_sessions",
    "SMTP sessions to MX hosts by recipient domain, TLS policy and result",
    ["domain", "policy", "result"],
)
MTA_STS_POLICIES = Counter(
    "mailrelay_mta_sts_policies",
    "MTA-STS policy lookups by result (fetched, cached, none, failed)",
    ["result"],
)
