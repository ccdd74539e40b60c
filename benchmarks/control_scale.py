"""The control plane at scale: N simulated proxies on one ``meshproxy control`` (issue 5, scope 6).

Usage: ``python benchmarks/control_scale.py [--quick] [--proxies 10,100,1000] [--changes 20]``
(``--help`` for pacing, pinning, output and ``--wait-quiet`` options).

Theory of operation
-------------------
**The mesh.** :func:`mesh_files` writes a realistic directory: ``--namespaces`` (10) namespaces
of ``--services`` (10) services, one file per service with a ``ServiceEntry`` (STATIC, four
endpoints labelled ``version: v1``/``v2``), a ``DestinationRule`` (connection pool, outlier
detection, subsets ``v1``/``v2``) and a ``VirtualService`` (a header match to ``v2``, then a
weighted ``v1``/``v2`` split with timeout and retries); the last 30 % of each namespace's
services are ``exportTo: ["."]``, so scoping hides them from the other namespaces. Each
namespace also has a ``PeerAuthentication`` and two ``AuthorizationPolicies``, one selecting
``version: v2`` workloads, so that proxies with different labels get different documents.

**The control plane** runs as a real subprocess, ``python -m meshproxy control --config DIR
--listen 127.0.0.1:0`` (pinned to ``--cp-cpus``), exactly as a user starts it.

**The proxies** are ``simproxies.py`` processes (pinned to ``--sim-cpus``), one for up to
``SIMS_PER_PROCESS`` proxies and two beyond, each proxy a WebSocket stream of its own with a node
id, a namespace and labels (:func:`simproxies.identity`); they ACK every config after parsing
its JSON, but do not translate it, and report (node, version, received, acked, which
VirtualServices changed) per config on stdout, which this script follows as the files grow.

**A change** rewrites one service file (written beside it, then ``os.replace``: an atomic
rename) with a new ``v2`` weight, ``time.time()`` taken just before the rename. Targets rotate
over the services exported to every namespace (:func:`change_target`), so every proxy must
receive every change. A proxy has converged when it ACKed a config received after the write
whose documents carry the new weights (checked by content, not by version); *convergence* is
the time from the write to the last proxy's ACK, *first ACK* to the first one. Changes are
``--pause`` seconds apart after the previous one converged, so they never overlap. The
control plane's debounce (``--debounce``, 0.1 s by default, Istio's too) is part of it.

**Measured besides:** the control plane's CPU seconds (``utime + stime`` of
``/proc/PID/stat``) from just before each write to its convergence, and the sims' likewise (so
the reader sees whether the machine, two cores, was saturated by the sims); its ``VmRSS`` when
started, once every proxy has its first config, and idle after the changes (2 s settle),
``VmHWM``; its idle CPU with N streams (heartbeats); and once the changes are done, the cost
of one ``GET /status`` (CPU seconds, bytes) and a check that ``/status`` shows every proxy
``SYNCED``: ``/status`` is not polled during a measurement, because with 1,000 proxies it is a
real cost. The control plane's own ``/metrics`` (pushes, ACKs, push-to-ACK histogram) are kept.

Percentiles are nearest-rank: with 20 changes, p99 is the slowest. Results:
``control/latest.json`` and ``control/latest.md`` (``--quick``: ``control/quick.*``) and, on a
full run, the section between ``<!-- control:begin -->`` and ``<!-- control:end -->`` of
``benchmarks/README.md``. Every process is stopped by its PID in a ``finally``. Nothing here
asserts a timing: it is measurement; the targets (p99 convergence <= 1 s at 1,000 proxies,
idle RSS <= 150 MiB) are reported as met or not.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import shutil
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the siblings are imported by name, as run.py does
    sys.path.insert(0, str(HERE))

import procstat  # noqa: E402
import simproxies  # noqa: E402
from harness import (  # noqa: E402
    REPO,
    BenchError,
    Proc,
    add_quiet_and_readme_options,
    cpu_model,
    git_head,
    interrupt_on_sigterm,
    quiet_limit,
    replace_section,
    start,
    wait_quiet,
)

README_BEGIN = "<!-- control:begin (written by benchmarks/control_scale.py; do not edit) -->"
README_END = "<!-- control:end -->"
TARGET_P99 = 1.0  # seconds, at 1,000 proxies (issue 5)
TARGET_RSS_MIB = 150.0  # idle, at 1,000 proxies
TARGET_PROXIES = 1000
SIMS_PER_PROCESS = 500  # more proxies than this: two sim processes
QUIET_WAIT = 30.0
PRIVATE_SHARE = 0.3  # of each namespace's services: exportTo ["."]
CHANGE_TIMEOUT = 60.0  # a change not converged by then fails the point
SETTLE = 2.0  # seconds after the last change before the idle figures
POLL = 0.01  # how often the sims' output files are read
DOMAIN = "svc.cluster.local"


# =========================================================================== the mesh


@dataclass(frozen=True, slots=True)
class Mesh:
    namespaces: int = 10
    services: int = 10

    @property
    def public_services(self) -> int:
        """Services of a namespace exported to every namespace (the first ones)."""
        return max(1, self.services - int(self.services * PRIVATE_SHARE))

    def private(self, j: int) -> bool:
        return j >= self.public_services


def host(i: int, j: int) -> str:
    return f"svc{j}.ns{i}.{DOMAIN}"


def service_documents(mesh: Mesh, i: int, j: int, weight_v2: int) -> list[dict[str, Any]]:
    """ServiceEntry, DestinationRule and VirtualService of service ``j`` of namespace ``i``."""
    name, ns, h = f"svc{j}", f"ns{i}", host(i, j)
    export = {"exportTo": ["."]} if mesh.private(j) else {}
    meta = {"name": name, "namespace": ns}
    endpoints = [
        {
            "address": f"10.{i % 250}.{j % 250}.{k + 1}",
            "ports": {"http": 8080},
            "labels": {"app": name, "version": f"v{1 + k % 2}"},
        }
        for k in range(4)
    ]
    se = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "ServiceEntry",
        "metadata": meta,
        "spec": {
            "hosts": [h],
            "location": "MESH_INTERNAL",
            "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}],
            "resolution": "STATIC",
            "endpoints": endpoints,
            **export,
        },
    }
    dr = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": meta,
        "spec": {
            "host": h,
            "trafficPolicy": {
                "connectionPool": {
                    "tcp": {"maxConnections": 100},
                    "http": {"http1MaxPendingRequests": 100, "maxRequestsPerConnection": 0},
                },
                "outlierDetection": {
                    "consecutive5xxErrors": 5,
                    "interval": "10s",
                    "baseEjectionTime": "30s",
                },
            },
            "subsets": [
                {"name": "v1", "labels": {"version": "v1"}},
                {"name": "v2", "labels": {"version": "v2"}},
            ],
            **export,
        },
    }
    vs = {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": meta,
        "spec": {
            "hosts": [h],
            "http": [
                {
                    "name": "canary-header",
                    "match": [{"headers": {"x-canary": {"exact": "always"}}}],
                    "route": [{"destination": {"host": h, "subset": "v2"}}],
                },
                {
                    "name": "split",
                    "route": [
                        {"destination": {"host": h, "subset": "v1"}, "weight": 100 - weight_v2},
                        {"destination": {"host": h, "subset": "v2"}, "weight": weight_v2},
                    ],
                    "timeout": "5s",
                    "retries": {"attempts": 2, "perTryTimeout": "2s", "retryOn": "5xx"},
                },
            ],
            **export,
        },
    }
    return [se, dr, vs]


def namespace_documents(i: int) -> list[dict[str, Any]]:
    """A namespace's PeerAuthentication and AuthorizationPolicies (one selects version v2)."""
    ns = f"ns{i}"
    return [
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "PeerAuthentication",
            "metadata": {"name": "default", "namespace": ns},
            "spec": {"mtls": {"mode": "PERMISSIVE"}},
        },
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "same-namespace", "namespace": ns},
            "spec": {"action": "ALLOW", "rules": [{"from": [{"source": {"namespaces": [ns]}}]}]},
        },
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "canary-readonly", "namespace": ns},
            "spec": {
                "selector": {"matchLabels": {"version": "v2"}},
                "action": "DENY",
                "rules": [{"to": [{"operation": {"methods": ["DELETE", "PATCH"]}}]}],
            },
        },
    ]


