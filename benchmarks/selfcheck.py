"""Self-check of the benchmark harness: ``python benchmarks/selfcheck.py``.

Theory of operation: the harness is not collected by pytest (it needs nginx, wrk and minutes
of CPU), so this script checks its pure parts and its generated configs quickly, with plain
``assert``s that fail loudly: wrk output parsing, nearest-rank percentiles, the markdown
report (with both reload rows of the big table) and the README marker rewrite on synthetic
result documents, that the localized-edit reload changes exactly one VirtualService document
(and its prober visits the edited host), that every generated
Istio config passes ``meshproxy validate``, and, when nginx is installed, one short open-loop
and one closed-loop ``loadgen.py`` run against the nginx upstream (the rate must be met with
no errors over exactly 16 upstream connections; the loop prober must see responses and the
header it watches), and a run against an in-thread server that freezes for 0.5 s once: the
open-loop generator must charge that freeze to every request that was due during it (p90
in the hundreds of ms), which a closed-loop client would hide. Exit 0 when all pass.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import bigtable
import report
from harness import REPO, BenchError, parse_wrk, run_loadgen
from loadgen import percentile
from peers import Upstream, meshproxy_config

WRK_SAMPLE = """Running 10s test @ http://127.0.0.1:8080/
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.20ms  300.00us   9.00ms   90.00%
    Req/Sec    40.00k     2.00k   45.00k    70.00%
  401234 requests in 10.00s, 50.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 7
Requests/sec:  40123.40
Transfer/sec:      5.00MB
"""


def check_parsers() -> None:
    w = parse_wrk(WRK_SAMPLE)
    assert w == {"rps": 40123.4, "requests": 401234, "non_2xx": 7, "socket_errors": 3}, w
    try:
        parse_wrk("garbage")
    except BenchError:
        pass
    else:
        raise AssertionError("parse_wrk accepted garbage")
    values = [float(i) for i in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([], 50) is None


def _peer(name: str, rps: float, p: float, cpu: float | None) -> dict:
    lat = {"p50": p, "p90": 2 * p, "p99": 4 * p, "p999": 5 * p, "max": 6 * p, "mean": p}
    return {
        "name": name,
        "status": "ok",
        "saturation": {
            "rps": rps,
            "requests": int(rps * 10),
            "non_2xx": 0,
            "socket_errors": 0,
            "upstream_connections": 64,
            "cpu_s_per_1k": cpu,
            "other_cpu_share": 0.01,
        },
        "latency": {"latency_us": lat, "non_2xx": 0, "errors": 0, "upstream_connections": 0},
        "idle": {"rss_kib": 10240},
        "peak": {"hwm_kib": 20480},
    }


def check_report() -> None:
    import run

    peers = [
        _peer("direct", 40000, 100, None),
        _peer("meshproxy-1w", 10000, 400, 0.08),
        _peer("envoy", 20000, 200, 0.04),
        {"name": "nginx", "status": "error", "error": "nginx exited with 1\nmore"},
    ]
    run.add_ratios(peers)
    mesh = peers[1]
    assert mesh["added_us"] == {"p50": 300, "p90": 600, "p99": 1200}, mesh["added_us"]
    assert mesh["rps_vs_direct"] == 0.25 and mesh["rps_vs_envoy"] == 0.5
    assert mesh["cpu_vs_envoy"] == 2.0 and mesh["added_p99_vs_envoy"] == 3.0
    doc = {
        "environment": {"plan": run.FULL.__dict__, "pinning": {}, "date": "now"},
        "peers": peers,
        "bigtable": {"status": "skipped", "error": "no meshproxy"},
    }
    md = report.markdown(doc)
    assert "| meshproxy, 1 worker | 10,000 | 0.25x | 0.50x | 300 | 600 | 1,200 |" in md, md
    assert "| nginx | error: nginx exited with 1 |" in md, md
    assert "Not measured: skipped: no meshproxy" in md, md
    with tempfile.TemporaryDirectory() as d:
        readme = Path(d) / "README.md"
        readme.write_text(f"head\n{report.BEGIN}\nold\n{report.END}\ntail\n")
        assert report.update_readme(readme, "NEW\n")
        assert readme.read_text() == f"head\n{report.BEGIN}\nNEW\n{report.END}\ntail\n"
        readme.write_text("no markers\n")
        assert not report.update_readme(readme, "NEW\n")


def _reload_result(gap: float) -> dict:
    return {
        "edit": "x",
        "config_dump_seconds": 0.25,
        "data_plane_seconds": 0.26,
        "max_gap_ms": gap,
        "max_gap_after_write_ms": 120.0,
        "errors": 0,
        "non_2xx": 0,
        "version_source": "/config_dump?resource=version",
    }


def check_bigtable_report() -> None:
    table = {
        "hosts": 10_000,
        "routes": 50_000,
        "rps": 5000,
        "reload_local": _reload_result(12.5),
        "reload": {
            **_reload_result(97.0),
            "config_dump_fetch_seconds": 2.0,
            "config_dump_bytes": 27 * 1024 * 1024,
            "config_dump_max_gap_ms": 9.5,
        },
    }
    big = {
        "status": "ok",
        "small": {**table, "label": "10 hosts", "hosts": 10, "routes": 50},
        "large": {**table, "label": "10,000 hosts"},
        "rps_ratio": 1.0,
    }
    md = "\n".join(report.bigtable_lines(big))
    assert "| 10,000 hosts: edit one VirtualService | 0.250 s | 0.260 s | 12.5 ms (+120 ms)" in md
    assert "| 10,000 hosts: rewrite every VirtualService | 0.250 s | 0.260 s | 97.0 ms" in md
    assert md.count("| 10 hosts: ") == 2, md
    assert "10,000 hosts: 2.000 s / 27.0 MiB / 9.5 ms" in md, md
    # a result without the localized edit (an older run) still renders
    del big["large"]["reload_local"]
    md = "\n".join(report.bigtable_lines(big))
    assert "10,000 hosts: edit one" not in md and "10,000 hosts: rewrite every" in md


def check_localized_edit() -> None:
    """The localized edit changes exactly one document of routes.yaml: the edited host's."""
    hosts = 30
    k = bigtable.edited_host(hosts)
    before = bigtable.routes_yaml(hosts, 1).split("---\n")
    after = bigtable.routes_yaml(hosts, 1, {k: 2}).split("---\n")
    assert len(before) == len(after) == hosts
    changed = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
    assert changed == [k], changed
    assert f'{bigtable.GEN_HEADER}: "2"' in after[k] and f"name: svc-{k}\n" in after[k]
    full = bigtable.routes_yaml(hosts, 3).split("---\n")
    assert all(a != b for a, b in zip(after, full, strict=True))
    with tempfile.TemporaryDirectory() as d:
        pairs = json.loads(bigtable.write_local_requests(Path(d), hosts).read_text())
    edited = [p for p in pairs if p[0] == bigtable.host(k)]
    assert len(edited) >= hosts // 3 and {p[0] for p in pairs} == {
        bigtable.host(i) for i in range(hosts)
    }


