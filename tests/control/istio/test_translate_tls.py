"""TLS translation, YAML in -> Snapshot out: DestinationRule ``trafficPolicy.tls`` (every mode,
port-level and subset overrides), Istio's auto-mTLS for ``location: MESH_INTERNAL``
ServiceEntries, ``DISABLE`` opting out, where ISTIO_MUTUAL's subjectAltNames come from, and the
endpoints' ``serviceAccount`` the data plane turns into SPIFFE ids. Pure: files in a temp dir,
no sockets, no event loop."""

from __future__ import annotations

import textwrap
from pathlib import Path

from control.istio import build_snapshot
from meshproxy.capabilities import unsupported
from meshproxy.config.model import ProxyIdentity, Snapshot, TlsMode, TlsPolicy

HOST = "pay.internal"


def se(location: str | None = "MESH_INTERNAL", sans: tuple[str, ...] = ()) -> str:
    text = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: pay, namespace: shop}
spec:
  hosts: [pay.internal]
  resolution: STATIC
  ports:
  - {number: 80, name: http, protocol: HTTP}
  endpoints:
  - {address: 10.0.0.1, labels: {version: v1}, serviceAccount: pay-v1}
  - {address: 10.0.0.2, labels: {version: v2}}
"""
    if location is not None:
        text += f"  location: {location}\n"
    if sans:
        text += f"  subjectAltNames: [{', '.join(sans)}]\n"
    return text


def dr(body: str) -> str:
    return (
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
        "metadata: {name: pay, namespace: shop}\nspec:\n  host: pay.internal\n"
        + textwrap.indent(textwrap.dedent(body), "  ")
    )


def build(tmp_path: Path, *docs: str) -> Snapshot:
    paths = []
    for i, d in enumerate(docs):
        p = tmp_path / f"doc{i}.yaml"
        p.write_text(d)
        paths.append(str(p))
    snap, report = build_snapshot(paths, ProxyIdentity(namespace="shop"))
    assert report.problems == []
    assert snap is not None
    return snap


def tls_of(snap: Snapshot, name: str = HOST) -> TlsPolicy | None:
    return snap.clusters[name].tls


def test_mesh_internal_without_dr_is_auto_mtls(tmp_path: Path) -> None:
    snap = build(tmp_path, se("MESH_INTERNAL"))
    assert tls_of(snap) == TlsPolicy(mode=TlsMode.ISTIO_MUTUAL, auto=True)
    eps = snap.clusters[HOST].endpoints
    assert [e.service_account for e in eps] == ["pay-v1", ""]
    assert eps[0].meta is not None and eps[0].meta.namespace == "shop"


def test_mesh_external_and_default_location_are_plaintext(tmp_path: Path) -> None:
    assert tls_of(build(tmp_path, se("MESH_EXTERNAL"))) is None
    assert tls_of(build(tmp_path, se(None))) is None  # Istio's default is MESH_EXTERNAL


def test_auto_mtls_takes_the_service_entry_sans(tmp_path: Path) -> None:
    sans = ("spiffe://cluster.local/ns/shop/sa/pay",)
    snap = build(tmp_path, se(sans=sans))
    assert tls_of(snap) == TlsPolicy(mode=TlsMode.ISTIO_MUTUAL, subject_alt_names=sans, auto=True)


def test_dr_disable_keeps_plaintext(tmp_path: Path) -> None:
    snap = build(tmp_path, se(), dr("trafficPolicy:\n  tls: {mode: DISABLE}\n"))
    t = tls_of(snap)
    assert t is not None and t.mode is TlsMode.DISABLE and not t.auto


def test_dr_without_tls_keeps_auto_mtls(tmp_path: Path) -> None:
    snap = build(tmp_path, se(), dr("trafficPolicy:\n  loadBalancer: {simple: ROUND_ROBIN}\n"))
    t = tls_of(snap)
    assert t is not None and t.auto and t.mode is TlsMode.ISTIO_MUTUAL


def test_dr_istio_mutual_sans(tmp_path: Path) -> None:
    se_sans = ("spiffe://cluster.local/ns/shop/sa/from-se",)
    dr_sans = ("spiffe://cluster.local/ns/shop/sa/from-dr",)
    # the DestinationRule's own subjectAltNames win
    snap = build(
        tmp_path,
        se(sans=se_sans),
        dr(
            f"trafficPolicy:\n  tls:\n    mode: ISTIO_MUTUAL\n    subjectAltNames: [{dr_sans[0]}]\n"
        ),
    )
    assert tls_of(snap) == TlsPolicy(mode=TlsMode.ISTIO_MUTUAL, subject_alt_names=dr_sans)
    # else the ServiceEntry's
    snap = build(tmp_path, se(sans=se_sans), dr("trafficPolicy:\n  tls: {mode: ISTIO_MUTUAL}\n"))
    assert tls_of(snap) == TlsPolicy(mode=TlsMode.ISTIO_MUTUAL, subject_alt_names=se_sans)
    # an explicit ISTIO_MUTUAL on a MESH_EXTERNAL entry is not "auto"
    snap = build(tmp_path, se("MESH_EXTERNAL"), dr("trafficPolicy:\n  tls: {mode: ISTIO_MUTUAL}"))
    t = tls_of(snap)
    assert t is not None and t.mode is TlsMode.ISTIO_MUTUAL and not t.auto


def test_simple_and_mutual_fields(tmp_path: Path) -> None:
    snap = build(
        tmp_path,
        se("MESH_EXTERNAL", sans=("spiffe://ignored/for/simple",)),
        dr(
            """\
            trafficPolicy:
              tls:
                mode: MUTUAL
                clientCertificate: /etc/certs/client.pem
                privateKey: /etc/certs/key.pem
                caCertificates: /etc/certs/ca.pem
                sni: pay.example.com
                subjectAltNames: [pay.example.com]
                insecureSkipVerify: false
            """
        ),
    )
    assert tls_of(snap) == TlsPolicy(
        mode=TlsMode.MUTUAL,
        client_certificate="/etc/certs/client.pem",
        private_key="/etc/certs/key.pem",
        ca_certificates="/etc/certs/ca.pem",
        sni="pay.example.com",
        subject_alt_names=("pay.example.com",),
    )
    snap = build(
        tmp_path,
        se("MESH_EXTERNAL", sans=("spiffe://ignored/for/simple",)),
        dr("trafficPolicy:\n  tls: {mode: SIMPLE, insecureSkipVerify: true}\n"),
    )
    # SIMPLE / MUTUAL check only the DestinationRule's names, never the ServiceEntry's
    assert tls_of(snap) == TlsPolicy(mode=TlsMode.SIMPLE, insecure_skip_verify=True)


def test_subset_and_port_level_tls(tmp_path: Path) -> None:
    snap = build(
        tmp_path,
        se(),
        dr(
            """\
            trafficPolicy:
              tls: {mode: ISTIO_MUTUAL}
            subsets:
            - name: v1
              labels: {version: v1}
            - name: v2
              labels: {version: v2}
              trafficPolicy:
                tls: {mode: DISABLE}
            - name: legacy
              labels: {version: v2}
              trafficPolicy:
                portLevelSettings:
                - port: {number: 80}
                  tls: {mode: SIMPLE, caCertificates: /etc/ca.pem}
            """
        ),
    )
    v1 = tls_of(snap, f"{HOST}|v1")
    assert v1 is not None and v1.mode is TlsMode.ISTIO_MUTUAL and not v1.auto
    v2 = tls_of(snap, f"{HOST}|v2")
    assert v2 is not None and v2.mode is TlsMode.DISABLE
    legacy = tls_of(snap, f"{HOST}|legacy")
    assert legacy is not None and legacy.mode is TlsMode.SIMPLE
    assert legacy.ca_certificates == "/etc/ca.pem"


def test_upstream_tls_is_no_longer_reported_as_unapplied(tmp_path: Path) -> None:
    snap = build(tmp_path, se(), dr("trafficPolicy:\n  tls: {mode: ISTIO_MUTUAL}\n"))
    assert not [w for w in unsupported(snap) if "TLS" in w]
