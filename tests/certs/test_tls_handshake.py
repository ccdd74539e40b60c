"""End to end with real TLS on 127.0.0.1: issued certificates work for mutual TLS with ``ssl``.

A server presents an issued certificate and requires a client certificate chained to ca.pem;
the client verifies the server against its own ca.pem. Both see the other's SPIFFE id. A
certificate from another CA is refused. Files come from ``ca issue``'s writer, as a sidecar
would read them from ``--cert-dir``.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest

from certs.ca import init_ca, issue, write_issued

TD = "cluster.local"
SERVER_ID = f"spiffe://{TD}/ns/shop/sa/server"
CLIENT_ID = f"spiffe://{TD}/ns/shop/sa/client"


def server_ctx(d: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(d / "cert.pem", d / "key.pem")
    ctx.load_verify_locations(d / "ca.pem")
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_ctx(d: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # SPIFFE ids are checked from the SAN, not a hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(d / "ca.pem")
    ctx.load_cert_chain(d / "cert.pem", d / "key.pem")
    return ctx


def uris(peercert: dict | None) -> list[str]:  # type: ignore[type-arg]
    assert peercert is not None
    return [v for k, v in peercert.get("subjectAltName", ()) if k == "URI"]


async def mtls_exchange(server_dir: Path, client_dir: Path) -> tuple[list[str], list[str]]:
    seen: list[list[str]] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        seen.append(uris(w.get_extra_info("peercert")))
        w.write(await r.readexactly(4))
        await w.drain()
        w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx(server_dir))
    port = server.sockets[0].getsockname()[1]
    try:
        r, w = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=client_ctx(client_dir)), 5
        )
        server_uris = uris(w.get_extra_info("peercert"))
        w.write(b"ping")
        await w.drain()
        assert await asyncio.wait_for(r.readexactly(4), 5) == b"ping"
        w.close()
    finally:
        server.close()
        await server.wait_closed()
    return server_uris, seen[0]


@pytest.mark.parametrize("intermediate", [False, True])
async def test_mutual_tls_with_issued_certs(tmp_path: Path, intermediate: bool) -> None:
    ca = init_ca(tmp_path / "ca", TD, intermediate=intermediate)
    write_issued(tmp_path / "s", issue(ca, SERVER_ID))
    write_issued(tmp_path / "c", issue(ca, CLIENT_ID))
    server_seen_by_client, client_seen_by_server = await mtls_exchange(
        tmp_path / "s", tmp_path / "c"
    )
    assert server_seen_by_client == [SERVER_ID]
    assert client_seen_by_server == [CLIENT_ID]


async def test_client_cert_from_another_ca_is_refused(tmp_path: Path) -> None:
    ca = init_ca(tmp_path / "ca", TD)
    other = init_ca(tmp_path / "other", TD)
    write_issued(tmp_path / "s", issue(ca, SERVER_ID))
    rogue = issue(other, CLIENT_ID)
    write_issued(tmp_path / "c", rogue)
    # the rogue client trusts the real CA, so only the server's check can refuse it
    (tmp_path / "c" / "ca.pem").write_bytes(ca.root_pem)
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        await mtls_exchange(tmp_path / "s", tmp_path / "c")


async def test_server_cert_from_another_ca_is_refused(tmp_path: Path) -> None:
    ca = init_ca(tmp_path / "ca", TD)
    other = init_ca(tmp_path / "other", TD)
    write_issued(tmp_path / "s", issue(other, SERVER_ID))
    (tmp_path / "s" / "ca.pem").write_bytes(ca.root_pem)
    write_issued(tmp_path / "c", issue(ca, CLIENT_ID))
    with pytest.raises(ssl.SSLCertVerificationError):
        await mtls_exchange(tmp_path / "s", tmp_path / "c")
