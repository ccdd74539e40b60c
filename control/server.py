"""``meshproxy control``: watch a directory, push versioned, per-proxy config, track who runs what.

Theory of operation
-------------------
**Config.** :class:`~control.store.ConfigStore` loads the directory (same parser and validator
as ``meshproxy validate``); :meth:`ControlPlane.watch` reloads it once the files have been quiet
for ``debounce`` seconds (``watchfiles``, ~100 ms). A load with problems is logged, counted and
shown in ``/status`` ``errors``; nothing is pushed and the last valid :class:`Config` stays the
one proxies get. (A source may instead leave invalid objects out and give a config anyway -- the
Kubernetes one, :mod:`control.kube`: then those objects' problems are the ``errors``, each
logged once, and the config is pushed.) A load whose version equals the live one (a touch, a
comment, a rewrite with the same content) changes nothing and pushes nothing.

**Scoping.** A proxy gets only the documents that can affect its translation (its namespace,
``exportTo``, workload selectors: :mod:`control.scope`). Proxies with the same namespace and
labels see the same documents, so the work is done once per such *group* per config: a
:class:`Plan` holds the group's version (:func:`control.protocol.config_version` over its
documents' digests) and the JSON of its ``config`` frame, encoded once and shared by every
proxy of the group. Plans are computed in a worker thread.

**Streams.** ``GET /v1/stream`` upgrades to a WebSocket. The first frame must be a ``hello``;
the proxy's ``version`` there is what it already runs, and if that equals its plan's version
nothing is sent (a proxy that reconnects after a control-plane restart with the same content
needs nothing). Otherwise, and after every config change that changes its plan's version, the
proxy is sent a ``config`` frame with a fresh nonce. Sends to one proxy are serialised (a lock),
so a newer config never overtakes an older one; sends to different proxies run concurrently.
The proxy answers ACK or NACK for that nonce; the time from send to answer goes into the
push-to-ACK histogram. A stale answer (an older nonce) is ignored, as in xDS. A second stream
with the same ``node_id`` replaces the first (the old socket is closed): a proxy that
reconnects before its old connection was noticed dead is one proxy, not two.

**Status.** ``GET /status`` is the INTERFACE object (``version``, ``errors``, ``proxies`` with
``node_id``, ``acked_version``, ``nacked``, ``connected_since``) plus, per proxy, what
``meshproxy status`` prints: ``status`` (``SYNCED``: it acked the version it should run;
``STALE``: a config is on its way or it runs an older one; ``NACKED``: it refused the latest),
``expected_version``, ``namespace``, ``labels`` and ``last_ack``. ``GET /metrics`` (also
``/stats/prometheus``) exports the control plane's own metrics; each has the Istio ``pilot_*``
metric it corresponds to noted in its help text.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import WSMsgType, web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from control.protocol import (
    CERTIFICATES_PATH,
    STREAM_PATH,
    Hello,
    ProtocolError,
    config_body_encoded,
    config_message,
    config_version,
    encode,
    encode_document,
    parse_ack,
    parse_hello,
    parse_message,
)
from control.scope import Scoper
from control.store import Config, ConfigStore, DocumentSource, LoadOutcome
from meshproxy.config.model import ProxyIdentity

log = logging.getLogger("meshproxy.control")

__all__ = ["ControlPlane", "ControlSettings", "Plan", "ProxyConn"]

GroupKey = tuple[str, tuple[tuple[str, str], ...]]
MAX_INBOUND = 256 * 1024  # the largest frame a proxy may send (a NACK's error is cut at 8 KiB)
ACK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True, slots=True)
class ControlSettings:
    debounce: float = 0.1  # quiet time after a file change before reloading
    hello_timeout: float = 10.0  # a stream must say hello within this
    heartbeat: float = 15.0  # WebSocket ping interval; a peer silent for 2x is dropped
    max_proxies: int = 100_000


@dataclass(frozen=True, slots=True)
class Plan:
    """What one group of proxies (same namespace and labels) should run under one config."""

    version: str
    body: str  # the shared tail of the config frame (control.protocol.config_body)
    documents: int


def group_key(namespace: str, labels: dict[str, str] | Any) -> GroupKey:
    return (namespace, tuple(sorted(labels.items())))


class Planner:
    """Plans for one config: its :class:`~control.scope.Scoper`, each document's JSON (encoded
    once, however many groups include it) and the plans by version (groups whose scoped
    documents are the same share one plan and one frame body). Used from one planning thread
    at a time."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.scoper = Scoper(config.resources)
        self._encoded: dict[int, str] = {}  # resource order -> its document's JSON
        self._by_version: dict[str, Plan] = {}

    def plan(self, proxy: ProxyIdentity) -> Plan:
        """The documents ``proxy`` needs, their version and the encoded frame body."""
        scoped = self.scoper.for_proxy(proxy).all()
        version = config_version(r.digest for r in scoped)
        got = self._by_version.get(version)
        if got is not None:
            return got
        encoded = self._encoded
        parts: list[str] = []
        for r in scoped:
            text = encoded.get(r.order)
            if text is None:
                text = encoded[r.order] = encode_document(self.config.document(r))
            parts.append(text)
        plan = Plan(version, config_body_encoded(version, parts), len(parts))
        self._by_version[version] = plan
        return plan


