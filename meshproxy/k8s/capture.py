"""Transparent capture, the pure core: options -> the redirect rules istio-iptables installs.

Theory of operation
-------------------
An injected pod's init container runs ``meshproxy capture``; from then on, in the pod's network
namespace, the nat table sends

* **outbound** TCP (``OUTPUT`` -> ``ISTIO_OUTPUT`` -> ``ISTIO_REDIRECT``) to the sidecar's outbound
  listener (``--proxy-port``, 15001), except: the proxy's own traffic (``--proxy-uid`` /
  ``--proxy-gid``, 1337: without this every upstream connection would loop back into the
  proxy), loopback destinations (container-to-container calls over ``127.0.0.1``), the
  ``--exclude-outbound-ports`` and ``--exclude-outbound-cidrs``, and anything outside
  ``--include-outbound-cidrs`` (``*`` = everything);
* **inbound** TCP (``PREROUTING`` -> ``ISTIO_INBOUND`` -> ``ISTIO_IN_REDIRECT``) to the inbound
  listener (``--inbound-port``, 15006), for the ``--include-inbound-ports`` (``*`` = every port)
  except the sidecar's own ports 15090 (Prometheus), 15021 (health) and 15020 (merged metrics;
  Istio's injection template passes these three with ``-d``) and ``--exclude-inbound-ports``.
  The admin port 15000 and the outbound port 15001 are captured like any other port (Istio
  excludes neither): a peer's connection to the pod IP's 15000 is redirected to the inbound
  listener with original port 15000, and forwarding it to ``127.0.0.1:15000`` would expose
  the admin API. The inbound listener therefore closes (and counts) every redirected
  connection whose original port is one of the proxy's own (Istio's reserved ports and every
  port the process listens on), as Istio's localhost-bound listeners are unreachable from
  the pod IP and its 15006 is blackholed (meshproxy/inbound.py).

The chains, rules and their order are istio-iptables' (``tools/istio-iptables/pkg/capture``,
REDIRECT mode, DNS capture off), including its special cases:

* ``-o lo -s 127.0.0.6/32 -j RETURN``: Envoy's inbound passthrough binds 127.0.0.6;
* ``-o lo ! -d 127.0.0.1/32 ... --uid-owner 1337 -j ISTIO_IN_REDIRECT``: the proxy calling its
  own pod through a service VIP (app -> sidecar outbound -> own pod IP over ``lo``) enters
  through the inbound listener, as a call from another pod would;
* ``-o lo -m owner ! --uid-owner 1337 -j RETURN``: the application calling its own pod IP
  stays direct (skipped when ``--include-outbound-cidrs`` names a loopback range, as Istio does);
* ``ISTIO_INBOUND ... --dport 15008 -j RETURN``: Istio's HBONE tunnel port is never captured.

:func:`capture_rules` renders one family's rules as ``iptables-restore`` input (applied with
``--noflush``: a chain declaration line empties our chain if it already exists, other chains
are untouched). :func:`clean_rules` reads ``iptables-save -t nat`` output and renders the
restore input that deletes exactly our jump rules (``-j ISTIO_*`` in other chains) and then our
four chains; with nothing of ours present it returns None, so cleaning twice is a no-op, and
capture = clean + install makes capturing twice equal to capturing once. Everything here is
a pure function of its arguments (no subprocess, no kernel): ``meshproxy.k8s.capture_cli`` is
the edge that runs the binaries.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "CHAINS",
    "SIDECAR_INBOUND_PORTS",
    "CaptureError",
    "CaptureOptions",
    "capture_rules",
    "clean_rules",
    "parse_options",
]

ISTIO_INBOUND = "ISTIO_INBOUND"
ISTIO_REDIRECT = "ISTIO_REDIRECT"
ISTIO_IN_REDIRECT = "ISTIO_IN_REDIRECT"
ISTIO_OUTPUT = "ISTIO_OUTPUT"
CHAINS = (ISTIO_INBOUND, ISTIO_REDIRECT, ISTIO_IN_REDIRECT, ISTIO_OUTPUT)
# the sidecar's own inbound ports: Prometheus 15090, health 15021, merged metrics 15020
SIDECAR_INBOUND_PORTS = (15090, 15021, 15020)
TUNNEL_PORT = 15008  # Istio's HBONE port: istio-iptables always leaves it alone
INBOUND_PASSTHROUGH_V4 = "127.0.0.6/32"
INBOUND_PASSTHROUGH_V6 = "::6/128"
LOOPBACK_V4 = "127.0.0.1/32"
LOOPBACK_V6 = "::1/128"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class CaptureError(ValueError):
    """A bad option value; ``flag`` names the command-line flag."""

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(f"{flag}: {message}")
        self.flag = flag


@dataclass(frozen=True, slots=True)
class CaptureOptions:
    """What to capture; the defaults are Istio's sidecar defaults.

    ``include_outbound_cidrs`` / ``include_inbound_ports`` None means ``*`` (everything); an
    empty tuple means nothing (Istio: an empty include list captures no outbound / inbound).
    """

    proxy_port: int = 15001
    inbound_port: int = 15006
    proxy_uids: tuple[int, ...] = (1337,)
    proxy_gids: tuple[int, ...] = (1337,)
    include_outbound_cidrs: tuple[Network, ...] | None = None
    exclude_outbound_cidrs: tuple[Network, ...] = ()
    include_inbound_ports: tuple[int, ...] | None = None
    exclude_inbound_ports: tuple[int, ...] = ()
    exclude_outbound_ports: tuple[int, ...] = ()


# --------------------------------------------------------------------------- parsing


def _items(value: str) -> list[str]:
    return [p.strip() for p in value.split(",") if p.strip()]


def _port(flag: str, text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise CaptureError(flag, f"{text!r} is not a port (1-65535)")
    return int(text)


def _ports(flag: str, value: str) -> tuple[int, ...]:
    out: list[int] = []
    for item in _items(value):
        p = _port(flag, item)
        if p not in out:
            out.append(p)
    return tuple(out)


def _ids(flag: str, value: str) -> tuple[int, ...]:
    items = _items(value)
    if not items:
        raise CaptureError(flag, "needs at least one numeric id")
    out: list[int] = []
    for item in items:
        if not item.isdigit() or int(item) > 2**32 - 2:
            raise CaptureError(flag, f"{item!r} is not a numeric id")
        if int(item) not in out:
            out.append(int(item))
    return tuple(out)


def _cidrs(flag: str, value: str) -> tuple[Network, ...]:
    out: list[Network] = []
    for item in _items(value):
        if item == "*":
            raise CaptureError(flag, "'*' must be the whole value, not a list item")
        try:
            net = ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise CaptureError(flag, f"{item!r} is not an IP address or CIDR") from None
        if net not in out:
            out.append(net)
    return tuple(out)


def parse_options(
    *,
    proxy_port: str = "15001",
    inbound_port: str = "15006",
    proxy_uid: str = "1337",
    proxy_gid: str = "1337",
    include_outbound_cidrs: str = "*",
    exclude_outbound_cidrs: str = "",
    include_inbound_ports: str = "*",
    exclude_inbound_ports: str = "",
    exclude_outbound_ports: str = "",
) -> CaptureOptions:
    """The flags' text values -> :class:`CaptureOptions`; :class:`CaptureError` names the flag
    of the first bad value. Lists are comma-separated, as istio-iptables takes them."""
    inc_cidrs = include_outbound_cidrs.strip()
    inc_ports = include_inbound_ports.strip()
    if exclude_outbound_cidrs.strip() == "*":
        raise CaptureError("--exclude-outbound-cidrs", "'*' is not allowed (exclude everything?)")
    if exclude_inbound_ports.strip() == "*":
        raise CaptureError("--exclude-inbound-ports", "'*' is not allowed")
    opts = CaptureOptions(
        proxy_port=_port("--proxy-port", proxy_port.strip()),
        inbound_port=_port("--inbound-port", inbound_port.strip()),
        proxy_uids=_ids("--proxy-uid", proxy_uid),
        proxy_gids=_ids("--proxy-gid", proxy_gid),
        include_outbound_cidrs=None
        if inc_cidrs == "*"
        else _cidrs("--include-outbound-cidrs", inc_cidrs),
        exclude_outbound_cidrs=_cidrs("--exclude-outbound-cidrs", exclude_outbound_cidrs),
        include_inbound_ports=None
        if inc_ports == "*"
        else _ports("--include-inbound-ports", inc_ports),
        exclude_inbound_ports=_ports("--exclude-inbound-ports", exclude_inbound_ports),
        exclude_outbound_ports=_ports("--exclude-outbound-ports", exclude_outbound_ports),
    )
    if opts.proxy_port == opts.inbound_port:
        raise CaptureError("--inbound-port", "must differ from --proxy-port")
    return opts


# --------------------------------------------------------------------------- rules


def _family(nets: Iterable[Network], ipv6: bool) -> list[Network]:
    want = 6 if ipv6 else 4
    return [n for n in nets if n.version == want]


def _has_loopback(nets: Iterable[Network]) -> bool:
    return any(n.network_address.is_loopback for n in nets)


def capture_rules(opts: CaptureOptions, *, ipv6: bool = False) -> str:
    """The ``iptables-restore`` (``ip6tables-restore`` with ``ipv6``) input installing the
    capture, in istio-iptables' order; apply with ``--noflush``."""
    passthrough = INBOUND_PASSTHROUGH_V6 if ipv6 else INBOUND_PASSTHROUGH_V4
    loopback = LOOPBACK_V6 if ipv6 else LOOPBACK_V4
    rules: list[str] = [
        f"-A {ISTIO_INBOUND} -p tcp --dport {TUNNEL_PORT} -j RETURN",
        f"-A {ISTIO_REDIRECT} -p tcp -j REDIRECT --to-ports {opts.proxy_port}",
        f"-A {ISTIO_IN_REDIRECT} -p tcp -j REDIRECT --to-ports {opts.inbound_port}",
    ]
    # inbound
    inc_ports = opts.include_inbound_ports
    if inc_ports is None or inc_ports:
        rules.append(f"-A PREROUTING -p tcp -j {ISTIO_INBOUND}")
        if inc_ports is None:
            excluded = list(SIDECAR_INBOUND_PORTS)
            excluded += [p for p in opts.exclude_inbound_ports if p not in excluded]
            for p in excluded:
                rules.append(f"-A {ISTIO_INBOUND} -p tcp --dport {p} -j RETURN")
            rules.append(f"-A {ISTIO_INBOUND} -p tcp -j {ISTIO_IN_REDIRECT}")
        else:
            for p in inc_ports:
                rules.append(f"-A {ISTIO_INBOUND} -p tcp --dport {p} -j {ISTIO_IN_REDIRECT}")
    # outbound
    rules.append(f"-A OUTPUT -p tcp -j {ISTIO_OUTPUT}")
    for p in opts.exclude_outbound_ports:
        rules.append(f"-A {ISTIO_OUTPUT} -p tcp --dport {p} -j RETURN")
    rules.append(f"-A {ISTIO_OUTPUT} -o lo -s {passthrough} -j RETURN")
    include = opts.include_outbound_cidrs
    loopback_included = include is not None and _has_loopback(include)
    for kind, ids in (("uid", opts.proxy_uids), ("gid", opts.proxy_gids)):
        for i in ids:
            # the proxy calling its own pod IP over lo: in through the inbound listener
            rules.append(
                f"-A {ISTIO_OUTPUT} -o lo ! -d {loopback} -p tcp ! --dport {TUNNEL_PORT} "
                f"-m owner --{kind}-owner {i} -j {ISTIO_IN_REDIRECT}"
            )
            if not loopback_included:  # the app calling its own pod IP: direct
                rules.append(f"-A {ISTIO_OUTPUT} -o lo -m owner ! --{kind}-owner {i} -j RETURN")
            rules.append(f"-A {ISTIO_OUTPUT} -m owner --{kind}-owner {i} -j RETURN")
    rules.append(f"-A {ISTIO_OUTPUT} -d {loopback} -j RETURN")
    for net in _family(opts.exclude_outbound_cidrs, ipv6):
        rules.append(f"-A {ISTIO_OUTPUT} -d {net} -j RETURN")
    if include is None:
        rules.append(f"-A {ISTIO_OUTPUT} -j {ISTIO_REDIRECT}")
    else:
        for net in _family(include, ipv6):
            rules.append(f"-A {ISTIO_OUTPUT} -d {net} -j {ISTIO_REDIRECT}")
    head = ["*nat", *(f":{c} - [0:0]" for c in CHAINS)]
    return "\n".join([*head, *rules, "COMMIT", ""])


