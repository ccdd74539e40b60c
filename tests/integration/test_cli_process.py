"""``meshproxy validate`` and start-up errors as real processes: exit codes, messages, no
traceback."""

from __future__ import annotations

import re
import socket
import subprocess
from pathlib import Path

from tests.integration.proxyproc import REPO, meshproxy_argv, reviews_yaml

PROBLEM_LINE = re.compile(
    r"^(?P<file>[^:]+\.ya?ml): (?P<kind>\w+)/(?P<name>[\w.-]+): (?P<path>\S+): .+"
)


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        meshproxy_argv(*args), capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def test_validate_valid_config(tmp_path: Path) -> None:
    cfg = tmp_path / "ok.yaml"
    cfg.write_text(reviews_yaml(9081, 9082, 90, 10))
    proc = run("validate", str(cfg))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout == ""


def test_validate_example_mesh() -> None:
    proc = run("validate", str(REPO / "examples" / "mesh"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_validate_reports_each_problem(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    text = reviews_yaml(9081, 9082, 90, 10)
    text = text.replace("weight: 90", "wieght: 90").replace("resolution: STATIC", "resolution: X")
    cfg.write_text(text)
    proc = run("validate", str(cfg))
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert len(lines) >= 2, proc.stdout
    for line in lines:
        m = PROBLEM_LINE.match(line)
        assert m, f"not FILE: Kind/name: field.path: message: {line!r}"
        assert m["file"].endswith("bad.yaml")
    assert any("VirtualService/reviews" in ln and "wieght" in ln for ln in lines)
    assert any("ServiceEntry/reviews" in ln and "resolution" in ln for ln in lines)
    assert "Traceback" not in proc.stderr


def test_validate_warnings_go_to_stderr(tmp_path: Path) -> None:
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: gw}\n"
        "spec: {selector: {istio: ingressgateway}, servers: []}\n"
    )
    proc = run("validate", str(cfg))
    assert proc.returncode == 0
    assert proc.stdout == ""
    assert "Gateway" in proc.stderr


def test_bad_config_at_start_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(reviews_yaml(9081, 9082, 90, 10).replace("weight: 90", "wieght: 90"))
    proc = run("run", "--config", str(cfg), "--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0")
    assert proc.returncode == 2
    assert "bad.yaml" in proc.stderr
    assert "VirtualService/reviews" in proc.stderr
    assert "wieght" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "listening" not in proc.stdout


def test_port_in_use_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "ok.yaml"
    cfg.write_text(reviews_yaml(9081, 9082))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run(
            "run", "--config", str(cfg), "--outbound", f"127.0.0.1:{port}", "--admin", "127.0.0.1:0"
        )
    assert proc.returncode == 2
    assert f"127.0.0.1:{port}" in proc.stderr and "outbound" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_yaml_syntax_error_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "broken.yaml"
    cfg.write_text("kind: VirtualService\nmetadata: {name: x\n")
    proc = run("run", "--config", str(cfg), "--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0")
    assert proc.returncode == 2
    assert "broken.yaml" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_validate_missing_path_is_a_problem(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    proc = run("validate", str(missing))
    assert proc.returncode == 1
    assert str(missing) in proc.stdout
    assert "Traceback" not in proc.stderr


def test_validate_istio_corpus_copy() -> None:
    """Istio's own bookinfo task configs (copied under tests/data) are valid."""
    corpus = REPO / "tests" / "data" / "istio-corpus" / "bookinfo"
    proc = run("validate", str(corpus))
    assert proc.returncode == 0, proc.stdout
    assert "Gateway/bookinfo-gateway" in proc.stderr  # skipped kinds are warnings
