"""Big-table scenario: meshproxy with 10 hosts vs 10,000 hosts (50,000 routes), and a reload.

Theory of operation
-------------------
:func:`generate` writes an Istio config directory: ``services.yaml`` holds a ServiceEntry for
``upstream.bench.local`` (STATIC, the fast upstream as its one endpoint) and ServiceEntries
registering the hosts ``svc-N.bench.local`` (1,000 hosts each, same endpoint), and
``routes.yaml`` holds one VirtualService per host with 5 ``http`` rules matching
``uri.prefix`` ``/api/v0/`` .. ``/api/v3/`` and ``/``, every rule routing to
``upstream.bench.local`` and setting the response header ``x-bench-gen: G`` (the config
generation). The client side rotates over every host and over the 5 rules (a wrk Lua script
for saturation, the ``loadgen.py loop`` prober for the reload), so the lookup cost of a big
table is really exercised. The small table is the same with 10 hosts; both are loaded with
the same script and wrk settings, so the throughput ratio isolates the table's size.

The reload replaces ``routes.yaml`` (write to a temp file, then rename) with generation G+1:
every route of every VirtualService changes. Two trials:

1. *data plane*: a closed-loop prober runs on 4 connections while the file is replaced; the
   first response carrying the new ``x-bench-gen`` gives the time until the new config
   serves, and the longest gap between consecutive responses is the reload's stall. Nothing
   polls the admin port meanwhile (a big ``/config_dump`` costs CPU in the proxy itself).
2. *admin*: the same with ``/config_dump`` polled back to back until its ``version``
   changes: time from the rename until a dump shows the new version (an upper bound: the
   dump's own response time is reported alongside), and the stall seen meanwhile.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import procstat
from harness import BenchError, finish_loadgen, http_get, run_loadgen, run_wrk, wait_until
from peers import Running, connections_between, meshproxy_available, start_meshproxy

if TYPE_CHECKING:
    from run import Context

RULES = 5
HOSTS_PER_SERVICE_ENTRY = 1000
GEN_HEADER = "x-bench-gen"
UPSTREAM_HOST = "upstream.bench.local"

WRK_SCRIPT = """-- rotate over "host path" lines of the file given after --
local reqs = {}
local n = 0
local i = 0

function init(args)
  for line in io.lines(args[1]) do
    local host, path = line:match("^(%S+)%s+(%S+)$")
    if host then
      n = n + 1
      reqs[n] = wrk.format("GET", path, {["Host"] = host})
    end
  end
end

function request()
  i = i % n + 1
  return reqs[i]
end
"""


def host(i: int) -> str:
    return f"svc-{i}.bench.local"


def rule_prefix(k: int) -> str:
    return f"/api/v{k}/" if k < RULES - 1 else "/"


def request_path(i: int) -> str:
    k = i % RULES
    return f"/api/v{k}/items" if k < RULES - 1 else "/other/items"


def services_yaml(hosts: int, upstream_port: int) -> str:
    endpoint = f"""  resolution: STATIC
  endpoints:
  - address: 127.0.0.1
    ports:
      http: {upstream_port}
"""
    docs = [
        f"""apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: upstream
  namespace: default
