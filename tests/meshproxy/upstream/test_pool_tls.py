"""Outbound TLS through Pools.connect, with real sockets and real certificates on 127.0.0.1, on
asyncio and uvloop: ISTIO_MUTUAL (SNI, SAN / service-account checks, other CA, expired peer,
no identity), auto-mTLS, SIMPLE and MUTUAL with user files (trustme CA), rotation of the
workload identity (new connections present the new certificate, old ones finish and are not
pooled again), two roots in the bundle, session resumption and the connect deadline covering
the handshake; pool keys (turning TLS on or off, tightened subjectAltNames or SNI, an
endpoint's serviceAccount change retire verified connections, busy ones included), the
identity rotating under a first SIMPLE connect, a bundle rewritten within one mtime tick, and
a SAN match on any of the peer's URIs."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trustme
import uvloop

from certs.ca import CA, init_ca, issue, write_issued
from meshproxy.config.model import (
    Cluster,
    ConnectionPool,
    Endpoint,
    Meta,
    TlsMode,
    TlsPolicy,
)
from meshproxy.dataplane import DataPlane
from meshproxy.errors import Failure
from meshproxy.http.codec import ResponseHead
from meshproxy.settings import Settings
from meshproxy.state import State
from meshproxy.tls import IdentityStore, make_server_context, peer_spiffe_id
from meshproxy.upstream.connection import UpstreamConnection
from meshproxy.upstream.pool import ClusterState, ConnectFailure, Pools, istio_sni
from tests.support import fakes, loops, rawhttp
from tests.support.fakes import FakeMetrics
from tests.support.forge import forge_identity

pytestmark = loops.OVERRIDE_WARNING
event_loop_policy = loops.event_loop_policy  # every async test here runs on both loops

TD = "cluster.local"
SERVER_ID = f"spiffe://{TD}/ns/shop/sa/server"
CLIENT_ID = f"spiffe://{TD}/ns/front/sa/client"
CLIENT2_ID = f"spiffe://{TD}/ns/front/sa/client-v2"
HOST = "reviews.shop.svc.cluster.local"


async def test_runs_on_the_requested_loop(event_loop_policy: object) -> None:
    wanted = isinstance(event_loop_policy, uvloop.EventLoopPolicy)
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop) is wanted


@pytest.fixture(scope="module")
def mesh_ca(tmp_path_factory: pytest.TempPathFactory) -> CA:
    return init_ca(tmp_path_factory.mktemp("ca"), TD, now=datetime.now(UTC) - timedelta(days=1))


def issued(ca: CA, d: Path, spiffe_id: str, **kw: Any) -> Path:
    write_issued(d, issue(ca, spiffe_id, **kw))
    return d


def store_for(d: Path) -> IdentityStore:
    store = IdentityStore(str(d))
    store.load_initial()
    return store


def server_ctx(d: Path, trust: bytes | None = None) -> ssl.SSLContext:
    """A server presenting the identity in ``d`` and trusting its ``ca.pem`` (or ``trust``)."""
    bundle = trust if trust is not None else (d / "ca.pem").read_bytes()
    return make_server_context((d / "cert.pem").read_bytes(), (d / "key.pem").read_bytes(), bundle)


# --------------------------------------------------------------------------- an upstream


@dataclass
class Upstream:
    """A keep-alive HTTP/1.1 server (TLS when given a context) answering every request with
    the client's SPIFFE id (or ``-``); records the SNI and peers it saw."""

    ctx: ssl.SSLContext | None
    port: int = 0
    snis: list[str | None] = field(default_factory=list)
    peers: list[str | None] = field(default_factory=list)
    transports: list[asyncio.Transport] = field(default_factory=list)


@asynccontextmanager
async def upstream(ctx: ssl.SSLContext | None) -> AsyncIterator[Upstream]:
    up = Upstream(ctx)
    if ctx is not None:

        def on_sni(obj: ssl.SSLObject, name: str | None, c: ssl.SSLContext) -> None:
            up.snis.append(name)

        ctx.sni_callback = on_sni  # type: ignore[assignment]

    class Handler(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.t: asyncio.Transport = transport  # type: ignore[assignment]
            self.buf = b""
            self.peer = peer_spiffe_id(transport.get_extra_info("ssl_object"))
            up.peers.append(self.peer)
            up.transports.append(self.t)

        def data_received(self, data: bytes) -> None:
            self.buf += data
            while b"\r\n\r\n" in self.buf:
                _, self.buf = self.buf.split(b"\r\n\r\n", 1)
                body = (self.peer or "-").encode()
                self.t.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))

    loop = asyncio.get_running_loop()
    server = await loop.create_server(Handler, "127.0.0.1", 0, ssl=ctx)
    up.port = server.sockets[0].getsockname()[1]
    try:
        yield up
    finally:
        server.close()
        for t in up.transports:
            t.abort()


@asynccontextmanager
async def silent_server() -> AsyncIterator[int]:
    """Accepts TCP and never says a word (a TLS handshake against it times out)."""
    held: list[asyncio.StreamWriter] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        held.append(w)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for w in held:
            w.transport.abort()


class Sink:
    def __init__(self) -> None:
        self.body = b""
        self.status = 0
        self.done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    def on_response_head(self, status: int, head: ResponseHead) -> None:
        self.status = status

    def on_response_body(self, data: bytes) -> None:
        self.body += data

    def on_response_complete(self, keep_alive: bool) -> None:
        self.done.set_result(keep_alive)

    def on_upstream_lost(self, failure: Failure) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(failure.name))

    def flush_response(self) -> None:
        pass

    def upstream_pause_writing(self) -> None:
        pass

    def upstream_resume_writing(self) -> None:
        pass


