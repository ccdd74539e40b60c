"""The example launcher starts the backends and meshproxy and the jason rule answers."""

from __future__ import annotations

import socket
import subprocess
import sys

from tests.integration.proxyproc import REPO


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def test_run_demo_check() -> None:
    v1, v2, outbound, admin = free_ports(4)
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "examples" / "run_demo.py"),
            "--check",
            "--backend-ports",
            f"{v1},{v2}",
            "--outbound",
            f"127.0.0.1:{outbound}",
            "--admin",
            f"127.0.0.1:{admin}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "end-user: jason -> {'v2': 10}" in proc.stdout
    assert "check: OK" in proc.stdout


def test_run_demo_reports_busy_port() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        v2, outbound, admin = free_ports(3)
        proc = subprocess.run(
            [
                sys.executable,
                str(REPO / "examples" / "run_demo.py"),
                "--backend-ports",
                f"{port},{v2}",
                "--outbound",
                f"127.0.0.1:{outbound}",
                "--admin",
                f"127.0.0.1:{admin}",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=REPO,
        )
    assert proc.returncode == 1
    assert f"127.0.0.1:{port}" in proc.stderr and "in use" in proc.stderr
    assert "Traceback" not in proc.stderr
