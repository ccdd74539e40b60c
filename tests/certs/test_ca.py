"""The CA: certificate contents, chain verification, CSR signing, files and every error."""

from __future__ import annotations

import json
import os
import re
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from certs.ca import (
    CA,
    CA_CERT,
    CA_KEY,
    CA_META,
    CLOCK_SKEW,
    DEFAULT_WORKLOAD_TTL,
    INTERMEDIATE_CERT,
    INTERMEDIATE_KEY,
    ROOT_LIFETIME,
    TOKEN_KEY,
    atomic_write,
    init_ca,
    issue,
    load_ca,
    make_csr,
    sign_csr,
    sign_csr_for_token,
    spiffe_ids_of,
    write_issued,
)
from certs.spiffe import CAError
from certs.token import TokenError, load_token_key, make_token

ID = "spiffe://cluster.local/ns/default/sa/reviews"
NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def certs_of(pem: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem)


def verify(root: x509.Certificate, chain: list[x509.Certificate], at: datetime) -> list[str]:
    """Verify chain[0] through chain[1:] to root with cryptography's verifier (client
    profile: the one mTLS servers use on peers); return the URI subjects."""
    verifier = PolicyBuilder().store(Store([root])).time(at).build_client_verifier()
    verified = verifier.verify(chain[0], chain[1:])
    assert verified.chain[-1] == root
    return [s.value for s in verified.subjects if isinstance(s, x509.UniformResourceIdentifier)]


@pytest.fixture(scope="module")
def root_ca(tmp_path_factory: pytest.TempPathFactory) -> CA:
    return init_ca(tmp_path_factory.mktemp("root") / "ca", now=NOW)


@pytest.fixture(scope="module")
def inter_ca(tmp_path_factory: pytest.TempPathFactory) -> CA:
    return init_ca(
        tmp_path_factory.mktemp("inter") / "ca", "mesh.example", intermediate=True, now=NOW
    )


# --------------------------------------------------------------------------- init


def test_init_writes_files_with_modes(root_ca: CA) -> None:
    d = root_ca.directory
    assert mode(d) == 0o700
    assert mode(d / CA_KEY) == 0o600
    assert mode(d / TOKEN_KEY) == 0o600
    assert mode(d / CA_CERT) == 0o644
    assert json.loads((d / CA_META).read_text()) == {
        "trust_domain": "cluster.local",
        "intermediate": False,
    }
    assert not (d / INTERMEDIATE_CERT).exists()
    assert not [p for p in d.iterdir() if p.name.startswith(".")]  # no temp file left


def test_root_certificate_contents(root_ca: CA) -> None:
    root = root_ca.root
    assert root.issuer == root.subject
    assert root.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "meshproxy"
    bc = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = root.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert not ku.value.digital_signature
    assert spiffe_ids_of(root) == ["spiffe://cluster.local"]
    pub = root.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey) and pub.curve.name == "secp256r1"
    assert root.not_valid_before_utc == NOW - CLOCK_SKEW
    assert root.not_valid_after_utc == NOW + ROOT_LIFETIME
    root.verify_directly_issued_by(root)


def test_intermediate_contents_and_files(inter_ca: CA) -> None:
    d = inter_ca.directory
    assert mode(d / INTERMEDIATE_KEY) == 0o600
    assert mode(d / INTERMEDIATE_CERT) == 0o644
    inter = inter_ca.intermediate
    assert inter is not None and inter_ca.signer == inter
    inter.verify_directly_issued_by(inter_ca.root)
    bc = inter.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca and bc.path_length == 0
    assert inter.not_valid_after_utc < inter_ca.root.not_valid_after_utc
    assert spiffe_ids_of(inter) == ["spiffe://mesh.example"]
    assert json.loads((d / CA_META).read_text())["intermediate"] is True


def test_load_round_trips(root_ca: CA, inter_ca: CA) -> None:
    loaded = load_ca(root_ca.directory)
    assert loaded.root == root_ca.root and loaded.intermediate is None
    assert loaded.trust_domain == "cluster.local"
    loaded = load_ca(inter_ca.directory)
    assert loaded.intermediate == inter_ca.intermediate
    assert loaded.trust_domain == "mesh.example"
    assert "intermediate=True" in repr(loaded)