async def request(conn: UpstreamConnection) -> tuple[str, bool]:
    """One GET on ``conn``: (body, keep-alive)."""
    sink = Sink()
    conn.bind(sink, False)
    conn.write(b"GET / HTTP/1.1\r\nhost: reviews\r\n\r\n")
    keep = await asyncio.wait_for(sink.done, 5)
    assert sink.status == 200
    return sink.body.decode(), keep


def cluster(
    port: int,
    tls: TlsPolicy | None,
    *,
    host: str = HOST,
    service_account: str = "",
    connect_timeout: float = 5.0,
    subset: str | None = None,
) -> Cluster:
    ep = Endpoint(
        "127.0.0.1",
        port,
        service_account=service_account,
        meta=Meta("ServiceEntry", "reviews", "shop"),
    )
    return Cluster(
        name=host if subset is None else f"{host}|{subset}",
        host=host,
        port=9080,
        subset=subset,
        endpoints=(ep,),
        pool=ConnectionPool(connect_timeout=connect_timeout),
        tls=tls,
        service_namespace="shop",
    )


def pools(identity: IdentityStore | None = None) -> Pools:
    p = Pools(FakeMetrics(), Settings())  # type: ignore[arg-type]
    p.identity = identity
    return p


async def connect(p: Pools, c: Cluster) -> tuple[ClusterState, UpstreamConnection]:
    cs = p.cluster_state(c)
    conn = await p.connect(cs, cs.endpoints[0])
    return cs, conn


async def expect_tls_failure(p: Pools, c: Cluster, *fragments: str) -> ConnectFailure:
    cs = p.cluster_state(c)
    with pytest.raises(ConnectFailure) as info:
        await p.connect(cs, cs.endpoints[0])
    assert info.value.tls, str(info.value)
    for f in fragments:
        assert f in str(info.value), str(info.value)
    await asyncio.sleep(0)  # connection_lost callbacks run
    assert cs.counters.cx_active == 0 and cs.endpoints[0].conns == 0  # the slot is free
    return info.value


async def expect_refused_by_server(p: Pools, c: Cluster) -> None:
    """The server refuses our certificate: with TLS 1.3 its alert may come after the client's
    Finished, so either the connect fails as a TLS failure or the first request does."""
    cs = p.cluster_state(c)
    try:
        conn = await p.connect(cs, cs.endpoints[0])
    except ConnectFailure as e:
        assert e.tls, str(e)
    else:
        with pytest.raises(ConnectionError):
            await request(conn)


ISTIO = TlsPolicy(mode=TlsMode.ISTIO_MUTUAL)


# --------------------------------------------------------------------------- ISTIO_MUTUAL


async def test_istio_mutual_with_san(mesh_ca: CA, tmp_path: Path) -> None:
    server_dir = issued(mesh_ca, tmp_path / "s", SERVER_ID)
    p = pools(store_for(issued(mesh_ca, tmp_path / "c", CLIENT_ID)))
    async with upstream(server_ctx(server_dir)) as up:
        c = cluster(up.port, TlsPolicy(mode=TlsMode.ISTIO_MUTUAL, subject_alt_names=(SERVER_ID,)))
        cs, conn = await connect(p, c)
        assert await request(conn) == (CLIENT_ID, True)  # the server saw our identity
        assert up.snis == [f"outbound_.9080_._.{HOST}"] == [istio_sni(c)]
        info = cs.tls_info
        assert info is not None
        assert info["mode"] == "ISTIO_MUTUAL" and info["peer"] == SERVER_ID
        assert info["handshakes"] == 1 and not info["auto"]
        p.release(conn, True, cs)
        assert p.take_idle(cs.endpoints[0]) is conn  # pooled and reused
        assert await request(conn) == (CLIENT_ID, True)
        conn.close()


async def test_istio_mutual_subset_sni_and_any_mesh_peer(mesh_ca: CA, tmp_path: Path) -> None:
    server_dir = issued(mesh_ca, tmp_path / "s", SERVER_ID)
    p = pools(store_for(issued(mesh_ca, tmp_path / "c", CLIENT_ID)))
    async with upstream(server_ctx(server_dir)) as up:
        c = cluster(up.port, ISTIO, subset="v2")
        cs, conn = await connect(p, c)  # no SANs, no service account: any mesh id
        assert up.snis == [f"outbound_.9080_.v2_.{HOST}"]
        assert cs.tls_info is not None and cs.tls_info["peer"] == SERVER_ID
        conn.close()


async def test_istio_mutual_wrong_san(mesh_ca: CA, tmp_path: Path) -> None:
    server_dir = issued(mesh_ca, tmp_path / "s", SERVER_ID)
    p = pools(store_for(issued(mesh_ca, tmp_path / "c", CLIENT_ID)))
    async with upstream(server_ctx(server_dir)) as up:
        wanted = f"spiffe://{TD}/ns/shop/sa/ratings"
        c = cluster(up.port, TlsPolicy(mode=TlsMode.ISTIO_MUTUAL, subject_alt_names=(wanted,)))
        await expect_tls_failure(p, c, SERVER_ID, wanted)


async def test_istio_mutual_endpoint_service_account(mesh_ca: CA, tmp_path: Path) -> None:
    server_dir = issued(mesh_ca, tmp_path / "s", SERVER_ID)
    p = pools(store_for(issued(mesh_ca, tmp_path / "c", CLIENT_ID)))
    async with upstream(server_ctx(server_dir)) as up:
        _, conn = await connect(p, cluster(up.port, ISTIO, service_account="server"))
        conn.close()
        other = cluster(up.port, ISTIO, service_account="ratings", host="other.shop")
        await expect_tls_failure(p, other, f"spiffe://{TD}/ns/shop/sa/ratings")


