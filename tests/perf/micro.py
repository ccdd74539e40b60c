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
prints a cProfile of one run instead.

Table size: ``--hosts N`` builds the big-table scenario of ``benchmarks/bigtable.py`` (its
generator functions are imported, not copied: N hosts ``svc-I.bench.local``, 5 ``uri.prefix``
rules each, every rule to one ServiceEntry, response header ``x-bench-gen`` set) and the
requests rotate over every host and rule exactly as the harness's wrk Lua script does; with
``--config DIR`` any Istio config is used and ``--host`` / ``--path`` say what to request.
``--compare 10,10000`` measures several table sizes (``N/K``: N hosts, requests to K of them,
which tells the table's size from the working set's), each in its own child process (so each
has its own heap, as a real proxy would), taking turns so that machine noise hits them alike,
and prints the ratio. As in ``meshproxy run``, ``gc.freeze()``
follows the snapshot apply (``--no-freeze`` to see what it saves); the run reports the cyclic
GC collections per generation it triggered and the time they took.

Timings move with the machine's load; for a figure that does not, count instructions: run it
under ``valgrind --tool=callgrind`` with two values of ``--requests --repeat 1 --no-warmup``
and divide the difference of the totals by the difference of the request counts
(``tests/perf/instructions.sh`` does that).

Usage::

    python tests/perf/micro.py [--requests 200000] [--repeat 5] [--profile]
    python tests/perf/micro.py --compare 10,10000          # small vs big table, us/request
    python tests/perf/micro.py --hosts 10000 --profile
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "benchmarks"))  # bigtable.py imports its siblings by name

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


class GcWatch:
    """Counts cyclic GC collections per generation and the time they took (gc.callbacks)."""

    def __init__(self) -> None:
        self.collections = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self._t0 = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            g = info["generation"]
            self.collections[g] += 1
            self.seconds[g] += time.perf_counter() - self._t0

    def __enter__(self) -> GcWatch:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self)

    def summary(self, n: int) -> str:
        return ", ".join(
            f"gen{g}: {c} ({self.seconds[g] / n * 1e6:.2f} us/request)"
            for g, c in enumerate(self.collections)
        )


@dataclass
class Scenario:
    """A config directory and the rotating list of requests to send through it."""

    name: str
    config: Path
    requests: list[bytes]
    check: bytes  # every response must contain this
    cluster: str  # the cluster every request routes to (its one endpoint gets the connection)


def bigtable_scenario(root: Path, hosts: int) -> Scenario:
    """The harness's big-table config and request mix, via its own generator functions."""
    import bigtable

    d = root / f"table-{hosts}"
    bigtable.generate(d, hosts, 8080)
    reqs = [
        f"GET {bigtable.request_path(i)} HTTP/1.1\r\nHost: {bigtable.host(i)}\r\n\r\n".encode()
        for i in range(hosts)
    ]
    check = f"{bigtable.GEN_HEADER}: 1".encode()
    return Scenario(f"{hosts} hosts", d, reqs, check, bigtable.UPSTREAM_HOST)


def single_scenario(root: Path) -> Scenario:
    d = root / "single"
    d.mkdir()
    (d / "bench.yaml").write_text(YAML)
    return Scenario("single route", d, [REQUEST], b"Hello, World!", "bench.local")


def config_scenario(d: Path, host: str, path: str, cluster: str) -> Scenario:
    req = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    return Scenario(str(d), d, [req], b"Hello, World!", cluster)


@dataclass
class Wired:
    conn: HttpConnection
    down: FakeTransport
    up_t: FakeTransport
    up: UpstreamConnection
    pctx: ProxyContext


def build(scenario: Scenario, freeze: bool = True) -> Wired:
    snap, report = build_snapshot([str(scenario.config)], ProxyIdentity())
    assert snap is not None, report.problems
    settings = Settings()
    state = State()
    metrics = Metrics(ProxyIdentity())
    state.subscribe(metrics.on_snapshot)
    pools = Pools(metrics, settings)
    state.subscribe(pools.on_snapshot)
    state.apply(snap)
    if freeze:
        gc.freeze()  # as meshproxy.sources.file does after applying a snapshot
    pctx = ProxyContext(state, pools, metrics, settings)  # type: ignore[arg-type]
    sctx = ServerContext(settings, metrics, pctx.make_exchange)  # type: ignore[arg-type]
    conn = HttpConnection(sctx)
    down = FakeTransport()
    conn.connection_made(down)  # type: ignore[arg-type]
    cluster = snap.clusters[scenario.cluster]
    assert len(cluster.endpoints) == 1, f"{cluster.name} needs exactly one endpoint"
    ep = pools.cluster_state(cluster).endpoints[0]
    up = UpstreamConnection(ep, settings.high_water, settings.low_water)
    up_t = FakeTransport()
    up.connection_made(up_t)  # type: ignore[arg-type]
    ep.idle.append(up)
    return Wired(conn, down, up_t, up, pctx)


