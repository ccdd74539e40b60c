"""Start-up and shutdown order of a sidecar: ``meshproxy wait``, the health and metrics
listeners, ``--exit-with-app`` and the sidecar's stop rule.

Theory of operation
-------------------
*Start-up.* Kubernetes starts a pod's containers in order but does not wait for one to be
ready before starting the next, unless the first has a ``postStart`` hook: the kubelet runs the
hook to completion before it starts the next container. Istio's
``holdApplicationUntilProxyStarts`` puts the sidecar first with ``pilot-agent wait`` as that
hook; ``meshproxy wait`` is the same command: it polls ``--url``
[``http://127.0.0.1:15021/healthz/ready``] every ``--period`` [0.5 s] with a per-request
deadline of ``--request-timeout`` [0.5 s] until one answer is ``200`` (exit 0), or exits 1
with the last answer or error once ``--timeout`` [60 s] has passed (Istio's defaults:
``timeoutSeconds`` 60, ``periodMillis`` 500, ``requestTimeoutMillis`` 500). The loop itself
(:func:`poll_until_ready`) takes the probe, the clock and the sleep as arguments.

*Health and metrics ports.* ``run --health ADDR`` serves ``GET /healthz/ready`` (the same
answer as admin ``/ready``: 200, or 503 while starting and stopping) and ``--metrics ADDR``
serves ``GET /stats/prometheus`` (the admin's text), each on its own listener
(:class:`StatusListeners`: two :class:`~meshproxy.admin.Admin` servers restricted to that one
path), so the kubelet and Prometheus reach them on the pod IP (Istio's 15021 and 15090) while
the admin port (15000, with ``/drain`` and ``/quitquitquit``) stays on localhost. With
``--workers N`` the supervisor serves them from its aggregated view.

*Application probes (Istio's rewriteAppHTTPProbe).* Under PeerAuthentication STRICT the
kubelet's plaintext probes of a captured application port are refused by the inbound
listener, so the injector rewrites each application container's httpGet / tcpSocket probe to
``GET /app-health/<container>/readyz|livez|startupz`` on the health port and hands the
originals to ``run --app-probers JSON`` (the format of pilot-agent's
``ISTIO_KUBE_APP_PROBERS``: path -> ``{"httpGet": {...}|"tcpSocket": {...},
"timeoutSeconds": N}``; :func:`parse_app_probers`). The health listener answers those paths
by performing the original probe from inside the pod, over localhost, which capture never
redirects (:func:`run_app_probe`): an httpGet as the kubelet sends it (its scheme, https
without certificate verification, its host [127.0.0.1], path and headers, ``User-Agent:
kube-probe``), answered 200 when the application answers 2xx/3xx (the kubelet's success
range), else with the application's status; a tcpSocket probe is a connect, 200 or 503. No
answer within the probe's ``timeoutSeconds`` [1], or no connection, is 503.

*Shutdown (Istio issue 7136).* Kubernetes sends SIGTERM to the application and the sidecar at
the same time. A sidecar (``run --inbound``) then: answers 503 on ``/ready`` and
``/healthz/ready``, stops accepting inbound connections (the ones open finish their in-flight
request and close), **keeps accepting and serving the application's outbound calls**, and
exits 0 once no downstream connection is open (inbound and outbound) -- but never before
``--min-drain-seconds`` [5] (Istio's ``MINIMUM_DRAIN_DURATION``: an application that holds no
connection at the moment of SIGTERM may still call out while it shuts down) and at the latest
after ``--drain-seconds`` [5] (Istio's ``terminationDrainDuration``). This is Istio's
``EXIT_ON_ZERO_ACTIVE_CONNECTIONS`` with the two durations as flags; with the defaults the
sidecar waits 5 s, like Istio's default. :func:`drain_window` is that rule.

Without ``--inbound`` (an egress or front proxy) SIGTERM keeps the standalone order: every
listener refuses new connections at once and in-flight requests get ``--drain-seconds``.
``--stop-order sidecar|drain`` overrides that choice (:func:`sidecar_stop`): a sidecar of a pod
that declares no port has no inbound listener and still wants the sidecar order.
``POST /drain`` is always that full drain, and so are ``POST /quitquitquit`` and
``--exit-with-app``: the application is done, so nobody needs the outbound listener.

*Jobs.* ``--exit-with-app pid:N`` or ``--exit-with-app port:N`` (:class:`AppTarget`) makes
the sidecar watch the application (:func:`watch_app`): a PID through a pidfd (readable once
the process has ended; polled with ``kill(pid, 0)`` where pidfds are missing), a TCP port on
localhost by connecting every ``Settings.app_check_interval``: the application is gone once
the port refuses connections after having accepted one. Then the sidecar drains and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import http.client
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from meshproxy.admin import Admin, AdminBackend, AdminRequest, AdminResponse, Handler

log = logging.getLogger("meshproxy.lifecycle")

Addr = tuple[str, int]

DEFAULT_WAIT_URL = "http://127.0.0.1:15021/healthz/ready"
DEFAULT_WAIT_TIMEOUT = 60.0  # Istio's pilot-agent wait --timeoutSeconds
DEFAULT_WAIT_PERIOD = 0.5  # --periodMillis
DEFAULT_WAIT_REQUEST_TIMEOUT = 0.5  # --requestTimeoutMillis
MAX_ANSWER_BYTES = 64 * 1024  # a readiness answer is read up to this much, then dropped
PORT_CONNECT_TIMEOUT = 1.0  # a --exit-with-app port probe that takes longer proves nothing


# --------------------------------------------------------------------------- durations

_NUMBER = re.compile(r"\d+(?:\.\d*)?|\.\d+")


def parse_duration(text: str) -> float:
    """``60s``, ``500ms``, ``1m30s`` (Go's duration syntax, as Istio's fields take it: the
    one parser, :func:`control.istio.schema.parse_duration`), or a bare number of seconds
    -> seconds, never negative; an argparse type."""
    from control.istio.schema import parse_duration as go_duration

    s = text.strip()
    total = float(s) if _NUMBER.fullmatch(s) else go_duration(s)
    if total is None or total < 0:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected a duration such as 60s, 500ms or 1m30s"
        )
    if total == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: too long")
    return total


def _positive_duration(text: str) -> float:
    d = parse_duration(text)
    if d <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be more than 0")
    return d


# --------------------------------------------------------------------------- meshproxy wait


@dataclass(frozen=True, slots=True)
class WaitResult:
    ready: bool
    attempts: int
    elapsed: float
    last: str  # the last answer ("HTTP 503") or error; "HTTP 200" when ready


def poll_until_ready(
    probe: Callable[[float], str | None],
    timeout: float,
    period: float,
    request_timeout: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> WaitResult:
    """Call ``probe(deadline_for_this_request)`` until it returns None (ready), at once and
    then every ``period``, never past ``timeout``; ``probe`` returns what was wrong instead
    ("HTTP 503", "connection refused", ...). The last probe's deadline is cut to the time
    left, so the whole wait never overruns ``timeout`` by more than a scheduling delay."""
    start = clock()
    deadline = start + timeout
    attempts = 0
    last = "no attempt"
    while True:
        left = deadline - clock()
        if left <= 0:
            return WaitResult(False, attempts, clock() - start, last)
        attempts += 1
        problem = probe(min(request_timeout, left))
        if problem is None:
            return WaitResult(True, attempts, clock() - start, "HTTP 200")
        last = problem
        left = deadline - clock()
        if left <= 0:
            return WaitResult(False, attempts, clock() - start, last)
        sleep(min(period, left))


def parse_http_url(url: str) -> tuple[str, int, str]:
    """``http://HOST[:PORT]/PATH`` -> (host, port, path with query); ValueError otherwise."""
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise ValueError("only http:// URLs are supported")
    try:
        port = parts.port or 80
    except ValueError:
        raise ValueError("bad port") from None
    if not parts.hostname:
        raise ValueError("missing host")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.hostname, port, path


