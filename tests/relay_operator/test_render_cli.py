"""`mailrelay render` and `mailrelay check`, run through the real `mailrelay` click group (the
commands are found through the ``mailrelay.commands`` entry points), on files in tmp_path."""

from __future__ import annotations

import base64
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from relay.cli import main
from relay_operator import manifests
from tests.relay_operator import crd_tools


def run(*args: str, stdin: str | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), input=stdin)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def write(folder: Path, name: str, *docs: dict[str, Any]) -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump_all(docs))
    return path


def loop_docs() -> list[dict[str, Any]]:
    a = crd_tools.relay_body(routeSelector={"matchLabels": {"relay": "edge"}})
    b = crd_tools.relay_body(routeSelector={"matchLabels": {"relay": "internal"}})
    b["metadata"]["name"] = "internal"
    to_b = crd_tools.route_body(nextHop={"relay": {"name": "internal"}})
    back = crd_tools.route_body(nextHop={"relay": {"name": "edge"}})
    back["metadata"].update(name="back", labels={"relay": "internal"})
    return [a, b, to_b, back]


def test_commands_are_registered() -> None:
    code, out, _ = run("--help")
    assert code == 0 and "render" in out and "check" in out


def test_render_the_samples() -> None:
    code, out, err = run("render", "-f", str(crd_tools.SAMPLES_DIR), "--image", "mailrelay:test")
    assert (code, err) == (0, "")
    docs = list(yaml.safe_load_all(out))
    assert [(d["kind"], d["metadata"]["name"]) for d in docs] == [
        (kind, name.format(relay=relay))
        for relay in ("edge", "internal")
        for kind, name in [
            ("ServiceAccount", "{relay}-relay"),
            ("ConfigMap", "{relay}-config"),
            ("Service", "{relay}-headless"),
            ("Service", "{relay}"),
            ("StatefulSet", "{relay}"),
            ("PodDisruptionBudget", "{relay}"),
            ("NetworkPolicy", "{relay}"),
        ]
    ]
    assert out == (Path(__file__).parent / "golden" / "samples.yaml").read_text()


def test_render_prints_what_it_can_and_fails_on_a_loop(tmp_path: Path) -> None:
    write(tmp_path, "all.yaml", *loop_docs())
    code, out, err = run("render", "-f", str(tmp_path))
    assert code == 1
    assert "routing loop for recipient domain *: edge -> internal -> edge" in err
    assert len(list(yaml.safe_load_all(out))) == 14


def test_check_the_samples_warns_about_secrets_it_was_not_given() -> None:
    code, out, _ = run("check", "-f", str(crd_tools.SAMPLES_DIR))
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[-1] == "ok: 2 MailRelay(s) and 7 RelayRoute(s) in 1 namespace(s): 0 error(s), 6 warning(s)"
    assert any("Secret edge-tls (for spec.tls) is not among the given manifests" in line for line in lines)
    assert any("Secret internal-ca (for RelayRoute corp-mailstore) is not among" in line for line in lines)
    assert run("check", "--strict", "-f", str(crd_tools.SAMPLES_DIR))[0] == 1


def test_check_with_secrets(tmp_path: Path) -> None:
    shutil.copytree(crd_tools.SAMPLES_DIR, tmp_path / "samples")
    secrets = [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name, "namespace": "mail"},
            "stringData": data,
        }
        for name, data in [
            ("edge-tls", {"tls.crt": "x", "tls.key": "y"}),
            ("edge-users", {"users": "alice:$2b$..."}),
            ("provider-credentials", {"username": "u"}),
            ("internal-ca", {"ca.crt": "-----BEGIN CERTIFICATE-----"}),
            ("dkim-2026a-example-com", {"private.key": "-----BEGIN PRIVATE KEY-----\nbroken\n"}),
        ]
    ]
    secrets.append(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "archive-token", "namespace": "mail"},
            "data": {"authorization": base64.b64encode(b"Bearer t").decode()},
        }
    )
    write(tmp_path, "secrets.yaml", *secrets)
    code, out, _ = run("check", "-f", str(tmp_path / "samples"), "-f", str(tmp_path / "secrets.yaml"))
    assert code == 1
    assert out.splitlines() == [
        "error: MailRelay mail/edge: Secret dkim-2026a-example-com key private.key (DKIM "
        "2026a._domainkey.example.com of RelayRoute partners-mx): not a PEM private key without a "
        "password (DkimKeyInvalid)",
        "error: MailRelay mail/edge: Secret provider-credentials (for RelayRoute outbound-smarthost) "
        "has no key password (SecretKeyMissing)",
        "failed: 2 MailRelay(s) and 7 RelayRoute(s) in 1 namespace(s): 2 error(s), 0 warning(s)",
    ]


