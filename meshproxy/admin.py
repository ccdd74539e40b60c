"""The admin HTTP API (aiohttp): readiness, config dump, clusters, stats, drain, quit.

Theory of operation
-------------------
:class:`Admin` only speaks HTTP; what the answers contain comes from an :class:`AdminBackend`:
:class:`meshproxy.app.Proxy` in a single process, :class:`meshproxy.workers.Supervisor` with
``--workers N`` (which fetches from its workers' private admin ports and merges). Endpoints:

* ``GET /ready`` -> 200 once listeners are up and a config is applied, 503 before and while
  draining.
* ``GET /config_dump`` -> JSON: ``version``, ``last_error``, listeners, virtual hosts with their
  routes and clusters, each with the Istio resource it came from (see :func:`snapshot_dump`).
* ``GET /clusters`` -> the data plane's live cluster view.
* ``GET /stats/prometheus`` -> Prometheus text; ``GET /stats`` -> the same samples without
  comments, or the raw mergeable export with ``?format=json`` (used by the supervisor).
* ``POST /drain`` -> 200 and a graceful drain starts; ``POST /quitquitquit`` -> 200, then drain
  and exit 0.

:func:`to_jsonable` serialises the frozen config dataclasses generically (enums by value,
compiled regexes by pattern, mappings as objects, tuples as lists, ``Meta`` via ``as_dict``), so
new model fields show up in ``/config_dump`` without touching this module. Building a dump of a
large snapshot runs in a thread: the snapshot is immutable, so that is safe.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from meshproxy.config.model import Meta, Snapshot, VirtualHost
from meshproxy.metrics import Export, render

log = logging.getLogger("meshproxy.admin")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class AdminBackend(Protocol):
    """What the admin endpoints ask; implemented by the single process and the supervisor."""

    async def is_ready(self) -> bool: ...
    async def config_dump(self) -> dict[str, Any]: ...
    async def clusters(self) -> dict[str, Any]: ...
    async def stats_export(self) -> Export: ...
    async def drain(self) -> None: ...
    def request_quit(self) -> None: ...


# --------------------------------------------------------------------------- config dump


def to_jsonable(obj: Any) -> Any:
    """Generic JSON form of the config model (frozen dataclasses and friends)."""
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, Meta):
        return obj.as_dict()
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, re.Pattern):
        return obj.pattern
    if isinstance(obj, bytes):
        return obj.decode("utf-8", "replace")
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, frozenset | set):
        return sorted((to_jsonable(v) for v in obj), key=str)
    if isinstance(obj, tuple | list):
        return [to_jsonable(v) for v in obj]
    return repr(obj)


def _virtual_hosts(snapshot: Snapshot) -> list[tuple[VirtualHost, list[str]]]:
    """Each distinct virtual host once, with every name that reaches it."""
    seen: dict[int, tuple[VirtualHost, list[str]]] = {}
    table = snapshot.routes
    for alias, vh in table.exact.items():
        seen.setdefault(id(vh), (vh, []))[1].append(alias)
    for suffix, vh in table.wildcards.items():
        seen.setdefault(id(vh), (vh, []))[1].append("*" + suffix)
    if table.catch_all is not None:
        seen.setdefault(id(table.catch_all), (table.catch_all, []))[1].append("*")
    return list(seen.values())


def snapshot_dump(
    snapshot: Snapshot,
    *,
    last_error: str | None = None,
    listeners: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The ``/config_dump`` document for ``snapshot``."""
    vhosts = []
    for vh, aliases in _virtual_hosts(snapshot):
        d = to_jsonable(vh)
        d["aliases"] = sorted(aliases)
        vhosts.append(d)
    vhosts.sort(key=lambda d: d["name"])
    return {
        "version": snapshot.version,
        "last_error": last_error,
        "proxy": to_jsonable(snapshot.proxy),
        "warnings": list(snapshot.warnings),
        "listeners": listeners or [],
        "virtual_hosts": vhosts,
        "clusters": [to_jsonable(c) for _, c in sorted(snapshot.clusters.items())],
    }


# --------------------------------------------------------------------------- server


def _dumps(data: Any) -> str:
    # indent selects the pure-Python encoder, which lets the loop thread take the GIL back every
    # switch interval when this runs in a worker thread (the C encoder would hold it throughout).
    return json.dumps(data, indent=1) + "\n"


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=_dumps(data), status=status, content_type="application/json")


async def _json_off_loop(data: Any) -> web.Response:
    """For documents that grow with the config (a 10,000-host dump is tens of MB)."""
    text = await asyncio.to_thread(_dumps, data)
    return web.Response(text=text, content_type="application/json")


class Admin:
    """The admin HTTP server; ``extra`` adds ``(method, path) -> handler`` routes."""

    def __init__(
        self,
        backend: AdminBackend,
        extra: Mapping[tuple[str, str], Handler] | None = None,
    ) -> None:
        self.backend = backend
        self.app = web.Application()
        r = self.app.router
        r.add_get("/", self._index)
        r.add_get("/ready", self._ready)
        r.add_get("/config_dump", self._config_dump)
        r.add_get("/clusters", self._clusters)
        r.add_get("/stats/prometheus", self._prometheus)
        r.add_get("/stats", self._stats)
        r.add_post("/drain", self._drain)
        r.add_post("/quitquitquit", self._quit)
        for (method, path), handler in (extra or {}).items():
            r.add_route(method, path, handler)
        self._runner: web.AppRunner | None = None
        self.address: tuple[str, int] | None = None

    def __repr__(self) -> str:
        return f"Admin(address={self.address!r})"

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Bind and serve; returns the bound (host, port). Raises OSError if it cannot bind."""
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port, reuse_address=True)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound = runner.addresses[0]
        self.address = (host, int(bound[1]))
        return self.address

    async def close(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    # ------------------------------------------------------------------ handlers

    async def _index(self, request: web.Request) -> web.Response:
        paths = sorted({f"{r.method} {r.resource.canonical}" for r in self.app.router.routes()})
        return web.Response(text="\n".join(p for p in paths if not p.startswith("HEAD")) + "\n")

    async def _ready(self, request: web.Request) -> web.Response:
        if await self.backend.is_ready():
            return web.Response(text="LIVE\n")
        return web.Response(text="NOT READY\n", status=503)

    async def _config_dump(self, request: web.Request) -> web.Response:
        return await _json_off_loop(await self.backend.config_dump())

    async def _clusters(self, request: web.Request) -> web.Response:
        return await _json_off_loop(await self.backend.clusters())

    async def _prometheus(self, request: web.Request) -> web.Response:
        text = render(await self.backend.stats_export())
        resp = web.Response(body=text.encode())
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    async def _stats(self, request: web.Request) -> web.Response:
        export = await self.backend.stats_export()
        if request.query.get("format") == "json":
            return _json(export)
        text = render(export)
        lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
        return web.Response(text="\n".join(lines) + "\n")

    async def _drain(self, request: web.Request) -> web.Response:
        await self.backend.drain()
        return web.Response(text="OK\n")

    async def _quit(self, request: web.Request) -> web.Response:
        # Answer first; the backend drains and stops the process after this response.
        asyncio.get_running_loop().call_soon(self.backend.request_quit)
        return web.Response(text="OK\n")