def check_configs() -> None:
    with tempfile.TemporaryDirectory() as d:
        base = Path(d)
        bigtable.generate(base / "table", 25, 8080)
        (base / "bench").mkdir()
        (base / "bench" / "bench.yaml").write_text(meshproxy_config(8080))
        if not (REPO / "meshproxy" / "__main__.py").exists():
            print("skip: meshproxy not present, configs not validated")
            return
        argv = [sys.executable, "-m", "meshproxy", "validate"]
        done = subprocess.run(
            [*argv, str(base / "table"), str(base / "bench")],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=120,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        text = (base / "table" / "routes.yaml").read_text()
        assert text.count("kind: VirtualService") == 25
        assert text.count("prefix:") == 25 * bigtable.RULES


def check_loadgen() -> None:
    if shutil.which("nginx") is None:
        print("skip: nginx not installed, loadgen not exercised")
        return
    with tempfile.TemporaryDirectory() as d:
        up = Upstream(Path(d), None)
        try:
            up.start()
            before = up.accepts()
            res = run_loadgen("rate", up.port, None, duration=1.0, warmup=0.2, rate=500)
            assert isinstance(res, dict)
            assert 499 <= res["completed"] <= 501 and res["errors"] == 0, res
            assert res["ok"] == res["completed"], res
            assert res["latency_us"]["p50"] is not None
            # 16 keep-alive connections, plus our own stub_status query
            assert up.accepts() - before - 1 == 16
            res = run_loadgen(
                "loop", up.port, None, duration=0.5, connections=2, watch_header="content-type"
            )
            assert isinstance(res, dict)
            assert res["responses"] > 10 and res["errors"] == 0, res
            assert res["header_changes"][0]["value"] == "text/plain", res
        finally:
            up.stop()


class _StallingServer:
    """HTTP/1.1 keep-alive server in a thread that freezes its loop for ``stall`` s once, at
    the ``at``-th request: what a GC pause or a blocking reload looks like to a client."""

    def __init__(self, at: int, stall: float) -> None:
        import asyncio
        import threading

        self.port = 0
        self.at = at
        self.stall = stall
        self.count = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(5)

    def _run(self) -> None:
        import asyncio
        import time

        server_self = self

        class Proto(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.t = transport
                self.buf = b""

            def data_received(self, data: bytes) -> None:
                self.buf += data
                while b"\r\n\r\n" in self.buf:
                    _, self.buf = self.buf.split(b"\r\n\r\n", 1)
                    server_self.count += 1
                    if server_self.count == server_self.at:
                        time.sleep(server_self.stall)  # freeze the whole loop, on purpose
                    self.t.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")  # type: ignore[attr-defined]

        async def serve() -> None:
            srv = await asyncio.get_running_loop().create_server(Proto, "127.0.0.1", 0)
            self.port = srv.sockets[0].getsockname()[1]
            self._ready.set()
            await asyncio.Event().wait()

        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(serve())
        except RuntimeError:
            pass  # loop stopped

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


def check_coordinated_omission() -> None:
    """A 0.5 s server freeze must be charged to every request scheduled during it, not only
    to the few that were in flight (what a closed-loop client would report)."""
    srv = _StallingServer(at=150, stall=0.5)
    try:
        res = run_loadgen("rate", srv.port, None, duration=2.0, warmup=0.2, rate=200, connections=4)
    finally:
        srv.close()
    assert isinstance(res, dict)
    lat = res["latency_us"]
    # ~100 of 400 requests were due during the freeze: their latencies spread over 0..500 ms
    assert lat["max"] >= 450_000, lat
    assert lat["p90"] >= 150_000, lat
    assert lat["p50"] < 50_000, lat
    assert 399 <= res["completed"] <= 401 and res["errors"] == 0, res  # window edges


def main() -> int:
    for check in (
        check_parsers,
        check_report,
        check_bigtable_report,
        check_localized_edit,
        check_configs,
        check_loadgen,
        check_coordinated_omission,
    ):
        check()
        print(f"ok: {check.__name__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
