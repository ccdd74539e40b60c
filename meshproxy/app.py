"""The composition root of one proxy process: wires state, metrics, config source, data plane
and admin, and runs the process lifecycle (start, serve, drain, exit).

Theory of operation
-------------------
:func:`run` runs :class:`Proxy` on uvloop: it starts the admin server (``/ready`` is 503 from
then on), loads the workload identity (``--cert-dir``: a bad one is exit 2) off the loop,
builds the first snapshot in a thread (bad config -> exit 2 with the problem lines), starts the
outbound listener and, with ``--inbound``/``--app``, the inbound one, prints
``listening outbound=HOST:PORT [inbound=HOST:PORT] admin=HOST:PORT`` (flushed; ``/ready``
turns 200) and watches the config files and the certificate files.

With ``--control-plane URL --node-id ID`` there is no initial build: the listeners start with
the empty snapshot (no route: 404) and ``/ready`` stays 503 until the
:class:`~meshproxy.sources.stream.StreamSource` has applied the first pushed config; with
``--token-file`` also until the :class:`~meshproxy.certclient.CertificateClient` has the first
workload certificate from the control plane (then renewed at half its lifetime).

Lifecycle of :class:`Proxy`::

    starting --(listeners up, config applied)--> serving --(POST /drain)--> draining
        serving/draining --(SIGTERM, SIGINT, POST /quitquitquit, parent gone,
                            --exit-with-app: the app is gone)--> stopping -> exit 0

Draining = ``/ready`` answers 503, the listener stops accepting, idle keep-alive connections are
closed at once and busy ones after their in-flight response. Stopping = drain, then wait up to
``--drain-seconds`` for in-flight requests, then close everything. A second SIGTERM/SIGINT
while stopping cuts the wait short.

A sidecar (``--inbound``, or ``--stop-order sidecar``) stops differently on SIGTERM/SIGINT
(:mod:`meshproxy.lifecycle`): only the inbound side drains, the outbound listener keeps
serving the application while it shuts down, and the process exits once no connection is
open (after ``--min-drain-seconds``, before ``--drain-seconds``). ``--health`` /
``--metrics`` start with admin (:class:`~meshproxy.lifecycle.StatusListeners`) and are on the
``listening`` line.

With ``--access-log PATH|-`` the file is opened before anything listens (cannot open -> exit
2), handed to the data plane, started right after the ``listening`` line is flushed (so on
stdout that line stays first) and flushed and closed at exit.

A ``--workers`` child runs this same code with ``--reuse-port`` (it shares the outbound port with
its siblings) and ``--parent-pid`` (it stops when its supervisor is gone).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import ssl
import sys
from collections.abc import Coroutine, Mapping
from typing import Any

from meshproxy.accesslog import AccessLog, AccessLogError
from meshproxy.admin import Admin, snapshot_dump
from meshproxy.certclient import CertificateClient
from meshproxy.cli import Addr, RunOptions, UsageError, format_addr, listening_line
from meshproxy.config.model import ProxyIdentity
from meshproxy.lifecycle import StatusListeners, drain_window, sidecar_stop, watch_app
from meshproxy.metrics import Export, Metrics
from meshproxy.settings import Settings
from meshproxy.sources.file import ConfigError, FileSource
from meshproxy.sources.stream import StreamSource
from meshproxy.state import State
from meshproxy.tls import IdentityError, IdentityStore, WorkloadIdentity

log = logging.getLogger("meshproxy.app")

PARENT_CHECK_INTERVAL = 0.5  # seconds between "is my supervisor still alive?" checks


def settings_for(opts: RunOptions) -> Settings:
    budget = opts.retry_budget
    return Settings(
        drain_seconds=opts.drain_seconds,
        min_drain_seconds=opts.min_drain_seconds,
        retry_budget_percent=None if budget is None else budget[0],
        retry_budget_min=3 if budget is None else budget[1],
        outlier_min_ejectable=opts.outlier_min_ejectable,
        default_retry_503=opts.idempotent_503_retry,
        outbound_traffic_policy=opts.outbound_traffic_policy,
    )


def identity_for(opts: RunOptions) -> ProxyIdentity:
    return ProxyIdentity(
        namespace=opts.namespace, labels=dict(opts.labels), node_id=opts.node_id or ""
    )


def control_plane_context(ca_file: str | None) -> ssl.SSLContext | None:
    """How an https control plane is verified: its chain against ``--control-plane-ca`` (the
    mesh root) and its name against the URL's host; without the flag, the system roots."""
    if ca_file is None:
        return None
    from meshproxy.certclient import CertClientError
    from meshproxy.certclient import control_plane_context as make

    try:
        return make(ca_file)
    except CertClientError as e:
        raise UsageError(str(e)) from None


