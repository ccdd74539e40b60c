"""Mutual TLS between two real sidecars, end to end through the CLI, including every refusal.

Theory of operation
-------------------
Each test builds the topology of :mod:`tests.support.mesh` (real processes, real sockets,
127.0.0.1, OS-chosen ports)::

    test --plain--> A (client-ns/client) --ISTIO_MUTUAL--> B inbound (app-ns/web) --> app

with certificates made by ``meshproxy ca init`` / ``meshproxy ca issue`` (once per module), and
the Istio YAML of ``tests/data/mtls/``. It then looks only at the public surface: the HTTP
answers, the headers the app received (its echo), what a direct plain or TLS client gets from
B's inbound port (a response, or a connection closed without one), the access log and
``/stats/prometheus``. Every refusal is paired with an accepted request over the same path, so a
test cannot pass because nothing works at all; every "the app never saw it" is checked on the
app's own record of requests.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
from pathlib import Path

import pytest

from tests.integration.proxyproc import REPO, meshproxy_argv, run_cli, wait_until
from tests.support.mesh import (
    CLIENT_ID,
    DATA,
    EXPECTED_XFCC,
    WEB_HOST,
    WEB_ID,
    Mesh,
    Pki,
    copy_identity,
    expired_identity,
    forged_xfcc_header,
    make_pki,
    mesh,
    plain_request,
    tls_request,
    write_config,
    xfcc_of,
)

FORGED = "By=evil;URI=spiffe://cluster.local/ns/admin/sa/root"
# Envoy's local reply for a failed upstream TLS handshake; after retries (Istio's default
# policy retries connect failures) it reads "... retried and the latest reset reason: ...".
TLS_FAILURE = re.compile(
    r"^upstream connect error or disconnect/reset before headers\. "
    r"(reset reason|retried and the latest reset reason): connection failure, "
    r"transport failure reason: TLS error"
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def expired(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The client's SPIFFE id from the mesh CA, expired an hour ago."""
    return expired_identity(pki.ca, CLIENT_ID, tmp_path_factory.mktemp("expired") / "id")


async def destination_count(m: Mesh, **labels: str) -> float:
    return await m.b.requests_total(reporter="destination", **labels)


async def eventually_counted(m: Mesh, at_least: float, **labels: str) -> None:
    """B's ``istio_requests_total{reporter="destination", labels}`` reaches ``at_least``."""

    async def counted() -> bool:
        return await destination_count(m, **labels) >= at_least

    try:
        await wait_until(counted, 5.0)
    except AssertionError:
        raise AssertionError(
            f"no destination sample with {labels} >= {at_least}:\n"
            + "\n".join(
                line for line in (await m.b.metric_text()).splitlines() if "requests_total" in line
            )
        ) from None


async def inbound_mode(m: Mesh) -> str:
    """The PeerAuthentication mode B's ``/config_dump`` shows on its inbound listener."""
    code, text = await m.b.admin_get("/config_dump")
    assert code == 200, text
    listeners = [x for x in json.loads(text)["listeners"] if x.get("name") == "inbound"]
    assert len(listeners) == 1, text
    modes = {v for k, v in listeners[0].items() if "mode" in k and isinstance(v, str)}
    assert len(modes) == 1, listeners[0]
    return modes.pop()


def flags_of(entry: dict[str, object]) -> set[str]:
    return set(str(entry["response_flags"]).split(","))


# --------------------------------------------------------------------------- fixtures


def test_fixtures_are_valid_istio_yaml() -> None:
    """Each sidecar's config in tests/data/mtls passes ``meshproxy validate`` on its own."""
    for name in sorted(p.name for p in DATA.glob("*.yaml")):
        p = run_cli("validate", str(DATA / name), timeout=30)
        assert p.returncode == 0, f"{name}: {p.stdout}{p.stderr}"
        assert p.stdout == "", p.stdout


# --------------------------------------------------------------------------- 1. mTLS works