def run(w: Wired, scenario: Scenario, n: int, gcw: GcWatch | None = None) -> float:
    """n request/response cycles through ``w`` (rotating over the scenario's requests);
    returns us of process CPU per request."""
    feed_down = w.conn.data_received
    feed_up = w.up.data_received
    reqs = scenario.requests
    k = len(reqs)
    down_out = w.down.out
    down_out.clear()
    w.up_t.out.clear()
    if gcw is not None:
        gc.callbacks.append(gcw)
    t0 = time.process_time()
    for i in range(n):
        feed_down(reqs[i % k])
        feed_up(RESPONSE)
    dt = time.process_time() - t0
    if gcw is not None:
        gc.callbacks.remove(gcw)
    assert len(down_out) == n, (len(down_out), down_out[:2])
    assert down_out[-1].endswith(b"\r\n\r\nHello, World!"), down_out[-1]
    assert scenario.check in down_out[-1], down_out[-1]
    assert b"x-request-id: " in w.up_t.out[-1], w.up_t.out[-1]
    down_out.clear()
    w.up_t.out.clear()
    return dt / n * 1e6


def scenario_for(args: argparse.Namespace, root: Path) -> Scenario:
    if args.config:
        sc = config_scenario(Path(args.config), args.host, args.path, args.cluster)
    elif args.hosts:
        sc = bigtable_scenario(root, args.hosts)
    else:
        sc = single_scenario(root)
    if args.rotate:
        sc.requests = sc.requests[: args.rotate]
        sc.name += f" (requests to {len(sc.requests)} of them)"
    return sc


async def amain(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="micro-") as tmp:
        scenario = scenario_for(args, Path(tmp))
        t0 = time.perf_counter()
        w = build(scenario, freeze=not args.no_freeze)
        built = time.perf_counter() - t0
    if args.profile:
        run(w, scenario, 2000)
        prof = cProfile.Profile()
        prof.enable()
        run(w, scenario, args.requests)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
        return
    if not args.no_warmup:
        run(w, scenario, max(2000, 2 * len(scenario.requests)))
    if args.serve:
        # --compare's child: one line per measurement, "N" in, "US GC-SUMMARY" out
        print(f"ready {built:.1f}", flush=True)
        for line in sys.stdin:
            n = int(line)
            gcw = GcWatch()
            us = run(w, scenario, n, gcw)
            print(f"{us:.3f} {gcw.summary(n)}", flush=True)
        return
    gcw = GcWatch()
    best = min(run(w, scenario, args.requests, gcw) for _ in range(args.repeat))
    print(
        f"{scenario.name}: data path (no sockets): {best:.2f} us CPU/request"
        f" (best of {args.repeat}); GC collections: {gcw.summary(args.requests * args.repeat)}"
    )


CALLGRIND_EVENTS = ("Ir", "Dr", "Dw", "I1mr", "D1mr", "D1mw", "ILmr", "DLmr", "DLmw")


def callgrind_totals(path: Path) -> dict[str, int]:
    """The ``totals:`` line of a callgrind output file, by event name."""
    events: list[str] = []
    for line in path.read_text().splitlines():
        if line.startswith("events:"):
            events = line.split()[1:]
        elif line.startswith("totals:"):
            return dict(zip(events, (int(x) for x in line.split()[1:]), strict=False))
    raise SystemExit(f"no totals in {path}")


