"""relay.config: the operator/relay contract parses, validates and round-trips."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.config import (
    ConfigError,
    RelayConfig,
    dump_config,
    format_duration,
    load_config,
    parse_config,
    parse_duration,
    parse_size,
)

FULL = {
    "hostname": "edge.mail.example.com",
    "listeners": [
        {"name": "smtp", "port": 25, "mode": "relay"},
        {"name": "submission", "port": 587, "mode": "submission", "tls": "starttls", "auth": "required"},
    ],
    "tls": {"certFile": "/tls/tls.crt", "keyFile": "/tls/tls.key"},
    "auth": {"usersFile": "/auth/users"},
    "trustedNetworks": ["10.0.0.0/8", "fd00::/8"],
    "acceptDomains": ["example.com", "*.Example.org"],
    "limits": {"maxMessageSize": "25Mi", "maxRecipients": 100},
    "queue": {"directory": "/spool", "retry": {"minBackoff": "5m", "maxBackoff": "1h", "maxLifetime": "5d"}},
    "dns": {"nameservers": ["127.0.0.1:5353", "10.0.0.10"]},
    "routes": [
        {
            "name": "corp",
            "priority": 100,
            "match": {"recipientDomains": ["corp.example.com", "*.corp.example.com"]},
            "nextHop": {"kind": "relay", "name": "internal", "host": "internal.mail.svc", "port": 25},
            "failover": [{"kind": "smarthost", "host": "smtp.provider.net", "port": 587, "tls": "starttls"}],
        },
        {"name": "sandbox", "nextHop": {"kind": "gateway", "maildir": {"path": "/captured"}}},
        {"name": "internet", "priority": -1, "nextHop": {"kind": "mx"}},
    ],
}


def test_full_config_round_trips() -> None:
    config = parse_config(FULL)
    assert config.limits.max_message_size == 25 * 1024 * 1024
    assert config.queue.retry.min_backoff == 300.0
    assert config.accept_domains == ["example.com", "*.example.org"]
    again = parse_config(__import__("yaml").safe_load(dump_config(config)))
    assert again == config
    assert "minBackoff: 5m" in dump_config(config)


def test_routes_ordered_by_priority_then_name() -> None:
    config = parse_config(FULL)
    assert [r.name for r in config.ordered_routes()] == ["corp", "sandbox", "internet"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"listeners": [{"name": "smtp", "port": 70000}]}, "listeners.0.port"),
        ({"hostname": ""}, "hostname"),
        ({"bogus": 1}, "bogus: Extra inputs are not permitted"),
        ({"limits": {"maxMessageSize": "lots"}}, "limits.maxMessageSize: invalid size"),
        ({"queue": {"retry": {"minBackoff": "2h", "maxBackoff": "1h"}}}, "minBackoff must not exceed"),
        ({"dns": {"nameservers": ["dns.example.com"]}}, "invalid nameserver"),
        ({"acceptDomains": ["exa mple.com"]}, "invalid domain pattern"),
        (
            {"routes": [{"name": "g", "nextHop": {"kind": "gateway"}}]},
            "exactly one of webhook, maildir, pipe",
        ),
        ({"auth": None}, "uses AUTH but no auth usersFile"),
        ({"tls": None}, "uses TLS but no tls certificate"),
    ],
)
def test_invalid_config_names_the_field(change: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({**FULL, **change})
    assert message in str(caught.value)


def test_load_config_reports_file_and_yaml_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("hostname: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    good = tmp_path / "good.yaml"
    good.write_text(dump_config(RelayConfig.model_validate(FULL)))
    assert load_config(good).hostname == "edge.mail.example.com"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("2s", 2.0), ("5m", 300.0), ("1h", 3600.0), ("5d", 432000.0), ("250ms", 0.25), (7, 7.0)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize(
    ("text", "size"), [("25Mi", 26214400), ("10M", 10_000_000), ("1Ki", 1024), (512, 512)]
)
def test_quantities(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["5 minutes", "-1s", True, "m"])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_handoff_and_drain_round_trip_and_name_the_draining_pods() -> None:
    data = {
        **FULL,
        "handoff": {"port": 2526, "credentialFile": "/etc/mailrelay/handoff/credential"},
        "drain": {"pods": ["edge-1", "edge-2"], "peers": [{"host": "edge-0.edge-peers", "port": 2526}]},
    }
    config = parse_config(data)
    assert config.handoff is not None and config.handoff.port == 2526
    assert config.handoff.credential_file == Path("/etc/mailrelay/handoff/credential")
    assert config.drain is not None and config.drain.peers[0].host == "edge-0.edge-peers"
    assert config.draining("edge-1") and config.draining("edge-2")
    assert not config.draining("edge-0")
    assert not parse_config(FULL).draining("edge-1")
    again = parse_config(__import__("yaml").safe_load(dump_config(config)))
    assert again == config


def test_handoff_port_must_not_be_a_listener_port() -> None:
    with pytest.raises(ConfigError, match=r"handoff\.port 25 is already used"):
        parse_config({**FULL, "handoff": {"port": 25}})
    with pytest.raises(ConfigError, match=r"drain\.peers\.0\.port"):
        parse_config({**FULL, "drain": {"pods": ["a"], "peers": [{"host": "h", "port": 0}]}})