def test_root_key_can_be_offline_with_an_intermediate(tmp_path: Path) -> None:
    ca = init_ca(tmp_path / "ca", intermediate=True, now=NOW)
    (ca.directory / CA_KEY).unlink()
    loaded = load_ca(ca.directory)
    issued = issue(loaded, ID, now=NOW)
    assert verify(ca.root, certs_of(issued.cert_pem), NOW) == [ID]


def test_init_refuses_existing_ca_unless_forced(tmp_path: Path) -> None:
    first = init_ca(tmp_path / "ca", intermediate=True, now=NOW)
    with pytest.raises(CAError, match=r"already holds a CA.*--force"):
        init_ca(tmp_path / "ca", now=NOW)
    assert load_ca(tmp_path / "ca").root == first.root  # untouched
    second = init_ca(tmp_path / "ca", force=True, now=NOW)
    assert second.root != first.root
    assert not (tmp_path / "ca" / INTERMEDIATE_CERT).exists()  # stale intermediate removed
    assert load_ca(tmp_path / "ca").intermediate is None


def test_init_refuses_bad_trust_domain_and_file_as_dir(tmp_path: Path) -> None:
    with pytest.raises(CAError, match="trust domain"):
        init_ca(tmp_path / "ca", "Bad Domain")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CAError, match="not a directory"):
        init_ca(tmp_path / "file")


# --------------------------------------------------------------------------- issue


