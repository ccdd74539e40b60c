"""Certificates from the control plane, end to end: ``meshproxy control --ca-dir`` serving
TLS and signing CSRs, sidecars bootstrapped with ``--token-file`` talking mTLS with the
identities it gave them, renewal at half life, and the refusals.

Everything is a real process or socket on 127.0.0.1 (OS-chosen ports): the CA and tokens come
from the real CLI (``meshproxy ca init`` / ``meshproxy ca token``), the control plane and the
sidecars are ``python -m meshproxy`` subprocesses stopped by their PIDs.

    test --plain--> sidecar A (default/client) --mTLS (auto, MESH_INTERNAL)--> sidecar B
        inbound (default/web) --> echo app
"""

from __future__ import annotations

import json
import ssl
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from certs.ca import make_csr
from tests.integration.proxyproc import (
    Control,
    MeshProxy,
    ready,
    run_cli,
    wait_until,
    write_config,
)
from tests.support.mesh import EchoApp, xfcc_of

READY = 20.0


def spiffe(ns: str, sa: str) -> str:
    return f"spiffe://cluster.local/ns/{ns}/sa/{sa}"


def web_yaml(inbound_port: int) -> str:
    return textwrap.dedent(
        f"""\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {{name: web}}
        spec:
          hosts: [web.default.svc.cluster.local]
          location: MESH_INTERNAL
          resolution: STATIC
          ports: [{{number: 80, name: http, protocol: HTTP}}]
          endpoints:
          - address: 127.0.0.1
            ports: {{http: {inbound_port}}}
            serviceAccount: web
        """
    )


def token(ca: Path, tmp: Path, ns: str, sa: str) -> Path:
    out = run_cli("ca", "token", "--dir", str(ca), "--namespace", ns, "--service-account", sa)
    assert out.returncode == 0, out.stderr
    path = tmp / f"{ns}-{sa}.token"
    path.write_text(out.stdout.strip() + "\n")
    return path


@dataclass
class Pki:
    ca: Path
    other: Path  # an unrelated CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    base = tmp_path_factory.mktemp("cp-pki")
    for name in ("ca", "other"):
        out = run_cli("ca", "init", "--dir", str(base / name))
        assert out.returncode == 0, out.stderr
    return Pki(base / "ca", base / "other")


@dataclass
class World:
    control: Control
    a: MeshProxy
    b: MeshProxy
    app: EchoApp
    config: Path


@pytest.fixture
async def world(tmp_path: Path, pki: Pki) -> AsyncIterator[World]:
    cfg = tmp_path / "mesh"
    cfg.mkdir()
    write_config(cfg / "web.yaml", web_yaml(1))  # the real port once B listens
    control = Control(
        cfg,
        tmp_path / "control.log",
        extra=["--ca-dir", str(pki.ca), "--cert-ttl", "6s"],
        tls_ca=pki.ca / "ca.pem",
    )
    app = await EchoApp().start()
    procs: list[MeshProxy] = []
    try:
        await control.start()

        def sidecar(node: str, sa: str, *extra: str) -> MeshProxy:
            p = MeshProxy(
                config=[],
                extra=[
                    "--control-plane",
                    control.url,
                    "--control-plane-ca",
                    str(pki.ca / "ca.pem"),
                    "--node-id",
                    node,
                    "--token-file",
                    str(token(pki.ca, tmp_path, "default", sa)),
                    *extra,
                ],
                log_path=tmp_path / f"{node}.log",
            )
            procs.append(p)
            return p

        b = await sidecar(
            "web-1", "web", "--inbound", "127.0.0.1:0", "--app", f"127.0.0.1:{app.port}"
        ).start()
        a = await sidecar("client-1", "client").start()
        _, dump = await b.admin_get("/config_dump")
        inbound = next(x for x in dump["listeners"] if x["name"] == "inbound")["address"]
        write_config(cfg / "web.yaml", web_yaml(int(inbound.rsplit(":", 1)[1])))
        for p in (a, b):
            await wait_until(lambda p=p: ready(p), timeout=READY)
        yield World(control, a, b, app, cfg)
    finally:
        for p in procs:
            await p.kill()
        await control.kill()
        await app.close()
    for p in procs:
        assert "Traceback" not in p.stderr(), p.stderr()
    assert "Traceback" not in control.log_path.read_text()


async def identity(p: MeshProxy) -> dict:
    _, dump = await p.admin_get("/config_dump")
    return dump


