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

The frame every benchmark script (``run.py``, ``mtls.py``) shares lives here too: tool
versions and the CPU model for the results' environment, waiting for a quiet machine before a
full run, the ``--wait-quiet`` / ``--readme`` options, the check for wrk and nginx, and SIGTERM
turned into KeyboardInterrupt so that every ``finally`` stops what it started.
"""

from __future__ import annotations

import argparse
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
from typing import Any

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


_WRK_DIST = re.compile(r"^\s*(50|75|90|99)%\s+([\d.]+)(us|ms|s)\s*$", re.M)


def parse_wrk_latency(text: str) -> dict[str, float]:
    """wrk ``--latency``'s distribution in µs: ``{"p50": ..., "p75": ..., "p90", "p99"}``."""
    scale = {"us": 1.0, "ms": 1000.0, "s": 1_000_000.0}
    return {
        f"p{m.group(1)}": float(m.group(2)) * scale[m.group(3)] for m in _WRK_DIST.finditer(text)
    }


def run_wrk(
    port: int,
    seconds: float,
    connections: int,
    cpus: str | None,
    host: str = "bench.local",
    path: str = "/",
    script: Path | None = None,
    script_args: list[str] | None = None,
    headers: list[str] | None = None,
    latency: bool = False,
) -> dict[str, Any]:
    """``wrk -t1`` (pinned to ``cpus``) for ``seconds`` over ``connections`` connections to
    ``127.0.0.1:port``, parsed by :func:`parse_wrk`. ``headers`` are more request headers
    (``"Connection: close"``); with ``latency``, wrk's distribution is ``latency_us`` too."""
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
    for header in headers or []:
        argv += ["-H", header]
    if latency:
        argv.append("--latency")
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
    out: dict[str, Any] = dict(parse_wrk(done.stdout))
    if latency:
        out["latency_us"] = parse_wrk_latency(done.stdout)
    return out


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


# --------------------------------------------------------------------------- the run's frame


def tool_version(argv: list[str]) -> str | None:
    """The version a program prints for ``argv`` (``wrk -v``, ``nginx -v``, ``haproxy -v``,
    ``envoy --version``), or its first line; None when it is missing or does not answer."""
    if shutil.which(argv[0]) is None and not os.path.exists(argv[0]):
        return None
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (done.stdout + done.stderr).strip()
    m = re.search(r"^wrk (\S+)|version:? (\S+)", text, re.I)  # wrk, nginx, haproxy, envoy
    if m:
        return (m.group(1) or m.group(2)).removeprefix("nginx/")[:80]
    return text.splitlines()[0][:80] if text else None


def cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def wait_quiet(limit: float, threshold: float = 0.3, window: float = 2.0) -> float | None:
    """Wait (up to ``limit`` s) until the machine's busy CPU, with nothing of ours running, is
    below ``threshold`` CPUs over ``window`` s; returns the last share seen (None: no wait)."""
    import procstat  # a sibling, imported by name as the scripts import this module

    if limit <= 0:
        return None
    deadline = time.monotonic() + limit
    while True:
        b0 = procstat.machine_busy_seconds()
        time.sleep(window)
        share = (procstat.machine_busy_seconds() - b0) / window
        if share < threshold or time.monotonic() >= deadline:
            return round(share, 2)
        print(f"   waiting for a quiet machine: others use {share:.2f} CPU", flush=True)


def add_quiet_and_readme_options(
    ap: argparse.ArgumentParser, full_wait: float, readme_help: str
) -> None:
    """``--wait-quiet`` (default: ``full_wait`` s on a full run, none with ``--quick``; see
    :func:`quiet_limit`) and ``--readme auto|yes|no``, shared by the benchmark scripts."""
    ap.add_argument(
        "--wait-quiet",
        type=float,
        help="wait up to this many seconds for other processes to leave the CPUs idle "
        f"[full run: {full_wait:g}, --quick: 0]",
    )
    ap.add_argument(
        "--readme",
        choices=["auto", "yes", "no"],
        default="auto",
        help=readme_help,
    )


def quiet_limit(args: argparse.Namespace, full_wait: float) -> float:
    """How long to wait for a quiet machine: ``--wait-quiet``, else none on a quick run."""
    if args.wait_quiet is not None:
        return float(args.wait_quiet)
    return 0.0 if args.quick else full_wait


def missing_tools(prog: str, tools: tuple[str, ...] = ("wrk", "nginx")) -> bool:
    """Whether one of ``tools`` is not installed (said on stderr, prefixed with ``prog``)."""
    for tool in tools:
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            print(f"{prog}: {tool} is required (apt-get install -y {tool})", file=sys.stderr)
            return True
    return False


def interrupt_on_sigterm() -> None:
    """Make SIGTERM raise KeyboardInterrupt, which unwinds through every ``finally`` (processes
    stopped by PID, temp dirs removed) as Ctrl-C does."""

    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)


def replace_section(path: Path, begin: str, end: str, section: str) -> None:
    """Write ``section`` (which starts with ``begin`` and ends with ``end``) over the text
    between those markers in ``path``, or append it when they are absent. ``begin`` may carry
    a parenthesised note; only its part before `` (`` is searched for."""
    text = path.read_text() if path.exists() else ""
    at = text.find(begin.split(" (")[0])
    stop = text.find(end)
    if at >= 0 and stop > at:
        text = text[:at] + section + text[stop + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)
