"""Open-loop, fixed-rate HTTP/1.1 load generator, and a closed-loop "stall" prober.

Theory of operation
-------------------
``wrk`` is closed-loop: a slow response delays the next request, so a stall hides itself
(coordinated omission). ``rate`` mode is open-loop instead, in the manner of wrk2: each of the
``C`` keep-alive connections owns a fixed schedule of *intended* send times (``C / rate``
apart, the connections staggered evenly), and a request's latency is measured from the moment
it *should* have been sent:

* when the connection is still busy with the previous response at the intended time (the
  system under test is late), the next request goes out as soon as that response ends and its
  latency starts at the intended time, so the queueing the server caused is charged to it;
* when the connection is idle, a timer sends the request; uvloop timers have millisecond
  granularity, so the send may be a little late *because of the generator*; that lateness is
  not the server's fault and the latency then starts at the actual send (the lateness is
  reported separately as ``timer_late_*``).

Responses are parsed with httptools (llhttp) on raw ``asyncio.Protocol`` transports; time is
``time.perf_counter`` (CLOCK_MONOTONIC, nanosecond resolution). The first ``warmup`` seconds
are sent but not recorded; a request that has not completed ``drain`` seconds after the end
counts as a timeout. A connection the server closes is reopened (the reconnect time is
charged to the waiting request).

``loop`` mode keeps ``C`` connections busy back to back (closed loop), until ``duration`` or a
SIGTERM, and records the longest
gap between two consecutive responses on any connection, plus the times at which the value of
a watched response header changes. The harness uses it to see how long a config reload stalls
the data plane. Its timestamps are ``time.monotonic()``, comparable across processes.

Both modes read the request list (``[[host, path], ...]``, used in rotation) from
``--requests`` or build one from ``--host`` and ``--path``, and print one JSON object on
stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import httptools
import uvloop


def build_requests(pairs: list[tuple[str, str]]) -> list[bytes]:
    return [
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: meshproxy-bench\r\n\r\n".encode()
        for host, path in pairs
    ]


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of an ascending list."""
    if not sorted_values:
        return None
    rank = max(1, min(len(sorted_values), math.ceil(q / 100.0 * len(sorted_values))))
    return sorted_values[rank - 1]


# --------------------------------------------------------------------------- the client side


class _Client(asyncio.Protocol):
    """One keep-alive connection; calls ``on_response(status, headers)`` per response.

    Called by the event loop (``data_received`` / ``connection_lost``); the owner sends with
    :meth:`send`. ``closed`` is set once the transport is gone.
    """

    def __init__(
        self,
        on_response: Callable[[int, dict[bytes, bytes] | None], None],
        on_lost: Callable[[_Client], None],
        want_headers: bool = False,
    ) -> None:
        self._on_response = on_response
        self._on_lost = on_lost
        self._want_headers = want_headers
        self._headers: dict[bytes, bytes] = {}
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.get_running_loop().create_future()
        self.keep_alive = True

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport, but implement it
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self.keep_alive = False
            if self.transport is not None:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        self._on_lost(self)

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        if self._want_headers:
            self._headers[name.lower()] = value

    def on_message_complete(self) -> None:
        # read keep-alive here: httptools resets the parser once feed_data() returns
        self.keep_alive = self._parser.should_keep_alive()
        status = self._parser.get_status_code()
        headers = self._headers if self._want_headers else None
        self._headers = {}
        self._on_response(status, headers)

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


async def _connect(
    target: tuple[str, int],
    on_response: Callable[[int, dict[bytes, bytes] | None], None],
    on_lost: Callable[[_Client], None],
    want_headers: bool = False,
) -> _Client:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(
        lambda: _Client(on_response, on_lost, want_headers), target[0], target[1]
    )
    return proto


# --------------------------------------------------------------------------- rate mode

TIMELINE_BUCKET = 0.5  # seconds; the worst latency per bucket of intended send times


@dataclass
class RateResult:
    latencies: list[float] = field(default_factory=list)  # seconds, measured window only
    sent: int = 0
    ok: int = 0
    non_2xx: int = 0
    errors: int = 0
    reconnects: int = 0
    timer_late: list[float] = field(default_factory=list)
    worst: float = 0.0
    worst_at: float = 0.0  # intended send time of the slowest request, from the window start
    timeline: dict[int, float] = field(default_factory=dict)  # bucket -> worst latency


