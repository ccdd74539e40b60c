"""The inbound listener, in-process with real sockets and real TLS (both event loops).

A real :class:`~meshproxy.dataplane.DataPlane` with real :class:`~meshproxy.metrics.Metrics` and
a workload identity loaded from files written by ``certs.ca`` fronts a small asyncio app that
answers with the request headers it received (as JSON) and counts requests. Policies come from
Istio YAML through the real translation. Covered: first-byte sniffing under PERMISSIVE / STRICT
/ DISABLE, handshake refusals (no client certificate, another CA), XFCC replacement, 403 on an
AuthorizationPolicy denial without reaching the app, a switch to STRICT closing a plaintext
keep-alive connection at its next request, the first-byte deadline, drain, and the
``reporter="destination"`` metrics.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from certs.ca import init_ca, issue, write_issued
from control.istio import build_snapshot
from meshproxy.config.model import ProxyIdentity, Snapshot
from meshproxy.config.security import MtlsMode
from meshproxy.dataplane import DataPlane
from meshproxy.inbound import app_cluster_name, app_snapshot, inbound_policy, peer_spiffe_id
from meshproxy.metrics import Metrics
from meshproxy.settings import Settings
from meshproxy.state import State
from meshproxy.tls import IdentityStore
from tests.support import loops

pytestmark = loops.OVERRIDE_WARNING
event_loop_policy = loops.event_loop_policy  # every async test here runs on both loops

TD = "cluster.local"
APP_ID = f"spiffe://{TD}/ns/app-ns/sa/web"
CLIENT_ID = f"spiffe://{TD}/ns/client-ns/sa/client"
WORKLOAD = ProxyIdentity(namespace="app-ns", labels={"app": "web"})


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A mesh CA, the app's and a client's identity, and a client from another CA."""
    base = tmp_path_factory.mktemp("mesh")
    ca = init_ca(base / "ca", TD, now=datetime.now(UTC) - timedelta(hours=1))
    other = init_ca(base / "other-ca", TD)
    out = {}
    for name, c, sid in (
        ("app", ca, APP_ID),
        ("client", ca, CLIENT_ID),
        ("intruder", ca, f"spiffe://{TD}/ns/client-ns/sa/intruder"),
        ("foreign", other, CLIENT_ID),
    ):
        write_issued(base / name, issue(c, sid))
        out[name] = base / name
    return out


def client_tls(d: Path | None, ca_dir: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(ca_dir / "ca.pem")
    if d is not None:
        ctx.load_cert_chain(d / "cert.pem", d / "key.pem")
    return ctx


def policy_snapshot(tmp: Path, yaml_text: str) -> Snapshot:
    f = tmp / "policy.yaml"
    f.write_text(yaml_text)
    snap, report = build_snapshot([str(f)], WORKLOAD)
    assert snap is not None, report.problems
    return snap


STRICT = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: app-ns}
spec: {mtls: {mode: STRICT}}
"""
DISABLE = STRICT.replace("STRICT", "DISABLE")
DENY_ADMIN = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-client, namespace: app-ns}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/client-ns/sa/client"]}}]
    to: [{operation: {paths: ["/public*"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: app-ns}
spec:
  action: DENY
  rules: [{to: [{operation: {paths: ["/public/admin"]}}]}]
"""


@dataclass
class App:
    """An HTTP/1.1 app answering every request with the headers it got, as JSON."""

    port: int = 0
    seen: list[dict[str, str]] = field(default_factory=list)

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")[1:]
                headers = {}
                for ln in lines:
                    if ":" in ln:
                        k, v = ln.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                self.seen.append(headers)
                body = json.dumps(headers).encode()
                w.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            w.close()


@dataclass
class Inbound:
    dp: DataPlane
    state: State
    metrics: Metrics
    app: App
    port: int


@asynccontextmanager
async def inbound(
    snap: Snapshot, cert_dir: Path | None, settings: Settings | None = None
) -> AsyncIterator[Inbound]:
    app = App()
    server = await asyncio.start_server(app.handle, "127.0.0.1", 0)
    app.port = server.sockets[0].getsockname()[1]
    state = State()
    state.apply(snap)
    metrics = Metrics(WORKLOAD)
    store = IdentityStore(None if cert_dir is None else str(cert_dir))
    ident = store.load_initial()
    if ident is not None:
        metrics.set_principal(ident.spiffe_id)
    dp = DataPlane(state, metrics, settings or Settings(), identity=store)
    _, port = await dp.start_inbound("127.0.0.1", 0, ("127.0.0.1", app.port), WORKLOAD)
    try:
        yield Inbound(dp, state, metrics, app, port)
    finally:
        await dp.close()
        server.close()
        await server.wait_closed()