def make_plan(config: Config, proxy: ProxyIdentity) -> Plan:
    """One proxy's plan (see :class:`Planner`, which the server keeps per config)."""
    return Planner(config).plan(proxy)


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class ProxyConn:
    """One connected proxy stream and what it has been sent and has answered."""

    def __init__(self, hello: Hello, ws: web.WebSocketResponse, peer: str) -> None:
        self.node_id = hello.node_id
        self.namespace = hello.namespace
        self.labels = dict(hello.labels)
        self.key: GroupKey = group_key(hello.namespace, hello.labels)
        self.ws = ws
        self.peer = peer
        self.connected_since = time.time()
        self.acked_version: str | None = hello.version  # what it says it runs
        self.nacked: str | None = None  # the error of its NACK of the latest config
        self.expected_version: str | None = None  # its plan's version under the live config
        self.sent_version: str | None = None
        self.sent_nonce: str | None = None
        self.sent_at = 0.0  # monotonic time of the last send
        self.pending = False  # a config was sent and not answered yet
        self.last_ack: float | None = None  # wall time of the last ACK/NACK
        self.lock = asyncio.Lock()

    @property
    def status(self) -> str:
        if self.nacked is not None and not self.pending:
            return "NACKED"
        if not self.pending and self.expected_version is not None:
            if self.acked_version == self.expected_version:
                return "SYNCED"
        if self.expected_version is None:
            return "NOT SENT"
        return "STALE"

    def view(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "acked_version": self.acked_version,
            "nacked": self.nacked,
            "connected_since": _iso(self.connected_since),
            "status": self.status,
            "expected_version": self.expected_version,
            "namespace": self.namespace,
            "labels": self.labels,
            "last_ack": _iso(self.last_ack),
            "peer": self.peer,
        }

    def __repr__(self) -> str:
        return f"ProxyConn({self.node_id!r}, {self.status}, acked={self.acked_version!r})"


class _Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        p = "meshproxy_control_"
        self.connected = Gauge(
            p + "connected_proxies", "Proxies connected to /v1/stream (pilot_xds)", registry=r
        )
        self.pushes = Counter(
            p + "pushes", "Config frames sent to proxies (pilot_xds_pushes)", registry=r
        )
        self.push_errors = Counter(
            p + "push_errors", "Config frames that could not be written", registry=r
        )
        self.ack_latency = Histogram(
            p + "push_ack_seconds",
            "Time from sending a config to the proxy's ACK or NACK (pilot_proxy_convergence_time)",
            buckets=ACK_BUCKETS,
            registry=r,
        )
        self.acks = Counter(p + "acks", "ACKs received", registry=r)
        self.nacks = Counter(
            p + "nacks",
            "NACKs received: configs proxies refused (pilot_total_xds_rejects)",
            registry=r,
        )
        self.reloads = Counter(
            p + "config_reloads", "Directory loads by result", ["result"], registry=r
        )
        self.validation_errors = Counter(
            p + "validation_errors",
            "Problems found in the config directory by failed loads (pilot_total_rejected_configs)",
            registry=r,
        )
        self.current_errors = Gauge(
            p + "config_errors", "Problems in the directory as it is now", registry=r
        )
        self.resources = Gauge(p + "config_resources", "Resources in the live config", registry=r)
        self.certificates = Counter(
            p + "certificates", "Certificate requests by result", ["result"], registry=r
        )