async def test_mtls_between_sidecars_reaches_the_app_with_the_peer_identity(
    tmp_path: Path, pki: Pki
) -> None:
    async with mesh(tmp_path, pki) as m:
        code, body = await m.get("/hello?x=1")
        assert code == 200, body
        assert body["path"] == "/hello?x=1"
        assert xfcc_of(body) == [EXPECTED_XFCC]
        await eventually_counted(
            m,
            1,
            connection_security_policy="mutual_tls",
            source_principal=CLIENT_ID,
            response_code="200",
        )
        # the same request as seen from a direct client presenting the client's identity
        out = await tls_request(m.b.inbound, pki.client, pki.root, "/direct")
        assert out.response is not None and out.response.status == 200, str(out)
        assert m.app.seen("/direct")[0].header_all("x-forwarded-client-cert") == [EXPECTED_XFCC]
        await eventually_counted(m, 2, connection_security_policy="mutual_tls")
        assert await destination_count(m, connection_security_policy="none") == 0


async def test_auto_mtls_for_a_mesh_internal_service_with_an_identity(
    tmp_path: Path, pki: Pki
) -> None:
    """No DestinationRule: MESH_INTERNAL + a workload identity = ISTIO_MUTUAL (B is STRICT)."""
    async with mesh(
        tmp_path, pki, server_fixture="server-strict.yaml", client_fixture="client-auto-mtls.yaml"
    ) as m:
        code, body = await m.get("/auto")
        assert code == 200, body
        assert xfcc_of(body) == [EXPECTED_XFCC]
        await eventually_counted(m, 1, connection_security_policy="mutual_tls")


async def test_no_auto_mtls_without_an_identity(tmp_path: Path, pki: Pki) -> None:
    """The same config, A without ``--cert-dir``: plaintext (B is PERMISSIVE)."""
    async with mesh(
        tmp_path, pki, client_fixture="client-auto-mtls.yaml", client_has_identity=False
    ) as m:
        code, body = await m.get("/plain-auto")
        assert code == 200, body
        assert xfcc_of(body) == []
        await eventually_counted(m, 1, connection_security_policy="none")


async def test_sidecars_resume_sessions_and_keep_the_identity(tmp_path: Path, pki: Pki) -> None:
    """New A -> B connections after the first ones resume their TLS session (A's /clusters
    counts it), with Istio's SNI; a resumed session still carries the client's identity."""
    async with mesh(tmp_path, pki, server_fixture="server-strict.yaml") as m:
        # concurrent slow requests: 4 connections, then 12 (8 of them new, with a session saved)
        first = await asyncio.gather(*(m.get(f"/slow/a{i}") for i in range(4)))
        second = await asyncio.gather(*(m.get(f"/slow/b{i}") for i in range(12)))
        assert [code for code, _ in first + second] == [200] * 16, first + second
        assert all(xfcc_of(body) == [EXPECTED_XFCC] for _, body in first + second)
        code, text = await m.a.admin_get("/clusters")
        assert code == 200, text
        (web,) = [c for c in json.loads(text)["clusters"] if c["name"] == WEB_HOST]
        tls = web["tls"]
        assert tls["mode"] == "ISTIO_MUTUAL"
        assert tls["sni"] == f"outbound_.80_._.{WEB_HOST}"
        assert tls["peer"] == WEB_ID
        assert tls["handshakes"] >= 12, tls
        assert tls["resumed"] >= 1, tls


# --------------------------------------------------------------------------- 2. plaintext


async def test_strict_closes_a_plaintext_connection_without_a_response(
    tmp_path: Path, pki: Pki
) -> None:
    async with mesh(tmp_path, pki, server_fixture="server-strict.yaml") as m:
        out = await plain_request(m.b.inbound, "/plain")
        assert out.refused, f"plaintext under STRICT got {out}"
        assert m.app.seen("/plain") == []
        code, body = await m.get("/over-mtls")  # mTLS still works under STRICT
        assert code == 200 and xfcc_of(body) == [EXPECTED_XFCC], body
        assert await destination_count(m, connection_security_policy="none") == 0


async def test_permissive_serves_plaintext_without_an_identity(tmp_path: Path, pki: Pki) -> None:
    async with mesh(tmp_path, pki, server_fixture="server-permissive.yaml") as m:
        out = await plain_request(m.b.inbound, "/plain")
        assert out.response is not None and out.response.status == 200, str(out)
        assert m.app.seen("/plain")[0].header_all("x-forwarded-client-cert") == []
        await eventually_counted(
            m, 1, connection_security_policy="none", source_principal="unknown"
        )
        assert await destination_count(m, connection_security_policy="mutual_tls") == 0
        code, body = await m.get("/over-mtls")  # and mTLS on the same port
        assert code == 200 and xfcc_of(body) == [EXPECTED_XFCC], body
        await eventually_counted(m, 1, connection_security_policy="mutual_tls")


