"""MX: from DNS answers to the ordered list of hosts a message for a domain is tried at.

RFC 5321 5.1: hosts are tried in increasing preference; hosts of equal preference are tried in
random order (to spread load); when a domain has no MX records but has an address record, the
domain itself is the only host (the "implicit MX"). RFC 7505: a single ``MX 0 .`` record means
the domain accepts no mail: bounce with 556 5.1.10 without trying anything. An NXDOMAIN answer
bounces with 5.1.2 (RFC 3463 "bad destination system address"); a failed lookup (SERVFAIL,
timeout) defers with 4.4.3 (RFC 3463 "directory server failure").

The typed lookup results (`MxAnswer`, `AddressAnswer`) are produced by the relay.dns adapter;
this module only decides. The random source is injected so tie shuffling is testable. No I/O.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Sequence
from dataclasses import dataclass


class LookupStatus(enum.Enum):
    """How a DNS query ended, as far as mail routing cares."""

    OK = "ok"  # records of the asked type exist
    NO_RECORDS = "no_records"  # the name exists but has no records of this type (NoAnswer)
    NXDOMAIN = "nxdomain"  # the name does not exist
    TEMPFAIL = "tempfail"  # SERVFAIL, REFUSED, timeout, no nameserver answered


@dataclass(frozen=True, order=True)
class MxRecord:
    preference: int
    exchange: str  # absolute name without the trailing dot; "" for the null MX target "."


@dataclass(frozen=True)
class MxAnswer:
    status: LookupStatus
    records: tuple[MxRecord, ...] = ()
    detail: str = ""


@dataclass(frozen=True)
class AddressAnswer:
    status: LookupStatus
    addresses: tuple[str, ...] = ()  # IPv4 first, then IPv6, each in answer order
    detail: str = ""


@dataclass(frozen=True)
class MxFailure:
    """The domain cannot be tried at all: a final bounce or a deferral for every recipient."""

    code: int
    status: str
    text: str

    @property
    def permanent(self) -> bool:
        return self.status.startswith("5.")


@dataclass(frozen=True)
class MxPlan:
    """Hosts to try in order. `implicit` is set when the domain itself stands in for an MX."""

    hosts: tuple[str, ...]
    implicit: bool = False


def is_null_mx(records: Sequence[MxRecord]) -> bool:
    """RFC 7505 3: exactly one MX record, with an empty target ("."). (The preference should be
    0; any preference is accepted as a null MX, as the RFC asks senders to be lenient.)"""
    return len(records) == 1 and records[0].exchange in ("", ".")


def order_hosts(records: Sequence[MxRecord], rng: random.Random | None = None) -> tuple[str, ...]:
    """Exchanges by increasing preference, ties shuffled with `rng`; empty targets and
    duplicates dropped (a host listed twice keeps its best preference)."""
    rng = rng or random.Random()
    by_preference: dict[int, list[str]] = {}
    seen: set[str] = set()
    for record in sorted(records):
        name = record.exchange.lower().rstrip(".")
        if not name or name in seen:
            continue
        seen.add(name)
        by_preference.setdefault(record.preference, []).append(name)
    ordered: list[str] = []
    for preference in sorted(by_preference):
        tier = by_preference[preference]
        rng.shuffle(tier)
        ordered.extend(tier)
    return tuple(ordered)


def plan_mx(domain: str, answer: MxAnswer, rng: random.Random | None = None) -> MxPlan | MxFailure:
    """What the MX answer for `domain` means: hosts to try, or a failure for every recipient."""
    domain = domain.lower().rstrip(".")
    if answer.status is LookupStatus.NXDOMAIN:
        return MxFailure(550, "5.1.2", f"domain {domain} does not exist (NXDOMAIN)")
    if answer.status is LookupStatus.TEMPFAIL:
        detail = f": {answer.detail}" if answer.detail else ""
        return MxFailure(451, "4.4.3", f"MX lookup for {domain} failed temporarily{detail}")
    if answer.status is LookupStatus.NO_RECORDS or not answer.records:
        return MxPlan(hosts=(domain,), implicit=True)
    if is_null_mx(answer.records):
        return MxFailure(556, "5.1.10", f"domain {domain} does not accept mail (null MX, RFC 7505)")
    hosts = order_hosts(answer.records, rng)
    if not hosts:
        return MxFailure(556, "5.1.10", f"domain {domain} has no usable MX host")
    return MxPlan(hosts=hosts)


def address_failure(domain: str, host: str, implicit: bool, answer: AddressAnswer) -> MxFailure:
    """Why a host yields no address. For the implicit MX a missing address means the domain
    has no mail host at all (5.1.2); for a named MX host a missing address is 5.4.4 ("unable
    to route"); a failed lookup is temporary (4.4.3)."""
    if answer.status is LookupStatus.TEMPFAIL:
        return MxFailure(451, "4.4.3", f"address lookup for {host} failed temporarily")
    if implicit:
        return MxFailure(550, "5.1.2", f"domain {domain} has no MX and no address record")
    return MxFailure(550, "5.4.4", f"MX host {host} of {domain} has no address record")


def combine_address_failures(failures: Sequence[MxFailure]) -> MxFailure:
    """When no host of a domain has an address: temporary if any lookup was temporary."""
    for failure in failures:
        if not failure.permanent:
            return failure
    return failures[0] if failures else MxFailure(451, "4.4.3", "no MX host could be resolved")
