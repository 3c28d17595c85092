"""A real authoritative DNS server for tests: dnspython messages over UDP and TCP on loopback.

Usage (see the ``dns_server`` fixture in tests/relay/conftest.py)::

    server = DnsServer()                      # binds 127.0.0.1:<free port> (UDP and TCP)
    server.add("example.test", "MX", "10 mx1.example.test.", "20 mx2.example.test.")
    server.add("mx1.example.test", "A", "127.0.0.2")
    server.add("null.test", "MX", "0 .")      # RFC 7505 null MX
    server.servfail("broken.test")            # answer SERVFAIL for this name
    server.drop("slow.test")                  # never answer (the client times out)
    server.start(); ...; server.stop()
    config.dns.nameservers == [server.nameserver]   # "127.0.0.1:PORT"

Names that have records of another type answer NOERROR with an empty answer (NoAnswer) and an
SOA in the authority section; unknown names answer NXDOMAIN. Every query is recorded in
``server.queries`` as (name, type) so tests can see caching. It listens only on 127.0.0.1.
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
from collections.abc import Iterable

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

_SOA = "ns.test. hostmaster.test. 1 3600 600 86400 60"


def _name(text: str) -> dns.name.Name:
    return dns.name.from_text(text.rstrip(".").lower() + ".")


class DnsServer:
    """An in-memory zone served authoritatively; thread-safe to change while running."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.queries: list[tuple[str, str]] = []
        self.tcp_queries = 0
        self._records: dict[tuple[dns.name.Name, int], dns.rrset.RRset] = {}
        self._servfail: set[dns.name.Name] = set()
        self._drop: set[dns.name.Name] = set()
        self._lock = threading.Lock()
        self._udp: socketserver.UDPServer | None = None
        self._tcp: socketserver.TCPServer | None = None
        self._threads: list[threading.Thread] = []

    # ----------------------------------------------------------------- zone content

    @property
    def nameserver(self) -> str:
        """The value for ``config.dns.nameservers``."""
        return f"{self.host}:{self.port}"

    def add(self, name: str, rdtype: str, *values: str, ttl: int = 300) -> None:
        """Add records, e.g. ``add("d.test", "MX", "10 mx.d.test.")`` (merged into that set)."""
        rrset = dns.rrset.from_text_list(_name(name), ttl, "IN", rdtype, list(values))
        with self._lock:
            existing = self._records.get((rrset.name, rrset.rdtype))
            if existing is not None:
                rrset.union_update(existing)
            self._records[(rrset.name, rrset.rdtype)] = rrset

    def remove(self, name: str, rdtype: str | None = None) -> None:
        key_name = _name(name)
        with self._lock:
            for key in list(self._records):
                if key[0] == key_name and (rdtype is None or key[1] == dns.rdatatype.from_text(rdtype)):
                    del self._records[key]

    def servfail(self, name: str, enabled: bool = True) -> None:
        with self._lock:
            (self._servfail.add if enabled else self._servfail.discard)(_name(name))

    def drop(self, name: str, enabled: bool = True) -> None:
        with self._lock:
            (self._drop.add if enabled else self._drop.discard)(_name(name))

    def count(self, name: str, rdtype: str) -> int:
        """How many queries for (name, type) arrived."""
        key = (str(_name(name)), rdtype.upper())
        with self._lock:
            return sum(1 for q in self.queries if q == key)

    # ----------------------------------------------------------------- answering

    def answer(self, wire: bytes, tcp: bool = False) -> bytes | None:
        """The response to one query in wire format, or None to drop it. Over UDP an answer
        larger than the client's buffer (512 octets, or its EDNS size) is truncated (TC set),
        so the client must retry over TCP (RFC 1035 4.2.1, RFC 7766)."""
        try:
            query = dns.message.from_wire(wire)
        except Exception:
            return None
        if not query.question:
            return None
        question = query.question[0]
        qname, qtype = question.name, question.rdtype
        with self._lock:
            self.queries.append((str(qname), dns.rdatatype.to_text(qtype)))
            if tcp:
                self.tcp_queries += 1
            if qname in self._drop:
                return None
            response = dns.message.make_response(query)
            response.flags |= dns.flags.AA
            response.flags &= ~dns.flags.RA
            if qname in self._servfail:
                response.set_rcode(dns.rcode.SERVFAIL)
                return response.to_wire()
            rrset = self._records.get((qname, qtype))
            if rrset is not None:
                response.answer.append(rrset)
            else:
                exists = any(key[0] == qname for key in self._records)
                if not exists:
                    response.set_rcode(dns.rcode.NXDOMAIN)
                soa = dns.rrset.from_text(qname.parent() if len(qname) > 1 else qname, 60, "IN", "SOA", _SOA)
                response.authority.append(soa)
        if tcp:
            return response.to_wire()
        limit = max(512, query.payload) if query.edns >= 0 else 512
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            response.answer.clear()
            response.authority.clear()
            response.flags |= dns.flags.TC
            return response.to_wire()

    # ----------------------------------------------------------------- sockets

    def start(self) -> DnsServer:
        server = self

        class Udp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data, sock = self.request
                reply = server.answer(data)
                if reply is not None:
                    sock.sendto(reply, self.client_address)

        class Tcp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                conn: socket.socket = self.request
                while True:
                    head = conn.recv(2)
                    if len(head) < 2:
                        return
                    (length,) = struct.unpack("!H", head)
                    data = b""
                    while len(data) < length:
                        chunk = conn.recv(length - len(data))
                        if not chunk:
                            return
                        data += chunk
                    reply = server.answer(data, tcp=True)
                    if reply is None:
                        return
                    conn.sendall(struct.pack("!H", len(reply)) + reply)

        for _ in range(20):
            udp = socketserver.ThreadingUDPServer((self.host, 0), Udp)
            port = udp.server_address[1]
            try:
                tcp = socketserver.ThreadingTCPServer((self.host, port), Tcp, bind_and_activate=False)
                tcp.allow_reuse_address = True
                tcp.server_bind()
                tcp.server_activate()
            except OSError:
                udp.server_close()
                continue
            break
        else:  # pragma: no cover - the machine has no free port pair
            raise RuntimeError("no free UDP+TCP port pair on loopback")
        udp.daemon_threads = True
        tcp.daemon_threads = True
        self._udp, self._tcp, self.port = udp, tcp, port
        for srv in (udp, tcp):
            thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        for srv in (self._udp, self._tcp):
            if srv is not None:
                srv.shutdown()
                srv.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads.clear()

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def zone(server: DnsServer, records: Iterable[tuple[str, str, str]]) -> None:
    """Add many (name, type, value) records at once."""
    for name, rdtype, value in records:
        server.add(name, rdtype, value)