async def test_strict_without_an_identity_refuses_everything(tmp_path: Path, pki: Pki) -> None:
    """B without ``--cert-dir`` cannot do mTLS: under STRICT no connection is served."""
    strict = "server-strict.yaml"
    async with mesh(tmp_path, pki, server_fixture=strict, server_has_identity=False) as m:
        plain = await plain_request(m.b.inbound, "/plain")
        assert plain.refused, f"plaintext got {plain}"
        tls = await tls_request(m.b.inbound, pki.client, pki.root, "/tls")
        assert tls.refused, f"TLS got {tls}"
        assert m.app.hits == 0


# --------------------------------------------------------------------------- 3, 4. bad certificates


@pytest.mark.parametrize("mode", ["strict", "permissive"])
async def test_inbound_refuses_certificates_from_another_ca_or_expired(
    tmp_path: Path, pki: Pki, expired: Path, mode: str
) -> None:
    async with mesh(tmp_path, pki, server_fixture=f"server-{mode}.yaml") as m:
        good = await tls_request(m.b.inbound, pki.client, pki.root, "/good")
        assert good.response is not None and good.response.status == 200, str(good)

        other = await tls_request(m.b.inbound, pki.other_client, pki.root, "/other-ca")
        assert other.refused, f"a certificate from another CA got {other}"
        stale = await tls_request(m.b.inbound, expired, pki.root, "/expired")
        assert stale.refused, f"an expired certificate got {stale}"
        if mode == "strict":
            anonymous = await tls_request(m.b.inbound, None, pki.root, "/no-cert")
            assert anonymous.refused, f"TLS without a client certificate got {anonymous}"

        assert [r.target for r in m.app.requests] == ["/good"]
        await eventually_counted(m, 1)
        assert await destination_count(m) == 1


async def test_sidecar_with_a_certificate_from_another_ca_gets_503_uf(
    tmp_path: Path, pki: Pki
) -> None:
    """A trusts only the other CA: the handshake with B fails, the app never sees a request."""
    async with mesh(tmp_path, pki, client_identity=pki.other_client) as m:
        code, body = await m.get("/from-other-ca")
        assert code == 503, body
        assert TLS_FAILURE.match(body), body
        assert "UF" in flags_of(await m.a.access_entry("/from-other-ca"))
        assert m.app.hits == 0


async def test_inbound_refuses_a_sidecar_whose_certificate_it_cannot_chain(
    tmp_path: Path, pki: Pki
) -> None:
    """A presents a leaf from the other CA but trusts both roots (so A itself accepts B):
    only B's client-certificate check can stop it. For A that is a failed TLS handshake like
    any other (Envoy: 503 UF, "transport failure reason: TLS error: ...ALERT..."), even though
    under TLS 1.3 the server's alert arrives after the client's side of the handshake."""
    both_roots = (pki.other_ca / "ca.pem").read_bytes() + pki.root.read_bytes()
    mixed = copy_identity(pki.other_client, tmp_path / "id-mixed")
    (mixed / "ca.pem").write_bytes(both_roots)
    async with mesh(tmp_path / "m", pki, client_identity=mixed) as m:
        code, body = await m.get("/mixed")
        assert code == 503, body
        assert m.app.hits == 0
        assert "UF" in flags_of(await m.a.access_entry("/mixed"))
        assert TLS_FAILURE.match(body), body
        assert await destination_count(m, response_code="200") == 0


@pytest.mark.parametrize("case", ["expired", "missing"])
async def test_bad_cert_dir_at_start_exits_2_with_a_message(
    tmp_path: Path, expired: Path, case: str
) -> None:
    cert_dir = expired if case == "expired" else tmp_path / "no-such-dir"
    argv = ["run", "--config", str(DATA / "server-strict.yaml"), "--outbound", "127.0.0.1:0"]
    argv += ["--admin", "127.0.0.1:0", "--cert-dir", str(cert_dir)]
    proc = await asyncio.create_subprocess_exec(
        *meshproxy_argv(*argv),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 20)
    except TimeoutError:
        os.kill(proc.pid, signal.SIGKILL)
        await proc.wait()
        raise AssertionError(f"meshproxy run with a {case} --cert-dir kept running") from None
    text = err.decode(errors="replace")
    assert proc.returncode == 2, f"exit {proc.returncode}: {out!r}\n{text}"
    assert "Traceback" not in text, text
    assert str(cert_dir) in text, text
    assert b"listening" not in out