def http_probe(host: str, port: int, path: str) -> Callable[[float], str | None]:
    """One GET per call, under the given deadline (no proxy from the environment: the target
    is this pod's own sidecar); None when the answer is 200."""

    def probe(timeout: float) -> str | None:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            conn.request("GET", path, headers={"Connection": "close"})
            resp = conn.getresponse()
            resp.read(MAX_ANSWER_BYTES)
            return None if resp.status == 200 else f"HTTP {resp.status}"
        except TimeoutError:
            return f"no answer within {timeout:g}s"
        except (OSError, http.client.HTTPException) as e:
            return str(e) or type(e).__name__
        finally:
            conn.close()

    return probe


def add_wait_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``wait`` to ``sub``, the top-level ``add_subparsers()`` object."""
    p = sub.add_parser(
        "wait",
        help="wait until the sidecar is ready (a postStart hook)",
        description="Poll URL until it answers 200 (exit 0), or exit 1 once --timeout has "
        "passed. As the sidecar container's postStart hook it holds the application's "
        "container until the sidecar is ready (Istio's holdApplicationUntilProxyStarts; "
        "pilot-agent wait).",
    )
    p.add_argument("--url", default=DEFAULT_WAIT_URL, metavar="URL", help=f"[{DEFAULT_WAIT_URL}]")
    p.add_argument(
        "--timeout",
        type=_positive_duration,
        default=DEFAULT_WAIT_TIMEOUT,
        metavar="DURATION",
        help="give up after this long, e.g. 60s, 2m [60s]",
    )
    p.add_argument(
        "--period",
        type=_positive_duration,
        default=DEFAULT_WAIT_PERIOD,
        metavar="DURATION",
        help="pause between two attempts [500ms]",
    )
    p.add_argument(
        "--request-timeout",
        type=_positive_duration,
        default=DEFAULT_WAIT_REQUEST_TIMEOUT,
        metavar="DURATION",
        help="deadline of one attempt [500ms]",
    )
    return p


def run_wait(ns: argparse.Namespace) -> int:
    """``meshproxy wait``: 0 when ready, 1 at the timeout (message on stderr); a bad URL is a
    UsageError (exit 2)."""
    from meshproxy.cli import UsageError

    try:
        host, port, path = parse_http_url(ns.url)
    except ValueError as e:
        raise UsageError(f"--url {ns.url}: {e}") from None
    result = poll_until_ready(
        http_probe(host, port, path), ns.timeout, ns.period, ns.request_timeout
    )
    if result.ready:
        print(f"ready: {ns.url} answered 200 after {result.elapsed:.1f}s", flush=True)
        return 0
    print(
        f"meshproxy: error: {ns.url} not ready after {ns.timeout:g}s "
        f"({result.attempts} attempt(s)); last: {result.last}",
        file=sys.stderr,
    )
    return 1


# --------------------------------------------------------------------------- the stop rule


STOP_ORDERS = ("auto", "sidecar", "drain")


def sidecar_stop(stop_order: str, inbound: bool) -> bool:
    """Whether SIGTERM/SIGINT stop in the sidecar order (``--stop-order``): ``sidecar``, or
    ``auto`` [the default] with an inbound listener; ``drain`` is the standalone order."""
    return stop_order == "sidecar" or (stop_order == "auto" and inbound)


def drain_window(drain_seconds: float, min_drain_seconds: float) -> tuple[float, float]:
    """A stopping sidecar's (earliest, latest) exit, in seconds after SIGTERM: it exits at the
    first moment past ``earliest`` with no downstream connection open, and at ``latest`` in
    any case. ``--min-drain-seconds`` never delays the exit past ``--drain-seconds``."""
    return min(min_drain_seconds, drain_seconds), drain_seconds


# --------------------------------------------------------------------------- health and metrics


class StatusListeners:
    """``--health`` (``GET /healthz/ready``, and ``probers``' ``/app-health/...`` paths) and
    ``--metrics`` (``GET /stats/prometheus``): admin servers restricted to those paths,
    answering from ``backend``."""

    def __init__(
        self, backend: AdminBackend, probers: Mapping[str, AppProber] | None = None
    ) -> None:
        self.backend = backend
        self.probers = dict(probers or {})
        self.health: Addr | None = None
        self.metrics: Addr | None = None
        self._servers: list[Admin] = []

    async def start(self, health: Addr | None, metrics: Addr | None) -> None:
        """Bind what is asked; a port that cannot be bound is a UsageError (exit 2)."""
        from meshproxy.admin import Admin
        from meshproxy.cli import UsageError, format_addr

        for what, addr, path in (
            ("health", health, "/healthz/ready"),
            ("metrics", metrics, "/stats/prometheus"),
        ):
            if addr is None:
                continue
            extra = _prober_routes(self.probers) if what == "health" else {}
            server = Admin(self.backend, extra, only=frozenset({path, *self.probers}))
            try:
                bound = await server.start(*addr)
            except OSError as e:
                await self.close()
                raise UsageError(f"cannot listen on {what} {format_addr(addr)}: {e}") from e
            self._servers.append(server)
            if what == "health":
                self.health = bound
            else:
                self.metrics = bound

    async def close(self) -> None:
        servers, self._servers = self._servers, []
        for server in servers:
            await server.close()

    def __repr__(self) -> str:
        return f"StatusListeners(health={self.health!r}, metrics={self.metrics!r})"


# --------------------------------------------------------------------------- app probes

APP_HEALTH_PREFIX = "/app-health/"
DEFAULT_PROBE_TIMEOUT = 1  # the kubelet's timeoutSeconds default
PROBE_USER_AGENT = "kube-probe/1.30"


@dataclass(frozen=True, slots=True)
class AppProber:
    """One original application probe: ``tcp`` connects, else an httpGet."""

    port: int
    tcp: bool = False
    host: str = "127.0.0.1"
    path: str = "/"
    https: bool = False
    headers: tuple[tuple[str, str], ...] = ()
    timeout: float = DEFAULT_PROBE_TIMEOUT


def parse_app_probers(text: str) -> dict[str, AppProber]:
    """``--app-probers``: Istio's ``ISTIO_KUBE_APP_PROBERS`` JSON -> path -> :class:`AppProber`;
    anything malformed is an ``ArgumentTypeError`` naming the path and field (exit 2)."""
    import json

    try:
        doc = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise argparse.ArgumentTypeError("expected a JSON object of path -> probe")
    return {path: _prober(path, spec) for path, spec in doc.items()}


def _prober(path: str, spec: Any) -> AppProber:
    def bad(what: str) -> argparse.ArgumentTypeError:
        return argparse.ArgumentTypeError(f"{path}: {what}")

    if not path.startswith(APP_HEALTH_PREFIX) or len(path) == len(APP_HEALTH_PREFIX):
        raise bad(f"a path must start with {APP_HEALTH_PREFIX}")
    if not isinstance(spec, dict):
        raise bad("expected an object")
    timeout = spec.get("timeoutSeconds", DEFAULT_PROBE_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout < 1:
        raise bad("timeoutSeconds: expected a whole number >= 1")
    handlers = [k for k in ("httpGet", "tcpSocket") if k in spec]
    if len(handlers) != 1 or not isinstance(spec[handlers[0]], dict):
        raise bad("expected exactly one of httpGet, tcpSocket (an object)")
    kind = handlers[0]
    action = spec[kind]
    port = action.get("port")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise bad(f"{kind}.port: expected a port number (1-65535)")
    host = action.get("host") or "127.0.0.1"
    if not isinstance(host, str):
        raise bad(f"{kind}.host: expected a string")
    if kind == "tcpSocket":
        return AppProber(port, tcp=True, host=host, timeout=float(timeout))
    probe_path = action.get("path") or "/"
    if not isinstance(probe_path, str) or not probe_path.startswith("/"):
        raise bad("httpGet.path: expected an absolute path")
    if any(ch in probe_path for ch in " \r\n"):
        raise bad("httpGet.path: no spaces or line breaks")
    scheme = str(action.get("scheme") or "HTTP").upper()
    if scheme not in ("HTTP", "HTTPS"):
        raise bad("httpGet.scheme: expected HTTP or HTTPS")
    headers: list[tuple[str, str]] = []
    for h in action.get("httpHeaders") or []:
        name, value = (h.get("name"), h.get("value")) if isinstance(h, dict) else (None, None)
        if not isinstance(name, str) or not isinstance(value, str) or not name:
            raise bad("httpGet.httpHeaders: expected [{name, value}] strings")
        if any(ch in name + value for ch in "\r\n") or ":" in name:
            raise bad(f"httpGet.httpHeaders: bad header {name!r}")
        headers.append((name, value))
    return AppProber(
        port,
        host=host,
        path=probe_path,
        https=scheme == "HTTPS",
        headers=tuple(headers),
        timeout=float(timeout),
    )


async def run_app_probe(prober: AppProber) -> int:
    """Perform the original probe against the application: the status to answer the kubelet
    (200 on success; the application's status for an HTTP failure; 503 without an answer)."""
    import ssl

    from meshproxy.net.listen import strip_brackets

    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(prober.timeout):
            ctx: ssl.SSLContext | None = None
            if prober.https:  # as the kubelet: TLS, but no certificate verification
                ctx = ssl.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            host = strip_brackets(prober.host)
            reader, writer = await asyncio.open_connection(host, prober.port, ssl=ctx)
            if prober.tcp:
                return 200
            names = {n.lower() for n, _ in prober.headers}
            authority = f"[{host}]" if ":" in host else host
            lines = [f"GET {prober.path} HTTP/1.1"]
            if "host" not in names:
                lines.append(f"Host: {authority}:{prober.port}")
            if "user-agent" not in names:
                lines.append(f"User-Agent: {PROBE_USER_AGENT}")
            if "accept" not in names:
                lines.append("Accept: */*")
            lines += [f"{n}: {v}" for n, v in prober.headers]
            lines.append("Connection: close")
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            status_line = await reader.readline()
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
            return 503
        status = int(parts[1])
        if 200 <= status < 400:
            return 200
        return status if 400 <= status < 600 else 503
    except (OSError, TimeoutError, UnicodeError, ValueError):
        return 503
    finally:
        if writer is not None:
            writer.close()


def _prober_routes(probers: Mapping[str, AppProber]) -> dict[tuple[str, str], Handler]:
    routes: dict[tuple[str, str], Handler] = {}
    for path, prober in probers.items():

        async def handler(req: AdminRequest, prober: AppProber = prober) -> AdminResponse:
            from meshproxy.admin import AdminResponse

            status = await run_app_probe(prober)
            return AdminResponse.text("OK\n" if status == 200 else "probe failed\n", status)

        routes[("GET", path)] = handler
    return routes


# --------------------------------------------------------------------------- --exit-with-app


@dataclass(frozen=True, slots=True)
class AppTarget:
    """What ``--exit-with-app`` watches: a process (``pid``) or a TCP address (``addr``)."""

    pid: int | None = None
    addr: Addr | None = None

    def __str__(self) -> str:
        if self.pid is not None:
            return f"pid {self.pid}"
        assert self.addr is not None
        host, port = self.addr
        return f"port {host}:{port}" if ":" not in host else f"port [{host}]:{port}"


def parse_app_target(text: str) -> AppTarget:
    """``pid:N`` or ``N`` -> a process; ``port:N`` or ``HOST:PORT`` -> a TCP port (``port:N``
    means 127.0.0.1). An argparse type."""
    from meshproxy.cli import parse_addr

    s = text.strip()
    kind, sep, value = s.partition(":")
    if sep and kind in ("pid", "port"):
        if not value.isdigit():
            raise argparse.ArgumentTypeError(f"{text!r}: {kind}: expects a number")
        n = int(value)
        if kind == "pid":
            if n < 1:
                raise argparse.ArgumentTypeError(f"{text!r}: a PID is at least 1")
            return AppTarget(pid=n)
        if not 1 <= n <= 65535:
            raise argparse.ArgumentTypeError(f"{text!r}: a port is 1..65535")
        return AppTarget(addr=("127.0.0.1", n))
    if s.isdigit():
        if int(s) < 1:
            raise argparse.ArgumentTypeError(f"{text!r}: a PID is at least 1")
        return AppTarget(pid=int(s))
    try:
        host, port = parse_addr(s)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected pid:N (or N), port:N or HOST:PORT"
        ) from None
    if port == 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a port is 1..65535")
    return AppTarget(addr=(host, port))


def check_app_target(target: AppTarget) -> None:
    """At start-up: a PID must name a running process (a port may open later: the sidecar
    starts before its application). Raises UsageError."""
    from meshproxy.cli import UsageError

    if target.pid is None:
        return
    try:
        os.kill(target.pid, 0)
    except ProcessLookupError:
        raise UsageError(
            f"--exit-with-app: no process with pid {target.pid} "
            f"(for the application's port, write port:{target.pid})"
        ) from None
    except PermissionError:
        pass  # it exists, under another uid: watching still works


async def watch_app(target: AppTarget, interval: float) -> None:
    """Return once the application is gone (see the module docstring)."""
    if target.pid is not None:
        await _watch_pid(target.pid, interval)
    else:
        assert target.addr is not None
        await _watch_port(target.addr, interval)


def _pid_ended(pid: int) -> bool:
    """Without a pidfd: gone, or a zombie nobody has reaped yet (that has ended too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] in (b"Z", b"X")


async def _watch_pid(pid: int, interval: float) -> None:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except (AttributeError, OSError) as e:  # no pidfd (old kernel, seccomp): poll
        log.debug("pidfd_open(%d) unavailable (%s): polling", pid, e)
        while not _pid_ended(pid):
            await asyncio.sleep(interval)
        return
    loop = asyncio.get_running_loop()
    ended = loop.create_future()
    loop.add_reader(fd, lambda: ended.done() or ended.set_result(None))
    try:
        await ended  # a pidfd turns readable when the process has ended
    finally:
        loop.remove_reader(fd)
        os.close(fd)


async def _port_state(addr: Addr) -> bool | None:
    """True: accepts connections; False: refused; None: no clear answer (a timeout, ...)."""
    from meshproxy.net.listen import strip_brackets

    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(PORT_CONNECT_TIMEOUT):
            _, writer = await asyncio.open_connection(strip_brackets(addr[0]), addr[1])
        return True
    except ConnectionRefusedError:
        return False
    except (OSError, TimeoutError) as e:
        if isinstance(e, OSError) and e.errno == errno.ECONNREFUSED:
            return False
        return None
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def _watch_port(addr: Addr, interval: float) -> None:
    seen = False
    while True:
        state = await _port_state(addr)
        if state and not seen:
            seen = True
            log.info("--exit-with-app: the application accepts connections on port %d", addr[1])
        elif state is False and seen:
            return
        await asyncio.sleep(interval)
