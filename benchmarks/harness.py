"""Shared plumbing of the benchmark: processes, ports, tiny HTTP client, wrk and loadgen runs.

Theory of operation: everything the harness starts is a :class:`Proc`, a subprocess whose
stdout/stderr go to files in the run's temp dir (so a chatty process can never block on a full
pipe) and which is stopped by its own PID (SIGTERM, then SIGKILL after a grace period) from a
``finally``. Programs are pinned with ``taskset -c CPUS`` (taskset execs, so the PID is the
program's own). Ports are OS-chosen: a socket bound to port 0 gives a free port which the
server binds right after (peers that print their chosen port, like meshproxy, get port 0
directly).

Load is produced in separate processes pinned to the load CPU: ``wrk`` (closed loop, for
saturation) and ``loadgen.py`` (open loop at a fixed rate, for latency; closed loop, for
stalls). Their outputs are parsed into plain dicts. Nothing here asserts a timing: this is
measurement, and failures become ``error`` strings in the results, never tracebacks.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BODY = b"Hello, World!"  # what the upstream answers, 13 bytes


class BenchError(Exception):
    """A peer could not be started or answered wrongly; the message says why."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(cpus: str | None, argv: list[str]) -> list[str]:
    if cpus and shutil.which("taskset"):
        return ["taskset", "-c", cpus, *argv]
    return argv