async def test_server_from_another_ca(mesh_ca: CA, tmp_path: Path) -> None:
    other = init_ca(tmp_path / "other", TD)
    server_dir = issued(other, tmp_path / "s", SERVER_ID)
    p = pools(store_for(issued(mesh_ca, tmp_path / "c", CLIENT_ID)))
    async with upstream(server_ctx(server_dir)) as up:
        await expect_tls_failure(p, cluster(up.port, ISTIO), "TLS handshake")


async def test_expired_server_certificate(mesh_ca: CA, tmp_path: Path) -> None:
    past = datetime.now(UTC) - timedelta(hours=2)
    server_dir = issued(mesh_ca, tmp_path / "s", SERVER_ID, now=past, ttl=timedelta(hours=1))
    p = pools(store_for(issued(mesh_ca, tmp_path / "c", CLIENT_ID)))
    async with upstream(server_ctx(server_dir)) as up:
        err = await expect_tls_failure(p, cluster(up.port, ISTIO))
        assert "expired" in str(err)


async def test_server_refusing_our_certificate(mesh_ca: CA, tmp_path: Path) -> None:
    """The server trusts another CA only: TLS 1.3 reports it after the client's Finished;
    the connect (or the first request) fails, never silently."""
    other = init_ca(tmp_path / "other", TD)
    ctx = server_ctx(issued(mesh_ca, tmp_path / "s", SERVER_ID), trust=other.root_pem)
    p = pools(store_for(issued(mesh_ca, tmp_path / "c", CLIENT_ID)))
    async with upstream(ctx) as up:
        await expect_refused_by_server(p, cluster(up.port, ISTIO))
        assert up.peers == []  # the server never accepted us


