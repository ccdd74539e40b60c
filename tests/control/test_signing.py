"""The control plane's signing endpoint and its own TLS certificate.

The decision (:func:`control.signing.decide`) is tested without a socket or loop; the endpoint
through a real aiohttp server on 127.0.0.1 (port 0), over plain HTTP and over TLS with the
control plane's serving certificate.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store

from certs.ca import CA, generate_key, init_ca, load_ca, make_csr
from certs.spiffe import CAError
from certs.token import load_token_key, make_token
from control.protocol import CERTIFICATES_PATH
from control.signing import (
    MAX_BODY_BYTES,
    BadRequest,
    Refused,
    ServingCert,
    Signer,
    Unavailable,
    control_plane_spiffe_id,
    decide,
    parse_request,
    serving_context,
    serving_hosts,
)
from meshproxy.certclient import control_plane_context

TD = "cluster.local"
ID = "spiffe://cluster.local/ns/shop/sa/cart"
OTHER = "spiffe://cluster.local/ns/shop/sa/admin"


@pytest.fixture
def ca(tmp_path: Path) -> CA:
    return init_ca(tmp_path / "ca", TD)


@pytest.fixture
def token_key(ca: CA) -> bytes:
    return load_token_key(ca.directory)


@pytest.fixture
def token(token_key: bytes) -> str:
    return make_token(token_key, TD, "shop", "cart")


def csr_for(spiffe_id: str) -> str:
    return make_csr(generate_key(), spiffe_id).decode()


def verify_chain(root_pem: bytes, chain_pem: bytes) -> x509.Certificate:
    """The leaf of ``chain_pem`` after full path validation to ``root_pem``."""
    root = x509.load_pem_x509_certificate(root_pem)
    chain = x509.load_pem_x509_certificates(chain_pem)
    verifier = PolicyBuilder().store(Store([root])).build_client_verifier()
    verified = verifier.verify(chain[0], chain[1:])
    assert verified.chain[-1] == root
    return chain[0]


def sans(cert: x509.Certificate) -> list[x509.GeneralName]:
    return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)


# --------------------------------------------------------------------------- decide (pure)


def test_decide_signs_the_entitled_identity(ca: CA, token_key: bytes, token: str) -> None:
    now = datetime.now(UTC)
    signed = decide(ca, token_key, csr_for(ID), token, timedelta(hours=1), now)
    leaf = verify_chain(signed.ca_pem, signed.cert_pem)
    assert sans(leaf) == [x509.UniformResourceIdentifier(ID)]
    assert signed.spiffe_id == ID
    assert signed.serial == leaf.serial_number
    assert signed.not_after == leaf.not_valid_after_utc
    assert abs((leaf.not_valid_after_utc - now) - timedelta(hours=1)) < timedelta(seconds=1)
    assert signed.ca_pem == ca.root_pem


def test_decide_with_an_intermediate_returns_the_chain(tmp_path: Path) -> None:
    ca = init_ca(tmp_path / "ica", TD, intermediate=True)
    key = load_token_key(ca.directory)
    tok = make_token(key, TD, "shop", "cart")
    signed = decide(ca, key, csr_for(ID), tok, timedelta(hours=1), datetime.now(UTC))
    assert len(x509.load_pem_x509_certificates(signed.cert_pem)) == 2
    verify_chain(signed.ca_pem, signed.cert_pem)


def test_decide_refuses_a_csr_for_another_identity(ca: CA, token_key: bytes, token: str) -> None:
    with pytest.raises(Refused) as exc:
        decide(ca, token_key, csr_for(OTHER), token, timedelta(hours=1), datetime.now(UTC))
    assert exc.value.claimed == ID
    assert exc.value.asked == OTHER
    assert ID in exc.value.reason


def test_decide_refuses_a_csr_with_an_extra_name(ca: CA, token_key: bytes, token: str) -> None:
    from cryptography.hazmat.primitives import hashes, serialization

    key = generate_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(ID), x509.DNSName("evil.example")]
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
        .decode()
    )
    with pytest.raises(Refused) as exc:
        decide(ca, token_key, csr, token, timedelta(hours=1), datetime.now(UTC))
    assert "evil.example" in exc.value.asked


@pytest.mark.parametrize("kind", ["expired", "forged", "other-key", "other-td", "garbage"])
def test_decide_refuses_bad_tokens(ca: CA, token_key: bytes, kind: str) -> None:
    now = datetime.now(UTC)
    if kind == "expired":
        tok = make_token(token_key, TD, "shop", "cart", timedelta(seconds=10), now=0)
    elif kind == "forged":
        good = make_token(token_key, TD, "shop", "cart")
        tok = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")
    elif kind == "other-key":
        tok = make_token(b"x" * 32, TD, "shop", "cart")
    elif kind == "other-td":
        tok = make_token(token_key, "other.td", "shop", "cart")
    else:
        tok = "not a token"
    with pytest.raises(Refused) as exc:
        decide(ca, token_key, csr_for(ID), tok, timedelta(hours=1), now)
    assert exc.value.reason.startswith("token refused: ")
    if kind == "garbage":
        assert exc.value.claimed == "an unreadable token"
    else:
        assert exc.value.claimed.endswith("(unverified)")
    assert exc.value.asked == ID


def test_decide_refuses_an_unparsable_csr(ca: CA, token_key: bytes, token: str) -> None:
    with pytest.raises(Refused) as exc:
        decide(ca, token_key, "hello", token, timedelta(hours=1), datetime.now(UTC))
    assert exc.value.asked == "an unparsable CSR"


def test_decide_clamps_the_ttl_to_the_ca(ca: CA, token_key: bytes) -> None:
    end = ca.signer.not_valid_after_utc
    now = end - timedelta(hours=2)
    tok = make_token(token_key, TD, "shop", "cart", now=now.timestamp())
    signed = decide(ca, token_key, csr_for(ID), tok, timedelta(hours=24), now)
    assert signed.not_after == end


def test_decide_with_an_expired_ca_is_unavailable(ca: CA, token_key: bytes) -> None:
    now = ca.signer.not_valid_after_utc + timedelta(seconds=1)
    tok = make_token(token_key, TD, "shop", "cart", now=now.timestamp())
    with pytest.raises(Unavailable, match="expired"):
        decide(ca, token_key, csr_for(ID), tok, timedelta(hours=1), now)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1]", "JSON object"),
        (b'{"token": "t"}', "missing field 'csr'"),
        (b'{"csr": "c"}', "missing field 'token'"),
        (b'{"csr": 1, "token": "t"}', "'csr' must be a non-empty string"),
        (b'{"csr": "c", "token": ""}', "'token' must be a non-empty string"),
    ],
)
def test_parse_request_errors(body: bytes, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        parse_request(body)


def test_parse_request_ok() -> None:
    assert parse_request(b'{"csr": "C", "token": "T", "extra": 1}') == ("C", "T")


def test_load_errors_name_the_directory(tmp_path: Path, ca: CA) -> None:
    with pytest.raises(CAError, match="no such CA directory"):
        Signer.load(tmp_path / "nope")
    (ca.directory / "token.key").unlink()
    with pytest.raises(CAError, match=r"token\.key: no such file"):
        Signer.load(ca.directory)
    with pytest.raises(CAError, match="greater than zero"):
        Signer(ca, b"k" * 32, timedelta(0))


def test_load_reads_the_ca(ca: CA) -> None:
    signer = Signer.load(ca.directory, timedelta(hours=2))
    assert signer.ca.trust_domain == TD
    assert signer.ttl == timedelta(hours=2)
    assert "signed=0" in repr(signer)


# --------------------------------------------------------------------------- the endpoint


Serve = Callable[..., Awaitable[str]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """``await serve(signer, ssl_context=None)`` -> base URL of a real server on 127.0.0.1:0."""
    runners: list[web.AppRunner] = []

    async def start(signer: Signer, ssl_context: ssl.SSLContext | None = None) -> str:
        app = web.Application()
        app.router.add_post(CERTIFICATES_PATH, signer.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        port = runner.addresses[0][1]
        return f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}"

    yield start
    for r in runners:
        await r.cleanup()


async def post(
    url: str, data: bytes | None = None, *, json_body: object = None, **kw: object
) -> tuple[int, dict[str, object], aiohttp.typedefs.LooseHeaders]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(url + CERTIFICATES_PATH, data=data, json=json_body, **kw) as r,  # type: ignore[arg-type]
    ):
        return r.status, json.loads(await r.read()), r.headers


async def test_http_signs_the_entitled_identity(ca: CA, token: str, serve: Serve) -> None:
    signer = Signer.load(ca.directory, timedelta(hours=1))
    url = await serve(signer)
    status, doc, _ = await post(url, json_body={"csr": csr_for(ID), "token": token})
    assert status == 200, doc
    assert set(doc) == {"cert", "ca"}
    assert isinstance(doc["cert"], str) and isinstance(doc["ca"], str)
    leaf = verify_chain(doc["ca"].encode(), doc["cert"].encode())
    assert sans(leaf) == [x509.UniformResourceIdentifier(ID)]
    assert doc["ca"].encode() == ca.root_pem
    assert (signer.signed, signer.refused, signer.bad_requests) == (1, 0, 0)


async def test_http_refuses_a_foreign_identity_and_logs_without_the_token(
    ca: CA, token: str, serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    signer = Signer.load(ca.directory)
    url = await serve(signer)
    with caplog.at_level(logging.WARNING, logger="control.signing"):
        status, doc, _ = await post(url, json_body={"csr": csr_for(OTHER), "token": token})
    assert status == 403
    assert OTHER in str(doc["error"])
    assert (signer.signed, signer.refused) == (0, 1)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    line = warnings[0].getMessage()
    assert ID in line and OTHER in line
    assert token not in caplog.text
    assert token.split(".")[2] not in caplog.text


@pytest.mark.parametrize("kind", ["expired", "forged"])
async def test_http_refuses_bad_tokens(
    ca: CA, token_key: bytes, serve: Serve, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    signer = Signer.load(ca.directory)
    url = await serve(signer)
    if kind == "expired":
        tok = make_token(token_key, TD, "shop", "cart", timedelta(seconds=5), now=1_000_000)
    else:
        tok = make_token(b"f" * 32, TD, "shop", "cart")
    with caplog.at_level(logging.WARNING, logger="control.signing"):
        status, doc, _ = await post(url, json_body={"csr": csr_for(ID), "token": tok})
    assert status == 403
    assert "token" in str(doc["error"])
    assert (signer.signed, signer.refused) == (0, 1)
    assert tok not in caplog.text


@pytest.mark.parametrize(
    "body", [b"{not json", b"[]", b'{"csr": "x"}', b'{"token": "x"}', b'{"csr": 3, "token": "t"}']
)
async def test_http_malformed_is_400(ca: CA, serve: Serve, body: bytes) -> None:
    signer = Signer.load(ca.directory)
    url = await serve(signer)
    status, doc, _ = await post(url, body, headers={"Content-Type": "application/json"})
    assert status == 400
    assert isinstance(doc["error"], str) and doc["error"]
    assert (signer.signed, signer.refused, signer.bad_requests) == (0, 0, 1)


async def test_http_body_over_64k_is_413(ca: CA, token: str, serve: Serve) -> None:
    signer = Signer.load(ca.directory)
    url = await serve(signer)
    big = json.dumps({"csr": "x" * MAX_BODY_BYTES, "token": token}).encode()
    status, _, _ = await post(url, big)
    assert status == 413

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
        for i in range(0, len(big), 4096):
            yield big[i : i + 4096]

    status, _, _ = await post(url, chunks())  # type: ignore[arg-type]
    assert status == 413
    assert signer.signed == 0 and signer.bad_requests == 2
    # just under the cap is read whole (and refused for what it says, not for its size)
    small = json.dumps({"csr": "x" * (MAX_BODY_BYTES - 1000), "token": token}).encode()
    status, _, _ = await post(url, small)
    assert status == 403


async def test_http_busy_is_503_with_retry_after(
    ca: CA, token_key: bytes, token: str, serve: Serve
) -> None:
    signer = Signer(load_ca(ca.directory), token_key, max_inflight=0)
    url = await serve(signer)
    status, _, headers = await post(url, json_body={"csr": csr_for(ID), "token": token})
    assert status == 503
    assert headers["Retry-After"] == "1"  # type: ignore[index]
    assert signer.signed == 0


async def test_http_concurrent_requests_each_get_their_own_certificate(
    ca: CA, token_key: bytes, serve: Serve
) -> None:
    signer = Signer.load(ca.directory)
    url = await serve(signer)
    names = [f"w{i}" for i in range(8)]
    results = await asyncio.gather(
        *(
            post(
                url,
                json_body={
                    "csr": csr_for(f"spiffe://{TD}/ns/shop/sa/{n}"),
                    "token": make_token(token_key, TD, "shop", n),
                },
            )
            for n in names
        )
    )
    for n, (status, doc, _) in zip(names, results, strict=True):
        assert status == 200
        leaf = verify_chain(ca.root_pem, str(doc["cert"]).encode())
        assert sans(leaf) == [x509.UniformResourceIdentifier(f"spiffe://{TD}/ns/shop/sa/{n}")]
    assert signer.signed == 8 and signer.inflight == 0


# --------------------------------------------------------------------------- serving TLS


def test_serving_cert_names(ca: CA) -> None:
    hosts = serving_hosts("0.0.0.0", "cp.mesh.example")
    assert hosts == ["0.0.0.0", "cp.mesh.example", "localhost", "127.0.0.1", "::1"]
    sc = ServingCert(ca, hosts, timedelta(hours=1))
    leaf = x509.load_pem_x509_certificate(_peer_pem_offline(sc))
    names = sans(leaf)
    assert names[0] == x509.UniformResourceIdentifier(control_plane_spiffe_id(ca))
    assert control_plane_spiffe_id(ca) == f"spiffe://{TD}/ns/istio-system/sa/meshproxy-control"
    assert x509.DNSName("cp.mesh.example") in names
    assert x509.DNSName("localhost") in names
    assert any(isinstance(n, x509.IPAddress) and str(n.value) == "::1" for n in names)
    # 0.0.0.0 is where it listens, not a name anyone connects to
    assert not any(isinstance(n, x509.IPAddress) and str(n.value) == "0.0.0.0" for n in names)
    verify_chain(ca.root_pem, _peer_pem_offline(sc))


def _peer_pem_offline(sc: ServingCert) -> bytes:
    """The certificate ``sc.context`` presents, via an in-memory handshake."""
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    cli = client.wrap_bio(c_in, c_out, server_hostname="localhost")
    srv = sc.context.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for obj in (cli, srv):
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    der = cli.getpeercert(binary_form=True)
    assert der is not None
    return ssl.DER_cert_to_PEM_cert(der).encode()


def test_serving_cert_refuses_a_bad_host(ca: CA) -> None:
    with pytest.raises(CAError, match="neither an IP address nor a DNS name"):
        ServingCert(ca, ["bad host!"], timedelta(hours=1))


def test_serving_context_lasts_as_long_as_allowed(ca: CA) -> None:
    ctx = serving_context(ca, ["localhost"])
    assert isinstance(ctx, ssl.SSLContext)
    sc = ServingCert(ca, ["localhost"], timedelta(days=100_000))  # clamped to the CA
    assert sc.not_after == ca.signer.not_valid_after_utc


async def test_https_verified_with_the_mesh_root(ca: CA, token: str, serve: Serve) -> None:
    signer = Signer.load(ca.directory)
    sc = ServingCert(ca, serving_hosts("127.0.0.1"))
    url = await serve(signer, sc.context)
    client_ctx = control_plane_context(ca.directory / "ca.pem")
    status, _, _ = await post(url, json_body={"csr": csr_for(ID), "token": token}, ssl=client_ctx)
    assert status == 200
    # by name as well as by address
    status, _, _ = await post(
        url.replace("127.0.0.1", "localhost"),
        json_body={"csr": csr_for(ID), "token": token},
        ssl=client_ctx,
    )
    assert status == 200


async def test_https_client_of_another_ca_refuses(
    ca: CA, token: str, serve: Serve, tmp_path: Path
) -> None:
    other = init_ca(tmp_path / "other", TD)
    signer = Signer.load(ca.directory)
    url = await serve(signer, ServingCert(ca, ["127.0.0.1"]).context)
    wrong = control_plane_context(other.directory / "ca.pem")
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        await post(url, json_body={"csr": csr_for(ID), "token": token}, ssl=wrong)
    assert signer.signed == 0


async def test_https_hostname_not_in_the_certificate_is_refused(
    ca: CA, token: str, serve: Serve
) -> None:
    signer = Signer.load(ca.directory)
    # a certificate for another name only: the mesh chain alone is not enough
    sc = ServingCert(ca, ["cp.example"], timedelta(hours=1))
    sc_ctx = sc.context
    url = await serve(signer, sc_ctx)
    client_ctx = control_plane_context(ca.directory / "ca.pem")
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        await post(url, json_body={"csr": csr_for(ID), "token": token}, ssl=client_ctx)


async def _served_serial(port: int, ctx: ssl.SSLContext) -> int:
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der).serial_number
    finally:
        writer.close()
        await writer.wait_closed()


async def test_serving_cert_renews_at_half_life(ca: CA, serve: Serve) -> None:
    signer = Signer.load(ca.directory)
    sc = ServingCert(ca, ["127.0.0.1"], timedelta(seconds=2))
    first_serial = sc.serial
    url = await serve(signer, sc.context)
    port = int(url.rsplit(":", 1)[1])
    client_ctx = control_plane_context(ca.directory / "ca.pem")
    assert await _served_serial(port, client_ctx) == first_serial
    task = asyncio.create_task(sc.run())
    try:
        t0 = asyncio.get_running_loop().time()
        while sc.renewals == 0:
            assert asyncio.get_running_loop().time() - t0 < 5, sc
            await asyncio.sleep(0.05)
        elapsed = asyncio.get_running_loop().time() - t0
        assert 0.5 < elapsed < 2.0  # half of 2 s, not at once and not at expiry
        assert sc.serial != first_serial
        assert await _served_serial(port, client_ctx) == sc.serial
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


# --------------------------------------------------------------------------- renewal by certificate


def test_decide_a_verified_peer_renews_its_own_identity(ca: CA, token_key: bytes) -> None:
    now = datetime.now(UTC)
    expired = make_token(token_key, TD, "shop", "cart", timedelta(seconds=1), now=0)
    signed = decide(ca, token_key, csr_for(ID), expired, timedelta(hours=1), now, peer_id=ID)
    assert sans(verify_chain(ca.root_pem, signed.cert_pem)) == [x509.UniformResourceIdentifier(ID)]
    # ... and nothing else
    with pytest.raises(Refused) as exc:
        decide(ca, token_key, csr_for(OTHER), expired, timedelta(hours=1), now, peer_id=ID)
    assert exc.value.claimed == ID and exc.value.asked == OTHER
    # a peer id of another trust domain entitles nothing
    with pytest.raises(Refused, match="token refused"):
        decide(
            ca,
            token_key,
            csr_for("spiffe://other.td/ns/shop/sa/cart"),
            expired,
            timedelta(hours=1),
            now,
            peer_id="spiffe://other.td/ns/shop/sa/cart",
        )
    # a valid token wins over the peer certificate
    tok = make_token(token_key, TD, "shop", "cart")
    signed = decide(ca, token_key, csr_for(ID), tok, timedelta(hours=1), now, peer_id=OTHER)
    assert signed.spiffe_id == ID


def _client_with_cert(ca: CA, root_pem: bytes, spiffe_id: str, tmp: Path) -> ssl.SSLContext:
    from certs.ca import issue, write_issued

    write_issued(tmp, issue(ca, spiffe_id, timedelta(hours=1)))
    ctx = control_plane_context(tmp / "ca.pem")
    ctx.load_verify_locations(cadata=root_pem.decode())
    ctx.load_cert_chain(tmp / "cert.pem", tmp / "key.pem")
    return ctx


async def test_https_client_certificate_renews_without_a_valid_token(
    ca: CA, token_key: bytes, serve: Serve, tmp_path: Path
) -> None:
    signer = Signer.load(ca.directory)
    url = await serve(signer, ServingCert(ca, ["127.0.0.1"]).context)
    expired = make_token(token_key, TD, "shop", "cart", timedelta(seconds=1), now=0)
    with_cert = _client_with_cert(ca, ca.root_pem, ID, tmp_path / "mine")
    status, doc, _ = await post(
        url, json_body={"csr": csr_for(ID), "token": expired}, ssl=with_cert
    )
    assert status == 200, doc
    status, doc, _ = await post(
        url, json_body={"csr": csr_for(OTHER), "token": expired}, ssl=with_cert
    )
    assert status == 403
    # without a client certificate the expired token alone is refused
    plain = control_plane_context(ca.directory / "ca.pem")
    status, _, _ = await post(url, json_body={"csr": csr_for(ID), "token": expired}, ssl=plain)
    assert status == 403
    assert (signer.signed, signer.refused) == (1, 2)
    # a client certificate from another CA does not get through the handshake
    stranger = init_ca(tmp_path / "stranger", TD)
    foreign = _client_with_cert(stranger, ca.root_pem, ID, tmp_path / "foreign")
    with pytest.raises(aiohttp.ClientError):
        await post(url, json_body={"csr": csr_for(ID), "token": expired}, ssl=foreign)
    assert signer.signed == 1
