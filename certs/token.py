"""Bootstrap tokens: an HMAC-SHA256-signed claim "the bearer may be spiffe://TD/ns/NS/sa/SA".

Theory of operation
-------------------
``ca init`` writes a random secret to ``DIR/token.key`` (hex, mode 0600). A token is
``mpt1.<payload>.<mac>``: ``payload`` is the base64url (unpadded) of a compact JSON object
``{"td", "ns", "sa", "iat", "exp"}`` (trust domain, namespace, service account, issued-at and
expiry in Unix seconds) and ``mac`` the base64url HMAC-SHA256 over ``mpt1.<payload>`` with
the secret. :func:`verify_token` recomputes the MAC and compares it in constant time
(``hmac.compare_digest``) *before* looking at the payload, then checks the expiry against
``now`` and returns ``(ns, sa)``. A bad signature, an expired or malformed token, and a token of
another trust domain all raise :class:`TokenError` (a :class:`~certs.spiffe.CAError`) with a
one-line message that never echoes the secret.

:func:`unverified_claims` / :func:`token_identity` read the payload *without* the MAC: the
bearer (a proxy, which has no key) learns which SPIFFE id to put in its CSR, and the CA's logs
can name what a refused token claimed; neither ever grants anything.

The token entitles its bearer to exactly one SPIFFE id; the control plane compares that id
with the CSR's SAN (see :func:`certs.ca.sign_csr`). Plain functions, no I/O except reading the
key file; ``now`` is an argument so tests need no clock.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from certs.spiffe import CAError, SpiffeId, make_spiffe_id

TOKEN_PREFIX = "mpt1"
DEFAULT_TOKEN_TTL = timedelta(hours=24)
MAX_TOKEN_LEN = 4096
MIN_KEY_BYTES = 16
TOKEN_KEY_FILE = "token.key"


class TokenError(CAError):
    """A token that does not entitle its bearer to anything."""


@dataclass(frozen=True, slots=True)
class TokenClaims:
    trust_domain: str
    namespace: str
    service_account: str
    issued_at: int
    expires_at: int

    @property
    def spiffe_id(self) -> SpiffeId:
        return make_spiffe_id(self.trust_domain, self.namespace, self.service_account)


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def load_token_key(dir_or_key: str | os.PathLike[str] | bytes) -> bytes:
    """The HMAC secret: ``bytes`` as given, or read from ``DIR/token.key`` (or a key file)."""
    if isinstance(dir_or_key, bytes):
        key = dir_or_key
    else:
        p = Path(dir_or_key)
        path = p / TOKEN_KEY_FILE if p.is_dir() else p
        try:
            text = path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            raise CAError(f"{path}: no such file (create it with: meshproxy ca init)") from None
        except PermissionError:
            raise CAError(f"{path}: permission denied") from None
        except (OSError, UnicodeDecodeError):
            raise CAError(f"{path}: cannot read the token key") from None
        try:
            key = bytes.fromhex(text)
        except ValueError:
            raise CAError(f"{path}: not a hex token key") from None
    if len(key) < MIN_KEY_BYTES:
        raise CAError(f"token key is too short ({len(key)} bytes, at least {MIN_KEY_BYTES})")
    return key


def _mac(key: bytes, signing_input: str) -> bytes:
    return hmac.new(key, signing_input.encode("ascii"), hashlib.sha256).digest()


def make_token(
    key: bytes,
    trust_domain: str,
    namespace: str,
    service_account: str,
    ttl: timedelta = DEFAULT_TOKEN_TTL,
    *,
    now: float | None = None,
) -> str:
    """Sign a token entitling its bearer to ``spiffe://trust_domain/ns/namespace/sa/...``."""
    make_spiffe_id(trust_domain, namespace, service_account)  # validates every part
    if ttl <= timedelta(0):
        raise CAError("token TTL must be greater than zero")
    iat = int(time.time() if now is None else now)
    claims = {
        "td": trust_domain,
        "ns": namespace,
        "sa": service_account,
        "iat": iat,
        "exp": iat + max(1, int(ttl.total_seconds())),
    }
    payload = _b64e(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
    signing_input = f"{TOKEN_PREFIX}.{payload}"
    return f"{signing_input}.{_b64e(_mac(key, signing_input))}"


def decode_token(
    dir_or_key: str | os.PathLike[str] | bytes,
    token: str,
    *,
    trust_domain: str | None = None,
    now: float | None = None,
) -> TokenClaims:
    """Verify ``token`` (signature first, in constant time; then shape, expiry and, if given,
    the trust domain) and return its claims. Raises :class:`TokenError`."""
    key = load_token_key(dir_or_key)
    if not isinstance(token, str) or len(token) > MAX_TOKEN_LEN:
        raise TokenError("malformed token")
    token = token.strip()
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
        raise TokenError("malformed token")
    try:
        given = _b64d(parts[2])
    except (binascii.Error, ValueError):
        raise TokenError("malformed token") from None
    try:
        expected = _mac(key, f"{parts[0]}.{parts[1]}")
    except UnicodeEncodeError:
        raise TokenError("malformed token") from None
    if not hmac.compare_digest(given, expected):
        raise TokenError("token signature does not verify")
    claims = _parse_payload(parts[1])
    t = time.time() if now is None else now
    if t >= claims.expires_at:
        raise TokenError("token expired")
    if trust_domain is not None and claims.trust_domain != trust_domain:
        raise TokenError(f"token is for trust domain {claims.trust_domain!r}, not {trust_domain!r}")
    return claims


def _parse_payload(payload: str) -> TokenClaims:
    """The claims of a token's (base64url) payload part; :class:`TokenError` if malformed."""
    try:
        raw = json.loads(_b64d(payload))
        claims = TokenClaims(
            trust_domain=raw["td"],
            namespace=raw["ns"],
            service_account=raw["sa"],
            issued_at=raw["iat"],
            expires_at=raw["exp"],
        )
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise TokenError("malformed token payload") from None
    if not all(
        isinstance(v, str) for v in (claims.trust_domain, claims.namespace, claims.service_account)
    ) or not all(
        isinstance(v, int) and not isinstance(v, bool)
        for v in (claims.issued_at, claims.expires_at)
    ):
        raise TokenError("malformed token payload")
    return claims


def unverified_claims(token: str) -> TokenClaims:
    """The claims ``token`` *says* it carries, its MAC NOT checked and its expiry not either.

    For the bearer (a proxy cannot check the MAC: only the CA holds the key) to know which
    SPIFFE id to ask for, and for the CA's logs to name what a refused token claimed. Never a
    basis for granting anything: :func:`decode_token` is. Raises :class:`TokenError` for a
    token that is not shaped like one, or whose names are not valid SPIFFE parts."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_LEN:
        raise TokenError("malformed token")
    parts = token.strip().split(".")
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
        raise TokenError("malformed token")
    claims = _parse_payload(parts[1])
    try:
        claims.spiffe_id  # noqa: B018 -- validates the trust domain and both names
    except CAError as e:
        raise TokenError(f"malformed token payload: {e}") from None
    return claims


def token_identity(token: str) -> SpiffeId:
    """The SPIFFE id ``token`` entitles its bearer to, read without checking the MAC (see
    :func:`unverified_claims`)."""
    return unverified_claims(token).spiffe_id


def verify_token(
    dir_or_key: str | os.PathLike[str] | bytes,
    token: str,
    *,
    trust_domain: str | None = None,
    now: float | None = None,
) -> tuple[str, str]:
    """Verify ``token`` and return the ``(namespace, service_account)`` it entitles."""
    c = decode_token(dir_or_key, token, trust_domain=trust_domain, now=now)
    return c.namespace, c.service_account