def dump(docs: list[dict[str, Any]]) -> str:
    return yaml.dump_all(docs, Dumper=yaml.CSafeDumper, sort_keys=False)


def service_path(root: Path, i: int, j: int) -> Path:
    return root / f"ns{i}" / f"svc{j}.yaml"


def mesh_files(mesh: Mesh) -> dict[str, str]:
    """Relative path -> YAML text of the whole mesh, every split at 50 / 50."""
    out: dict[str, str] = {}
    for i in range(mesh.namespaces):
        out[f"ns{i}/namespace.yaml"] = dump(namespace_documents(i))
        for j in range(mesh.services):
            out[f"ns{i}/svc{j}.yaml"] = dump(service_documents(mesh, i, j, 50))
    return out


def write_mesh(root: Path, mesh: Mesh) -> None:
    for rel, text in mesh_files(mesh).items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def change_target(index: int, mesh: Mesh) -> tuple[int, int]:
    """(namespace, service) rewritten by change ``index``: rotating over namespaces first,
    then over the services every namespace sees."""
    return index % mesh.namespaces, (index // mesh.namespaces) % mesh.public_services


def next_weight(index: int, current: int) -> int:
    """The v2 weight change ``index`` writes: 1..49 by index, never the current one."""
    w = 1 + index % 49
    return w if w != current else 1 + (w % 49)


def rewrite(root: Path, mesh: Mesh, i: int, j: int, weight_v2: int) -> float:
    """Rewrite service (i, j) with a new weight by atomic rename; the time.time() taken just
    before the rename."""
    final = service_path(root, i, j)
    tmp = final.with_name(f".{final.name}.tmp")  # a dot file: the control plane ignores it
    tmp.write_text(dump(service_documents(mesh, i, j, weight_v2)))
    t = time.time()
    os.replace(tmp, final)
    return t


def vs_key(i: int, j: int) -> str:
    return f"ns{i}/svc{j}"


def expected_weights(weight_v2: int) -> list[int]:
    """What :func:`simproxies.vs_weights` reads from a VirtualService written with this v2
    weight (the header rule's destination has no weight: 0)."""
    return [0, 100 - weight_v2, weight_v2]


def groups(n: int, mesh: Mesh) -> int:
    """Distinct (namespace, labels) among ``n`` simulated proxies."""
    seen = set()
    for k in range(n):
        ns, labels = simproxies.identity(k, mesh.namespaces, mesh.services)
        seen.add((ns, tuple(sorted(labels.items()))))
    return len(seen)


# =========================================================================== statistics


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


def summary(values: list[float]) -> dict[str, float | None]:
    return {
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "max": max(values) if values else None,
        "min": min(values) if values else None,
        "mean": sum(values) / len(values) if values else None,
    }


# =========================================================================== following the sims


class Follower:
    """Reads the sims' stdout files as they grow and keeps what each proxy reported."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        self.offsets = [0] * len(paths)
        self.partial = [""] * len(paths)
        self.configs: list[dict[str, Any]] = []  # config lines not consumed yet
        self.connected: list[dict[str, Any]] = []
        self.problems: list[str] = []

    def poll(self) -> int:
        """Read what was appended; the number of new lines."""
        new = 0
        for idx, path in enumerate(self.paths):
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    f.seek(self.offsets[idx])
                    data = f.read()
            except OSError:
                continue
            if not data:
                continue
            self.offsets[idx] += len(data.encode("utf-8", errors="replace"))
            text = self.partial[idx] + data
            lines = text.split("\n")
            self.partial[idx] = lines.pop()
            for line in lines:
                if not line.strip():
                    continue
                new += 1
                self.take(line)
        return new

    def take(self, line: str) -> None:
        try:
            obj = json.loads(line)
        except ValueError:
            self.problems.append(f"unreadable line from a sim: {line[:120]!r}")
            return
        if "n" in obj:
            self.configs.append(obj)
        elif "connected" in obj:
            self.connected.append(obj)
        elif "closed" in obj:
            self.problems.append(f"{obj['closed']}: stream closed: {obj.get('why')}")
        elif "error" in obj:
            self.problems.append(f"{obj['error']}: {obj.get('why')}")

    def drain(self) -> list[dict[str, Any]]:
        out, self.configs = self.configs, []
        return out


# =========================================================================== one point of the curve


@dataclass
class Options:
    proxies: list[int]
    changes: int
    pause: float
    mesh: Mesh
    debounce: float = 0.1
    cp_cpus: str | None = "0"
    sim_cpus: str | None = "1"
    compress: bool = True
    parse: tuple[str, ...] = ("each", "shared")
    status_check: bool = True
    settle: float = SETTLE
    experiment: tuple[str, ...] = ()
    profile: Path | None = None
    quick: bool = False


@dataclass
class Point:
    """What one proxy count gave (the JSON of a row)."""

    proxies: int
    parse: str = "each"
    experiment: list[str] = field(default_factory=list)  # patches applied to the control plane
    sim_processes: int = 0
    groups: int = 0
    status: str = "ok"
    error: str | None = None
    initial: dict[str, Any] = field(default_factory=dict)
    changes: list[dict[str, Any]] = field(default_factory=list)
    convergence_s: dict[str, float | None] = field(default_factory=dict)
    first_ack_s: dict[str, float | None] = field(default_factory=dict)
    cp: dict[str, Any] = field(default_factory=dict)
    sims: dict[str, Any] = field(default_factory=dict)
    status_endpoint: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


def mib(kib: int) -> float:
    return round(kib / 1024.0, 1)


def rss(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of ``pid`` in MiB."""
    mem = procstat.memory([pid])
    if not mem:
        return 0.0, 0.0
    return mib(mem[0].rss_kib), mib(mem[0].hwm_kib)


def http_get(port: int, path: str, timeout: float = 30.0) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
        return bytes(resp.read())


_METRIC = re.compile(r"^(meshproxy_control_[a-z_]+?)(?:_total)?(\{[^}]*\})?\s+([0-9.eE+-]+)$")


def control_metrics(text: str) -> dict[str, float]:
    """The control plane's counters worth keeping: pushes, ACKs, NACKs, push errors and the
    push-to-ACK histogram's sum and count."""
    keep = {
        "meshproxy_control_pushes",
        "meshproxy_control_push_errors",
        "meshproxy_control_acks",
        "meshproxy_control_nacks",
        "meshproxy_control_push_ack_seconds_sum",
        "meshproxy_control_push_ack_seconds_count",
        "meshproxy_control_connected_proxies",
    }
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _METRIC.match(line.strip())
        if m and m.group(1) in keep and not m.group(2):
            out[m.group(1).removeprefix("meshproxy_control_")] = float(m.group(3))
    return out


def control_argv(config_dir: Path, opts: Options, experiment: tuple[str, ...]) -> list[str]:
    args = [
        "control",
        "--config",
        str(config_dir),
        "--listen",
        "127.0.0.1:0",
        "--debounce",
        str(opts.debounce),
    ]
    if opts.profile is not None or experiment:
        return [sys.executable, str(Path(__file__).resolve()), "--wrapped-control", *args]
    return [sys.executable, "-m", "meshproxy", *args]


def start_control(
    workdir: Path, config_dir: Path, opts: Options, name: str, experiment: tuple[str, ...] = ()
) -> tuple[Proc, int]:
    env = dict(os.environ)
    env.pop("CONTROL_SCALE_PROFILE", None)
    env["CONTROL_SCALE_EXPERIMENT"] = ",".join(experiment)
    if opts.profile is not None:
        env["CONTROL_SCALE_PROFILE"] = str(opts.profile.with_suffix(f".{name}.prof"))
    argv = control_argv(config_dir, opts, experiment)
    proc = start(f"control-{name}", argv, workdir, opts.cp_cpus, env=env, cwd=REPO)
    deadline = time.monotonic() + 60.0
    while time.monotonic() < deadline:
        if not proc.alive():
            code = proc.popen.returncode
            raise BenchError(f"meshproxy control exited with {code}\n{proc.tail()}")
        m = re.search(r"listening control=[^\s:]+:(\d+)", proc.stdout_path.read_text())
        if m:
            return proc, int(m.group(1))
        time.sleep(0.05)
    raise BenchError(f"meshproxy control did not print its port within 60 s\n{proc.tail()}")


def start_sims(
    workdir: Path, port: int, n: int, opts: Options, parse: str, label: str
) -> list[Proc]:
    count = 1 if n <= SIMS_PER_PROCESS else 2
    procs: list[Proc] = []
    first = 0
    for s in range(count):
        size = n // count + (1 if s < n % count else 0)
        argv = [
            sys.executable,
            str(HERE / "simproxies.py"),
            "--url",
            f"http://127.0.0.1:{port}",
            "--first",
            str(first),
            "--count",
            str(size),
            "--namespaces",
            str(opts.mesh.namespaces),
            "--services",
            str(opts.mesh.services),
            "--parse",
            parse,
        ]
        if not opts.compress:
            argv.append("--no-compress")
        procs.append(start(f"sims-{label}-{s}", argv, workdir, opts.sim_cpus, cwd=REPO))
        first += size
    return procs


def check_alive(procs: list[Proc]) -> None:
    for p in procs:
        if not p.alive():
            raise BenchError(f"{p.name} exited with {p.popen.returncode}\n{p.tail()}")


def wait_initial(follower: Follower, procs: list[Proc], n: int, t0: float) -> dict[str, Any]:
    """Until every proxy ACKed its first config: docs, sizes, versions, connect time."""
    nodes: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + 60.0 + n * 0.05
    while len(nodes) < n:
        if time.monotonic() > deadline:
            raise BenchError(f"only {len(nodes)} of {n} proxies got a first config in time")
        check_alive(procs)
        if follower.problems:
            raise BenchError("; ".join(follower.problems[:5]))
        follower.poll()
        for rec in follower.drain():
            nodes.setdefault(rec["n"], rec)
        time.sleep(POLL)
    acks = [r["a"] - t0 for r in nodes.values()]
    docs = [r["d"] for r in nodes.values()]
    size = [r["b"] for r in nodes.values()]
    return {
        "all_acked_s": round(max(acks), 3),
        "distinct_versions": len({r["v"] for r in nodes.values()}),
        "documents_per_proxy": {"min": min(docs), "max": max(docs)},
        "config_kib": {
            "min": round(min(size) / 1024, 1),
            "max": round(max(size) / 1024, 1),
            "total": round(sum(size) / 1024, 1),
        },
    }


def run_change(
    index: int,
    root: Path,
    opts: Options,
    weights: dict[tuple[int, int], int],
    follower: Follower,
    cp: Proc,
    sims: list[Proc],
    nodes: set[str],
) -> dict[str, Any]:
    i, j = change_target(index, opts.mesh)
    w = next_weight(index, weights[(i, j)])
    key, want = vs_key(i, j), expected_weights(w)
    pending = set(nodes)
    got: dict[str, tuple[float, float]] = {}
    other = 0  # configs received after the write without the change
    versions: set[str] = set()
    sim_pids = [p.pid for p in sims]
    cpu_cp0, cpu_sims0 = procstat.cpu_seconds([cp.pid]), procstat.cpu_seconds(sim_pids)
    t_write = rewrite(root, opts.mesh, i, j, w)
    weights[(i, j)] = w
    deadline = time.monotonic() + CHANGE_TIMEOUT
    while pending:
        follower.poll()
        for rec in follower.drain():
            if rec["r"] < t_write:
                continue
            node = rec["n"]
            if node in pending and [key, want] in (rec.get("c") or []):
                pending.discard(node)
                got[node] = (rec["r"], rec["a"])
                versions.add(rec["v"])
            else:
                other += 1
        if not pending:
            break
        if follower.problems:
            raise BenchError("; ".join(follower.problems[:5]))
        if time.monotonic() > deadline:
            raise BenchError(
                f"change {index} ({key} v2 weight {w}): {len(pending)} of {len(nodes)} proxies "
                f"did not ACK it within {CHANGE_TIMEOUT:.0f} s"
            )
        check_alive([cp, *sims])
        time.sleep(POLL)
    cpu_cp = procstat.cpu_seconds([cp.pid]) - cpu_cp0
    cpu_sims = procstat.cpu_seconds(sim_pids) - cpu_sims0
    acks = [a for _, a in got.values()]
    recvs = [r for r, _ in got.values()]
    return {
        "index": index,
        "target": key,
        "weight_v2": w,
        "convergence_s": round(max(acks) - t_write, 4),
        "first_ack_s": round(min(acks) - t_write, 4),
        "first_receive_s": round(min(recvs) - t_write, 4),
        "median_ack_s": round(percentile([a - t_write for a in acks], 50) or 0.0, 4),
        "proxies": len(got),
        "versions": len(versions),
        "other_configs": other,
        "cp_cpu_s": round(cpu_cp, 3),
        "sims_cpu_s": round(cpu_sims, 3),
    }


def status_cost(port: int, cp: Proc, n: int, rounds: int = 10) -> dict[str, Any]:
    """The cost of ``GET /status`` (outside any measurement) and whether every proxy is
    SYNCED with the version the control plane expects of it."""
    c0 = procstat.cpu_seconds([cp.pid])
    t0 = time.monotonic()
    body = b""
    for _ in range(rounds):
        body = http_get(port, "/status")
    wall = (time.monotonic() - t0) / rounds
    cpu = (procstat.cpu_seconds([cp.pid]) - c0) / rounds
    status = json.loads(body)
    proxies = status.get("proxies", [])
    synced = sum(
        1
        for p in proxies
        if p.get("status") == "SYNCED" and p.get("acked_version") == p.get("expected_version")
    )
    return {
        "get_wall_ms": round(wall * 1000, 1),
        "get_cpu_ms": round(cpu * 1000, 1),
        "kib": round(len(body) / 1024, 1),
        "proxies": len(proxies),
        "synced": synced,
        "all_synced": synced == n == len(proxies),
        "errors": status.get("errors", []),
    }


def run_point(
    n: int, parse: str, opts: Options, workdir: Path, experiment: tuple[str, ...] = ()
) -> Point:
    point = Point(proxies=n, parse=parse, experiment=list(experiment), groups=groups(n, opts.mesh))
    label = "-".join([str(n), parse, *experiment])
    root = workdir / f"mesh-{label}"
    write_mesh(root, opts.mesh)
    weights = {(i, j): 50 for i in range(opts.mesh.namespaces) for j in range(opts.mesh.services)}
    procs: list[Proc] = []
    try:
        cp, port = start_control(workdir, root, opts, label, experiment)
        procs.append(cp)
        time.sleep(0.5)
        point.cp["rss_started_mib"] = rss(cp.pid)[0]
        t0 = time.time()
        sims = start_sims(workdir, port, n, opts, parse, label)
        procs.extend(sims)
        point.sim_processes = len(sims)
        follower = Follower([s.stdout_path for s in sims])
        point.initial = wait_initial(follower, procs, n, t0)
        nodes = {simproxies.node_id(k) for k in range(n)}
        time.sleep(opts.settle)
        point.cp["rss_connected_mib"] = rss(cp.pid)[0]
        cp_cpu0 = procstat.cpu_seconds([cp.pid])
        sims_cpu0 = procstat.cpu_seconds([s.pid for s in sims])
        for index in range(opts.changes):
            time.sleep(opts.pause)
            change = run_change(index, root, opts, weights, follower, cp, sims, nodes)
            point.changes.append(change)
            print(
                f"   {n} proxies ({parse}), change {index + 1}/{opts.changes} "
                f"({change['target']}): "
                f"last ACK {change['convergence_s'] * 1000:.0f} ms, "
                f"first {change['first_ack_s'] * 1000:.0f} ms, "
                f"control plane CPU {change['cp_cpu_s']:.2f} s",
                flush=True,
            )
        point.cp["cpu_total_s"] = round(procstat.cpu_seconds([cp.pid]) - cp_cpu0, 3)
        point.sims["cpu_total_s"] = round(
            procstat.cpu_seconds([s.pid for s in sims]) - sims_cpu0, 3
        )
        time.sleep(opts.settle)
        idle0 = procstat.cpu_seconds([cp.pid])
        time.sleep(opts.settle)
        idle = procstat.cpu_seconds([cp.pid]) - idle0
        point.cp["idle_cpu_share"] = round(idle / opts.settle, 4) if opts.settle else None
        point.cp["rss_idle_mib"], point.cp["hwm_mib"] = rss(cp.pid)
        if opts.status_check:
            point.status_endpoint = status_cost(port, cp, n)
        try:
            point.metrics = control_metrics(http_get(port, "/metrics").decode())
        except OSError as exc:
            point.metrics = {"error": str(exc)}  # type: ignore[dict-item]
        follower.poll()
        if follower.problems:
            raise BenchError("; ".join(follower.problems[:5]))
    except BenchError as exc:
        point.status, point.error = "error", str(exc)
    finally:
        for p in reversed(procs):
            p.stop()
    conv = [c["convergence_s"] for c in point.changes]
    point.convergence_s = summary(conv)
    point.first_ack_s = summary([c["first_ack_s"] for c in point.changes])
    if point.changes:
        point.cp["cpu_per_change_s"] = round(
            sum(c["cp_cpu_s"] for c in point.changes) / len(point.changes), 3
        )
        point.sims["cpu_per_change_s"] = round(
            sum(c["sims_cpu_s"] for c in point.changes) / len(point.changes), 3
        )
    return point


# =========================================================================== report


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:,.0f} ms"


