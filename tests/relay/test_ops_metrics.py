"""The relay metrics the chart's alerts need, scraped from a running relay: the age of the
oldest waiting message (``mailrelay_queue_oldest_age_seconds``, from queue ids, which
start with their arrival time) and the served certificate's expiry
(``mailrelay_tls_certificate_expiry_timestamp_seconds``, its notAfter); the open-relay
self-check gauge says "not tested" (-1) while no self-check ran."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from relay.spool import new_queue_id, queue_id_time
from tests.relay.apphelp import (
    RelayRun,
    http_get,
    ports,
    relay_to_sink_config,
    until,
    write_config,
)
from tests.relay.fronthelp import make_certs
from tests.relay.smtpsink import SmtpSink
from tests.relay.test_logs import _send


def _gauge(port: int, name: str) -> float | None:
    status, body = http_get(port, "/metrics")
    assert status == 200
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return None


def test_queue_ids_carry_their_arrival_time() -> None:
    before = time.time()
    arrival = queue_id_time(new_queue_id())
    assert arrival is not None and before - 0.001 <= arrival <= time.time() + 0.001
    assert queue_id_time("not-an-id") is None


async def test_oldest_message_age_and_certificate_expiry_are_exported(
    tmp_path: Path, runs: list[RelayRun]
) -> None:
    certs = make_certs(tmp_path)
    sink = SmtpSink(rcpt_replies={"later@d.test": "451 4.3.0 try again later"})
    await sink.start()
    try:
        data = relay_to_sink_config(
            tmp_path,
            hostname="metrics.test",
            domains=["d.test"],
            sink_port=sink.port,
            workers=1,
            tls=certs.tls,
        )
        port, metrics_port = ports(data)
        data["listeners"][0]["tls"] = "starttls"
        data["queue"]["retry"] = {"minBackoff": "1h", "maxBackoff": "1h", "maxLifetime": "5d"}
        run = RelayRun(write_config(tmp_path, data))
        runs.append(run.start())
        await asyncio.to_thread(run.wait_for, "relay metrics.test ready")
        expiry = await asyncio.to_thread(
            _gauge, metrics_port, "mailrelay_tls_certificate_expiry_timestamp_seconds"
        )
        served = x509.load_pem_x509_certificate(certs.cert_file.read_bytes())
        assert expiry == served.not_valid_after_utc.timestamp()
        empty = await asyncio.to_thread(_gauge, metrics_port, "mailrelay_queue_oldest_age_seconds")
        assert empty == 0.0
        # no self-check configured: "not tested", never the 0 ("open") a fresh gauge would say
        untested = await asyncio.to_thread(_gauge, metrics_port, "mailrelay_relay_safe")
        assert untested == -1.0
        sent = time.time()
        await asyncio.to_thread(_send, port, "a@s.test", ["later@d.test"])
        await asyncio.to_thread(run.wait_for, r"deferred 1 recipients")

        async def aged() -> bool:
            age = await asyncio.to_thread(_gauge, metrics_port, "mailrelay_queue_oldest_age_seconds")
            return age is not None and age > 0.5

        await until(aged, timeout=60)  # the next scan (every few seconds) sets it
        age = await asyncio.to_thread(_gauge, metrics_port, "mailrelay_queue_oldest_age_seconds")
        assert age is not None and age <= time.time() - sent + 1
    finally:
        await sink.stop()
