"""Workload identities that ``certs.ca.issue`` would refuse to make, for tests that need them.

``certs.ca.issue`` makes one SPIFFE URI per certificate, valid from now on, which is what a
mesh should hand out. Some tests need a certificate the CA would not issue: one that expired
an hour ago (no sleeping for a short TTL to run out), or one naming several SPIFFE ids.
:func:`forge_identity` builds such a leaf with the CA's own signing key, shaped otherwise as
``ca issue`` makes them (empty subject, critical URI SubjectAltName, KeyUsage
digitalSignature + keyEncipherment, serverAuth + clientAuth, ECDSA P-256 key, the chain after
the leaf), and writes it as ``ca issue --out`` does (``cert.pem``, ``key.pem`` 0600,
``ca.pem``).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from certs.ca import CA, IssuedCert, generate_key, write_issued


def forge_identity(
    ca: CA, out: Path, uris: Sequence[str], not_before: datetime, not_after: datetime
) -> Path:
    """Write into ``out`` a workload identity signed by ``ca`` naming ``uris`` (the first is
    its SPIFFE id), valid from ``not_before`` to ``not_after``; returns ``out``."""
    key = generate_key()
    usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=True,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris])
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.signer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(eku, critical=False)
        .add_extension(san, critical=True)
        .sign(ca.signer_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    issued = IssuedCert(
        spiffe_id=uris[0],
        cert_pem=cert.public_bytes(pem) + ca.chain_pem,
        key_pem=key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        ca_pem=ca.root_pem,
        not_after=cert.not_valid_after_utc,
    )
    write_issued(out, issued)
    return out