def _saved_nat(saved: str) -> list[str]:
    """The lines of the ``*nat`` table in ``iptables-save`` output (between ``*nat`` and its
    ``COMMIT``)."""
    out: list[str] = []
    inside = False
    for raw in saved.splitlines():
        line = raw.strip()
        if line.startswith("*"):
            inside = line == "*nat"
            continue
        if inside:
            if line == "COMMIT":
                inside = False
                continue
            out.append(line)
    return out


def _jump_target(words: Sequence[str]) -> str | None:
    for i, w in enumerate(words[:-1]):
        if w in ("-j", "--jump", "-g", "--goto"):
            return words[i + 1]
    return None


def clean_rules(saved: str) -> str | None:
    """The ``iptables-restore --noflush`` input removing exactly our capture from the nat table
    shown in ``saved`` (``iptables-save -t nat`` output): every rule of another chain that jumps
    to one of :data:`CHAINS`, then those chains (flushed, then deleted). None when ``saved``
    holds nothing of ours."""
    ours = set(CHAINS)
    present: list[str] = []
    deletes: list[str] = []
    for line in _saved_nat(saved):
        if line.startswith(":"):
            name = line[1:].split(None, 1)[0]
            if name in ours:
                present.append(name)
            continue
        if not line.startswith("-A "):
            continue
        words = line.split()
        if len(words) < 2 or words[1] in ours:
            continue
        if _jump_target(words) in ours:
            deletes.append("-D " + line[3:])
    if not present and not deletes:
        return None
    ordered = [c for c in CHAINS if c in present]
    lines = ["*nat", *deletes]
    lines += [f"-F {c}" for c in ordered]
    lines += [f"-X {c}" for c in ordered]
    return "\n".join([*lines, "COMMIT", ""])
