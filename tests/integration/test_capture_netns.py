"""Transparent capture for real: two pods as network namespaces, iptables, both sidecars.

Two namespaces joined by a veth pair (addresses 10.<a>.<b>.1 / .2 on the veths, inside the
namespaces this test creates, so no packet ever leaves them):

* the **client pod**: an application (``python3`` running as uid 1000, no proxy settings)
  and its sidecar (``meshproxy run`` as uid/gid 1337 through ``setpriv``), with
  ``meshproxy capture`` applied; the service's VIP (a ServiceEntry ``addresses`` entry) is
  routed into the veth so the application can connect to it, as kube-proxy's VIPs would be;
* the **server pod**: two application servers (ports 8080 and 9090 on 0.0.0.0) and a sidecar
  whose inbound listener (``0.0.0.0:15006``) receives every captured inbound connection and
  forwards it to ``127.0.0.1:<original port>``.

The application calls ``http://<VIP>/`` and gets the server's answer; the server saw the
request come from 127.0.0.1 (its sidecar) carrying ``x-envoy-attempt-count`` (the client
sidecar's), the client sidecar's access log names the ServiceEntry's cluster and the server
sidecar's metrics count one ``reporter="destination"`` request. Then: a destination no
ServiceEntry knows is passed through under ALLOW_ANY (``PassthroughCluster``) and answered 502
under REGISTRY_ONLY (``BlackHoleCluster``); a request sent to the outbound listener itself is
not redirected (404 NR, no loop); ``capture`` twice equals once and ``--clean`` leaves no
``ISTIO_`` chain. Every namespace, link and process is removed / stopped by name or PID in a
``finally``.
"""

from __future__ import annotations

import json
import os
import random
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
APP_UID = 1000  # the applications: any uid but the proxy's
PROXY_UID = 1337
START_TIMEOUT = 20.0
CMD_TIMEOUT = 30.0

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or os.geteuid() != 0,
    reason="needs root on Linux (network namespaces, iptables)",
)

# An application server: answers JSON {port, peer, headers} for every GET.
SERVER_APP = """\
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
port = int(sys.argv[1])
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"port": port, "peer": self.client_address[0],
                           "headers": {k.lower(): v for k, v in self.headers.items()}}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
srv = ThreadingHTTPServer(("0.0.0.0", port), H)
print("ready", flush=True)
srv.serve_forever()
"""

# A TCP echo server (not HTTP): echoes each read, prints ready once listening.
ECHO_APP = """\
import socket, sys, threading
srv = socket.create_server(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
def serve(c):
    with c:
        while data := c.recv(65536):
            c.sendall(data)
while True:
    threading.Thread(target=serve, args=(srv.accept()[0],), daemon=True).start()
"""

# A client speaking no HTTP: sends bytes that start like a TLS record, prints what comes back.
RAW_CLIENT = """\
import socket, sys, time
msg = b"\\x16\\x03\\x01 not http at all"
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10) as s:
        s.sendall(msg[:5])
        time.sleep(0.1)  # two reads on the sidecar's side: the tunnel gets the second one
        s.sendall(msg[5:])
        got = b""
        while len(got) < len(msg):
            piece = s.recv(65536)
            if not piece:
                break
            got += piece
    print("echoed" if got == msg else f"got {got!r}")
except OSError as e:
    print(f"error {e}")
"""

# The client application: one GET without any proxy, prints {status, body}.
CLIENT_APP = """\
import json, sys, urllib.error, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
req = urllib.request.Request(sys.argv[1])
try:
    with opener.open(req, timeout=10) as r:
        out = {"status": r.status, "body": r.read().decode()}
except urllib.error.HTTPError as e:
    out = {"status": e.code, "body": e.read().decode()}
print(json.dumps(out))
"""


def _missing_tools() -> list[str]:
    need = ("ip", "iptables-save", "iptables-restore", "setpriv")
    return [t for t in need if shutil.which(t) is None]


def run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=CMD_TIMEOUT, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")
    return done


