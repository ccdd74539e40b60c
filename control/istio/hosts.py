"""Host names as Istio understands them: expansion, aliases, wildcard matching, syntax checks.

Theory of operation
-------------------
Istio interprets a short name (no dot) relative to the namespace of the resource that uses it:
``reviews`` in namespace ``default`` is ``reviews.default.svc.cluster.local``. Names with a dot
are taken as written; everything is lower-cased. A Kubernetes-style FQDN
``name.ns.svc.cluster.local`` is also reachable as ``name.ns.svc``, ``name.ns`` and ``name``
(:func:`aliases`). ``*.example.com`` matches any name ending in ``.example.com``; ``*`` matches
everything (:func:`wildcard_matches`).

The syntax checks return an error message (Istio's wording) or None; they never raise. The
costlier ones are memoized (pure functions of a string; a big config repeats addresses and
domains endlessly).
"""

from __future__ import annotations

import functools
import ipaddress
import re

CLUSTER_SUFFIX = ".svc.cluster.local"

_DNS1123_LABEL = re.compile(r"^[a-zA-Z0-9](?:[-a-zA-Z0-9]*[a-zA-Z0-9])?$")
_WILDCARD_LABEL = re.compile(r"^(?:\*|(?:\*|\*-)?[a-zA-Z0-9](?:[-a-zA-Z0-9]*[a-zA-Z0-9])?)$")
_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*$"
)


def expand(host: str, namespace: str) -> str:
    """The FQDN for ``host`` used in a resource of ``namespace`` (lower-case)."""
    h = host.strip().lower()
    if h == "*" or "." in h:
        return h
    return f"{h}.{namespace}{CLUSTER_SUFFIX}"


def aliases(fqdn: str) -> tuple[str, ...]:
    """Other names of a ``name.ns.svc.cluster.local`` host (shortest last); () for others."""
    if not fqdn.endswith(CLUSTER_SUFFIX):
        return ()
    parts = fqdn.split(".")
    if len(parts) != 5 or parts[0] == "*":
        return ()
    name, ns = parts[0], parts[1]
    return (f"{name}.{ns}.svc", f"{name}.{ns}", name)


def namespace_of(fqdn: str) -> str | None:
    """``ns`` of ``name.ns.svc.cluster.local``, else None."""
    if fqdn.endswith(CLUSTER_SUFFIX):
        parts = fqdn.split(".")
        if len(parts) == 5:
            return parts[1]
    return None


def wildcard_matches(pattern: str, host: str) -> bool:
    """True when wildcard (or exact) host ``pattern`` covers ``host``."""
    if pattern == "*":
        return True
    if pattern.startswith("*"):
        return host.endswith(pattern[1:]) and host != pattern[1:].lstrip(".")
    return pattern == host


def hosts_overlap(a: str, b: str) -> bool:
    """Istio's ``host.Name.Matches``: either name covers the other."""
    return a == b or wildcard_matches(a, b) or wildcard_matches(b, a)


def is_dns1123_label(value: str) -> bool:
    return len(value) <= 63 and _DNS1123_LABEL.match(value) is not None


def is_subdomain(value: str) -> bool:
    """Kubernetes object-name syntax (lower-case RFC 1123 subdomain)."""
    return len(value) <= 253 and _DNS1123_SUBDOMAIN.match(value) is not None


@functools.lru_cache(maxsize=65536)
def is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


@functools.lru_cache(maxsize=65536)
def check_ip_subnet(value: str) -> str | None:
    """An IP or CIDR, else the error."""
    try:
        if "/" in value:
            ipaddress.ip_network(value, strict=False)
        else:
            ipaddress.ip_address(value)
    except ValueError:
        return f"{value!r} is not a valid IP address or CIDR range"
    return None


def _preconditions(name: str) -> str | None:
    if len(name) > 255:
        return f"domain name {name!r} too long (max 255)"
    if not name:
        return "empty domain name not allowed"
    return None


def _labels(domain: str, shown: str = "") -> str | None:
    parts = domain.split(".")
    domain = shown or domain
    if parts[-1].isdigit():
        return (
            f"domain name {domain!r} invalid (top level domain {parts[-1]!r} cannot be all-numeric)"
        )
    for i, label in enumerate(parts):
        if i == len(parts) - 1 and label == "":
            return None  # trailing dot
        if not is_dns1123_label(label):
            return f"domain name {domain!r} invalid (label {label!r} invalid)"
    return None


@functools.lru_cache(maxsize=65536)
def check_fqdn(name: str) -> str | None:
    """Istio ``ValidateFQDN``."""
    return _preconditions(name) or _labels(name)


@functools.lru_cache(maxsize=65536)
def check_wildcard_domain(name: str) -> str | None:
    """Istio ``ValidateWildcardDomain``: a wildcard only as (or at the start of) the first label."""
    err = _preconditions(name)
    if err:
        return err
    first, _, rest = name.partition(".")
    if len(first) > 63 or not _WILDCARD_LABEL.match(first):
        return f"domain name {name!r} invalid (label {first!r} invalid)"
    if rest:
        return _labels(rest, name)
    return None


def is_partial_wildcard(name: str) -> bool:
    """``*foo.com`` style (Istio warns: only ``*.`` prefixes are wildcards)."""
    return name.startswith("*") and name != "*" and not name.startswith("*.")