@dataclass
class Proc:
    """A started program, its log files, and how to stop it."""

    name: str
    popen: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace: float = 5.0) -> None:
        if self.popen.poll() is not None:
            return
        try:
            os.kill(self.popen.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            try:
                os.kill(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            self.popen.wait(5.0)

    def tail(self, lines: int = 15) -> str:
        out: list[str] = []
        for path in (self.stderr_path, self.stdout_path):
            try:
                text = path.read_text(errors="replace").strip()
            except OSError:
                continue
            if text:
                out.extend(text.splitlines()[-lines:])
        return "\n".join(out)


def start(
    name: str,
    argv: list[str],
    workdir: Path,
    cpus: str | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Proc:
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / f"{name}.stdout"
    err = workdir / f"{name}.stderr"
    with open(out, "wb") as fo, open(err, "wb") as fe:
        try:
            popen = subprocess.Popen(
                pinned(cpus, argv),
                stdout=fo,
                stderr=fe,
                stdin=subprocess.DEVNULL,
                cwd=cwd,
                env=env,
            )
        except OSError as exc:
            raise BenchError(f"{name}: cannot start {argv[0]}: {exc}") from exc
    return Proc(name, popen, out, err)


# --------------------------------------------------------------------------- tiny HTTP client


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


def http_get(port: int, path: str = "/", host: str = "bench.local", timeout: float = 5.0) -> Reply:
    """One GET on a fresh connection (``Connection: close``), read to EOF."""
    req = (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
        "User-Agent: meshproxy-bench\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(req)
        chunks: list[bytes] = []
        while True:
            data = s.recv(1 << 20)
            if not data:
                break
            chunks.append(data)
    raw = b"".join(chunks)
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise BenchError(f"malformed HTTP response from 127.0.0.1:{port}: {raw[:80]!r}")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise BenchError(f"malformed status line from 127.0.0.1:{port}: {lines[0]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = _dechunk(body)
    return Reply(int(parts[1]), headers, body)


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return bytes(out)


def wait_until(check, deadline: float, proc: Proc | None = None, what: str = "") -> object:  # type: ignore[no-untyped-def]
    """Call ``check()`` until it returns a truthy value or ``deadline`` (monotonic) passes."""
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise BenchError(
                f"{proc.name} exited with {proc.popen.returncode} {what}\n{proc.tail()}"
            )
        try:
            value = check()
        except (OSError, BenchError) as exc:
            last = exc
            value = None
        if value:
            return value
        time.sleep(0.05)
    tail = f"\n{proc.tail()}" if proc is not None else ""
    raise BenchError(f"timed out {what} (last error: {last}){tail}")


def wait_serving(
    proc: Proc, port: int, host: str = "bench.local", path: str = "/", timeout: float = 30.0
) -> None:
    """Wait until ``GET path`` through ``port`` answers 200 with the upstream's body."""

    def ok() -> bool:
        reply = http_get(port, path, host, timeout=2.0)
        return reply.status == 200 and reply.body == BODY

    wait_until(ok, time.monotonic() + timeout, proc, f"waiting for {proc.name} to serve")


# --------------------------------------------------------------------------- wrk


_WRK_REQS = re.compile(r"(\d+) requests in ([\d.]+)(\w+)")
_WRK_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
_WRK_NON2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_WRK_SOCKERR = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


def parse_wrk(text: str) -> dict[str, float | int]:
    m = _WRK_RPS.search(text)
    n = _WRK_REQS.search(text)
    if m is None or n is None:
        raise BenchError(f"cannot parse wrk output:\n{text.strip()[-600:]}")
    out: dict[str, float | int] = {"rps": float(m.group(1)), "requests": int(n.group(1))}
    bad = _WRK_NON2XX.search(text)
    out["non_2xx"] = int(bad.group(1)) if bad else 0
    se = _WRK_SOCKERR.search(text)
    out["socket_errors"] = sum(int(g) for g in se.groups()) if se else 0
    return out


def run_wrk(
    port: int,
    seconds: float,
    connections: int,
    cpus: str | None,
    host: str = "bench.local",
    path: str = "/",
    script: Path | None = None,
    script_args: list[str] | None = None,
) -> dict[str, float | int]:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise BenchError("wrk not found (apt-get install -y wrk)")
    argv = [
        wrk,
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "5s",
        "-H",
        f"Host: {host}",
    ]
    if script is not None:
        argv += ["-s", str(script)]
    argv.append(f"http://127.0.0.1:{port}{path}")
    if script_args:
        argv += ["--", *script_args]
    try:
        done = subprocess.run(
            pinned(cpus, argv), capture_output=True, text=True, timeout=seconds + 30
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"wrk did not finish within {seconds + 30:.0f}s") from exc
    if done.returncode != 0:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stderr.strip()[-400:]}")
    return parse_wrk(done.stdout)


# --------------------------------------------------------------------------- loadgen


def run_loadgen(
    mode: str,
    port: int,
    cpus: str | None,
    *,
    duration: float,
    connections: int = 16,
    rate: float = 1000.0,
    warmup: float = 1.0,
    host: str = "bench.local",
    requests_file: Path | None = None,
    watch_header: str | None = None,
    background: bool = False,
    workdir: Path | None = None,
) -> dict | subprocess.Popen[str]:
    argv = [
        sys.executable,
        str(HERE / "loadgen.py"),
        mode,
        "--target",
        f"127.0.0.1:{port}",
        "--host",
        host,
        "--connections",
        str(connections),
        "--duration",
        str(duration),
    ]
    if mode == "rate":
        argv += ["--rate", str(rate), "--warmup", str(warmup)]
    if requests_file is not None:
        argv += ["--requests", str(requests_file)]
    if watch_header:
        argv += ["--watch-header", watch_header]
    if background:
        return subprocess.Popen(
            pinned(cpus, argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    try:
        done = subprocess.run(
            pinned(cpus, argv), capture_output=True, text=True, timeout=duration + warmup + 60
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError("loadgen did not finish in time") from exc
    return parse_loadgen(done.returncode, done.stdout, done.stderr)


def parse_loadgen(returncode: int, stdout: str, stderr: str) -> dict:
    if returncode != 0:
        raise BenchError(f"loadgen failed ({returncode}): {stderr.strip()[-400:]}")
    try:
        return json.loads(stdout)
    except ValueError as exc:
        raise BenchError(f"loadgen printed no JSON: {stdout[-200:]!r}") from exc


def finish_loadgen(popen: subprocess.Popen[str], timeout: float) -> dict:
    try:
        out, err = popen.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        popen.kill()
        popen.communicate()
        raise BenchError("loadgen did not finish in time") from exc
    return parse_loadgen(popen.returncode, out, err)


def git_head() -> str | None:
    """``<short hash> <subject>`` of the checkout the benchmark runs from (None outside git),
    recorded with every run's figures."""
    try:
        done = subprocess.run(
            ["git", "-C", str(HERE.parent), "log", "-1", "--format=%h %s"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None
