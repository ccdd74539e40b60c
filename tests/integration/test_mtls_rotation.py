"""Certificate rotation under load between two real sidecars: not one failed request.

Theory of operation
-------------------
The topology of :mod:`tests.support.mesh` with sidecar B in STRICT mode (so every request
really crosses mTLS)::

    LoadLoop --plain--> A (client-ns/client) --ISTIO_MUTUAL--> B inbound (app-ns/web) --> app

:class:`~tests.support.mesh.LoadLoop` sends 500 requests/s through A for at least 10 s, from
eight kept-alive connections and two clients that open a new connection per request. Meanwhile
both ``--cert-dir`` directories are rotated the way a real rotator does it (new files written
beside the old ones, then renamed over them):

1. new leaf certificates from the same root, twice;
2. a root rotation: ``ca.pem`` = old root + new root on both sides, then leaf certificates
   from the new root, then ``ca.pem`` = new root only.

After each leaf rotation the test waits until B's inbound presents the new certificate (its
serial) to a new TLS connection, so each step is known to be live before the next. At the end:
zero failed requests, the achieved rate, a burst of concurrent slow requests that makes A open
new connections to B (which now trusts only the new root, so A must present its new leaf), B
presenting the last certificate, and B's trust bundle really rotated (a client certificate from
the old root is refused now, one from the new root accepted).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.integration.proxyproc import wait_until
from tests.support.mesh import (
    CLIENT_ID,
    EXPECTED_XFCC,
    WEB_ID,
    LoadLoop,
    Pki,
    ca_init,
    ca_issue,
    ca_issue_async,
    install_identity,
    leaf_serial,
    mesh,
    presented_serial,
    tls_request,
    xfcc_of,
)

RATE = 500.0
MIN_SECONDS = 10.0
BURST = 32  # > the load's 10 clients, so > the connections A has pooled to B
PICKUP_TIMEOUT = 5.0  # the cert dir is polled every second


def small_pki(base: Path) -> Pki:
    """Only what rotation needs: the mesh CA and the two sidecars' identities."""
    ca = ca_init(base / "ca")
    client = ca_issue(ca, CLIENT_ID, base / "id-client")
    web = ca_issue(ca, WEB_ID, base / "id-web")
    return Pki(ca, ca, client, web, client, client, web)


@pytest.mark.slow
async def test_rotating_leaves_and_root_under_load_fails_no_request(tmp_path: Path) -> None:
    pki = small_pki(tmp_path / "pki")
    new_ca = ca_init(tmp_path / "new-ca")
    old_root = pki.root.read_bytes()
    new_root = (new_ca / "ca.pem").read_bytes()
    bundle_file = tmp_path / "bundle.pem"
    bundle_file.write_bytes(old_root + new_root)

    async with mesh(tmp_path / "m", pki, server_fixture="server-strict.yaml") as m:
        certs_a, certs_b = m.workdir / "certs-a", m.workdir / "certs-b"
        first = await presented_serial(m.b.inbound, pki.client, pki.root)
        assert first == leaf_serial(pki.web)
        code, body = await m.get("/warm")
        assert code == 200, body

        async def rotate(ca_dir: Path, tag: str, ca_pem: bytes | None = None) -> Path:
            """New leaves for A and B from ``ca_dir``; waits until B presents its new one.
            Returns A's new identity (a client certificate B accepts now)."""
            a_new, b_new = await asyncio.gather(
                ca_issue_async(ca_dir, CLIENT_ID, tmp_path / f"a-{tag}"),
                ca_issue_async(ca_dir, WEB_ID, tmp_path / f"b-{tag}"),
            )
            install_identity(certs_a, a_new, ca_pem)
            install_identity(certs_b, b_new, ca_pem)
            want = leaf_serial(b_new)
            trust = bundle_file if ca_pem is not None else pki.root

            async def presented() -> bool:
                return await presented_serial(m.b.inbound, a_new, trust) == want

            try:
                await wait_until(presented, PICKUP_TIMEOUT, interval=0.2)
            except AssertionError:
                raise AssertionError(
                    f"rotation {tag}: B still presents its old certificate after "
                    f"{PICKUP_TIMEOUT} s\n{m.b.stderr()[-3000:]}"
                ) from None
            return a_new

        loop = asyncio.get_running_loop()
        load = LoadLoop(m.a.outbound, RATE, keepalive=8, fresh=2)
        t0 = loop.time()
        load.start()
        try:
            await asyncio.sleep(1.0)
            await rotate(pki.ca, "1")
            await asyncio.sleep(0.5)
            await rotate(pki.ca, "2")
            await asyncio.sleep(0.5)
            # root rotation: trust both roots, move the leaves to the new root, drop the old
            install_identity(certs_a, ca_pem=old_root + new_root)
            install_identity(certs_b, ca_pem=old_root + new_root)
            await asyncio.sleep(1.5)  # one poll (1 s) and then some, on both sides
            a_last = await rotate(new_ca, "3", ca_pem=old_root + new_root)
            # A's new leaf is live too before B stops trusting the old root (A shows no
            # serial from outside: a poll that saw the new cert with the old key retries a
            # second later, so allow two polls and some)
            await asyncio.sleep(2.5)
            install_identity(certs_a, ca_pem=new_root)
            install_identity(certs_b, ca_pem=new_root)
            await asyncio.sleep(max(1.5, MIN_SECONDS - (loop.time() - t0)))
        finally:
            result = await load.stop()
        elapsed = loop.time() - t0

        assert result.failures == [], (
            f"{len(result.failures)} failed of {result.ok + len(result.failures)}:\n"
            + "\n".join(result.failures[:20])
            + f"\nA:\n{m.a.stderr()[-2000:]}\nB:\n{m.b.stderr()[-2000:]}"
        )
        assert elapsed >= MIN_SECONDS
        assert result.ok >= 0.8 * RATE * elapsed, f"{result.ok} requests in {elapsed:.1f} s"
        assert result.new_connections >= 0.1 * RATE * elapsed  # the fresh clients did reconnect

        # every request crossed mTLS with the client's identity
        loads = [r for r in m.app.requests if r.target.startswith("/load/")]
        assert len(loads) == result.ok
        assert {tuple(r.header_all("x-forwarded-client-cert")) for r in loads} == {(EXPECTED_XFCC,)}

        # A's new connections present its new-root leaf: more concurrent slow requests than
        # A can have pooled connections to B, so most need a new A -> B handshake now that
        # B trusts the new root only
        burst = await asyncio.gather(*(m.get(f"/slow/{i}") for i in range(BURST)))
        assert [code for code, _ in burst] == [200] * BURST, burst
        assert all(xfcc_of(body) == [EXPECTED_XFCC] for _, body in burst)

        # B presents the newest certificate and trusts the new root only
        new_root_file = new_ca / "ca.pem"
        final = await presented_serial(m.b.inbound, a_last, new_root_file)
        assert final == leaf_serial(certs_b) != first

        async def old_root_refused() -> bool:
            return (await tls_request(m.b.inbound, pki.client, new_root_file, "/old-root")).refused

        await wait_until(old_root_refused, PICKUP_TIMEOUT, interval=0.2)
        fresh = await tls_request(m.b.inbound, a_last, new_root_file, "/new-root")
        assert fresh.response is not None and fresh.response.status == 200, str(fresh)
        assert m.app.seen("/old-root") == []
