"""Run the example mesh: two `reviews` backends (v1, v2) behind meshproxy, then show how to
try it.

Theory of operation: starts ``examples/demo_backend.py`` twice (v1 on 127.0.0.1:9081, v2 on
127.0.0.1:9082) and ``python -m meshproxy run --config examples/mesh`` (outbound
127.0.0.1:15001, admin 127.0.0.1:15000), waits for ``/ready``, prints curl commands, and stops
every process it started (by PID) on Ctrl-C or when one of them dies (the children run in
their own session, so a terminal's Ctrl-C reaches only this launcher). ``--check`` sends a few
requests itself and exits 0 when the routing is the one the VirtualService describes (used by
the test suite). With non-default ``--backend-ports`` the mesh YAML is copied to a temporary
directory with those ports.

    python examples/run_demo.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
MESH = HERE / "mesh"
DEFAULT_BACKENDS = (9081, 9082)
READY_TIMEOUT = 30.0


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def mesh_dir(ports: tuple[int, int], tmp: Path) -> Path:
    """The mesh config to use: the shipped one, or a copy with other backend ports."""
    if ports == DEFAULT_BACKENDS:
        return MESH
    out = tmp / "mesh"
    shutil.copytree(MESH, out)
    for f in out.glob("*.yaml"):
        text = f.read_text()
        for old, new in zip(DEFAULT_BACKENDS, ports, strict=True):
            text = text.replace(f"http: {old}", f"http: {new}")
        f.write_text(text)
    return out


def get(
    url: str, headers: dict[str, str] | None = None, proxy: str | None = None
) -> tuple[int, str]:
    handlers = [urllib.request.ProxyHandler({"http": proxy} if proxy else {})]
    opener = urllib.request.build_opener(*handlers)
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with opener.open(req, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def wait_ready(admin: str, procs: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise SystemExit(f"run_demo: {p.args[2:4]} exited early (code {p.returncode})")
        try:
            if get(f"http://{admin}/ready")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"run_demo: meshproxy was not ready after {READY_TIMEOUT:.0f}s")


def check(outbound: str) -> int:
    """Send requests through the proxy; 0 when jason always gets v2 and others mostly v1."""
    jason: Counter[str] = Counter()
    others: Counter[str] = Counter()
    for _ in range(10):
        _, body = get(f"http://{outbound}/", {"Host": "reviews", "end-user": "jason"})
        jason[json.loads(body)["version"]] += 1
    for _ in range(100):
        _, body = get(f"http://{outbound}/", {"Host": "reviews"})
        others[json.loads(body)["version"]] += 1
    _, body = get("http://reviews/via-proxy", proxy=f"http://{outbound}")
    via_proxy = json.loads(body)
    print(f"end-user: jason -> {dict(jason)}")
    print(f"everyone else   -> {dict(others)}")
    print(f"http_proxy      -> {via_proxy['version']} {via_proxy['path']}")
    ok = jason == Counter(v2=10) and others["v1"] > 60 and via_proxy["path"] == "/via-proxy"
    print("check: OK" if ok else "check: FAILED")
    return 0 if ok else 1


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM and SIGINT (Ctrl-C) stop everything we started, in order, by PID."""
    raise KeyboardInterrupt


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description="Run the example mesh (reviews v1/v2 + meshproxy).")
    ap.add_argument("--backend-ports", default="9081,9082", help="reviews v1,v2 [9081,9082]")
    ap.add_argument("--outbound", default="127.0.0.1:15001", help="[127.0.0.1:15001]")
    ap.add_argument("--admin", default="127.0.0.1:15000", help="[127.0.0.1:15000]")
    ap.add_argument("--check", action="store_true", help="send test requests, then exit")
    args = ap.parse_args()
    try:
        v1, v2 = (int(p) for p in args.backend_ports.split(","))
    except ValueError:
        ap.error("--backend-ports: expected two ports, e.g. 9081,9082")
    busy = [
        f"127.0.0.1:{port} ({what})"
        for what, port in (("reviews v1", v1), ("reviews v2", v2))
        if not port_free("127.0.0.1", port)
    ]
    for what, addr in (("outbound", args.outbound), ("admin", args.admin)):
        host, _, port = addr.rpartition(":")
        if not port_free(host, int(port)):
            busy.append(f"{addr} ({what})")
    if busy:
        print(
            "run_demo: these ports are already in use: " + ", ".join(busy) + "\n"
            "Stop whatever uses them, or pick others with --backend-ports/--outbound/--admin.",
            file=sys.stderr,
        )
        return 1

    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="meshproxy-demo-") as tmp:
        config = mesh_dir((v1, v2), Path(tmp))
        signal.signal(signal.SIGTERM, _interrupt)
        signal.signal(signal.SIGINT, _interrupt)
        try:
            for version, port in (("v1", v1), ("v2", v2)):
                procs.append(
                    subprocess.Popen(
                        [sys.executable, str(HERE / "demo_backend.py"), "--service", "reviews",
                         "--version", version, "--port", str(port)],
                        stdout=subprocess.DEVNULL, start_new_session=True,
                    )
                )  # fmt: skip
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "meshproxy", "run", "--config", str(config),
                     "--outbound", args.outbound, "--admin", args.admin,
                     "--labels", "app=productpage,version=v1", "--log-level", "warning"],
                    stdout=subprocess.DEVNULL, start_new_session=True,
                )
            )  # fmt: skip
            wait_ready(args.admin, procs)
            if args.check:
                return check(args.outbound)
            o, a = args.outbound, args.admin
            print(
                f"""
meshproxy is up: outbound http://{o}, admin http://{a}, config {config}
reviews v1 on 127.0.0.1:{v1}, reviews v2 on 127.0.0.1:{v2}

Try:
  curl -s -H 'Host: reviews' http://{o}/                        # 90% v1, 10% v2
  curl -s -H 'Host: reviews' -H 'end-user: jason' http://{o}/   # always v2
  http_proxy=http://{o} curl -s http://reviews/hello            # as a forward proxy
  curl -s http://{a}/ready
  curl -s http://{a}/config_dump
  curl -s http://{a}/clusters
  curl -s http://{a}/stats/prometheus | grep istio_requests_total
Edit {config}/reviews.yaml (e.g. the 90/10 weights) and the proxy applies it within 2 s.

Ctrl-C stops everything.""",
                flush=True,
            )
            while all(p.poll() is None for p in procs):
                time.sleep(0.5)
            print("run_demo: a process exited; stopping the others", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 0
        finally:
            stop_all(procs)


if __name__ == "__main__":
    raise SystemExit(main())
