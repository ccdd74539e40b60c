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

Two reloads follow, each under load, each replacing ``routes.yaml`` (write to a temp file, then
rename):

* the localized edit: one VirtualService (``svc-N/2``, mid-file) sets ``x-bench-gen: 2``, the
  other documents are byte-identical, so the incremental builder re-translates one document;
* the full rewrite: every VirtualService sets ``x-bench-gen: 3`` (all 50,000 routes change).

While each happens:

* a closed-loop prober (``loadgen.py loop``, 4 keep-alive connections, rotating over all
  hosts; for the localized edit every third request goes to the edited host) records the
  first response carrying the new ``x-bench-gen`` (the time until the new config serves) and
  the longest gap between consecutive responses (the reload's stall);
* the admin is polled every 20 ms until it reports the new version, with
  ``/config_dump?resource=version`` (a few dozen bytes; :func:`version_reader` falls back to
  ``meshproxy_config_version_info`` on ``/stats/prometheus``, then to the whole dump, for an
  admin without that query).

Last, one whole ``/config_dump`` (bounded by ``Plan.dump_timeout``) must show the new version;
its response time and size are reported, and the longest gap between the responses of the same
prober, looping over every host while the dump is produced (what a dump costs the data plane).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import procstat
from harness import BenchError, finish_loadgen, http_get, run_loadgen, run_wrk
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


def _rules(generation: int) -> str:
    return "".join(
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


def routes_yaml(hosts: int, generation: int, overrides: Mapping[int, int] | None = None) -> str:
    """One VirtualService per host; host ``i`` sets ``x-bench-gen`` to ``overrides[i]`` when
    given, else to ``generation``."""
    rules = {g: _rules(g) for g in {generation, *(overrides or {}).values()}}
    over = overrides or {}
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
{rules[over.get(i, generation)]}"""
        for i in range(hosts)
    )


def generate(directory: Path, hosts: int, upstream_port: int, generation: int = 1) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "services.yaml").write_text(services_yaml(hosts, upstream_port))
    write_routes(directory, hosts, generation)


def write_routes(
    directory: Path, hosts: int, generation: int, overrides: Mapping[int, int] | None = None
) -> float:
    """Atomically replace routes.yaml; returns the monotonic time right after the rename."""
    text = routes_yaml(hosts, generation, overrides)
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


def config_dump(admin: int, timeout: float = 30.0) -> tuple[str | None, float, int]:
    """(version, seconds the dump took, its size in bytes)."""
    t0 = time.monotonic()
    reply = http_get(admin, "/config_dump", timeout=timeout)
    took = time.monotonic() - t0
    if reply.status != 200:
        raise BenchError(f"/config_dump answered {reply.status}")
    try:
        version = json.loads(reply.body).get("version")
    except (ValueError, AttributeError) as exc:
        raise BenchError(f"/config_dump is not a JSON object: {exc}") from exc
    return (str(version) if version is not None else None), took, len(reply.body)


_VERSION_METRIC = re.compile(r'^meshproxy_config_version_info\{version="([^"]*)"\}', re.M)
CHEAP_VERSION_BYTES = 64 * 1024  # a version-only answer bigger than this is a whole dump


def metrics_version(admin: int) -> str | None:
    """The applied version as ``/stats/prometheus`` reports it (cheap, unlike a big dump)."""
    try:
        reply = http_get(admin, "/stats/prometheus", timeout=10.0)
    except OSError:
        return None
    if reply.status != 200:
        return None
    found = _VERSION_METRIC.findall(reply.body.decode("utf-8", "replace"))
    return found[-1] if len(found) == 1 else None


def dump_version(admin: int) -> tuple[str | None, bool]:
    """(version from ``/config_dump?resource=version``, whether the answer was cheap). An
    admin that does not know the query answers the whole dump: right, but not cheap."""
    try:
        reply = http_get(admin, "/config_dump?resource=version", timeout=10.0)
    except OSError:
        return None, False
    if reply.status != 200:
        return None, False
    try:
        doc = json.loads(reply.body)
    except ValueError:
        return None, False
    version = doc.get("version") if isinstance(doc, dict) else None
    return (str(version) if version is not None else None), len(reply.body) < CHEAP_VERSION_BYTES


def version_reader(admin: int, dump_timeout: float) -> tuple[Callable[[], str | None], str]:
    """The cheapest way this admin tells its applied version, and its description."""
    if dump_version(admin)[1]:
        return (lambda: dump_version(admin)[0]), "/config_dump?resource=version"
    if metrics_version(admin) is not None:
        return (lambda: metrics_version(admin)), "meshproxy_config_version_info"

    def whole_dump() -> str | None:
        return config_dump(admin, timeout=dump_timeout)[0]

    return whole_dump, "/config_dump (whole)"


@dataclass(frozen=True)
class Edit:
    """One reload scenario: what it changes, how, and the ``x-bench-gen`` value that shows a
    response came from the new config."""

    key: str  # where the result goes in the table's dict
    what: str
    value: str
    write: Callable[[], float]  # rewrites routes.yaml; returns the time right after the rename
    requests: Path  # the prober's request list


def edited_host(hosts: int) -> int:
    """The host whose VirtualService the localized edit changes (mid-file)."""
    return hosts // 2


def write_local_requests(workdir: Path, hosts: int) -> Path:
    """The prober's list for the localized edit: every host in turn, as for the full rewrite,
    with the edited host every third request so the first response from the new config is
    seen within a few requests of it serving."""
    k = edited_host(hosts)
    pairs: list[tuple[str, str]] = []
    for i in range(hosts):
        if i % 3 == 0:
            pairs.append((host(k), request_path(k)))
        pairs.append((host(i), request_path(i)))
    path = workdir / f"requests-{hosts}-local.json"
    path.write_text(json.dumps(pairs))
    return path


def _stop_prober(prober: subprocess.Popen[str]) -> dict:
    if prober.poll() is None:
        prober.send_signal(signal.SIGTERM)
    return finish_loadgen(prober, timeout=30)


def _reload(ctx: Context, running: Running, edit: Edit) -> dict:
    """Apply ``edit`` under load; see the module docstring."""
    assert running.admin_port is not None
    out: dict = {"edit": edit.what}
    notes: list[str] = []
    cap = 90.0  # seconds a reload may take before we give up waiting
    read_version, source = version_reader(running.admin_port, ctx.plan.dump_timeout)
    out["version_source"] = source
    try:
        v0 = read_version()
    except (BenchError, OSError) as exc:
        v0 = None
        notes.append(f"admin version unreadable: {exc}")
    out["version_before"] = v0
    prober = run_loadgen(
        "loop",
        running.port,
        ctx.load_cpus,
        duration=cap + 10,
        connections=4,
        requests_file=edit.requests,
        watch_header=GEN_HEADER,
        background=True,
    )
    assert isinstance(prober, subprocess.Popen)
    t_write = 0.0
    admin_at: float | None = None
    try:
        time.sleep(ctx.plan.reload_window / 2)
        t_write = edit.write()
        while v0 is not None and time.monotonic() < t_write + cap:
            if not running.proc or not running.proc.alive():
                notes.append("meshproxy exited during the reload")
                break
            try:
                v = read_version()
            except (BenchError, OSError):
                v = None
            if v is not None and v != v0:
                admin_at = time.monotonic()
                out["version_after"] = v
                break
            time.sleep(0.02)
        if v0 is not None and admin_at is None:
            notes.append(f"admin version still {v0!r} {cap:.0f} s after the write")
        # let the prober see the new config too (it may lag the admin by a little)
        time.sleep(ctx.plan.reload_window / 2)
    finally:
        res = _stop_prober(prober)
    out["config_dump_seconds"] = round(admin_at - t_write, 4) if admin_at is not None else None
    seen = [c["at"] for c in res["header_changes"] if c["value"] == edit.value]
    out["data_plane_seconds"] = round(seen[0] - t_write, 4) if seen else None
    if not seen:
        notes.append(
            f"no response carried {GEN_HEADER}: {edit.value} (header ops unsupported or no reload)"
        )
    out["max_gap_ms"] = res["max_gap_ms"]
    out["max_gap_after_write_ms"] = round((res["max_gap_at"] - t_write) * 1e3, 1)
    out["prober_responses"] = res["responses"]
    out["errors"] = res["errors"]
    out["non_2xx"] = res["non_2xx"]
    if notes:
        out["note"] = "; ".join(notes)
    return out


def _dump_check(ctx: Context, running: Running, result: dict, req_json: Path) -> None:
    """One whole ``/config_dump`` (bounded by ``Plan.dump_timeout``), which must show the
    version the last reload reported, fetched while the prober loops over every host: its
    response time, size and the longest gap between the prober's responses meanwhile (what a
    dump costs the data plane) go in ``result["reload"]``."""
    assert running.admin_port is not None
    rel = result.get("reload", {})
    notes = [rel["note"]] if rel.get("note") else []
    prober = run_loadgen(
        "loop",
        running.port,
        ctx.load_cpus,
        duration=ctx.plan.dump_timeout + 10,
        connections=4,
        requests_file=req_json,
        background=True,
    )
    assert isinstance(prober, subprocess.Popen)
    try:
        time.sleep(ctx.plan.reload_window / 4)
        v_dump, took, size = config_dump(running.admin_port, timeout=ctx.plan.dump_timeout)
        rel["config_dump_fetch_seconds"] = round(took, 3)
        rel["config_dump_bytes"] = size
        if "version_after" in rel and v_dump != rel["version_after"]:
            notes.append(f"/config_dump says {v_dump!r}, the version poll {rel['version_after']!r}")
        time.sleep(ctx.plan.reload_window / 4)
    except (BenchError, OSError) as exc:
        notes.append(f"/config_dump did not answer within {ctx.plan.dump_timeout:.0f} s ({exc})")
    finally:
        res = _stop_prober(prober)
    rel["config_dump_max_gap_ms"] = res["max_gap_ms"]
    rel["config_dump_errors"] = res["errors"] + res["non_2xx"]
    if notes:
        rel["note"] = "; ".join(notes)


def ours_cpu_seconds(ctx: Context) -> float:
    up = ctx.upstream.proc.pid if ctx.upstream.proc is not None else None
    return procstat.load_side_cpu_seconds(up)


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
        print(f"   {label}: serving {running.start_seconds:.2f} s after start", flush=True)
        time.sleep(0.5)
        result["idle_rss_kib"] = sum(p.rss_kib for p in procstat.tree_memory(pid))
        wrk_args = {"script": script, "script_args": [str(lines)]}
        run_wrk(running.port, plan.sat_warmup, plan.sat_connections, ctx.load_cpus, **wrk_args)
        acc0 = ctx.upstream.accepts()
        ours0 = ours_cpu_seconds(ctx)
        cpu0 = procstat.tree_cpu_seconds(pid)
        busy0 = procstat.machine_busy_seconds()
        sat = run_wrk(
            running.port, plan.sat_seconds, plan.sat_connections, ctx.load_cpus, **wrk_args
        )
        busy1 = procstat.machine_busy_seconds()
        cpu1 = procstat.tree_cpu_seconds(pid)
        other = (busy1 - busy0) - (cpu1 - cpu0) - (ours_cpu_seconds(ctx) - ours0)
        result["other_cpu_share"] = round(max(0.0, other) / plan.sat_seconds, 2)
        result["upstream_connections"] = connections_between(acc0, ctx.upstream.accepts())
        result["rps"] = sat["rps"]
        result["requests"] = sat["requests"]
        result["non_2xx"] = sat["non_2xx"]
        result["socket_errors"] = sat["socket_errors"]
        result["cpu_s_per_1k"] = (
            round((cpu1 - cpu0) / sat["requests"] * 1000, 5) if sat["requests"] else None
        )
        result["peak_hwm_kib"] = sum(p.hwm_kib for p in procstat.tree_memory(pid))
        print(f"   {label}: {sat['rps']:,.0f} req/s", flush=True)
        if reload:
            k = edited_host(hosts)
            edits = (
                Edit(
                    "reload_local",
                    f"one VirtualService (svc-{k}, 1 of {hosts:,} documents in routes.yaml)",
                    "2",
                    lambda: write_routes(directory, hosts, 1, {k: 2}),
                    write_local_requests(ctx.workdir, hosts),
                ),
                Edit(
                    "reload",
                    f"every VirtualService ({hosts:,})",
                    "3",
                    lambda: write_routes(directory, hosts, 3),
                    req_json,
                ),
            )
            for edit in edits:
                result[edit.key] = rel = _reload(ctx, running, edit)
                print(
                    f"   reload, {edit.what}: new config serves after "
                    f"{rel.get('data_plane_seconds')} s, admin version after "
                    f"{rel.get('config_dump_seconds')} s, longest gap {rel.get('max_gap_ms')} ms",
                    flush=True,
                )
            _dump_check(ctx, running, result, req_json)
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
        small = _measure_table(ctx, 10, "10 hosts", reload=True)
        large = _measure_table(ctx, ctx.plan.big_hosts, f"{ctx.plan.big_hosts:,} hosts", True)
    except (BenchError, OSError) as exc:
        print(f"   bigtable: {exc}", flush=True)
        return {"status": "error", "error": str(exc)}
    ratio = round(large["rps"] / small["rps"], 3) if small.get("rps") else None
    a, b = small.get("cpu_s_per_1k"), large.get("cpu_s_per_1k")
    cpu_ratio = round(b / a, 3) if a and b else None
    return {
        "status": "ok",
        "small": small,
        "large": large,
        "rps_ratio": ratio,
        "cpu_ratio": cpu_ratio,
        "reload": large.get("reload", {}),
        "reload_local": large.get("reload_local", {}),
    }
