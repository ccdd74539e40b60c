"""Smoke tests of ``benchmarks/control_scale.py`` and ``benchmarks/simproxies.py`` (no timings).

Pure parts first: the generated mesh (valid for ``meshproxy validate``, the private share,
change targets every namespace sees, weights that always change), the proxies' identities and
group counts, the sims' frame parsing (whole and shared, which must agree, including the nonce
of each frame), nearest-rank percentiles, the control plane's metrics parser, the Markdown
table and the README section between its markers. Then one tiny real run: a real ``meshproxy
control`` subprocess, 5 simulated proxies in a real sim process, 2 changes; every proxy must
have ACKed every change with a config carrying it, ``/status`` must show them all SYNCED, and
the report must have its fields. Every process is stopped by its PID (the script does it in a
``finally``; the test checks none is left).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "control_scale.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_control_scale", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it runs
    spec.loader.exec_module(module)  # it puts benchmarks/ on sys.path for its siblings
    return module


cs = _load()
sims = sys.modules["simproxies"]


# --------------------------------------------------------------------------- the mesh


def test_mesh_is_valid_istio_yaml(tmp_path: Path) -> None:
    mesh = cs.Mesh(3, 4)
    cs.write_mesh(tmp_path, mesh)
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.yaml"))
    assert len(files) == 3 * (4 + 1)
    done = subprocess.run(
        [sys.executable, "-m", "meshproxy", "validate", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_mesh_documents_private_share_and_weights() -> None:
    mesh = cs.Mesh(10, 10)
    assert mesh.public_services == 7
    kinds = [d["kind"] for d in cs.service_documents(mesh, 2, 3, 20)]
    assert kinds == ["ServiceEntry", "DestinationRule", "VirtualService"]
    public = cs.service_documents(mesh, 2, 3, 20)
    private = cs.service_documents(mesh, 2, 8, 20)
    assert all("exportTo" not in d["spec"] for d in public)
    assert all(d["spec"]["exportTo"] == ["."] for d in private)
    vs = public[2]
    assert vs["metadata"] == {"name": "svc3", "namespace": "ns2"}
    assert sims.vs_weights([vs]) == {"ns2/svc3": cs.expected_weights(20)}
    assert cs.expected_weights(20) == [0, 80, 20]
    subsets = [s["name"] for s in public[1]["spec"]["subsets"]]
    assert subsets == ["v1", "v2"]
    text = cs.mesh_files(cs.Mesh(1, 1))["ns0/svc0.yaml"]
    assert [d["kind"] for d in yaml.load_all(text, Loader=yaml.CSafeLoader)] == kinds


def test_change_targets_are_public_and_weights_always_change() -> None:
    mesh = cs.Mesh(10, 10)
    targets = [cs.change_target(i, mesh) for i in range(70)]
    assert len(set(targets)) == 70  # every public service once before any repeats
    assert all(not mesh.private(j) for _, j in targets)
    assert targets[:3] == [(0, 0), (1, 0), (2, 0)]
    for i in range(200):
        for current in (1, 25, 49, 50):
            w = cs.next_weight(i, current)
            assert w != current and 1 <= w <= 49


def test_rewrite_is_an_atomic_rename(tmp_path: Path) -> None:
    mesh = cs.Mesh(1, 2)
    cs.write_mesh(tmp_path, mesh)
    before = cs.service_path(tmp_path, 0, 1).stat().st_ino
    t = cs.rewrite(tmp_path, mesh, 0, 1, 7)
    path = cs.service_path(tmp_path, 0, 1)
    assert path.stat().st_ino != before  # a new file renamed over the old one
    assert not list(tmp_path.rglob(".*.tmp"))
    docs = list(yaml.load_all(path.read_text(), Loader=yaml.CSafeLoader))
    assert sims.vs_weights(docs) == {"ns0/svc1": [0, 93, 7]}
    assert abs(t - path.stat().st_mtime) < 5


def test_identities_and_groups() -> None:
    assert sims.identity(0, 10, 10) == ("ns0", {"app": "svc0", "version": "v1"})
    assert sims.identity(13, 10, 10) == ("ns3", {"app": "svc1", "version": "v1"})
    assert sims.identity(100, 10, 10) == ("ns0", {"app": "svc0", "version": "v2"})
    assert sims.node_id(7) == "sim-00007"
    mesh = cs.Mesh(10, 10)
    assert [cs.groups(n, mesh) for n in (5, 10, 100, 1000)] == [5, 10, 100, 200]


# --------------------------------------------------------------------------- sims' parsing


def _frame(nonce: str, weight: int) -> str:
    from control.protocol import config_body, config_message

    docs = cs.service_documents(cs.Mesh(1, 1), 0, 0, weight)
    return config_message(nonce, config_body("0123456789abcdef", docs))


def test_parse_frame_and_shared_parser_agree() -> None:
    whole = sims.parse_frame(_frame("n-1", 30))
    assert (whole.kind, whole.nonce, whole.version, whole.documents) == (
        "config",
        "n-1",
        "0123456789abcdef",
        3,
    )
    assert whole.weights == {"ns0/svc0": [0, 70, 30]}
    shared = sims.SharedParser()
    a, b = shared(_frame("n-1", 30)), shared(_frame("n-2", 30))
    assert (a.nonce, b.nonce) == ("n-1", "n-2")  # each frame keeps its own nonce
    assert a.weights == b.weights == whole.weights and shared.parsed == 1
    c = shared(_frame("n-3", 31))
    assert c.weights == {"ns0/svc0": [0, 69, 31]} and shared.parsed == 2
    err = shared('{"type":"error","error":"too many proxies"}')
    assert (err.kind, err.error) == ("error", "too many proxies")


def test_weights_changed() -> None:
    old = {"a/x": [0, 50, 50], "a/y": [100]}
    new = {"a/x": [0, 80, 20], "a/y": [100], "b/z": [1]}
    assert sims.weights_changed(old, new) == [["a/x", [0, 80, 20]], ["b/z", [1]]]
    assert sims.weights_changed(new, {"a/y": [100]}) == [["a/x", None], ["b/z", None]]


# --------------------------------------------------------------------------- report


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 21)]
    assert cs.percentile(values, 50) == 10.0
    assert cs.percentile(values, 99) == 20.0  # 20 samples: p99 is the slowest
    assert cs.percentile([], 50) is None
    s = cs.summary([3.0, 1.0, 2.0])
    assert (s["p50"], s["max"], s["min"], s["mean"]) == (2.0, 3.0, 1.0, 2.0)


def test_control_metrics_parser() -> None:
    text = "\n".join(
        [
            "# HELP meshproxy_control_pushes_total x",
            "meshproxy_control_pushes_total 40.0",
            "meshproxy_control_pushes_created 1.7e9",
            "meshproxy_control_acks_total 39.0",
            'meshproxy_control_push_ack_seconds_bucket{le="0.1"} 12.0',
            "meshproxy_control_push_ack_seconds_sum 2.5",
            "meshproxy_control_push_ack_seconds_count 40.0",
            'meshproxy_control_config_reloads_total{result="ok"} 3.0',
            "meshproxy_control_connected_proxies 5.0",
        ]
    )
    assert cs.control_metrics(text) == {
        "pushes": 40.0,
        "acks": 39.0,
        "push_ack_seconds_sum": 2.5,
        "push_ack_seconds_count": 40.0,
        "connected_proxies": 5.0,
    }


def _point(n: int, parse: str, p99: float, rss: float) -> dict[str, Any]:
    point = cs.asdict(cs.Point(proxies=n, parse=parse, sim_processes=1, groups=min(n, 200)))
    point["initial"] = {
        "all_acked_s": 1.0,
        "distinct_versions": 20,
        "documents_per_proxy": {"min": 221, "max": 222},
        "config_kib": {"min": 119.0, "max": 119.6, "total": 1000.0},
    }
    point["convergence_s"] = {"p50": p99 / 2, "p99": p99, "max": p99}
    point["first_ack_s"] = {"p50": 0.2, "p99": 0.3, "max": 0.3}
    point["cp"] = {"rss_idle_mib": rss, "hwm_mib": rss + 1, "cpu_per_change_s": 0.5}
    point["sims"] = {"cpu_per_change_s": 0.25}
    point["status_endpoint"] = {"get_cpu_ms": 20.0, "kib": 280.0, "synced": n}
    point["metrics"] = {"pushes": 10.0, "push_ack_seconds_sum": 1.0, "push_ack_seconds_count": 10}
    return point


def _doc() -> dict[str, Any]:
    return {
        "quick": False,
        "options": {"changes": 20, "pause": 1.5, "namespaces": 10, "services": 10},
        "environment": {"date": "2026-11-26", "git": "abc1234 subject", "cpus": 2},
        "points": [
            _point(10, "each", 0.3, 60.0),
            _point(1000, "each", 4.0, 140.0),
            _point(1000, "shared", 0.9, 160.0),
            {**_point(1000, "shared", 0.5, 80.0), "experiment": ["plans", "nodeflate"]},
            {**_point(100, "each", 1, 1), "status": "error", "error": "boom\nmore"},
        ],
    }


def test_experiment_plans_makes_the_same_frames(tmp_path: Path) -> None:
    """The proposed planning change (measured with --experiment plans) must give byte for
    byte the plans control.server.make_plan gives, for every group of a 1,000-proxy mesh."""
    from control import server
    from control.store import ConfigStore
    from meshproxy.config.model import ProxyIdentity

    cs.write_mesh(tmp_path, cs.Mesh(4, 5))
    config = ConfigStore([str(tmp_path)]).load().config
    assert config is not None
    original = server.make_plan
    try:
        cs.experiment_plans()
        patched = server.make_plan
    finally:
        server.make_plan = original
    keys = {server.group_key(*sims.identity(k, 4, 5)) for k in range(100)}
    versions = set()
    for ns, labels in keys:
        proxy = ProxyIdentity(ns, dict(labels))
        got = patched(config, proxy)
        assert got == original(config, proxy)
        assert patched(config, proxy) is got  # one plan per version, shared
        versions.add(got.version)
    assert len(keys) == 40 and len(versions) == 8  # 4 namespaces x (v1, v2)
    with pytest.raises(argparse.ArgumentTypeError):
        cs.parse_experiments("plans,bogus")
    assert cs.parse_experiments("nodeflate,plans,plans") == ("nodeflate", "plans")


def test_targets_and_markdown() -> None:
    doc = _doc()
    t = cs.targets(doc)
    assert t["each"]["p99_met"] is False and t["each"]["rss_met"] is True
    assert t["shared"]["p99_met"] is True and t["shared"]["rss_met"] is False
    md = cs.render_markdown(doc)
    assert "| 1,000 | shared | 1 | 200 | 20 | 221-222 | 119.6 | 450 ms | 900 ms |" in md
    assert "p99 convergence <= 1 s NOT met (4,000 ms)" in md
    assert "idle RSS <= 150 MiB NOT met (160.0 MiB)" in md
    assert "| 100 | each | error: boom |" in md
    patched = "shared, CP patched: plans + nodeflate"
    assert t[patched] == {"p99_s": 0.5, "p99_met": True, "rss_idle_mib": 80.0, "rss_met": True}
    assert f"| 1,000 | {patched} | 1 | 200 |" in md
    assert f"Targets at 1,000 proxies ({patched}): p99 convergence <= 1 s met (500 ms)" in md
    assert "commit `abc1234 subject`" in md
    rows = [line for line in md.splitlines() if line.startswith("|")]
    assert len({r.count("|") for r in rows}) == 1, rows  # every row as wide as the header
    assert "not measured" in cs.render_markdown({**doc, "points": doc["points"][:1]})


def test_update_readme_rewrites_only_its_section(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# title\n\n<!-- mtls:begin x -->\nkeep\n<!-- mtls:end -->\n")
    cs.update_readme(readme, _doc())
    first = readme.read_text()
    assert first.startswith("# title\n\n<!-- mtls:begin x -->\nkeep\n<!-- mtls:end -->\n")
    assert first.count(cs.README_END) == 1 and "## Control plane at scale" in first
    readme.write_text(first + "\ntrailing\n")
    doc = _doc()
    doc["points"][0]["groups"] = 7777
    cs.update_readme(readme, doc)
    second = readme.read_text()
    assert second.count(cs.README_BEGIN) == 1 and "| 7777 |" in second
    assert second.endswith("\ntrailing\n")


def test_bad_arguments_exit_2_without_traceback() -> None:
    for args in (["--proxies", "10,x"], ["--proxies", "0"], ["--parse", "some"]):
        done = subprocess.run(
            [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 2, (args, done.stderr)
        assert "Traceback" not in done.stderr
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "simproxies.py"), "--url", "x", "--count", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr


# --------------------------------------------------------------------------- a tiny real run


def _processes_mentioning(*needles: str) -> list[str]:
    """Command lines of live processes that contain one of ``needles``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if any(n in cmd for n in needles):
                found.append(cmd)
    return found


