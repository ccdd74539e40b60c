"""meshproxy.tls: loading a workload identity (every user mistake is an IdentityError naming the
file), the contexts it builds (real handshakes on 127.0.0.1, both loops, uvloop's accepted-socket
path included), the IdentityStore's reloads (rotation, bad files kept out, a writer caught
between the cert and the key), peer SPIFFE ids, SAN matching and session resumption through
the record layer; a parser's exception (malformed SAN, unsupported algorithm) is an
IdentityError, the watcher survives anything a poll raises, and load_initial_async calls
subscribers on the loop."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID, NameOID

from certs.ca import CA, atomic_write, init_ca, issue, write_issued
from meshproxy import tls as tls_module
from meshproxy.net.tlsproto import TlsLayer
from meshproxy.tls import (
    IdentityError,
    IdentityStore,
    WorkloadIdentity,
    load_identity,
    make_client_context,
    peer_spiffe_id,
    san_matches,
)
from tests.support import loops

pytestmark = loops.OVERRIDE_WARNING
event_loop_policy = loops.event_loop_policy  # every async test here runs on both loops

TD = "cluster.local"
SERVER_ID = f"spiffe://{TD}/ns/shop/sa/server"
CLIENT_ID = f"spiffe://{TD}/ns/shop/sa/client"


@pytest.fixture(scope="module")
def mesh_ca(tmp_path_factory: pytest.TempPathFactory) -> CA:
    # made a day ago, so it can sign certificates that expired already
    return init_ca(tmp_path_factory.mktemp("ca"), TD, now=datetime.now(UTC) - timedelta(days=1))


def issued(ca: CA, d: Path, spiffe_id: str = SERVER_ID, **kw: object) -> Path:
    write_issued(d, issue(ca, spiffe_id, **kw))  # type: ignore[arg-type]
    return d


# --------------------------------------------------------------------------- load_identity


def test_load_identity_reads_a_ca_issue_directory(mesh_ca: CA, tmp_path: Path) -> None:
    ident = load_identity(str(issued(mesh_ca, tmp_path / "w")))
    assert ident.spiffe_id == SERVER_ID
    assert ident.trust_domain == TD
    assert ident.not_before < datetime.now(UTC) < ident.not_after
    assert ident.roots == 1 and ident.chain_length == 1
    assert len(ident.fingerprint) == 64
    assert ident.spiffe_id_for("ns1", "sa1") == f"spiffe://{TD}/ns/ns1/sa/sa1"
    srv = ident.server_context
    assert srv.verify_mode is ssl.CERT_REQUIRED
    assert srv.minimum_version is ssl.TLSVersion.TLSv1_2
    assert not srv.check_hostname
    assert srv.options & ssl.OP_NO_COMPRESSION
    cli = ident.client_context
    assert cli.verify_mode is ssl.CERT_REQUIRED and not cli.check_hostname
    assert ident.view()["spiffe_id"] == SERVER_ID
    assert "server_context" not in repr(ident)


def test_load_identity_with_an_intermediate(tmp_path: Path) -> None:
    ca = init_ca(tmp_path / "ca", TD, intermediate=True)
    ident = load_identity(str(issued(ca, tmp_path / "w")))
    assert ident.chain_length == 2


def test_two_roots_in_the_bundle(mesh_ca: CA, tmp_path: Path) -> None:
    other = init_ca(tmp_path / "other", TD)
    d = issued(mesh_ca, tmp_path / "w")
    (d / "ca.pem").write_bytes(other.root_pem + mesh_ca.root_pem)
    assert load_identity(str(d)).roots == 2


def expect_error(d: Path, *fragments: str) -> IdentityError:
    with pytest.raises(IdentityError) as info:
        load_identity(str(d))
    for f in fragments:
        assert f in str(info.value), str(info.value)
    return info.value


@pytest.mark.parametrize("name", ["cert.pem", "key.pem", "ca.pem"])
def test_missing_file(mesh_ca: CA, tmp_path: Path, name: str) -> None:
    d = issued(mesh_ca, tmp_path / "w")
    (d / name).unlink()
    expect_error(d, str(d / name), "no such file")


def test_missing_or_wrong_directory(tmp_path: Path) -> None:
    expect_error(tmp_path / "nope", "no such directory")
    (tmp_path / "f").write_text("x")
    expect_error(tmp_path / "f", "not a directory")


def test_key_does_not_match(mesh_ca: CA, tmp_path: Path) -> None:
    d = issued(mesh_ca, tmp_path / "w")
    other = issued(mesh_ca, tmp_path / "o")
    (d / "key.pem").write_bytes((other / "key.pem").read_bytes())
    err = expect_error(d, str(d / "key.pem"), "does not match")
    assert err.transient


def test_garbage_files(mesh_ca: CA, tmp_path: Path) -> None:
    d = issued(mesh_ca, tmp_path / "w")
    good_key = (d / "key.pem").read_bytes()
    (d / "key.pem").write_text("hello")
    assert not expect_error(d, "key.pem", "not a PEM private key").transient
    (d / "key.pem").write_bytes(good_key)
    (d / "cert.pem").write_text("")
    expect_error(d, "cert.pem", "no certificate")
    (d / "cert.pem").write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    expect_error(d, "cert.pem", "not valid PEM")


def test_no_spiffe_san(tmp_path: Path) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("svc.example.com")
    d = tmp_path / "w"
    d.mkdir()
    (d / "cert.pem").write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    (d / "key.pem").write_bytes(leaf.private_key_pem.bytes())
    (d / "ca.pem").write_bytes(ca.cert_pem.bytes())
    expect_error(d, "cert.pem", "no SPIFFE URI SAN")


def test_expired_and_not_yet_valid(mesh_ca: CA, tmp_path: Path) -> None:
    past = datetime.now(UTC) - timedelta(minutes=30)
    d = issued(mesh_ca, tmp_path / "old", now=past, ttl=timedelta(minutes=5))
    expect_error(d, "cert.pem", "expired at")
    future = datetime.now(UTC) + timedelta(hours=2)
    d = issued(mesh_ca, tmp_path / "new", now=future)
    expect_error(d, "cert.pem", "not valid before")
    # the same files are fine at a time inside their validity
    assert load_identity(str(d), now=future).spiffe_id == SERVER_ID


def test_empty_bundle_and_wrong_root(mesh_ca: CA, tmp_path: Path) -> None:
    d = issued(mesh_ca, tmp_path / "w")
    (d / "ca.pem").write_text("# nothing here\n")
    expect_error(d, "ca.pem", "no certificate")
    other = init_ca(tmp_path / "other", TD)
    (d / "ca.pem").write_bytes(other.root_pem)
    expect_error(d, "cert.pem", "does not chain", "ca.pem")


def test_unreadable_file(mesh_ca: CA, tmp_path: Path) -> None:
    if os.geteuid() == 0:
        d = issued(mesh_ca, tmp_path / "w")
        (d / "key.pem").unlink()
        (d / "key.pem").mkdir()
        expect_error(d, "key.pem", "is a directory")
        return
    d = issued(mesh_ca, tmp_path / "w")
    (d / "key.pem").chmod(0)
    expect_error(d, "key.pem", "permission denied")


# --------------------------------------------------------------------------- handshakes


@asynccontextmanager
async def accepted_socket_server(ctx: ssl.SSLContext, seen: list[str | None]) -> AsyncIterator[int]:
    """An echo server fed through ``loop.connect_accepted_socket(..., ssl=ctx)``, the way the
    inbound listener hands over a sniffed connection."""
    loop = asyncio.get_running_loop()
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()
    lsock.setblocking(False)

    class Echo(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.t = transport
            seen.append(peer_spiffe_id(transport.get_extra_info("ssl_object")))

        def data_received(self, data: bytes) -> None:
            self.t.write(data)  # type: ignore[attr-defined]

    async def accept() -> None:
        while True:
            sock, _ = await loop.sock_accept(lsock)
            try:
                await loop.connect_accepted_socket(Echo, sock, ssl=ctx, ssl_handshake_timeout=5)
            except (ssl.SSLError, OSError, ConnectionError):
                seen.append("handshake failed")

    task = asyncio.create_task(accept())
    try:
        yield lsock.getsockname()[1]
    finally:
        task.cancel()
        lsock.close()


class Client(asyncio.Protocol):
    def __init__(self) -> None:
        self.got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        if not self.got.done():
            self.got.set_result(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.got.done():  # TLS 1.3: a refused client certificate shows up here
            self.got.set_exception(exc or ConnectionError("closed"))


async def roundtrip(
    port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None = None
) -> TlsLayer:
    """One ping over a client TLS connection made as the pool makes them (a TlsLayer offering
    ``session``)."""
    loop = asyncio.get_running_loop()
    proto = Client()
    layer = TlsLayer(
        ctx, proto, server_side=False, server_hostname="outbound_.80_._.svc.a", session=session
    )
    await asyncio.wait_for(loop.create_connection(lambda: layer, "127.0.0.1", port), 5)
    await asyncio.wait_for(layer.handshake, 5)
    layer.write(b"ping")
    assert await asyncio.wait_for(proto.got, 5) == b"ping"
    return layer


async def test_mutual_tls_and_resumption(mesh_ca: CA, tmp_path: Path) -> None:
    server = load_identity(str(issued(mesh_ca, tmp_path / "s", SERVER_ID)))
    client = load_identity(str(issued(mesh_ca, tmp_path / "c", CLIENT_ID)))
    seen: list[str | None] = []
    async with accepted_socket_server(server.server_context, seen) as port:
        t1 = await roundtrip(port, client.client_context)
        obj = t1.get_extra_info("ssl_object")
        # our client offers at most TLS 1.2 (Envoy's upstream default; the server takes 1.3 too)
        assert obj.version() == "TLSv1.2"
        assert obj.cipher()[0] == "ECDHE-ECDSA-AES128-GCM-SHA256"
        assert peer_spiffe_id(obj) == SERVER_ID
        assert not obj.session_reused
        session = t1.ssl_object.session  # after data was read: the ticket is in
        assert session is not None and session.has_ticket
        t1.close()
        t2 = await roundtrip(port, client.client_context, session)
        obj2 = t2.get_extra_info("ssl_object")
        assert obj2.session_reused
        assert peer_spiffe_id(obj2) == SERVER_ID  # a resumed session still names its peer
        t2.close()
        # no session offered: a full handshake
        t3 = await roundtrip(port, client.client_context)
        assert not t3.get_extra_info("ssl_object").session_reused
        t3.close()
        # a session belongs to its context (which is why the pool keeps it with its TLS key)
        other = load_identity(str(issued(mesh_ca, tmp_path / "c2", CLIENT_ID)))
        with pytest.raises(ValueError):
            await roundtrip(port, other.client_context, session)
    assert seen == [CLIENT_ID] * 3


async def test_server_refuses_other_ca_and_no_client_cert(mesh_ca: CA, tmp_path: Path) -> None:
    server = load_identity(str(issued(mesh_ca, tmp_path / "s", SERVER_ID)))
    other_ca = init_ca(tmp_path / "other", TD)
    stranger = load_identity(str(issued(other_ca, tmp_path / "x", CLIENT_ID)))
    seen: list[str | None] = []
    async with accepted_socket_server(server.server_context, seen) as port:
        # the stranger does not trust our server either: give it our root to get that far
        ctx = make_client_context(
            cert_pem=(tmp_path / "x" / "cert.pem").read_bytes(),
            key_pem=(tmp_path / "x" / "key.pem").read_bytes(),
            ca_pem=mesh_ca.root_pem,
        )
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            t = await roundtrip(port, ctx)
            t.close()
        with pytest.raises(ssl.SSLError):  # and with its own bundle it refuses us
            await roundtrip(port, stranger.client_context)
        anonymous = make_client_context(ca_pem=mesh_ca.root_pem)
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            t = await roundtrip(port, anonymous)
            t.close()
        for _ in range(50):
            if len(seen) >= 2:
                break
            await asyncio.sleep(0.02)
    assert CLIENT_ID not in seen
    assert "handshake failed" in seen


# --------------------------------------------------------------------------- the store


def rewrite(d: Path, ca: CA, spiffe_id: str = SERVER_ID) -> WorkloadIdentity:
    write_issued(d, issue(ca, spiffe_id))
    return load_identity(str(d))


async def test_store_without_dir() -> None:
    store = IdentityStore(None)
    assert store.load_initial() is None
    assert store.current is None and store.generation == 0
    assert await store.poll_once() is False
    await store.watch()  # returns at once


async def test_store_load_initial_raises(tmp_path: Path) -> None:
    store = IdentityStore(str(tmp_path / "missing"))
    with pytest.raises(IdentityError, match="no such directory"):
        store.load_initial()
    assert store.current is None


async def test_store_rotation_and_bad_files(
    mesh_ca: CA, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = issued(mesh_ca, tmp_path / "w")
    store = IdentityStore(str(d), poll_interval=0.01)
    first = store.load_initial()
    assert first is not None and store.generation == 1
    events: list[tuple[int | None, int]] = []
    store.subscribe(lambda old, new: events.append((old and old.serial, new.serial)))
    assert await store.poll_once() is False  # nothing changed
    second = rewrite(d, mesh_ca, CLIENT_ID)
    assert await store.poll_once() is True
    assert store.current is not None and store.current.serial == second.serial
    assert store.current.spiffe_id == CLIENT_ID
    assert store.generation == 2 and store.reloads_ok == 1
    assert events == [(first.serial, second.serial)]
    # an expired set is refused, logged once, and the current identity stays
    caplog.set_level(logging.DEBUG, "meshproxy.tls")
    past = datetime.now(UTC) - timedelta(hours=1)
    write_issued(d, issue(mesh_ca, SERVER_ID, now=past, ttl=timedelta(minutes=5)))
    assert await store.poll_once() is False
    assert store.current.serial == second.serial and store.reloads_failed == 1
    assert store.last_error is not None and "expired" in store.last_error
    os.utime(d / "ca.pem")  # a touch: reloaded, same error, not logged again
    assert await store.poll_once() is False
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "expired" in errors[0].getMessage()
    third = rewrite(d, mesh_ca)
    assert await store.poll_once() is True
    assert store.current.serial == third.serial and store.last_error is None
    assert store.generation == 3


async def test_store_writer_between_cert_and_key(
    mesh_ca: CA, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Cert first, key second: the mismatch in between is retried quietly."""
    d = issued(mesh_ca, tmp_path / "w")
    store = IdentityStore(str(d))
    first = store.load_initial()
    assert first is not None
    caplog.set_level(logging.DEBUG, "meshproxy.tls")
    new = issue(mesh_ca, SERVER_ID)
    atomic_write(d / "cert.pem", new.cert_pem, 0o644)
    assert await store.poll_once() is False
    assert store.current is first and store.reloads_failed == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    atomic_write(d / "key.pem", new.key_pem, 0o600)
    assert await store.poll_once() is True
    assert store.current is not first and store.reloads_failed == 0


