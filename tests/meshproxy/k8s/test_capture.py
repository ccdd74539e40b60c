"""meshproxy capture's pure core: whole iptables-restore texts, the clean-up, bad flags.

The expected texts follow istio-iptables' golden files (tools/istio-iptables/pkg/capture/
testdata, REDIRECT mode): same chains, same rules, same order. Applying them to a real kernel
is tested in network namespaces (tests/integration/test_capture_netns.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from meshproxy.cli import main
from meshproxy.k8s.capture import (
    CaptureError,
    CaptureOptions,
    capture_rules,
    clean_rules,
    parse_options,
)

DEFAULT_V4 = """\
*nat
:ISTIO_INBOUND - [0:0]
:ISTIO_REDIRECT - [0:0]
:ISTIO_IN_REDIRECT - [0:0]
:ISTIO_OUTPUT - [0:0]
-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN
-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
-A OUTPUT -p tcp -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 \
-j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 \
-j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
COMMIT
"""


def test_defaults_are_istios_sidecar_rules() -> None:
    assert capture_rules(CaptureOptions()) == DEFAULT_V4
    assert capture_rules(parse_options()) == DEFAULT_V4


def test_customised() -> None:
    opts = parse_options(
        proxy_port="16001",
        inbound_port="16006",
        proxy_uid="1337,1338",
        proxy_gid="2000",
        include_outbound_cidrs="10.96.0.0/12, 192.168.0.0/16,fd00::/8",
        exclude_outbound_cidrs="10.96.0.1,10.100.0.0/16",
        exclude_inbound_ports="22,8081",
        exclude_outbound_ports="3306,5432",
    )
    assert (
        capture_rules(opts)
        == """\
*nat
:ISTIO_INBOUND - [0:0]
:ISTIO_REDIRECT - [0:0]
:ISTIO_IN_REDIRECT - [0:0]
:ISTIO_OUTPUT - [0:0]
-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 16001
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 16006
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 22 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 8081 -j RETURN
-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
-A OUTPUT -p tcp -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -p tcp --dport 3306 -j RETURN
-A ISTIO_OUTPUT -p tcp --dport 5432 -j RETURN
-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 \
-j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1338 \
-j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1338 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1338 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 2000 \
-j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 2000 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 2000 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -d 10.96.0.1/32 -j RETURN
-A ISTIO_OUTPUT -d 10.100.0.0/16 -j RETURN
-A ISTIO_OUTPUT -d 10.96.0.0/12 -j ISTIO_REDIRECT
-A ISTIO_OUTPUT -d 192.168.0.0/16 -j ISTIO_REDIRECT
COMMIT
"""
    )


def test_ipv6_family_takes_its_own_cidrs_and_loopbacks() -> None:
    opts = parse_options(
        include_outbound_cidrs="10.0.0.0/8,fd00::/8",
        exclude_outbound_cidrs="fd00:1::/64",
        include_inbound_ports="8080,9090",
    )
    assert (
        capture_rules(opts, ipv6=True)
        == """\
*nat
:ISTIO_INBOUND - [0:0]
:ISTIO_REDIRECT - [0:0]
:ISTIO_IN_REDIRECT - [0:0]
:ISTIO_OUTPUT - [0:0]
-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A ISTIO_INBOUND -p tcp --dport 8080 -j ISTIO_IN_REDIRECT
-A ISTIO_INBOUND -p tcp --dport 9090 -j ISTIO_IN_REDIRECT
-A OUTPUT -p tcp -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -o lo -s ::6/128 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d ::1/128 -p tcp ! --dport 15008 -m owner --uid-owner 1337 \
-j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d ::1/128 -p tcp ! --dport 15008 -m owner --gid-owner 1337 \
-j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d ::1/128 -j RETURN
-A ISTIO_OUTPUT -d fd00:1::/64 -j RETURN
-A ISTIO_OUTPUT -d fd00::/8 -j ISTIO_REDIRECT
COMMIT
"""
    )


def test_empty_includes_capture_nothing_in_that_direction() -> None:
    text = capture_rules(parse_options(include_outbound_cidrs="", include_inbound_ports=""))
    assert "-A PREROUTING" not in text  # no inbound capture
    assert "-j ISTIO_REDIRECT" not in text  # no outbound destination is redirected
    assert "-A OUTPUT -p tcp -j ISTIO_OUTPUT" in text  # the chain is still hooked (as Istio)


def test_loopback_include_keeps_app_to_self_captured() -> None:
    """Istio: when the include list names a loopback range, the 'app calling its own pod IP
    over lo stays direct' RETURN rules are left out."""
    text = capture_rules(parse_options(include_outbound_cidrs="127.0.0.0/8,10.0.0.0/8"))
    assert "! --uid-owner" not in text and "! --gid-owner" not in text
    assert "-A ISTIO_OUTPUT -d 127.0.0.0/8 -j ISTIO_REDIRECT" in text


# --------------------------------------------------------------------------- clean

SAVED = """\
# Generated by iptables-save v1.8.9 (nf_tables) on Mon Dec  7 09:33:30 2026
*filter
:INPUT ACCEPT [0:0]
-A INPUT -j ISTIO_OUTPUT_NOT_OURS
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:ISTIO_INBOUND - [0:0]
:ISTIO_IN_REDIRECT - [0:0]
:ISTIO_OUTPUT - [0:0]
:ISTIO_REDIRECT - [0:0]
:KUBE-SERVICES - [0:0]
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A PREROUTING -j KUBE-SERVICES
-A OUTPUT -p tcp -j ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp -m tcp --dport 15008 -j RETURN
-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A POSTROUTING -o eth0 -j MASQUERADE
COMMIT
# Completed on Mon Dec  7 09:33:30 2026
"""