class _RateConn:
    """The schedule of one connection: intended send times ``start + k * interval``."""

    def __init__(
        self, gen: _RateGen, index: int, first: float, interval: float, requests: list[bytes]
    ) -> None:
        self.gen = gen
        self.index = index
        self.next_intended = first
        self.interval = interval
        self.requests = requests
        self.req_i = index % len(requests)
        self.client: _Client | None = None
        self.in_flight_start: float | None = None  # latency origin of the outstanding request
        self.in_flight_intended = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.connecting = False

    async def open(self) -> None:
        self.connecting = True
        try:
            self.client = await _connect(self.gen.target, self._on_response, self._on_lost)
        finally:
            self.connecting = False

    def schedule(self) -> None:
        """Arrange the next send (called after a response and at start)."""
        if self.next_intended >= self.gen.end:
            self.gen.conn_done(self)
            return
        now = time.perf_counter()
        if self.next_intended <= now:
            self._send(busy=True)
        else:
            loop = asyncio.get_running_loop()
            self.timer = loop.call_later(self.next_intended - now, self._send, False)

    def _send(self, busy: bool) -> None:
        self.timer = None
        if self.client is None or self.client.transport is None or self.client.closed.done():
            if self.connecting:
                return  # the reconnect in progress sends when it is done
            # reopen, then send; the intended time stays the latency origin
            self.gen.result.reconnects += 1
            self.gen.spawn(self._reopen_and_send())
            return
        now = time.perf_counter()
        intended = self.next_intended
        if busy:
            origin = intended
        else:
            origin = now
            self.gen.result.timer_late.append(max(0.0, now - intended))
        self.in_flight_start = origin
        self.in_flight_intended = intended
        self.next_intended += self.interval
        data = self.requests[self.req_i]
        self.req_i = (self.req_i + 1) % len(self.requests)
        self.gen.result.sent += 1
        self.client.send(data)

    async def _reopen_and_send(self) -> None:
        try:
            await self.open()
        except OSError:
            self.gen.result.errors += 1
            self.next_intended += self.interval
            await asyncio.sleep(0.01)
            self.schedule()
            return
        self._send(busy=True)

    def _on_response(self, status: int, _headers: dict[bytes, bytes] | None) -> None:
        end = time.perf_counter()
        origin = self.in_flight_start
        self.in_flight_start = None
        if origin is not None and self.in_flight_intended >= self.gen.measure_from:
            res = self.gen.result
            res.latencies.append(end - origin)
            bucket = int((self.in_flight_intended - self.gen.measure_from) / TIMELINE_BUCKET)
            if bucket >= 0:
                res.timeline[bucket] = max(res.timeline.get(bucket, 0.0), end - origin)
            if end - origin > res.worst:
                res.worst = end - origin
                res.worst_at = self.in_flight_intended - self.gen.measure_from
            if 200 <= status < 300:
                res.ok += 1
            else:
                res.non_2xx += 1
        client = self.client
        if client is not None and not client.keep_alive:
            # the server will close: drop this connection, the next send opens another
            self.client = None
            if client.transport is not None:
                client.transport.close()
        self.schedule()

    def _on_lost(self, client: _Client) -> None:
        if client is not self.client:
            return  # a connection we already gave up on
        if self.in_flight_start is not None:
            # the request died with the connection: an error, then carry on
            self.in_flight_start = None
            if self.in_flight_intended >= self.gen.measure_from:
                self.gen.result.errors += 1
            if not self.gen.stopping:
                self.schedule()


