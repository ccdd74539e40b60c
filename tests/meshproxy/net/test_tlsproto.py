"""TlsLayer with real sockets on 127.0.0.1, both loops: the record layer the sidecars use.

Each test pairs a TlsLayer with either another TlsLayer or the event loop's own TLS transport
(a reference implementation), so framing, close_notify and errors are checked against
OpenSSL's peer behaviour, not against ourselves only.
"""

from __future__ import annotations

import asyncio
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from certs.ca import init_ca, issue, write_issued
from meshproxy.net.tlsproto import READ_SIZE, TlsLayer
from meshproxy.tls import WorkloadIdentity, load_identity
from tests.support import loops

pytestmark = loops.OVERRIDE_WARNING
event_loop_policy = loops.event_loop_policy  # every async test here runs on both loops

TD = "cluster.local"


@pytest.fixture(scope="module")
def ids(tmp_path_factory: pytest.TempPathFactory) -> dict[str, WorkloadIdentity]:
    base = tmp_path_factory.mktemp("ids")
    ca = init_ca(base / "ca", TD, now=datetime.now(UTC) - timedelta(hours=1))
    other = init_ca(base / "other", TD)
    out = {}
    for name, c in (("server", ca), ("client", ca), ("stranger", other)):
        write_issued(base / name, issue(c, f"spiffe://{TD}/ns/t/sa/{name}"))
        out[name] = load_identity(str(base / name))
    return out


class Recorder(asyncio.Protocol):
    """An inner protocol that keeps what it is told."""

    def __init__(self, echo: bool = False, keep_on_eof: bool = False) -> None:
        self.transport: Any = None
        self.data = bytearray()
        self.chunks = 0
        self.echo = echo
        self.keep_on_eof = keep_on_eof
        self.eof = asyncio.get_running_loop().create_future()
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.chunks += 1
        if self.echo:
            self.transport.write(data)  # a TlsLayer

    def eof_received(self) -> bool:
        if not self.eof.done():
            self.eof.set_result(None)
        return self.keep_on_eof

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


async def layer_server(
    ident: WorkloadIdentity, inner: list[Recorder], **kw: bool
) -> tuple[asyncio.Server, int, list[TlsLayer]]:
    layers: list[TlsLayer] = []

    def factory() -> TlsLayer:
        r = Recorder(**kw)
        inner.append(r)
        layer = TlsLayer(ident.server_context, r, server_side=True)
        layers.append(layer)
        return layer

    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], layers


async def layer_client(
    ident: WorkloadIdentity, port: int, session: ssl.SSLSession | None = None
) -> tuple[TlsLayer, Recorder]:
    r = Recorder()
    layer = TlsLayer(
        ident.client_context, r, server_side=False, server_hostname="x", session=session
    )
    await asyncio.get_running_loop().create_connection(lambda: layer, "127.0.0.1", port)
    await asyncio.wait_for(layer.handshake, 5)
    return layer, r


async def test_layer_to_layer_echo_across_many_records(ids: dict[str, WorkloadIdentity]) -> None:
    inner: list[Recorder] = []
    server, port, layers = await layer_server(ids["server"], inner, echo=True)
    try:
        layer, r = await layer_client(ids["client"], port)
        assert layer.ssl_object.version() == "TLSv1.2"  # our clients' maximum, as Envoy's
        payload = bytes(range(256)) * 1024  # 256 KiB: many 16 KiB records
        layer.write(payload[:1000])
        layer.write(memoryview(payload)[1000:])
        while len(r.data) < len(payload):
            await asyncio.sleep(0.01)
        assert bytes(r.data) == payload
        peer = layers[0].get_extra_info("peercert")
        uris = [v for k, v in peer["subjectAltName"] if k == "URI"]
        assert uris == [f"spiffe://{TD}/ns/t/sa/client"]
        assert inner[0].chunks >= len(payload) // READ_SIZE
        layer.close()
        assert await asyncio.wait_for(inner[0].lost, 5) is None
    finally:
        server.close()


