"""Helpers for the SMTP front tests: configs (plain, and TLS + AUTH), a running front on
127.0.0.1:0, a raw SMTP client that speaks bytes (to send what smtplib refuses to send) and
trustme certificates."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trustme

from relay.config import RelayConfig, parse_config
from relay.front import Front
from relay.spool import Spool
from relay.users import hash_password

BASE_ROUTES = [
    {"name": "all-mx", "nextHop": {"kind": "mx"}},
]


@dataclass
class Certs:
    ca: trustme.CA
    cert_file: Path
    key_file: Path
    ca_file: Path

    @property
    def tls(self) -> dict[str, str]:
        """The relay config's ``tls`` section for this certificate and key."""
        return {"certFile": str(self.cert_file), "keyFile": str(self.key_file)}


def make_certs(directory: Path) -> Certs:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1", "relay.test")
    cert_file = directory / "tls.crt"
    key_file = directory / "tls.key"
    ca_file = directory / "ca.crt"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    for extra in cert.cert_chain_pems[1:]:
        with cert_file.open("ab") as handle:
            handle.write(extra.bytes())
    cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    return Certs(ca, cert_file, key_file, ca_file)


def write_users(directory: Path, users: dict[str, str], plain: bool = False) -> Path:
    path = directory / "users"
    lines = [
        f"{user}:{{PLAIN}}{password}" if plain else f"{user}:{hash_password(password, iterations=1000)}"
        for user, password in users.items()
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def make_config(tmp_path: Path, **overrides: Any) -> RelayConfig:
    data: dict[str, Any] = {
        "hostname": "relay.test",
        "listeners": [{"name": "smtp", "host": "127.0.0.1", "port": 2525, "mode": "relay"}],
        "acceptDomains": ["example.com", "*.corp.example"],
        "queue": {"directory": str(tmp_path / "queue")},
        "routes": BASE_ROUTES,
        "metrics": {"host": "127.0.0.1", "port": 0},
    }
    data.update(overrides)
    return parse_config(data)


TLS_LISTENERS: list[dict[str, Any]] = [
    {"name": "smtp", "host": "127.0.0.1", "port": 2525, "mode": "relay", "tls": "starttls"},
    {
        "name": "submission",
        "host": "127.0.0.1",
        "port": 2587,
        "mode": "submission",
        "tls": "starttls",
        "auth": "required",
    },
    {
        "name": "smtps",
        "host": "127.0.0.1",
        "port": 2465,
        "mode": "submission",
        "tls": "implicit",
        "auth": "required",
    },
]


def tls_config(tmp_path: Path, **overrides: Any) -> tuple[RelayConfig, ssl.SSLContext]:
    """Three listeners (relay with STARTTLS ``smtp``, ``submission`` with STARTTLS and AUTH
    required, implicit-TLS ``smtps`` with AUTH required), trustme certificates and one user
    alice/wonderland; with the client context that trusts the certificate."""
    certs = make_certs(tmp_path)
    users = write_users(tmp_path, {"alice": "wonderland"})
    config = make_config(
        tmp_path,
        listeners=TLS_LISTENERS,
        tls=certs.tls,
        auth={"usersFile": str(users), "maxFailures": 3},
        **overrides,
    )
    client_context = ssl.create_default_context(cafile=str(certs.ca_file))
    return config, client_context


def with_port_zero(config: RelayConfig) -> RelayConfig:
    listeners = [listener.model_copy(update={"port": 1}) for listener in config.listeners]
    return config.model_copy(update={"listeners": listeners})


@contextlib.asynccontextmanager
async def running_front(
    config: RelayConfig, spool: Spool | None = None, **kwargs: Any
) -> AsyncIterator[Front]:
    """A started Front whose listeners are bound to port 0 (whatever the config says)."""
    own_spool = spool is None
    if spool is None:
        spool = Spool(config.queue.directory)
        spool.prepare()
    # Bind to port 0: the listener config keeps its port for validation, the socket does not.
    import relay.front as front_module

    original = front_module.bind_socket

    def bind_any(host: str, port: int) -> Any:
        return original(host, 0)

    front_module.bind_socket = bind_any
    try:
        front = Front(config, spool, **kwargs)
        front.auth_failure_delay = 0.0
        await front.start()
    finally:
        front_module.bind_socket = original
    try:
        yield front
    finally:
        await front.close()
        if own_spool:
            spool.close()


class RawClient:
    """An SMTP client that sends exactly the bytes it is given and parses replies."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, host: str, port: int, **kwargs: Any) -> RawClient:
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 20, **kwargs)
        return cls(reader, writer)

    async def reply(self, timeout: float = 10) -> tuple[int, str]:  # noqa: ASYNC109
        """One (possibly multi-line) reply: (code, text of all lines joined by newlines)."""
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
            if not line:
                raise ConnectionError("connection closed")
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(text[4:])
            if text[3:4] != "-":
                return int(text[:3]), "\n".join(lines)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def cmd(self, line: str | bytes) -> tuple[int, str]:
        data = line if isinstance(line, bytes) else line.encode()
        await self.send(data + b"\r\n")
        return await self.reply()

    async def closed(self, timeout: float = 10) -> bool:  # noqa: ASYNC109
        """Whether the server closed the connection (EOF) within `timeout`."""
        try:
            await asyncio.wait_for(self.reader.read(), timeout)
        except TimeoutError:
            return False
        except ConnectionError:
            return True
        return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()