async def test_store_persistent_mismatch_is_an_error(
    mesh_ca: CA, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = issued(mesh_ca, tmp_path / "w")
    store = IdentityStore(str(d))
    first = store.load_initial()
    atomic_write(d / "cert.pem", issue(mesh_ca, SERVER_ID).cert_pem, 0o644)
    for _ in range(store.mismatch_grace):
        assert await store.poll_once() is False
    assert store.current is first and store.reloads_failed == 1
    assert any("does not match" in r.getMessage() for r in caplog.records if r.levelno >= 40)


async def test_store_watch_task(mesh_ca: CA, tmp_path: Path) -> None:
    d = issued(mesh_ca, tmp_path / "w")
    store = IdentityStore(str(d), poll_interval=0.02)
    store.load_initial()
    swapped = asyncio.Event()
    store.subscribe(lambda old, new: swapped.set())
    task = asyncio.create_task(store.watch())
    try:
        new = rewrite(d, mesh_ca, CLIENT_ID)
        await asyncio.wait_for(swapped.wait(), 5)
        assert store.current is not None and store.current.serial == new.serial
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_failing_subscriber_does_not_stop_rotation(mesh_ca: CA, tmp_path: Path) -> None:
    d = issued(mesh_ca, tmp_path / "w")
    store = IdentityStore(str(d))
    store.load_initial()
    calls: list[int] = []

    def broken(old: object, new: object) -> None:
        raise RuntimeError("bug")

    store.subscribe(broken)
    store.subscribe(lambda old, new: calls.append(1))
    rewrite(d, mesh_ca)
    assert await store.poll_once() is True
    assert calls == [1]


# --------------------------------------------------------------------------- names


def test_peer_spiffe_id_without_a_verified_peer() -> None:
    assert peer_spiffe_id(None) is None

    class NoCert:
        def getpeercert(self) -> dict[str, object]:
            return {}

    assert peer_spiffe_id(NoCert()) is None  # type: ignore[arg-type]

    class TwoUris:
        def getpeercert(self) -> dict[str, object]:
            return {"subjectAltName": (("URI", "https://x"), ("URI", SERVER_ID))}

    assert peer_spiffe_id(TwoUris()) == SERVER_ID  # type: ignore[arg-type]


def test_san_matches() -> None:
    cert = {
        "subjectAltName": (
            ("DNS", "*.example.com"),
            ("DNS", "api.internal"),
            ("URI", SERVER_ID),
            ("IP Address", "10.0.0.1"),
        )
    }
    assert san_matches(cert, [SERVER_ID]) == SERVER_ID
    assert san_matches(cert, [CLIENT_ID]) is None
    assert san_matches(cert, ["www.example.com"]) == "www.example.com"
    assert san_matches(cert, ["WWW.Example.COM."]) == "WWW.Example.COM."
    assert san_matches(cert, ["a.b.example.com"]) is None  # one label only
    assert san_matches(cert, ["example.com"]) is None
    assert san_matches(cert, ["api.internal"]) == "api.internal"
    assert san_matches(cert, ["10.0.0.1"]) == "10.0.0.1"
    assert san_matches(cert, ["10.0.0.2", "nope", "api.internal"]) == "api.internal"
    assert san_matches({}, [SERVER_ID]) is None
    assert san_matches(None, [SERVER_ID]) is None


async def test_store_says_once_that_the_live_certificate_expired(
    mesh_ca: CA, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = IdentityStore(str(issued(mesh_ca, tmp_path / "w")))
    ident = store.load_initial()
    assert ident is not None
    assert store.check_expiry() is False
    later = ident.not_after + timedelta(seconds=1)
    assert store.check_expiry(later) is True
    assert store.check_expiry(later) is True
    said = [r for r in caplog.records if "expired" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.ERROR


# --------------------------------------------------------------------------- parser errors


def write_malformed_san(ca: CA, d: Path) -> None:
    """A set signed by ``ca`` whose leaf carries a SubjectAltName extension that does not
    parse (cryptography raises a bare ValueError when it is read)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    truncated_uri = b"\x30\x05\x86\x03ab"  # a SEQUENCE of 5 bytes holding 4
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bad-san")]))
        .issuer_name(ca.signer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(
            x509.UnrecognizedExtension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, truncated_uri),
            critical=False,
        )
        .sign(ca.signer_key, hashes.SHA256())
    )
    d.mkdir(parents=True, exist_ok=True)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    atomic_write(d / "key.pem", key_pem, 0o600)
    atomic_write(d / "ca.pem", ca.root_pem, 0o644)
    atomic_write(d / "cert.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644)


def test_malformed_san_is_an_identity_error(mesh_ca: CA, tmp_path: Path) -> None:
    d = tmp_path / "w"
    write_malformed_san(mesh_ca, d)
    err = expect_error(d, str(d / "cert.pem"), "ValueError")
    assert not err.transient


def test_unexpected_parser_exception_is_an_identity_error(
    mesh_ca: CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever a parser raises (here cryptography's UnsupportedAlgorithm) names the file."""
    d = issued(mesh_ca, tmp_path / "w")

    def unsupported(data: bytes) -> list[x509.Certificate]:
        raise UnsupportedAlgorithm("signature algorithm 1.2.3.4")

    monkeypatch.setattr(x509, "load_pem_x509_certificates", unsupported)
    expect_error(d, str(d / "cert.pem"), "UnsupportedAlgorithm", "1.2.3.4")


async def test_watch_survives_a_malformed_certificate(
    mesh_ca: CA, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = issued(mesh_ca, tmp_path / "w")
    store = IdentityStore(str(d), poll_interval=0.01)
    first = store.load_initial()
    assert first is not None
    swapped = asyncio.Event()
    store.subscribe(lambda old, new: swapped.set())
    task = asyncio.create_task(store.watch())
    try:
        write_malformed_san(mesh_ca, d)
        for _ in range(500):
            if store.reloads_failed:
                break
            await asyncio.sleep(0.01)
        assert store.reloads_failed >= 1 and store.current is first
        assert store.last_error is not None and "cert.pem" in store.last_error
        assert not task.done()
        new = rewrite(d, mesh_ca, CLIENT_ID)  # a later good set is still picked up
        await asyncio.wait_for(swapped.wait(), 5)
        assert store.current is not None and store.current.serial == new.serial
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    said = [r for r in caplog.records if "cert.pem" in r.getMessage()]
    assert said and said[0].levelno == logging.ERROR and said[0].exc_info is None


async def test_watch_logs_an_unexpected_exception_and_keeps_polling(
    mesh_ca: CA, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = issued(mesh_ca, tmp_path / "w")
    store = IdentityStore(str(d), poll_interval=0.01)
    store.load_initial()
    swapped = asyncio.Event()
    store.subscribe(lambda old, new: swapped.set())
    real = tls_module.load_identity
    calls = 0

    def flaky(cert_dir: str, **kw: object) -> WorkloadIdentity:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise RuntimeError("disk gremlin")
        return real(cert_dir)

    monkeypatch.setattr(tls_module, "load_identity", flaky)
    task = asyncio.create_task(store.watch())
    try:
        new = rewrite(d, mesh_ca, CLIENT_ID)
        await asyncio.wait_for(swapped.wait(), 5)
        assert store.current is not None and store.current.serial == new.serial
        assert calls >= 3
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    said = [r for r in caplog.records if "disk gremlin" in r.getMessage()]
    assert len(said) == 1  # the same problem twice: said once
    assert said[0].levelno == logging.ERROR and said[0].exc_info is not None  # with traceback


# --------------------------------------------------------------------------- load_initial_async


async def test_load_initial_async_swaps_on_the_loop(mesh_ca: CA, tmp_path: Path) -> None:
    d = issued(mesh_ca, tmp_path / "w")
    store = IdentityStore(str(d))
    seen: list[tuple[int, asyncio.AbstractEventLoop | None]] = []

    def on_swap(old: WorkloadIdentity | None, new: WorkloadIdentity) -> None:
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        seen.append((threading.get_ident(), loop))

    store.subscribe(on_swap)
    ident = await store.load_initial_async()
    assert ident is not None and ident.spiffe_id == SERVER_ID
    assert store.current is ident and store.generation == 1
    assert seen == [(threading.get_ident(), asyncio.get_running_loop())]
    assert await store.poll_once() is False  # the signature was recorded with the load


async def test_load_initial_async_errors_and_no_dir(tmp_path: Path) -> None:
    assert await IdentityStore(None).load_initial_async() is None
    store = IdentityStore(str(tmp_path / "missing"))
    with pytest.raises(IdentityError, match="no such directory"):
        await store.load_initial_async()
    assert store.current is None and store.generation == 0


# --------------------------------------------------------------------------- identity_from_pem


def test_identity_from_pem_checks_like_files(mesh_ca: CA, tmp_path: Path) -> None:
    got = issue(mesh_ca, SERVER_ID, timedelta(hours=1))
    ident = tls_module.identity_from_pem(
        got.cert_pem, got.key_pem, got.ca_pem, source="from a test", expect_spiffe_id=SERVER_ID
    )
    assert ident.spiffe_id == SERVER_ID and ident.cert_dir == ""
    assert ident.source == "from a test"
    assert ident.view()["source"] == "from a test"
    assert ident.server_context.verify_mode is ssl.CERT_REQUIRED
    # an identity read from files has no "source" in its view (unchanged output)
    assert "source" not in load_identity(str(issued(mesh_ca, tmp_path / "w"))).view()


def test_identity_from_pem_refusals(mesh_ca: CA, tmp_path: Path) -> None:
    got = issue(mesh_ca, SERVER_ID, timedelta(hours=1))
    other = issue(mesh_ca, CLIENT_ID, timedelta(hours=1))
    stranger = init_ca(tmp_path / "stranger", TD)

    def refused(cert: bytes, key: bytes, ca: bytes, *frags: str, **kw: object) -> None:
        with pytest.raises(IdentityError) as exc:
            tls_module.identity_from_pem(cert, key, ca, source="the answer", **kw)  # type: ignore[arg-type]
        assert not exc.value.transient
        for f in frags:
            assert f in str(exc.value), str(exc.value)

    refused(got.cert_pem, other.key_pem, got.ca_pem, "the answer (key)", "does not match")
    refused(got.cert_pem, got.key_pem, stranger.root_pem, "does not chain")
    refused(b"junk", got.key_pem, got.ca_pem, "the answer (cert): no certificate")
    refused(got.cert_pem, b"junk", got.ca_pem, "the answer (key): not a PEM private key")
    refused(
        got.cert_pem,
        got.key_pem,
        got.ca_pem,
        f"is for {SERVER_ID}, not {CLIENT_ID}",
        expect_spiffe_id=CLIENT_ID,
    )
    refused(
        got.cert_pem,
        got.key_pem,
        got.ca_pem,
        "expired",
        now=datetime.now(UTC) + timedelta(hours=2),
    )


async def test_publish_swaps_and_notifies(mesh_ca: CA) -> None:
    store = IdentityStore(None)
    seen: list[tuple[WorkloadIdentity | None, WorkloadIdentity]] = []
    store.subscribe(lambda old, new: seen.append((old, new)))
    a, b = (
        tls_module.identity_from_pem(g.cert_pem, g.key_pem, g.ca_pem, source="t")
        for g in (issue(mesh_ca, SERVER_ID), issue(mesh_ca, SERVER_ID))
    )
    store.publish(a)
    store.publish(b)
    assert store.current is b and store.generation == 2
    assert seen == [(None, a), (a, b)]
    assert await store.poll_once() is False  # no cert dir: publishing is the only source


async def test_plain_server_context_reloads_in_place(mesh_ca: CA) -> None:
    """A server context asking no client certificate; load_chain swaps what new handshakes
    present without a new context."""
    first, second = issue(mesh_ca, SERVER_ID), issue(mesh_ca, CLIENT_ID)
    ctx = tls_module.make_plain_server_context(first.cert_pem, first.key_pem)
    assert ctx.verify_mode is ssl.CERT_NONE
    client = make_client_context(ca_pem=mesh_ca.root_pem)
    seen: list[str | None] = []

    async def handshake() -> str | None:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0, ssl=ctx)
        port = server.sockets[0].getsockname()[1]
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port, ssl=client)
            peer = peer_spiffe_id(w.get_extra_info("ssl_object"))
            w.close()
            return peer
        finally:
            server.close()
            await server.wait_closed()

    seen.append(await handshake())
    tls_module.load_chain(ctx, second.cert_pem, second.key_pem)
    seen.append(await handshake())
    assert seen == [SERVER_ID, CLIENT_ID]