async def test_loop_tls_client_against_layer_server_and_close_notify(
    ids: dict[str, WorkloadIdentity],
) -> None:
    """The event loop's own TLS client (OpenSSL's usual peer) talks to a TlsLayer server; a
    close_notify from the layer is an end of stream the client sees as EOF."""
    inner: list[Recorder] = []
    server, port, layers = await layer_server(ids["server"], inner, keep_on_eof=True)
    try:
        r, w = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ids["client"].client_context, server_hostname="x"
        )
        w.write(b"hello")
        await w.drain()
        while not inner or bytes(inner[0].data) != b"hello":
            await asyncio.sleep(0.01)
        layers[0].write(b"bye")
        layers[0].close()  # close_notify, then FIN
        assert await asyncio.wait_for(r.read(), 5) == b"bye"
        w.close()
    finally:
        server.close()


async def test_peer_close_notify_is_eof_for_the_inner_protocol(
    ids: dict[str, WorkloadIdentity],
) -> None:
    inner: list[Recorder] = []
    server, port, _ = await layer_server(ids["server"], inner, keep_on_eof=True)
    try:
        _r, w = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ids["client"].client_context, server_hostname="x"
        )
        w.write(b"x")
        await w.drain()
        w.close()  # the loop's TLS transport sends close_notify
        await asyncio.wait_for(inner[0].eof, 5)
        assert bytes(inner[0].data) == b"x"
    finally:
        server.close()


async def test_handshake_failure_resolves_the_future_and_never_connects_inner(
    ids: dict[str, WorkloadIdentity],
) -> None:
    inner: list[Recorder] = []
    server, port, layers = await layer_server(ids["server"], inner)
    try:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await layer_client(ids["stranger"], port)  # another CA: both sides refuse
        for _ in range(100):
            if layers and layers[0].handshake.done():
                break
            await asyncio.sleep(0.01)
        assert layers[0].handshake.done() and layers[0].handshake.exception() is not None
        assert inner[0].transport is None  # the app side never saw a connection
    finally:
        server.close()


async def test_session_resumption_with_session_argument(
    ids: dict[str, WorkloadIdentity],
) -> None:
    inner: list[Recorder] = []
    server, port, _ = await layer_server(ids["server"], inner, echo=True)
    try:
        layer, r = await layer_client(ids["client"], port)
        layer.write(b"ping")  # the TLS 1.3 ticket arrives with the first reply
        while bytes(r.data) != b"ping":
            await asyncio.sleep(0.01)
        session = layer.ssl_object.session
        layer.close()
        layer2, r2 = await layer_client(ids["client"], port, session=session)
        assert layer2.ssl_object.session_reused
        layer2.write(b"again")
        while bytes(r2.data) != b"again":
            await asyncio.sleep(0.01)
        layer2.close()
    finally:
        server.close()


async def test_tls_error_reaches_connection_lost(ids: dict[str, WorkloadIdentity]) -> None:
    """Garbage after the handshake is a TLS error: the inner protocol is told with it."""
    inner: list[Recorder] = []
    server, port, layers = await layer_server(ids["server"], inner)
    try:
        layer, _ = await layer_client(ids["client"], port)
        while not layers or not layers[0].handshake.done():
            await asyncio.sleep(0.01)
        raw = layer._raw  # the plain TCP transport underneath
        assert raw is not None
        raw.write(b"\x17\x03\x03\x00\x05garbage")  # an application record that cannot decrypt
        exc = await asyncio.wait_for(inner[0].lost, 5)
        assert isinstance(exc, ssl.SSLError)
    finally:
        server.close()


async def test_writes_after_close_are_dropped_and_flow_control_passes_through(
    ids: dict[str, WorkloadIdentity],
) -> None:
    inner: list[Recorder] = []
    server, port, _ = await layer_server(ids["server"], inner)
    try:
        layer, _ = await layer_client(ids["client"], port)
        layer.set_write_buffer_limits(1024, 512)
        layer.pause_reading()
        assert not layer.is_reading()
        layer.resume_reading()
        assert layer.is_reading()
        assert layer.get_write_buffer_size() >= 0
        assert layer.get_extra_info("peername")[0] == "127.0.0.1"
        layer.close()
        assert layer.is_closing()
        layer.write(b"late")  # ignored, no exception
    finally:
        server.close()


def test_read_size_fits_one_record() -> None:
    assert READ_SIZE >= 16 * 1024  # the largest TLS record's plaintext
    assert READ_SIZE < 128 * 1024  # below glibc's mmap threshold: cheap to allocate


def test_layer_module_has_no_socket_needs(tmp_path: Path) -> None:
    """Constructing a layer needs no running transport (the handshake starts on connect)."""

    async def build() -> TlsLayer:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return TlsLayer(ctx, asyncio.Protocol(), server_side=False, server_hostname="h")

    layer = asyncio.run(build())
    assert not layer.handshake.done() and "handshaking" in repr(layer)


