"""The data path's Python cost per request, without sockets (not collected by pytest).

Theory of operation
-------------------
On a loopback benchmark most of a proxy's CPU goes to the kernel (every ``write`` runs the TCP
stack for both ends), and on a shared machine those figures move with other people's load. This
probe isolates the part meshproxy's code controls: it wires the real pieces (``State`` with a
snapshot translated by ``control.istio`` from the same YAML as ``probe.py``, the real
``Metrics``, ``Pools``, ``ProxyContext``, ``HttpConnection`` and ``UpstreamConnection``) to fake
transports that only collect bytes, then runs N request/response cycles synchronously inside a
running uvloop: the client request bytes go into ``HttpConnection.data_received``, the upstream
response bytes (nginx's, 13-byte body) into ``UpstreamConnection.data_received``. The loop
timers the code arms are real but never fire during the run.

It prints microseconds of process CPU time per request (``time.process_time``), the best of
``--repeat`` runs, and checks the bytes the client got are the expected response. ``--profile``
prints a cProfile of one run instead. Timings move with the machine's load; for a figure that
does not, count instructions: run it under ``valgrind --tool=callgrind`` with two values of
``--requests --repeat 1 --no-warmup`` and divide the difference of the totals by the difference
of the request counts (``tests/perf/instructions.sh`` does that).

Usage::

    python tests/perf/micro.py [--requests 200000] [--repeat 5] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from control.istio import build_snapshot  # noqa: E402
from meshproxy.config.model import ProxyIdentity  # noqa: E402
from meshproxy.http.server import HttpConnection, ServerContext  # noqa: E402
from meshproxy.metrics import Metrics  # noqa: E402
from meshproxy.proxy import ProxyContext  # noqa: E402
from meshproxy.settings import Settings  # noqa: E402
from meshproxy.state import State  # noqa: E402
from meshproxy.upstream.connection import UpstreamConnection  # noqa: E402
from meshproxy.upstream.pool import Pools  # noqa: E402

YAML = """apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: bench, namespace: default}
spec:
  hosts: [bench.local]
  location: MESH_EXTERNAL
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1, ports: {http: 8080}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: bench, namespace: default}
spec:
  hosts: [bench.local]
  http:
  - route:
    - destination: {host: bench.local, port: {number: 80}}
"""

REQUEST = b"GET / HTTP/1.1\r\nHost: bench.local\r\n\r\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Thu, 26 Nov 2026 16:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 13\r\nConnection: keep-alive\r\n\r\n"
    b"Hello, World!"
)


class FakeSocket:
    family = 2

    def setsockopt(self, *a: Any) -> None:
        pass


class FakeTransport:
    """Collects written bytes; everything else is a no-op."""

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def writelines(self, data: list[bytes]) -> None:
        self.out.append(b"".join(data))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return ("127.0.0.1", 40000)
        if name == "socket":
            return FakeSocket()
        return default

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


def build() -> tuple[HttpConnection, FakeTransport, FakeTransport, UpstreamConnection]:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "bench.yaml"
        p.write_text(YAML)
        snap, report = build_snapshot([str(p)], ProxyIdentity())
    assert snap is not None, report.problems
    settings = Settings()
    state = State()
    metrics = Metrics(ProxyIdentity())
    state.subscribe(metrics.on_snapshot)
    pools = Pools(metrics, settings)
    state.subscribe(pools.on_snapshot)
    state.apply(snap)
    pctx = ProxyContext(state, pools, metrics, settings)  # type: ignore[arg-type]
    sctx = ServerContext(settings, metrics, pctx.make_exchange)  # type: ignore[arg-type]
    conn = HttpConnection(sctx)
    down = FakeTransport()
    conn.connection_made(down)  # type: ignore[arg-type]
    cluster = next(iter(snap.clusters.values()))
    cs = pools.cluster_state(cluster)
    ep = cs.endpoints[0]
    up = UpstreamConnection(ep, settings.high_water, settings.low_water)
    up_t = FakeTransport()
    up.connection_made(up_t)  # type: ignore[arg-type]
    ep.idle.append(up)
    return conn, down, up_t, up


def run(n: int) -> float:
    conn, down, up_t, up = build()
    feed_down = conn.data_received
    feed_up = up.data_received
    t0 = time.process_time()
    for _ in range(n):
        feed_down(REQUEST)
        feed_up(RESPONSE)
    dt = time.process_time() - t0
    assert len(down.out) == n, (len(down.out), down.out[:2])
    assert down.out[-1].endswith(b"\r\n\r\nHello, World!"), down.out[-1]
    assert b"x-request-id: " in up_t.out[-1], up_t.out[-1]
    return dt / n * 1e6


async def amain(args: argparse.Namespace) -> None:
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        run(args.requests)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
        return
    if not args.no_warmup:
        run(2000)
    best = min(run(args.requests) for _ in range(args.repeat))
    print(f"data path (no sockets): {best:.2f} us CPU/request (best of {args.repeat})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--no-warmup", action="store_true")
    args = ap.parse_args()
    import uvloop

    uvloop.run(amain(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
