"""Workload identity (``--cert-dir``), TLS contexts and the helpers of outbound TLS.

Theory of operation
-------------------
A workload identity is three PEM files in one directory: ``cert.pem`` (the leaf first, then any
intermediates), ``key.pem`` and ``ca.pem`` (the trust bundle, possibly several roots while a
root rotates). :func:`load_identity` reads them once, checks everything a user can get wrong
(missing or unreadable file, key not matching the leaf, no SPIFFE URI SAN, a leaf not yet valid
or expired, a bundle without certificates, a leaf that does not chain to the bundle) and raises
:class:`IdentityError` naming the file; on success it builds, from the very bytes it checked,
the two ``ssl`` contexts the data plane needs and freezes everything into a
:class:`WorkloadIdentity`:

* ``server_context`` -- the inbound listener's: our chain, client certificates required and
  verified against every root of ``ca.pem``; TLS >= 1.2; no hostname check (peers are SPIFFE
  ids, read with :func:`peer_spiffe_id` after the handshake);
* ``client_context`` -- ISTIO_MUTUAL upstreams': our chain, the server verified against
  ``ca.pem``, no hostname check (the caller checks the peer's SPIFFE id after the handshake).

Whatever the parsing libraries raise about a file (a malformed extension is a ``ValueError``,
an unknown algorithm ``UnsupportedAlgorithm``) becomes an :class:`IdentityError` naming it:
a user's bad file is never a traceback.

It is blocking (file reads, parsing, signature checks): the data plane calls it through
:meth:`IdentityStore.load_initial_async` at start-up (loaded in a thread, swapped on the loop)
and off the loop afterwards. An :class:`IdentityStore` holds the live identity, polls the
three files' ``(mtime_ns, size, inode)`` every ``poll_interval`` and reloads off the loop when
one changes; a good set is swapped in one reference store (``current``, ``generation`` + 1,
subscribers called, always on the thread that swaps: the loop's), a bad one is logged once
per distinct error and the previous identity stays live. The watcher survives anything a
poll raises (an unexpected exception is logged with its traceback, and polling goes on).
Writers that replace files one at a time (cert first, key second) make a
key/cert mismatch visible for a moment: that is "transient" and only retried at the next poll
(logged at debug level, error level only when it persists for ``mismatch_grace`` polls).

An identity that does not come from files (the control plane signs it: see
:mod:`meshproxy.certclient`) is checked the same way by :func:`identity_from_pem` and made
live with :meth:`IdentityStore.publish`, which swaps and notifies exactly as a reload does.

Outbound TLS session resumption needs no help from here: the data plane's record layer
(:class:`meshproxy.net.tlsproto.TlsLayer`) passes the saved session to ``wrap_bio`` itself; a
session belongs to the context that made it, so the pool keeps it with the TLS key it was
made under.

Peer names: :func:`san_matches` implements the post-handshake check of configured
``subjectAltNames`` (URI exact, DNS with a certificate wildcard in the leftmost label, IP).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import os
import ssl
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from certs.ca import read_file

log = logging.getLogger(__name__)

CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
CA_FILE = "ca.pem"
IDENTITY_FILES = (CERT_FILE, KEY_FILE, CA_FILE)


class IdentityError(Exception):
    """A workload identity that cannot be used; the message names the file and the problem.

    ``transient`` marks the state a non-atomic writer leaves between two file writes (the
    key does not match the certificate yet): a watcher retries it quietly."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


# --------------------------------------------------------------------------- contexts


#: Envoy's default cipher suites for TLS 1.2, in its order of preference.
TLS12_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305:"
    "ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-CHACHA20-POLY1305:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384"
)

#: The newest TLS version an upstream connection offers: Envoy's client default (its
#: ``tls_maximum_protocol_version`` for upstreams is TLS 1.2; Istio's sidecars keep it, so
#: sidecar-to-sidecar mTLS is TLS 1.2 unless the mesh asks for 1.3). It is also what makes the
#: record layer cheap here: OpenSSL 3.0 handles a TLS 1.2 record in about half the time of a
#: TLS 1.3 one, and resumes a TLS 1.2 session without a key exchange.
CLIENT_MAX_VERSION = ssl.TLSVersion.TLSv1_2


