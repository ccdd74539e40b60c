"""Bootstrap tokens: round trip, and every way a token is refused."""

from __future__ import annotations

import base64
import json
from datetime import timedelta
from pathlib import Path

import pytest

from certs.ca import init_ca
from certs.spiffe import CAError
from certs.token import (
    TokenError,
    decode_token,
    load_token_key,
    make_token,
    verify_token,
)

KEY = b"k" * 32
T0 = 1_900_000_000.0


def test_round_trip_with_key() -> None:
    tok = make_token(KEY, "cluster.local", "default", "reviews", timedelta(hours=1), now=T0)
    assert verify_token(KEY, tok, now=T0 + 10) == ("default", "reviews")
    claims = decode_token(KEY, tok, now=T0)
    assert claims.spiffe_id.uri == "spiffe://cluster.local/ns/default/sa/reviews"
    assert claims.expires_at - claims.issued_at == 3600


def test_round_trip_with_ca_dir(tmp_path: Path) -> None:
    ca = init_ca(tmp_path / "ca")
    key = load_token_key(ca.directory)
    assert len(key) == 32
    tok = make_token(key, ca.trust_domain, "shop", "cart")
    assert verify_token(ca.directory, tok, trust_domain="cluster.local") == ("shop", "cart")
    assert verify_token(ca.directory / "token.key", tok) == ("shop", "cart")


def test_expired() -> None:
    tok = make_token(KEY, "cluster.local", "a", "b", timedelta(seconds=60), now=T0)
    assert verify_token(KEY, tok, now=T0 + 59) == ("a", "b")
    with pytest.raises(TokenError, match="expired"):
        verify_token(KEY, tok, now=T0 + 60)


def test_wrong_key_and_tampered_payload() -> None:
    tok = make_token(KEY, "cluster.local", "a", "b", now=T0)
    with pytest.raises(TokenError, match="signature"):
        verify_token(b"x" * 32, tok, now=T0)
    prefix, payload, mac = tok.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["sa"] = "admin"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with pytest.raises(TokenError, match="signature"):
        verify_token(KEY, f"{prefix}.{forged}.{mac}", now=T0)


def test_other_trust_domain() -> None:
    tok = make_token(KEY, "other.local", "a", "b", now=T0)
    with pytest.raises(TokenError, match="trust domain"):
        verify_token(KEY, tok, trust_domain="cluster.local", now=T0)


@pytest.mark.parametrize(
    "token",
    ["", "abc", "mpt1.x", "mpt2.e30.AAAA", "mpt1.e30.!!!!", "mpt1.é.AAAA", "x" * 5000],
)
def test_malformed(token: str) -> None:
    with pytest.raises(TokenError, match=r"malformed|signature"):
        verify_token(KEY, token, now=T0)


def test_validly_signed_but_bad_payload() -> None:
    import hashlib
    import hmac

    for payload in (b"[]", b'{"td":"a"}', b'{"td":1,"ns":"a","sa":"b","iat":1,"exp":2}'):
        p = base64.urlsafe_b64encode(payload).rstrip(b"=").decode()
        mac = hmac.new(KEY, f"mpt1.{p}".encode(), hashlib.sha256).digest()
        m = base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
        with pytest.raises(TokenError, match="malformed token payload"):
            verify_token(KEY, f"mpt1.{p}.{m}", now=T0)


def test_make_refuses_bad_parts() -> None:
    with pytest.raises(CAError, match="namespace"):
        make_token(KEY, "cluster.local", "", "b")
    with pytest.raises(CAError, match="service account"):
        make_token(KEY, "cluster.local", "a", "b/c")
    with pytest.raises(CAError, match="trust domain"):
        make_token(KEY, "Cluster", "a", "b")
    with pytest.raises(CAError, match="greater than zero"):
        make_token(KEY, "cluster.local", "a", "b", timedelta(0))


def test_key_errors(tmp_path: Path) -> None:
    with pytest.raises(CAError, match="no such file"):
        load_token_key(tmp_path)
    (tmp_path / "token.key").write_text("zz-not-hex")
    with pytest.raises(CAError, match="not a hex token key"):
        load_token_key(tmp_path)
    (tmp_path / "token.key").write_text("abcd")
    with pytest.raises(CAError, match="too short"):
        load_token_key(tmp_path)
    with pytest.raises(CAError, match="too short"):
        load_token_key(b"short")


def test_token_identity_reads_without_the_key() -> None:
    from certs.token import token_identity, unverified_claims

    tok = make_token(KEY, "cluster.local", "shop", "cart", timedelta(seconds=5), now=T0)
    assert token_identity(tok).uri == "spiffe://cluster.local/ns/shop/sa/cart"
    # neither the MAC nor the expiry is checked: the bearer cannot, the CA does
    forged = tok[:-3] + "xyz"
    assert token_identity(f"  {forged}\n").uri == "spiffe://cluster.local/ns/shop/sa/cart"
    assert unverified_claims(tok).expires_at == int(T0) + 5
    with pytest.raises(TokenError):
        decode_token(KEY, forged, now=T0)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "mpt1.x",
        "jwt.a.b",
        "mpt1.!!!.sig",
        "mpt1." + base64.urlsafe_b64encode(b'{"td":"t"}').decode().rstrip("=") + ".s",
        "x" * 5000,
    ],
)
def test_token_identity_malformed(token: str) -> None:
    from certs.token import token_identity

    with pytest.raises(TokenError):
        token_identity(token)


def test_token_identity_refuses_names_no_spiffe_id_can_carry() -> None:
    from certs.token import token_identity

    raw = {"td": "Bad Domain", "ns": "a", "sa": "b", "iat": 1, "exp": 2}
    payload = base64.urlsafe_b64encode(json.dumps(raw).encode()).decode().rstrip("=")
    with pytest.raises(TokenError, match="malformed token payload: trust domain"):
        token_identity(f"mpt1.{payload}.sig")