@pytest.mark.parametrize("parse", ["each", "shared"])
def test_tiny_run_every_proxy_acks_every_change(tmp_path: Path, parse: str) -> None:
    out = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--proxies",
            "5",
            "--changes",
            "2",
            "--pause",
            "0.2",
            "--parse",
            parse,
            "--no-pin",
            "--wait-quiet",
            "0",
            "--readme",
            "no",
            "--settle",
            "0.5",
            "--keep",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    doc = json.loads((out / "latest.json").read_text())
    assert set(doc) >= {"options", "environment", "points", "targets", "elapsed_seconds"}
    (point,) = doc["points"]
    assert point["status"] == "ok" and point["error"] is None
    assert (point["proxies"], point["parse"], point["groups"]) == (5, parse, 5)
    assert point["initial"]["documents_per_proxy"]["min"] > 0
    assert len(point["changes"]) == 2
    for i, change in enumerate(point["changes"]):
        assert change["proxies"] == 5  # every proxy ACKed a config carrying this change
        assert change["target"] == cs.vs_key(*cs.change_target(i, cs.Mesh()))
        assert change["convergence_s"] >= change["first_ack_s"] >= 0
        assert change["cp_cpu_s"] >= 0 and change["sims_cpu_s"] >= 0
    for key in ("p50", "p99", "max"):
        assert point["convergence_s"][key] is not None
    assert point["status_endpoint"]["all_synced"] is True
    assert point["status_endpoint"]["errors"] == []
    cp = point["cp"]
    for key in ("rss_started_mib", "rss_connected_mib", "rss_idle_mib", "hwm_mib"):
        assert cp[key] > 0
    assert "cpu_per_change_s" in cp and "cpu_per_change_s" in point["sims"]
    assert point["metrics"]["acks"] >= 5 * 3  # first config and two changes, per proxy
    assert point["metrics"]["nacks"] == 0
    md = (out / "latest.md").read_text()
    assert f"| 5 | {parse} | 1 | 5 |" in md
    # every process the run started was stopped: the control plane (its --config is in the
    # kept work directory) and the sims (their --url names the control plane's port)
    kept = next(x for x in done.stdout.splitlines() if x.startswith("work directory kept: "))
    workdir = Path(kept.removeprefix("work directory kept: "))
    port = (workdir / f"control-5-{parse}.stdout").read_text().split(":")[-1].strip()
    assert port.isdigit()
    assert _processes_mentioning(str(workdir), f"--url http://127.0.0.1:{port} ") == []
    shutil.rmtree(workdir)