def test_workload_certificate_contents(root_ca: CA) -> None:
    issued = issue(root_ca, ID, now=NOW)
    (leaf,) = certs_of(issued.cert_pem)
    assert leaf.subject == x509.Name([])
    assert leaf.issuer == root_ca.root.subject
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert list(san.value) == [x509.UniformResourceIdentifier(ID)]
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and ku.value.key_encipherment
    assert not ku.value.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    assert leaf.not_valid_before_utc == NOW - CLOCK_SKEW
    assert leaf.not_valid_after_utc == NOW + DEFAULT_WORKLOAD_TTL == issued.not_after
    assert issued.ca_pem == root_ca.root_pem
    key = serialization.load_pem_private_key(issued.key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    assert key.public_key() == leaf.public_key()


def test_chain_verifies_to_root_and_only_in_window(root_ca: CA) -> None:
    issued = issue(root_ca, ID, timedelta(hours=2), now=NOW)
    chain = certs_of(issued.cert_pem)
    assert verify(root_ca.root, chain, NOW + timedelta(hours=1)) == [ID]
    with pytest.raises(VerificationError):
        verify(root_ca.root, chain, NOW + timedelta(hours=2, seconds=1))
    with pytest.raises(VerificationError):
        verify(root_ca.root, chain, NOW - timedelta(minutes=2))


def test_chain_through_intermediate(inter_ca: CA) -> None:
    sid = "spiffe://mesh.example/ns/shop/sa/cart"
    issued = issue(inter_ca, sid, now=NOW)
    chain = certs_of(issued.cert_pem)
    assert len(chain) == 2 and chain[1] == inter_ca.intermediate
    chain[0].verify_directly_issued_by(chain[1])
    assert verify(inter_ca.root, chain, NOW) == [sid]
    with pytest.raises(VerificationError):  # the leaf alone does not reach the root
        verify(inter_ca.root, chain[:1], NOW)


def test_certificate_from_another_ca_does_not_verify(root_ca: CA, inter_ca: CA) -> None:
    other = issue(inter_ca, "spiffe://mesh.example/ns/a/sa/b", now=NOW)
    with pytest.raises(VerificationError):
        verify(root_ca.root, certs_of(other.cert_pem), NOW)


@pytest.mark.parametrize(
    ("ttl", "fragment"),
    [
        (timedelta(0), "greater than zero"),
        (timedelta(seconds=-5), "greater than zero"),
        (ROOT_LIFETIME + timedelta(days=1), "outlives the CA"),
    ],
)
def test_bad_ttl(root_ca: CA, ttl: timedelta, fragment: str) -> None:
    with pytest.raises(CAError, match=fragment):
        issue(root_ca, ID, ttl, now=NOW)


def test_ttl_bounded_by_intermediate_and_expired_ca(inter_ca: CA) -> None:
    sid = "spiffe://mesh.example/ns/a/sa/b"
    with pytest.raises(CAError, match="outlives the CA"):
        issue(inter_ca, sid, timedelta(days=1826), now=NOW)
    with pytest.raises(CAError, match="expired"):
        issue(inter_ca, sid, now=NOW + timedelta(days=4000))


def test_bad_spiffe_id_and_other_trust_domain(root_ca: CA) -> None:
    with pytest.raises(CAError, match="path must be"):
        issue(root_ca, "spiffe://cluster.local/ns/a", now=NOW)
    with pytest.raises(CAError, match="not this CA's"):
        issue(root_ca, "spiffe://evil.local/ns/a/sa/b", now=NOW)


def test_write_issued_modes_and_atomicity(root_ca: CA, tmp_path: Path) -> None:
    out = tmp_path / "deep" / "out"
    paths = write_issued(out, issue(root_ca, ID, now=NOW))
    assert {p.name for p in paths} == {"cert.pem", "key.pem", "ca.pem"}
    assert mode(out / "key.pem") == 0o600
    assert mode(out / "cert.pem") == 0o644
    assert mode(out / "ca.pem") == 0o644
    # a rewrite replaces the inode (rename), so a reader holding the old file sees it whole
    before = (out / "key.pem").stat().st_ino
    write_issued(out, issue(root_ca, ID, now=NOW))
    assert (out / "key.pem").stat().st_ino != before
    assert sorted(p.name for p in out.iterdir()) == ["ca.pem", "cert.pem", "key.pem"]


def test_atomic_write_key_mode_ignores_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        atomic_write(tmp_path / "k", b"secret", 0o600)
        atomic_write(tmp_path / "c", b"cert", 0o644)
    finally:
        os.umask(old)
    assert mode(tmp_path / "k") == 0o600 and mode(tmp_path / "c") == 0o644


def test_atomic_write_into_missing_dir_is_a_ca_error(tmp_path: Path) -> None:
    with pytest.raises(CAError, match="cannot write"):
        atomic_write(tmp_path / "nope" / "x", b"", 0o644)


# --------------------------------------------------------------------------- load errors


def test_load_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(CAError, match="no such CA directory"):
        load_ca(tmp_path / "missing")


def test_load_not_a_ca_dir(tmp_path: Path) -> None:
    with pytest.raises(CAError, match="not a CA directory"):
        load_ca(tmp_path)
    (tmp_path / "f").write_text("")
    with pytest.raises(CAError, match="not a directory"):
        load_ca(tmp_path / "f")


def test_load_corrupt_files(tmp_path: Path) -> None:
    d = init_ca(tmp_path / "ca", now=NOW).directory
    (d / CA_KEY).write_text("garbage")
    with pytest.raises(CAError, match=r"ca-key.pem: not an unencrypted PEM private key"):
        load_ca(d)
    (d / CA_CERT).write_text("garbage")
    with pytest.raises(CAError, match=r"ca.pem: not a PEM certificate"):
        load_ca(d)


def test_load_missing_key_and_mismatched_key(tmp_path: Path) -> None:
    a = init_ca(tmp_path / "a", now=NOW).directory
    b = init_ca(tmp_path / "b", now=NOW).directory
    (a / CA_KEY).write_bytes((b / CA_KEY).read_bytes())
    with pytest.raises(CAError, match="does not match its private key"):
        load_ca(a)
    (a / CA_KEY).unlink()
    with pytest.raises(CAError, match=r"ca-key.pem: no such file"):
        load_ca(a)


def test_load_bad_metadata(tmp_path: Path) -> None:
    d = init_ca(tmp_path / "ca", now=NOW).directory
    (d / CA_META).write_text("{not json")
    with pytest.raises(CAError, match="not valid CA metadata"):
        load_ca(d)
    (d / CA_META).unlink()  # falls back to the root's SPIFFE SAN
    assert load_ca(d).trust_domain == "cluster.local"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_load_unreadable_key(tmp_path: Path) -> None:
    d = init_ca(tmp_path / "ca", now=NOW).directory
    (d / CA_KEY).chmod(0)
    with pytest.raises(CAError, match="permission denied"):
        load_ca(d)


def test_load_intermediate_not_from_root(tmp_path: Path) -> None:
    a = init_ca(tmp_path / "a", intermediate=True, now=NOW).directory
    b = init_ca(tmp_path / "b", intermediate=True, now=NOW).directory
    for name in (INTERMEDIATE_CERT, INTERMEDIATE_KEY):
        (a / name).write_bytes((b / name).read_bytes())
    with pytest.raises(CAError, match="not issued by"):
        load_ca(a)


# --------------------------------------------------------------------------- CSR signing


def test_sign_csr(inter_ca: CA) -> None:
    sid = "spiffe://mesh.example/ns/shop/sa/cart"
    key = ec.generate_private_key(ec.SECP256R1())
    chain_pem = sign_csr(inter_ca, make_csr(key, sid), sid, timedelta(hours=1), now=NOW)
    chain = certs_of(chain_pem)
    assert chain[0].public_key() == key.public_key()
    assert chain[0].not_valid_after_utc == NOW + timedelta(hours=1)
    assert verify(inter_ca.root, chain, NOW) == [sid]


def test_sign_csr_accepts_str_and_rsa(root_ca: CA) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = sign_csr(root_ca, make_csr(key, ID).decode(), ID, now=NOW)
    assert spiffe_ids_of(certs_of(pem)[0]) == [ID]


def test_sign_csr_refuses_another_identity(root_ca: CA) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = make_csr(key, "spiffe://cluster.local/ns/default/sa/admin")
    with pytest.raises(CAError, match=re.escape("may only have " + ID)):
        sign_csr(root_ca, csr, ID, now=NOW)


def _csr(key: ec.EllipticCurvePrivateKey, names: list[x509.GeneralName] | None) -> bytes:
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if names is not None:
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=True)
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_sign_csr_refuses_extra_names_or_none(root_ca: CA) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    extra = _csr(key, [x509.UniformResourceIdentifier(ID), x509.DNSName("evil.example")])
    with pytest.raises(CAError, match=r"evil.example"):
        sign_csr(root_ca, extra, ID, now=NOW)
    with pytest.raises(CAError, match="no SAN"):
        sign_csr(root_ca, _csr(key, None), ID, now=NOW)