@dataclass
class Pods:
    client: str
    server: str
    client_ip: str
    server_ip: str
    vip: str
    work: Path
    procs: list[subprocess.Popen[str]] = field(default_factory=list)
    started: int = 0

    def ns(self, name: str, *argv: str, uid: int | None = None) -> list[str]:
        """argv run inside namespace ``name`` (as ``uid``/gid when given)."""
        cmd = ["ip", "netns", "exec", name]
        if uid is not None:
            cmd += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]
        return cmd + list(argv)

    def start(self, argv: list[str], ready: str) -> tuple[subprocess.Popen[str], str]:
        """Start a process (stopped by PID at teardown) and wait for a stdout line starting
        with ``ready``; returns it and that line."""
        self.started += 1
        errfile = self.work / f"stderr-{self.started}.txt"
        with errfile.open("w") as err:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,  # a file, not a pipe: a chatty process can never block on it
                text=True,
                cwd=REPO,
                env={k: v for k, v in os.environ.items() if "proxy" not in k.lower()},
            )
        self.procs.append(proc)
        assert proc.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        try:
            while time.monotonic() < deadline:
                if not sel.select(timeout=0.2):
                    if proc.poll() is not None:
                        break
                    continue
                line = proc.stdout.readline()
                if not line:
                    break
                if line.startswith(ready):
                    return proc, line.strip()
        finally:
            sel.close()
        self.stop(proc)
        raise AssertionError(f"{argv!r} did not print {ready!r}: {errfile.read_text()[-2000:]}")

    def stop(self, proc: subprocess.Popen[str]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()
        if proc in self.procs:
            self.procs.remove(proc)

    def meshproxy(self, name: str, *args: str, uid: int | None = None) -> list[str]:
        return self.ns(name, sys.executable, "-m", "meshproxy", *args, uid=uid)

    def sidecar(
        self, name: str, config: Path, log: Path, *extra: str
    ) -> tuple[subprocess.Popen[str], str]:
        """Start a sidecar as uid 1337 in ``name``; returns it and its admin address."""
        proc, line = self.start(
            self.meshproxy(
                name,
                "run",
                "--config",
                str(config),
                "--outbound",
                "127.0.0.1:15001",
                "--admin",
                "127.0.0.1:0",
                "--access-log",
                str(log),
                "--drain-seconds",
                "1",
                *extra,
                uid=PROXY_UID,
            ),
            "listening ",
        )
        fields = dict(p.split("=", 1) for p in line.split()[1:])
        return proc, fields["admin"]

    def get(self, url: str) -> tuple[int, dict[str, object] | str]:
        """The client application's GET (uid 1000, no proxy settings)."""
        out = run(self.ns(self.client, sys.executable, "-c", CLIENT_APP, url, uid=APP_UID))
        got = json.loads(out.stdout)
        body = got["body"]
        try:
            return got["status"], json.loads(body)
        except ValueError:
            return got["status"], body

    def raw(self, host: str, port: int) -> str:
        """The client application's non-HTTP exchange (uid 1000): 'echoed' when it worked."""
        argv = self.ns(self.client, sys.executable, "-c", RAW_CLIENT, host, str(port), uid=APP_UID)
        return run(argv).stdout.strip()

    def fetch(self, name: str, url: str) -> str:
        """GET from inside ``name`` as root (loopback: never captured)."""
        code = f"import urllib.request as u; print(u.urlopen({url!r}, timeout=5).read().decode())"
        return run(self.ns(name, sys.executable, "-c", code)).stdout


def _access_log(path: Path, want: int, timeout: float = 5.0) -> list[dict[str, object]]:
    deadline = time.monotonic() + timeout
    lines: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        if path.exists():
            lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
            if len(lines) >= want:
                return lines
        time.sleep(0.1)
    raise AssertionError(f"{path}: {len(lines)} access log lines, wanted {want}: {lines}")


@pytest.fixture
def pods() -> Iterator[Pods]:
    missing = _missing_tools()
    if missing:
        pytest.skip(f"missing {', '.join(missing)} (apt-get install iproute2 iptables util-linux)")
    tag = f"{os.getpid() % 10000:04d}{random.randrange(16**3):03x}"
    a, b = random.randrange(200, 250), random.randrange(1, 250)
    client, server = f"mpc-{tag}", f"mps-{tag}"
    veth_c, veth_s = f"mpc{tag}", f"mps{tag}"
    work = Path(tempfile.mkdtemp(prefix="mp-capture-"))
    work.chmod(0o755)
    p = Pods(client, server, f"10.{a}.{b}.1", f"10.{a}.{b}.2", f"10.{a}.{b}.200", work)
    made: list[str] = []
    try:
        for name in (client, server):
            done = run(["ip", "netns", "add", name], check=False)
            if done.returncode != 0:
                pytest.skip(f"cannot create network namespaces here: {done.stderr.strip()}")
            made.append(name)
            run(["ip", "-n", name, "link", "set", "lo", "up"])
        veth = ("type", "veth", "peer", "name", veth_s, "netns", server)
        run(["ip", "link", "add", veth_c, "netns", client, *veth])
        run(["ip", "-n", client, "addr", "add", f"{p.client_ip}/24", "dev", veth_c])
        run(["ip", "-n", server, "addr", "add", f"{p.server_ip}/24", "dev", veth_s])
        run(["ip", "-n", client, "link", "set", veth_c, "up"])
        run(["ip", "-n", server, "link", "set", veth_s, "up"])
        # the VIP lives nowhere: like a Kubernetes service IP it is only routed, then captured
        run(["ip", "-n", client, "route", "add", "default", "dev", veth_c])
        yield p
    finally:
        for proc in list(p.procs):
            p.stop(proc)
        for name in made:  # deleting a namespace deletes its veth end (and so the pair)
            run(["ip", "netns", "del", name], check=False)
        shutil.rmtree(work, ignore_errors=True)


def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    path.chmod(0o644)
    return path


def _log(path: Path) -> Path:
    path.touch()
    os.chown(path, PROXY_UID, PROXY_UID)
    return path


def _saved_nat(p: Pods, name: str) -> str:
    return run(p.ns(name, "iptables-save", "-t", "nat")).stdout


def test_app_reaches_a_service_vip_through_both_sidecars(pods: Pods) -> None:
    p = pods
    client_cfg = p.work / "client"
    server_cfg = p.work / "server"
    for d in (client_cfg, server_cfg):
        d.mkdir()
        d.chmod(0o755)
    _write(
        client_cfg / "mesh.yaml",
        f"""\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {{name: web, namespace: shop}}
        spec:
          hosts: [web.shop.svc.cluster.local]
          addresses: [{p.vip}]
          ports: [{{number: 80, name: http, protocol: HTTP}}]
          resolution: STATIC
          location: MESH_INTERNAL
          endpoints: [{{address: {p.server_ip}, ports: {{http: 8080}}}}]
        """,
    )
    client_log, server_log = _log(p.work / "client.log"), _log(p.work / "server.log")

    # the server pod: two applications, its sidecar, capture
    for port in ("8080", "9090"):
        p.start(p.ns(p.server, sys.executable, "-c", SERVER_APP, port, uid=APP_UID), "ready")
    p.start(p.ns(p.server, sys.executable, "-c", ECHO_APP, "9443", uid=APP_UID), "ready")
    _, server_admin = p.sidecar(
        p.server,
        server_cfg,
        server_log,
        "--inbound",
        "0.0.0.0:15006",
        "--app",
        "127.0.0.1:8080",
        "--namespace",
        "shop",
        "--labels",
        "app=web",
    )
    # the inbound listener speaks HTTP only: the TCP echo port is left out of its capture
    run(p.meshproxy(p.server, "capture", "--exclude-inbound-ports", "9443"))

    # the client pod: its sidecar, capture (twice: the same rules once)
    client_sidecar, client_admin = p.sidecar(
        p.client, client_cfg, client_log, "--namespace", "shop"
    )
    run(p.meshproxy(p.client, "capture"))
    once = _saved_nat(p, p.client)
    run(p.meshproxy(p.client, "capture"))
    twice = _saved_nat(p, p.client)
    rules = [x for x in twice.splitlines() if x.startswith(("-A", ":ISTIO"))]
    assert rules == [x for x in once.splitlines() if x.startswith(("-A", ":ISTIO"))]
    assert rules.count("-A OUTPUT -p tcp -j ISTIO_OUTPUT") == 1
    assert "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001" in rules

    # 1. the service VIP, no proxy settings: through the client sidecar (ServiceEntry
    #    addresses), the server's capture and its sidecar (to 127.0.0.1:8080)
    status, body = p.get(f"http://{p.vip}/hello?x=1")
    assert status == 200, body
    assert isinstance(body, dict)
    assert body["port"] == 8080
    assert body["peer"] == "127.0.0.1"  # delivered by the server sidecar, not by the client
    headers = body["headers"]
    assert isinstance(headers, dict)
    assert headers["x-envoy-attempt-count"] == "1"  # added by the client sidecar
    assert headers["host"] == p.vip and "x-request-id" in headers
    entry = _access_log(client_log, 1)[-1]
    assert entry["authority"] == p.vip and entry["path"] == "/hello?x=1"
    assert entry["upstream_cluster"] == "web.shop.svc.cluster.local"
    assert entry["upstream_host"] == f"{p.server_ip}:8080"
    assert entry["response_code"] == 200
    inbound = _access_log(server_log, 1)[-1]
    assert inbound["upstream_cluster"] == "inbound|8080||"
    assert inbound["response_code"] == 200
    metrics = p.fetch(p.server, f"http://{server_admin}/stats/prometheus")
    dest = [
        ln
        for ln in metrics.splitlines()
        if ln.startswith("istio_requests_total{") and 'reporter="destination"' in ln
    ]
    assert len(dest) == 1 and 'response_code="200"' in dest[0], dest
    assert float(dest[0].rsplit(" ", 1)[1]) == 1.0

    # 2. a destination no ServiceEntry knows: ALLOW_ANY passes it through (the server's
    #    capture still takes it to its sidecar, then to 127.0.0.1:9090)
    status, body = p.get(f"http://{p.server_ip}:9090/direct")
    assert status == 200, body
    assert isinstance(body, dict) and body["port"] == 9090 and body["peer"] == "127.0.0.1"
    entry = _access_log(client_log, 2)[-1]
    assert entry["upstream_cluster"] == "PassthroughCluster"
    assert entry["upstream_host"] == f"{p.server_ip}:9090"
    assert _access_log(server_log, 2)[-1]["upstream_cluster"] == "inbound|9090||"
    metrics = p.fetch(p.client, f"http://{client_admin}/stats/prometheus")
    assert any(
        ln.startswith("istio_requests_total{")
        and 'reporter="source"' in ln
        and 'destination_service_name="PassthroughCluster"' in ln
        for ln in metrics.splitlines()
    )

    # ... and a connection that is not HTTP (TLS-like bytes) is tunnelled to where it went
    assert p.raw(p.server_ip, 9443) == "echoed"

    # 3. the outbound listener called directly (not redirected: loopback): 404 NR, no loop
    status, _ = p.get("http://127.0.0.1:15001/")
    assert status == 404
    assert _access_log(client_log, 3)[-1]["response_flags"] == "NR"

    # 4. REGISTRY_ONLY: the unknown destination gets 502 (BlackHoleCluster); the VIP works
    p.stop(client_sidecar)
    p.sidecar(p.client, client_cfg, client_log, "--outbound-traffic-policy", "REGISTRY_ONLY")
    status, _ = p.get(f"http://{p.server_ip}:9090/direct")
    assert status == 502
    entry = _access_log(client_log, 4)[-1]
    assert entry["upstream_cluster"] == "BlackHoleCluster" and entry["response_flags"] == "NR"
    status, body = p.get(f"http://{p.vip}/again")
    assert status == 200 and isinstance(body, dict) and body["port"] == 8080
    assert p.raw(p.server_ip, 9443) != "echoed"  # TCP to an unknown destination: closed

    # 5. --clean removes everything (twice is fine); nothing is captured any more
    for name in (p.client, p.server):
        run(p.meshproxy(name, "capture", "--clean"))
        run(p.meshproxy(name, "capture", "--clean"))
        assert "ISTIO_" not in _saved_nat(p, name)
    status, body = p.get(f"http://{p.server_ip}:9090/plain")
    assert status == 200 and isinstance(body, dict)
    assert body["peer"] == p.client_ip  # straight from the application, no sidecar


def test_ipv6_capture_and_clean_in_a_namespace() -> None:
    """``--ipv6`` installs the ip6tables chains too (with ``::6`` / ``::1``); ``--clean``
    removes both families; the nf_tables backend named explicitly works the same."""
    missing = _missing_tools() + [t for t in ("ip6tables-save",) if shutil.which(t) is None]
    if missing:
        pytest.skip(f"missing {', '.join(missing)}")
    name = f"mp6-{os.getpid() % 10000:04d}{random.randrange(16**3):03x}"
    if run(["ip", "netns", "add", name], check=False).returncode != 0:
        pytest.skip("cannot create network namespaces here")
    try:
        mp = ["ip", "netns", "exec", name, sys.executable, "-m", "meshproxy", "capture"]
        run([*mp, "--ipv6", "--exclude-outbound-cidrs", "10.0.0.0/8,fd00::/8"])
        v4 = run(["ip", "netns", "exec", name, "iptables-save", "-t", "nat"]).stdout
        v6 = run(["ip", "netns", "exec", name, "ip6tables-save", "-t", "nat"]).stdout
        assert "-A ISTIO_OUTPUT -d 10.0.0.0/8 -j RETURN" in v4 and "fd00" not in v4
        assert "-A ISTIO_OUTPUT -s ::6/128 -o lo -j RETURN" in v6
        assert "-A ISTIO_OUTPUT -d fd00::/8 -j RETURN" in v6 and "10.0.0.0" not in v6
        out = run([*mp, "--clean", "--iptables-backend", "nft"]).stdout
        assert out.splitlines() == ["iptables: removed", "ip6tables: removed"]
        for save in ("iptables-save", "ip6tables-save"):
            assert "ISTIO_" not in run(["ip", "netns", "exec", name, save, "-t", "nat"]).stdout
    finally:
        run(["ip", "netns", "del", name], check=False)
