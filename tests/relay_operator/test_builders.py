"""relay_operator.builders: golden files, Kubernetes schema validation, and the rules the
objects must keep (rollout hash, security, mounts that match the rendered config).

Regenerate the golden files after an intended change with:

    UPDATE_GOLDEN=1 .venv/bin/python -m pytest -q tests/relay_operator/test_builders.py

and review the diff like any other code change.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from relay.config import parse_config
from relay_operator import builders, naming, topology
from relay_operator.cli import render_documents
from relay_operator.topology import RelayPlan
from tests.relay_operator import crd_tools

GOLDEN = Path(__file__).parent / "golden"
KUBERNETES_VERSIONS = ["1.25", "1.30", "1.34"]  # 1.25: the lowest supported
OWNER = {
    "apiVersion": "mailrelay.dev/v1alpha1",
    "kind": "MailRelay",
    "name": "edge",
    "uid": "0b5b3f4e-8d7a-4c39-9a4e-1f6f1c2d3e4f",
    "controller": True,
    "blockOwnerDeletion": True,
}


def sample_plan() -> topology.NamespacePlan:
    docs = [b for _, b in crd_tools.samples()]
    return topology.plan_namespace(
        "mail", [d for d in docs if d["kind"] == "MailRelay"], [d for d in docs if d["kind"] == "RelayRoute"]
    )


def full_relay_plan() -> RelayPlan:
    """A relay that sets every optional field the builders read."""
    body = crd_tools.relay_body(
        replicas=3,
        listeners=[
            {"name": "smtp", "port": 2525},
            {"name": "smtps", "port": 4465, "tls": "implicit", "auth": "required", "mode": "submission"},
            {"name": "api", "port": 8025, "mode": "http", "tls": "implicit"},
        ],
        tls={"secretName": "a-very-long-secret-name-that-goes-on-and-on-and-on-for-ever-and-ever"},
        auth={"secretName": "users"},
        api={"tokensSecretRef": {"name": "api-clients"}},
        events={"webhook": {"url": "https://app.example/mail-events", "secretRef": {"name": "event-key"}}},
        queue={"storage": {"size": "10Gi", "storageClassName": "fast"}},
        service={"type": "LoadBalancer", "annotations": {"lb.example/internal": "true"}},
        image="registry.example/mailrelay:dev",
        imagePullPolicy="Always",
        imagePullSecrets=[{"name": "pull"}],
        resources={"requests": {"cpu": "1", "memory": 1073741824}, "limits": {"memory": "2Gi"}},
        nodeSelector={"mail": "yes"},
        podAnnotations={"prometheus.io/scrape": "true"},
        priorityClassName="mail-critical",
        workers=2,
        routeSelector={},
    )
    routes = [
        crd_tools.route_body(
            events={
                "webhook": {
                    "url": "http://billing.example/events",
                    "secretRef": {"name": "creds", "key": "hmac"},
                }
            },
            nextHop={
                "smarthost": {
                    "host": "smtp.example.net",
                    "authSecretRef": {"name": "creds"},
                    "caSecretRef": {"name": "private-ca", "key": "root.pem"},
                }
            },
            failover=[
                {
                    "gateway": {
                        "webhook": {
                            "url": "https://h.example/",
                            "authSecretRef": {"name": "creds"},
                            "caSecretRef": {"name": "creds"},
                        }
                    }
                }
            ],
        )
    ]
    return topology.plan_namespace("mail", [body], routes).relays["edge"]


def _golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.exists(), f"{path} is missing: run with UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{path} differs: review, then run with UPDATE_GOLDEN=1"


def test_render_of_the_samples_matches_the_golden_file() -> None:
    docs = [b for _, b in crd_tools.samples()]
    _golden("samples.yaml", render_documents(docs, builders.BuildOptions(image="mailrelay:test")))


def test_owned_objects_match_the_golden_file() -> None:
    objects = builders.build_objects(
        full_relay_plan(), builders.BuildOptions(image="mailrelay:test"), [OWNER]
    )
    _golden("full-owned.yaml", "".join("---\n" + yaml.safe_dump(o, sort_keys=False) for o in objects))


def _all_objects() -> list[dict[str, Any]]:
    objects = []
    for plan in [*sample_plan().relays.values(), full_relay_plan()]:
        objects += builders.build_objects(plan, builders.BuildOptions(), [OWNER])
    return objects


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_passes_strict_kubernetes_validation(version: str) -> None:
    objects = _all_objects()
    assert {o["kind"] for o in objects} == crd_tools.RELAY_OBJECT_KINDS
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)


def test_strict_validation_catches_a_typo() -> None:
    # The check above can fail: a misspelt field is refused.
    statefulset = next(o for o in _all_objects() if o["kind"] == "StatefulSet")
    statefulset["spec"]["template"]["spec"]["terminationGracePeriod"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(statefulset, "1.34", strict=True)


def test_every_configmap_is_a_config_the_relay_accepts() -> None:
    configmaps = [o for o in _all_objects() if o["kind"] == "ConfigMap"]
    assert len(configmaps) == 3
    for configmap in configmaps:
        config = parse_config(yaml.safe_load(configmap["data"][naming.CONFIG_KEY]))
        assert config.listeners


def _by_kind(plan: RelayPlan) -> dict[str, dict[str, Any]]:
    objects = builders.build_objects(plan)
    return {
        o["kind"] + ("/headless" if o["metadata"]["name"].endswith("-headless") else ""): o for o in objects
    }


def test_mounts_match_the_paths_in_the_config() -> None:
    plan = full_relay_plan()
    statefulset = _by_kind(plan)["StatefulSet"]
    pod = statefulset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert container["args"] == ["relay", "--config", "/etc/mailrelay/config/relay.yaml"]
    assert volumes[mounts["/etc/mailrelay/config"]]["configMap"]["name"] == "edge-config"
    assert "subPath" not in str(container["volumeMounts"])  # the kubelet must update the file
    config = plan.config
    assert config is not None and config.tls is not None and config.auth is not None
    tls_volume = volumes[mounts[str(config.tls.cert_file.parent)]]
    assert tls_volume["secret"]["secretName"].startswith("a-very-long-secret-name")
    assert len(tls_volume["name"]) <= 63
    assert volumes[mounts[str(config.auth.users_file.parent)]]["secret"]["secretName"] == "users"
    assert config.api is not None and config.api.tokens_file.name == "tokens"  # the default key
    assert volumes[mounts[str(config.api.tokens_file.parent)]]["secret"]["secretName"] == "api-clients"
    assert config.events is not None and config.events.webhook.secret_file is not None
    assert config.events.webhook.secret_file.name == "secret"  # the default key
    assert (
        volumes[mounts[str(config.events.webhook.secret_file.parent)]]["secret"]["secretName"] == "event-key"
    )
    route_events = config.routes[0].events
    assert route_events is not None and str(route_events.webhook.secret_file).endswith("/creds/hmac")
    hop = config.routes[0].next_hop
    assert hop.kind == "smarthost" and hop.credentials_dir is not None
    assert volumes[mounts[str(hop.credentials_dir)]]["secret"]["secretName"] == "creds"
    assert hop.ca_file is not None and hop.ca_file.name == "root.pem"
    assert volumes[mounts[str(hop.ca_file.parent)]]["secret"]["secretName"] == "private-ca"
    webhook = config.routes[0].failover[0]
    assert webhook.kind == "gateway" and webhook.webhook is not None and webhook.webhook.ca_file is not None
    assert str(webhook.webhook.ca_file) == f"{hop.credentials_dir}/ca.crt"  # the default key
    assert mounts[str(config.queue.directory.parent)] == naming.SPOOL_VOLUME
    # One Secret used twice by routes is mounted once.
    assert sum(v.get("secret", {}).get("secretName") == "creds" for v in pod["volumes"]) == 1


def test_pod_security_and_lifecycle() -> None:
    objects = _by_kind(full_relay_plan())
    pod = objects["StatefulSet"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["fsGroup"] == builders.RELAY_UID
    assert "sysctls" not in pod["securityContext"]  # every port is above 1024
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["terminationGracePeriodSeconds"] >= 120
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["resources"] == {
        "requests": {"cpu": "1", "memory": "1073741824"},
        "limits": {"memory": "2Gi"},
    }
    assert pod["automountServiceAccountToken"] is False
    edge = _by_kind(sample_plan().relays["edge"])["StatefulSet"]["spec"]["template"]["spec"]
    assert edge["securityContext"]["sysctls"] == [
        {"name": "net.ipv4.ip_unprivileged_port_start", "value": "25"}
    ]
    assert edge["containers"][0]["resources"]["limits"] == {"memory": "1Gi"}


def test_services_and_disruption_budget() -> None:
    objects = _by_kind(full_relay_plan())
    client = objects["Service"]
    assert client["metadata"]["name"] == "edge"
    assert [(p["name"], p["port"]) for p in client["spec"]["ports"]] == [
        ("smtp", 2525),
        ("smtps", 4465),
        ("api", 8025),  # the HTTP API is exposed like every listener
    ]
    assert client["spec"]["type"] == "LoadBalancer"
    assert client["spec"]["externalTrafficPolicy"] == "Local"
    assert client["metadata"]["annotations"] == {"lb.example/internal": "true"}
    headless = objects["Service/headless"]
    assert headless["spec"]["clusterIP"] == "None"
    assert [p["name"] for p in headless["spec"]["ports"]] == ["smtp", "smtps", "api", "metrics", "handoff"]
    assert objects["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1
    statefulset = objects["StatefulSet"]["spec"]
    assert statefulset["serviceName"] == "edge-headless"
    assert statefulset["replicas"] == 3
    selector = statefulset["selector"]["matchLabels"]
    for obj in objects.values():
        assert obj["metadata"]["labels"][naming.LABEL_MANAGED_BY] == naming.MANAGED_BY
    assert (
        objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]
        == selector
        == client["spec"]["selector"]
    )
    claim = statefulset["volumeClaimTemplates"][0]["spec"]
    assert claim == {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": "10Gi"}},
        "storageClassName": "fast",
    }
    assert statefulset["persistentVolumeClaimRetentionPolicy"] == {
        "whenDeleted": "Retain",
        "whenScaled": "Retain",
    }


def test_owner_references_on_every_object_and_none_without() -> None:
    for obj in builders.build_objects(full_relay_plan(), owners=[OWNER]):
        assert obj["metadata"]["ownerReferences"] == [OWNER]
    for obj in builders.build_objects(full_relay_plan()):
        assert "ownerReferences" not in obj["metadata"]
    body = {
        "apiVersion": "mailrelay.dev/v1alpha1",
        "kind": "MailRelay",
        "metadata": {"name": "edge", "uid": OWNER["uid"]},
    }
    assert builders.owner_reference(body) == OWNER
    with pytest.raises(ValueError, match="uid"):
        builders.owner_reference({"metadata": {"name": "edge"}})


def _template_and_configmap(
    routes: list[dict[str, Any]], **spec: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    body = crd_tools.relay_body(routeSelector={}, **spec)
    plan = topology.plan_namespace("mail", [body], routes).relays["edge"]
    objects = _by_kind(plan)
    return objects["StatefulSet"]["spec"]["template"], objects["ConfigMap"]


def test_route_change_rewrites_only_the_configmap() -> None:
    template, configmap = _template_and_configmap([crd_tools.route_body()])
    changed_template, changed_configmap = _template_and_configmap(
        [crd_tools.route_body(nextHop={"smarthost": {"host": "smtp.example.net"}})]
    )
    assert changed_template == template
    assert changed_configmap["data"] != configmap["data"]
    assert (
        changed_configmap["metadata"]["annotations"][naming.CONFIG_HASH_ANNOTATION]
        != configmap["metadata"]["annotations"][naming.CONFIG_HASH_ANNOTATION]
    )


def test_listener_change_rolls_the_pods() -> None:
    template, _ = _template_and_configmap([])
    changed, _ = _template_and_configmap(
        [], listeners=[{"name": "smtp", "port": 25}, {"name": "alt", "port": 2525}]
    )
    key = naming.ROLLOUT_HASH_ANNOTATION
    assert changed["metadata"]["annotations"][key] != template["metadata"]["annotations"][key]


def test_build_objects_refuses_a_plan_without_config() -> None:
    plan = topology.plan_namespace("mail", [crd_tools.relay_body(dns={"nameservers": ["x"]})], []).relays[
        "edge"
    ]
    with pytest.raises(ValueError, match="no rendered config"):
        builders.build_objects(plan)


def test_for_a_1_25_server_the_statefulset_omits_the_claim_retention_policy() -> None:
    options = builders.for_server(builders.BuildOptions(), (1, 25))
    statefulset = builders.build_statefulset(full_relay_plan(), options, [OWNER])
    assert "persistentVolumeClaimRetentionPolicy" not in statefulset["spec"]
    kubernetes_validate.validate(statefulset, "1.25", strict=True)
    default = builders.build_statefulset(full_relay_plan(), builders.BuildOptions(), [OWNER])
    assert {
        k: v for k, v in default["spec"].items() if k != "persistentVolumeClaimRetentionPolicy"
    } == statefulset["spec"]


def test_every_pod_can_hand_off_and_knows_its_name() -> None:
    plan = full_relay_plan()
    objects = _by_kind(plan)
    config = parse_config(yaml.safe_load(objects["ConfigMap"]["data"][naming.CONFIG_KEY]))
    assert config.handoff is not None and config.handoff.port == naming.HANDOFF_PORT
    assert config.drain is None  # only while pods drain
    pod = objects["StatefulSet"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    handoff = volumes[mounts[str(config.handoff.credential_file.parent)]]
    assert handoff["secret"]["secretName"] == naming.handoff_secret_name("edge")
    assert config.handoff.credential_file.name == naming.HANDOFF_SECRET_KEY
    env = {e["name"]: e for e in container["env"]}
    assert env[naming.POD_NAME_ENV]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert {"name": "handoff", "containerPort": naming.HANDOFF_PORT, "protocol": "TCP"} in container["ports"]
    # The preStop wait comes on top of the grace period a transfer in flight gets.
    # First SIGUSR1 to the relay (PID 1: no new sessions, deliveries go on), then the wait.
    pre_stop = ["/bin/sh", "-c", "kill -USR1 1; sleep 5"]
    assert container["lifecycle"] == {"preStop": {"exec": {"command": pre_stop}}}
    assert (
        pod["terminationGracePeriodSeconds"] == builders.BuildOptions().termination_grace_period_seconds + 5
    )
    body = crd_tools.relay_body(routeSelector={}, shutdown={"endpointRemovalDelay": "1500ms"})
    slow = topology.plan_namespace("mail", [body], []).relays["edge"]
    (slow_container,) = builders.build_statefulset(slow)["spec"]["template"]["spec"]["containers"]
    slow_pre_stop = slow_container["lifecycle"]["preStop"]["exec"]["command"]
    assert slow_pre_stop[-1] == "kill -USR1 1; sleep 2"  # whole seconds, rounded up


def test_a_drain_renders_into_the_config_and_keeps_the_statefulset_size() -> None:
    plan = full_relay_plan()
    drain = builders.Drain(
        replicas=3, pods=("edge-1", "edge-2"), peers=(("edge-0.edge-headless.mail.svc.cluster.local", 9025),)
    )
    objects = builders.build_objects(plan, drain=drain)
    configmap = next(o for o in objects if o["kind"] == "ConfigMap")
    config = parse_config(yaml.safe_load(configmap["data"][naming.CONFIG_KEY]))
    assert config.drain is not None and config.drain.pods == ["edge-1", "edge-2"]
    assert [(p.host, p.port) for p in config.drain.peers] == [
        ("edge-0.edge-headless.mail.svc.cluster.local", 9025)
    ]
    assert config.draining("edge-2") and not config.draining("edge-0")
    statefulset = next(o for o in objects if o["kind"] == "StatefulSet")
    assert statefulset["spec"]["replicas"] == 3
    # The drain changes only the ConfigMap: the pods do not roll for it.
    plain = builders.build_objects(plan)
    assert (
        next(o for o in plain if o["kind"] == "StatefulSet")["spec"]["template"]
        == statefulset["spec"]["template"]
    )


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_drain_job_and_the_handoff_secret_pass_strict_validation(version: str) -> None:
    plan = full_relay_plan()
    job = builders.build_drain_job(
        plan,
        builders.BuildOptions(),
        2,
        ("spool-edge-2", "6f1c2d3e-aaaa-bbbb-cccc-1f6f1c2d3e4f"),
        ("edge-0.edge-headless.mail.svc.cluster.local", 9025),
        [OWNER],
    )
    kubernetes_validate.validate(job, version, strict=True)
    assert job["metadata"]["name"] == "edge-drain-2-6f1c2d3e"
    assert job["metadata"]["annotations"][naming.CLAIM_UID_ANNOTATION].startswith("6f1c2d3e")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["args"][:3] == ["drain", "--spool", "/var/spool/mailrelay/queue"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    secret = builders.build_handoff_secret(plan, "random-credential", [OWNER])
    kubernetes_validate.validate(secret, version, strict=True)
    assert secret["stringData"] == {naming.HANDOFF_SECRET_KEY: "random-credential"}


def _netpol(**spec: Any) -> dict[str, Any] | None:
    body = crd_tools.relay_body(routeSelector={"matchLabels": {"relay": "edge"}}, **spec)
    routes = [
        crd_tools.route_body(nextHop={"relay": {"name": "store"}}),
        {**crd_tools.route_body(nextHop={"gateway": {"webhook": {"url": "https://hook.example:8443/x"}}})},
    ]
    routes[1]["metadata"] = {**routes[1]["metadata"], "name": "hook"}
    routes[1]["spec"]["priority"] = 5
    store = crd_tools.relay_body()
    store["metadata"]["name"] = "store"
    plan = topology.plan_namespace("mail", [body, store], routes).relays["edge"]
    objects = {o["kind"]: o for o in builders.build_objects(plan)}
    policy = objects.get("NetworkPolicy")
    if policy is not None:
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(policy, version, strict=True)
    return policy


def test_networkpolicy_rules() -> None:
    """An internal relay (ClusterIP, no accept domains): its relay listener only from the trusted
    networks, the PROXY balancer and the namespace's relays; submission open (AUTH guards it);
    egress to DNS, its peers, the relay its route names and the webhook's port. Opt-out: none."""
    policy = _netpol(
        listeners=[
            {"name": "smtp", "port": 25},
            {"name": "submission", "port": 587, "mode": "submission", "auth": "required"},
        ],
        auth={"secretName": "users"},
        trustedNetworks=["10.1.0.0/16"],
        service={"proxyProtocol": {"trustedFrom": ["192.168.0.5"], "listeners": ["smtp"]}},
    )
    assert policy is not None
    ingress = policy["spec"]["ingress"]
    assert ingress[0] == {"ports": [{"protocol": "TCP", "port": 587}]}
    assert ingress[1] == {
        "from": [
            {"ipBlock": {"cidr": "10.1.0.0/16"}},
            {"ipBlock": {"cidr": "192.168.0.5/32"}},
            {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "mailrelay"}}},
        ],
        "ports": [{"protocol": "TCP", "port": 25}],
    }
    egress = policy["spec"]["egress"]
    assert {"to": [{"podSelector": {"matchLabels": naming.selector_labels("store")}}]} in egress
    assert egress[-1] == {"ports": [{"protocol": "TCP", "port": 8443}]}
    assert not any(
        rule.get("ports") == [{"protocol": "TCP", "port": 25}] and "to" not in rule for rule in egress
    )
    # Accept domains: the relay listener is open to every pod of the cluster.
    inbound = _netpol(acceptDomains=["example.com"])
    assert inbound is not None
    assert inbound["spec"]["ingress"][0] == {
        "from": [{"namespaceSelector": {}}],
        "ports": [{"protocol": "TCP", "port": 25}],
    }
    # publicListeners overrides; networkPolicy.enabled false makes none.
    public = _netpol(networkPolicy={"publicListeners": ["smtp"]})
    assert public is not None and public["spec"]["ingress"][0] == {"ports": [{"protocol": "TCP", "port": 25}]}
    assert _netpol(networkPolicy={"enabled": False}) is None