def _harden(ctx: ssl.SSLContext) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION
    # no TLS 1.2 renegotiation (BoringSSL, so Envoy, refuses it too): a record layer over
    # memory BIOs would have to handle a write that needs a read first
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    # Envoy's (BoringSSL's) default TLS 1.2 suites, in its order: AES-128 first
    ctx.set_ciphers(TLS12_CIPHERS)


def make_server_context(cert_pem: bytes, key_pem: bytes, ca_pem: bytes) -> ssl.SSLContext:
    """A server context: our chain, client certificates required and verified against every
    root of ``ca_pem``, TLS >= 1.2, session tickets on (OpenSSL's default)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx)
    _load_chain(ctx, cert_pem, key_pem)
    ctx.load_verify_locations(cadata=ca_pem.decode("ascii", "replace"))
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def make_client_context(
    *,
    cert_pem: bytes | None = None,
    key_pem: bytes | None = None,
    ca_pem: bytes | None = None,
    verify: bool = True,
    system_roots: bool = False,
) -> ssl.SSLContext:
    """A client context: our chain if given, the server verified
    against ``ca_pem`` (or the system roots), never a hostname check (names are checked by
    the caller after the handshake)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(ctx)
    ctx.maximum_version = CLIENT_MAX_VERSION
    ctx.check_hostname = False
    if verify:
        ctx.verify_mode = ssl.CERT_REQUIRED
        if ca_pem is not None:
            ctx.load_verify_locations(cadata=ca_pem.decode("ascii", "replace"))
        elif system_roots:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        ctx.verify_mode = ssl.CERT_NONE
    if cert_pem is not None and key_pem is not None:
        _load_chain(ctx, cert_pem, key_pem)
    return ctx


