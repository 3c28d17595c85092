"""Runs the open-relay probe set (relay.core.open_relay) against an SMTP listener, and the
relay's periodic self-check that does so against its own listeners.

`run_probes` opens one connection per probe (from a given source address; on a PROXY
listener with a header that announces an outside client), reads the banner, sends ``EHLO``,
``MAIL``, ``RCPT``, ``RSET`` and ``QUIT``, never DATA. Used by ``mailrelay open-relay HOST:PORT``
(which ``mailrelay check --open-relay`` runs) and by `SelfCheck`.

`SelfCheck` probes each relay and submission listener of its own process every
``selfCheck.interval`` from a loopback address outside ``trustedNetworks`` (every 127.x.y.z
address is local on Linux), so it meets the relay as an outside client would (when the trusted
networks contain outside addresses too, e.g. 0.0.0.0/0, any loopback address does); on a PROXY
listener it connects from a loopback address in ``trustedFrom`` and announces
192.0.2.1 (TEST-NET-1). A listener it cannot test that way (all of loopback trusted, or no
loopback address in ``trustedFrom``) is skipped and logged; implicit-TLS listeners are not
probed (the relay rules are the same on every listener). The result is the gauge
``mailrelay_relay_safe`` (1 safe, 0 open, -1 not tested, which relay.app sets at start so a
relay that never checked does not read as open; the chart's MailRelayOpenRelay alert fires on 0)
and a log line (an error when open). With several workers the supervisor runs it, once per relay.
It decides nothing about mail.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import struct
from collections.abc import Sequence

from prometheus_client import REGISTRY, CollectorRegistry, Gauge

from relay.config import ListenerConfig, RelayConfig
from relay.core import open_relay
from relay.core.addresses import client_is_trusted
from relay.core.open_relay import ProbeResult

log = logging.getLogger(__name__)


def proxy_v2_header(client: str, server: str = "127.0.0.1", port: int = 25) -> bytes:
    """A PROXY v2 header announcing `client` (IPv4) to `server`."""
    body = ipaddress.IPv4Address(client).packed + ipaddress.IPv4Address(server).packed
    body += struct.pack("!HH", 40000, port)
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


async def _reply(reader: asyncio.StreamReader, timeout: float) -> tuple[int, str]:  # noqa: ASYNC109
    lines = []
    while True:
        line = await asyncio.wait_for(reader.readline(), timeout)
        if not line:
            raise ConnectionError("connection closed")
        text = line.decode("utf-8", "replace").rstrip("\r\n")
        lines.append(text[4:])
        if text[3:4] != "-":
            try:
                return int(text[:3]), "\n".join(lines)
            except ValueError as exc:
                raise ConnectionError(f"not an SMTP reply: {text!r}") from exc


async def _one_probe(
    host: str,
    port: int,
    probe: open_relay.Probe,
    *,
    source: str | None,
    proxy_client: str | None,
    helo: str,
    timeout: float,  # noqa: ASYNC109
) -> ProbeResult:
    local = (source, 0) if source else None
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, local_addr=local), timeout)
    try:
        if proxy_client is not None:
            writer.write(proxy_v2_header(proxy_client, port=port))
        code, text = await _reply(reader, timeout)
        if code != 220:
            raise ConnectionError(f"no greeting: {code} {text}")

        async def command(line: str) -> tuple[int, str]:
            writer.write(line.encode("utf-8", "surrogateescape") + b"\r\n")
            await writer.drain()
            return await _reply(reader, timeout)

        if (await command(f"EHLO {helo}"))[0] != 250:
            await command(f"HELO {helo}")
        mail, mail_text = await command(f"MAIL FROM:<{probe.mail_from}>")
        rcpt, rcpt_text = (0, "")
        if 200 <= mail < 300:
            rcpt, rcpt_text = await command(f"RCPT TO:<{probe.rcpt}>")
        with contextlib.suppress(OSError, ConnectionError, TimeoutError):
            await command("RSET")
            await command("QUIT")
        return ProbeResult(probe, mail, rcpt, rcpt_text or mail_text)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def run_probes(
    host: str,
    port: int,
    *,
    ours: str,
    source: str | None = None,
    proxy_client: str | None = None,
    helo: str = "probe.invalid",
    timeout: float = 10.0,  # noqa: ASYNC109
) -> list[ProbeResult]:
    """Every probe's answers, one connection per probe (so the relay's error limit does not cut
    the set short); raises OSError/ConnectionError when the listener cannot be talked to (refused,
    dropped, no SMTP banner)."""
    return [
        await _one_probe(
            host, port, probe, source=source, proxy_client=proxy_client, helo=helo, timeout=timeout
        )
        for probe in open_relay.probes(ours)
    ]


def untrusted_loopback(config: RelayConfig) -> str | None:
    """A loopback address the relay treats as it treats an outside client: one outside the
    trusted networks; else, when the trusted networks contain an outside address too (TEST-NET
    192.0.2.1, e.g. 0.0.0.0/0), any loopback address (an outsider is trusted the same way)."""
    for candidate in ("127.0.0.1", "127.255.255.254", "127.1.2.3", "127.0.0.254"):
        if not client_is_trusted(candidate, config.trusted_networks):
            return candidate
    if client_is_trusted(open_relay.TEST_NET, config.trusted_networks):
        return "127.0.0.1"
    return None


def _trusted_loopback(listener: ListenerConfig) -> str | None:
    proxy = listener.proxy_protocol
    assert proxy is not None
    for candidate in ("127.0.0.1", "127.255.255.254", "127.1.2.3"):
        if client_is_trusted(candidate, proxy.trusted_from):
            return candidate
    return None


RETRY_UNTESTED = 10.0  # seconds until a self-check that could not test tries again
_GAUGES: dict[int, Gauge] = {}


def relay_safe_gauge(registry: CollectorRegistry | None = None) -> Gauge:
    """``mailrelay_relay_safe``, made on first use in the one process that runs the self-check
    (the relay, or the supervisor of several workers: workers never make it, so no worker
    exports a default 0 that would read as "open")."""
    registry = registry or REGISTRY
    gauge = _GAUGES.get(id(registry))
    if gauge is None:
        gauge = _GAUGES[id(registry)] = Gauge(
            "mailrelay_relay_safe",
            "The open-relay self-check: 1 no probe was relayed, 0 a probe was relayed (open relay), "
            "-1 not tested",
            registry=registry,
        )
    return gauge


class SelfCheck:
    """The periodic open-relay self-check of one relay (run by one process)."""

    def __init__(
        self,
        config: RelayConfig,
        addresses: dict[str, tuple[str, int]],
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.config = config
        self.addresses = addresses
        self.registry = registry
        self._task: asyncio.Task[None] | None = None
        self.last: bool | None = None  # True safe, False open, None not tested

    def _ours(self) -> str:
        plain = [d for d in self.config.accept_domains if "*" not in d]
        return plain[0] if plain else self.config.hostname

    async def check(self) -> bool | None:
        """Probe every testable listener once; True when none relayed."""
        tested, open_listeners = 0, []
        for listener in self.config.listeners:
            if listener.mode not in ("relay", "submission") or listener.name not in self.addresses:
                continue
            if listener.tls == "implicit":
                log.info("self-check: listener %s uses implicit TLS, not probed", listener.name)
                continue
            host, port = self.addresses[listener.name]
            host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
            proxy_client = None
            if listener.proxy_protocol is not None:
                source, proxy_client = _trusted_loopback(listener), open_relay.TEST_NET
            else:
                source = untrusted_loopback(self.config)
            if source is None:
                log.warning("self-check: listener %s cannot be probed as an untrusted client", listener.name)
                continue
            try:
                results = await run_probes(
                    host,
                    port,
                    ours=self._ours(),
                    source=source,
                    proxy_client=proxy_client,
                    helo=self.config.hostname,
                )
            except (OSError, ConnectionError, TimeoutError) as exc:
                log.warning("self-check: listener %s could not be probed: %s", listener.name, exc)
                continue
            tested += 1
            if open_relay.is_open(results):
                open_listeners.append(listener.name)
                for line in open_relay.report(results):
                    if line.startswith("RELAYED"):
                        log.error("self-check: listener %s %s", listener.name, line)
        if not tested:
            self.last = None
            relay_safe_gauge(self.registry).set(-1)
            return None
        self.last = not open_listeners
        relay_safe_gauge(self.registry).set(1 if self.last else 0)
        if open_listeners:
            log.error("self-check: OPEN RELAY on listener(s) %s", ", ".join(open_listeners))
        else:
            log.info("self-check: no open relay on %d listener(s)", tested)
        return self.last

    def start(self, interval: float, first: float) -> None:
        async def loop() -> None:
            await asyncio.sleep(first)
            while True:
                result = None
                try:
                    result = await self.check()
                except Exception:  # a self-check never takes the relay down
                    log.exception("self-check failed")
                # Not tested (listeners not up yet, a worker restarting): again soon.
                await asyncio.sleep(interval if result is not None else min(interval, RETRY_UNTESTED))

        self._task = asyncio.create_task(loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def format_results(results: Sequence[ProbeResult]) -> str:
    return "\n".join(open_relay.report(results))