# --------------------------------------------------------------------------- 5. unexpected SAN


async def test_unexpected_peer_spiffe_id_is_503_uf_tls_error(tmp_path: Path, pki: Pki) -> None:
    async with mesh(tmp_path, pki, client_fixture="client-unexpected-san.yaml") as m:
        code, body = await m.get("/wrong-peer")
        assert code == 503, body
        assert "TLS error" in body and TLS_FAILURE.match(body), body
        assert "UF" in flags_of(await m.a.access_entry("/wrong-peer"))
        assert m.app.hits == 0
        assert await destination_count(m, response_code="200") == 0


# --------------------------------------------------------------------------- 6. forged XFCC


async def test_a_forged_xfcc_never_reaches_the_app(tmp_path: Path, pki: Pki) -> None:
    async with mesh(tmp_path, pki) as m:
        code, body = await m.get("/via-a", headers={"x-forwarded-client-cert": FORGED})
        assert code == 200, body
        assert xfcc_of(body) == [EXPECTED_XFCC]

        forged = forged_xfcc_header(FORGED)
        out = await plain_request(m.b.inbound, "/plain-forged", forged)
        assert out.response is not None and out.response.status == 200, str(out)
        assert m.app.seen("/plain-forged")[0].header_all("x-forwarded-client-cert") == []

        out = await tls_request(m.b.inbound, pki.client, pki.root, "/tls-forged", forged)
        assert out.response is not None and out.response.status == 200, str(out)
        seen = m.app.seen("/tls-forged")[0].header_all("x-forwarded-client-cert")
        assert seen == [EXPECTED_XFCC]


# --------------------------------------------------------------------------- 7. authorization


async def test_authorization_policy_denies_paths_and_principals(tmp_path: Path, pki: Pki) -> None:
    async with mesh(tmp_path, pki, server_fixture="server-authz.yaml") as m:
        code, body = await m.get("/public/x")
        assert code == 200, body
        assert xfcc_of(body) == [EXPECTED_XFCC]

        before = m.app.hits
        code, body = await m.get("/admin")  # the DENY policy
        assert (code, body) == (403, "RBAC: access denied")
        code, body = await m.get("/private")  # no ALLOW rule matches
        assert (code, body) == (403, "RBAC: access denied")
        assert m.app.hits == before

        code, body = await m.get("/admin/ok")  # allowed: only the DENY stopped /admin
        assert code == 200, body

        intruder = await tls_request(m.b.inbound, pki.intruder, pki.root, "/public/intruder")
        assert intruder.response is not None, str(intruder)
        assert intruder.response.status == 403
        assert intruder.response.body == b"RBAC: access denied"

        anonymous = await plain_request(m.b.inbound, "/public/plain")  # PERMISSIVE, no principal
        assert anonymous.response is not None, str(anonymous)
        assert anonymous.response.status == 403

        assert [r.target for r in m.app.requests] == ["/public/x", "/admin/ok"]
        await eventually_counted(m, 4, response_code="403")


# --------------------------------------------------------------------------- 8. reload


async def test_peer_authentication_reload_to_strict_without_restart(
    tmp_path: Path, pki: Pki
) -> None:
    async with mesh(tmp_path, pki, server_fixture="server-permissive.yaml") as m:
        out = await plain_request(m.b.inbound, "/before")
        assert out.response is not None and out.response.status == 200, str(out)
        assert await inbound_mode(m) == "PERMISSIVE"
        pid = m.b.pid

        write_config(m.b.config, (DATA / "server-strict.yaml").read_text())
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        last = out

        async def refused() -> bool:
            nonlocal last
            last = await plain_request(m.b.inbound, "/during")
            return last.refused

        try:
            await wait_until(refused, 5.0, interval=0.2)
        except AssertionError:
            raise AssertionError(f"still {last} 5 s after switching to STRICT") from None
        assert loop.time() - t0 < 5.0
        assert m.b.pid == pid and m.b.proc is not None and m.b.proc.returncode is None
        after = await plain_request(m.b.inbound, "/after")
        assert after.refused, f"plaintext after the switch to STRICT got {after}"
        assert m.app.seen("/after") == []
        code, body = await m.get("/mtls-after")
        assert code == 200 and xfcc_of(body) == [EXPECTED_XFCC], body
        assert await inbound_mode(m) == "STRICT"