spec:
  hosts: [{UPSTREAM_HOST}]
  location: MESH_EXTERNAL
  ports:
  - number: 80
    name: http
    protocol: HTTP
{endpoint}"""
    ]
    for start in range(0, hosts, HOSTS_PER_SERVICE_ENTRY):
        names = "\n".join(
            f"  - {host(i)}" for i in range(start, min(hosts, start + HOSTS_PER_SERVICE_ENTRY))
        )
        docs.append(
            f"""apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: svc-block-{start // HOSTS_PER_SERVICE_ENTRY}
  namespace: default
spec:
  hosts:
{names}
  location: MESH_EXTERNAL
  ports:
  - number: 80
    name: http
    protocol: HTTP
{endpoint}"""
        )
    return "---\n".join(docs)


def routes_yaml(hosts: int, generation: int) -> str:
    rules = "".join(
        f"""  - name: r{k}
    match:
    - uri:
        prefix: {rule_prefix(k)}
    route:
    - destination:
        host: {UPSTREAM_HOST}
        port:
          number: 80
    headers:
      response:
        set:
          {GEN_HEADER}: "{generation}"
"""
        for k in range(RULES)
    )
    return "---\n".join(
        f"""apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: svc-{i}
  namespace: default
spec:
  hosts:
  - {host(i)}
  http:
{rules}"""
        for i in range(hosts)
    )


def generate(directory: Path, hosts: int, upstream_port: int, generation: int = 1) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "services.yaml").write_text(services_yaml(hosts, upstream_port))
    write_routes(directory, hosts, generation)


def write_routes(directory: Path, hosts: int, generation: int) -> float:
    """Atomically replace routes.yaml; returns the monotonic time right after the rename."""
    text = routes_yaml(hosts, generation)
    tmp = directory / ".routes.yaml.tmp"
    tmp.write_text(text)
    os.replace(tmp, directory / "routes.yaml")
    return time.monotonic()


def write_request_lists(workdir: Path, hosts: int) -> tuple[Path, Path]:
    pairs = [(host(i), request_path(i)) for i in range(hosts)]
    lines = workdir / f"requests-{hosts}.txt"
    lines.write_text("".join(f"{h} {p}\n" for h, p in pairs))
    js = workdir / f"requests-{hosts}.json"
    js.write_text(json.dumps(pairs))
    return lines, js


def config_dump(admin: int) -> tuple[str | None, float, int]:
    """(version, seconds the dump took, its size in bytes)."""
    t0 = time.monotonic()
    reply = http_get(admin, "/config_dump", timeout=30.0)
    took = time.monotonic() - t0
    if reply.status != 200:
        raise BenchError(f"/config_dump answered {reply.status}")
    try:
        version = json.loads(reply.body).get("version")
    except (ValueError, AttributeError) as exc:
        raise BenchError(f"/config_dump is not a JSON object: {exc}") from exc
    return (str(version) if version is not None else None), took, len(reply.body)


def _stop_prober(prober: subprocess.Popen[str]) -> dict:
    if prober.poll() is None:
        prober.send_signal(signal.SIGTERM)
    return finish_loadgen(prober, timeout=30)


def _reload_trials(
    ctx: Context, running: Running, directory: Path, hosts: int, req_json: Path
) -> dict:
    assert running.admin_port is not None
    out: dict = {}
    notes: list[str] = []
    cap = 60.0  # seconds a reload may take before we give up waiting

    # trial 1: data plane only
    prober = run_loadgen(
        "loop",
        running.port,
        ctx.load_cpus,
        duration=cap + 10,
        connections=4,
        requests_file=req_json,
        watch_header=GEN_HEADER,
        background=True,
    )
    assert isinstance(prober, subprocess.Popen)
    try:
        time.sleep(ctx.plan.reload_window / 2)
        t_write = write_routes(directory, hosts, 2)

        def switched() -> bool:
            return http_get(running.port, request_path(0), host(0)).headers.get(GEN_HEADER) == "2"

        try:
            wait_until(switched, t_write + cap, running.proc, "for the reloaded config to serve")
        except BenchError as exc:
            notes.append(f"generation 2 never served: {exc}".splitlines()[0])
        time.sleep(ctx.plan.reload_window / 2)
    finally:
        res1 = _stop_prober(prober)
    seen = [c["at"] for c in res1["header_changes"] if c["value"] == "2"]
    out["data_plane_seconds"] = round(seen[0] - t_write, 4) if seen else None
    out["max_gap_ms"] = res1["max_gap_ms"]
    out["max_gap_after_write_ms"] = round((res1["max_gap_at"] - t_write) * 1e3, 1)
    out["prober_responses"] = res1["responses"]
    errors, non_2xx = res1["errors"], res1["non_2xx"]

    # trial 2: /config_dump polled until its version changes
    try:
        v0, took, size = config_dump(running.admin_port)
    except (BenchError, OSError) as exc:
        notes.append(f"/config_dump unusable: {exc}")
        v0, took, size = None, None, None
    out["config_dump_fetch_seconds"] = round(took, 4) if took is not None else None
    out["config_dump_bytes"] = size
    out["version_before"] = v0
    if v0 is not None:
        prober = run_loadgen(
            "loop",
            running.port,
            ctx.load_cpus,
            duration=cap + 10,
            connections=4,
            requests_file=req_json,
            watch_header=GEN_HEADER,
            background=True,
        )
        assert isinstance(prober, subprocess.Popen)
        try:
            time.sleep(ctx.plan.reload_window / 2)
            t_write = write_routes(directory, hosts, 3)
            changed_at = None
            while time.monotonic() < t_write + cap:
                v, _, _ = config_dump(running.admin_port)
                if v != v0:
                    changed_at = time.monotonic()
                    out["version_after"] = v
                    break
            if changed_at is None:
                notes.append(f"/config_dump version still {v0!r} after {cap:.0f} s")
            out["config_dump_seconds"] = (
                round(changed_at - t_write, 4) if changed_at is not None else None
            )
            time.sleep(ctx.plan.reload_window / 2)
        finally:
            res2 = _stop_prober(prober)
        out["max_gap_ms_with_admin_polling"] = res2["max_gap_ms"]
        errors += res2["errors"]
        non_2xx += res2["non_2xx"]
    out["errors"] = errors
    out["non_2xx"] = non_2xx
    if notes:
        out["note"] = "; ".join(notes)
    return out


def _measure_table(ctx: Context, hosts: int, label: str, reload: bool) -> dict:
    plan = ctx.plan
    up = ctx.upstream.port
    directory = ctx.workdir / f"table-{hosts}"
    t0 = time.monotonic()
    generate(directory, hosts, up)
    gen_seconds = time.monotonic() - t0
    yaml_bytes = sum(p.stat().st_size for p in directory.glob("*.yaml"))
    lines, req_json = write_request_lists(ctx.workdir, hosts)
    script = ctx.workdir / "rotate.lua"
    script.write_text(WRK_SCRIPT)
    result: dict = {
        "label": label,
        "hosts": hosts,
        "routes": hosts * RULES,
        "yaml_bytes": yaml_bytes,
        "generate_seconds": round(gen_seconds, 3),
    }
    running = None
    try:
        running = start_meshproxy(
            ctx.workdir,
            directory,
            ctx.proxy_cpus,
            name=f"meshproxy-table-{hosts}",
            ready_timeout=300.0,
            check_path=request_path(0),
            check_host=host(0),
        )
        assert running.proc is not None
        pid = running.proc.pid
        result["start_seconds"] = round(running.start_seconds, 3)
        time.sleep(0.5)
        result["idle_rss_kib"] = sum(p.rss_kib for p in procstat.tree_memory(pid))
        wrk_args = {"script": script, "script_args": [str(lines)]}
        run_wrk(running.port, plan.sat_warmup, plan.sat_connections, ctx.load_cpus, **wrk_args)
        acc0 = ctx.upstream.accepts()
        cpu0 = procstat.tree_cpu_seconds(pid)
        sat = run_wrk(
            running.port, plan.sat_seconds, plan.sat_connections, ctx.load_cpus, **wrk_args
        )
        cpu1 = procstat.tree_cpu_seconds(pid)
        result["upstream_connections"] = connections_between(acc0, ctx.upstream.accepts())
        result["rps"] = sat["rps"]
        result["requests"] = sat["requests"]
        result["non_2xx"] = sat["non_2xx"]
        result["socket_errors"] = sat["socket_errors"]
        result["cpu_s_per_1k"] = (
            round((cpu1 - cpu0) / sat["requests"] * 1000, 5) if sat["requests"] else None
        )
        result["peak_hwm_kib"] = sum(p.hwm_kib for p in procstat.tree_memory(pid))
        if reload:
            result["reload"] = _reload_trials(ctx, running, directory, hosts, req_json)
            result["peak_hwm_after_reload_kib"] = sum(p.hwm_kib for p in procstat.tree_memory(pid))
        if not running.proc.alive():
            raise BenchError(f"meshproxy died during the run\n{running.proc.tail()}")
    finally:
        if running is not None and running.proc is not None:
            running.proc.stop()
    return result


def run(ctx: Context) -> dict:
    """Both tables and the reload; a dict for the report (``status`` ok / skipped / error)."""
    why = meshproxy_available()
    if why:
        return {"status": "skipped", "error": why}
    try:
        small = _measure_table(ctx, 10, "10 hosts", reload=False)
        large = _measure_table(ctx, ctx.plan.big_hosts, f"{ctx.plan.big_hosts:,} hosts", True)
    except BenchError as exc:
        print(f"   bigtable: {exc}", flush=True)
        return {"status": "error", "error": str(exc)}
    ratio = round(large["rps"] / small["rps"], 3) if small.get("rps") else None
    return {
        "status": "ok",
        "small": small,
        "large": large,
        "rps_ratio": ratio,
        "reload": large.get("reload", {}),
    }