class FakeRaw:
    """A plain transport stand-in: collects writes, records aborts and closes."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.aborted = False
        self.closed = False

    def write(self, data: bytes) -> None:
        self.out += data

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.aborted or self.closed

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def _pair(
    ids: dict[str, WorkloadIdentity], inner: asyncio.Protocol
) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO, TlsLayer, FakeRaw]:
    """A client SSLObject (memory BIOs) and a server TlsLayer on a FakeRaw, handshake pending."""
    ci, co = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ids["client"].client_context.wrap_bio(ci, co, server_hostname="x")
    layer = TlsLayer(ids["server"].server_context, inner, server_side=True)
    raw = FakeRaw()
    layer.connection_made(raw)  # type: ignore[arg-type]
    return client, ci, co, layer, raw


def _client_handshake(
    client: ssl.SSLObject,
    ci: ssl.MemoryBIO,
    co: ssl.MemoryBIO,
    layer: TlsLayer,
    raw: FakeRaw,
    then: bytes = b"",
) -> None:
    """Drive the handshake; the client's last flight goes with ``then`` in one segment."""
    for _ in range(5):
        try:
            client.do_handshake()
            break
        except ssl.SSLWantReadError:
            layer.data_received(co.read())
            ci.write(bytes(raw.out))
            raw.out.clear()
    if then:
        client.write(then)
    layer.data_received(co.read())


async def test_no_data_reaches_an_inner_protocol_that_aborted_in_connection_made(
    ids: dict[str, WorkloadIdentity],
) -> None:
    class Refuses(Recorder):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            transport.abort()

    inner = Refuses()
    client, ci, co, layer, raw = _pair(ids, inner)
    _client_handshake(client, ci, co, layer, raw, then=b"GET / HTTP/1.1\r\n\r\n")
    assert layer.handshake.done() and raw.aborted
    assert bytes(inner.data) == b""  # the request in the same segment was not delivered


async def test_finished_and_data_in_one_segment_are_delivered(
    ids: dict[str, WorkloadIdentity],
) -> None:
    inner = Recorder()
    client, ci, co, layer, raw = _pair(ids, inner)
    _client_handshake(client, ci, co, layer, raw, then=b"hello")
    assert bytes(inner.data) == b"hello"


async def test_close_notify_then_fin_is_one_eof(ids: dict[str, WorkloadIdentity]) -> None:
    calls = []

    class CountsEof(Recorder):
        def eof_received(self) -> bool:
            calls.append(1)
            return True

    inner = CountsEof()
    client, ci, co, layer, raw = _pair(ids, inner)
    _client_handshake(client, ci, co, layer, raw)
    try:
        client.unwrap()
    except ssl.SSLWantReadError:
        pass
    layer.data_received(co.read())  # close_notify
    assert layer.eof_received() is True  # then the FIN
    assert calls == [1]


async def test_write_eof_sends_close_notify_and_stops_writes(
    ids: dict[str, WorkloadIdentity],
) -> None:
    inner = Recorder()
    client, ci, co, layer, raw = _pair(ids, inner)
    _client_handshake(client, ci, co, layer, raw)
    ci.write(bytes(raw.out))  # the session tickets sent after the handshake
    raw.out.clear()
    layer.write(b"431 answer")
    layer.write_eof()
    sent = bytes(raw.out)
    layer.write(b"late")
    assert bytes(raw.out) == sent and raw.closed
    ci.write(sent)
    assert client.read(100) == b"431 answer"
    assert client.read(100) == b""  # close_notify: the end of the stream


async def test_pause_writing_during_the_handshake_reaches_the_inner_protocol(
    ids: dict[str, WorkloadIdentity],
) -> None:
    events: list[str] = []

    class Flow(Recorder):
        def pause_writing(self) -> None:
            events.append("pause")

        def resume_writing(self) -> None:
            events.append("resume")

    inner = Flow()
    client, ci, co, layer, raw = _pair(ids, inner)
    layer.pause_writing()  # the plain transport filled up before the inner protocol existed
    assert events == []
    _client_handshake(client, ci, co, layer, raw)
    assert inner.transport is layer and events == ["pause"]
    layer.resume_writing()
    assert events == ["pause", "resume"]
