"""relay_operator.spec: the same contract as the CRDs, plus the semantic rules, as readable errors."""

from __future__ import annotations

from typing import Any

import pytest

from relay_operator import spec
from relay_operator.spec import InvalidSpec, MailRelay, RelayRoute, parse_mailrelay, parse_relayroute
from tests.relay_operator import crd_tools


def parse(body: dict[str, Any]) -> MailRelay | RelayRoute | InvalidSpec:
    if body["kind"] == "MailRelay":
        return parse_mailrelay(body, "default")
    return parse_relayroute(body, "default")


@pytest.mark.parametrize(
    ("body", "phrase"),
    [(body, ours) for _, body, _, ours in crd_tools.INVALID_BODIES],
    ids=[case for case, *_ in crd_tools.INVALID_BODIES],
)
def test_what_the_api_server_refuses_spec_refuses_too(body: dict[str, Any], phrase: str) -> None:
    parsed = parse(body)
    assert isinstance(parsed, InvalidSpec)
    assert any(phrase in error for error in parsed.errors), parsed.errors


@pytest.mark.parametrize(("path", "body"), crd_tools.samples(), ids=[p.name for p, _ in crd_tools.samples()])
def test_samples_parse_the_same_before_and_after_api_server_defaulting(
    path: Any, body: dict[str, Any]
) -> None:
    raw = parse(body)
    defaulted = parse(crd_tools.apply_defaults(crd_tools.schema(body["kind"]), body))
    assert not isinstance(raw, InvalidSpec), raw
    assert raw == defaulted


EVERY_HOP = [
    {"relay": {"name": "b"}},
    {"smarthost": {"host": "smtp.example.net", "authSecretRef": {"name": "c"}}},
    {"mx": {}},
    {"gateway": {"webhook": {"url": "https://h.example/x", "authSecretRef": {"name": "t"}}}},
    {"gateway": {"maildir": {"path": "capture"}}},
    {"gateway": {"pipe": {"command": ["cat"]}}},
    {"reject": {}},
]


@pytest.mark.parametrize("hop", EVERY_HOP, ids=lambda h: next(iter(h)))
def test_hop_defaults_equal_crd_defaults(hop: dict[str, Any]) -> None:
    body = crd_tools.route_body(nextHop=hop)
    defaulted = crd_tools.apply_defaults(crd_tools.schema("RelayRoute"), body)
    assert crd_tools.admission_errors("RelayRoute", body) == []
    assert parse(body) == parse(defaulted)


def test_relay_defaults_equal_crd_defaults() -> None:
    body = crd_tools.relay_body(
        tls={"secretName": "t"},
        auth={"secretName": "u"},
        limits={},
        queue={"storage": {}, "retry": {}},
        service={},
        listeners=[
            {"name": "smtp", "port": 25},
            {"name": "sub", "port": 587, "mode": "submission", "auth": "required"},
        ],
    )
    defaulted = crd_tools.apply_defaults(crd_tools.schema("MailRelay"), body)
    assert defaulted != body
    assert parse(body) == parse(defaulted)


def _pattern(kind: str, *path: str) -> str:
    node = crd_tools.schema(kind)
    for part in path:
        node = node["items"] if part == "[]" else node["properties"][part]
    value = node["pattern"]
    assert isinstance(value, str)
    return value


def test_patterns_are_the_crd_patterns() -> None:
    assert _pattern("MailRelay", "spec", "queue", "retry", "minBackoff") == spec.DURATION_PATTERN
    assert _pattern("MailRelay", "spec", "limits", "idleTimeout") == spec.DURATION_PATTERN
    assert (
        _pattern("RelayRoute", "spec", "failover", "[]", "gateway", "pipe", "timeout")
        == spec.DURATION_PATTERN
    )
    assert _pattern("MailRelay", "spec", "limits", "maxMessageSize") == spec.SIZE_PATTERN
    assert _pattern("MailRelay", "spec", "queue", "storage", "size") == spec.SIZE_PATTERN
    assert _pattern("MailRelay", "spec", "listeners", "[]", "name") == spec.LISTENER_NAME_PATTERN
    assert _pattern("MailRelay", "spec", "hostname") == spec.HOSTNAME_PATTERN
    assert _pattern("RelayRoute", "spec", "nextHop", "smarthost", "host") == spec.HOSTNAME_PATTERN
    assert (
        _pattern("RelayRoute", "spec", "nextHop", "gateway", "maildir", "path") == spec.MAILDIR_PATH_PATTERN
    )
    assert _pattern("RelayRoute", "spec", "nextHop", "reject", "message") == spec.REJECT_MESSAGE_PATTERN
    assert _pattern("MailRelay", "spec", "auth", "key") == spec.SECRET_KEY_PATTERN


