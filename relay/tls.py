"""Server-side TLS for the SMTP front: the context built from the certificate files (and rebuilt
when a renewed Secret changes them), and the TLS layer a session puts over its TCP connection.

`TlsContexts.current()` is what every handshake (STARTTLS or implicit TLS) takes when it
starts: at most once a second it compares the files' modification times and rebuilds the
context when they changed; a renewed file that does not load is logged and the previous context
is kept (aiosmtpd builds its context once at start: reloading is ours). Minimum TLS 1.2, no
client certificates.

`ServerTls` is asyncio's SSLProtocol with one difference: `on_lost` is called when the TCP
connection under it closes, also when no handshake completed (the plain SSLProtocol tells its
application protocol only about connections whose handshake it announced, which leaked a
session slot per abandoned STARTTLS). Called by relay.smtpd; it decides nothing about SMTP.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from asyncio import sslproto
from collections.abc import Callable
from typing import Any

from relay import metrics
from relay.config import TlsConfig

log = logging.getLogger(__name__)


def _export_expiry(cert_file: str | os.PathLike[str]) -> None:
    """``mailrelay_tls_certificate_expiry_timestamp_seconds``: the served certificate's notAfter
    (the first certificate of the chain file; the alert on it is the chart's)."""
    from cryptography import x509

    try:
        with open(cert_file, "rb") as handle:
            certificate = x509.load_pem_x509_certificate(handle.read())
    except (OSError, ValueError) as exc:
        log.warning("cannot read the expiry of %s: %s", cert_file, exc)
        return
    metrics.TLS_NOT_AFTER.set(certificate.not_valid_after_utc.timestamp())


class TlsContexts:
    """The server TLS context from the certificate files, rebuilt when the files change (a
    renewed cert-manager Secret): every handshake (STARTTLS or implicit TLS) takes `current()`
    when it starts."""

    def __init__(self, tls: TlsConfig) -> None:
        self.tls = tls
        self._stamp: tuple[float, float] | None = None
        self._checked = 0.0
        self._context = self._build()

    def _files_stamp(self) -> tuple[float, float]:
        return (os.stat(self.tls.cert_file).st_mtime, os.stat(self.tls.key_file).st_mtime)

    def _build(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.tls.cert_file, self.tls.key_file)
        self._stamp = self._files_stamp()
        _export_expiry(self.tls.cert_file)
        return context

    def current(self) -> ssl.SSLContext:
        now = time.monotonic()
        if now - self._checked >= 1.0:
            self._checked = now
            try:
                if self._files_stamp() != self._stamp:
                    self._context = self._build()
                    log.info("TLS certificate reloaded from %s", self.tls.cert_file)
            except (OSError, ssl.SSLError) as exc:
                log.warning("TLS certificate reload failed, keeping the old one: %s", exc)
        return self._context


class ServerTls(sslproto.SSLProtocol):
    """Server-side TLS over a raw connection for `app` (an asyncio protocol); `on_lost(exc)`
    runs once when the raw connection is closed, whether or not the handshake completed; the
    waiter is done when the handshake is (with an exception if it failed or timed out)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        app: asyncio.BaseProtocol,
        context: ssl.SSLContext,
        waiter: asyncio.Future[None],
        *,
        handshake_timeout: float,
        on_lost: Callable[[BaseException | None], None],
    ) -> None:
        super().__init__(
            loop,
            app,
            context,
            waiter,
            server_side=True,
            # typeshed says int; asyncio takes any number of seconds
            ssl_handshake_timeout=handshake_timeout,  # type: ignore[arg-type]
        )
        self._on_lost = on_lost

    def connection_lost(self, exc: BaseException | None) -> None:
        try:
            super().connection_lost(exc)
        finally:
            self._on_lost(exc)


def describe(transport: asyncio.BaseTransport | None) -> str | None:
    """The TLS session of a transport as the Received comment gives it ("TLSv1.3 with cipher
    TLS_AES_256_GCM_SHA384 (256/256 bits)"), None when it carries no TLS."""
    if transport is None:
        return None
    ssl_object: Any = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    cipher = ssl_object.cipher()
    if not cipher:
        return str(ssl_object.version())
    name, _proto, bits = cipher
    return f"{ssl_object.version()} with cipher {name} ({bits}/{bits} bits)"