class ControlPlane:
    """The control plane: the config store, the proxy streams, ``/status`` and metrics."""

    def __init__(
        self,
        paths: Sequence[str],
        settings: ControlSettings | None = None,
        *,
        signer: Any = None,
        store: DocumentSource | None = None,
    ) -> None:
        self.paths = list(paths)
        self.settings = settings or ControlSettings()
        # another source of documents than the directory (the Kubernetes API: control.kube)
        self.store: DocumentSource = store if store is not None else ConfigStore(self.paths)
        self.config: Config | None = None
        self.errors: tuple[str, ...] = ()
        self._warned: frozenset[str] = frozenset()  # the last load's warnings (logged)
        self.conns: dict[str, ProxyConn] = {}  # node_id -> its live stream
        self.metrics = _Metrics()
        self.signer = signer
        self._signer_counted = {"signed": 0, "refused": 0}  # what the metric already has
        self._plans: dict[GroupKey, Plan] = {}
        self._plans_for: Config | None = None
        self._planning: dict[GroupKey, asyncio.Future[dict[GroupKey, Plan]]] = {}
        self._planner: Planner | None = None  # the live config's, used in the planning thread
        self._reload_lock = asyncio.Lock()
        self._nonce_prefix = secrets.token_hex(4)
        self._nonce_seq = 0
        self._runner: web.AppRunner | None = None
        self.on_push: Callable[[ProxyConn], None] | None = None  # tests observe sends
        # the source's own trouble now (control.kube: a 403 list), read by /status and /ready
        self.source_problems: Callable[[], Sequence[str]] | None = None

    def __repr__(self) -> str:
        v = self.config.version if self.config else None
        return f"ControlPlane(version={v!r}, proxies={len(self.conns)}, errors={len(self.errors)})"

    # ------------------------------------------------------------------ config

    def load_initial(self) -> LoadOutcome:
        """The first load, synchronously (problems: the caller exits 2)."""
        outcome = self.store.load()
        self._record(outcome)
        if outcome.config is not None:
            self.config = outcome.config
            self.metrics.resources.set(len(outcome.config.resources))
        return outcome

    def _record(self, outcome: LoadOutcome) -> None:
        for w in outcome.warnings:  # once: not again on every reload (an endpoint's churn)
            if w not in self._warned:
                log.warning("%s", w)
        self._warned = frozenset(outcome.warnings)
        if outcome.problems and outcome.config is None:
            self.metrics.reloads.labels("invalid").inc()
            self.metrics.validation_errors.inc(len(outcome.problems))
            for p in outcome.problems:
                log.error("invalid config, not pushed: %s", p)
        elif outcome.problems:  # the source left these objects out and kept the rest
            before = set(self.errors)
            new = [p for p in outcome.problems if p not in before]  # each logged once
            self.metrics.validation_errors.inc(len(new))
            for p in new:
                log.error("invalid, left out of the config (the rest is pushed): %s", p)
        self.errors = outcome.problems
        self.metrics.current_errors.set(len(outcome.problems))

    async def reload(self) -> bool:
        """Re-read the directory; push when the content changed. True when it did."""
        async with self._reload_lock:
            outcome = await asyncio.to_thread(self.store.load)
            self._record(outcome)
            new = outcome.config
            if new is None:
                log.warning(
                    "config has %d problem(s); proxies keep version %s",
                    len(outcome.problems),
                    self.config.version if self.config else None,
                )
                return False
            if self.config is not None and new.version == self.config.version:
                self.metrics.reloads.labels("unchanged").inc()
                return False
            self.metrics.reloads.labels("ok").inc()
            self.metrics.resources.set(len(new.resources))
            log.info(
                "config %s: %d resource(s) (%d file(s) parsed again)",
                new.version,
                len(new.resources),
                self.store.parsed,
            )
            self.config = new
            await self.push_all()
            return True

    async def watch(self, stop: asyncio.Event | None = None) -> None:
        import os

        from watchfiles import awatch

        roots = [p if os.path.isdir(p) else os.path.dirname(os.path.abspath(p)) for p in self.paths]
        step = max(10, int(self.settings.debounce * 1000))

        def relevant(_change: Any, path: str) -> bool:
            return path.endswith((".yaml", ".yml")) and not os.path.basename(path).startswith(".")

        async for _changes in awatch(
            *roots, watch_filter=relevant, step=step, debounce=1000, stop_event=stop
        ):
            try:
                await self.reload()
            except Exception:  # a bug must not stop the watcher
                log.exception("reload failed")

    # ------------------------------------------------------------------ plans and pushes

    async def _plans_of(self, keys: set[GroupKey]) -> dict[GroupKey, Plan]:
        """The live config's plan for each of ``keys``. Missing ones are computed in one
        worker-thread job; a key already being planned is awaited, not planned twice (a
        thousand proxies saying hello at once make one plan per group, not a thousand)."""
        config = self.config
        assert config is not None
        if self._plans_for is not config:
            self._plans, self._planning, self._plans_for = {}, {}, config
        plans, planning = self._plans, self._planning
        missing = [k for k in keys if k not in plans and k not in planning]
        if missing:
            job = asyncio.ensure_future(self._plan_job(config, missing, plans, planning))
            for k in missing:
                planning[k] = job
        out: dict[GroupKey, Plan] = {}
        for k in keys:
            got = plans.get(k)
            out[k] = got if got is not None else (await planning[k])[k]
        return out

    async def _plan_job(
        self,
        config: Config,
        keys: list[GroupKey],
        plans: dict[GroupKey, Plan],
        planning: dict[GroupKey, asyncio.Future[dict[GroupKey, Plan]]],
    ) -> dict[GroupKey, Plan]:
        def plan_all() -> dict[GroupKey, Plan]:
            if self._planner is None or self._planner.config is not config:
                self._planner = Planner(config)
            planner = self._planner
            return {k: planner.plan(ProxyIdentity(k[0], dict(k[1]))) for k in keys}

        try:
            made = await asyncio.to_thread(plan_all)
        finally:
            for k in keys:
                planning.pop(k, None)
        plans.update(made)  # this config's cache (a newer config has its own)
        return made

    async def push_all(self) -> None:
        conns = list(self.conns.values())
        if not conns or self.config is None:
            return
        plans = await self._plans_of({c.key for c in conns})
        await asyncio.gather(*(self._sync(c, plans[c.key]) for c in conns))

    async def _sync(self, conn: ProxyConn, plan: Plan) -> None:
        """Bring ``conn`` to ``plan``: send it unless it already has (or was sent) it."""
        async with conn.lock:
            if self._plans_for is not None and self._plans.get(conn.key, plan) is not plan:
                plan = self._plans[conn.key]  # a newer config was planned meanwhile
            conn.expected_version = plan.version
            if conn.sent_version == plan.version:
                return
            if conn.sent_version is None and conn.acked_version == plan.version:
                conn.nacked = None
                return  # it already runs this content (e.g. reconnected after our restart)
            self._nonce_seq += 1
            nonce = f"{self._nonce_prefix}-{self._nonce_seq}"
            conn.sent_version, conn.sent_nonce = plan.version, nonce
            conn.sent_at = time.monotonic()
            conn.pending = True
            try:
                await conn.ws.send_str(config_message(nonce, plan.body))
            except (ConnectionError, RuntimeError) as e:
                self.metrics.push_errors.inc()
                log.info("push of %s to %s failed: %s", plan.version, conn.node_id, e)
                return
            self.metrics.pushes.inc()
            log.debug("pushed %s (%d docs) to %s", plan.version, plan.documents, conn.node_id)
            if self.on_push is not None:
                self.on_push(conn)

    def _answer(self, conn: ProxyConn, obj: dict[str, Any]) -> None:
        ack = parse_ack(obj)
        if ack.nonce != conn.sent_nonce or not conn.pending:
            log.debug("stale %s from %s (nonce %s)", obj.get("type"), conn.node_id, ack.nonce)
            return
        conn.pending = False
        conn.last_ack = time.time()
        self.metrics.ack_latency.observe(time.monotonic() - conn.sent_at)
        if ack.error is None:
            conn.acked_version = ack.version
            conn.nacked = None
            self.metrics.acks.inc()
            log.debug("%s acked %s", conn.node_id, ack.version)
        else:
            conn.nacked = ack.error
            self.metrics.nacks.inc()
            log.warning("%s NACKed %s: %s", conn.node_id, ack.version, ack.error)

    # ------------------------------------------------------------------ HTTP

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1024 * 1024)
        app.router.add_get(STREAM_PATH, self.handle_stream)
        app.router.add_get("/status", self.handle_status)
        app.router.add_get("/metrics", self.handle_metrics)
        app.router.add_get("/stats/prometheus", self.handle_metrics)
        app.router.add_get("/ready", self.handle_ready)
        if self.signer is not None:
            app.router.add_post(CERTIFICATES_PATH, self.handle_certificates)
        return app

    async def handle_stream(self, request: web.Request) -> web.StreamResponse:
        # a proxy only sends hello / ack / nack frames: nothing near a config's size
        # No per-message deflate: it would compress every push once per proxy and keep
        # ~400 KiB of zlib state per stream (at 1,000 proxies: 670 MiB RSS instead of 80).
        ws = web.WebSocketResponse(
            heartbeat=self.settings.heartbeat, max_msg_size=MAX_INBOUND, compress=False
        )
        await ws.prepare(request)
        peer = request.remote or "?"
        try:
            first = await ws.receive(timeout=self.settings.hello_timeout)
        except TimeoutError:
            await ws.close(message=b"no hello")
            return ws
        if first.type != WSMsgType.TEXT:
            await ws.close()
            return ws
        try:
            hello = parse_hello(parse_message(first.data))
        except ProtocolError as e:
            log.warning("bad hello from %s: %s", peer, e)
            await ws.send_str(encode({"type": "error", "error": f"bad hello: {e}"}))
            await ws.close()
            return ws
        if len(self.conns) >= self.settings.max_proxies and hello.node_id not in self.conns:
            await ws.send_str(encode({"type": "error", "error": "too many proxies"}))
            await ws.close()
            return ws
        conn = ProxyConn(hello, ws, peer)
        old = self.conns.get(hello.node_id)
        self.conns[hello.node_id] = conn
        if old is not None:
            log.info("%s reconnected from %s: closing its old stream", hello.node_id, peer)
            await old.ws.close(message=b"replaced by a new stream")
        self.metrics.connected.set(len(self.conns))
        log.info(
            "%s connected from %s (namespace %s, runs %s)",
            hello.node_id,
            peer,
            hello.namespace,
            hello.version,
        )
        try:
            if self.config is not None:
                plans = await self._plans_of({conn.key})
                await self._sync(conn, plans[conn.key])
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                try:
                    self._answer(conn, parse_message(msg.data))
                except ProtocolError as e:
                    log.warning("%s sent a bad frame: %s", conn.node_id, e)
        finally:
            if self.conns.get(conn.node_id) is conn:
                del self.conns[conn.node_id]
            self.metrics.connected.set(len(self.conns))
            log.info("%s disconnected", conn.node_id)
        return ws

    def status(self) -> dict[str, Any]:
        return {
            "version": self.config.version if self.config is not None else "",
            "errors": [*self.errors, *(self.source_problems() if self.source_problems else ())],
            "proxies": [c.view() for c in sorted(self.conns.values(), key=lambda c: c.node_id)],
        }

    async def handle_status(self, request: web.Request) -> web.Response:
        return web.json_response(self.status(), dumps=lambda o: encode(o) + "\n")

    async def handle_ready(self, request: web.Request) -> web.Response:
        if self.config is not None:
            return web.Response(text="ok\n")
        why = self.source_problems() if self.source_problems else ()
        return web.Response(status=503, text="no config\n" + "".join(f"{p}\n" for p in why))

    async def handle_metrics(self, request: web.Request) -> web.Response:
        if self.signer is not None:
            self._sync_signer_counters()
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    def _sync_signer_counters(self) -> None:
        """Bring the certificates counter up to the signer's own counts."""
        for result in ("signed", "refused"):
            now = int(getattr(self.signer, result, 0))
            delta = now - self._signer_counted[result]
            if delta > 0:
                self.metrics.certificates.labels(result).inc(delta)
                self._signer_counted[result] = now

    async def handle_certificates(self, request: web.Request) -> web.StreamResponse:
        return await self.signer.handle(request)

    # ------------------------------------------------------------------ lifecycle

    async def start(
        self, host: str, port: int, ssl_context: ssl.SSLContext | None = None
    ) -> tuple[str, int]:
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=ssl_context, backlog=4096)
        await site.start()
        server = site._server
        assert server is not None and server.sockets  # type: ignore[attr-defined]
        addr = server.sockets[0].getsockname()  # type: ignore[attr-defined]
        return addr[0], addr[1]

    async def close(self) -> None:
        for conn in list(self.conns.values()):
            with contextlib.suppress(Exception):
                await conn.ws.close(message=b"control plane stopping")
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