def read_token(path: str) -> str:
    try:
        with open(path, encoding="ascii") as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--token-file {path}: cannot read: {e}") from None
    if not token:
        raise UsageError(f"--token-file {path}: empty")
    return token


class Proxy:
    """One proxy process: the admin backend and the owner of every component."""

    def __init__(self, opts: RunOptions, settings: Settings) -> None:
        from meshproxy.dataplane import DataPlane

        self.opts = opts
        self.settings = settings
        self.identity = identity_for(opts)
        self.state = State()
        self.metrics = Metrics(self.identity)
        self.state.subscribe(self.metrics.on_snapshot)
        self.source: FileSource | StreamSource
        self.cert_client: CertificateClient | None = None
        if opts.control_plane is not None:
            cp_ssl = control_plane_context(opts.control_plane_ca)
            self.source = StreamSource(
                opts.control_plane,
                opts.node_id or "",
                self.identity,
                self.state,
                settings,
                self.metrics,
                ssl_context=cp_ssl,
            )
        else:
            self.source = FileSource(opts.config, self.identity, self.state, settings, self.metrics)
        try:
            self.access_log = AccessLog.open(opts.access_log)
        except AccessLogError as e:
            raise UsageError(str(e)) from None
        # the workload identity (--cert-dir): loaded in start(), then watched
        self.certs = IdentityStore(opts.cert_dir, settings.cert_poll_interval)
        self.certs.subscribe(self._on_identity)
        if opts.control_plane is not None and opts.token_file is not None:
            # no --cert-dir: the identity comes from the control plane's CA, renewed at half life
            from meshproxy.certclient import CertClientError

            try:
                self.cert_client = CertificateClient(
                    opts.control_plane, read_token(opts.token_file), cp_ssl, self.certs
                )
            except CertClientError as e:
                raise UsageError(str(e)) from None
        self.dataplane = DataPlane(
            self.state, self.metrics, settings, self.access_log, identity=self.certs
        )
        self.admin = Admin(self)
        self.status = StatusListeners(self, opts.app_probers)  # --health, --metrics
        self.outbound: Addr | None = None
        self.inbound: Addr | None = None
        self.admin_addr: Addr | None = None
        self.listening = False
        self.draining = False
        self.stopping = False
        # how a stop request is carried out: the sidecar order (SIGTERM with --inbound, or
        # --stop-order sidecar) or the full drain (/quitquitquit, the app or the supervisor
        # is gone, and SIGTERM otherwise)
        self._full_stop = not sidecar_stop(opts.stop_order, opts.inbound is not None)
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def __repr__(self) -> str:
        return (
            f"Proxy(outbound={self.outbound!r}, admin={self.admin_addr!r}, "
            f"version={self.state.snapshot.version!r}, draining={self.draining})"
        )

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Admin first (``/ready`` answers 503 while the first config builds), then the
        initial config (problems -> UsageError, exit 2), then the outbound listener."""
        host, port = self.opts.admin
        try:
            self.admin_addr = await self.admin.start(host, port)
        except OSError as e:
            raise UsageError(f"cannot listen on admin {format_addr(self.opts.admin)}: {e}") from e
        try:
            await self.status.start(self.opts.health, self.opts.metrics)
        except UsageError:
            await self._close_admin()
            raise
        # a connection redirected to the inbound listener is never forwarded to these
        for addr in (self.admin_addr, self.status.health, self.status.metrics):
            if addr is not None:
                self.dataplane.own_ports.add(addr[1])
        self.dataplane.own_ports.update(self.opts.own_ports)  # a --workers supervisor's
        try:
            await self.certs.load_initial_async()
        except IdentityError as e:
            await self._close_admin()
            raise UsageError(f"--cert-dir: {e}") from None
        try:
            if isinstance(self.source, FileSource):
                await self.source.load_initial_async()
        except ConfigError as e:
            await self._close_admin()
            raise UsageError(
                "invalid config:\n" + "\n".join(f"  {p}" for p in e.problems)
            ) from None
        host, port = self.opts.outbound
        try:
            self.outbound = await self.dataplane.start_outbound(
                host, port, reuse_port=self.opts.reuse_port
            )
        except OSError as e:
            await self._close_admin()
            raise UsageError(
                f"cannot listen on outbound {format_addr(self.opts.outbound)}: {e}"
            ) from e
        if self.opts.inbound is not None and self.opts.app is not None:
            host, port = self.opts.inbound
            try:
                self.inbound = await self.dataplane.start_inbound(
                    host, port, self.opts.app, self.identity, reuse_port=self.opts.reuse_port
                )
            except OSError as e:
                await self.dataplane.close()
                await self._close_admin()
                raise UsageError(
                    f"cannot listen on inbound {format_addr(self.opts.inbound)}: {e}"
                ) from e
        self.listening = True
        self._tasks.append(asyncio.create_task(self._watch_config(), name="config-watch"))
        if self.opts.cert_dir is not None:
            self._tasks.append(asyncio.create_task(self.certs.watch(), name="cert-watch"))
        if self.cert_client is not None:
            self._tasks.append(asyncio.create_task(self.cert_client.run(), name="cert-client"))
        if self.opts.parent_pid is not None:
            self._tasks.append(asyncio.create_task(self._watch_parent(), name="parent-watch"))
        if self.opts.exit_with_app is not None:
            self._tasks.append(asyncio.create_task(self._watch_app(), name="app-watch"))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def listening_line(self) -> str:
        assert self.outbound is not None and self.admin_addr is not None
        return listening_line(
            self.outbound, self.admin_addr, self.inbound, self.status.health, self.status.metrics
        )

    def _on_identity(self, old: WorkloadIdentity | None, new: WorkloadIdentity) -> None:
        self.metrics.set_principal(new.spiffe_id)

    async def serve(self) -> int:
        """Wait for a stop request, then stop (the full drain, or the sidecar order) and
        close; returns the exit code."""
        await self._stop.wait()
        if self._full_stop:
            await self._stop_drained()
        else:
            await self._stop_sidecar()
        await self.close()
        log.info("stopped")
        return 0

    async def _until_forced(self, wait: Coroutine[Any, Any, bool]) -> bool | None:
        """``wait``'s result, or None when a second SIGTERM/SIGINT cut it short."""
        done = asyncio.create_task(wait)
        forced = asyncio.create_task(self._force.wait())
        await asyncio.wait({done, forced}, return_when=asyncio.FIRST_COMPLETED)
        forced.cancel()
        if not done.done():
            done.cancel()
            # asyncio.wait, not `await done`: the wait's own cancellation is not raised here,
            # while a cancellation of this task (serve() itself) still is
            await asyncio.wait({done})
            if not done.cancelled():
                done.result()  # it ended by itself meanwhile: its error, if any, is raised
            log.warning("second signal: not waiting any longer")
            return None
        return done.result()

    async def _stop_drained(self) -> None:
        """Every listener refuses new connections; in-flight requests get --drain-seconds."""
        await self.drain()
        timeout = self.settings.drain_seconds
        log.info(
            "stopping: waiting up to %.1fs for %d in-flight request(s)",
            timeout,
            self.dataplane.active_requests,
        )
        if await self._until_forced(self.dataplane.wait_drained(timeout)) is False:
            log.warning(
                "drain timed out after %.1fs with %d request(s) in flight",
                timeout,
                self.dataplane.active_requests,
            )

    async def _stop_sidecar(self) -> None:
        """The sidecar order (meshproxy.lifecycle): /ready 503, the inbound side drains, the
        outbound listener keeps serving the application; exit once no connection is open,
        within the drain window."""
        self.stopping = True
        self.dataplane.stop_accepting(inbound_only=True)
        self.dataplane.close_idle(inbound_only=True)
        if self.access_log is not None:
            self.access_log.flush()
        earliest, latest = drain_window(
            self.settings.drain_seconds, self.settings.min_drain_seconds
        )
        log.info(
            "stopping as a sidecar: inbound refuses new connections, outbound keeps serving; "
            "exiting once no connection is open (%d now), after %.1fs at the earliest and "
            "%.1fs at the latest",
            self.dataplane.active_connections,
            earliest,
            latest,
        )
        if await self._until_forced(self._sidecar_wait(earliest, latest)) is False:
            log.warning(
                "--drain-seconds (%.1fs) passed with %d connection(s) open: closing them",
                latest,
                self.dataplane.active_connections,
            )

    async def _sidecar_wait(self, earliest: float, latest: float) -> bool:
        loop = asyncio.get_running_loop()
        start = loop.time()
        await asyncio.sleep(earliest)
        left = max(0.0, latest - (loop.time() - start))
        return await self.dataplane.wait_no_connections(left)

    async def _close_admin(self) -> None:
        await self.status.close()
        await self.admin.close()

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()
        await self.dataplane.close()
        if self.access_log is not None:
            self.access_log.close()
        await self._close_admin()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._stop.is_set():
            self._force.set()
            return
        if self._full_stop:
            log.info("%s: draining, then exiting", sig.name)
        else:
            log.info("%s: stopping as a sidecar", sig.name)
        self._stop.set()

    async def _watch_config(self) -> None:
        while True:
            try:
                if isinstance(self.source, StreamSource):
                    await self.source.run()
                else:
                    await self.source.watch()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("config watcher failed; restarting it in 1s")
                await asyncio.sleep(1.0)

    async def _watch_parent(self) -> None:
        while os.getppid() == self.opts.parent_pid:
            await asyncio.sleep(PARENT_CHECK_INTERVAL)
        log.warning("supervisor (pid %s) is gone: stopping", self.opts.parent_pid)
        self._full_stop = True
        self._stop.set()

    async def _watch_app(self) -> None:
        target = self.opts.exit_with_app
        assert target is not None
        await watch_app(target, self.settings.app_check_interval)
        if not self._stop.is_set():
            log.info("--exit-with-app: the application (%s) is gone: draining, exiting", target)
            self._full_stop = True
            self._stop.set()

    # ------------------------------------------------------------------ AdminBackend

    async def is_ready(self) -> bool:
        certified = self.cert_client is None or self.cert_client.ready
        stopped = self.draining or self.stopping
        return self.listening and self.state.applied and certified and not stopped

    async def config_dump(self, query: Mapping[str, str] | None = None) -> dict[str, Any]:
        listeners = []
        if self.outbound is not None:
            listeners.append(
                {"name": "outbound", "address": format_addr(self.outbound), "protocol": "HTTP"}
            )
        if self.inbound is not None and self.opts.app is not None:
            entry: dict[str, Any] = {
                "name": "inbound",
                "address": format_addr(self.inbound),
                "protocol": "HTTP",
                "app": format_addr(self.opts.app),
            }
            view = self.dataplane.inbound_view()
            if view is not None:
                view.pop("app", None)
                entry.update(view)
            listeners.append(entry)
        snapshot, last_error = self.state.snapshot, self.state.last_error
        dump = await asyncio.to_thread(
            snapshot_dump, snapshot, last_error=last_error, listeners=listeners
        )
        dump["pid"] = os.getpid()
        if isinstance(self.source, StreamSource):
            dump["control_plane"] = self.source.view()
        ident = self.certs.current
        if self.cert_client is not None:
            dump["certificate_client"] = self.cert_client.view()
        if ident is not None:
            dump["identity"] = ident.view() | {
                "reloads": {"ok": self.certs.reloads_ok, "failed": self.certs.reloads_failed},
                "last_error": self.certs.last_error,
            }
        return dump

    async def clusters(self) -> dict[str, Any]:
        return self.dataplane.clusters_view()

    async def stats_export(self) -> Export:
        return self.metrics.export()

    async def drain(self) -> None:
        if self.draining:
            return
        self.draining = True
        log.info(
            "draining: refusing new connections, %d open, %d request(s) in flight",
            self.dataplane.active_connections,
            self.dataplane.active_requests,
        )
        self.dataplane.stop_accepting()
        self.dataplane.close_idle()
        if self.access_log is not None:
            self.access_log.flush()

    def request_quit(self) -> None:
        log.info("quitquitquit: draining, then exiting")
        if not self._stop.is_set():
            self._full_stop = True
        self._stop.set()


async def _main(opts: RunOptions, settings: Settings) -> int:
    proxy = Proxy(opts, settings)
    try:
        await proxy.start()
    except BaseException:
        if proxy.access_log is not None:
            proxy.access_log.close()
        raise
    print(proxy.listening_line(), flush=True)
    if proxy.access_log is not None:
        proxy.access_log.start()
    log.info("%s", proxy.listening_line())
    return await proxy.serve()


def run(opts: RunOptions) -> int:
    """``meshproxy run`` in one process; returns the exit code."""
    import uvloop

    settings = settings_for(opts)
    try:
        return uvloop.run(_main(opts, settings))
    finally:
        sys.stdout.flush()