class _RateGen:
    def __init__(
        self,
        target: tuple[str, int],
        requests: list[bytes],
        rate: float,
        connections: int,
        duration: float,
        warmup: float,
    ) -> None:
        self.target = target
        self.requests = requests
        self.rate = rate
        self.connections = connections
        self.duration = duration
        self.warmup = warmup
        self.result = RateResult()
        self.measure_from = 0.0
        self.end = 0.0
        self.stopping = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._remaining = connections
        self._all_done: asyncio.Future[None] | None = None

    def spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def conn_done(self, conn: _RateConn) -> None:
        self._remaining -= 1
        if self._remaining == 0 and self._all_done is not None and not self._all_done.done():
            self._all_done.set_result(None)

    async def run(self, drain: float) -> RateResult:
        interval = self.connections / self.rate
        conns = [_RateConn(self, i, 0.0, interval, self.requests) for i in range(self.connections)]
        await asyncio.gather(*(c.open() for c in conns))
        self._all_done = asyncio.get_running_loop().create_future()
        start = time.perf_counter() + 0.05
        self.measure_from = start + self.warmup
        self.end = self.measure_from + self.duration
        for i, c in enumerate(conns):
            c.next_intended = start + i * interval / self.connections
            c.schedule()
        try:
            await asyncio.wait_for(asyncio.shield(self._all_done), self.end - start + drain)
        except TimeoutError:
            pass
        self.stopping = True
        for c in conns:
            if c.timer is not None:
                c.timer.cancel()
            if c.in_flight_start is not None and c.in_flight_intended >= self.measure_from:
                self.result.errors += 1  # never answered: a timeout
            if c.client is not None and c.client.transport is not None:
                c.client.transport.close()
        for task in list(self._tasks):
            task.cancel()
        return self.result


def summarize_rate(res: RateResult, duration: float, rate: float, connections: int) -> dict:
    lat = sorted(res.latencies)
    late = sorted(res.timer_late)
    buckets = 1 + max(res.timeline, default=-1)

    def us(v: float | None) -> float | None:
        return None if v is None else round(v * 1e6, 1)

    return {
        "mode": "rate",
        "target_rate": rate,
        "connections": connections,
        "duration_s": duration,
        "completed": len(lat),
        "achieved_rate": round(len(lat) / duration, 1) if duration > 0 else None,
        "ok": res.ok,
        "non_2xx": res.non_2xx,
        "errors": res.errors,
        "reconnects": res.reconnects,
        "latency_us": {
            "p50": us(percentile(lat, 50)),
            "p90": us(percentile(lat, 90)),
            "p99": us(percentile(lat, 99)),
            "p999": us(percentile(lat, 99.9)),
            "max": us(lat[-1] if lat else None),
            "mean": us(sum(lat) / len(lat) if lat else None),
        },
        "timer_late_us": {"p50": us(percentile(late, 50)), "p99": us(percentile(late, 99))},
        "worst_at_s": round(res.worst_at, 3),
        "timeline_bucket_s": TIMELINE_BUCKET,
        "timeline_worst_ms": [round(res.timeline.get(i, 0.0) * 1e3, 1) for i in range(buckets)],
    }


# --------------------------------------------------------------------------- loop mode


class _Looper:
    """One closed-loop connection: send, wait for the response, send again."""

    def __init__(self, owner: _LoopGen, requests: list[bytes], offset: int) -> None:
        self.owner = owner
        self.requests = requests
        self.i = offset % len(requests)
        self.client: _Client | None = None
        self.last = 0.0

    async def open(self) -> None:
        self.client = await _connect(
            self.owner.target, self._on_response, self._on_lost, want_headers=True
        )

    def send(self) -> None:
        if self.owner.stopping:
            return
        if self.client is None or self.client.transport is None or self.client.closed.done():
            self.owner.spawn(self._reopen())
            return
        data = self.requests[self.i]
        self.i = (self.i + 1) % len(self.requests)
        self.client.send(data)

    async def _reopen(self) -> None:
        try:
            await self.open()
        except OSError:
            self.owner.errors += 1
            await asyncio.sleep(0.005)
        self.send()

    def _on_response(self, status: int, headers: dict[bytes, bytes] | None) -> None:
        now = time.monotonic()
        self.owner.record(self, now, status, headers)
        client = self.client
        if client is not None and not client.keep_alive:
            self.client = None
            if client.transport is not None:
                client.transport.close()
        self.send()

    def _on_lost(self, client: _Client) -> None:
        if client is not self.client:
            return
        if not self.owner.stopping:
            self.owner.errors += 1
            self.owner.spawn(self._reopen())