def test_sign_csr_refuses_bad_signature_garbage_and_weak_keys(root_ca: CA) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    good = x509.load_pem_x509_csr(make_csr(key, ID))
    der = bytearray(good.public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01  # flip a bit inside the signature
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(CAError, match="signature does not verify"):
        sign_csr(root_ca, tampered, ID, now=NOW)
    with pytest.raises(CAError, match="not a PEM certificate signing request"):
        sign_csr(root_ca, b"hello", ID, now=NOW)
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(CAError, match="too small"):
        sign_csr(root_ca, make_csr(weak, ID), ID, now=NOW)
    curve = ec.generate_private_key(ec.SECP521R1())
    with pytest.raises(CAError, match="not accepted"):
        sign_csr(root_ca, make_csr(curve, ID), ID, now=NOW)


def test_sign_csr_refuses_ed25519(root_ca: CA) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(ID)]), True)
        .sign(key, None)
        .public_bytes(serialization.Encoding.PEM)
    )
    with pytest.raises(CAError, match="not accepted"):
        sign_csr(root_ca, csr, ID, now=NOW)


def test_sign_csr_bad_ttl_and_id(root_ca: CA) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(CAError, match="greater than zero"):
        sign_csr(root_ca, make_csr(key, ID), ID, timedelta(0), now=NOW)
    with pytest.raises(CAError, match="not this CA's"):
        sign_csr(root_ca, make_csr(key, ID), "spiffe://x.local/ns/a/sa/b", now=NOW)


