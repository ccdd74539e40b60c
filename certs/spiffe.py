"""SPIFFE ids and durations: pure parsing and validation, no I/O.

Theory of operation
-------------------
A mesh workload identity is Istio's SPIFFE id ``spiffe://<trust-domain>/ns/<ns>/sa/<sa>``.
:func:`parse_spiffe_id` turns text into a frozen :class:`SpiffeId` or raises
:class:`CAError` with a one-line message naming what is wrong (scheme, trust domain, path
shape, a bad character); given ``trust_domain`` it also refuses an id of another trust domain.
Character rules follow the SPIFFE-ID specification: a trust domain is lowercase letters,
digits, ``.``, ``-`` and ``_``; a path segment is letters, digits, ``.``, ``-`` and ``_`` and
is never ``.`` or ``..``.

:func:`parse_duration` reads Go-style durations as Istio's tooling writes them (``24h``,
``90m``, ``3600s``, ``1h30m``, ``7d``) into a :class:`datetime.timedelta`; a TTL must be
positive. :class:`CAError` lives here (the lowest module of the package) so every part of
``certs`` raises the same error type.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta

SPIFFE_SCHEME = "spiffe://"
DEFAULT_TRUST_DOMAIN = "cluster.local"
MAX_TRUST_DOMAIN_LEN = 255
MAX_SPIFFE_ID_LEN = 2048

_TRUST_DOMAIN_RE = re.compile(r"[a-z0-9._-]+")
_SEGMENT_RE = re.compile(r"[A-Za-z0-9._-]+")
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class CAError(Exception):
    """A user-facing certificate-authority problem; ``str(e)`` is one line, no traceback."""


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """``spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>``."""

    trust_domain: str
    namespace: str
    service_account: str

    @property
    def uri(self) -> str:
        return f"{SPIFFE_SCHEME}{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def __str__(self) -> str:
        return self.uri


def check_trust_domain(trust_domain: str) -> str:
    """Return ``trust_domain`` if it is a valid SPIFFE trust domain, else raise CAError."""
    if not trust_domain:
        raise CAError("trust domain is empty")
    if len(trust_domain) > MAX_TRUST_DOMAIN_LEN:
        raise CAError(f"trust domain is longer than {MAX_TRUST_DOMAIN_LEN} characters")
    if not _TRUST_DOMAIN_RE.fullmatch(trust_domain):
        raise CAError(
            f"trust domain {trust_domain!r}: only lowercase letters, digits, '.', '-' and '_' "
            "are allowed"
        )
    return trust_domain


def check_segment(what: str, value: str) -> str:
    """Validate one path segment (a namespace or service account name)."""
    if not value:
        raise CAError(f"{what} is empty")
    if value in (".", ".."):
        raise CAError(f"{what} {value!r} is not allowed")
    if not _SEGMENT_RE.fullmatch(value):
        raise CAError(f"{what} {value!r}: only letters, digits, '.', '-' and '_' are allowed")
    return value


def make_spiffe_id(trust_domain: str, namespace: str, service_account: str) -> SpiffeId:
    """Build a validated :class:`SpiffeId` from its parts."""
    return SpiffeId(
        check_trust_domain(trust_domain),
        check_segment("namespace", namespace),
        check_segment("service account", service_account),
    )


def parse_spiffe_id(text: str, trust_domain: str | None = None) -> SpiffeId:
    """Parse an Istio workload SPIFFE id; with ``trust_domain``, also require that one."""
    shown = text if len(text) <= 120 else text[:117] + "..."
    if len(text) > MAX_SPIFFE_ID_LEN:
        raise CAError(f"SPIFFE id {shown!r} is longer than {MAX_SPIFFE_ID_LEN} characters")
    scheme, sep, rest = text.partition("://")
    if not sep or scheme.lower() != "spiffe":
        raise CAError(
            f"SPIFFE id {shown!r}: must start with spiffe:// "
            "(e.g. spiffe://cluster.local/ns/default/sa/reviews)"
        )
    if scheme != "spiffe":
        raise CAError(f"SPIFFE id {shown!r}: the scheme must be lowercase 'spiffe'")
    if any(c in rest for c in "?#@%"):
        raise CAError(f"SPIFFE id {shown!r}: no query, fragment, user info or %-escapes allowed")
    td, slash, path = rest.partition("/")
    if ":" in td:
        raise CAError(f"SPIFFE id {shown!r}: the trust domain cannot carry a port")
    try:
        check_trust_domain(td)
    except CAError as e:
        raise CAError(f"SPIFFE id {shown!r}: {e}") from None
    parts = path.split("/") if slash else []
    if len(parts) != 4 or parts[0] != "ns" or parts[2] != "sa":
        raise CAError(f"SPIFFE id {shown!r}: the path must be /ns/<namespace>/sa/<service-account>")
    try:
        sid = make_spiffe_id(td, parts[1], parts[3])
    except CAError as e:
        raise CAError(f"SPIFFE id {shown!r}: {e}") from None
    if trust_domain is not None and td != trust_domain:
        raise CAError(
            f"SPIFFE id {shown!r}: trust domain {td!r} is not this CA's ({trust_domain!r})"
        )
    return sid


def parse_duration(text: str, what: str = "TTL") -> timedelta:
    """``24h``, ``90m``, ``3600s``, ``1h30m``, ``7d``, ``500ms`` -> a positive timedelta.

    A bare number is refused: the unit is required so ``--ttl 24`` is never read as seconds.
    """
    s = text.strip()
    if not s:
        raise CAError(f"{what} is empty: expected e.g. 24h, 90m or 3600s")
    if s.startswith("-"):
        raise CAError(f"{what} {text!r} is negative: it must be greater than zero")
    pos = 0
    total = 0.0
    for m in _DURATION_PART_RE.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    if pos == 0 or pos != len(s):
        raise CAError(f"{what} {text!r}: expected a duration such as 24h, 90m, 3600s or 1h30m")
    if total <= 0:
        raise CAError(f"{what} {text!r} is zero: it must be greater than zero")
    try:
        return timedelta(seconds=total)
    except OverflowError:
        raise CAError(f"{what} {text!r} is too long") from None


def format_duration(td: timedelta) -> str:
    """A short human form (``24h``, ``1h30m``, ``45s``) for messages."""
    secs = int(td.total_seconds())
    if secs <= 0:
        return f"{td.total_seconds():g}s"
    out = []
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if secs >= n:
            out.append(f"{secs // n}{unit}")
            secs %= n
    return "".join(out)
