"""``--workers N``: a supervisor process that owns admin and N worker processes.

Theory of operation
-------------------
Each worker is an ordinary single-process proxy (``python -m meshproxy run ...``) started with
``--reuse-port`` so all of them bind the same outbound port with SO_REUSEPORT and the kernel
spreads connections across them, ``--admin 127.0.0.2:0`` for a private admin port (not
127.0.0.1, where inbound capture forwards), ``--own-port`` for the supervisor's fixed ports
(never forwarded to either), and ``--parent-pid`` so a worker stops by itself if the
supervisor disappears. The supervisor reads each worker's ``listening ...`` line from its
stdout to learn that private admin address.

When ``--outbound`` asks for port 0, the supervisor first binds (without listening) a
SO_REUSEPORT socket to pick a concrete port, keeps it bound for its lifetime (so the port stays
reserved across worker restarts), and hands the number to the workers.

``--access-log PATH`` is passed to every worker (as an absolute path): each appends whole lines
with ``O_APPEND`` writes to the same file. ``--access-log -`` is passed on too; the supervisor
copies each worker's stdout lines after its ``listening`` line (access log lines, whole) to its
own stdout, once its own ``listening`` line is out. The supervisor checks that PATH can be
opened before starting any worker (exit 2 otherwise).

Every worker watches the config files itself (same files, same translation, same version);
with ``--control-plane`` every worker subscribes itself, as node ``ID.wK`` (K = its index).
The supervisor's admin answers by asking the workers' admins: ``/ready`` is 200 only when every
worker is; ``/stats/prometheus`` sums the workers' raw exports (``/stats?format=json``) with
:func:`meshproxy.metrics.merge_exports`; ``/clusters`` sums ``active_requests`` per endpoint;
``/config_dump`` comes from one worker; ``/workers`` lists them. ``POST /drain`` and SIGTERM /
SIGINT / ``POST /quitquitquit`` are passed on (``/drain`` over HTTP, stop as SIGTERM); a worker
that dies while not stopping is restarted, with a growing pause if it keeps dying.

``--health`` / ``--metrics`` (:class:`~meshproxy.lifecycle.StatusListeners`) are served by the
supervisor from that same aggregated view; the workers get neither. ``--exit-with-app`` is
watched by the supervisor, which then stops its workers as ``/quitquitquit`` does: with
``POST /quitquitquit`` to each (a full drain; SIGTERM if that call fails), while SIGTERM is
passed on as SIGTERM, so a worker with ``--inbound`` stops in the sidecar order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from meshproxy.accesslog import OFF, STDOUT, AccessLogError, check_target
from meshproxy.admin import Admin, AdminRequest, AdminResponse, FetchError, fetch
from meshproxy.cli import (
    Addr,
    RunOptions,
    UsageError,
    format_addr,
    format_retry_budget,
    listening_line,
    parse_addr,
)
from meshproxy.lifecycle import StatusListeners, watch_app
from meshproxy.metrics import Export, merge_exports
from meshproxy.settings import DEFAULT_SETTINGS
from meshproxy.sources.file import FileSource
from meshproxy.state import State

log = logging.getLogger("meshproxy.workers")

WORKER_START_TIMEOUT = 30.0  # seconds for a worker to print its listening line
WORKER_ADMIN_TIMEOUT = 5.0  # seconds for one admin call to a worker
# A worker's private admin listens on a loopback address other than 127.0.0.1: a connection
# that capture redirected to the inbound listener is forwarded to 127.0.0.1:<its port> only,
# so a peer can never reach a worker's admin (/quitquitquit, /config_dump) through the pod IP.
WORKER_ADMIN = "127.0.0.2:0"
RESTART_BACKOFF_MAX = 5.0  # seconds between restarts of a worker that keeps dying
STOP_GRACE = 5.0  # seconds after --drain-seconds before a worker is killed
PUMP_FINISH_TIMEOUT = 1.0  # seconds to copy a stopped worker's last stdout lines


class WorkerStartError(Exception):
    pass


@dataclass(slots=True)
class Worker:
    index: int
    proc: asyncio.subprocess.Process | None = None
    admin: Addr | None = None
    restarts: int = 0
    pump: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


def merge_clusters(views: list[dict[str, Any]]) -> dict[str, Any]:
    """Merge ``/clusters`` answers of several workers: per endpoint, sum ``active_requests``
    and ``ejections``; ``ejected`` if any worker ejected it; ``healthy`` if every worker
    considers it healthy. Cluster and endpoint order follow the first worker."""
    clusters: dict[str, dict[str, Any]] = {}
    for view in views:
        for c in view.get("clusters", []):
            acc = clusters.get(c["name"])
            if acc is None:
                clusters[c["name"]] = {**c, "endpoints": [dict(e) for e in c["endpoints"]]}
                if "circuit_breakers" in c:
                    clusters[c["name"]]["circuit_breakers"] = dict(c["circuit_breakers"])
                continue
            cb = c.get("circuit_breakers")
            if cb is not None:
                # each worker has its own limits' counts: the sums are the process's load
                # (a peak is per worker: the largest is shown)
                acc_cb = acc.setdefault("circuit_breakers", {})
                for k, v in cb.items():
                    if k.endswith("_peak"):
                        acc_cb[k] = max(acc_cb.get(k, 0), v)
                    else:
                        acc_cb[k] = acc_cb.get(k, 0) + v
            eps = {e["address"]: e for e in acc["endpoints"]}
            for e in c["endpoints"]:
                a = eps.get(e["address"])
                if a is None:
                    acc["endpoints"].append(dict(e))
                    continue
                a["active_requests"] = a.get("active_requests", 0) + e.get("active_requests", 0)
                a["ejections"] = a.get("ejections", 0) + e.get("ejections", 0)
                a["ejected"] = bool(a.get("ejected")) or bool(e.get("ejected"))
                a["healthy"] = bool(a.get("healthy", True)) and bool(e.get("healthy", True))
    return {"clusters": list(clusters.values())}


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (not listen) a SO_REUSEPORT socket on host:port; port 0 picks a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class Supervisor:
    """Owns the admin port and the worker processes; the admin backend for ``--workers``."""

    def __init__(self, opts: RunOptions, outbound: Addr, inbound: Addr | None = None) -> None:
        self.opts = opts
        self.outbound = outbound
        self.inbound = inbound
        self.workers = [Worker(i) for i in range(opts.workers)]
        self.admin = Admin(self, extra={("GET", "/workers"): self._workers_handler})
        self.status = StatusListeners(self, opts.app_probers)  # --health, --metrics
        self.admin_addr: Addr | None = None
        self.draining = False
        self.stopping = False
        self._quit = False  # stop the workers with /quitquitquit (a full drain), not SIGTERM
        self._stop = asyncio.Event()
        self._monitors: list[asyncio.Task[None]] = []
        self.stdout_open = asyncio.Event()  # set once our listening line is out

    def __repr__(self) -> str:
        return f"Supervisor(outbound={self.outbound!r}, workers={[w.pid for w in self.workers]})"

    # ------------------------------------------------------------------ workers

    def worker_argv(self, index: int = 0) -> list[str]:
        o = self.opts
        argv = [sys.executable, "-m", "meshproxy", "run"]
        for p in o.config:
            argv += ["--config", os.path.abspath(p)]
        if o.control_plane is not None:
            # each worker is its own stream, so its own node at the control plane
            argv += ["--control-plane", o.control_plane, "--node-id", f"{o.node_id}.w{index}"]
            if o.control_plane_ca is not None:
                argv += ["--control-plane-ca", os.path.abspath(o.control_plane_ca)]
            if o.token_file is not None:
                argv += ["--token-file", os.path.abspath(o.token_file)]
        argv += [
            "--outbound",
            format_addr(self.outbound),
            "--admin",
            WORKER_ADMIN,
            "--namespace",
            o.namespace,
            "--labels",
            ",".join(f"{k}={v}" for k, v in o.labels.items()),
            "--drain-seconds",
            str(o.drain_seconds),
            "--min-drain-seconds",
            str(o.min_drain_seconds),
            "--stop-order",
            o.stop_order,
            "--log-level",
            o.log_level,
            "--access-log",
            o.access_log if o.access_log in (OFF, STDOUT) else os.path.abspath(o.access_log),
            "--retry-budget",
            format_retry_budget(o.retry_budget),
            "--outlier-min-ejectable",
            str(o.outlier_min_ejectable),
            "--outbound-traffic-policy",
            o.outbound_traffic_policy,
            "--reuse-port",
            "--parent-pid",
            str(os.getpid()),
        ]
        if not o.idempotent_503_retry:
            argv.append("--no-idempotent-503-retry")
        if self.inbound is not None and o.app is not None:
            argv += ["--inbound", format_addr(self.inbound), "--app", format_addr(o.app)]
        if o.cert_dir is not None:
            argv += ["--cert-dir", os.path.abspath(o.cert_dir)]
        for addr in (o.admin, o.health, o.metrics):  # the supervisor's own listeners
            if addr is not None and addr[1] != 0:
                argv += ["--own-port", str(addr[1])]
        return argv

    async def spawn(self, w: Worker) -> None:
        """Start worker ``w`` and wait for its listening line."""
        # Own session: a terminal's Ctrl-C reaches only the supervisor, which then stops each
        # worker exactly once (a second signal would cut the worker's drain short).
        proc = await asyncio.create_subprocess_exec(
            *self.worker_argv(w.index),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        w.proc, w.admin = proc, None
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), WORKER_START_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise WorkerStartError(f"worker {w.index} did not start in time") from None
        text = line.decode(errors="replace").strip()
        fields = dict(p.split("=", 1) for p in text.split()[1:] if "=" in p)
        if not text.startswith("listening ") or "admin" not in fields:
            code = await proc.wait()
            raise WorkerStartError(f"worker {w.index} exited with code {code} before listening")
        w.admin = parse_addr(fields["admin"])
        w.pump = asyncio.create_task(self._pump(proc), name=f"worker-{w.index}-stdout")
        log.info("worker %d started (pid %d, admin %s)", w.index, proc.pid, fields["admin"])

    async def _pump(self, proc: asyncio.subprocess.Process) -> None:
        """Keep reading a worker's stdout so it can never block on a full pipe; with
        ``--access-log -`` copy its lines (whole) to our stdout after our listening line."""
        assert proc.stdout is not None
        forward = self.opts.access_log == STDOUT
        while True:
            try:
                line = await proc.stdout.readline()
            except ValueError:  # a line over the reader's limit: dropped, keep reading
                log.warning("dropped an over-long line from a worker's stdout")
                continue
            if not line:
                return
            if forward:
                await self.stdout_open.wait()
                if line.endswith(b"\n"):
                    try:
                        os.write(1, line)
                    except OSError as e:
                        log.error("cannot write the access log to stdout: %s", e)
                        forward = False

    async def _monitor(self, w: Worker) -> None:
        """Restart worker ``w`` whenever it dies while we are not stopping."""
        loop = asyncio.get_running_loop()
        backoff = 0.1
        started = loop.time()
        while not self.stopping:
            if w.proc is not None:
                code = await w.proc.wait()
                if self.stopping:
                    return
                log.warning(
                    "worker %d (pid %d) exited with code %s: restarting", w.index, w.pid, code
                )
                if loop.time() - started > 10 * RESTART_BACKOFF_MAX:
                    backoff = 0.1  # it ran fine for a while: not a crash loop
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RESTART_BACKOFF_MAX)
            if self.stopping:
                return
            try:
                started = loop.time()
                await self.spawn(w)
                w.restarts += 1
                if self.draining:
                    await self._post(w, "/drain")
            except (WorkerStartError, OSError, FetchError) as e:
                log.error("restarting worker %d failed: %s", w.index, e)
                if w.proc is not None and w.proc.returncode is None:
                    continue  # it started; only the drain call failed
                w.proc = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        try:
            await asyncio.gather(*(self.spawn(w) for w in self.workers))
        except WorkerStartError as e:
            await self._terminate_all(0.0)
            raise UsageError(f"{e} (see its log above)") from None
        host, port = self.opts.admin
        try:
            self.admin_addr = await self.admin.start(host, port)
        except OSError as e:
            await self._terminate_all(0.0)
            raise UsageError(f"cannot listen on admin {format_addr(self.opts.admin)}: {e}") from e
        try:
            await self.status.start(self.opts.health, self.opts.metrics)
        except UsageError:
            await self.admin.close()
            await self._terminate_all(0.0)
            raise
        self._monitors = [asyncio.create_task(self._monitor(w)) for w in self.workers]
        if self.opts.exit_with_app is not None:
            self._monitors.append(asyncio.create_task(self._watch_app(), name="app-watch"))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def listening_line(self) -> str:
        assert self.admin_addr is not None
        return listening_line(
            self.outbound, self.admin_addr, self.inbound, self.status.health, self.status.metrics
        )

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("%s: stopping %d worker(s)", sig.name, len(self.workers))
        if self._stop.is_set():  # second signal: pass it on, workers cut their drain short
            for w in self.workers:
                if w.alive and w.proc is not None:
                    w.proc.send_signal(signal.SIGTERM)
        self._stop.set()

    async def serve(self) -> int:
        await self._stop.wait()
        self.stopping = True
        self.draining = True
        await self._terminate_all(self.opts.drain_seconds + STOP_GRACE)
        for t in self._monitors:
            t.cancel()
        for t in self._monitors:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await self.status.close()
        await self.admin.close()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        return 0

    async def _terminate_all(self, grace: float) -> None:
        """SIGTERM every worker (each drains itself), SIGKILL any still alive after grace."""
        self.stopping = True
        live = [w for w in self.workers if w.alive and w.proc is not None]
        procs = [w.proc for w in live if w.proc is not None]
        quit_ok = [False] * len(live)
        if self._quit:  # a full drain in every worker; SIGTERM where the call fails
            quit_ok = list(await asyncio.gather(*(self._quit_worker(w) for w in live)))
        for p, ok in zip(procs, quit_ok, strict=True):
            if not ok:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
        if not procs:
            return
        await asyncio.wait([asyncio.create_task(p.wait()) for p in procs], timeout=grace)
        for p in procs:
            if p.returncode is None:
                log.warning("worker pid %d did not stop in time: killing it", p.pid)
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
        for p in procs:
            await p.wait()
        pumps = [w.pump for w in self.workers if w.pump is not None]
        if pumps:  # let them copy what the workers wrote last (EOF follows the exit)
            await asyncio.wait(pumps, timeout=PUMP_FINISH_TIMEOUT)
        for w in self.workers:
            if w.pump is not None:
                w.pump.cancel()

    # ------------------------------------------------------------------ worker admin calls

    async def _get(self, w: Worker, path: str) -> tuple[int, Any]:
        assert w.admin is not None
        host, port = w.admin
        status, ctype, body = await fetch(host, port, "GET", path, WORKER_ADMIN_TIMEOUT)
        if ctype == "application/json":
            try:
                return status, json.loads(body)
            except ValueError:
                raise FetchError(f"{path}: invalid JSON from worker {w.index}") from None
        return status, body.decode(errors="replace")

    async def _post(self, w: Worker, path: str) -> int:
        assert w.admin is not None
        host, port = w.admin
        status, _, _ = await fetch(host, port, "POST", path, WORKER_ADMIN_TIMEOUT)
        return status

    async def _quit_worker(self, w: Worker) -> bool:
        if w.admin is None:
            return False
        try:
            return await self._post(w, "/quitquitquit") == 200
        except FetchError:
            return False

    async def _ask_all(self, path: str) -> list[tuple[int, Any] | BaseException]:
        live = [w for w in self.workers if w.alive and w.admin is not None]
        if len(live) < len(self.workers):
            return [ConnectionError("a worker is not running")]
        return await asyncio.gather(*(self._get(w, path) for w in live), return_exceptions=True)

    # ------------------------------------------------------------------ AdminBackend

    async def is_ready(self) -> bool:
        if self.draining or self.admin_addr is None:
            return False
        answers = await self._ask_all("/ready")
        return all(not isinstance(a, BaseException) and a[0] == 200 for a in answers)

    async def config_dump(self, query: Mapping[str, str] | None = None) -> dict[str, Any]:
        # Forward the filters: a worker's whole dump of a big table is tens of MB, while
        # `?resource=version` (what "is my edit applied yet" polls ask) is a few bytes.
        path = "/config_dump" + (f"?{urlencode(dict(query))}" if query else "")
        for w in self.workers:
            if w.alive and w.admin is not None:
                try:
                    status, dump = await self._get(w, path)
                except FetchError:
                    continue
                if status == 200 and isinstance(dump, dict):
                    dump["workers"] = [w.pid for w in self.workers]
                    return dump
        return {"version": "", "last_error": "no worker is answering", "workers": []}

    async def clusters(self) -> dict[str, Any]:
        views = [
            a[1]
            for a in await self._ask_all("/clusters")
            if not isinstance(a, BaseException) and a[0] == 200
        ]
        return merge_clusters(views)

    async def stats_export(self) -> Export:
        exports = [
            a[1]
            for a in await self._ask_all("/stats?format=json")
            if not isinstance(a, BaseException) and a[0] == 200
        ]
        return merge_exports(exports)

    async def drain(self) -> None:
        self.draining = True
        live = [w for w in self.workers if w.alive and w.admin is not None]
        await asyncio.gather(*(self._post(w, "/drain") for w in live), return_exceptions=True)

    def request_quit(self) -> None:
        log.info("quitquitquit: stopping %d worker(s)", len(self.workers))
        if not self._stop.is_set():
            self._quit = True
        self._stop.set()

    async def _watch_app(self) -> None:
        target = self.opts.exit_with_app
        assert target is not None
        await watch_app(target, DEFAULT_SETTINGS.app_check_interval)
        if not self._stop.is_set():
            log.info("--exit-with-app: the application (%s) is gone: stopping", target)
            self._quit = True
            self._stop.set()

    async def _workers_handler(self, request: AdminRequest) -> AdminResponse:
        rows = [
            {
                "index": w.index,
                "pid": w.pid,
                "alive": w.alive,
                "admin": None if w.admin is None else format_addr(w.admin),
                "restarts": w.restarts,
            }
            for w in self.workers
        ]
        return AdminResponse.json({"workers": rows})


async def _main(opts: RunOptions, outbound: Addr, inbound: Addr | None) -> int:
    sup = Supervisor(opts, outbound, inbound)
    await sup.start()
    print(sup.listening_line(), flush=True)
    sup.stdout_open.set()
    log.info("%s (%d workers)", sup.listening_line(), len(sup.workers))
    return await sup.serve()


def supervise(opts: RunOptions) -> int:
    """``meshproxy run --workers N`` (N > 1); returns the exit code."""
    import uvloop

    from meshproxy.app import identity_for, settings_for

    try:
        check_target(opts.access_log)
    except AccessLogError as e:
        raise UsageError(str(e)) from None
    # Validate once here, so a bad config is exit 2 with its problems, not N dead workers.
    if opts.control_plane is None:
        source = FileSource(opts.config, identity_for(opts), State(), settings_for(opts))
        result = source.build()
        if result.snapshot is None:
            raise UsageError("invalid config:\n" + "\n".join(f"  {p}" for p in result.problems))
    if opts.cert_dir is not None:  # a bad identity is exit 2 here too, not N dead workers
        from meshproxy.tls import IdentityError, load_identity

        try:
            load_identity(opts.cert_dir)
        except IdentityError as e:
            raise UsageError(f"--cert-dir: {e}") from None
    host, port = opts.outbound
    try:
        reservation = reserve_port(host, port)
    except OSError as e:
        raise UsageError(f"cannot listen on outbound {format_addr(opts.outbound)}: {e}") from e
    in_reservation: socket.socket | None = None
    try:
        outbound = (host, reservation.getsockname()[1])
        inbound: Addr | None = None
        if opts.inbound is not None:
            ihost, iport = opts.inbound
            try:
                in_reservation = reserve_port(ihost, iport)
            except OSError as e:
                raise UsageError(
                    f"cannot listen on inbound {format_addr(opts.inbound)}: {e}"
                ) from e
            inbound = (ihost, in_reservation.getsockname()[1])
        return uvloop.run(_main(opts, outbound, inbound))
    finally:
        reservation.close()
        if in_reservation is not None:
            in_reservation.close()
