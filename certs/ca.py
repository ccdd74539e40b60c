"""The mesh certificate authority: a root CA, an optional intermediate, SPIFFE workload certs.

Theory of operation
-------------------
A CA directory holds (``ca init`` writes them):

* ``ca.pem`` -- the self-signed root (ECDSA P-256, CA:TRUE, keyCertSign+cRLSign, 10 years,
  subject ``O=meshproxy, CN=meshproxy root CA``, URI SAN ``spiffe://<trust-domain>`` as the
  SPIFFE X509-SVID spec allows for signing certificates); ``ca-key.pem`` its key (0600).
* with ``--intermediate``: ``intermediate.pem`` / ``intermediate-key.pem`` (CA:TRUE,
  pathlen 0, 5 years, signed by the root). Workload certificates are then signed by the
  intermediate and the root key is never read again: it can be moved offline.
* ``ca.json`` -- ``{"trust_domain": ..., "intermediate": bool}``.
* ``token.key`` -- the HMAC secret of bootstrap tokens (see :mod:`certs.token`), 0600.

:func:`load_ca` reads a directory into a frozen :class:`CA`. :func:`issue` makes a key pair
and a workload certificate shaped like Istio's (``security/pkg/pki/util``): empty subject,
the SPIFFE URI as the only SAN (critical, since the subject is empty), key usage
digitalSignature+keyEncipherment (critical), EKU serverAuth+clientAuth, CA:FALSE (critical),
SKI/AKI. Its ``cert_pem`` is the leaf followed by the intermediate (if any), so a TLS peer
receives the whole chain; ``ca_pem`` is the root, the trust anchor a peer verifies against.
:func:`sign_csr` does the same for a CSR (the control plane's signing path): it checks the
CSR's self-signature, that its only SAN is exactly the entitled SPIFFE id, and that its key is
acceptable; anything else is refused with :class:`CAError` and nothing is signed.
:func:`issue_server` is :func:`issue` plus DNS/IP SANs, for the control plane's own TLS
certificate (clients check its hostname as well as the mesh chain).

Validity: ``not_before`` is back-dated by :data:`CLOCK_SKEW` so a peer with a slightly slow
clock accepts a fresh certificate; ``not_after`` is ``now + ttl`` and must not outlive the
signing CA. ``now`` is an argument everywhere so tests need no clock.

Everything here is plain blocking code (key generation, signing, file I/O): the data plane and
the control plane call it off their event loop with ``asyncio.to_thread``. Files are written
atomically (temporary file in the same directory, fsync, rename) so a watcher never sees half
a file, and private keys are created with mode 0600 -- the temporary file is born with that
mode, it is never chmod'ed after the key is in it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import secrets
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certs.spiffe import (
    DEFAULT_TRUST_DOMAIN,
    CAError,
    SpiffeId,
    check_trust_domain,
    format_duration,
    parse_spiffe_id,
)

ROOT_LIFETIME = timedelta(days=3650)
INTERMEDIATE_LIFETIME = timedelta(days=1825)
DEFAULT_WORKLOAD_TTL = timedelta(hours=24)
CLOCK_SKEW = timedelta(minutes=1)
MIN_RSA_BITS = 2048
ACCEPTED_CURVES = (ec.SECP256R1, ec.SECP384R1)
TOKEN_KEY_BYTES = 32
_DNS_NAME_RE = re.compile(
    r"(?:\*\.)?[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)

CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"
INTERMEDIATE_CERT = "intermediate.pem"
INTERMEDIATE_KEY = "intermediate-key.pem"
CA_META = "ca.json"
TOKEN_KEY = "token.key"
OUT_CERT = "cert.pem"
OUT_KEY = "key.pem"
OUT_CA = "ca.pem"

KEY_MODE = 0o600
CERT_MODE = 0o644
DIR_MODE = 0o700

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

__all__ = [
    "CA",
    "CA_CERT",
    "CA_KEY",
    "CA_META",
    "DEFAULT_TRUST_DOMAIN",
    "DEFAULT_WORKLOAD_TTL",
    "INTERMEDIATE_CERT",
    "INTERMEDIATE_KEY",
    "OUT_CA",
    "OUT_CERT",
    "OUT_KEY",
    "TOKEN_KEY",
    "CAError",
    "IssuedCert",
    "atomic_write",
    "generate_key",
    "host_sans",
    "init_ca",
    "issue",
    "issue_server",
    "load_ca",
    "make_csr",
    "remaining_lifetime",
    "renewal_time",
    "sign_csr",
    "sign_csr_for_token",
    "spiffe_ids_of",
    "write_issued",
]


# --------------------------------------------------------------------------- data


@dataclass(frozen=True, slots=True)
class CA:
    """A loaded CA directory: what signs workload certificates and what peers trust."""

    directory: Path
    trust_domain: str
    root: x509.Certificate
    signer: x509.Certificate  # the intermediate when there is one, else the root
    signer_key: PrivateKey
    intermediate: x509.Certificate | None = None

    @property
    def root_pem(self) -> bytes:
        return self.root.public_bytes(serialization.Encoding.PEM)

    @property
    def chain_pem(self) -> bytes:
        """What follows a leaf in its cert file: the intermediate, or nothing."""
        if self.intermediate is None:
            return b""
        return self.intermediate.public_bytes(serialization.Encoding.PEM)

    def __repr__(self) -> str:
        return (
            f"CA(dir={str(self.directory)!r}, trust_domain={self.trust_domain!r}, "
            f"intermediate={self.intermediate is not None}, "
            f"expires={self.signer.not_valid_after_utc.isoformat()})"
        )


@dataclass(frozen=True, slots=True)
class IssuedCert:
    """A workload identity as written to ``--out``: cert chain, key and trust anchor (PEM)."""

    spiffe_id: str
    cert_pem: bytes  # leaf + intermediate (if any)
    key_pem: bytes
    ca_pem: bytes  # the root
    not_after: datetime


# --------------------------------------------------------------------------- files


def atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` via a same-directory temp file + rename, born with ``mode``.

    The temp file is created 0600 by ``mkstemp``; for a wider ``mode`` it is fchmod'ed while
    still empty, so a private key is never readable by others at any moment.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise CAError(f"{path.parent}: cannot write there: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            if mode != KEY_MODE:
                os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise CAError(f"{path}: cannot write: {e.strerror or e}") from None
    with contextlib.suppress(OSError):
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _ensure_dir(path: Path, mode: int) -> None:
    if path.exists() and not path.is_dir():
        raise CAError(f"{path}: exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True, mode=mode)
    except OSError as e:
        raise CAError(f"{path}: cannot create directory: {e.strerror or e}") from None


def read_file(path: Path, error: type[Exception] = CAError) -> bytes:
    """``path``'s bytes; a file that cannot be read raises ``error`` with a message naming it
    (for the CA's files, and for the workload identity ``meshproxy.tls`` loads)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except PermissionError:
        raise error(f"{path}: permission denied") from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory, expected a file") from None
    except OSError as e:
        raise error(f"{path}: cannot read: {e.strerror or e}") from None


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(read_file(path))
    except ValueError:
        raise CAError(f"{path}: not a PEM certificate") from None


def _load_key(path: Path) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(read_file(path), password=None)
    except (ValueError, TypeError):
        raise CAError(f"{path}: not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CAError(f"{path}: unsupported key type (ECDSA or RSA expected)")
    return key


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


# --------------------------------------------------------------------------- keys, names


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 key (blocking; call via ``asyncio.to_thread`` on a loop)."""
    return ec.generate_private_key(ec.SECP256R1())


def _hash_for(key: PrivateKey) -> hashes.HashAlgorithm:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def _now(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    return now if now.tzinfo else now.replace(tzinfo=UTC)


def _ca_name(trust_domain: str, cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshproxy"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, trust_domain),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _ca_cert(
    *,
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    issuer: x509.Certificate | None,
    issuer_key: PrivateKey,
    trust_domain: str,
    not_before: datetime,
    not_after: datetime,
    path_length: int | None,
) -> x509.Certificate:
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer is not None else subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
            ),
            critical=False,
        )
    )
    if issuer is not None:
        b = b.add_extension(_aki(issuer), critical=False)
    return b.sign(issuer_key, _hash_for(issuer_key))


def _aki(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key())  # type: ignore[arg-type]


# --------------------------------------------------------------------------- init / load


def init_ca(
    directory: str | os.PathLike[str],
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    *,
    intermediate: bool = False,
    force: bool = False,
    now: datetime | None = None,
) -> CA:
    """Create a CA in ``directory`` (created 0700 if missing); refuse to replace one unless
    ``force``. Returns the loaded :class:`CA`."""
    d = Path(directory)
    check_trust_domain(trust_domain)
    _ensure_dir(d, DIR_MODE)
    if not force:
        for name in (CA_CERT, CA_KEY, INTERMEDIATE_CERT, CA_META):
            if (d / name).exists():
                raise CAError(f"{d} already holds a CA ({name}); use --force to replace it")
    t = _now(now)
    not_before = t - CLOCK_SKEW
    root_key = generate_key()
    root_name = _ca_name(trust_domain, "meshproxy root CA")
    root = _ca_cert(
        subject=root_name,
        public_key=root_key.public_key(),
        issuer=None,
        issuer_key=root_key,
        trust_domain=trust_domain,
        not_before=not_before,
        not_after=t + ROOT_LIFETIME,
        path_length=None,
    )
    inter: x509.Certificate | None = None
    inter_key: ec.EllipticCurvePrivateKey | None = None
    if intermediate:
        inter_key = generate_key()
        inter = _ca_cert(
            subject=_ca_name(trust_domain, "meshproxy intermediate CA"),
            public_key=inter_key.public_key(),
            issuer=root,
            issuer_key=root_key,
            trust_domain=trust_domain,
            not_before=not_before,
            not_after=t + INTERMEDIATE_LIFETIME,
            path_length=0,
        )
    # keys first, metadata last: a directory with ca.json is complete
    atomic_write(d / CA_KEY, _key_pem(root_key), KEY_MODE)
    atomic_write(d / CA_CERT, _cert_pem(root), CERT_MODE)
    if inter is not None and inter_key is not None:
        atomic_write(d / INTERMEDIATE_KEY, _key_pem(inter_key), KEY_MODE)
        atomic_write(d / INTERMEDIATE_CERT, _cert_pem(inter), CERT_MODE)
    else:
        for name in (INTERMEDIATE_CERT, INTERMEDIATE_KEY):
            with contextlib.suppress(FileNotFoundError):
                (d / name).unlink()
    atomic_write(d / TOKEN_KEY, secrets.token_hex(TOKEN_KEY_BYTES).encode() + b"\n", KEY_MODE)
    meta = {"trust_domain": trust_domain, "intermediate": inter is not None}
    atomic_write(d / CA_META, (json.dumps(meta, indent=2) + "\n").encode(), CERT_MODE)
    return CA(
        directory=d,
        trust_domain=trust_domain,
        root=root,
        signer=inter if inter is not None else root,
        signer_key=inter_key if inter_key is not None else root_key,
        intermediate=inter,
    )


def _trust_domain_of(cert: x509.Certificate) -> str | None:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith("spiffe://"):
            return uri[len("spiffe://") :].rstrip("/")
    return None


def _check_key_matches(cert: x509.Certificate, key: PrivateKey, cert_path: Path) -> None:
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(
        serialization.Encoding.DER, pub
    ) != key.public_key().public_bytes(serialization.Encoding.DER, pub):
        raise CAError(f"{cert_path}: does not match its private key")


def load_ca(directory: str | os.PathLike[str]) -> CA:
    """Read a CA directory written by :func:`init_ca`. With an intermediate, the root key is
    not read (it may be offline)."""
    d = Path(directory)
    if not d.exists():
        raise CAError(f"{d}: no such CA directory (create one with: meshproxy ca init --dir {d})")
    if not d.is_dir():
        raise CAError(f"{d}: not a directory")
    if not os.access(d, os.R_OK | os.X_OK):
        raise CAError(f"{d}: permission denied")
    if not (d / CA_CERT).exists():
        raise CAError(f"{d}: not a CA directory (no {CA_CERT}; run: meshproxy ca init --dir {d})")
    root = _load_cert(d / CA_CERT)
    trust_domain: str | None = None
    meta_path = d / CA_META
    if meta_path.exists():
        try:
            meta = json.loads(read_file(meta_path))
            trust_domain = meta["trust_domain"] if isinstance(meta, dict) else None
        except (ValueError, KeyError):
            raise CAError(f"{meta_path}: not valid CA metadata") from None
        if not isinstance(trust_domain, str):
            raise CAError(f"{meta_path}: trust_domain must be a string")
    if trust_domain is None:
        trust_domain = _trust_domain_of(root)
    if trust_domain is None:
        raise CAError(f"{d}: cannot tell the trust domain (no {CA_META}, no SPIFFE SAN)")
    check_trust_domain(trust_domain)
    if (d / INTERMEDIATE_CERT).exists():
        inter = _load_cert(d / INTERMEDIATE_CERT)
        key = _load_key(d / INTERMEDIATE_KEY)
        _check_key_matches(inter, key, d / INTERMEDIATE_CERT)
        try:
            inter.verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature):
            raise CAError(f"{d / INTERMEDIATE_CERT}: not issued by {d / CA_CERT}") from None
        return CA(d, trust_domain, root, inter, key, inter)
    key = _load_key(d / CA_KEY)
    _check_key_matches(root, key, d / CA_CERT)
    return CA(d, trust_domain, root, root, key, None)


# --------------------------------------------------------------------------- issuing


def _check_ttl(ca: CA, ttl: timedelta, now: datetime) -> datetime:
    if ttl <= timedelta(0):
        raise CAError(f"TTL {format_duration(ttl)} must be greater than zero")
    not_after = now + ttl
    ca_end = ca.signer.not_valid_after_utc
    if now >= ca_end:
        raise CAError(f"the CA certificate expired at {ca_end.isoformat()}")
    if not_after > ca_end:
        raise CAError(
            f"TTL {format_duration(ttl)} outlives the CA (it expires in "
            f"{format_duration(ca_end - now)}, at {ca_end.isoformat()})"
        )
    if now < ca.signer.not_valid_before_utc:
        raise CAError(f"the CA certificate is not valid before {ca.signer.not_valid_before_utc}")
    return not_after


def _workload_cert(
    ca: CA,
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
    sid: SpiffeId,
    ttl: timedelta,
    now: datetime,
    extra_sans: tuple[x509.GeneralName, ...] = (),
) -> x509.Certificate:
    not_after = _check_ttl(ca, ttl, now)
    not_before = max(now - CLOCK_SKEW, ca.signer.not_valid_before_utc)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.signer.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(sid.uri), *extra_sans]),
            critical=True,  # the subject is empty (RFC 5280 4.2.1.6)
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(_aki(ca.signer), critical=False)
        .sign(ca.signer_key, _hash_for(ca.signer_key))
    )


def issue(
    ca: CA,
    spiffe_id: str,
    ttl: timedelta = DEFAULT_WORKLOAD_TTL,
    *,
    now: datetime | None = None,
) -> IssuedCert:
    """A new key pair and workload certificate for ``spiffe_id`` (blocking)."""
    sid = parse_spiffe_id(spiffe_id, ca.trust_domain)
    t = _now(now)
    _check_ttl(ca, ttl, t)  # before spending a key generation
    key = generate_key()
    cert = _workload_cert(ca, key.public_key(), sid, ttl, t)
    return IssuedCert(
        spiffe_id=sid.uri,
        cert_pem=_cert_pem(cert) + ca.chain_pem,
        key_pem=_key_pem(key),
        ca_pem=ca.root_pem,
        not_after=cert.not_valid_after_utc,
    )


def host_sans(hosts: list[str] | tuple[str, ...]) -> tuple[x509.GeneralName, ...]:
    """DNS and IP SANs for ``hosts`` (names or literal addresses, ``[v6]`` allowed), in order,
    without duplicates; the unspecified addresses (``0.0.0.0``, ``::``, empty) are skipped,
    since no client connects to them. Raises :class:`CAError` for a name that is not a valid
    DNS name."""
    out: list[x509.GeneralName] = []
    for raw in hosts:
        h = raw.strip().strip("[]").rstrip(".")
        if not h:
            continue
        try:
            ip = ipaddress.ip_address(h)
        except ValueError:
            if not _DNS_NAME_RE.fullmatch(h) or len(h) > 253:
                raise CAError(f"{raw!r} is neither an IP address nor a DNS name") from None
            name: x509.GeneralName = x509.DNSName(h.lower())
        else:
            if ip.is_unspecified:
                continue
            name = x509.IPAddress(ip)
        if name not in out:
            out.append(name)
    return tuple(out)


def issue_server(
    ca: CA,
    spiffe_id: str,
    hosts: list[str] | tuple[str, ...],
    ttl: timedelta = DEFAULT_WORKLOAD_TTL,
    *,
    now: datetime | None = None,
) -> IssuedCert:
    """Like :func:`issue`, for a server that clients reach by name or address (the control
    plane's API): the SPIFFE URI first, then a DNS or IP SAN for each of ``hosts`` (see
    :func:`host_sans`), so a client checking the hostname (Python's ``check_hostname``) and a
    mesh peer checking the SPIFFE id both accept it (blocking)."""
    sid = parse_spiffe_id(spiffe_id, ca.trust_domain)
    extra = host_sans(hosts)
    t = _now(now)
    _check_ttl(ca, ttl, t)
    key = generate_key()
    cert = _workload_cert(ca, key.public_key(), sid, ttl, t, extra)
    return IssuedCert(
        spiffe_id=sid.uri,
        cert_pem=_cert_pem(cert) + ca.chain_pem,
        key_pem=_key_pem(key),
        ca_pem=ca.root_pem,
        not_after=cert.not_valid_after_utc,
    )


def remaining_lifetime(ca: CA, now: datetime | None = None) -> timedelta:
    """How long the signing CA certificate stays valid from ``now`` (the longest TTL it can
    still sign; zero or negative once it expired)."""
    return ca.signer.not_valid_after_utc - _now(now)


def renewal_time(issued_at: datetime, not_after: datetime) -> datetime:
    """When a certificate received at ``issued_at`` should be renewed: half way to
    ``not_after``. Measured from when it was obtained, not from ``notBefore``, which is
    back-dated by :data:`CLOCK_SKEW` and would make a short-lived certificate look half spent
    the moment it arrives."""
    return issued_at + max(not_after - issued_at, timedelta(0)) / 2


def write_issued(out_dir: str | os.PathLike[str], issued: IssuedCert) -> list[Path]:
    """Write ``cert.pem``, ``key.pem`` (0600) and ``ca.pem`` into ``out_dir`` (created if
    missing). The key goes first and the cert last, so a watcher keyed on ``cert.pem`` reads a
    matching key."""
    d = Path(out_dir)
    _ensure_dir(d, 0o755)
    written = [d / OUT_KEY, d / OUT_CA, d / OUT_CERT]
    atomic_write(written[0], issued.key_pem, KEY_MODE)
    atomic_write(written[1], issued.ca_pem, CERT_MODE)
    atomic_write(written[2], issued.cert_pem, CERT_MODE)
    return written


def spiffe_ids_of(cert_or_csr: x509.Certificate | x509.CertificateSigningRequest) -> list[str]:
    """The URI SANs of a certificate or CSR (empty when it has none)."""
    try:
        san = cert_or_csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def _check_public_key(pub: object) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    if isinstance(pub, ec.EllipticCurvePublicKey):
        if not isinstance(pub.curve, ACCEPTED_CURVES):
            raise CAError(f"CSR key curve {pub.curve.name} is not accepted (P-256 or P-384)")
        return pub
    if isinstance(pub, rsa.RSAPublicKey):
        if pub.key_size < MIN_RSA_BITS:
            raise CAError(f"CSR RSA key of {pub.key_size} bits is too small (>= {MIN_RSA_BITS})")
        return pub
    raise CAError("CSR key type is not accepted (ECDSA P-256/P-384 or RSA >= 2048)")


def sign_csr(
    ca: CA,
    csr_pem: bytes | str,
    spiffe_id: str,
    ttl: timedelta = DEFAULT_WORKLOAD_TTL,
    *,
    now: datetime | None = None,
) -> bytes:
    """Sign a PEM CSR for ``spiffe_id``; returns the certificate chain PEM (leaf +
    intermediate). Refuses (CAError, nothing signed) a CSR that is malformed, not signed by its
    own key, asks for any name other than exactly ``spiffe_id``, or has a weak key."""
    sid = parse_spiffe_id(spiffe_id, ca.trust_domain)
    data = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError:
        raise CAError("not a PEM certificate signing request") from None
    try:
        valid = csr.is_signature_valid
    except (ValueError, TypeError, UnsupportedAlgorithm):  # e.g. an unsupported key type
        valid = False
    if not valid:
        raise CAError("the CSR's signature does not verify with its own key")
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CAError(f"the CSR carries no SAN; it must ask for {sid.uri}") from None
    except ValueError:
        raise CAError("the CSR's extensions are malformed") from None
    names = list(san)
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if uris != [sid.uri] or len(names) != 1:
        asked = ", ".join(str(getattr(n, "value", n)) for n in names) or "nothing"
        raise CAError(f"the CSR asks for {asked}; this request may only have {sid.uri}")
    pub = _check_public_key(csr.public_key())
    cert = _workload_cert(ca, pub, sid, ttl, _now(now))
    return _cert_pem(cert) + ca.chain_pem


def make_csr(key: PrivateKey, spiffe_id: str) -> bytes:
    """A PEM CSR for ``spiffe_id`` signed by ``key`` (what a sidecar sends to the CA)."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
            critical=True,
        )
        .sign(key, _hash_for(key))
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def sign_csr_for_token(
    ca: CA,
    csr_pem: bytes | str,
    token: str,
    ttl: timedelta = DEFAULT_WORKLOAD_TTL,
    *,
    now: datetime | None = None,
) -> bytes:
    """The control plane's whole signing decision: verify the bootstrap ``token`` with this
    CA's ``token.key`` and trust domain, then :func:`sign_csr` for exactly the SPIFFE id it
    entitles. Raises :class:`certs.token.TokenError` for a bad token and :class:`CAError` for a
    CSR asking for anything else; in both cases nothing is signed (answer 403)."""
    from certs.token import verify_token

    t = _now(now)
    ns, sa = verify_token(ca.directory, token, trust_domain=ca.trust_domain, now=t.timestamp())
    return sign_csr(ca, csr_pem, SpiffeId(ca.trust_domain, ns, sa).uri, ttl, now=t)
