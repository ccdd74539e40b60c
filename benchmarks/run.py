"""meshproxy benchmark: one command compares direct, meshproxy (1 and 2 workers), nginx,
HAProxy and Envoy against the same fast upstream, then runs the big-table scenario.

Usage: ``python benchmarks/run.py [--quick] [--out benchmarks/results] [--only PEER,...]``

Theory of operation
-------------------
One nginx upstream (pinned to the load CPU) serves every peer in turn. For each peer the
harness starts it pinned to the proxy CPU, records its idle RSS, checks one request returns the
upstream's body, and then:

1. **saturation**: ``wrk -t1 -c64`` (warm-up run first, not recorded); the proxy tree's CPU
   seconds (``/proc/PID/stat`` utime+stime of every process) and the upstream's accepted
   connections are read right before and after, giving CPU seconds per 1,000 requests and the
   upstream connections the proxy opened;
2. **latency**: ``loadgen.py rate`` sends 1,000 req/s open-loop over 16 keep-alive connections
   (coordinated omission accounted for); "added" latency is the peer's percentile minus the
   same percentile measured direct;
3. **memory**: ``VmHWM`` (peak RSS) of every process of the tree after the runs.

Each peer is stopped by PID in a ``finally``; a peer that cannot start or answers wrongly is
reported with its error and the run goes on. Then :mod:`bigtable` measures meshproxy with
10 vs 10,000 hosts and a config reload. Results go to ``OUT/latest.json``, ``OUT/latest.md``,
``OUT/latest.png`` and (full runs) the marked section of ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import procstat
from harness import (
    HERE,
    BenchError,
    add_quiet_and_readme_options,
    cpu_model,
    git_head,
    interrupt_on_sigterm,
    missing_tools,
    quiet_limit,
    run_loadgen,
    run_wrk,
    tool_version,
    wait_quiet,
)
from peers import (
    Running,
    Upstream,
    connections_between,
    envoy_binary,
    meshproxy_available,
    meshproxy_config,
    start_envoy,
    start_haproxy,
    start_meshproxy,
    start_nginx,
)


@dataclass(frozen=True)
class Plan:
    """Durations and sizes of one run (full or ``--quick``)."""

    sat_seconds: float
    sat_warmup: float
    sat_connections: int
    lat_seconds: float
    lat_warmup: float
    lat_rate: float
    lat_connections: int
    big_hosts: int
    reload_window: float
    dump_timeout: float


FULL = Plan(10, 2, 64, 10, 1, 1000, 16, 10_000, 2.0, 10.0)
QUICK = Plan(3, 1, 64, 3, 0.5, 1000, 16, 10_000, 1.0, 10.0)

QUIET_WAIT = 30.0  # s to wait for a quiet machine before a full run (--wait-quiet)
PEERS = ["direct", "meshproxy-1w", "meshproxy-2w", "nginx", "haproxy", "envoy"]


@dataclass
class Context:
    plan: Plan
    workdir: Path
    upstream: Upstream
    proxy_cpus: str | None
    multi_cpus: str | None
    load_cpus: str | None


def _starter(name: str, ctx: Context) -> Callable[[], Running]:
    up = ctx.upstream.port
    if name == "nginx":
        return lambda: start_nginx(ctx.workdir, up, ctx.proxy_cpus)
    if name == "haproxy":
        return lambda: start_haproxy(ctx.workdir, up, ctx.proxy_cpus)
    if name == "envoy":
        return lambda: start_envoy(ctx.workdir, up, ctx.proxy_cpus)
    if name.startswith("meshproxy-"):
        workers = int(name.removeprefix("meshproxy-").removesuffix("w"))
        cfg = ctx.workdir / f"{name}-config"
        cfg.mkdir(parents=True, exist_ok=True)
        (cfg / "bench.yaml").write_text(meshproxy_config(up))
        cpus = ctx.proxy_cpus if workers == 1 else ctx.multi_cpus
        return lambda: start_meshproxy(ctx.workdir, cfg, cpus, workers=workers, name=name)
    raise BenchError(f"unknown peer {name!r}")


def _mem(pid: int) -> dict:
    procs = procstat.tree_memory(pid)
    return {
        "rss_kib": sum(p.rss_kib for p in procs),
        "hwm_kib": sum(p.hwm_kib for p in procs),
        "processes": [
            {"pid": p.pid, "name": p.name, "rss_kib": p.rss_kib, "hwm_kib": p.hwm_kib}
            for p in procs
        ],
    }


def ours_cpu_seconds(ctx: Context) -> float:
    """CPU seconds of the harness's own load side: the upstream, waited-for wrk runs, us."""
    up = ctx.upstream.proc.pid if ctx.upstream.proc is not None else None
    return procstat.load_side_cpu_seconds(up)