async def test_token_bootstrapped_sidecars_talk_mtls_with_control_plane_certificates(
    world: World,
) -> None:
    da, db = await identity(world.a), await identity(world.b)
    assert da["identity"]["spiffe_id"] == spiffe("default", "client")
    assert db["identity"]["spiffe_id"] == spiffe("default", "web")
    assert da["certificate_client"]["renewals_ok"] >= 1

    async def through() -> bool:
        async with aiohttp.ClientSession() as s:
            code, body = await world.a.get(s, "/hello", host="web")
        return code == 200 and bool(body)

    await wait_until(through, timeout=READY)  # once B's address is pushed
    async with aiohttp.ClientSession() as s:
        code, body = await world.a.get(s, "/hello", host="web")
    assert code == 200
    assert xfcc_of(body) == [f"By={spiffe('default', 'web')};URI={spiffe('default', 'client')}"]
    _, text = await world.b.admin_get("/stats/prometheus")
    assert 'connection_security_policy="mutual_tls"' in text
    st = (await world.control.get("/status"))[1]
    assert {p["node_id"] for p in st["proxies"]} == {"web-1", "client-1"}


async def test_certificates_are_renewed_at_half_their_lifetime(world: World) -> None:
    first = (await identity(world.a))["identity"]["serial"]

    async def renewed() -> bool:
        d = await identity(world.a)
        return d["identity"]["serial"] != first and d["certificate_client"]["renewals_ok"] >= 2

    await wait_until(renewed, timeout=15.0)  # 6 s certificates: renewed after ~3 s
    d = await identity(world.a)
    assert d["identity"]["spiffe_id"] == spiffe("default", "client")
    # traffic keeps flowing over mTLS with the renewed certificates
    async with aiohttp.ClientSession() as s:
        code, body = await world.a.get(s, "/after-renewal", host="web")
    assert code == 200
    assert xfcc_of(body) == [f"By={spiffe('default', 'web')};URI={spiffe('default', 'client')}"]


async def post_csr(control: Control, csr: bytes, tok: str) -> tuple[int, dict]:
    ctx = ssl.create_default_context(cafile=str(control.tls_ca))
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            control.url + "/v1/certificates",
            json={"csr": csr.decode(), "token": tok},
            ssl=ctx,
        ) as r,
    ):
        return r.status, json.loads(await r.read())


async def test_a_csr_for_a_foreign_identity_is_refused(
    world: World, pki: Pki, tmp_path: Path
) -> None:
    tok = token(pki.ca, tmp_path, "default", "client").read_text().strip()
    key = ec.generate_private_key(ec.SECP256R1())
    code, body = await post_csr(world.control, make_csr(key, spiffe("default", "web")), tok)
    assert code == 403 and "error" in body and "cert" not in body
    code, body = await post_csr(world.control, make_csr(key, spiffe("kube-system", "admin")), tok)
    assert code == 403
    # the same token for its own identity is signed (so the refusals were about the identity)
    code, body = await post_csr(world.control, make_csr(key, spiffe("default", "client")), tok)
    assert code == 200
    leaf = x509.load_pem_x509_certificate(body["cert"].encode())
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [spiffe("default", "client")]
    assert body["ca"] == (pki.ca / "ca.pem").read_text()
    _, metrics = await world.control.get("/metrics")
    assert 'meshproxy_control_certificates_total{result="refused"} 2.0' in metrics
    log = world.control.log_path.read_text()
    assert spiffe("default", "web") in log and tok not in log


async def test_a_control_plane_with_a_certificate_from_another_ca_is_not_trusted(
    world: World, pki: Pki, tmp_path: Path
) -> None:
    p = MeshProxy(
        config=[],
        extra=[
            "--control-plane",
            world.control.url,
            "--control-plane-ca",
            str(pki.other / "ca.pem"),
            "--node-id",
            "doubter",
            "--token-file",
            str(token(pki.ca, tmp_path, "default", "client")),
        ],
        log_path=tmp_path / "doubter.log",
    )
    await p.start()
    try:

        async def refused() -> bool:
            d = await identity(p)
            err = d["control_plane"]["last_error"] or ""
            return "certificate" in err and d["certificate_client"]["renewals_failed"] >= 1

        await wait_until(refused, timeout=READY)
        code, _ = await p.admin_get("/ready")
        assert code == 503
        st = (await world.control.get("/status"))[1]
        assert "doubter" not in {x["node_id"] for x in st["proxies"]}
    finally:
        await p.kill()
    assert "Traceback" not in p.stderr()


def test_control_ca_dir_errors(tmp_path: Path) -> None:
    cfg = tmp_path / "mesh"
    cfg.mkdir()
    empty = tmp_path / "not-a-ca"
    empty.mkdir()
    out = run_cli(
        "control", "--config", str(cfg), "--listen", "127.0.0.1:0", "--ca-dir", str(empty)
    )
    assert out.returncode == 2 and "--ca-dir" in out.stderr and "Traceback" not in out.stderr
    tok = tmp_path / "t"
    tok.write_text("")
    out = run_cli(
        "run", "--control-plane", "http://127.0.0.1:1", "--node-id", "n", "--token-file", str(tok),
        "--admin", "127.0.0.1:0", "--outbound", "127.0.0.1:0",
    )  # fmt: skip
    assert out.returncode == 2 and "--token-file" in out.stderr and "Traceback" not in out.stderr
