"""`make image-test`: the image `make image` built (localhost/mailrelay:<version>), run for real
with buildah (no Docker daemon), as root.

- `mailrelay --version` in a container of the image (`buildah run --isolation chroot`);
- the image runs as uid 10001 (its USER) and holds no compiler (no compiler binary, no
  compiler or -dev package in its dpkg database);
- the operator's entry point starts and answers `--help`;
- a relay from the image's filesystem, as uid 10001, with the root filesystem mounted read-only,
  the spool on a mounted host directory, /tmp a tmpfs (as the pod has it) and the config
  mounted where the operator mounts it, accepts a message on a loopback port and delivers it to
  a sink outside; `mailrelay queue list` there needs no path. `buildah run` has no read-only
  root, so this one runs `chroot` into the container's mounted filesystem inside a private
  mount namespace (`unshare --mount`) with the image's own environment, user and entry point.

The start-up time (process start to the relay's `ready` line) and the image size are printed
(`pytest -s`, or the `-rA` summary). Not part of `make test` (see README, "The image").
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import smtplib
import subprocess
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.relay.apphelp import free_port, until
from tests.relay.smtpsink import SmtpSink

pytestmark = pytest.mark.image

ROOT = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
IMAGE = os.environ.get("MAILRELAY_IMAGE", f"localhost/mailrelay:{VERSION}")
STORAGE = ["--storage-driver", "vfs"]
COMPILERS = ("gcc", "cc", "c++", "g++", "clang", "tcc", "x86_64-linux-gnu-gcc", "x86_64-linux-gnu-gcc-12")
COMPILER_PACKAGES = re.compile(
    r"^(gcc(-\d+)?|g\+\+(-\d+)?|cpp(-\d+)?|clang.*|build-essential|libc6-dev|python3(\.\d+)?-dev)$"
)

# Mounts the relay's volumes inside the container's filesystem, makes its root read-only, proves
# it is, then runs the command as the image's user with the image's environment.
_WRAPPER = r"""
set -eu
root=$1; spool=$2; config=$3; user=$4; shift 4
mount --bind "$root" "$root"
mount --bind /proc "$root/proc"
mount --rbind /dev "$root/dev"
mount -t tmpfs -o size=64m tmpfs "$root/tmp"
mount --bind "$spool" "$root/var/spool/mailrelay"
mkdir -p "$root/etc/mailrelay/config"
mount --bind -o ro "$config" "$root/etc/mailrelay/config"
mount -o remount,bind,ro "$root"
if touch "$root/probe" 2>/dev/null; then echo "the root filesystem is writable" >&2; exit 3; fi
cd "$root"
exec chroot --userspec="$user" "$root" "$@"
"""


def _buildah(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["buildah", *STORAGE, *args], capture_output=True, text=True, timeout=300)
    if check:
        assert done.returncode == 0, f"buildah {' '.join(args)}: {done.stderr}"
    return done


@pytest.fixture(scope="module")
def image_config() -> dict[str, Any]:
    assert os.geteuid() == 0, "make image-test runs as root (buildah --isolation chroot)"
    assert shutil.which("buildah"), "buildah is missing: apt-get install buildah (README, The image)"
    found = _buildah("inspect", "--type", "image", IMAGE, check=False)
    assert found.returncode == 0, f"no image {IMAGE}: run `make image` first"
    config = json.loads(found.stdout)["OCIv1"]["config"]
    assert isinstance(config, dict)
    size = _buildah("images", "--format", "{{.Size}}", IMAGE).stdout.strip()
    print(f"\nimage {IMAGE}: {size}")
    return config


@pytest.fixture(scope="module")
def container(image_config: dict[str, Any]) -> Iterator[tuple[str, Path]]:
    name = _buildah("from", "--pull-never", IMAGE).stdout.strip().splitlines()[-1]
    try:
        rootfs = Path(_buildah("mount", name).stdout.strip())
        yield name, rootfs
    finally:
        _buildah("umount", name, check=False)
        _buildah("rm", name, check=False)


def _run(container: tuple[str, Path], *command: str) -> subprocess.CompletedProcess[str]:
    return _buildah(
        "run", "--isolation", "chroot", "--network", "host", container[0], "--", *command, check=False
    )


def test_version(container: tuple[str, Path]) -> None:
    done = _run(container, "mailrelay", "--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"mailrelay, version {VERSION}"


def test_runs_as_uid_10001_and_holds_no_compiler(
    image_config: dict[str, Any], container: tuple[str, Path]
) -> None:
    assert image_config["User"] == "10001:10001"
    assert image_config["Entrypoint"] == ["mailrelay"]
    done = _run(container, "id", "-u")
    assert (done.returncode, done.stdout.strip()) == (0, "10001"), done.stderr
    rootfs = container[1]
    present = [
        f"{folder}/{name}"
        for folder in ("usr/bin", "usr/local/bin", "bin")
        for name in COMPILERS
        if (rootfs / folder / name).exists()
    ]
    assert present == [], f"compilers in the image: {present}"
    status = (rootfs / "var/lib/dpkg/status").read_text()
    packages = re.findall(r"^Package: (\S+)\nStatus: install ok installed", status, flags=re.M)
    assert packages, "no dpkg database read"
    assert [p for p in packages if COMPILER_PACKAGES.match(p)] == []


def test_the_operator_entry_point_answers_help(container: tuple[str, Path]) -> None:
    done = _run(container, "mailrelay", "operator", "--help")
    assert done.returncode == 0, done.stderr
    assert "--all-namespaces" in done.stdout and "--metrics-port" in done.stdout


def _read_only_run(
    container: tuple[str, Path],
    image_config: dict[str, Any],
    spool: Path,
    config: Path,
    *command: str,
    program: tuple[str, ...] = (),
    env: tuple[str, ...] = (),
) -> subprocess.Popen[str]:
    """`command` after the image's entry point (or after `program`), with the image's
    environment (and `env`), as the image's user, on the read-only root."""
    return subprocess.Popen(
        [
            "unshare", "--mount", "--propagation", "private", "--fork", "--",
            "sh", "-c", _WRAPPER, "wrapper", str(container[1]), str(spool), str(config), image_config["User"],
            "env", "-i", *image_config["Env"], *env, *(program or image_config["Entrypoint"]), *command,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )  # fmt: skip


async def test_a_relay_from_the_image_read_only_root_spool_on_a_volume_delivers(
    tmp_path: Path, image_config: dict[str, Any], container: tuple[str, Path]
) -> None:
    sink = SmtpSink()
    await sink.start()
    spool = tmp_path / "spool"
    spool.mkdir()
    os.chown(spool, 10001, 10001)
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    port, metrics_port = free_port(), free_port()
    (config_dir / "relay.yaml").write_text(
        yaml.safe_dump(
            {
                "hostname": "image.test",
                "listeners": [{"name": "smtp", "host": "127.0.0.1", "port": port, "mode": "relay"}],
                "acceptDomains": ["d.test"],
                "queue": {"directory": "/var/spool/mailrelay/queue"},
                "routes": [
                    {
                        "name": "to-sink",
                        "match": {"recipientDomains": ["d.test"]},
                        "nextHop": {"kind": "relay", "name": "sink", "host": "127.0.0.1", "port": sink.port},
                    }
                ],
                "metrics": {"host": "127.0.0.1", "port": metrics_port},
                "workers": 2,
                "logFormat": "json",
            }
        )
    )
    started = time.monotonic()
    process = _read_only_run(
        container, image_config, spool, config_dir, "relay", "--config", "/etc/mailrelay/config/relay.yaml"
    )
    lines: list[str] = []

    async def pump() -> None:
        assert process.stdout is not None
        while True:
            line = await asyncio.to_thread(process.stdout.readline)
            if not line:
                return
            lines.append(line.rstrip("\n"))

    reader = asyncio.create_task(pump())
    try:
        await until(
            lambda: any("ready (pid" in line for line in lines) or process.poll() is not None, timeout=120
        )
        assert process.poll() is None, "\n".join(lines)
        startup = time.monotonic() - started
        print(f"\nrelay start-up from the image (2 workers, read-only root): {startup:.2f} s")

        def send() -> None:
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                client.sendmail("a@s.test", ["x@d.test"], b"Subject: from the image\r\n\r\nhello\r\n")

        await asyncio.to_thread(send)
        await until(lambda: bool(sink.messages), timeout=60)
        assert sink.messages[0].rcpt_tos == ["x@d.test"]
        assert b"by image.test" in sink.messages[0].content
        owners = {(p.stat().st_uid, p.stat().st_gid) for p in spool.rglob("*")}
        assert owners == {(10001, 10001)}, owners
        events = [json.loads(line) for line in lines if line.startswith("{")]
        assert any(event.get("event") == "delivered" for event in events), "\n".join(lines)
        queue = _read_only_run(container, image_config, spool, config_dir, "queue", "list")
        out, _ = queue.communicate(timeout=60)
        assert (queue.returncode, out.strip()) == (0, "queue is empty"), out
        # programs that call sendmail get the image's /usr/sbin/sendmail (mailrelay sendmail)
        sendmail = _read_only_run(
            container,
            image_config,
            spool,
            config_dir,
            "-t",
            program=("/usr/sbin/sendmail",),
            env=(f"MAILRELAY_SERVER=127.0.0.1:{port}",),
        )
        out, _ = sendmail.communicate(
            "From: cron@s.test\nTo: y@d.test\nSubject: from cron\n\nsent by sendmail\n", timeout=60
        )
        assert sendmail.returncode == 0, out
        await until(lambda: any(m.rcpt_tos == ["y@d.test"] for m in sink.messages), timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        try:
            await asyncio.to_thread(process.wait, 30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        await reader
        await sink.stop()
    assert process.returncode == 0, "\n".join(lines)