def measure(name: str, running: Running, ctx: Context) -> dict:
    """Saturation, latency and memory of one started peer (or of ``direct``)."""
    plan = ctx.plan
    out: dict = {"name": name, "status": "ok", "start_seconds": round(running.start_seconds, 3)}
    pid = running.proc.pid if running.proc is not None else None
    if pid is not None:
        time.sleep(0.5)
        out["idle"] = _mem(pid)
    # warm-up: pools, caches, lazily built tables; not recorded
    run_wrk(running.port, plan.sat_warmup, plan.sat_connections, ctx.load_cpus)
    time.sleep(0.2)
    acc0 = ctx.upstream.accepts()
    ours0 = ours_cpu_seconds(ctx)
    cpu0 = procstat.tree_cpu_seconds(pid) if pid is not None else 0.0
    busy0 = procstat.machine_busy_seconds()
    sat = run_wrk(running.port, plan.sat_seconds, plan.sat_connections, ctx.load_cpus)
    busy1 = procstat.machine_busy_seconds()
    cpu1 = procstat.tree_cpu_seconds(pid) if pid is not None else 0.0
    ours1 = ours_cpu_seconds(ctx)
    acc1 = ctx.upstream.accepts()
    sat["upstream_connections"] = connections_between(acc0, acc1)
    # CPU the rest of the machine used meanwhile: a noisy neighbour makes figures unreliable
    other = (busy1 - busy0) - (cpu1 - cpu0) - (ours1 - ours0)
    sat["other_cpu_share"] = round(max(0.0, other) / plan.sat_seconds, 2)
    if pid is not None:
        sat["cpu_seconds"] = round(cpu1 - cpu0, 3)
        sat["cpu_s_per_1k"] = (
            round((cpu1 - cpu0) / sat["requests"] * 1000, 5) if sat["requests"] else None
        )
    out["saturation"] = sat
    time.sleep(0.2)
    acc0 = ctx.upstream.accepts()
    lat = run_loadgen(
        "rate",
        running.port,
        ctx.load_cpus,
        duration=plan.lat_seconds,
        warmup=plan.lat_warmup,
        rate=plan.lat_rate,
        connections=plan.lat_connections,
    )
    assert isinstance(lat, dict)
    lat["upstream_connections"] = connections_between(acc0, ctx.upstream.accepts())
    out["latency"] = lat
    if pid is not None:
        out["peak"] = _mem(pid)
        procs = procstat.tree(pid)
        out["processes"] = len(procs)
    return out


def run_peer(name: str, ctx: Context) -> dict:
    print(f"== {name}", flush=True)
    if name == "direct":
        running = Running("direct", None, ctx.upstream.port)
        try:
            return measure(name, running, ctx)
        except (BenchError, OSError) as exc:
            return {"name": name, "status": "error", "error": str(exc)}
    if name.startswith("meshproxy-"):
        why = meshproxy_available()
        if why:
            return {"name": name, "status": "skipped", "error": why}
    if name == "envoy" and envoy_binary() is None:
        return {"name": name, "status": "skipped", "error": "envoy binary not found"}
    running = None
    try:
        running = _starter(name, ctx)()
        result = measure(name, running, ctx)
        if running.proc is not None and not running.proc.alive():
            raise BenchError(f"{name} died during the run\n{running.proc.tail()}")
        return result
    except (BenchError, OSError) as exc:
        print(f"   {name}: {exc}", file=sys.stderr, flush=True)
        return {"name": name, "status": "error", "error": str(exc)}
    finally:
        if running is not None and running.proc is not None:
            running.proc.stop()


def add_ratios(results: list[dict]) -> None:
    """Added latency per percentile (peer - direct) and ratios to direct and to Envoy."""
    by = {r["name"]: r for r in results if r.get("status") == "ok"}
    direct = by.get("direct")
    envoy = by.get("envoy")
    ok = [r for r in results if r.get("status") == "ok"]
    for r in ok:  # first every added latency, since the ratios below compare with Envoy's
        lat = r["latency"]["latency_us"]
        if direct is not None:
            d = direct["latency"]["latency_us"]
            r["added_us"] = {
                q: (round(lat[q] - d[q], 1) if lat[q] is not None and d[q] is not None else None)
                for q in ("p50", "p90", "p99")
            }
    for r in ok:
        rps = r["saturation"]["rps"]
        if direct is not None and direct["saturation"]["rps"]:
            r["rps_vs_direct"] = round(rps / direct["saturation"]["rps"], 3)
        if envoy is not None and envoy["saturation"]["rps"]:
            r["rps_vs_envoy"] = round(rps / envoy["saturation"]["rps"], 3)
            mine = r["saturation"].get("cpu_s_per_1k")
            theirs = envoy["saturation"].get("cpu_s_per_1k")
            if mine and theirs:
                r["cpu_vs_envoy"] = round(mine / theirs, 2)
            a, e = r.get("added_us", {}).get("p99"), envoy.get("added_us", {}).get("p99")
            if a is not None and e:
                r["added_p99_vs_envoy"] = round(a / e, 2)