def test_sign_csr_for_token(tmp_path: Path) -> None:
    ca = init_ca(tmp_path / "ca", now=NOW)
    tkey = load_token_key(ca.directory)
    token = make_token(tkey, "cluster.local", "default", "reviews", now=NOW.timestamp())
    key = ec.generate_private_key(ec.SECP256R1())
    chain = certs_of(sign_csr_for_token(ca, make_csr(key, ID), token, now=NOW))
    assert verify(ca.root, chain, NOW) == [ID]
    # the token entitles reviews only: a CSR for another account is refused
    other = make_csr(key, "spiffe://cluster.local/ns/default/sa/ratings")
    with pytest.raises(CAError, match="may only have"):
        sign_csr_for_token(ca, other, token, now=NOW)
    with pytest.raises(TokenError, match="expired"):
        sign_csr_for_token(ca, make_csr(key, ID), token, now=NOW + timedelta(days=2))
    foreign = make_token(tkey, "other.local", "default", "reviews", now=NOW.timestamp())
    with pytest.raises(TokenError, match="trust domain"):
        sign_csr_for_token(ca, make_csr(key, ID), foreign, now=NOW)
    flipped = "B" if token[-10] == "A" else "A"  # a middle MAC character: full 6 bits
    forged = token[:-10] + flipped + token[-9:]
    with pytest.raises(TokenError, match="signature"):
        sign_csr_for_token(ca, make_csr(key, ID), forged, now=NOW)


# --------------------------------------------------------------------------- server certificates


def test_host_sans() -> None:
    from certs.ca import host_sans

    got = host_sans(["cp.Example.com.", "127.0.0.1", "[::1]", "0.0.0.0", "::", "", "127.0.0.1"])
    assert [str(n.value) for n in got] == ["cp.example.com", "127.0.0.1", "::1"]
    assert isinstance(got[0], x509.DNSName) and isinstance(got[1], x509.IPAddress)
    assert host_sans(["*.mesh.local"]) == (x509.DNSName("*.mesh.local"),)
    for bad in ("a b", "-x.com", "x..y", "a" * 64 + ".com", "http://x"):
        with pytest.raises(CAError, match="neither an IP address nor a DNS name"):
            host_sans([bad])


def test_issue_server_has_the_spiffe_id_then_the_hosts(tmp_path: Path) -> None:
    from certs.ca import issue_server

    ca = init_ca(tmp_path / "ca", now=NOW, intermediate=True)
    sid = "spiffe://cluster.local/ns/istio-system/sa/meshproxy-control"
    got = issue_server(ca, sid, ["localhost", "10.0.0.1"], timedelta(hours=2), now=NOW)
    chain = certs_of(got.cert_pem)
    assert len(chain) == 2
    leaf = chain[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    first, *rest = san.value
    assert first == x509.UniformResourceIdentifier(sid)
    assert [str(n.value) for n in rest] == ["localhost", "10.0.0.1"]
    assert leaf.not_valid_after_utc == NOW + timedelta(hours=2)
    # a server profile verifier accepts it for its DNS name
    from cryptography.x509.verification import PolicyBuilder, Store

    verifier = (
        PolicyBuilder()
        .store(Store([ca.root]))
        .time(NOW)
        .build_server_verifier(x509.DNSName("localhost"))
    )
    verifier.verify(leaf, chain[1:])
    with pytest.raises(CAError, match="outlives the CA"):
        issue_server(ca, sid, ["localhost"], timedelta(days=100_000), now=NOW)


def test_remaining_lifetime_and_renewal_time(tmp_path: Path) -> None:
    from certs.ca import remaining_lifetime, renewal_time

    ca = init_ca(tmp_path / "ca", now=NOW)
    assert remaining_lifetime(ca, NOW) == ROOT_LIFETIME
    assert renewal_time(NOW, NOW + timedelta(seconds=4)) == NOW + timedelta(seconds=2)
    assert renewal_time(NOW, NOW - timedelta(seconds=4)) == NOW  # expired: renew now