@pytest.mark.parametrize(
    ("changes", "phrase"),
    [
        ({"listeners": [{"name": "smtp", "port": 25, "tls": "starttls"}]}, "set spec.tls.secretName"),
        ({"listeners": [{"name": "smtp", "port": 25, "auth": "optional"}]}, "set spec.auth.secretName"),
        ({"listeners": [{"name": "metrics", "port": 25}]}, "reserved for the metrics port"),
        (
            {"listeners": [{"name": "a", "port": 25}, {"name": "a", "port": 26}]},
            "listener names must be unique: a",
        ),
        ({"trustedNetworks": ["10.0.0.0/33"]}, "invalid network '10.0.0.0/33'"),
        ({"acceptDomains": ["exa mple.com"]}, "invalid domain pattern"),
        ({"queue": {"retry": {"minBackoff": "2h", "maxBackoff": "1h"}}}, "must not exceed maxBackoff"),
        ({"replicas": -1}, "spec.replicas"),
        ({"hostname": "bad_host"}, "spec.hostname"),
        ({"limits": {"maxMessageSize": True}}, "invalid quantity"),
    ],
)
def test_semantic_rules(changes: dict[str, Any], phrase: str) -> None:
    parsed = parse(crd_tools.relay_body(**changes))
    assert isinstance(parsed, InvalidSpec)
    assert any(phrase in e for e in parsed.errors), parsed.errors


@pytest.mark.parametrize(
    ("body", "phrase"),
    [
        (
            {"apiVersion": "mailrelay.dev/v1alpha1", "kind": "MailRelay", "metadata": {"name": "a"}},
            "spec: missing",
        ),
        ({"kind": "MailRelay", "metadata": {"name": "a"}, "spec": []}, "spec: must be a mapping"),
        ({"kind": "RelayRoute", "metadata": {}, "spec": {"nextHop": {"mx": {}}}}, "metadata.name: missing"),
        ({"kind": "MailRelay", "metadata": "x", "spec": {}}, "metadata.name"),
    ],
)
def test_broken_documents_are_invalid_not_exceptions(body: dict[str, Any], phrase: str) -> None:
    parsed = parse(body)
    assert isinstance(parsed, InvalidSpec)
    assert any(phrase in e for e in parsed.errors), parsed.errors


def test_parsed_relay_keeps_identity_and_normalizes_domains() -> None:
    body = crd_tools.relay_body(acceptDomains=["Example.COM."])
    body["metadata"].update(uid="u-1", generation=3, labels={"team": "mail"})
    del body["metadata"]["namespace"]
    parsed = parse_mailrelay(body, "ops")
    assert isinstance(parsed, MailRelay)
    assert parsed.key == spec.ObjectKey("ops", "edge")
    assert (parsed.uid, parsed.generation, dict(parsed.labels)) == ("u-1", 3, {"team": "mail"})
    assert parsed.spec.accept_domains == ["example.com"]


def _selector(**data: Any) -> spec.LabelSelector:
    return spec.LabelSelector.model_validate(data)


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        ({}, {}, True),
        ({"matchLabels": {"relay": "edge"}}, {"relay": "edge"}, True),
        ({"matchLabels": {"relay": "edge"}}, {"relay": "internal"}, False),
        ({"matchLabels": {"relay": "edge"}}, {}, False),
        (
            {"matchExpressions": [{"key": "relay", "operator": "In", "values": ["a", "b"]}]},
            {"relay": "b"},
            True,
        ),
        ({"matchExpressions": [{"key": "relay", "operator": "In", "values": ["a"]}]}, {}, False),
        ({"matchExpressions": [{"key": "relay", "operator": "NotIn", "values": ["a"]}]}, {}, True),
        (
            {"matchExpressions": [{"key": "relay", "operator": "NotIn", "values": ["a"]}]},
            {"relay": "a"},
            False,
        ),
        ({"matchExpressions": [{"key": "tier", "operator": "Exists"}]}, {"tier": ""}, True),
        ({"matchExpressions": [{"key": "tier", "operator": "Exists"}]}, {}, False),
        ({"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}, {}, True),
        ({"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}, {"tier": "x"}, False),
        (
            {
                "matchLabels": {"relay": "edge"},
                "matchExpressions": [{"key": "off", "operator": "DoesNotExist"}],
            },
            {"relay": "edge", "off": "1"},
            False,
        ),
    ],
)
def test_label_selector(selector: dict[str, Any], labels: dict[str, str], expected: bool) -> None:
    assert _selector(**selector).matches(labels) is expected


@pytest.mark.parametrize(
    ("hop", "summary"),
    [
        ({"relay": {"name": "internal"}}, "relay/internal"),
        ({"smarthost": {"host": "smtp.example.net"}}, "smarthost/smtp.example.net:587"),
        ({"mx": {}}, "mx:25"),
        ({"gateway": {"webhook": {"url": "https://h.example/in"}}}, "webhook/https://h.example/in"),
        ({"gateway": {"maildir": {"path": "cap"}}}, "maildir/cap"),
        ({"gateway": {"pipe": {"command": ["/bin/archive", "-q"]}}}, "pipe//bin/archive"),
        ({"reject": {"code": 451}}, "reject/451"),
    ],
)
def test_hop_summary(hop: dict[str, Any], summary: str) -> None:
    assert spec.HopSpec.model_validate(hop).summary() == summary


@pytest.mark.parametrize(
    ("reject", "text"),
    [
        ({}, "5.7.1 Recipient rejected by routing policy"),
        ({"code": 451}, "4.7.1 Recipient rejected by routing policy"),
        ({"code": 550, "message": "5.1.1 no such user"}, "5.1.1 no such user"),
    ],
)
def test_reject_reply_text(reject: dict[str, Any], text: str) -> None:
    assert spec.RejectSpec.model_validate(reject).reply_text() == text