async def test_istio_mutual_without_identity(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    p = pools(IdentityStore(None))
    async with upstream(None) as up:
        c = cluster(up.port, ISTIO)
        for _ in range(3):
            await expect_tls_failure(p, c, "needs a workload identity", "--cert-dir")
    said = [r for r in caplog.records if "needs a workload identity" in r.getMessage()]
    assert len(said) == 1  # once, not per request


async def test_auto_mtls(mesh_ca: CA, tmp_path: Path) -> None:
    auto = TlsPolicy(mode=TlsMode.ISTIO_MUTUAL, auto=True)
    async with upstream(None) as plain:
        p = pools(IdentityStore(None))  # no identity: plaintext
        cs, conn = await connect(p, cluster(plain.port, auto))
        assert cs.tls is None and cs.tls_info is None
        assert await request(conn) == ("-", True)
        conn.close()
    server_dir = issued(mesh_ca, tmp_path / "s", SERVER_ID)
    async with upstream(server_ctx(server_dir)) as up:
        p = pools(store_for(issued(mesh_ca, tmp_path / "c", CLIENT_ID)))
        cs, conn = await connect(p, cluster(up.port, auto))
        assert cs.tls_info is not None and cs.tls_info["auto"]
        assert await request(conn) == (CLIENT_ID, True)
        conn.close()


async def test_disable_is_plaintext(mesh_ca: CA, tmp_path: Path) -> None:
    p = pools(store_for(issued(mesh_ca, tmp_path / "c", CLIENT_ID)))
    async with upstream(None) as up:
        cs, conn = await connect(p, cluster(up.port, TlsPolicy(mode=TlsMode.DISABLE)))
        assert cs.tls is None
        assert await request(conn) == ("-", True)
        conn.close()


async def test_tcp_failure_is_not_tls(mesh_ca: CA, tmp_path: Path) -> None:
    p = pools(store_for(issued(mesh_ca, tmp_path / "c", CLIENT_ID)))
    async with upstream(None) as up:
        port = up.port
    cs = p.cluster_state(cluster(port, ISTIO))
    with pytest.raises(ConnectFailure) as info:
        await p.connect(cs, cs.endpoints[0])
    assert not info.value.tls


async def test_an_sni_ssl_cannot_encode_is_a_tls_failure(mesh_ca: CA, tmp_path: Path) -> None:
    server_dir = issued(mesh_ca, tmp_path / "s", SERVER_ID)
    p = pools(store_for(issued(mesh_ca, tmp_path / "c", CLIENT_ID)))
    async with upstream(server_ctx(server_dir)) as up:
        await expect_tls_failure(p, cluster(up.port, ISTIO, host="x" * 70 + ".shop"))


async def test_connect_timeout_covers_the_handshake(mesh_ca: CA, tmp_path: Path) -> None:
    p = pools(store_for(issued(mesh_ca, tmp_path / "c", CLIENT_ID)))
    async with silent_server() as port:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await expect_tls_failure(p, cluster(port, ISTIO, connect_timeout=0.3), "timed out")
        assert loop.time() - t0 < 2


async def test_two_roots_in_the_bundle(mesh_ca: CA, tmp_path: Path) -> None:
    """During a root rotation the bundle holds the old and the new root: peers of both work."""
    new_root = init_ca(tmp_path / "new", TD)
    client_dir = issued(mesh_ca, tmp_path / "c", CLIENT_ID)
    (client_dir / "ca.pem").write_bytes(mesh_ca.root_pem + new_root.root_pem)
    p = pools(store_for(client_dir))
    for ca, name in ((mesh_ca, "old"), (new_root, "new")):
        server_dir = issued(ca, tmp_path / f"s-{name}", SERVER_ID)
        (server_dir / "ca.pem").write_bytes(mesh_ca.root_pem + new_root.root_pem)
        async with upstream(server_ctx(server_dir)) as up:
            _, conn = await connect(p, cluster(up.port, ISTIO, host=f"{name}.shop"))
            assert await request(conn) == (CLIENT_ID, True)
            conn.close()


# --------------------------------------------------------------------------- rotation


async def test_rotation_new_connections_use_the_new_certificate(
    mesh_ca: CA, tmp_path: Path
) -> None:
    server_dir = issued(mesh_ca, tmp_path / "s", SERVER_ID)
    client_dir = issued(mesh_ca, tmp_path / "c", CLIENT_ID)
    store = store_for(client_dir)
    p = pools(store)
    async with upstream(server_ctx(server_dir)) as up:
        c = cluster(up.port, ISTIO)
        cs, busy = await connect(p, c)
        _, idle = await connect(p, c)
        assert await request(idle) == (CLIENT_ID, True)
        p.release(idle, True, cs)
        ep = cs.endpoints[0]
        assert ep.idle == [idle]
        old_key = ep.tls_key
        # a request in flight on `busy` while the files are replaced
        sink = Sink()
        busy.bind(sink, False)
        write_issued(client_dir, issue(mesh_ca, CLIENT2_ID))
        assert await store.poll_once() is True
        assert ep.tls_key is not None and ep.tls_key is not old_key
        assert ep.tls_key.ctx is store.current.client_context  # type: ignore[union-attr]
        assert ep.idle == []  # the idle connection of the old identity was retired
        await asyncio.sleep(0.05)
        assert idle.closed
        # the old connection finishes its request on its (still valid) session
        busy.write(b"GET / HTTP/1.1\r\nhost: reviews\r\n\r\n")
        assert await asyncio.wait_for(sink.done, 5) is True
        assert sink.body == CLIENT_ID.encode()
        p.release(busy, True, cs)
        assert ep.idle == []  # ... and is not pooled again
        # a new connection presents the new certificate
        _, fresh = await connect(p, c)
        assert await request(fresh) == (CLIENT2_ID, True)
        assert up.peers == [CLIENT_ID, CLIENT_ID, CLIENT2_ID]
        p.release(fresh, True, cs)
        assert p.take_idle(ep) is fresh
        fresh.close()


async def test_take_idle_skips_connections_of_another_identity(mesh_ca: CA, tmp_path: Path) -> None:
    server_dir = issued(mesh_ca, tmp_path / "s", SERVER_ID)
    p = pools(store_for(issued(mesh_ca, tmp_path / "c", CLIENT_ID)))
    async with upstream(server_ctx(server_dir)) as up:
        cs, conn = await connect(p, cluster(up.port, ISTIO))
        await request(conn)
        p.release(conn, True, cs)
        ep = cs.endpoints[0]
        ep.tls_key = None  # as if the cluster had turned plaintext behind the pool's back
        assert p.take_idle(ep) is None
        await asyncio.sleep(0.05)
        assert conn.closed


# --------------------------------------------------------------------------- resumption


async def test_session_resumption_per_endpoint(mesh_ca: CA, tmp_path: Path) -> None:
    server_dir = issued(mesh_ca, tmp_path / "s", SERVER_ID)
    p = pools(store_for(issued(mesh_ca, tmp_path / "c", CLIENT_ID)))
    async with upstream(server_ctx(server_dir)) as up:
        c = cluster(up.port, ISTIO)
        cs, first = await connect(p, c)
        assert not first.transport.get_extra_info("ssl_object").session_reused  # type: ignore[union-attr]
        assert cs.endpoints[0].tls_session is None
        await request(first)  # the ticket arrives with the first response
        assert cs.endpoints[0].tls_session is not None
        first.close()
        _, second = await connect(p, c)
        obj = second.transport.get_extra_info("ssl_object")  # type: ignore[union-attr]
        assert obj.session_reused
        assert await request(second) == (CLIENT_ID, True)  # the server still knows us
        assert cs.tls_info is not None
        assert cs.tls_info["handshakes"] == 2 and cs.tls_info["resumed"] == 1
        assert cs.tls_info["peer"] == SERVER_ID  # checked on the resumed session too
        second.close()


# --------------------------------------------------------------------------- SIMPLE / MUTUAL


@pytest.fixture(scope="module")
def web_ca() -> trustme.CA:
    return trustme.CA()


def web_server_ctx(
    ca: trustme.CA, name: str, client_ca: trustme.CA | None = None
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(name).configure_cert(ctx)
    if client_ca is not None:
        client_ca.configure_trust(ctx)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def write_ca(ca: trustme.CA, path: Path) -> str:
    ca.cert_pem.write_to_path(str(path))
    return str(path)


async def test_simple(web_ca: trustme.CA, tmp_path: Path) -> None:
    ca_file = write_ca(web_ca, tmp_path / "web-ca.pem")
    p = pools()
    async with upstream(web_server_ctx(web_ca, "api.example.com")) as up:
        simple = TlsPolicy(mode=TlsMode.SIMPLE, ca_certificates=ca_file)
        cs, conn = await connect(p, cluster(up.port, simple, host="api.example.com"))
        assert up.snis == ["api.example.com"]  # SNI = the host
        assert await request(conn) == ("-", True)
        assert cs.tls_info is not None and cs.tls_info["peer"] == "api.example.com"
        conn.close()
        # the host is not the certificate's name: refused (auto SAN validation)
        await expect_tls_failure(
            p, cluster(up.port, simple, host="other.example.com"), "other.example.com"
        )
        # explicit sni + subjectAltNames
        named = TlsPolicy(
            mode=TlsMode.SIMPLE,
            ca_certificates=ca_file,
            sni="api.example.com",
            subject_alt_names=("api.example.com",),
        )
        _, conn = await connect(p, cluster(up.port, named, host="gw.internal"))
        conn.close()
        wrong = TlsPolicy(
            mode=TlsMode.SIMPLE, ca_certificates=ca_file, subject_alt_names=("db.example.com",)
        )
        await expect_tls_failure(p, cluster(up.port, wrong, host="x.internal"), "db.example.com")


async def test_simple_other_ca_and_insecure_skip_verify(web_ca: trustme.CA, tmp_path: Path) -> None:
    other_file = write_ca(trustme.CA(), tmp_path / "other.pem")
    p = pools()
    async with upstream(web_server_ctx(web_ca, "api.example.com")) as up:
        bad = TlsPolicy(mode=TlsMode.SIMPLE, ca_certificates=other_file)
        await expect_tls_failure(p, cluster(up.port, bad, host="api.example.com"), "verify")
        skip = TlsPolicy(
            mode=TlsMode.SIMPLE, insecure_skip_verify=True, subject_alt_names=("nope.example",)
        )
        _, conn = await connect(p, cluster(up.port, skip, host="whatever.example.org"))
        assert await request(conn) == ("-", True)
        conn.close()


async def test_simple_missing_ca_file(
    tmp_path: Path, web_ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    p = pools()
    missing = str(tmp_path / "nope.pem")
    async with upstream(web_server_ctx(web_ca, "api.example.com")) as up:
        c = cluster(up.port, TlsPolicy(mode=TlsMode.SIMPLE, ca_certificates=missing))
        for _ in range(3):
            p.file_contexts.recheck = 0.0
            await expect_tls_failure(p, c, missing)
    said = [r for r in caplog.records if missing in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.ERROR


async def test_simple_ca_file_replaced(tmp_path: Path) -> None:
    """Contexts are cached by their files' mtimes: a replaced caCertificates file is read
    again and pooled connections of the old context are retired."""
    ca1, ca2 = trustme.CA(), trustme.CA()
    ca_file = tmp_path / "ca.pem"
    write_ca(ca1, ca_file)
    p = pools()
    p.file_contexts.recheck = 0.0
    policy = TlsPolicy(mode=TlsMode.SIMPLE, ca_certificates=str(ca_file))
    async with upstream(web_server_ctx(ca2, "api.example.com")) as up:
        c = cluster(up.port, policy, host="api.example.com")
        await expect_tls_failure(p, c)
        write_ca(ca2, ca_file)
        cs, conn = await connect(p, c)
        assert await request(conn) == ("-", True)
        conn.close()
        ctx1 = cs.endpoints[0].tls_key
        _, conn = await connect(p, c)  # unchanged files: the same context
        assert cs.endpoints[0].tls_key is ctx1
        conn.close()


async def test_mutual(web_ca: trustme.CA, tmp_path: Path) -> None:
    client_ca = trustme.CA()
    leaf = client_ca.issue_cert("client.example.com")
    cert_file, key_file = tmp_path / "client.pem", tmp_path / "client-key.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert_file))
    leaf.private_key_pem.write_to_path(str(key_file))
    ca_file = write_ca(web_ca, tmp_path / "web-ca.pem")
    p = pools()
    ctx = web_server_ctx(web_ca, "api.example.com", client_ca=client_ca)
    async with upstream(ctx) as up:
        mutual = TlsPolicy(
            mode=TlsMode.MUTUAL,
            ca_certificates=ca_file,
            client_certificate=str(cert_file),
            private_key=str(key_file),
        )
        _, conn = await connect(p, cluster(up.port, mutual, host="api.example.com"))
        assert await request(conn) == ("-", True)
        conn.close()
        # without the client certificate (SIMPLE) the server refuses us
        simple = TlsPolicy(mode=TlsMode.SIMPLE, ca_certificates=ca_file)
        await expect_refused_by_server(p, cluster(up.port, simple, host="api.example.com"))


def test_cluster_state_repr_names_the_tls_mode(mesh_ca: CA, tmp_path: Path) -> None:
    p = pools(store_for(issued(mesh_ca, tmp_path / "c", CLIENT_ID)))
    cs = p.cluster_state(cluster(1, ISTIO))
    assert "tls=ISTIO_MUTUAL" in repr(cs)
    assert "ISTIO_MUTUAL" in repr(cs.tls)


# --------------------------------------------------------------------------- through the proxy


async def test_through_the_data_plane(mesh_ca: CA, tmp_path: Path) -> None:
    """A request to an ISTIO_MUTUAL cluster: answered by the mTLS upstream, or 503 UF with
    Envoy's TLS text when the peer is not the expected one."""
    server_dir = issued(mesh_ca, tmp_path / "s", SERVER_ID)
    store = store_for(issued(mesh_ca, tmp_path / "c", CLIENT_ID))
    async with upstream(server_ctx(server_dir)) as up:
        good = replace_tls(fakes.cluster("good", [up.port]), (SERVER_ID,))
        bad = replace_tls(fakes.cluster("bad", [up.port]), (f"spiffe://{TD}/ns/x/sa/y",))
        snap = fakes.snapshot(
            [
                fakes.vhost("good", (fakes.to_cluster("good"),)),
                fakes.vhost("bad", (fakes.to_cluster("bad"),)),
            ],
            [good, bad],
        )
        state = State()
        state.apply(snap)
        metrics = FakeMetrics()
        dp = DataPlane(state, metrics, Settings(), identity=store)  # type: ignore[arg-type]
        host, port = await dp.start_outbound("127.0.0.1", 0)
        try:
            ok = await rawhttp.request(host, port, rawhttp.get(host="good"))
            assert ok.status == 200 and ok.body == CLIENT_ID.encode()
            refused = await rawhttp.request(host, port, rawhttp.get(host="bad"))
            assert refused.status == 503
            assert refused.body.endswith(b"transport failure reason: TLS error")
            assert metrics.requests[-1].flags.startswith("UF")
        finally:
            await dp.close()


def replace_tls(c: Cluster, sans: tuple[str, ...]) -> Cluster:
    return replace(c, tls=TlsPolicy(mode=TlsMode.ISTIO_MUTUAL, subject_alt_names=sans))


# --------------------------------------------------------------------------- pool keys


def redefine(c: Cluster, **kw: Any) -> Cluster:
    """The same cluster (name, endpoint address) with other fields, as a new snapshot would."""
    return replace(c, **kw)


def with_service_account(c: Cluster, sa: str) -> Cluster:
    return replace(c, endpoints=tuple(replace(e, service_account=sa) for e in c.endpoints))


async def busy_and_idle(
    p: Pools, c: Cluster
) -> tuple[ClusterState, UpstreamConnection, Sink, UpstreamConnection]:
    """Two connections to ``c``'s endpoint: one pooled idle, one bound to a request in flight
    (its sink; the request is written by :func:`finish`)."""
    cs, busy = await connect(p, c)
    _, idle = await connect(p, c)
    await request(idle)
    p.release(idle, True, cs)
    assert cs.endpoints[0].idle == [idle]
    sink = Sink()
    busy.bind(sink, False)
    return cs, busy, sink, idle


async def finish(p: Pools, cs: ClusterState, conn: UpstreamConnection, sink: Sink) -> None:
    """The request in flight on ``conn`` completes, and the proxy releases it (reusable)."""
    conn.write(b"GET / HTTP/1.1\r\nhost: reviews\r\n\r\n")
    assert await asyncio.wait_for(sink.done, 5) is True
    p.release(conn, True, cs)


async def test_turning_tls_on_retires_plaintext_connections(
    web_ca: trustme.CA, tmp_path: Path
) -> None:
    """A DestinationRule adds tls to a plaintext cluster: neither the idle nor the busy
    plaintext connection is used again, before any TLS context exists (SIMPLE builds its
    context at the first connect; ISTIO_MUTUAL without an identity never has one)."""
    ca_file = write_ca(web_ca, tmp_path / "web-ca.pem")
    policies = {
        "istio-no-identity": TlsPolicy(mode=TlsMode.ISTIO_MUTUAL),
        "simple": TlsPolicy(mode=TlsMode.SIMPLE, ca_certificates=ca_file),
    }
    for name, policy in policies.items():
        p = pools(IdentityStore(None))
        async with upstream(None) as up:
            # a plaintext server never answers a ClientHello: a short deadline
            plain = cluster(up.port, None, host=f"{name}.example.com", connect_timeout=0.3)
            cs, busy, sink, idle = await busy_and_idle(p, plain)
            ep = cs.endpoints[0]
            cs2 = p.cluster_state(redefine(plain, tls=policy))
            assert cs2.endpoints[0] is ep and cs2.tls is not None
            assert ep.tls_key is not None, name  # never the plaintext connections' key
            await asyncio.sleep(0.05)
            assert ep.idle == [] and idle.closed, name
            await finish(p, cs, busy, sink)  # the request in flight completes...
            assert ep.idle == [] and p.take_idle(ep) is None, name  # ... and is not pooled
            await asyncio.sleep(0.05)
            assert busy.closed, name
            await expect_tls_failure(p, redefine(plain, tls=policy))  # TLS, never plaintext


async def test_turning_tls_off_retires_tls_connections(mesh_ca: CA, tmp_path: Path) -> None:
    server_dir = issued(mesh_ca, tmp_path / "s", SERVER_ID)
    p = pools(store_for(issued(mesh_ca, tmp_path / "c", CLIENT_ID)))
    async with upstream(server_ctx(server_dir)) as up:
        c = cluster(up.port, ISTIO)
        cs, busy, sink, idle = await busy_and_idle(p, c)
        ep = cs.endpoints[0]
        p.cluster_state(redefine(c, tls=TlsPolicy(mode=TlsMode.DISABLE)))
        assert ep.tls_key is None and ep.idle == []
        await asyncio.sleep(0.05)
        assert idle.closed
        await finish(p, cs, busy, sink)
        assert p.take_idle(ep) is None


async def test_tightened_subject_alt_names_retire_verified_connections(
    mesh_ca: CA, tmp_path: Path
) -> None:
    """subjectAltNames no longer accept the peer: connections verified under the old names
    (idle or busy) are never used again; the next connect checks the new names."""
    server_dir = issued(mesh_ca, tmp_path / "s", SERVER_ID)
    p = pools(store_for(issued(mesh_ca, tmp_path / "c", CLIENT_ID)))
    async with upstream(server_ctx(server_dir)) as up:
        other = f"spiffe://{TD}/ns/shop/sa/ratings"
        loose = cluster(up.port, replace(ISTIO, subject_alt_names=(SERVER_ID,)))
        tight = redefine(loose, tls=replace(ISTIO, subject_alt_names=(other,)))
        cs, busy, sink, idle = await busy_and_idle(p, loose)
        ep = cs.endpoints[0]
        p.cluster_state(tight)
        assert ep.idle == []
        await asyncio.sleep(0.05)
        assert idle.closed
        await finish(p, cs, busy, sink)
        assert ep.idle == [] and p.take_idle(ep) is None
        await expect_tls_failure(p, tight, other)


async def test_endpoint_service_account_change_retires_connections(
    mesh_ca: CA, tmp_path: Path
) -> None:
    """A WorkloadEntry's serviceAccount changes (the DestinationRule does not): the peer
    verified as the old account is not accepted for the new one."""
    server_dir = issued(mesh_ca, tmp_path / "s", SERVER_ID)
    p = pools(store_for(issued(mesh_ca, tmp_path / "c", CLIENT_ID)))
    async with upstream(server_ctx(server_dir)) as up:
        c = cluster(up.port, ISTIO, service_account="server")
        cs, busy, sink, idle = await busy_and_idle(p, c)
        ep = cs.endpoints[0]
        moved = with_service_account(c, "ratings")
        assert moved.tls == c.tls
        p.cluster_state(moved)
        await asyncio.sleep(0.05)
        assert ep.idle == [] and idle.closed
        await finish(p, cs, busy, sink)
        assert p.take_idle(ep) is None
        await expect_tls_failure(p, moved, f"spiffe://{TD}/ns/shop/sa/ratings")


async def test_sni_change_retires_and_unrelated_change_keeps(mesh_ca: CA, tmp_path: Path) -> None:
    server_dir = issued(mesh_ca, tmp_path / "s", SERVER_ID)
    p = pools(store_for(issued(mesh_ca, tmp_path / "c", CLIENT_ID)))
    async with upstream(server_ctx(server_dir)) as up:
        c = cluster(up.port, TlsPolicy(mode=TlsMode.ISTIO_MUTUAL, sni="a.example"))
        cs, conn = await connect(p, c)
        await request(conn)
        p.release(conn, True, cs)
        ep = cs.endpoints[0]
        key = ep.tls_key
        # a change that does not touch TLS: the verified connection stays pooled
        c2 = redefine(c, pool=ConnectionPool(connect_timeout=3.0))
        p.cluster_state(c2)
        assert ep.tls_key is key and p.take_idle(ep) is conn
        p.release(conn, True, p.cluster_state(c2))
        # another SNI: retired, the next connection sends the new name
        c3 = redefine(c2, tls=TlsPolicy(mode=TlsMode.ISTIO_MUTUAL, sni="b.example"))
        cs3 = p.cluster_state(c3)
        assert ep.tls_key is not key and ep.idle == []
        _, fresh = await connect(p, c3)
        assert up.snis == ["a.example", "b.example"]
        p.release(fresh, True, cs3)
        assert p.take_idle(ep) is fresh
        fresh.close()


async def test_identity_swap_while_the_first_file_context_is_built(
    web_ca: trustme.CA, mesh_ca: CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The workload identity rotates (ClusterState.tls replaced) while the first SIMPLE
    connect awaits its context: the handshake uses the context that connect built."""
    ca_file = write_ca(web_ca, tmp_path / "web-ca.pem")
    client_dir = issued(mesh_ca, tmp_path / "c", CLIENT_ID)
    store = store_for(client_dir)
    p = pools(store)
    real_get = p.file_contexts.get

    async def get_then_rotate(spec: Any) -> ssl.SSLContext:
        ctx = await real_get(spec)
        write_issued(client_dir, issue(mesh_ca, CLIENT2_ID))
        assert await store.poll_once() is True  # _on_identity re-arms every TLS cluster
        return ctx

    monkeypatch.setattr(p.file_contexts, "get", get_then_rotate)
    async with upstream(web_server_ctx(web_ca, "api.example.com")) as up:
        simple = TlsPolicy(mode=TlsMode.SIMPLE, ca_certificates=ca_file)
        c = cluster(up.port, simple, host="api.example.com")
        cs = p.cluster_state(c)
        first_tls = cs.tls
        conn = await p.connect(cs, cs.endpoints[0])
        assert cs.tls is not first_tls  # replaced while the connect awaited
        assert await request(conn) == ("-", True)
        p.release(conn, True, cs)
        assert p.take_idle(cs.endpoints[0]) is conn  # the same context: still poolable
        conn.close()


async def test_half_written_bundle_in_one_mtime_tick(web_ca: trustme.CA, tmp_path: Path) -> None:
    """A caCertificates bundle written twice within one mtime tick (same mtime): the second
    write differs in size (written in place) or inode (renamed over), and is read again."""
    other = trustme.CA()
    ca_file = tmp_path / "bundle.pem"
    half = other.cert_pem.bytes()
    full = half + web_ca.cert_pem.bytes()
    ca_file.write_bytes(half)
    tick = ca_file.stat().st_mtime_ns
    p = pools()
    p.file_contexts.recheck = 0.0
    policy = TlsPolicy(mode=TlsMode.SIMPLE, ca_certificates=str(ca_file))
    async with upstream(web_server_ctx(web_ca, "api.example.com")) as up:
        c = cluster(up.port, policy, host="api.example.com")
        await expect_tls_failure(p, c, "verify")  # only the other CA so far
        with ca_file.open("r+b") as f:  # the writer finishes: same inode, same mtime
            f.write(full)
        os.utime(ca_file, ns=(tick, tick))
        _, conn = await connect(p, c)
        assert await request(conn) == ("-", True)
        conn.close()
        # same size and mtime, another inode (a rename): read again too
        tmp = tmp_path / "bundle.tmp"
        tmp.write_bytes(other.cert_pem.bytes().ljust(len(full), b"\n"))
        os.utime(tmp, ns=(tick, tick))
        os.replace(tmp, ca_file)
        assert ca_file.stat().st_size == len(full) and ca_file.stat().st_mtime_ns == tick
        await expect_tls_failure(p, c, "verify")


async def test_istio_mutual_san_matches_any_uri(mesh_ca: CA, tmp_path: Path) -> None:
    """The server's certificate names two SPIFFE ids: subjectAltNames naming the second one
    accept it (Envoy matches any SAN, not only the first SPIFFE id)."""
    alias = f"spiffe://{TD}/ns/shop/sa/server-alias"
    server_dir = tmp_path / "s"
    now = datetime.now(UTC)
    forge_identity(
        mesh_ca,
        server_dir,
        [SERVER_ID, alias],
        now - timedelta(minutes=1),
        now + timedelta(hours=1),
    )
    p = pools(store_for(issued(mesh_ca, tmp_path / "c", CLIENT_ID)))
    async with upstream(server_ctx(server_dir)) as up:
        for i, wanted in enumerate((alias, SERVER_ID)):
            policy = TlsPolicy(mode=TlsMode.ISTIO_MUTUAL, subject_alt_names=(wanted,))
            cs, conn = await connect(p, cluster(up.port, policy, host=f"h{i}.shop"))
            assert await request(conn) == (CLIENT_ID, True)
            assert cs.tls_info is not None and cs.tls_info["peer"] == wanted
            conn.close()
        nope = TlsPolicy(mode=TlsMode.ISTIO_MUTUAL, subject_alt_names=(CLIENT_ID,))
        await expect_tls_failure(p, cluster(up.port, nope, host="h3.shop"), CLIENT_ID)


async def test_redefinition_while_the_first_file_context_is_built(
    web_ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """subjectAltNames are tightened while a SIMPLE connect of the old definition awaits its
    context: that connection (verified under the old names) is never pooled for the new one."""
    ca_file = write_ca(web_ca, tmp_path / "web-ca.pem")
    p = pools()
    loose = TlsPolicy(
        mode=TlsMode.SIMPLE, ca_certificates=ca_file, subject_alt_names=("api.example.com",)
    )
    tight = replace(loose, subject_alt_names=("db.example.com",))
    async with upstream(web_server_ctx(web_ca, "api.example.com")) as up:
        c = cluster(up.port, loose, host="api.example.com")
        real_get = p.file_contexts.get

        async def get_then_redefine(spec: Any) -> ssl.SSLContext:
            ctx = await real_get(spec)
            p.cluster_state(redefine(c, tls=tight))
            return ctx

        monkeypatch.setattr(p.file_contexts, "get", get_then_redefine)
        cs = p.cluster_state(c)
        ep = cs.endpoints[0]
        conn = await p.connect(cs, ep)  # verified under the old names
        assert await request(conn) == ("-", True)
        p.release(conn, True, cs)
        assert p.take_idle(ep) is None
        monkeypatch.setattr(p.file_contexts, "get", real_get)
        await expect_tls_failure(p, redefine(c, tls=tight), "db.example.com")


@contextmanager
def alerting_server(ctx: ssl.SSLContext) -> Iterator[int]:
    """A blocking TLS server on a thread: every handshake it refuses ends with OpenSSL's
    alert sent to the client (asyncio's server aborts without flushing it)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(2)
            tls = ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            try:
                tls.do_handshake()  # refuses the client: the alert is written
                tls.recv(1)
            except OSError:  # ssl.SSLError included
                pass
            # close without a reset (the client's request unread would make one, and a
            # reset can discard the alert before the client reads it): FIN, then drain
            raw = socket.socket(fileno=tls.detach())
            try:
                raw.shutdown(socket.SHUT_WR)
                while raw.recv(65536):
                    pass
            except OSError:
                pass
            finally:
                raw.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        listener.close()


async def test_client_certificate_refused_after_the_handshake_is_a_tls_failure(
    mesh_ca: CA, tmp_path: Path
) -> None:
    """A server refusing our certificate: with TLS 1.2 (our clients' maximum) the handshake
    fails; with TLS 1.3 the alert arrives after our side of the handshake completed, and the
    request in flight is lost as a TLS failure (503 UF), not as a reset (UC). Either way every
    attempt is a TLS failure."""
    other = init_ca(tmp_path / "other", TD)
    ctx = server_ctx(issued(mesh_ca, tmp_path / "s", SERVER_ID), trust=other.root_pem)
    p = pools(store_for(issued(mesh_ca, tmp_path / "c", CLIENT_ID)))
    failures = 0
    with alerting_server(ctx) as port:
        for i in range(3):  # whichever read first sees the alert
            cs = p.cluster_state(cluster(port, ISTIO, host=f"h{i}.shop"))
            try:
                conn = await p.connect(cs, cs.endpoints[0])
            except ConnectFailure as e:  # the alert came in time for the handshake
                assert e.tls
                failures += 1
                continue
            with pytest.raises(ConnectionError, match=Failure.TLS_FAILURE.name):
                await request(conn)
            failures += 1
    assert failures == 3


async def test_reset_after_the_first_response_is_not_a_tls_failure(
    mesh_ca: CA, tmp_path: Path
) -> None:
    server_dir = issued(mesh_ca, tmp_path / "s", SERVER_ID)
    p = pools(store_for(issued(mesh_ca, tmp_path / "c", CLIENT_ID)))
    async with upstream(server_ctx(server_dir)) as up:
        _, conn = await connect(p, cluster(up.port, ISTIO))
        await request(conn)
        sink = Sink()
        conn.bind(sink, False)
        up.transports[-1].abort()
        with pytest.raises(ConnectionError, match=Failure.UPSTREAM_RESET.name):
            await asyncio.wait_for(sink.done, 5)