def test_check_explains_each_problem(tmp_path: Path) -> None:
    docs = loop_docs()
    ghost = crd_tools.route_body(
        nextHop={"relay": {"name": "ghost"}}, match={"recipientDomains": ["g.example"]}
    )
    ghost["metadata"].update(name="ghost-route", namespace="other")
    broken = crd_tools.relay_body(listeners=[{"name": "smtp", "port": 99999}])
    broken["metadata"].update(name="broken", namespace="other")
    write(tmp_path, "a.yaml", *docs)
    write(
        tmp_path, "b.yml", ghost, broken, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}
    )
    code, out, _ = run("check", "-f", str(tmp_path))
    assert code == 1
    text = out
    assert "error: MailRelay mail/edge: routing loop for recipient domain *: edge -> internal -> edge" in text
    assert (
        "error: MailRelay other/broken: spec.listeners[0].port: Input should be less than or equal to 65535"
        in text
    )
    assert "RelayRoute other/ghost-route" in text and "NotSelected" in text
    assert (
        text.strip()
        .splitlines()[-1]
        .startswith("failed: 3 MailRelay(s) and 3 RelayRoute(s) in 2 namespace(s)")
    )


def test_unknown_relay_is_reported(tmp_path: Path) -> None:
    relay = crd_tools.relay_body(routeSelector={})
    ghost = crd_tools.route_body(nextHop={"relay": {"name": "ghost"}})
    write(tmp_path, "a.yaml", relay, ghost)
    code, out, _ = run("check", "-f", str(tmp_path / "a.yaml"))
    assert code == 1
    assert "error: RelayRoute mail/r: next hop relay 'ghost': no valid MailRelay of that name" in out


def test_stdin_and_kubectl_lists(tmp_path: Path) -> None:
    listing = {"apiVersion": "v1", "kind": "List", "items": [b for _, b in crd_tools.samples()]}
    code, out, _ = run("check", "-f", "-", stdin=yaml.safe_dump(listing))
    assert code == 0 and out.strip().splitlines()[-1].startswith("ok: 2 MailRelay(s) and 7 RelayRoute(s)")


@pytest.mark.parametrize(
    ("content", "phrase"),
    [
        ("a: [", "not valid YAML"),
        ("- 1\n", "is not a mapping"),
        ("kind: MailRelay\napiVersion: mailrelay.dev/v1alpha1\nspec: {}\n", "has no metadata.name"),
        ("kind: MailRelay\napiVersion: mailrelay.dev/v1\nmetadata: {name: a}\n", "is not served"),
        ("hostname: relay.example.com\nlisteners: [{name: smtp, port: 25}]\n", "this is a relay config file"),
        (
            "kind: RelayRoute\napiVersion: mailrelay.dev/v1alpha1\nmetadata: {name: a}\n---\n"
            "kind: RelayRoute\napiVersion: mailrelay.dev/v1alpha1\nmetadata: {name: a}\n",
            "is also defined in",
        ),
        ("kind: Secret\napiVersion: v1\nmetadata: {name: s}\ndata: {k: '!!'}\n", "is not base64"),
    ],
)
def test_unusable_input_exits_2(tmp_path: Path, content: str, phrase: str) -> None:
    (tmp_path / "bad.yaml").write_text(content + "\n---\n" + yaml.safe_dump(crd_tools.relay_body()))
    for command in ("check", "render"):
        code, out, err = run(command, "-f", str(tmp_path / "bad.yaml"))
        if phrase == "is not base64" and command == "render":
            continue  # render does not read Secret contents
        assert code == 2, (command, out, err)
        assert phrase in err


def test_missing_path_and_empty_folder_exit_2(tmp_path: Path) -> None:
    code, _, err = run("check", "-f", str(tmp_path / "nope"))
    assert code == 2 and "no such file or folder" in err
    code, _, err = run("render", "-f", str(tmp_path))
    assert code == 2 and "no manifest files found" in err


def test_only_foreign_documents_is_an_error(tmp_path: Path) -> None:
    write(tmp_path, "cm.yaml", {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}})
    code, out, _ = run("check", "-f", str(tmp_path))
    assert code == 1 and "no MailRelay or RelayRoute found" in out


def test_load_manifests_defaults_the_namespace(tmp_path: Path) -> None:
    body = crd_tools.relay_body()
    del body["metadata"]["namespace"]
    write(tmp_path, "x.json", body)
    (tmp_path / "notes.txt").write_text("ignored")
    loaded = manifests.load_manifests([tmp_path], default_namespace="ops")
    assert list(loaded.namespaces) == ["ops"]
    assert loaded.namespaces["ops"].relays[0]["metadata"]["namespace"] == "ops"
    assert loaded.files == (tmp_path / "x.json",)


def test_render_shows_the_workers_each_relay_runs(tmp_path: Path) -> None:
    """The ConfigMap carries the rendered `workers`: the CPU limit rounded up, an explicit
    number as written, else auto (resolved by the relay at start)."""
    limited = crd_tools.relay_body(resources={"limits": {"cpu": "1500m", "memory": "1Gi"}})
    explicit = crd_tools.relay_body(workers=3, resources={"limits": {"cpu": "1500m"}})
    explicit["metadata"]["name"] = "explicit"
    default = crd_tools.relay_body()
    default["metadata"]["name"] = "default"
    write(tmp_path, "relays.yaml", limited, explicit, default)
    code, out, err = run("render", "-f", str(tmp_path))
    assert (code, err) == (0, "")
    configs = {
        d["metadata"]["name"]: yaml.safe_load(d["data"]["relay.yaml"])
        for d in yaml.safe_load_all(out)
        if d["kind"] == "ConfigMap"
    }
    assert {name: config["workers"] for name, config in configs.items()} == {
        "edge-config": 2,
        "explicit-config": 3,
        "default-config": "auto",
    }