def test_clean_removes_exactly_our_jumps_and_chains() -> None:
    assert (
        clean_rules(SAVED)
        == """\
*nat
-D PREROUTING -p tcp -j ISTIO_INBOUND
-D OUTPUT -p tcp -j ISTIO_OUTPUT
-F ISTIO_INBOUND
-F ISTIO_REDIRECT
-F ISTIO_IN_REDIRECT
-F ISTIO_OUTPUT
-X ISTIO_INBOUND
-X ISTIO_REDIRECT
-X ISTIO_IN_REDIRECT
-X ISTIO_OUTPUT
COMMIT
"""
    )


def test_clean_of_a_clean_table_is_nothing() -> None:
    clean = "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -j KUBE-X\nCOMMIT\n"
    assert clean_rules(clean) is None
    assert clean_rules("") is None


def test_clean_handles_a_half_installed_capture() -> None:
    """A jump left without its chains' rules, or chains without a jump (an interrupted run)."""
    only_chain = "*nat\n:OUTPUT ACCEPT [0:0]\n:ISTIO_OUTPUT - [0:0]\nCOMMIT\n"
    assert clean_rules(only_chain) == "*nat\n-F ISTIO_OUTPUT\n-X ISTIO_OUTPUT\nCOMMIT\n"


# --------------------------------------------------------------------------- flags


@pytest.mark.parametrize(
    "kwargs,flag",
    [
        ({"proxy_port": "0"}, "--proxy-port"),
        ({"proxy_port": "70000"}, "--proxy-port"),
        ({"inbound_port": "x"}, "--inbound-port"),
        ({"inbound_port": "15001"}, "--inbound-port"),
        ({"proxy_uid": "root"}, "--proxy-uid"),
        ({"proxy_gid": ""}, "--proxy-gid"),
        ({"include_outbound_cidrs": "10.0.0.0/8,*"}, "--include-outbound-cidrs"),
        ({"include_outbound_cidrs": "10.0.0.300/8"}, "--include-outbound-cidrs"),
        ({"exclude_outbound_cidrs": "*"}, "--exclude-outbound-cidrs"),
        ({"exclude_outbound_cidrs": "example.com"}, "--exclude-outbound-cidrs"),
        ({"include_inbound_ports": "80,http"}, "--include-inbound-ports"),
        ({"exclude_inbound_ports": "-1"}, "--exclude-inbound-ports"),
        ({"exclude_outbound_ports": "99999"}, "--exclude-outbound-ports"),
    ],
)
def test_bad_values_name_the_flag(kwargs: dict[str, str], flag: str) -> None:
    with pytest.raises(CaptureError) as e:
        parse_options(**kwargs)
    assert e.value.flag == flag
    assert str(e.value).startswith(f"{flag}: ")


def test_cli_bad_value_exits_2_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["capture", "--dry-run", "--exclude-outbound-cidrs", "10.0.0.0/33"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("meshproxy: error: --exclude-outbound-cidrs: ")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_dry_run_prints_the_rules(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["capture", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out == "# iptables-restore --noflush\n" + DEFAULT_V4
    assert main(["capture", "--dry-run", "--ipv6", "--iptables-backend", "legacy"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# iptables-legacy-restore --noflush\n*nat\n")
    assert "# ip6tables-legacy-restore --noflush\n" in out and "-s ::6/128" in out


# --------------------------------------------------------------------------- the edge


CAT = shutil.which("cat") or "/bin/cat"  # the fakes run with PATH = their own directory


def _fake_iptables(bin_dir: Path, log: Path, saved: str, fail_restore: bool = False) -> None:
    """iptables-save / iptables-restore stand-ins: save prints ``saved``; restore appends its
    argv and stdin to ``log`` (or fails like a kernel without permission)."""
    bin_dir.mkdir()
    (bin_dir / "saved.txt").write_text(saved)
    save = f"#!/bin/sh\nexec {CAT} {bin_dir / 'saved.txt'}\n"
    restore = (
        "#!/bin/sh\necho 'iptables-restore v1.8.9 (nf_tables): Permission denied' >&2\nexit 4\n"
        if fail_restore
        else f'#!/bin/sh\necho "== $0 $*" >> {log}\n{CAT} >> {log}\n'
    )
    for name, text in (("iptables-save", save), ("iptables-restore", restore)):
        path = bin_dir / name
        path.write_text(text)
        path.chmod(0o755)


def test_cli_capture_cleans_then_installs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "restore.log"
    _fake_iptables(tmp_path / "bin", log, SAVED)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no ip6tables here
    assert main(["capture", "--exclude-inbound-ports", "22"]) == 0
    assert capsys.readouterr().out == "iptables: capture installed\n"
    restore = str(tmp_path / "bin" / "iptables-restore")
    expected_clean = clean_rules(SAVED)
    assert expected_clean is not None
    assert log.read_text() == (
        f"== {restore} --noflush\n{expected_clean}"
        f"== {restore} --noflush\n{capture_rules(parse_options(exclude_inbound_ports='22'))}"
    )


def test_cli_clean_skips_a_missing_ip6tables_and_a_clean_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "restore.log"
    _fake_iptables(tmp_path / "bin", log, "*nat\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert main(["capture", "--clean"]) == 0
    assert capsys.readouterr().out == "iptables: nothing to remove\n"
    assert not log.exists()  # nothing was restored


def test_cli_restore_failure_is_one_line_exit_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _fake_iptables(tmp_path / "bin", tmp_path / "log", SAVED, fail_restore=True)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert main(["capture"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("meshproxy capture: iptables-restore --noflush: exit 4: ")
    assert "Permission denied" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert main(["capture"]) == 1
    assert "iptables-save" in capsys.readouterr().err