async def request(
    port: int,
    path: str = "/",
    tls: ssl.SSLContext | None = None,
    extra: str = "",
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None,
) -> tuple[int, bytes]:
    """One GET; (status, body). Raises ConnectionError / IncompleteReadError when refused."""
    if conn is None:
        r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=tls), 5)
    else:
        r, w = conn
    w.write(f"GET {path} HTTP/1.1\r\nhost: web\r\n{extra}\r\n".encode())
    head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
    status = int(head.split(b" ", 2)[1])
    length = 0
    for ln in head.split(b"\r\n"):
        if ln.lower().startswith(b"content-length:"):
            length = int(ln.split(b":", 1)[1])
    body = await r.readexactly(length)
    if conn is None:
        w.close()
    return status, body


async def refused(port: int, tls: ssl.SSLContext | None = None) -> bool:
    """True when the connection ends without a single byte of HTTP answer."""
    try:
        await request(port, tls=tls)
    except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
        return True
    return False


def samples(m: Metrics, policy: str) -> dict[tuple[str, int], int]:
    """istio_requests_total by (source_principal, code) for one connection_security_policy."""
    out: dict[tuple[str, int], int] = {}
    for line in m.render().splitlines():
        if line.startswith("istio_requests_total{") and 'reporter="destination"' in line:
            if f'connection_security_policy="{policy}"' not in line:
                continue
            principal = line.split('source_principal="', 1)[1].split('"', 1)[0]
            code = int(line.split('response_code="', 1)[1].split('"', 1)[0])
            out[(principal, code)] = int(float(line.rsplit(" ", 1)[1]))
    return out


# --------------------------------------------------------------------------- pure parts


def test_app_snapshot_routes_everything_to_the_app_without_retries() -> None:
    snap = app_snapshot("127.0.0.1", 8080)
    name = app_cluster_name(8080)
    assert name == "inbound|8080||"
    vh = snap.routes.catch_all
    assert vh is not None and vh.routes[0].retries is None and vh.routes[0].timeout is None
    (ep,) = snap.clusters[name].endpoints
    assert (ep.address, ep.port) == ("127.0.0.1", 8080)


def test_policy_resolution_per_workload_and_port(tmp_path: Path) -> None:
    snap = policy_snapshot(
        tmp_path,
        STRICT
        + """
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: web, namespace: app-ns}
spec:
  selector: {matchLabels: {app: web}}
  portLevelMtls: {"9000": {mode: DISABLE}}
"""
        + "---\n"
        + DENY_ADMIN,
    )
    pol = inbound_policy(snap, WORKLOAD, 8080)
    assert pol.mode is MtlsMode.STRICT
    assert inbound_policy(snap, WORKLOAD, 9000).mode is MtlsMode.DISABLE
    other = ProxyIdentity(namespace="elsewhere", labels={"app": "web"})
    assert inbound_policy(snap, other, 8080).mode is MtlsMode.PERMISSIVE
    assert inbound_policy(snap, other, 8080).authz.empty
    named = pol.describe()["authorization_policies"]
    assert len(named) == 2 and any("deny-admin" in n for n in named), named


def test_peer_spiffe_id_needs_a_uri_san() -> None:
    class Obj:
        def __init__(self, cert: dict[str, object] | None) -> None:
            self.cert = cert

        def getpeercert(self) -> dict[str, object] | None:
            return self.cert

    assert peer_spiffe_id(Obj(None)) is None
    assert peer_spiffe_id(Obj({"subjectAltName": (("DNS", "x"),)})) is None
    uri = (("DNS", "x"), ("URI", CLIENT_ID))
    assert peer_spiffe_id(Obj({"subjectAltName": uri})) == CLIENT_ID


# --------------------------------------------------------------------------- sockets


async def test_permissive_serves_plaintext_and_mtls_on_one_port(
    tmp_path: Path, mesh: dict[str, Path]
) -> None:
    snap = policy_snapshot(tmp_path, "")
    async with inbound(snap, mesh["app"]) as ib:
        forged = "x-forwarded-client-cert: By=evil;URI=spiffe://cluster.local/ns/x/sa/root\r\n"
        status, body = await request(ib.port, extra=forged)
        assert status == 200
        assert "x-forwarded-client-cert" not in json.loads(body)  # plaintext: none at all
        status, body = await request(ib.port, tls=client_tls(mesh["client"], mesh["app"]))
        assert status == 200
        got = json.loads(body)
        assert got["x-forwarded-client-cert"] == f"By={APP_ID};URI={CLIENT_ID}"
        status, body = await request(
            ib.port, tls=client_tls(mesh["client"], mesh["app"]), extra=forged
        )
        xfcc = [h.get("x-forwarded-client-cert") for h in ib.app.seen]
        assert xfcc[-1] == f"By={APP_ID};URI={CLIENT_ID}"  # the forged one is gone
        assert samples(ib.metrics, "none") == {("unknown", 200): 1}
        assert samples(ib.metrics, "mutual_tls") == {(CLIENT_ID, 200): 2}