class _LoopGen:
    def __init__(
        self, target: tuple[str, int], requests: list[bytes], watch_header: str | None
    ) -> None:
        self.target = target
        self.requests = requests
        self.watch = watch_header.lower().encode() if watch_header else None
        self.stopping = False
        self.count = 0
        self.non_2xx = 0
        self.errors = 0
        self.max_gap = 0.0
        self.max_gap_at = 0.0
        self.first = 0.0
        self.changes: list[tuple[float, str | None]] = []
        self._value: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def record(
        self, conn: _Looper, now: float, status: int, headers: dict[bytes, bytes] | None
    ) -> None:
        self.count += 1
        if not 200 <= status < 300:
            self.non_2xx += 1
        if conn.last:
            gap = now - conn.last
            if gap > self.max_gap:
                self.max_gap = gap
                self.max_gap_at = conn.last
        conn.last = now
        if self.watch is not None and headers is not None:
            raw = headers.get(self.watch)
            value = raw.decode("latin-1") if raw is not None else None
            if not self.changes or value != self._value:
                self.changes.append((now, value))
                self._value = value

    async def run(self, connections: int, duration: float) -> dict:
        loopers = [_Looper(self, self.requests, i * 7) for i in range(connections)]
        await asyncio.gather(*(lp.open() for lp in loopers))
        self.first = time.monotonic()
        for lp in loopers:
            lp.send()
        # runs for `duration`, or until SIGTERM / SIGINT (the harness stops it when done)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await asyncio.wait_for(stop.wait(), duration)
        except TimeoutError:
            pass
        self.stopping = True
        end = time.monotonic()
        # a connection that has been silent since its last response is a gap as well
        for lp in loopers:
            if lp.last and end - lp.last > self.max_gap:
                self.max_gap = end - lp.last
                self.max_gap_at = lp.last
            if lp.client is not None and lp.client.transport is not None:
                lp.client.transport.close()
        for task in list(self._tasks):
            task.cancel()
        return {
            "mode": "loop",
            "connections": connections,
            "started_at": self.first,
            "ended_at": end,
            "responses": self.count,
            "non_2xx": self.non_2xx,
            "errors": self.errors,
            "max_gap_ms": round(self.max_gap * 1e3, 2),
            "max_gap_at": self.max_gap_at,
            "header_changes": [{"at": t, "value": v} for t, v in self.changes],
        }


# --------------------------------------------------------------------------- CLI


def _parse_target(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("mode", choices=["rate", "loop"])
    ap.add_argument("--target", type=_parse_target, required=True, help="HOST:PORT to connect")
    ap.add_argument("--host", default="bench.local", help="Host header (single request)")
    ap.add_argument("--path", default="/", help="request path (single request)")
    ap.add_argument("--requests", help="JSON file: [[host, path], ...] used in rotation")
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--rate", type=float, default=1000.0, help="rate mode: requests/s in total")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds measured")
    ap.add_argument("--warmup", type=float, default=1.0, help="rate mode: seconds not recorded")
    ap.add_argument("--drain", type=float, default=5.0, help="rate mode: wait for stragglers")
    ap.add_argument("--watch-header", help="loop mode: record changes of this response header")
    args = ap.parse_args(argv)

    if args.requests:
        try:
            with open(args.requests, encoding="utf-8") as f:
                pairs = [(str(h), str(p)) for h, p in json.load(f)]
        except (OSError, ValueError, TypeError) as exc:
            print(f"loadgen: cannot read --requests {args.requests}: {exc}", file=sys.stderr)
            return 2
    else:
        pairs = [(args.host, args.path)]
    if not pairs or args.connections < 1 or args.rate <= 0 or args.duration <= 0:
        print("loadgen: need requests, connections >= 1, rate > 0, duration > 0", file=sys.stderr)
        return 2
    requests = build_requests(pairs)

    async def go() -> dict:
        if args.mode == "rate":
            gen = _RateGen(
                args.target, requests, args.rate, args.connections, args.duration, args.warmup
            )
            res = await gen.run(args.drain)
            return summarize_rate(res, args.duration, args.rate, args.connections)
        return await _LoopGen(args.target, requests, args.watch_header).run(
            args.connections, args.duration
        )

    try:
        out = uvloop.run(go())
    except OSError as exc:
        print(
            f"loadgen: cannot connect to {args.target[0]}:{args.target[1]}: {exc}", file=sys.stderr
        )
        return 1
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