def environment(plan: Plan, ctx: Context) -> dict:
    envoy = envoy_binary()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "nginx": tool_version(["nginx", "-v"]),
        "haproxy": tool_version(["haproxy", "-v"]),
        "envoy": tool_version([envoy, "--version"]) if envoy else None,
        "wrk": tool_version(["wrk", "-v"]),
        "pinning": {
            "proxy": ctx.proxy_cpus,
            "proxy_multi_worker": ctx.multi_cpus,
            "load_and_upstream": ctx.load_cpus,
        },
        "plan": plan.__dict__,
        "git": git_head(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Compare meshproxy with direct, nginx, HAProxy and Envoy."
    )
    ap.add_argument("--quick", action="store_true", help="short runs, for smoke-testing")
    ap.add_argument("--out", type=Path, default=HERE / "results", help="results directory")
    ap.add_argument(
        "--only", help=f"comma-separated subset of: {','.join(PEERS)} (direct is always run)"
    )
    ap.add_argument("--no-bigtable", action="store_true", help="skip the big-table scenario")
    ap.add_argument("--big-hosts", type=int, help="hosts in the big table [10000]")
    ap.add_argument("--proxy-cpus", default="0", help="CPU list for single-worker proxies [0]")
    ap.add_argument("--multi-cpus", default="0,1", help="CPU list for meshproxy-2w [0,1]")
    ap.add_argument("--load-cpus", default="1", help="CPU list for wrk/loadgen/upstream [1]")
    ap.add_argument("--no-pin", action="store_true", help="do not pin anything")
    add_quiet_and_readme_options(
        ap, QUIET_WAIT, "rewrite the figures in benchmarks/README.md [auto: full runs only]"
    )
    args = ap.parse_args(argv)

    import bigtable
    import report

    plan = QUICK if args.quick else FULL
    if args.big_hosts:
        plan = Plan(**{**plan.__dict__, "big_hosts": args.big_hosts})
    peers = PEERS
    if args.only:
        wanted = {p.strip() for p in args.only.split(",") if p.strip()}
        unknown = wanted - set(PEERS)
        if unknown:
            print(f"run.py: unknown peers: {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
        peers = [p for p in PEERS if p in wanted or p == "direct"]
    if missing_tools("run.py"):
        return 2
    pin = not args.no_pin
    interrupt_on_sigterm()  # unwinds through every finally: peers stopped, temp dir removed
    t_start = time.monotonic()
    quiet = wait_quiet(quiet_limit(args, QUIET_WAIT))
    workdir = Path(tempfile.mkdtemp(prefix="meshproxy-bench-"))
    upstream = Upstream(workdir, args.load_cpus if pin else None)
    ctx = Context(
        plan,
        workdir,
        upstream,
        args.proxy_cpus if pin else None,
        args.multi_cpus if pin else None,
        args.load_cpus if pin else None,
    )
    results: list[dict] = []
    big: dict | None = None
    try:
        upstream.start()
        t_start = time.monotonic()  # the wait for a quiet machine is not part of the run
        for name in peers:
            results.append(r := run_peer(name, ctx))
            if r.get("status") == "ok":
                lat = r["latency"]["latency_us"]
                print(
                    f"   {r['saturation']['rps']:,.0f} req/s, p50 {lat['p50']} µs, "
                    f"p99 {lat['p99']} µs, CPU s/1k {r['saturation'].get('cpu_s_per_1k')}, "
                    f"noise {r['saturation']['other_cpu_share']} CPU",
                    flush=True,
                )
        add_ratios(results)
        if not args.no_bigtable:
            print("== bigtable", flush=True)
            big = bigtable.run(ctx)
    except BenchError as exc:
        print(f"run.py: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("run.py: interrupted", file=sys.stderr)
        return 130
    finally:
        upstream.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    doc = {
        "environment": environment(plan, ctx),
        "quick": args.quick,
        "elapsed_seconds": round(time.monotonic() - t_start, 1),
        "other_cpu_at_start": quiet,
        "peers": results,
        "bigtable": big,
    }
    update_readme = args.readme == "yes" or (args.readme == "auto" and not args.quick)
    report.write_all(doc, args.out, HERE / "README.md" if update_readme else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