async def test_strict_refuses_plaintext_and_bad_certificates(
    tmp_path: Path, mesh: dict[str, Path]
) -> None:
    snap = policy_snapshot(tmp_path, STRICT)
    async with inbound(snap, mesh["app"]) as ib:
        assert await refused(ib.port)  # plaintext
        assert await refused(ib.port, tls=client_tls(None, mesh["app"]))  # no client cert
        # a certificate of another CA (the client still trusts our server)
        assert await refused(ib.port, tls=client_tls(mesh["foreign"], mesh["app"]))
        assert ib.app.seen == []
        status, _ = await request(ib.port, tls=client_tls(mesh["client"], mesh["app"]))
        assert status == 200
        listener = ib.dp.inbound_listener
        assert listener is not None
        assert listener.refused_plaintext == 1 and listener.handshake_failures >= 2


async def test_disable_serves_plaintext_only(tmp_path: Path, mesh: dict[str, Path]) -> None:
    snap = policy_snapshot(tmp_path, DISABLE)
    async with inbound(snap, mesh["app"]) as ib:
        assert (await request(ib.port))[0] == 200
        assert await refused(ib.port, tls=client_tls(mesh["client"], mesh["app"]))
        assert len(ib.app.seen) == 1


async def test_tls_without_an_identity_is_closed(tmp_path: Path, mesh: dict[str, Path]) -> None:
    async with inbound(policy_snapshot(tmp_path, ""), None) as ib:
        assert await refused(ib.port, tls=client_tls(mesh["client"], mesh["app"]))
        assert (await request(ib.port))[0] == 200  # plaintext still served (PERMISSIVE)


async def test_authorization_denies_before_the_app(tmp_path: Path, mesh: dict[str, Path]) -> None:
    snap = policy_snapshot(tmp_path, DENY_ADMIN)
    async with inbound(snap, mesh["app"]) as ib:
        good = client_tls(mesh["client"], mesh["app"])
        assert (await request(ib.port, "/public/x", tls=good))[0] == 200
        assert len(ib.app.seen) == 1
        for path, tls in (
            ("/public/admin", good),  # DENY wins
            ("/private", good),  # no ALLOW rule matches the path
            ("/public/x", client_tls(mesh["intruder"], mesh["app"])),  # other principal
            ("/public/x", None),  # plaintext: no principal at all
        ):
            status, body = await request(ib.port, path, tls=tls)
            assert (status, body) == (403, b"RBAC: access denied"), path
        assert len(ib.app.seen) == 1  # none of them reached the app
        assert samples(ib.metrics, "mutual_tls")[(CLIENT_ID, 403)] == 2


async def test_switch_to_strict_closes_plaintext_keepalive(
    tmp_path: Path, mesh: dict[str, Path]
) -> None:
    async with inbound(policy_snapshot(tmp_path, ""), mesh["app"]) as ib:
        conn = await asyncio.open_connection("127.0.0.1", ib.port)
        assert (await request(ib.port, conn=conn))[0] == 200
        ib.state.apply(policy_snapshot(tmp_path, STRICT))
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await request(ib.port, conn=conn)
        conn[1].close()
        assert len(ib.app.seen) == 1


async def test_silent_client_is_closed_after_the_first_byte_deadline(
    tmp_path: Path, mesh: dict[str, Path]
) -> None:
    settings = Settings(first_byte_timeout=0.2)
    async with inbound(policy_snapshot(tmp_path, ""), mesh["app"], settings) as ib:
        r, w = await asyncio.open_connection("127.0.0.1", ib.port)
        assert await asyncio.wait_for(r.read(), 5) == b""  # closed, nothing sent
        w.close()


async def test_drain_stops_accepting_inbound(tmp_path: Path, mesh: dict[str, Path]) -> None:
    async with inbound(policy_snapshot(tmp_path, ""), mesh["app"]) as ib:
        assert (await request(ib.port))[0] == 200
        ib.dp.stop_accepting()
        with pytest.raises(OSError):
            await asyncio.wait_for(asyncio.open_connection("127.0.0.1", ib.port), 5)
        assert await ib.dp.wait_drained(5)