def compare(args: argparse.Namespace) -> int:
    """One child process per table size, measured in turns (same noise for each).

    With ``--callgrind`` each child runs under ``valgrind --tool=callgrind --cache-sim=yes
    --instr-atstart=no``: it builds its table uninstrumented, then ``callgrind_control -i on``
    counts exactly the measured requests (instructions and simulated cache misses per request,
    the same on a busy machine as on an idle one).
    """
    sizes = args.compare.split(",")  # "N" or "N/K": N hosts, requests rotating over K of them
    children: list[subprocess.Popen[str]] = []
    argv = [sys.executable, __file__, "--serve"] + (["--no-freeze"] if args.no_freeze else [])
    tmp = Path(tempfile.mkdtemp(prefix="micro-cg-"))  # kept: the files can be annotated
    outs: list[Path] = []
    try:
        for i, n in enumerate(sizes):
            hosts, _, rotate = n.partition("/")
            prefix: list[str] = []
            if args.callgrind:
                outs.append(tmp / f"cg-{i}.out")
                prefix = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--cache-sim=yes"]
                prefix.append(f"--callgrind-out-file={outs[-1]}")
            c = subprocess.Popen(
                [*prefix, *argv, "--hosts", hosts, "--rotate", rotate or "0"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL if args.callgrind else None,
                text=True,
            )
            children.append(c)
        for n, c in zip(sizes, children, strict=True):
            assert c.stdout is not None
            line = c.stdout.readline().split()
            if not line or line[0] != "ready":
                raise SystemExit(f"{n} hosts: child failed to start")
            print(f"{n} hosts: built in {line[1]} s", flush=True)
        results: dict[str, list[float]] = {n: [] for n in sizes}
        gcs: dict[str, str] = {}
        for r in range(1 if args.callgrind else args.repeat):
            for n, c in zip(sizes, children, strict=True):
                assert c.stdin is not None and c.stdout is not None
                if args.callgrind:
                    subprocess.run(
                        ["callgrind_control", "-i", "on", str(c.pid)],
                        check=True,
                        capture_output=True,
                    )
                c.stdin.write(f"{args.requests}\n")
                c.stdin.flush()
                us, _, gsum = c.stdout.readline().strip().partition(" ")
                if args.callgrind:
                    subprocess.run(
                        ["callgrind_control", "-i", "off", str(c.pid)],
                        check=True,
                        capture_output=True,
                    )
                results[n].append(float(us))
                gcs[n] = gsum
            print(
                f"round {r + 1}: " + ", ".join(f"{n} hosts {results[n][-1]:.2f} us" for n in sizes),
                flush=True,
            )
        if not args.callgrind:
            base = min(results[sizes[0]])
            for n in sizes:
                best = min(results[n])
                med = sorted(results[n])[len(results[n]) // 2]
                print(
                    f"{n:>6} hosts: best {best:.2f} us/request, median {med:.2f}"
                    f" ({best / base:.3f}x of {sizes[0]} hosts); GC last round: {gcs[n]}"
                )
    finally:
        for c in children:
            if c.stdin is not None:
                c.stdin.close()
            try:
                c.wait(120)
            except subprocess.TimeoutExpired:
                c.kill()
                c.wait()
    if args.callgrind:
        print(f"callgrind files (callgrind_annotate FILE): {tmp}")
        base_t: dict[str, int] | None = None
        for n, out in zip(sizes, outs, strict=True):
            t = callgrind_totals(out)
            base_t = base_t or t
            per = {e: t.get(e, 0) / args.requests for e in CALLGRIND_EVENTS}
            print(
                f"{n:>9} hosts: {per['Ir']:,.0f} instructions/request"
                f" ({t['Ir'] / base_t['Ir']:.3f}x); D1 misses {per['D1mr'] + per['D1mw']:.1f},"
                f" LL misses {per['DLmr'] + per['DLmw'] + per['ILmr']:.1f} per request"
            )
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--no-warmup", action="store_true")
    ap.add_argument("--no-freeze", action="store_true", help="skip gc.freeze() after apply")
    ap.add_argument("--hosts", type=int, default=0, help="benchmarks/bigtable.py table size")
    ap.add_argument("--compare", metavar="N,M", help="table sizes to compare, e.g. 10,10000")
    ap.add_argument("--config", metavar="DIR", help="any Istio config dir (with --host etc.)")
    ap.add_argument("--host", default="bench.local")
    ap.add_argument("--path", default="/")
    ap.add_argument("--cluster", default="bench.local", help="the cluster requests route to")
    ap.add_argument("--callgrind", action="store_true", help="--compare under callgrind")
    ap.add_argument("--rotate", type=int, default=0, help="rotate over the first K hosts only")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.compare:
        return compare(args)
    import uvloop

    uvloop.run(amain(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
