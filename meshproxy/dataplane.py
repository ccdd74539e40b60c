"""The data plane's public face: listeners, live upstream pools and drain, for ``meshproxy.app``.

Theory of operation
-------------------
A :class:`DataPlane` wires the pieces once: the upstream :class:`~meshproxy.upstream.pool.Pools`
(subscribed to ``State`` so a snapshot swap re-picks changed clusters and closes idle
connections to endpoints that are gone), a :class:`~meshproxy.proxy.ProxyContext` whose
``make_exchange`` serves every request, and one
:class:`~meshproxy.http.server.ServerContext` shared by the connections of every outbound
listener. Drain is three steps the composition root calls in order: :meth:`stop_accepting`,
:meth:`close_idle` (idle connections close now, busy ones after their current response, with
``Connection: close``), :meth:`wait_drained`.

An optional :class:`~meshproxy.accesslog.AccessLog` is handed to the ``ProxyContext`` (one line
per finished request); its owner (the composition root) starts and closes it.

One timer per data plane runs the stream idle check (Envoy's ``stream_idle_timeout``): every
``Settings.stream_idle_timeout / 4`` each in-flight request compares its byte and attempt counts
with the last look and ends itself once nothing moved for the timeout. The same sweep closes TCP
passthrough tunnels idle for ``Settings.tcp_idle_timeout`` (tcp_proxy's ``idle_timeout``); it
runs at a quarter of the shorter of the two timeouts, at most every 30 s.

While it exists the data plane also installs the metrics' cyclic-GC hook
(``Metrics.gc``; removed by :meth:`close`), since a collection is a stall of every request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from meshproxy.http.server import ServerContext
from meshproxy.net.listen import listen
from meshproxy.proxy import OutboundConnection, ProxyContext
from meshproxy.settings import Settings
from meshproxy.state import State
from meshproxy.upstream.pool import Pools

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from meshproxy.accesslog import AccessLog
    from meshproxy.config.model import ProxyIdentity
    from meshproxy.inbound import InboundContext, InboundListener
    from meshproxy.metrics import Metrics
    from meshproxy.tls import IdentityStore


class DataPlane:
    def __init__(
        self,
        state: State,
        metrics: Metrics,
        settings: Settings,
        access_log: AccessLog | None = None,
        identity: IdentityStore | None = None,
    ) -> None:
        self._state = state
        self._access_log = access_log
        self._metrics = metrics
        self._settings = settings
        self._identity = identity
        self._pools = Pools(metrics, settings)
        self._pools.identity = identity
        state.subscribe(self._pools.on_snapshot)
        self._servers: list[asyncio.Server] = []
        self._idle_timer: asyncio.TimerHandle | None = None
        self._proxy: ProxyContext | None = None
        self._server_ctx: ServerContext | None = None
        # the inbound side (--inbound): its own pool to the application, context, listener
        self._inbound_pools: Pools | None = None
        self._inbound: InboundContext | None = None
        self._inbound_ctx: ServerContext | None = None
        self.inbound_listener: InboundListener | None = None
        # the ports this process serves (the owner adds admin, health...): the inbound side
        # never forwards a redirected connection to one of them (nor to Istio's reserved ones)
        self.own_ports: set[int] = set()
        gc_stats = getattr(metrics, "gc", None)  # test fakes may have no GC hook
        if gc_stats is not None:
            gc_stats.install()

    def _contexts(self) -> ServerContext:
        if self._server_ctx is None:
            self._proxy = ProxyContext(
                self._state, self._pools, self._metrics, self._settings, self._access_log
            )
            self._server_ctx = ServerContext(
                self._settings, self._metrics, self._proxy.make_exchange
            )
            mirrorer = self._proxy.mirrorer
            if hasattr(self._metrics, "mirror_stats"):  # test fakes have no such hook
                self._metrics.mirror_stats = lambda: {
                    "sent": mirrorer.sent,
                    "completed": mirrorer.completed,
                    "failed": mirrorer.failed,
                    "dropped": mirrorer.dropped,
                }
        return self._server_ctx

    async def start_outbound(
        self, host: str, port: int, *, reuse_port: bool = False
    ) -> tuple[str, int]:
        """Start an outbound listener; returns the bound (host, port)."""
        ctx = self._contexts()
        proxy = self._proxy
        assert proxy is not None  # made with the context
        server, addr = await listen(
            lambda: OutboundConnection(ctx, proxy), host, port, reuse_port=reuse_port
        )
        self._servers.append(server)
        self.own_ports.add(addr[1])
        if self._idle_timer is None:
            self._arm_idle_sweep()
        return addr

    async def start_inbound(
        self,
        host: str,
        port: int,
        app: tuple[str, int],
        workload: ProxyIdentity,
        *,
        reuse_port: bool = False,
    ) -> tuple[str, int]:
        """Start the inbound listener fronting the application at ``app``; returns the bound
        (host, port)."""
        from meshproxy.inbound import InboundContext, InboundListener

        self._inbound_pools = pools = Pools(self._metrics, self._settings)
        self._inbound = inbound = InboundContext(
            self._state,
            workload,
            app,
            self._identity,
            pools,
            self._metrics,
            self._settings,
            self._access_log,
        )
        self._inbound_ctx = ctx = ServerContext(
            self._settings, self._metrics, inbound.make_exchange
        )
        listener = InboundListener(inbound, ctx, self._settings, self.own_ports)
        addr = await listener.start(host, port, reuse_port=reuse_port)
        self.inbound_listener = listener
        if self._idle_timer is None:
            self._arm_idle_sweep()
        return addr

    def inbound_view(self) -> dict[str, Any] | None:
        """The inbound listener's policy under the current snapshot (``/config_dump``)."""
        if self._inbound is None or self.inbound_listener is None:
            return None
        view = self._inbound.policy().describe()
        view["app"] = self._inbound.app_port
        view["refused_plaintext"] = self.inbound_listener.refused_plaintext
        view["handshake_failures"] = self.inbound_listener.handshake_failures
        view["refused_proxy_port"] = self.inbound_listener.refused_proxy_port
        view["refused_port_limit"] = self.inbound_listener.refused_port_limit
        view["ports"] = len(self._inbound._ports)
        return view

    def _server_contexts(self) -> list[ServerContext]:
        return [c for c in (self._server_ctx, self._inbound_ctx) if c is not None]

    def _arm_idle_sweep(self) -> None:
        s = self._settings
        timeout = min(s.stream_idle_timeout, s.tcp_idle_timeout)
        every = min(max(timeout / 4, 0.05), 30.0)
        self._idle_timer = asyncio.get_running_loop().call_later(every, self._idle_sweep)

    def _idle_sweep(self) -> None:
        """Every ``stream_idle_timeout / 4`` (at most 30 s): each in-flight request checks its
        own progress (Exchange.idle_check) -- one timer per data plane, none per request."""
        now = time.monotonic()
        timeout = self._settings.stream_idle_timeout
        for ctx in self._server_contexts():
            for conn in list(ctx.connections):
                ex = conn.current
                if ex is not None:
                    try:
                        ex.idle_check(now, timeout)
                    except Exception:  # a bug: never stop the sweep for everybody else
                        log.exception("internal error in the stream idle check of %r", ex)
        if self._proxy is not None and self._proxy.tunnels:
            tcp_timeout = self._settings.tcp_idle_timeout
            for tunnel in list(self._proxy.tunnels):
                tunnel.idle_check(now, tcp_timeout)
        self._arm_idle_sweep()

    def stop_accepting(self, *, inbound_only: bool = False) -> None:
        """Close the listening sockets: new connections are refused. ``inbound_only``: the
        outbound listeners keep accepting (a stopping sidecar, see meshproxy.lifecycle)."""
        if not inbound_only:
            for server in self._servers:
                server.close()
        if self.inbound_listener is not None:
            self.inbound_listener.close()

    def close_idle(self, *, inbound_only: bool = False) -> None:
        """Drain: idle client connections close now; busy ones after their current response.
        ``inbound_only``: only the inbound listener's connections."""
        contexts = self._server_contexts()
        if inbound_only:
            contexts = [c for c in contexts if c is self._inbound_ctx]
        for ctx in contexts:
            ctx.draining = True
            for conn in list(ctx.connections):
                conn.drain()

    async def wait_drained(self, timeout: float) -> bool:
        """True once no client connection is left (False if ``timeout`` passed first)."""
        deadline = time.monotonic() + timeout
        for ctx in self._server_contexts():
            if not await ctx.wait_empty(max(0.0, deadline - time.monotonic())):
                return False
        return True

    async def wait_no_connections(self, timeout: float) -> bool:
        """True once no client connection is open on any listener at one moment (False if
        ``timeout`` passed first). Unlike :meth:`wait_drained` it copes with listeners that
        still accept: a connection that arrives while another context empties is waited for."""
        deadline = time.monotonic() + timeout
        while self.active_connections:
            if not await self.wait_drained(max(0.0, deadline - time.monotonic())):
                return False
        return True

    @property
    def active_connections(self) -> int:
        return sum(len(ctx.connections) for ctx in self._server_contexts())

    @property
    def active_requests(self) -> int:
        n = 0 if self._proxy is None else self._proxy.active_requests
        return n + (0 if self._inbound is None else self._inbound.active_requests)

    def clusters_view(self) -> dict[str, Any]:
        """``/clusters`` per INTERFACE.md, for every cluster of the current snapshot.

        Live state exists only for clusters that served a request (``Pools`` builds it on
        first use); the others are shown from the snapshot with the state a fresh endpoint
        has, without building any (a 10,000-cluster table stays lazy)."""
        live = self._pools.states()
        out = []
        for name, cluster in self._state.snapshot.clusters.items():
            cs = live.get(name)
            if cs is not None:
                det = cs.detector
                now = time.monotonic()
                endpoints = []
                for st in cs.endpoints:
                    h = st.health
                    entry: dict[str, Any] = {
                        "address": st.key,
                        "healthy": not h.ejected,
                        "ejected": h.ejected,
                        "ejections": h.ejections_total,
                        "active_requests": st.active,
                        "connections": st.conns,
                    }
                    if det is not None:
                        entry["outlier"] = det.host_info(st.index, now)
                    endpoints.append(entry)
            else:
                endpoints = [
                    {
                        "address": ep.key,
                        "healthy": True,
                        "ejected": False,
                        "ejections": 0,
                        "active_requests": 0,
                    }
                    for ep in cluster.endpoints
                ]
            entry_c: dict[str, Any] = {"name": name, "endpoints": endpoints}
            if cs is not None:
                entry_c["circuit_breakers"] = cs.counters.view()
                tls = cs.tls_info
                if tls is not None:
                    entry_c["tls"] = tls
            out.append(entry_c)
        return {"clusters": out}

    async def close(self) -> None:
        """Close listeners, client connections and upstream pools."""
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self.stop_accepting()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        if self.inbound_listener is not None:
            await self.inbound_listener.wait_closed()
        for ctx in self._server_contexts():
            ctx.draining = True
            for conn in list(ctx.connections):
                conn.abort()
        if self._proxy is not None:
            await self._proxy.mirrorer.close()
        self._pools.close()
        if self._inbound_pools is not None:
            self._inbound_pools.close()
        gc_stats = getattr(self._metrics, "gc", None)
        if gc_stats is not None:
            gc_stats.uninstall()
        await asyncio.sleep(0)

    def __repr__(self) -> str:
        return (
            f"DataPlane(servers={len(self._servers)}, connections={self.active_connections},"
            f" requests={self.active_requests})"
        )