async def test_absolute_form_and_dot_segments_cannot_bypass_a_path_deny(
    tmp_path: Path, mesh: dict[str, Path]
) -> None:
    snap = policy_snapshot(tmp_path, DENY_ADMIN)
    async with inbound(snap, mesh["app"]) as ib:
        good = client_tls(mesh["client"], mesh["app"])
        for path in (
            "http://other/public/admin",  # absolute-form: the path forwarded is /public/admin
            "/public/x/../admin",
            "/public/x/%2e%2e/admin",
            "/public/./admin",
        ):
            status, body = await request(ib.port, path, tls=good)
            assert (status, body) == (403, b"RBAC: access denied"), path
        assert ib.app.seen == []
        # the app receives the normalised path authorization saw, and the URL's authority
        status, _ = await request(ib.port, "http://web2/public/a/../b?q=%2e", tls=good)
        assert status == 200
        assert ib.app.seen[-1]["host"] == "web2"


async def test_app_gets_the_normalised_path(tmp_path: Path, mesh: dict[str, Path]) -> None:
    seen_paths: list[str] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        head = await r.readuntil(b"\r\n\r\n")
        seen_paths.append(head.split(b" ")[1].decode())
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        await w.drain()
        w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    app_port = server.sockets[0].getsockname()[1]
    state = State()
    state.apply(policy_snapshot(tmp_path, ""))
    dp = DataPlane(state, Metrics(WORKLOAD), Settings())
    try:
        _, port = await dp.start_inbound("127.0.0.1", 0, ("127.0.0.1", app_port), WORKLOAD)
        for target in ("/a/./b/../c?x=%2e#frag", "http://h/%7Euser/x"):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(f"GET {target} HTTP/1.1\r\nhost: web\r\n\r\n".encode())
            assert (await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 200")
            w.close()
        assert seen_paths == ["/a/c?x=%2e", "/~user/x"]
    finally:
        await dp.close()
        server.close()
        await server.wait_closed()


async def test_xfcc_spellings_and_connection_header_cannot_forge_or_drop_it(
    tmp_path: Path, mesh: dict[str, Path]
) -> None:
    async with inbound(policy_snapshot(tmp_path, ""), mesh["app"]) as ib:
        forged = "x_forwarded_client_cert: URI=spiffe://cluster.local/ns/admin/sa/root\r\n"
        await request(ib.port, extra=forged)
        assert not any("forwarded_client" in k or "forwarded-client" in k for k in ib.app.seen[-1])
        tls = client_tls(mesh["client"], mesh["app"])
        await request(ib.port, tls=tls, extra="connection: x-forwarded-client-cert\r\n")
        assert ib.app.seen[-1]["x-forwarded-client-cert"] == f"By={APP_ID};URI={CLIENT_ID}"


async def test_a_resumed_session_with_an_expired_certificate_is_refused(
    tmp_path: Path, mesh: dict[str, Path]
) -> None:
    """TLS 1.3 resumption skips certificate checks: the inbound side checks the peer's
    notAfter itself on a resumed session."""
    ca = init_ca(tmp_path / "ca2", TD, now=datetime.now(UTC) - timedelta(hours=1))
    write_issued(tmp_path / "app2", issue(ca, APP_ID))
    write_issued(tmp_path / "short", issue(ca, CLIENT_ID, ttl=timedelta(seconds=3)))
    async with inbound(policy_snapshot(tmp_path, ""), tmp_path / "app2") as ib:
        ctx = client_tls(tmp_path / "short", tmp_path / "app2")

        def get(session: ssl.SSLSession | None) -> tuple[bytes, ssl.SSLSession | None, bool]:
            import socket as _socket

            with _socket.create_connection(("127.0.0.1", ib.port), timeout=5) as raw:
                with ctx.wrap_socket(raw, session=session) as s:
                    s.sendall(b"GET / HTTP/1.1\r\nhost: web\r\nconnection: close\r\n\r\n")
                    data = b""
                    try:
                        while chunk := s.recv(65536):
                            data += chunk
                    except (ConnectionError, ssl.SSLError):
                        pass
                    return data, s.session, s.session_reused

        data, session, _ = await asyncio.to_thread(get, None)
        assert data.startswith(b"HTTP/1.1 200")
        data, session2, reused = await asyncio.to_thread(get, session)
        assert reused and data.startswith(b"HTTP/1.1 200")  # resumption works while valid
        await asyncio.sleep(3.5)
        data, _, _ = await asyncio.to_thread(get, session2)
        assert not data.startswith(b"HTTP/1.1 200")