def make_plain_server_context(cert_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    """A server context presenting our chain, no client certificate asked for, TLS >= 1.2 (a
    server its clients verify, such as the control plane's API). :func:`load_chain` on it
    again replaces the certificate for every later handshake."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx)
    _load_chain(ctx, cert_pem, key_pem)
    return ctx


def load_chain(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    """(Re)load ``ctx``'s certificate chain and key from PEM bytes (blocking): new handshakes
    present them, established connections are untouched. Raises ``ssl.SSLError``."""
    _load_chain(ctx, cert_pem, key_pem)


def _load_chain(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    """``load_cert_chain`` from bytes: through a private temporary directory (0700), so the
    context holds exactly the bytes that were checked, whatever happens to the files now."""
    with tempfile.TemporaryDirectory(prefix="meshproxy-tls-") as d:
        cert_path = os.path.join(d, "cert.pem")
        key_path = os.path.join(d, "key.pem")
        for path, data in ((cert_path, cert_pem), (key_path, key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        ctx.load_cert_chain(cert_path, key_path)


# --------------------------------------------------------------------------- identity


@dataclass(frozen=True)
class WorkloadIdentity:
    """One loaded ``--cert-dir``: who we are and the contexts that present it."""

    spiffe_id: str
    trust_domain: str
    not_before: datetime
    not_after: datetime
    serial: int
    fingerprint: str  # sha256 of the leaf's DER, hex
    server_context: ssl.SSLContext = field(repr=False)
    client_context: ssl.SSLContext = field(repr=False)
    cert_dir: str = ""
    roots: int = 1  # certificates in ca.pem
    chain_length: int = 1  # certificates in cert.pem
    source: str = ""  # where an identity not read from cert_dir came from (identity_from_pem)

    def view(self) -> dict[str, Any]:
        """For admin output: what identity is live."""
        return {
            "spiffe_id": self.spiffe_id,
            "trust_domain": self.trust_domain,
            "serial": format(self.serial, "x"),
            "fingerprint_sha256": self.fingerprint,
            "not_before": self.not_before.isoformat(),
            "not_after": self.not_after.isoformat(),
            "roots": self.roots,
            "cert_dir": self.cert_dir,
        } | ({"source": self.source} if self.source else {})

    def spiffe_id_for(self, namespace: str, service_account: str) -> str:
        """``spiffe://<our trust domain>/ns/<namespace>/sa/<service account>``."""
        return f"spiffe://{self.trust_domain}/ns/{namespace}/sa/{service_account}"


def _certs(path: Path | str, data: bytes) -> list[x509.Certificate]:
    if b"-----BEGIN CERTIFICATE-----" not in data:
        return []
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise IdentityError(f"{path}: not valid PEM certificates") from None
    except Exception as e:  # e.g. UnsupportedAlgorithm
        raise IdentityError(f"{path}: unusable certificates: {_describe(e)}") from e


def _spki(key: Any) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _chains_to(
    leaf: x509.Certificate, intermediates: list[x509.Certificate], roots: list[x509.Certificate]
) -> bool:
    """Whether ``leaf`` reaches a root through ``intermediates`` (signatures and names; the
    TLS stack does the full path validation at every handshake)."""
    current = leaf
    for _ in range(len(intermediates) + 1):
        if any(_issued_by(current, r) for r in roots):
            return True
        nxt = next((i for i in intermediates if i is not current and _issued_by(current, i)), None)
        if nxt is None:
            return False
        current = nxt
    return False


def _uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def load_identity(cert_dir: str, *, now: datetime | None = None) -> WorkloadIdentity:
    """Read and check ``cert_dir`` (blocking). Raises :class:`IdentityError` for every
    problem, with the file it is about -- whatever the parsing libraries raise (a malformed
    extension is a ``ValueError``, an unknown key or signature algorithm
    ``UnsupportedAlgorithm``, ...) is turned into one naming the file being examined."""
    d = Path(cert_dir)
    try:
        return _load_identity(d, now)
    except IdentityError:
        raise
    except Exception as e:  # not a bug of ours: files we cannot use
        raise IdentityError(f"{d}: cannot use the files: {_describe(e)}") from e


def _describe(e: BaseException) -> str:
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


@contextlib.contextmanager
def _about(path: Path | str, what: str) -> Iterator[None]:
    """Any non-:class:`IdentityError` raised inside is one about ``path``."""
    try:
        yield
    except IdentityError:
        raise
    except Exception as e:  # a parser's complaint about the user's file
        raise IdentityError(f"{path}: {what}: {_describe(e)}") from e


def _load_identity(d: Path, now: datetime | None) -> WorkloadIdentity:
    if not d.exists():
        raise IdentityError(f"{d}: no such directory (--cert-dir)")
    if not d.is_dir():
        raise IdentityError(f"{d}: not a directory (--cert-dir)")
    cert_path, key_path, ca_path = (d / n for n in IDENTITY_FILES)
    cert_pem = read_file(cert_path, IdentityError)
    key_pem = read_file(key_path, IdentityError)
    ca_pem = read_file(ca_path, IdentityError)
    return _identity_from_bytes(
        cert_pem, key_pem, ca_pem, (cert_path, key_path, ca_path), d, now, cert_dir=str(d)
    )


def identity_from_pem(
    cert_pem: bytes,
    key_pem: bytes,
    ca_pem: bytes,
    *,
    source: str,
    expect_spiffe_id: str | None = None,
    now: datetime | None = None,
) -> WorkloadIdentity:
    """A :class:`WorkloadIdentity` from PEM bytes that did not come from a ``--cert-dir``
    (e.g. a certificate the control plane signed), checked exactly as :func:`load_identity`
    checks files: the key matches the leaf, a SPIFFE URI SAN, valid now, the chain reaches a
    root of ``ca_pem``, the TLS library accepts it. ``source`` names where the bytes came from
    in every message (and in :meth:`WorkloadIdentity.view`); with ``expect_spiffe_id`` the
    leaf's SPIFFE id must be exactly that one. Blocking; raises :class:`IdentityError`."""
    labels = (f"{source} (cert)", f"{source} (key)", f"{source} (ca)")
    try:
        ident = _identity_from_bytes(
            cert_pem, key_pem, ca_pem, labels, source, now, cert_dir="", source=source
        )
    except IdentityError as e:
        raise IdentityError(str(e)) from None  # never "transient": nothing will rewrite it
    except Exception as e:  # a parser's complaint about bytes we were handed
        raise IdentityError(f"{source}: cannot use the certificate: {_describe(e)}") from e
    if expect_spiffe_id is not None and ident.spiffe_id != expect_spiffe_id:
        raise IdentityError(
            f"{source} (cert): the certificate is for {ident.spiffe_id}, not {expect_spiffe_id}"
        )
    return ident


def _identity_from_bytes(
    cert_pem: bytes,
    key_pem: bytes,
    ca_pem: bytes,
    labels: tuple[Path | str, Path | str, Path | str],
    d: Path | str,
    now: datetime | None,
    *,
    cert_dir: str,
    source: str = "",
) -> WorkloadIdentity:
    """The checks and contexts of :func:`load_identity`; ``labels`` name the cert, key and
    bundle in messages, ``d`` the whole set."""
    cert_path, key_path, ca_path = labels
    chain = _certs(cert_path, cert_pem)
    if not chain:
        raise IdentityError(f"{cert_path}: no certificate in it")
    leaf = chain[0]
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise IdentityError(f"{key_path}: encrypted private keys are not supported") from None
    except ValueError:
        raise IdentityError(f"{key_path}: not a PEM private key") from None
    except Exception as e:  # e.g. UnsupportedAlgorithm
        raise IdentityError(f"{key_path}: unusable private key: {_describe(e)}") from e
    if not isinstance(
        key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    ):
        raise IdentityError(f"{key_path}: unsupported key type (ECDSA, RSA or Ed25519)")
    with _about(cert_path, "unusable certificate"):
        leaf_spki = _spki(leaf.public_key())
        uris = _uri_sans(leaf)
        nb, na = leaf.not_valid_before_utc, leaf.not_valid_after_utc
        serial = leaf.serial_number
        fingerprint = hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest()
    if _spki(key.public_key()) != leaf_spki:
        raise IdentityError(
            f"{key_path}: does not match the certificate in {cert_path}", transient=True
        )
    spiffe = [u for u in uris if u.startswith("spiffe://")]
    if not spiffe:
        raise IdentityError(f"{cert_path}: the certificate has no SPIFFE URI SAN")
    spiffe_id = spiffe[0]
    trust_domain = spiffe_id[len("spiffe://") :].split("/", 1)[0]
    if not trust_domain:
        raise IdentityError(f"{cert_path}: SPIFFE id {spiffe_id!r} has no trust domain")
    t = now if now is not None else datetime.now(UTC)
    if t < nb:
        raise IdentityError(f"{cert_path}: not valid before {nb.isoformat()} (clock skew?)")
    if t >= na:
        raise IdentityError(f"{cert_path}: expired at {na.isoformat()}")
    roots = _certs(ca_path, ca_pem)
    if not roots:
        raise IdentityError(f"{ca_path}: no certificate in it (the trust bundle is empty)")
    with _about(cert_path, f"cannot check the chain to {ca_path}"):
        chained = _chains_to(leaf, chain[1:], roots)
    if not chained:
        raise IdentityError(f"{cert_path}: the certificate does not chain to any root in {ca_path}")
    try:
        server = make_server_context(cert_pem, key_pem, ca_pem)
        client = make_client_context(cert_pem=cert_pem, key_pem=key_pem, ca_pem=ca_pem)
    except ssl.SSLError as e:
        raise IdentityError(f"{d}: TLS library refused the files: {e.reason or e}") from None
    except OSError as e:  # the private temporary directory for load_cert_chain
        raise IdentityError(f"{d}: cannot build the TLS contexts: {e}") from None
    return WorkloadIdentity(
        spiffe_id=spiffe_id,
        trust_domain=trust_domain,
        not_before=nb,
        not_after=na,
        serial=serial,
        fingerprint=fingerprint,
        server_context=server,
        client_context=client,
        cert_dir=cert_dir,
        roots=len(roots),
        chain_length=len(chain),
        source=source,
    )


# --------------------------------------------------------------------------- the store

Signature = tuple[tuple[int, int, int] | None, ...]
IdentityListener = Callable[[WorkloadIdentity | None, WorkloadIdentity], None]


def _load_with_signature(cert_dir: str) -> tuple[Signature, WorkloadIdentity]:
    """The files' signature, then the identity they hold (blocking)."""
    sig = _signature(cert_dir)
    return sig, load_identity(cert_dir)


def _signature(cert_dir: str) -> Signature:
    out: list[tuple[int, int, int] | None] = []
    for name in IDENTITY_FILES:
        try:
            st = os.stat(os.path.join(cert_dir, name))
        except OSError:
            out.append(None)
        else:
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(out)


class IdentityStore:
    """The live workload identity and its file watcher.

    ``current`` is None without ``--cert-dir``. :meth:`watch` is the one task that reloads;
    subscribers (``callback(old, new)``) are called on the loop after each swap."""

    mismatch_grace = 3  # polls a key/cert mismatch may last before it is an error

    def __init__(self, cert_dir: str | None, poll_interval: float = 1.0) -> None:
        self.cert_dir = cert_dir
        self.poll_interval = poll_interval
        self.current: WorkloadIdentity | None = None
        self.generation = 0
        self.reloads_ok = 0
        self.reloads_failed = 0
        self.last_error: str | None = None
        self._listeners: list[IdentityListener] = []
        self._signature: Signature | None = None
        self._logged: str | None = None
        self._mismatches = 0

    def load_initial(self) -> WorkloadIdentity | None:
        """Load at start-up, for synchronous callers (blocking; raises
        :class:`IdentityError`; subscribers are called on the calling thread). None without a
        dir. In a running loop use :meth:`load_initial_async`."""
        if self.cert_dir is None:
            return None
        sig, ident = _load_with_signature(self.cert_dir)
        self._signature = sig
        self._swap(ident)
        return ident

    async def load_initial_async(self) -> WorkloadIdentity | None:
        """:meth:`load_initial` with the file work in a thread and the swap (and so every
        subscriber) on the running loop. Raises :class:`IdentityError`; None without a dir."""
        if self.cert_dir is None:
            return None
        sig, ident = await asyncio.to_thread(_load_with_signature, self.cert_dir)
        self._signature = sig
        self._swap(ident)
        return ident

    def publish(self, identity: WorkloadIdentity) -> None:
        """Make ``identity`` the live one (``generation`` + 1, subscribers called), for
        identities that do not come from ``cert_dir`` -- the certificate client's. Call it on
        the loop's thread, as the watcher swaps."""
        self._swap(identity)

    def subscribe(self, callback: IdentityListener) -> None:
        self._listeners.append(callback)

    def _swap(self, new: WorkloadIdentity) -> None:
        old = self.current
        self.current = new
        self.generation += 1
        self.last_error = None
        self._logged = None
        self._mismatches = 0
        for fn in self._listeners:
            try:
                fn(old, new)
            except Exception:  # a subscriber's bug must not stop rotation
                log.exception("identity subscriber %r failed", fn)

    async def poll_once(self) -> bool:
        """Reload if a file changed; True when a new identity was swapped in."""
        cert_dir = self.cert_dir
        if cert_dir is None:
            return False
        sig = await asyncio.to_thread(_signature, cert_dir)
        if sig == self._signature:
            return False
        try:
            ident = await asyncio.to_thread(load_identity, cert_dir)
        except IdentityError as e:
            msg = str(e)
            if e.transient:
                self._mismatches += 1
                if self._mismatches < self.mismatch_grace:
                    # a writer between the cert and the key: try again next poll, quietly
                    log.debug("workload identity: %s (retrying)", msg)
                    return False
            self.reloads_failed += 1
            self._signature = sig  # until the files change again
            self.last_error = msg
            if msg != self._logged:
                self._logged = msg
                log.error("workload identity not reloaded, keeping the current one: %s", msg)
            return False
        self._signature = sig
        old = self.current
        self.reloads_ok += 1
        self._swap(ident)
        log.info(
            "workload identity reloaded: %s serial %x, valid until %s%s",
            ident.spiffe_id,
            ident.serial,
            ident.not_after.isoformat(),
            "" if old is None else f" (was serial {old.serial:x})",
        )
        return True

    def check_expiry(self, now: datetime | None = None) -> bool:
        """True when the live certificate has expired (no renewed files appeared): said once
        at error level, since peers now refuse every new connection."""
        ident = self.current
        if ident is None:
            return False
        t = now if now is not None else datetime.now(UTC)
        if t < ident.not_after:
            return False
        msg = f"{self.cert_dir}: the live certificate expired at {ident.not_after.isoformat()}"
        if msg != self._logged:
            self._logged = msg
            log.error("workload identity: %s; waiting for renewed files", msg)
        return True

    async def watch(self) -> None:
        """Poll forever (cancel to stop). Nothing a poll raises stops the watcher: an
        :class:`IdentityError` or ``OSError`` is logged as an error, anything else with its
        traceback (a bug), each distinct message once; the next poll tries again."""
        if self.cert_dir is None:
            return
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                self.check_expiry()
                await self.poll_once()
            except (IdentityError, OSError) as e:  # e.g. the temp dir for contexts
                self._poll_failed(f"{self.cert_dir}: {e}", None)
            except Exception as e:  # keep watching, whatever happened
                self._poll_failed(f"{self.cert_dir}: {_describe(e)}", e)

    def _poll_failed(self, msg: str, bug: BaseException | None) -> None:
        self.reloads_failed += 1
        self.last_error = msg
        if msg == self._logged:
            return
        self._logged = msg
        if bug is None:
            log.error("workload identity not reloaded: %s", msg)
        else:
            log.error("workload identity not reloaded (internal error): %s", msg, exc_info=bug)

    def __repr__(self) -> str:
        who = self.current.spiffe_id if self.current is not None else None
        return (
            f"IdentityStore({self.cert_dir!r}, id={who!r}, generation={self.generation},"
            f" ok={self.reloads_ok}, failed={self.reloads_failed})"
        )


# --------------------------------------------------------------------------- peers


def peer_uris(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> list[str]:
    """The peer certificate's URI SANs (empty when there is no verified peer certificate)."""
    if ssl_object is None:
        return []
    try:
        cert = ssl_object.getpeercert()
    except (ValueError, ssl.SSLError):
        return []
    if not cert:
        return []
    return [v for k, v in cert.get("subjectAltName", ()) if k == "URI"]


def peer_spiffe_id(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    """The peer's SPIFFE id (its first ``spiffe://`` URI SAN), or None."""
    for uri in peer_uris(ssl_object):
        if uri.startswith("spiffe://"):
            return uri
    return None


def _dns_match(pattern: str, name: str) -> bool:
    """A certificate DNS name (``pattern``, may start with ``*.``) against ``name``."""
    pattern = pattern.lower().rstrip(".")
    name = name.lower().rstrip(".")
    if pattern == name:
        return True
    if pattern.startswith("*.") and "." in name:
        return name.split(".", 1)[1] == pattern[2:] and bool(name.split(".", 1)[0])
    return False


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None


def san_matches(peercert: dict[str, Any] | None, wanted: Iterable[str]) -> str | None:
    """The first of ``wanted`` names the peer certificate carries, or None.

    A wanted name with ``://`` is compared with the URI SANs exactly; an IP with the IP
    SANs; anything else with the DNS SANs (a certificate wildcard covers one leftmost
    label)."""
    if not peercert:
        return None
    sans = peercert.get("subjectAltName", ())
    uris = {v for k, v in sans if k == "URI"}
    dns = [v for k, v in sans if k == "DNS"]
    ips = {_ip(v) for k, v in sans if k == "IP Address"}
    for w in wanted:
        if "://" in w:
            if w in uris:
                return w
        elif (ip := _ip(w)) is not None:
            if ip in ips:
                return w
        elif any(_dns_match(p, w) for p in dns):
            return w
    return None
