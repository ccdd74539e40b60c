"""The proxy's certificate client against a real signing endpoint on 127.0.0.1.

The pure parts (backoff, URL, settings errors) need no socket; the rest runs
:class:`meshproxy.certclient.CertificateClient` against the control plane's real
:class:`control.signing.Signer` served by aiohttp on port 0, plain and over TLS.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path

import pytest
from aiohttp import web

from certs.ca import CA, init_ca, issue
from certs.token import load_token_key, make_token
from control.protocol import CERTIFICATES_PATH
from control.signing import ServingCert, Signer
from meshproxy.certclient import (
    CertClientError,
    CertificateClient,
    backoff_delay,
    certificates_url,
    control_plane_context,
)
from meshproxy.tls import IdentityStore, WorkloadIdentity

TD = "cluster.local"
ID = "spiffe://cluster.local/ns/shop/sa/cart"


@pytest.fixture
def ca(tmp_path: Path) -> CA:
    return init_ca(tmp_path / "ca", TD)


@pytest.fixture
def token(ca: CA) -> str:
    return make_token(load_token_key(ca.directory), TD, "shop", "cart")


# --------------------------------------------------------------------------- pure


def test_backoff_doubles_to_the_cap_with_jitter_in_the_upper_half() -> None:
    assert backoff_delay(1, 0.0) == 0.5
    assert backoff_delay(1, 0.999) == pytest.approx(1.0, abs=1e-3)
    assert backoff_delay(2, 0.0) == 1.0
    assert backoff_delay(3, 1.0) == 4.0
    assert backoff_delay(6, 0.0) == 15.0  # 32 capped at 30, halved
    assert backoff_delay(6, 1.0) == 30.0
    assert backoff_delay(10_000, 1.0) == 30.0  # no overflow
    assert backoff_delay(2, 0.5, base=0.1, cap=0.15) == pytest.approx(0.1125)


@pytest.mark.parametrize(
    ("given", "url"),
    [
        ("http://127.0.0.1:15010", "http://127.0.0.1:15010/v1/certificates"),
        ("https://cp:15012/", "https://cp:15012/v1/certificates"),
        ("ws://[::1]:80/v1/stream", "http://[::1]:80/v1/certificates"),
        ("WSS://cp.example:443", "https://cp.example:443/v1/certificates"),
    ],
)
def test_certificates_url(given: str, url: str) -> None:
    assert certificates_url(given) == url


@pytest.mark.parametrize("bad", ["ftp://x", "127.0.0.1:15010", "http://", "http://h:port"])
def test_certificates_url_errors(bad: str) -> None:
    with pytest.raises(CertClientError, match="--control-plane"):
        certificates_url(bad)


def test_bad_token_is_a_settings_error() -> None:
    store = IdentityStore(None)
    with pytest.raises(CertClientError, match="bootstrap token: malformed token"):
        CertificateClient("http://127.0.0.1:1", "nonsense", None, store)
    with pytest.raises(CertClientError, match="bootstrap token"):
        CertificateClient("http://127.0.0.1:1", "mpt1.e30.AAAA", None, store)


def test_token_names_the_identity_asked_for(token: str) -> None:
    client = CertificateClient("http://127.0.0.1:1", f" {token}\n", None, IdentityStore(None))
    assert client.spiffe_id.uri == ID
    assert client.view()["spiffe_id"] == ID
    assert client.view()["serial"] is None
    assert not client.ready


def test_control_plane_context_errors(tmp_path: Path) -> None:
    with pytest.raises(CertClientError, match=r"--control-plane-ca .*nope\.pem: no such file"):
        control_plane_context(tmp_path / "nope.pem")
    (tmp_path / "empty.pem").write_text("hello\n")
    with pytest.raises(CertClientError, match="no PEM certificate"):
        control_plane_context(tmp_path / "empty.pem")
    (tmp_path / "bad.pem").write_text(
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    )
    with pytest.raises(CertClientError, match="not usable"):
        control_plane_context(tmp_path / "bad.pem")


def test_control_plane_context_verifies_chain_and_hostname(ca: CA) -> None:
    ctx = control_plane_context(ca.directory / "ca.pem")
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname


# --------------------------------------------------------------------------- real sockets


class ControlPlane:
    """The signing endpoint on 127.0.0.1:0; ``failing`` makes it answer 500 meanwhile."""

    def __init__(self, signer: Signer) -> None:
        self.signer = signer
        self.failing = False
        self.calls = 0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.calls += 1
        if self.failing:
            return web.json_response({"error": "down for a test"}, status=500)
        return await self.signer.handle(request)

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> str:
        app = web.Application()
        app.router.add_post(CERTIFICATES_PATH, self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def control_planes() -> AsyncIterator[Callable[..., Awaitable[ControlPlane]]]:
    made: list[ControlPlane] = []

    async def make(signer: Signer, ssl_context: ssl.SSLContext | None = None) -> ControlPlane:
        cp = ControlPlane(signer)
        made.append(cp)
        await cp.start(ssl_context)
        return cp

    yield make
    for cp in made:
        await cp.stop()


@pytest.fixture
async def running() -> AsyncIterator[Callable[[CertificateClient], asyncio.Task[None]]]:
    tasks: list[asyncio.Task[None]] = []

    def start(client: CertificateClient) -> asyncio.Task[None]:
        t = asyncio.create_task(client.run())
        tasks.append(t)
        return t

    yield start
    for t in tasks:
        t.cancel()
    for t in tasks:
        with pytest.raises(asyncio.CancelledError):
            await t


async def until(cond: Callable[[], bool], timeout: float, what: object) -> float:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    while not cond():
        assert loop.time() - t0 < timeout, what
        await asyncio.sleep(0.02)
    return loop.time() - t0


async def test_obtains_its_certificate_over_tls(
    ca: CA,
    token: str,
    control_planes: Callable[..., Awaitable[ControlPlane]],
    running: Callable[[CertificateClient], asyncio.Task[None]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    cp = await control_planes(
        Signer.load(ca.directory), ServingCert(ca, ["127.0.0.1"], timedelta(hours=1)).context
    )
    store = IdentityStore(None)
    seen: list[tuple[WorkloadIdentity | None, WorkloadIdentity]] = []
    store.subscribe(lambda old, new: seen.append((old, new)))
    client = CertificateClient(cp.url, token, control_plane_context(ca.directory / "ca.pem"), store)
    with caplog.at_level(logging.INFO, logger="meshproxy.certclient"):
        running(client)
        ident = await asyncio.wait_for(client.first(), 10)
    assert ident is store.current
    assert ident.spiffe_id == ID
    assert ident.source.startswith("certificate from https://127.0.0.1:")
    assert ident.view()["source"] == ident.source
    assert seen == [(None, ident)]
    assert client.renewals_ok == 1 and client.renewals_failed == 0
    assert cp.signer.signed == 1
    assert client.ready
    view = client.view()
    assert view["serial"] == format(ident.serial, "x")
    assert view["last_error"] is None
    assert client.next_renewal is not None
    # default TTL 24 h: renewal about 12 h from now
    left = (client.next_renewal - ident.not_after).total_seconds()
    assert -12 * 3600 - 60 < left < -12 * 3600 + 60
    line = next(r.getMessage() for r in caplog.records if "obtained" in r.getMessage())
    assert format(ident.serial, "x") in line and ident.not_after.isoformat() in line
    # the identity works as a TLS identity: its server context presents a mesh certificate
    assert isinstance(ident.server_context, ssl.SSLContext)


async def test_renews_at_half_life_with_a_new_key(
    ca: CA,
    token: str,
    control_planes: Callable[..., Awaitable[ControlPlane]],
    running: Callable[[CertificateClient], asyncio.Task[None]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    cp = await control_planes(Signer.load(ca.directory, timedelta(seconds=4)))
    store = IdentityStore(None)
    seen: list[tuple[WorkloadIdentity | None, WorkloadIdentity]] = []
    store.subscribe(lambda old, new: seen.append((old, new)))
    client = CertificateClient(cp.url, token, None, store)
    with caplog.at_level(logging.INFO, logger="meshproxy.certclient"):
        running(client)
        first = await asyncio.wait_for(client.first(), 10)
        elapsed = await until(lambda: store.generation >= 2, 6, client)
    second = store.current
    assert second is not None and second is not first
    assert 1.2 < elapsed < 3.5, elapsed  # ~2 s: half of 4 s
    assert second.serial != first.serial
    assert second.fingerprint != first.fingerprint
    assert second.spiffe_id == ID
    assert seen[1] == (first, second)
    assert client.renewals_ok >= 2
    renewed = [r.getMessage() for r in caplog.records if "renewed" in r.getMessage()]
    assert renewed and format(second.serial, "x") in renewed[0]
    assert f"was serial {first.serial:x}" in renewed[0]


async def test_failure_retries_with_backoff_and_keeps_the_identity(
    ca: CA,
    token: str,
    control_planes: Callable[..., Awaitable[ControlPlane]],
    running: Callable[[CertificateClient], asyncio.Task[None]],
) -> None:
    cp = await control_planes(Signer.load(ca.directory, timedelta(seconds=2)))
    store = IdentityStore(None)
    client = CertificateClient(
        cp.url, token, None, store, backoff_base=0.05, backoff_cap=0.2, rand=lambda: 0.0
    )
    running(client)
    first = await asyncio.wait_for(client.first(), 10)
    cp.failing = True
    await until(lambda: client.renewals_failed >= 3, 5, client)
    assert store.current is first  # still live through the failures
    assert store.generation == 1
    assert client.last_error is not None and "500" in client.last_error
    assert "down for a test" in client.last_error
    cp.failing = False
    await until(lambda: store.generation >= 2, 5, client)
    assert store.current is not None and store.current.serial != first.serial
    assert client.last_error is None


async def test_control_plane_down_then_up(
    ca: CA,
    token: str,
    running: Callable[[CertificateClient], asyncio.Task[None]],
) -> None:
    # a port nothing listens on: bind, note, close
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    store = IdentityStore(None)
    client = CertificateClient(
        f"http://127.0.0.1:{port}", token, None, store, backoff_base=0.05, backoff_cap=0.1
    )
    running(client)
    await until(lambda: client.renewals_failed >= 2, 5, client)
    assert store.current is None and not client.ready
    assert client.last_error is not None and f"127.0.0.1:{port}" in client.last_error
    # the control plane comes up on that port: the next retry succeeds
    cp = ControlPlane(Signer.load(ca.directory))
    app = web.Application()
    app.router.add_post(CERTIFICATES_PATH, cp.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        ident = await asyncio.wait_for(client.first(), 5)
        assert ident.spiffe_id == ID
    finally:
        await runner.cleanup()


async def test_a_control_plane_of_another_ca_is_refused(
    ca: CA,
    token: str,
    tmp_path: Path,
    control_planes: Callable[..., Awaitable[ControlPlane]],
    running: Callable[[CertificateClient], asyncio.Task[None]],
) -> None:
    impostor = init_ca(tmp_path / "impostor", TD)
    cp = await control_planes(
        Signer.load(impostor.directory), ServingCert(impostor, ["127.0.0.1"]).context
    )
    store = IdentityStore(None)
    client = CertificateClient(
        cp.url,
        token,
        control_plane_context(ca.directory / "ca.pem"),
        store,
        backoff_base=0.05,
        backoff_cap=0.1,
    )
    running(client)
    await until(lambda: client.renewals_failed >= 2, 5, client)
    assert store.current is None
    assert client.last_error is not None and "not trusted" in client.last_error
    assert cp.calls == 0  # the request never reached it: the token was not disclosed


async def test_a_refused_token_is_retried_and_reported(
    ca: CA,
    control_planes: Callable[..., Awaitable[ControlPlane]],
    running: Callable[[CertificateClient], asyncio.Task[None]],
) -> None:
    cp = await control_planes(Signer.load(ca.directory))
    forged = make_token(b"z" * 32, TD, "shop", "cart")
    client = CertificateClient(
        cp.url, forged, None, IdentityStore(None), backoff_base=0.05, backoff_cap=0.1
    )
    running(client)
    await until(lambda: client.renewals_failed >= 2, 5, client)
    assert client.last_error is not None
    assert "403" in client.last_error and "token" in client.last_error
    assert cp.signer.signed == 0 and cp.signer.refused >= 2


async def test_a_wrong_answer_is_never_published(
    ca: CA,
    token: str,
    running: Callable[[CertificateClient], asyncio.Task[None]],
) -> None:
    """A server answering with a certificate for another key and identity (a confused or
    hostile control plane): checked like --cert-dir files, refused, nothing published."""
    other = issue(ca, "spiffe://cluster.local/ns/shop/sa/admin", timedelta(hours=1))

    async def wrong(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"cert": other.cert_pem.decode(), "ca": other.ca_pem.decode()})

    async def garbage(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"certificate": "x"})

    for handler, expect in ((wrong, "does not match"), (garbage, "answer is not")):
        app = web.Application()
        app.router.add_post(CERTIFICATES_PATH, handler)
        runner = web.AppRunner(app)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            port = runner.addresses[0][1]
            store = IdentityStore(None)
            client = CertificateClient(
                f"http://127.0.0.1:{port}", token, None, store, backoff_base=0.05
            )
            task = running(client)
            await until(lambda c=client: c.renewals_failed >= 1, 5, client)  # type: ignore[misc]
            assert store.current is None
            assert client.last_error is not None and expect in client.last_error, client.last_error
            task.cancel()
        finally:
            await runner.cleanup()


async def test_renewal_after_the_token_expired_uses_the_current_certificate(
    ca: CA,
    control_planes: Callable[..., Awaitable[ControlPlane]],
    running: Callable[[CertificateClient], asyncio.Task[None]],
) -> None:
    """A 1 s token, 4 s certificates: the renewal at ~2 s happens after the token expired and
    succeeds over TLS because the client presents the certificate it renews; over plain HTTP
    (no client certificate possible) the same renewal is refused."""
    key = load_token_key(ca.directory)
    for tls in (True, False):
        token = make_token(key, TD, "shop", "cart", timedelta(seconds=1))
        signer = Signer.load(ca.directory, timedelta(seconds=4))
        serving = ServingCert(ca, ["127.0.0.1"], timedelta(hours=1)).context if tls else None
        cp = await control_planes(signer, serving)
        store = IdentityStore(None)
        ctx = control_plane_context(ca.directory / "ca.pem") if tls else None
        client = CertificateClient(cp.url, token, ctx, store, backoff_base=0.1, backoff_cap=0.2)
        task = running(client)
        first = await asyncio.wait_for(client.first(), 5)
        if tls:
            await until(lambda s=store: s.generation >= 2, 6, client)  # type: ignore[misc]
            assert store.current is not None and store.current.serial != first.serial
            assert signer.refused == 0 and signer.signed == 2
        else:
            await until(lambda c=client: c.renewals_failed >= 1, 6, client)  # type: ignore[misc]
            assert store.current is first
            assert client.last_error is not None and "token expired" in client.last_error
        task.cancel()