def _f(v: Any, fmt: str = "{:,.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def variant(point: dict[str, Any]) -> str:
    """How the sims parsed, and the control plane's patches if any: ``shared``,
    ``shared, CP patched: plans + nodeflate``."""
    text = point.get("parse", "each")
    if point.get("experiment"):
        text += ", CP patched: " + " + ".join(point["experiment"])
    return text


def targets(doc: dict[str, Any]) -> dict[str, Any]:
    """Whether the issue's targets were met at 1,000 proxies, per :func:`variant` (absent:
    that point was not run or failed)."""
    out: dict[str, Any] = {}
    for point in doc["points"]:
        if point["proxies"] != TARGET_PROXIES or point.get("status") != "ok":
            continue
        p99 = point["convergence_s"].get("p99")
        idle = point["cp"].get("rss_idle_mib")
        out[variant(point)] = {
            "p99_s": p99,
            "p99_met": p99 is not None and p99 <= TARGET_P99,
            "rss_idle_mib": idle,
            "rss_met": idle is not None and idle <= TARGET_RSS_MIB,
        }
    return out


def render_markdown(doc: dict[str, Any]) -> str:
    env = doc.get("environment", {})
    opts = doc.get("options", {})
    out = [
        f"Run of {env.get('date', '?')}, commit `{env.get('git') or '?'}`, "
        f"{env.get('cpus', '?')} CPUs ({env.get('cpu_model') or '?'}), Python "
        f"{env.get('python', '?')}, load average {_f(env.get('load_average'), '{:.2f}')} at start; "
        f"control plane pinned to CPU {opts.get('cp_cpus') or '-'}, sims to CPU "
        f"{opts.get('sim_cpus') or '-'}; {opts.get('changes')} changes per point, "
        f"{opts.get('pause')} s apart; mesh {opts.get('namespaces')} namespaces x "
        f"{opts.get('services')} services; per-message deflate "
        f"{'on (as the real proxy negotiates)' if opts.get('compress', True) else 'off'}.",
        "",
        "| proxies | sims parse | sim procs | groups | configs | docs / proxy | KiB / config | "
        "convergence p50 | p99 | max | first ACK p50 | CP RSS idle | CP RSS peak | "
        "CP CPU / change | sims CPU / change |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in doc["points"]:
        if p.get("status") != "ok":
            first = (p.get("error") or "failed").splitlines()[0][:160]
            cells = f"| {p['proxies']:,} | {variant(p)} | error: {first} |"
            out.append(cells + " |" * 12)
            continue
        ini, conv, cp, sims = p["initial"], p["convergence_s"], p["cp"], p["sims"]
        docs = ini.get("documents_per_proxy", {})
        kib = ini.get("config_kib", {})
        out.append(
            f"| {p['proxies']:,} | {variant(p)} | {p['sim_processes']} | "
            f"{p['groups']} | "
            f"{ini.get('distinct_versions', '-')} | {docs.get('min', '-')}-{docs.get('max', '-')} "
            f"| {_f(kib.get('max'))} | {_ms(conv.get('p50'))} | {_ms(conv.get('p99'))} | "
            f"{_ms(conv.get('max'))} | {_ms(p['first_ack_s'].get('p50'))} | "
            f"{_f(cp.get('rss_idle_mib'))} MiB | {_f(cp.get('hwm_mib'))} MiB | "
            f"{_f(cp.get('cpu_per_change_s'), '{:.3f}')} s | "
            f"{_f(sims.get('cpu_per_change_s'), '{:.3f}')} s |"
        )
    out.append("")
    out.append(
        "*groups*: distinct (namespace, labels) among the proxies; *configs*: distinct versions "
        "the first push gave them (what scoping made different); *KiB / config*: the largest "
        "frame's JSON. *Convergence*: from the file's rename to the last proxy's ACK of a config "
        "carrying the change (first ACK: to the first proxy's). CPU per change: from just before "
        "the write to the last ACK."
    )
    detail: list[str] = []
    for p in doc["points"]:
        if p.get("status") != "ok":
            continue
        cp, st, m = p["cp"], p.get("status_endpoint", {}), p.get("metrics", {})
        line = (
            f"- {p['proxies']:,} proxies ({variant(p)}): first configs to all in "
            f"{_f(p['initial'].get('all_acked_s'), '{:.2f}')} s after the sims started; "
            f"control plane RSS {_f(cp.get('rss_started_mib'))} MiB with no proxy, "
            f"{_f(cp.get('rss_connected_mib'))} MiB connected, "
            f"idle CPU {_f((cp.get('idle_cpu_share') or 0) * 100, '{:.1f}')} % of a core"
        )
        if st:
            line += (
                f"; one `GET /status` costs {_f(st.get('get_cpu_ms'))} ms of control-plane CPU "
                f"({_f(st.get('kib'))} KiB), {st.get('synced')}/{p['proxies']} proxies SYNCED"
            )
        if m.get("push_ack_seconds_count"):
            mean = m["push_ack_seconds_sum"] / m["push_ack_seconds_count"]
            line += (
                f"; {m.get('pushes', 0):,.0f} pushes, {m.get('nacks', 0):,.0f} NACKs, mean "
                f"push-to-ACK {mean * 1000:,.0f} ms (control plane's histogram)"
            )
        detail.append(line + ".")
    if detail:
        out += ["", *detail]
    out.append("")
    t = targets(doc)
    if not t:
        out.append(f"Targets at {TARGET_PROXIES:,} proxies: not measured in this run.")
    for mode, r in t.items():
        p99_word = "met" if r["p99_met"] else "NOT met"
        rss_word = "met" if r["rss_met"] else "NOT met"
        out.append(
            f"Targets at {TARGET_PROXIES:,} proxies ({mode}): p99 convergence <= "
            f"{TARGET_P99:g} s {p99_word} ({_ms(r['p99_s'])}); idle RSS <= {TARGET_RSS_MIB:g} "
            f"MiB {rss_word} ({_f(r['rss_idle_mib'])} MiB)."
        )
    return "\n".join(out) + "\n"


def readme_section(doc: dict[str, Any]) -> str:
    return "\n".join(
        [
            README_BEGIN,
            "## Control plane at scale: `control_scale.py` (issue 5)",
            "",
            "```sh",
            "python benchmarks/control_scale.py --proxies 10,100,1000 --changes 20 "
            "--parse shared  # the run below",
            "python benchmarks/control_scale.py --quick  # 10 and 100 proxies, 5 changes; "
            "writes control/quick.{md,json} only",
            "python benchmarks/control_scale.py --proxies 1000 --changes 50 --parse shared "
            "--readme no",
            "```",
            "",
            "One `meshproxy control` process (as users start it) watches a generated mesh: 10 "
            "namespaces x 10 services, each a ServiceEntry, a DestinationRule with subsets and a "
            "VirtualService with a weighted v1/v2 split; 3 services per namespace are "
            '`exportTo: ["."]`; every namespace has a PeerAuthentication and two '
            "AuthorizationPolicies (one selects `version: v2`). N simulated proxies "
            "(`simproxies.py`, one process, two beyond 500 proxies) each open their own "
            "`/v1/stream` WebSocket like the real proxy's client (same aiohttp options, "
            "per-message deflate offered, as aiohttp's client does by default), with their own "
            "node id, namespace and labels (`app`, `version`). They ACK every config after "
            "parsing its JSON but **do not translate it** (a real proxy does, in a worker "
            "thread), so this measures the control plane and the wire, not the proxies. A "
            "change rewrites one service file by atomic rename with a new v2 weight; every "
            "change targets a service every namespace sees, so every proxy must ACK it, and a "
            "proxy counts only when the config it ACKed carries the new weights. `/status` is "
            "read only between changes (its cost is below). The machine is a noisy 2-core VM; "
            "the control plane is pinned to one core, the sims to the other.",
            "",
            "*sims parse* `each`: every simulated proxy runs `json.loads` on every frame, as "
            "the brief asks: at 1,000 proxies that is ~120 MB of JSON per change on the sims' "
            "one core (~3 CPU-s), so these rows measure the sims as much as the control plane. "
            "`shared`: a sim process parses each distinct frame body once and its other "
            "proxies reuse it (a stand-in for 1,000 proxies parsing in parallel on their own "
            "machines): these rows are the control plane's figures. `--experiment` patches "
            "the control plane in its process to try a change before making it; the two it "
            "measured are now in `control/server.py` (each document JSON-encoded once per "
            "config and one plan per distinct version: 200 groups share 20 versions here; "
            "per-message deflate declined: each compressed stream held ~400 KiB of zlib "
            "state). Before them, at 1,000 proxies (shared): p99 2.48 s, idle RSS 672 MiB, "
            "control-plane CPU 1.71 s per change. Every figure, per change, is in "
            "`control/latest.json`; the theory of operation is in the docstring of "
            "`control_scale.py`.",
            "",
            render_markdown(doc).rstrip("\n"),
            README_END,
        ]
    )


def update_readme(path: Path, doc: dict[str, Any]) -> None:
    """Replace the text between the markers (appending the section when they are absent)."""
    replace_section(path, README_BEGIN, README_END, readme_section(doc))


# =========================================================================== command line


def wrapped_control(argv: list[str]) -> int:
    """``--wrapped-control ARGS``: ``meshproxy ARGS`` in this process, with the control plane's
    reload phases timed (:func:`time_phases`: lines ``phase NAME START END`` on stderr), the
    patches named by ``$CONTROL_SCALE_EXPERIMENT`` applied (:data:`EXPERIMENTS`) and, when
    ``$CONTROL_SCALE_PROFILE`` names a file, under cProfile (the event loop's thread; the
    stats are written there when it exits)."""
    import cProfile

    sys.path.insert(0, str(REPO))
    from meshproxy.__main__ import main as meshproxy_main

    time_phases()
    for name in filter(None, os.environ.get("CONTROL_SCALE_EXPERIMENT", "").split(",")):
        EXPERIMENTS[name]()
    out = os.environ.get("CONTROL_SCALE_PROFILE")
    if not out:
        return meshproxy_main(argv)
    prof = cProfile.Profile()
    prof.enable()
    try:
        return meshproxy_main(argv)
    finally:
        prof.disable()
        prof.dump_stats(out)


def experiment_plans() -> None:
    """Patch ``control.server.make_plan`` as proposed for ``control/server.py``: each document
    is JSON-encoded once per config (not once per group that receives it) and groups whose
    scoped documents are the same (same version) share one :class:`Plan` and its body. In this
    mesh 200 groups have 20 distinct versions, and encoding a 120 KiB body costs ~3.3 ms, so
    planning a change went from ~0.65 s of encoding to a few ms. The frames are byte for
    byte the ones ``config_body`` makes (compact separators: a list's JSON is its items' JSON
    joined by commas)."""
    import json as _json
    import threading

    from control import server
    from control.protocol import config_version
    from control.scope import Scoper

    lock = threading.Lock()  # plans run in worker threads; a Scoper is not thread-safe
    cache: dict[str, Any] = {"config": None}

    def encode(doc: Any) -> str:
        return _json.dumps(doc, separators=(",", ":"), ensure_ascii=False, default=str)

    def make_plan(config: Any, proxy: Any, scoper: Any = None) -> Any:
        with lock:
            if cache["config"] is not config:
                cache.update(config=config, scoper=Scoper(config.resources), plans={}, docs={})
            scoped = cache["scoper"].for_proxy(proxy).all()
            version = config_version(r.digest for r in scoped)
            plan = cache["plans"].get(version)
            if plan is None:
                docs = cache["docs"]
                parts = []
                for r in scoped:
                    text = docs.get(r.order)
                    if text is None:
                        text = docs[r.order] = encode(config.document(r))
                    parts.append(text)
                body = f'"version":{_json.dumps(version)},"resources":[{",".join(parts)}]}}'
                plan = cache["plans"][version] = server.Plan(version, body, len(parts))
            return plan

    server.make_plan = make_plan


def experiment_nodeflate() -> None:
    """Patch the control plane's WebSocketResponse to decline per-message deflate
    (``compress=False``): no zlib stream per connection, no compression per push."""
    from aiohttp import web

    base = web.WebSocketResponse

    class NoDeflate(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["compress"] = False
            super().__init__(*args, **kwargs)

    web.WebSocketResponse = NoDeflate  # type: ignore[misc]


EXPERIMENTS = {"plans": experiment_plans, "nodeflate": experiment_nodeflate}


def time_phases() -> None:
    """Wrap the control plane's reload phases (directory load, plans, pushes) so that each
    call writes ``phase NAME START END`` (time.time()) on stderr: where a change's time goes,
    also for the work done in worker threads, which cProfile does not see."""
    import functools
    import inspect

    from control import server, store

    def timed(owner: Any, attr: str, name: str) -> None:
        fn = getattr(owner, attr)

        def note(t0: float) -> None:
            sys.stderr.write(f"phase {name} {t0:.6f} {time.time():.6f}\n")

        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def awrapper(*a: Any, **kw: Any) -> Any:
                t0 = time.time()
                try:
                    return await fn(*a, **kw)
                finally:
                    note(t0)

            setattr(owner, attr, awrapper)
        else:

            @functools.wraps(fn)
            def wrapper(*a: Any, **kw: Any) -> Any:
                t0 = time.time()
                try:
                    return fn(*a, **kw)
                finally:
                    note(t0)

            setattr(owner, attr, wrapper)

    timed(store.ConfigStore, "load", "load")
    timed(server.ControlPlane, "reload", "reload")
    timed(server.ControlPlane, "push_all", "push_all")
    timed(server.ControlPlane, "_plans_of", "plans")
    timed(server, "make_plan", "make_plan")


def raise_nofile(n: int) -> str | None:
    """Raise our soft RLIMIT_NOFILE (the control plane inherits it) for ``n`` streams."""
    return simproxies.raise_nofile(n + simproxies.FD_MARGIN)


def parse_proxies(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 10,100,1000: {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("proxy counts must be >= 1")
    return values


def parse_experiments(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown experiment {', '.join(unknown)}; known: {', '.join(EXPERIMENTS)}"
        )
    return names


def parse_modes(text: str) -> tuple[str, ...]:
    modes = tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    if not modes or any(m not in ("each", "shared") for m in modes):
        raise argparse.ArgumentTypeError(f"expected each, shared or both: {text!r}")
    return modes


def environment(opts: Options) -> dict[str, Any]:
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "python": sys.version.split()[0],
        "git": (git_head() or "")[:160] or None,
        "load_average": os.getloadavg()[0],
        "nofile": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
    }


def options_json(opts: Options) -> dict[str, Any]:
    d = asdict(opts)
    d.pop("mesh")
    d["profile"] = str(opts.profile) if opts.profile else None
    d["namespaces"], d["services"] = opts.mesh.namespaces, opts.mesh.services
    return d


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--wrapped-control"]:
        return wrapped_control(argv[1:])
    ap = argparse.ArgumentParser(
        description="Convergence time, RSS and CPU of meshproxy control with N simulated proxies."
    )
    ap.add_argument("--quick", action="store_true", help="10 and 100 proxies, 5 changes")
    ap.add_argument(
        "--proxies", type=parse_proxies, help="proxy counts [full: 10,100,1000; quick: 10,100]"
    )
    ap.add_argument("--changes", type=int, help="changes per proxy count [full: 20; quick: 5]")
    ap.add_argument("--pause", type=float, default=1.5, help="seconds between changes [1.5]")
    ap.add_argument("--namespaces", type=int, default=10, help="namespaces of the mesh [10]")
    ap.add_argument("--services", type=int, default=10, help="services per namespace [10]")
    ap.add_argument(
        "--settle",
        type=float,
        default=SETTLE,
        help=f"seconds of quiet before the connected and idle figures [{SETTLE:g}]",
    )
    ap.add_argument("--debounce", type=float, default=0.1, help="control plane --debounce [0.1]")
    ap.add_argument("--cp-cpus", default="0", help="CPU list for the control plane [0]")
    ap.add_argument("--sim-cpus", default="1", help="CPU list for the simulated proxies [1]")
    ap.add_argument("--no-pin", action="store_true", help="do not pin anything")
    ap.add_argument(
        "--no-compress", action="store_true", help="sims do not offer per-message deflate"
    )
    ap.add_argument(
        "--parse",
        type=parse_modes,
        default=("each", "shared"),
        help="sims' parsing, comma-separated: each (every proxy json.loads every frame), "
        "shared (each distinct frame once per sim process) [each,shared]",
    )
    ap.add_argument(
        "--experiment",
        type=parse_experiments,
        default=(),
        metavar="NAMES",
        help="after the points as is, one more at the largest proxy count (sims parsing "
        "shared) with the control plane patched in its process, to measure a proposed change: "
        f"comma-separated of {', '.join(EXPERIMENTS)} (see their docstrings)",
    )
    ap.add_argument("--no-status", action="store_true", help="skip the /status cost and check")
    ap.add_argument(
        "--profile",
        type=Path,
        metavar="PATH",
        help="run the control plane under cProfile (stats in PATH.<proxies>-<parse>.prof) "
        "with its reload phases timed on its stderr (kept with --keep)",
    )
    ap.add_argument("--out", type=Path, default=HERE / "control", help="results directory")
    ap.add_argument(
        "--keep", action="store_true", help="keep the work directory (logs, mesh) and say where"
    )
    ap.add_argument(
        "--from-json", type=Path, metavar="JSON", help="measure nothing: re-render a saved run"
    )
    add_quiet_and_readme_options(
        ap, QUIET_WAIT, "rewrite the control section of benchmarks/README.md [auto: full runs]"
    )
    args = ap.parse_args(argv)
    if args.from_json is not None:
        return rerender(args.from_json, args.readme)
    changes = args.changes if args.changes is not None else (5 if args.quick else 20)
    proxies = args.proxies or ([10, 100] if args.quick else [10, 100, 1000])
    if changes < 1 or args.pause < 0 or args.namespaces < 1 or args.services < 1:
        ap.error("--changes, --namespaces, --services must be >= 1 and --pause >= 0")
    if args.debounce < 0 or args.settle < 0:
        ap.error("--debounce and --settle must be >= 0")
    problem = raise_nofile(max(proxies))
    if problem is not None:
        print(f"control_scale.py: {problem}", file=sys.stderr)
        return 2
    opts = Options(
        proxies=proxies,
        changes=changes,
        pause=args.pause,
        mesh=Mesh(args.namespaces, args.services),
        debounce=args.debounce,
        cp_cpus=None if args.no_pin else args.cp_cpus,
        sim_cpus=None if args.no_pin else args.sim_cpus,
        compress=not args.no_compress,
        parse=args.parse,
        status_check=not args.no_status,
        settle=args.settle,
        experiment=args.experiment,
        profile=args.profile.resolve() if args.profile else None,
        quick=args.quick,
    )
    interrupt_on_sigterm()
    quiet = wait_quiet(quiet_limit(args, QUIET_WAIT))
    doc: dict[str, Any] = {
        "quick": args.quick,
        "options": options_json(opts),
        "environment": environment(opts),
        "other_cpu_at_start": quiet,
        "points": [],
    }
    workdir = Path(tempfile.mkdtemp(prefix="meshproxy-control-scale-"))
    t0 = time.monotonic()
    try:
        for parse in opts.parse:
            for n in proxies:
                print(f"== {n} proxies, --parse {parse}", flush=True)
                point = run_point(n, parse, opts, workdir)
                if point.status != "ok":
                    print(f"   error: {point.error}", file=sys.stderr, flush=True)
                doc["points"].append(asdict(point))
        if opts.experiment:
            n = max(proxies)
            patched = ",".join(opts.experiment)
            print(f"== {n} proxies, --parse shared, patched: {patched}", flush=True)
            point = run_point(n, "shared", opts, workdir, opts.experiment)
            if point.status != "ok":
                print(f"   error: {point.error}", file=sys.stderr, flush=True)
            doc["points"].append(asdict(point))
    except KeyboardInterrupt:
        print("control_scale.py: interrupted", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"work directory kept: {workdir}", flush=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    doc["elapsed_seconds"] = round(time.monotonic() - t0, 1)
    doc["targets"] = targets(doc)
    md = render_markdown(doc)
    print()
    print(md)
    stem = "quick" if args.quick else "latest"
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{stem}.json").write_text(json.dumps(doc, indent=1) + "\n")
        (args.out / f"{stem}.md").write_text(md)
        if args.readme == "yes" or (args.readme == "auto" and not args.quick):
            update_readme(HERE / "README.md", doc)
    except OSError as exc:
        print(f"control_scale.py: cannot write results: {exc}", file=sys.stderr)
        return 1
    return 1 if any(p["status"] != "ok" for p in doc["points"]) else 0


def rerender(path: Path, readme: str) -> int:
    try:
        doc = json.loads(path.read_text())
        doc["targets"] = targets(doc)
        md = render_markdown(doc)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"control_scale.py: cannot re-render {path}: {exc!r}", file=sys.stderr)
        return 2
    print(md)
    try:
        path.with_suffix(".md").write_text(md)
        if readme == "yes" or (readme == "auto" and not doc.get("quick")):
            update_readme(HERE / "README.md", doc)
    except OSError as exc:
        print(f"control_scale.py: cannot write: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
