"""MTA-STS (RFC 8461) and the TLS policy of MX delivery: parsing, matching, deciding.

relay.mta_sts fetches (the ``_mta-sts`` TXT record, the policy over HTTPS) and caches; relay.hops
asks `plan_tls` how to reach the MX hosts of a domain under an MX hop's ``tls`` mode:

- ``none``: no TLS; ``opportunistic``: STARTTLS when offered, not verified, clear text when it
  fails (RFC 7435); ``verify``: STARTTLS required and the certificate valid for the MX host name
  (else the mail is deferred);
- ``mta-sts`` (the default): with a policy in mode ``enforce``, only MX hosts matching the
  policy's ``mx`` patterns are tried, each with verified STARTTLS: a non-matching MX or a failed
  certificate defers the mail, it is never sent in clear nor to another host (RFC 8461 5);
  ``testing``: delivered as opportunistic, and what enforce would have refused is reported
  (logs and counters, RFC 8461 5.2); ``none`` or no policy: opportunistic.

Parsing rules (RFC 8461 3.1, 3.2): the TXT record is ``v=STSv1; id=...;`` (exactly one record
starting with ``v=STSv1``, else no policy); the policy file is ``key: value`` lines with
``version: STSv1``, ``mode``, one or more ``mx`` (unless mode none) and ``max_age`` (seconds, at
most 31557600); a pattern ``*.example.net`` matches exactly one further label.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

MAX_AGE_LIMIT = 31557600  # RFC 8461 3.2: at most one year
_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")

Mode = Literal["enforce", "testing", "none"]


class PolicyError(ValueError):
    """A policy file that does not follow RFC 8461 3.2."""


@dataclass(frozen=True)
class Policy:
    mode: Mode
    mx: tuple[str, ...]
    max_age: int
    id: str = ""


def txt_id(records: Sequence[str]) -> str | None:
    """The policy id of the ``_mta-sts`` TXT records, or None (no policy announced)."""
    sts = [r for r in records if r.strip().startswith("v=STSv1")]
    if len(sts) != 1:
        return None
    fields = dict(
        (key.strip(), value.strip())
        for key, _, value in (part.partition("=") for part in sts[0].split(";") if part.strip())
    )
    if fields.get("v") != "STSv1":
        return None
    policy_id = fields.get("id", "")
    return policy_id if _ID.match(policy_id) else None


def parse_policy(text: str, policy_id: str = "") -> Policy:
    """The policy of an ``mta-sts.txt`` body; PolicyError when it is not a valid one."""
    values: dict[str, list[str]] = {}
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        key, colon, value = line.partition(":")
        if not colon:
            raise PolicyError(f"not a key: value line: {line[:80]!r}")
        values.setdefault(key.strip(), []).append(value.strip())
    if values.get("version") != ["STSv1"]:
        raise PolicyError("version must be STSv1")
    mode = (values.get("mode") or [""])[0]
    if mode not in ("enforce", "testing", "none"):
        raise PolicyError(f"mode must be enforce, testing or none, not {mode!r}")
    max_age_text = (values.get("max_age") or [""])[0]
    if not max_age_text.isdigit() or int(max_age_text) > MAX_AGE_LIMIT:
        raise PolicyError(f"max_age must be a number of seconds up to {MAX_AGE_LIMIT}")
    mx = tuple(pattern.lower().rstrip(".") for pattern in values.get("mx", []))
    if mode != "none" and not mx:
        raise PolicyError("a policy in mode enforce or testing needs mx lines")
    return Policy(mode=mode, mx=mx, max_age=int(max_age_text), id=policy_id)  # type: ignore[arg-type]


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 4.1: a name equal to the pattern, or ``*.domain`` with exactly one more label."""
    host = host.lower().rstrip(".")
    if pattern.startswith("*."):
        label, dot, rest = host.partition(".")
        return bool(label) and bool(dot) and rest == pattern[2:]
    return host == pattern


TlsMode = Literal["none", "opportunistic", "verify", "mta-sts"]
HostTls = Literal["none", "opportunistic", "verify", "testing"]


@dataclass(frozen=True)
class TlsPlan:
    """How to reach each MX host: `hosts` with their TLS, the hosts left out (`refused`, for
    the report), and the name of the policy applied (for logs and counters)."""

    hosts: tuple[tuple[str, HostTls], ...]
    refused: tuple[str, ...]
    policy: str  # none | opportunistic | verify | mta-sts-enforce | mta-sts-testing | mta-sts-none


def plan_tls(mode: TlsMode, hosts: Sequence[str], policy: Policy | None) -> TlsPlan:
    """The TLS of every MX host of a domain under an MX hop's `mode` and its MTA-STS `policy`."""
    if mode == "none" or mode == "opportunistic" or mode == "verify":
        fixed: HostTls = mode
        same: tuple[tuple[str, HostTls], ...] = tuple((h, fixed) for h in hosts)
        return TlsPlan(same, (), mode)
    if policy is None:
        return TlsPlan(tuple((h, "opportunistic") for h in hosts), (), "opportunistic")
    if policy.mode == "none":
        return TlsPlan(tuple((h, "opportunistic") for h in hosts), (), "mta-sts-none")
    matching = [h for h in hosts if any(mx_matches(p, h) for p in policy.mx)]
    refused = tuple(h for h in hosts if h not in matching)
    if policy.mode == "enforce":
        return TlsPlan(tuple((h, "verify") for h in matching), refused, "mta-sts-enforce")
    # testing: every host as before, the matching ones verified first (reported, not enforced)
    plan: list[tuple[str, HostTls]] = [(h, "testing" if h in matching else "opportunistic") for h in hosts]
    return TlsPlan(tuple(plan), refused, "mta-sts-testing")
