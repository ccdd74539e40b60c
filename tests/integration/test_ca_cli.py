"""``meshproxy ca init|issue|token`` as real processes: files, modes, exit codes, messages,
never a traceback."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store

from certs.token import verify_token

REPO = Path(__file__).resolve().parents[2]
ID = "spiffe://mesh.test/ns/shop/sa/cart"


def ca(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshproxy", "ca", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
    )


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def assert_user_error(proc: subprocess.CompletedProcess[str], command: str, text: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert f"meshproxy ca {command}" in proc.stderr
    assert text in proc.stderr, proc.stderr


def test_init_issue_token_happy_path(tmp_path: Path) -> None:
    d, out = tmp_path / "ca", tmp_path / "out"
    p = ca("init", "--dir", str(d), "--trust-domain", "mesh.test", "--intermediate")
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("\n") == 1 and "mesh.test" in p.stdout and str(d) in p.stdout
    assert mode(d / "ca-key.pem") == 0o600
    assert mode(d / "intermediate-key.pem") == 0o600
    assert mode(d / "token.key") == 0o600
    assert mode(d / "ca.pem") == 0o644

    p = ca("issue", "--dir", str(d), "--spiffe-id", ID, "--out", str(out), "--ttl", "90m")
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("\n") == 1
    for name in ("cert.pem", "key.pem", "ca.pem"):
        assert str(out / name) in p.stdout
    assert mode(out / "key.pem") == 0o600
    assert mode(out / "cert.pem") == 0o644
    chain = x509.load_pem_x509_certificates((out / "cert.pem").read_bytes())
    root = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    life = chain[0].not_valid_after_utc - chain[0].not_valid_before_utc
    assert 90 * 60 <= life.total_seconds() <= 92 * 60  # 90 m plus the back-dating
    verifier = PolicyBuilder().store(Store([root])).build_client_verifier()
    subjects = verifier.verify(chain[0], chain[1:]).subjects
    assert [s.value for s in subjects] == [ID]

    p = ca("token", "--dir", str(d), "--namespace", "shop", "--service-account", "cart")
    assert p.returncode == 0, p.stderr
    token = p.stdout.strip()
    assert p.stdout == token + "\n"
    assert verify_token(d, token, trust_domain="mesh.test") == ("shop", "cart")


def test_init_refuses_existing_without_force(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    assert ca("init", "--dir", str(d)).returncode == 0
    before = (d / "ca.pem").read_bytes()
    assert_user_error(ca("init", "--dir", str(d)), "init", "--force")
    assert (d / "ca.pem").read_bytes() == before
    p = ca("init", "--dir", str(d), "--force")
    assert p.returncode == 0, p.stderr
    assert (d / "ca.pem").read_bytes() != before


def test_user_mistakes_exit_2_without_traceback(tmp_path: Path) -> None:
    d, out = tmp_path / "ca", tmp_path / "out"
    assert ca("init", "--dir", str(d)).returncode == 0
    good = "spiffe://cluster.local/ns/a/sa/b"
    assert_user_error(
        ca("issue", "--dir", str(tmp_path / "nope"), "--spiffe-id", good, "--out", str(out)),
        "issue",
        "no such CA directory",
    )
    assert_user_error(
        ca("issue", "--dir", str(d), "--spiffe-id", good.rsplit("/sa/")[0], "--out", str(out)),
        "issue",
        "/ns/<namespace>/sa/<service-account>",
    )
    assert_user_error(
        ca("issue", "--dir", str(d), "--spiffe-id", "spiffe://other/ns/a/sa/b", "--out", str(out)),
        "issue",
        "not this CA's",
    )
    assert_user_error(
        ca("issue", "--dir", str(d), "--spiffe-id", good, "--out", str(out), "--ttl", "0s"),
        "issue",
        "zero",
    )
    assert_user_error(
        ca("issue", "--dir", str(d), "--spiffe-id", good, "--out", str(out), "--ttl=-1h"),
        "issue",
        "negative",
    )
    assert_user_error(
        ca("issue", "--dir", str(d), "--spiffe-id", good, "--out", str(out), "--ttl", "99999d"),
        "issue",
        "outlives the CA",
    )
    assert not out.exists()  # nothing written by a refused request
    assert_user_error(
        ca("token", "--dir", str(d), "--namespace", "a b", "--service-account", "x"),
        "token",
        "namespace",
    )
    (d / "ca.pem").write_text("garbage")
    assert_user_error(
        ca("token", "--dir", str(d), "--namespace", "a", "--service-account", "x"),
        "token",
        "not a PEM certificate",
    )


def test_bad_flags_and_help() -> None:
    p = ca("issue", "--dir", "x")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "required" in p.stderr
    p = ca()
    assert p.returncode == 2 and "Traceback" not in p.stderr
    p = ca("issue", "--help")
    assert p.returncode == 0 and "--spiffe-id" in p.stdout and "--ttl" in p.stdout
