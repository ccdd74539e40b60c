"""Pure request routing: host -> virtual host -> route -> destination, plus route actions.

Theory of operation
-------------------
The data path builds one :class:`RequestInfo` per request and calls, in order:

1. :func:`find_virtual_host` -- an exact dict lookup on the host (every alias is a key), then
   the wildcard table keyed by dot-suffix (``".b.c"``, ``".c"`` for ``a.b.c``, longest first),
   then the catch-all.  O(labels of the request host), never O(hosts in the table).
   When it finds nothing and iptables redirected the connection, :func:`host_for_address`
   names the ServiceEntry host whose ``addresses`` hold the original destination.
2. :func:`select_route` -- Istio ``http`` rules in order, first match wins; inside a rule the
   ``match`` entries are OR-ed and the first one that holds is returned (a prefix rewrite needs
   to know which prefix matched).  A rule without ``match`` matches everything.
3. :func:`pick_cluster` -- weighted destination pick with an injected ``rand`` in ``[0, 1)``.
4. :func:`rewritten_path` / :func:`redirect_response` / :func:`apply_header_ops` -- the
   route actions, with the semantics Istio gets from Envoy (details on each function).

Nothing here touches sockets, clocks or the ``random`` module: every input is an argument, so
each decision is reproducible in a unit test.  The per-request costs are kept to what a match
actually asks for: the query string is split off the path at most once and parsed only when a
match has ``queryParams`` (both cached in slots of the :class:`RequestInfo`), and a match with no
conditions of some kind costs one falsy test for that kind.

Istio -> behaviour notes (from Envoy's route / redirect code and Istio's API reference):

* ``uri`` is matched against the path without the query string; ``authority`` against the
  authority as received (Istio maps it to the ``:authority`` header, port included).
* ``withoutHeaders``: the request matches only if none of the listed conditions hold, so an
  absent header satisfies it.
* ``queryParams``: values are percent-decoded; the first occurrence of a repeated name counts
  (Envoy's ``getFirstValue``); ``{}`` means present.
* ``rewrite.uri`` becomes Envoy's ``prefix_rewrite``: the matched prefix is replaced; for exact
  and regex uri matches that is the whole path; a match without a ``uri`` condition is a
  prefix ``/`` match in Envoy, so ``/`` is what gets replaced.  The query string is kept.
* ``redirect.uri`` is Envoy's ``path_redirect``: the whole path is replaced "irrespective of
  the request URI being matched as an exact path or prefix" (Istio docs).  The request's query
  is kept unless the new uri carries its own.  A ``%PREFIX()%`` leading marker (what Istio
  generates for Gateway API ``ReplacePrefixMatch``) replaces only the matched prefix.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote

from meshproxy.config.model import (
    HeaderOps,
    Match,
    MatchKind,
    Redirect,
    Route,
    RouteTable,
    StringMatch,
    VirtualHost,
    WeightedCluster,
)

__all__ = [
    "DEFAULT_PORTS",
    "PREFIX_MARKER",
    "RequestInfo",
    "apply_header_ops",
    "default_port",
    "find_virtual_host",
    "host_for_address",
    "matches",
    "pick_cluster",
    "redirect_response",
    "rewritten_path",
    "select_route",
    "split_path",
    "string_match",
]

DEFAULT_PORTS: Mapping[str, int] = {"http": 80, "https": 443}
PREFIX_MARKER = "%PREFIX()%"  # Istio's marker for "replace the matched prefix" in redirect.uri


def default_port(scheme: str) -> int:
    """The port a URL of ``scheme`` has when it names none (80 for anything but https)."""
    return 443 if scheme == "https" else 80


def split_path(target: str) -> tuple[str, str]:
    """``"/a?x=1"`` -> ``("/a", "?x=1")``; the second part is ``""`` without a query."""
    q = target.find("?")
    if q < 0:
        return target, ""
    return target[:q], target[q:]


def _parse_query(query: str) -> dict[str, str]:
    """Query string (without ``?``) -> first value per name, percent-decoded."""
    out: dict[str, str] = {}
    for part in query.split("&"):
        if not part:
            continue
        eq = part.find("=")
        if eq < 0:
            name, value = part, ""
        else:
            name, value = part[:eq], part[eq + 1 :]
        if "%" in name:
            name = unquote(name)
        if "%" in value:
            value = unquote(value)
        if name not in out:
            out[name] = value
    return out


@dataclass(slots=True)
class RequestInfo:
    """What routing needs to know about one request; built once by the HTTP codec.

    ``uri`` (the path without the query) and ``query`` (parsed parameters) are computed on
    first use and cached in the object, so matching several rules costs one split / one parse.
    """

    method: str  # as received, e.g. "GET"
    path: str  # origin-form request target including the query: "/a/b?x=1"
    host: str  # authority host: lower-case, no port, no IPv6 brackets
    port: int | None  # port from the authority, None when absent
    scheme: str  # "http" or "https"
    headers: Mapping[str, str]  # lower-case names; repeated headers joined with ","
    authority: str  # Host / :authority exactly as received (with its port)
    _uri: str | None = field(default=None, repr=False, compare=False)
    _query: dict[str, str] | None = field(default=None, repr=False, compare=False)

    @property
    def uri(self) -> str:
        """The path without the query string (what Istio's ``uri`` match sees)."""
        u = self._uri
        if u is None:
            u = self._uri = split_path(self.path)[0]
        return u

    @property
    def query(self) -> dict[str, str]:
        """Query parameters (first value of each name, percent-decoded), parsed once."""
        q = self._query
        if q is None:
            raw = split_path(self.path)[1]
            q = self._query = _parse_query(raw[1:]) if raw else {}
        return q

    @property
    def effective_port(self) -> int:
        """The destination port: the authority's, else the scheme's default."""
        return self.port if self.port is not None else default_port(self.scheme)


# --------------------------------------------------------------------------- lookup


def find_virtual_host(table: RouteTable, host: str) -> VirtualHost | None:
    """The virtual host for ``host`` (lower-case, no port): exact name or alias first, then
    the longest matching ``*.suffix`` wildcard, then the catch-all (``"*"``), else None.

    Costs one dict lookup per dot in ``host``, whatever the size of the table.
    """
    vh = table.exact.get(host)
    if vh is not None:
        return vh
    wildcards = table.wildcards
    if wildcards:
        # From the first dot after position 0: a wildcard never matches an empty label
        # (Envoy: "*.foo.com" does not match ".foo.com").
        i = host.find(".", 1)
        while i >= 0:
            vh = wildcards.get(host[i:])
            if vh is not None:
                return vh
            i = host.find(".", i + 1)
    return table.catch_all


def host_for_address(table: RouteTable, ip: str, port: int) -> str | None:
    """The ServiceEntry host whose ``addresses`` hold ``ip`` and whose ports include ``port``,
    else None: where a connection iptables redirected to the outbound listener was going when
    its request's Host names no route (Envoy finds the service by the listener's VIP:port).

    ``ip`` is the original destination from ``SO_ORIGINAL_DST``, an argument like everything
    else here. A single address is one dict lookup; CIDR entries are scanned in order (a
    mesh has few), which the translation makes longest prefix first: the most specific range
    holding the address and port wins. A v4-mapped IPv6 address is looked up as its IPv4
    address."""
    if ip.startswith("::ffff:"):
        ip = ip[7:]
    ports = table.addresses.get(ip)
    if ports is not None:
        host = ports.get(port)
        if host is not None:
            return host
    ranges = table.address_ranges
    if ranges:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return None
        for net, by_port in ranges:
            if addr.version == net.version and addr in net:
                host = by_port.get(port)
                if host is not None:
                    return host
    return None


def select_route(vh: VirtualHost, req: RequestInfo) -> tuple[Route, Match | None] | None:
    """First route of ``vh`` whose matches accept ``req`` and the match that did (None for a
    route without matches); None when no route applies (the caller answers 404 NR)."""
    for route in vh.routes:
        ms = route.matches
        if not ms:
            return route, None
        for m in ms:
            if matches(m, req):
                return route, m
    return None


# --------------------------------------------------------------------------- matching


def string_match(sm: StringMatch, value: str | None) -> bool:
    """Istio ``StringMatch`` against ``value`` (None = absent: never matches, not even
    PRESENT).  REGEX is a full match; with ``ignore_case`` the input is lower-cased (the stored
    ``value`` already is)."""
    if value is None:
        return False
    kind = sm.kind
    if kind is MatchKind.PRESENT:
        return True
    if sm.ignore_case:
        value = value.lower()
    if kind is MatchKind.EXACT:
        return value == sm.value
    if kind is MatchKind.PREFIX:
        return value.startswith(sm.value)
    rx = sm.regex
    if rx is None:  # translation always compiles; tolerate hand-built objects
        rx = re.compile(sm.value, re.IGNORECASE if sm.ignore_case else 0)
    return rx.fullmatch(value) is not None


def matches(m: Match, req: RequestInfo) -> bool:
    """Istio ``HTTPMatchRequest``: every condition present in ``m`` holds (AND)."""
    if m.method is not None and not string_match(m.method, req.method):
        return False
    if m.port is not None:
        port = req.port if req.port is not None else default_port(req.scheme)
        if port != m.port:
            return False
    if m.scheme is not None and not string_match(m.scheme, req.scheme):
        return False
    if m.authority is not None and not string_match(m.authority, req.authority):
        return False
    if m.uri is not None and not string_match(m.uri, req.uri):
        return False
    if m.headers:
        hdrs = req.headers
        for name, sm in m.headers:
            if not string_match(sm, hdrs.get(name)):
                return False
    if m.without_headers:
        hdrs = req.headers
        for name, sm in m.without_headers:
            if string_match(sm, hdrs.get(name)):
                return False
    if m.query_params:
        q = req.query
        for name, sm in m.query_params:
            if not string_match(sm, q.get(name)):
                return False
    return True


# --------------------------------------------------------------------------- destinations


def pick_cluster(route: Route, rand: float, port: int | None) -> tuple[WeightedCluster, str]:
    """Weighted pick of one of ``route.clusters`` with ``rand`` in ``[0, 1)``.

    Destination ``i`` owns ``[sum(w[:i]), sum(w[:i+1]))`` of ``[0, total_weight)``, so a weight
    of 0 is never picked and the same ``rand`` always gives the same destination.  Returns the
    destination and its cluster name: ``by_port[port]`` when the destination named no port and
    the request's port is in its ``by_port`` map, else ``cluster``.  ``route.clusters`` must be
    non-empty (routes with another action have no clusters).
    """
    clusters = route.clusters
    if len(clusters) == 1:
        wc = clusters[0]
    else:
        total = route.total_weight or sum(c.weight for c in clusters)
        target = int(rand * total)
        if target >= total:  # rand == 1.0 or float rounding: stay in range
            target = total - 1
        acc = 0
        wc = clusters[-1]
        for c in clusters:
            acc += c.weight
            if target < acc:
                wc = c
                break
    if wc.port is None and port is not None and wc.by_port:
        name = wc.by_port.get(port)
        if name is not None:
            return wc, name
    return wc, wc.cluster


# --------------------------------------------------------------------------- actions


def _matched_prefix_len(match: Match | None, uri: str) -> int:
    """How many leading characters of ``uri`` Envoy's ``prefix_rewrite`` replaces: the prefix
    for a prefix match, the whole path for exact / regex, ``"/"`` when there is no uri match
    (Istio turns a match without ``uri`` into Envoy's ``prefix: /``)."""
    sm = match.uri if match is not None else None
    if sm is None or sm.kind is MatchKind.PRESENT:
        return 1 if uri.startswith("/") else 0
    if sm.kind is MatchKind.PREFIX:
        return len(sm.value)
    return len(uri)


def rewritten_path(route: Route, match: Match | None, path: str) -> str | None:
    """The upstream request target after ``route.rewrite``, or None when it rewrites no uri.

    ``uri_regex`` + ``uri_regex_sub``: every match in the path (query excluded) is substituted
    (Envoy's ``regex_rewrite`` = RE2 ``GlobalReplace``).  ``uri``: the matched prefix is replaced
    (see :func:`_matched_prefix_len`).  The query string is preserved either way.
    """
    rw = route.rewrite
    if rw is None:
        return None
    if rw.uri_regex is not None and rw.uri_regex_sub is not None:
        uri, query = split_path(path)
        return rw.uri_regex.sub(rw.uri_regex_sub, uri) + query
    if rw.uri is None:
        return None
    uri, query = split_path(path)
    return rw.uri + uri[_matched_prefix_len(match, uri) :] + query


def _host_without_port(authority: str) -> tuple[str, str]:
    """``"a:80"`` -> ``("a", ":80")``, ``"[::1]:8080"`` -> ``("[::1]", ":8080")``; the port
    part is ``""`` when there is none."""
    if authority.startswith("["):
        end = authority.rfind("]:")
        if end < 0:
            return authority, ""
        return authority[: end + 1], authority[end + 1 :]
    colon = authority.rfind(":")
    if colon < 0:
        return authority, ""
    return authority[:colon], authority[colon:]


def redirect_response(redirect: Redirect, req: RequestInfo, match: Match | None) -> tuple[int, str]:
    """``(status, Location)`` for an Istio ``HTTPRedirect``, built as Envoy's ``newUri`` does.

    * scheme: ``redirect.scheme`` or the request's.
    * port: ``redirect.port`` -> ``:port``; ``FROM_REQUEST_PORT`` -> the request's port (Istio
      sets Envoy's ``port_redirect`` to the port the request came in on);
      ``FROM_PROTOCOL_DEFAULT`` -> no port in the URL (the protocol's default).
    * host: ``redirect.authority`` verbatim, else the request authority, whose port is dropped
      when a port was chosen above or when the scheme changes and the port was the default of
      the request's scheme (``http://a:80`` -> ``https://a``), as Envoy's
      ``processRequestHost`` does.
    * path: ``redirect.uri`` replaces the whole path (``%PREFIX()%/x`` replaces only the
      matched prefix); the request's query is kept unless the new uri has one.
    """
    scheme = redirect.scheme or req.scheme
    new_port = ""
    drop_port = False
    if redirect.port is not None:
        new_port = f":{redirect.port}"
    elif redirect.derive_port == "FROM_REQUEST_PORT":
        new_port = f":{req.port if req.port is not None else default_port(req.scheme)}"
    elif redirect.derive_port == "FROM_PROTOCOL_DEFAULT":
        drop_port = True

    if redirect.authority:
        host = redirect.authority
        if new_port or drop_port:
            host = _host_without_port(host)[0]
    else:
        host, old_port = _host_without_port(req.authority)
        if old_port and not (new_port or drop_port):
            keep = True
            if scheme != req.scheme:
                if req.scheme == "https" and old_port == ":443":
                    keep = False
                elif req.scheme == "http" and old_port == ":80":
                    keep = False
            if keep:
                host += old_port

    uri, query = split_path(req.path)
    ruri = redirect.uri
    if ruri:
        if ruri.startswith(PREFIX_MARKER):
            replacement = ruri[len(PREFIX_MARKER) :]
            new_uri, new_query = split_path(replacement)
            new_uri += uri[_matched_prefix_len(match, uri) :]
        else:
            new_uri, new_query = split_path(ruri)
        if new_query:
            query = new_query
        uri = new_uri
    if not uri.startswith("/"):
        uri = "/" + uri
    return redirect.code, f"{scheme}://{host}{new_port}{uri}{query}"


def apply_header_ops(headers: list[tuple[str, str]], ops: HeaderOps) -> list[tuple[str, str]]:
    """Apply Istio header operations to ``headers`` and return the new list (``headers``
    itself, untouched, when ``ops`` is empty).

    Order is Envoy's: ``remove`` first (Envoy evaluates ``headers_to_remove`` before
    ``headers_to_add`` so that remove-then-add works as users expect), then ``set`` (replace
    every value of the name, or add it), then ``add`` (append another value).  Names compare
    case-insensitively; names written by ``set`` / ``add`` are kept as configured (lower-case
    by the snapshot's convention).
    """
    if ops.empty:
        return headers
    drop: set[str] = set()
    for name in ops.remove:
        drop.add(name.lower())
    set_names: dict[str, str] = {}
    for name, value in ops.set:
        set_names[name.lower()] = value  # the last `set` of a name wins
    drop.update(set_names)
    out = [(n, v) for n, v in headers if n.lower() not in drop] if drop else list(headers)
    if set_names:
        seen: set[str] = set()
        for name, _ in ops.set:
            key = name.lower()
            if key not in seen:
                seen.add(key)
                out.append((name, set_names[key]))
    for name, value in ops.add:
        out.append((name, value))
    return out
