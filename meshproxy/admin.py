"""The admin HTTP API: readiness, config dump, clusters, stats, drain, quit.

Theory of operation
-------------------
:class:`Admin` only speaks HTTP; what the answers contain comes from an :class:`AdminBackend`:
:class:`meshproxy.app.Proxy` in a single process, :class:`meshproxy.workers.Supervisor` with
``--workers N`` (which fetches from its workers' private admin ports with :func:`fetch` and
merges). Endpoints:

* ``GET /ready`` -> 200 once listeners are up and a config is applied, 503 before and while
  draining or stopping; ``GET /healthz/ready`` is the same (pilot-agent's path; ``run
  --health`` serves it alone on its own port, ``--metrics`` ``/stats/prometheus``, see
  :mod:`meshproxy.lifecycle`).
* ``GET /config_dump`` -> JSON: ``version``, ``last_error``, listeners, virtual hosts with their
  routes and clusters, each with the Istio resource it came from (see :func:`snapshot_dump`);
  ``?resource=``, ``?name_regex=``, ``?host=``, ``?version_only=1`` narrow it (:class:`DumpQuery`).
* ``GET /clusters`` -> the data plane's live cluster view.
* ``GET /stats/prometheus`` -> Prometheus text; ``GET /stats`` -> the same samples without
  comments, or the raw mergeable export with ``?format=json`` (used by the supervisor).
* ``POST /drain`` -> 200 and a graceful drain starts; ``POST /quitquitquit`` -> 200, then drain
  and exit 0.

The server is the project's own: one :class:`_AdminConnection` (``asyncio.Protocol`` +
``httptools``) per client, one request per connection (the answer carries
``Connection: close``), the head bounded in size and read under a deadline, the body of a POST
read and ignored (bounded too). ``GET`` routes answer ``HEAD``; a known path with another
method is ``405`` with ``Allow``; an unknown path ``404``. It replaces aiohttp, whose import
alone cost every worker process ~14 MiB of RSS; ``prometheus_client`` (for its content-type
constant) is imported at the first scrape only.

The config dump at scale
------------------------
A 10,000-host / 50,000-route snapshot must dump in a couple of seconds without stalling the data
plane, which shares this process (and the GIL) with the admin. So:

* :func:`to_jsonable` writes the frozen config dataclasses generically but compactly: a field
  equal to its model default is left out (a reader restores it from the model), a field without
  a default is always written; small policy objects the translation shares between routes are
  converted once per dump (a bounded memo keyed by identity).
* :func:`snapshot_dump` is cheap: the big sections are :class:`Section` objects that yield JSON
  text one route / endpoint at a time (:func:`dump_pieces`), and the connection streams them
  (:meth:`_AdminConnection._stream`): it encodes on the loop for ``STREAM_SLICE`` (2 ms), writes,
  and yields the loop, pausing while the client does not read. No thread, so no GIL convoy
  against the data path; the longest hold of the loop is one slice plus one piece.
* A dump that a ``--workers`` supervisor got from a worker is plain JSON data; the same filters
  apply to it (:func:`_plain_pieces`).
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import enum
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlsplit

import httptools

from meshproxy.config.model import (
    Cluster,
    Endpoint,
    Meta,
    Route,
    Snapshot,
    StringMatch,
    VirtualHost,
)
from meshproxy.core.routing import find_virtual_host
from meshproxy.metrics import Export, render
from meshproxy.net.listen import strip_brackets

log = logging.getLogger("meshproxy.admin")

ADMIN_HEAD_TIMEOUT = 10.0  # seconds to receive a whole admin request
ADMIN_MAX_HEAD = 64 * 1024  # request line + headers
ADMIN_MAX_BODY = 1024 * 1024  # admin POSTs carry no body; anything beyond this is refused
STREAM_SLICE = 0.002  # seconds of encoding between two returns to the event loop
STREAM_CHUNK = 256 * 1024  # bytes of a streamed answer written at once (at most, roughly)
STREAM_HIGH_WATER = 1024 * 1024  # bytes queued in the transport before encoding pauses
STREAM_WRITE_TIMEOUT = 30.0  # seconds a streamed answer may wait for a client that reads nothing
JSON_TYPE = "application/json; charset=utf-8"
TEXT_TYPE = "text/plain; charset=utf-8"


@dataclasses.dataclass(frozen=True, slots=True)
class AdminRequest:
    method: str
    path: str
    query: Mapping[str, str]


@dataclasses.dataclass(frozen=True, slots=True)
class AdminResponse:
    status: int
    body: bytes = b""
    content_type: str = TEXT_TYPE
    headers: tuple[tuple[str, str], ...] = ()
    # A streamed answer: text pieces produced on the loop a slice at a time (``body`` unused);
    # see ``_AdminConnection._stream``.
    pieces: Iterator[str] | None = None

    @classmethod
    def text(cls, text: str, status: int = 200) -> AdminResponse:
        return cls(status, text.encode())

    @classmethod
    def json(cls, data: Any, status: int = 200) -> AdminResponse:
        return cls(status, _dumps(data).encode(), JSON_TYPE)


Handler = Callable[[AdminRequest], Awaitable[AdminResponse]]


class AdminBackend(Protocol):
    """What the admin endpoints ask; implemented by the single process and the supervisor."""

    async def is_ready(self) -> bool: ...
    async def config_dump(self, query: Mapping[str, str] | None = None) -> dict[str, Any]:
        """The dump; ``query`` (the request's /config_dump parameters) is a hint a backend
        may use to fetch less (the supervisor forwards it to its worker); the admin applies
        the filters to whatever comes back."""
        ...

    async def clusters(self) -> dict[str, Any]: ...
    async def stats_export(self) -> Export: ...
    async def drain(self) -> None: ...
    def request_quit(self) -> None: ...


# --------------------------------------------------------------------------- config dump

_REQUIRED: Any = object()  # marks a field without a default: always written
_ALWAYS_WRITTEN = frozenset({(Cluster, "meta")})  # provenance is shown even when absent (null)
# One of these per route / endpoint: memoizing them would only keep garbage alive (and make the
# cyclic GC rescan it); the small policy objects below them are what snapshots share.
_UNSHARED = frozenset({Route, Cluster, Endpoint, VirtualHost, Meta})
_MEMO_MAX = 4096  # memoized conversions kept at most (then the memo starts over)
_Plan = tuple[tuple[str, Any], ...]
_plans: dict[type, _Plan] = {}


def _plan(cls: type) -> _Plan:
    """``(field name, default)`` pairs of a model dataclass, computed once per class."""
    plan = _plans.get(cls)
    if plan is None:
        rows = []
        for f in dataclasses.fields(cls):
            if (cls, f.name) in _ALWAYS_WRITTEN:
                default = _REQUIRED
            elif f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = _REQUIRED
            rows.append((f.name, default))
        plan = _plans[cls] = tuple(rows)
    return plan


def to_jsonable(obj: Any, memo: dict[int, Any] | None = None) -> Any:
    """The compact JSON form of the config model (frozen dataclasses and friends).

    A dataclass becomes an object of its fields, leaving out every field equal to its
    default (so ``None`` and empty collections vanish where they are the default, and a
    reader restores an absent field from the model's default); a field without a default is
    always written. Enums become their value, compiled regexes their pattern, bytes text,
    mappings objects, tuples lists, frozensets sorted lists, :class:`Meta` its ``as_dict``.
    A :class:`StringMatch` omits ``regex`` when it is just the compiled ``value``.

    ``memo`` (keyed by ``id``) lets the many objects a snapshot shares (one Match or
    destination object behind thousands of routes) be converted once per dump; it is only
    valid while those objects are alive, i.e. for one dump of one snapshot.
    """
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        key = id(obj)
        here = memo if memo is not None and type(obj) not in _UNSHARED else None
        if here is not None:
            hit = here.get(key)
            if hit is not None:
                return hit
        if isinstance(obj, Meta):
            out: Any = obj.as_dict()
        else:
            out = {}
            for name, default in _plan(type(obj)):
                value = getattr(obj, name)
                if default is not _REQUIRED and (value is default or value == default):
                    continue
                out[name] = to_jsonable(value, memo)
            if isinstance(obj, StringMatch) and obj.regex is not None:
                if obj.regex.pattern == obj.value:
                    del out["regex"]
        if here is not None:
            if len(here) >= _MEMO_MAX:
                here.clear()
            here[key] = out
        return out
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, re.Pattern):
        return obj.pattern
    if isinstance(obj, bytes):
        return obj.decode("utf-8", "replace")
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v, memo) for k, v in obj.items()}
    if isinstance(obj, frozenset | set):
        return sorted((to_jsonable(v, memo) for v in obj), key=str)
    if isinstance(obj, tuple | list):
        return [to_jsonable(v, memo) for v in obj]
    return repr(obj)


_encode = json.JSONEncoder(separators=(",", ":"), check_circular=False).encode

SECTIONS = ("listeners", "virtual_hosts", "clusters")
"""The top-level keys of a dump whose entries are listed one by one (and filtered)."""

_RESOURCES = {
    "listeners": "listeners",
    "routes": "virtual_hosts",
    "virtual_hosts": "virtual_hosts",
    "clusters": "clusters",
    "version": None,
}
_DETAIL_KEYS = frozenset({"proxy", "warnings", *SECTIONS})  # left out when ?resource= is given
_TICK = 1000  # entries scanned between two yield points of a section's preparation


@dataclasses.dataclass(frozen=True, slots=True)
class DumpQuery:
    """What a ``/config_dump`` request asks for (see :meth:`parse`)."""

    sections: frozenset[str] | None = None  # None: the whole document
    name_regex: re.Pattern[str] | None = None
    host: str | None = None  # lower-case, without port

    @classmethod
    def parse(cls, query: Mapping[str, str]) -> DumpQuery:
        """``?resource=routes|virtual_hosts|clusters|listeners|version`` (comma-separated for
        several), ``?version_only=1`` (= ``resource=version``), ``?name_regex=RE`` (Python
        ``re.search`` on the names), ``?host=HOST[:PORT]`` (the virtual host that request host
        reaches, and the clusters its routes use). Raises ValueError with a message for the
        client when the query is malformed."""
        unknown = sorted(set(query) - {"resource", "version_only", "name_regex", "host"})
        if unknown:
            raise ValueError(f"unknown query parameter(s): {', '.join(unknown)}")
        sections: frozenset[str] | None = None
        if query.get("version_only", "") not in ("", "0", "false"):
            sections = frozenset()
        elif "resource" in query:
            picked = set()
            for name in query["resource"].split(","):
                name = name.strip()
                if name not in _RESOURCES:
                    raise ValueError(
                        f"unknown resource {name!r}: one of {', '.join(sorted(_RESOURCES))}"
                    )
                section = _RESOURCES[name]
                if section is not None:
                    picked.add(section)
            sections = frozenset(picked)
        regex = None
        if "name_regex" in query:
            try:
                regex = re.compile(query["name_regex"])
            except re.error as exc:
                raise ValueError(f"name_regex: {exc}") from None
        host = None
        if "host" in query:
            host = _strip_port(query["host"].strip().lower())
            if not host:
                raise ValueError("host: empty")
        return cls(sections, regex, host)

    def wants(self, key: str) -> bool:
        """Whether the top-level ``key`` of the dump is part of the answer."""
        return self.sections is None or key not in _DETAIL_KEYS or key in self.sections

    def named(self, *names: str) -> bool:
        """``name_regex`` finds one of ``names`` (or there is no ``name_regex``)."""
        rx = self.name_regex
        return rx is None or any(rx.search(n) for n in names)


ALL = DumpQuery()


def _strip_port(host: str) -> str:
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end > 0 else host
    if host.count(":") == 1:
        return host.partition(":")[0]
    return host


def _vh_clusters(vh: VirtualHost) -> set[str]:
    """Names of the clusters the routes of ``vh`` send to or mirror to."""
    names: set[str] = set()
    for route in vh.routes:
        for wc in route.clusters:
            names.add(wc.cluster)
            names.update(wc.by_port.values())
        for m in route.mirrors:
            names.add(m.cluster)
    return names


class Section(abc.ABC):
    """A big section of a dump, written entry by entry when the answer is streamed.

    :meth:`pieces` yields JSON text: the section's list, ``[`` ... ``]``, possibly cut in the
    middle of an entry, and empty strings as yield points; the caller may pause between any two
    pieces, so no piece costs more than one route or endpoint to produce.
    """

    __slots__ = ("snapshot",)

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    @abc.abstractmethod
    def pieces(self, query: DumpQuery, memo: dict[int, Any]) -> Iterator[str]:
        """The section's JSON text for ``query``; ``memo`` is the dump's :func:`to_jsonable`
        memo."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(version={self.snapshot.version!r})"


class VirtualHostsSection(Section):
    """Each distinct virtual host once, sorted by name, with ``aliases``: every name of the
    route table that reaches it (``*.suffix`` for a wildcard, ``*`` for the catch-all)."""

    __slots__ = ()

    def pieces(self, query: DumpQuery, memo: dict[int, Any]) -> Iterator[str]:
        table = self.snapshot.routes
        only: VirtualHost | None = None
        if query.host is not None:
            only = find_virtual_host(table, query.host)
            if only is None:
                yield "[]"
                return
        seen: dict[int, tuple[VirtualHost, list[str]]] = {}
        n = 0
        for names, prefix in ((table.exact, ""), (table.wildcards, "*")):
            for alias, vh in names.items():
                n += 1
                if n % _TICK == 0:
                    yield ""
                if only is None or vh is only:
                    seen.setdefault(id(vh), (vh, []))[1].append(prefix + alias)
        if table.catch_all is not None and (only is None or table.catch_all is only):
            seen.setdefault(id(table.catch_all), (table.catch_all, []))[1].append("*")
        chosen: list[tuple[str, int, VirtualHost, list[str]] | None] = []
        for n, (vh, aliases) in enumerate(seen.values()):
            if n % _TICK == _TICK - 1:
                yield ""
            if query.name_regex is None or query.named(vh.name, *vh.domains, *aliases):
                chosen.append((vh.name, id(vh), vh, aliases))
        seen.clear()
        yield ""
        chosen.sort()  # type: ignore[type-var]  # by name; ids only break ties
        sep = "\n"
        yield "["
        for i, entry in enumerate(chosen):
            assert entry is not None
            _, _, vh, aliases = entry
            chosen[i] = None  # freed as we go, not all at once at the end
            aliases.sort()
            head = {
                "name": vh.name,
                "meta": to_jsonable(vh.meta, memo),
                "domains": list(vh.domains),
                "aliases": aliases,
            }
            yield sep + _encode(head)[:-1] + ',"routes":['
            sep = ",\n"
            inner = "\n"
            for route in vh.routes:
                yield inner + _encode(to_jsonable(route, memo))
                inner = ",\n"
            yield "]}"
        yield "]"


class ClustersSection(Section):
    """Every cluster, sorted by name; with ``?host=``, those the host's routes use and those
    whose service host is that host."""

    __slots__ = ()

    def pieces(self, query: DumpQuery, memo: dict[int, Any]) -> Iterator[str]:
        clusters = self.snapshot.clusters
        wanted: set[str] | None = None
        if query.host is not None:
            vh = find_virtual_host(self.snapshot.routes, query.host)
            wanted = _vh_clusters(vh) if vh is not None else set()
        names = []
        for n, (name, c) in enumerate(clusters.items()):
            if n % _TICK == _TICK - 1:
                yield ""
            if wanted is not None and name not in wanted and c.host != query.host:
                continue
            if query.named(name):
                names.append(name)
        names.sort()
        yield ""
        sep = "\n"
        yield "["
        for name in names:
            c = clusters[name]
            d = to_jsonable(dataclasses.replace(c, endpoints=()), memo)
            if not c.endpoints:
                yield sep + _encode(d)
            else:
                yield sep + _encode(d)[:-1] + ',"endpoints":['
                inner = "\n"
                for ep in c.endpoints:
                    yield inner + _encode(to_jsonable(ep, memo))
                    inner = ",\n"
                yield "]}"
            sep = ",\n"
        yield "]"


def snapshot_dump(
    snapshot: Snapshot,
    *,
    last_error: str | None = None,
    listeners: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The ``/config_dump`` document for ``snapshot``; cheap whatever the snapshot's size.

    Small keys are plain values; ``virtual_hosts`` and ``clusters`` are :class:`Section`
    objects the admin server encodes piece by piece while streaming the answer
    (:func:`dump_pieces`); :func:`materialize` gives the plain JSON form. A backend may add
    keys (``pid``, ``workers``) to the returned dict.
    """
    return {
        "version": snapshot.version,
        "last_error": last_error,
        "proxy": to_jsonable(snapshot.proxy),
        "warnings": list(snapshot.warnings),
        "listeners": listeners or [],
        "virtual_hosts": VirtualHostsSection(snapshot),
        "clusters": ClustersSection(snapshot),
    }


def _plain_host_lookup(vhosts: list[Any], host: str) -> Any:
    """The entry of a plain ``virtual_hosts`` list that ``host`` reaches, looked up as
    :func:`meshproxy.core.routing.find_virtual_host` does (exact alias, then the longest
    ``*.suffix``, then ``*``), on the ``aliases`` each entry lists; None when none does."""
    by_alias: dict[str, Any] = {}
    for vh in vhosts:
        if isinstance(vh, dict):
            for alias in vh.get("aliases") or ():
                by_alias.setdefault(str(alias), vh)
    if host in by_alias:
        return by_alias[host]
    i = host.find(".", 1)
    while i >= 0:
        hit = by_alias.get("*" + host[i:])
        if hit is not None:
            return hit
        i = host.find(".", i + 1)
    return by_alias.get("*")


def _plain_vh_clusters(vh: Any) -> set[str]:
    """Cluster names a plain virtual host entry's routes send or mirror to."""
    names: set[str] = set()
    for route in vh.get("routes") or ():
        for wc in route.get("clusters") or ():
            names.add(wc.get("cluster"))
            names.update((wc.get("by_port") or {}).values())
        for m in route.get("mirrors") or ():
            names.add(m.get("cluster"))
    return names


def _entry_names(key: str, entry: Any) -> list[str]:
    if not isinstance(entry, dict):
        return []
    names = [str(entry.get("name", ""))]
    if key == "virtual_hosts":
        names += [str(x) for x in (*entry.get("domains", ()), *entry.get("aliases", ()))]
    return names


def _plain_pieces(
    key: str, entries: list[Any], query: DumpQuery, keep: Callable[[Any], bool] | None
) -> Iterator[str]:
    """A section that is already plain JSON data (the listeners, or every section of a dump
    a worker sent to the ``--workers`` supervisor), filtered as :class:`Section` filters."""
    yield "["
    sep = "\n"
    for n, entry in enumerate(entries):
        if n % _TICK == _TICK - 1:
            yield ""
        if keep is not None and not keep(entry):
            continue
        if query.name_regex is not None and not query.named(*_entry_names(key, entry)):
            continue
        yield sep + _encode(entry)
        sep = ",\n"
    yield "]"


def dump_pieces(doc: Mapping[str, Any], query: DumpQuery = ALL) -> Iterator[str]:
    """The JSON text of the dump ``doc`` as ``query`` asks for it, in small pieces (empty
    pieces are yield points); joined, they are one JSON object. Entries of a section are one
    per line, so ``grep`` works on a dump."""
    memo: dict[int, Any] = {}
    plain_keep: dict[str, Callable[[Any], bool]] = {}
    if query.host is not None:
        host = query.host
        vhosts = doc.get("virtual_hosts")
        chosen = _plain_host_lookup(vhosts, host) if isinstance(vhosts, list) else None
        plain_keep["virtual_hosts"] = lambda e: e is chosen
        used = _plain_vh_clusters(chosen) if isinstance(chosen, dict) else set()
        plain_keep["clusters"] = lambda e: (
            isinstance(e, dict) and (e.get("name") in used or e.get("host") == host)
        )
    sep = "{\n"
    for key, value in doc.items():
        if not query.wants(key):
            continue
        yield sep + _encode(key) + ":"
        sep = ",\n"
        if isinstance(value, Section):
            yield from value.pieces(query, memo)
        elif key in SECTIONS and isinstance(value, list):
            yield from _plain_pieces(key, value, query, plain_keep.get(key))
        else:
            yield _encode(to_jsonable(value))
    yield "}\n" if sep != "{\n" else "{}\n"


def materialize(doc: Mapping[str, Any], query: DumpQuery = ALL) -> dict[str, Any]:
    """The plain JSON form of a dump (what a client of ``/config_dump`` parses)."""
    result: dict[str, Any] = json.loads("".join(dump_pieces(doc, query)))
    return result


# --------------------------------------------------------------------------- server


def _dumps(data: Any) -> str:
    # indent selects the pure-Python encoder, which lets the loop thread take the GIL back every
    # switch interval when this runs in a worker thread (the C encoder would hold it throughout).
    return json.dumps(data, indent=1) + "\n"


async def _json_off_loop(data: Any) -> AdminResponse:
    """For ``/clusters``, which grows with the number of clusters (``/config_dump``, much
    bigger, is streamed instead: see ``_AdminConnection._stream``)."""
    text = await asyncio.to_thread(_dumps, data)
    return AdminResponse(200, text.encode(), JSON_TYPE)


_prometheus_type: str | None = None


def prometheus_content_type() -> str:
    """prometheus_client's exposition content type (imported on first use: ~1 MiB RSS)."""
    global _prometheus_type
    if _prometheus_type is None:
        from prometheus_client.exposition import CONTENT_TYPE_LATEST

        _prometheus_type = str(CONTENT_TYPE_LATEST)
    return _prometheus_type


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
_REASONS.update(
    {408: "Request Timeout", 413: "Content Too Large", 431: "Request Header Fields Too Large"}
)
_REASONS.update({500: "Internal Server Error", 503: "Service Unavailable"})


def _serialize(resp: AdminResponse, head_only: bool, length: bool = True) -> bytes:
    """Status line, headers and (unless ``head_only``) the body. Without ``length`` the
    answer has no Content-Length: the body ends when the connection closes."""
    reason = _REASONS.get(resp.status, "Unknown")
    lines = [f"HTTP/1.1 {resp.status} {reason}", f"Content-Type: {resp.content_type}"]
    if length:
        lines.append(f"Content-Length: {len(resp.body)}")
    lines.append("Connection: close")
    lines += [f"{n}: {v}" for n, v in resp.headers]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + resp.body


class _AdminConnection(asyncio.Protocol):
    """One admin client connection: one request, one answer, close."""

    def __init__(self, admin: Admin) -> None:
        self.admin = admin
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.size = 0
        self.done = False
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None
        self.writable: asyncio.Future[None] | None = None  # set while the transport is full

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.set_write_buffer_limits(high=STREAM_HIGH_WATER)  # type: ignore[union-attr]
        self.admin._conns.add(self)
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(ADMIN_HEAD_TIMEOUT, self._timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.admin._conns.discard(self)
        if self.timer is not None:
            self.timer.cancel()
        self.done = True
        self.resume_writing()

    def pause_writing(self) -> None:
        """Called by the transport when its buffer passes the high-water mark."""
        if self.writable is None:
            self.writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        """Called by the transport when its buffer drained (and by connection_lost)."""
        fut, self.writable = self.writable, None
        if fut is not None and not fut.done():
            fut.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        self.size += len(data)
        if self.size > ADMIN_MAX_HEAD + ADMIN_MAX_BODY:
            self._answer(AdminResponse.text("request too large\n", 413))
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._complete()
        except httptools.HttpParserError:
            if not self.done:
                self._answer(AdminResponse.text("bad request\n", 400))

    def eof_received(self) -> bool:
        return self.task is not None  # keep the write side open while answering

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > ADMIN_MAX_HEAD:
            raise ValueError("request line too long")

    def on_message_complete(self) -> None:
        self._complete()

    def _complete(self) -> None:
        if self.done or self.task is not None:
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        method = self.parser.get_method().decode("ascii", "replace")
        parts = urlsplit(self.url.decode("latin-1"))
        req = AdminRequest(method, parts.path or "/", dict(parse_qsl(parts.query)))
        self.task = asyncio.get_running_loop().create_task(self._serve(req))

    async def _serve(self, req: AdminRequest) -> None:
        try:
            resp = await self.admin.dispatch(req)
        except Exception:
            log.exception("admin: %s %s failed", req.method, req.path)
            resp = AdminResponse.text("internal error\n", 500)
        if resp.pieces is not None:
            await self._stream(resp, head_only=req.method == "HEAD")
        else:
            self._answer(resp, head_only=req.method == "HEAD")

    async def _stream(self, resp: AdminResponse, head_only: bool) -> None:
        """Produce ``resp.pieces`` on the loop, ``STREAM_SLICE`` of CPU at a time, and yield
        the loop between slices, so a dump of any size never holds traffic up for longer than
        one slice (plus one piece, which is at most one route or endpoint). An answer that is
        complete within the first slice goes out with a Content-Length; a longer one is
        written as it is produced and ends when the connection closes (JSON is
        self-delimiting, so a cut answer does not parse). Encoding pauses while the client
        does not read (bounded by ``STREAM_WRITE_TIMEOUT``) and stops if it goes away."""
        assert resp.pieces is not None
        t = self.transport
        buf: list[str] = []
        size = 0
        started = False
        clock = time.perf_counter
        deadline = clock() + STREAM_SLICE
        try:
            for piece in resp.pieces:
                buf.append(piece)
                size += len(piece)
                if size < STREAM_CHUNK and clock() < deadline:
                    continue
                if self.done or t is None or t.is_closing():
                    return  # the client went away (or admin is closing)
                if not started:
                    started = True
                    t.write(_serialize(resp, head_only=True, length=False))
                    if head_only:
                        return
                if buf:
                    t.write("".join(buf).encode())
                    buf.clear()
                    size = 0
                if self.writable is not None:
                    async with asyncio.timeout(STREAM_WRITE_TIMEOUT):
                        await self.writable
                else:
                    await asyncio.sleep(0)
                deadline = clock() + STREAM_SLICE
            if not started:
                body = "".join(buf).encode()
                self._answer(dataclasses.replace(resp, body=body, pieces=None), head_only)
            elif not self.done and t is not None and not t.is_closing():
                t.write("".join(buf).encode())
        except TimeoutError:
            log.warning("admin: client stopped reading a streamed answer; closing")
            if t is not None:
                t.abort()
        except Exception:
            log.exception("admin: streaming the answer failed")
            if not started:
                self._answer(AdminResponse.text("internal error\n", 500), head_only)
            elif t is not None:
                t.abort()  # the client sees a cut answer, never a complete-looking wrong one
        finally:
            if started and not self.done:
                self.done = True
                if t is not None and not t.is_closing():
                    t.close()

    def _timeout(self) -> None:
        self.timer = None
        if self.task is None:
            self._answer(AdminResponse.text("request timeout\n", 408))

    def _answer(self, resp: AdminResponse, head_only: bool = False) -> None:
        if self.done:
            return
        self.done = True
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(_serialize(resp, head_only))
            t.close()


class Admin:
    """The admin HTTP server; ``extra`` adds ``(method, path) -> handler`` routes."""

    def __init__(
        self,
        backend: AdminBackend,
        extra: Mapping[tuple[str, str], Handler] | None = None,
        only: frozenset[str] | None = None,
    ) -> None:
        """``only``: serve just these paths (the ``--health`` / ``--metrics`` listeners)."""
        self.backend = backend
        self.routes: dict[str, dict[str, Handler]] = {}
        for (method, path), handler in (
            (("GET", "/"), self._index),
            (("GET", "/ready"), self._ready),
            (("GET", "/healthz/ready"), self._ready),  # pilot-agent's path (port 15021)
            (("GET", "/config_dump"), self._config_dump),
            (("GET", "/clusters"), self._clusters),
            (("GET", "/stats/prometheus"), self._prometheus),
            (("GET", "/stats"), self._stats),
            (("POST", "/drain"), self._drain),
            (("POST", "/quitquitquit"), self._quit),
            *(extra or {}).items(),
        ):
            if only is None or path in only:
                self.routes.setdefault(path, {})[method.upper()] = handler
        self._server: asyncio.Server | None = None
        self._conns: set[_AdminConnection] = set()
        self.address: tuple[str, int] | None = None

    def __repr__(self) -> str:
        return f"Admin(address={self.address!r})"

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Bind and serve; returns the bound (host, port). Raises OSError if it cannot bind."""
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: _AdminConnection(self), strip_brackets(host), port, reuse_address=True
        )
        self._server = server
        self.address = (host, int(server.sockets[0].getsockname()[1]))
        return self.address

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for conn in list(self._conns):
            if conn.transport is not None:
                conn.transport.abort()
            if conn.task is not None:
                conn.task.cancel()
        await server.wait_closed()

    async def dispatch(self, req: AdminRequest) -> AdminResponse:
        """The answer to one request (routing by path, then method)."""
        by_method = self.routes.get(req.path)
        if by_method is None:
            return AdminResponse.text("not found\n", 404)
        method = "GET" if req.method == "HEAD" else req.method
        handler = by_method.get(method)
        if handler is None:
            allow = sorted(by_method) + (["HEAD"] if "GET" in by_method else [])
            return AdminResponse(
                405, b"method not allowed\n", headers=(("Allow", ", ".join(sorted(allow))),)
            )
        return await handler(req)

    # ------------------------------------------------------------------ handlers

    async def _index(self, request: AdminRequest) -> AdminResponse:
        paths = sorted(f"{m} {p}" for p, ms in self.routes.items() for m in ms)
        return AdminResponse.text("\n".join(paths) + "\n")

    async def _ready(self, request: AdminRequest) -> AdminResponse:
        if await self.backend.is_ready():
            return AdminResponse.text("LIVE\n")
        return AdminResponse.text("NOT READY\n", 503)

    async def _config_dump(self, request: AdminRequest) -> AdminResponse:
        try:
            query = DumpQuery.parse(request.query)
        except ValueError as exc:
            return AdminResponse.text(f"config_dump: {exc}\n", 400)
        dump = await self.backend.config_dump(request.query)
        return AdminResponse(200, content_type=JSON_TYPE, pieces=dump_pieces(dump, query))

    async def _clusters(self, request: AdminRequest) -> AdminResponse:
        return await _json_off_loop(await self.backend.clusters())

    async def _prometheus(self, request: AdminRequest) -> AdminResponse:
        text = render(await self.backend.stats_export())
        return AdminResponse(200, text.encode(), prometheus_content_type())

    async def _stats(self, request: AdminRequest) -> AdminResponse:
        export = await self.backend.stats_export()
        if request.query.get("format") == "json":
            return AdminResponse.json(export)
        text = render(export)
        lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
        return AdminResponse.text("\n".join(lines) + "\n")

    async def _drain(self, request: AdminRequest) -> AdminResponse:
        await self.backend.drain()
        return AdminResponse.text("OK\n")

    async def _quit(self, request: AdminRequest) -> AdminResponse:
        # Answer first; the backend drains and stops the process after this response.
        asyncio.get_running_loop().call_soon(self.backend.request_quit)
        return AdminResponse.text("OK\n")


# --------------------------------------------------------------------------- client


class FetchError(Exception):
    """An admin call to another process failed (connect, timeout, malformed answer)."""


async def fetch(
    host: str, port: int, method: str, path: str, timeout: float
) -> tuple[int, str, bytes]:
    """One HTTP/1.1 request to an admin server: (status, content type, body).

    For the ``--workers`` supervisor calling its workers; reads until the server closes
    (every admin answer is ``Connection: close``), bounded by ``timeout``."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(strip_brackets(host), port)
            writer.write(
                f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                "Content-Length: 0\r\nConnection: close\r\n\r\n".encode("latin-1")
            )
            data = await reader.read()
    except (OSError, TimeoutError) as e:
        raise FetchError(f"{method} {host}:{port}{path}: {e or type(e).__name__}") from None
    finally:
        if writer is not None:
            writer.close()
    head, sep, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    try:
        status = int(lines[0].split(b" ", 2)[1])
    except (IndexError, ValueError):
        raise FetchError(f"{method} {host}:{port}{path}: not an HTTP answer") from None
    ctype = ""
    length: int | None = None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-type":
            ctype = value.strip().decode("latin-1").split(";", 1)[0].strip()
        elif name == b"content-length" and value.strip().isdigit():
            length = int(value)
    if not sep or (length is not None and len(body) < length):
        raise FetchError(f"{method} {host}:{port}{path}: answer cut short")
    return status, ctype, body if length is None else body[:length]
