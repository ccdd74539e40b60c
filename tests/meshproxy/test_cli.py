"""CLI: ADDR / label parsing, argument errors (exit 2, message, no traceback), --help."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from meshproxy.cli import (
    RunOptions,
    build_parser,
    format_addr,
    listening_line,
    main,
    parse_addr,
    parse_labels,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:15001", ("127.0.0.1", 15001)),
        ("localhost:0", ("localhost", 0)),
        ("[::1]:0", ("::1", 0)),
        ("[::]:8080", ("::", 8080)),
        ("0.0.0.0:65535", ("0.0.0.0", 65535)),
    ],
)
def test_parse_addr(text: str, expected: tuple[str, int]) -> None:
    assert parse_addr(text) == expected


@pytest.mark.parametrize(
    "text",
    ["15001", "127.0.0.1", "127.0.0.1:", ":15001", "::1:80", "[::1]80", "[::1", "h:65536", "h:x"],
)
def test_parse_addr_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_addr(text)


def test_format_addr_round_trips() -> None:
    for text in ("127.0.0.1:15001", "[::1]:0"):
        assert format_addr(parse_addr(text)) == text
    assert listening_line(("::1", 1), ("127.0.0.1", 2)) == (
        "listening outbound=[::1]:1 admin=127.0.0.1:2"
    )


def test_parse_labels() -> None:
    assert parse_labels("app=productpage,version=v1") == {"app": "productpage", "version": "v1"}
    assert parse_labels("") == {}
    assert parse_labels("a=,b=c=d") == {"a": "", "b": "c=d"}
    for bad in ("app", "=v", "a=b,c"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_labels(bad)


def test_run_defaults() -> None:
    ns = build_parser().parse_args(["run", "--config", "a", "--config", "b"])
    assert ns.config == ["a", "b"]
    assert ns.outbound == ("127.0.0.1", 15001)
    assert ns.admin == ("127.0.0.1", 15000)
    assert ns.workers == 1
    assert ns.namespace == "default"
    assert ns.labels == {}
    assert ns.drain_seconds == 5.0


@pytest.mark.parametrize(
    "argv",
    [
        ["run"],  # --config is required
        ["run", "--config", "x", "--outbound", "nope"],
        ["run", "--config", "x", "--admin", "[::1]"],
        ["run", "--config", "x", "--workers", "0"],
        ["run", "--config", "x", "--workers", "two"],
        ["run", "--config", "x", "--labels", "app"],
        ["run", "--config", "x", "--drain-seconds", "-1"],
        ["run", "--config", "x", "--no-such-flag"],
        ["frobnicate"],
        [],
    ],
)
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "error:" in err
    assert "Traceback" not in err


def test_missing_config_path_exits_2(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "nope.yaml")
    assert main(["run", "--config", missing]) == 2
    err = capsys.readouterr().err
    assert missing in err and "no such file" in err


def test_subprocess_bad_flag_no_traceback() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "meshproxy", "run", "--config", ".", "--outbound", "1.2.3.4"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "--outbound" in proc.stderr and "HOST:PORT" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["validate", "--help"]])
def test_help(argv: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "meshproxy", *argv], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0
    assert "usage: meshproxy" in proc.stdout


def test_resilience_default_flags_parse_and_reach_settings() -> None:
    from meshproxy.app import settings_for
    from meshproxy.cli import format_retry_budget, parse_retry_budget

    assert parse_retry_budget("20:3") == (20.0, 3)
    assert parse_retry_budget("12.5") == (12.5, 3)
    assert parse_retry_budget("off") is None
    for bad in ("x", "101", "-1:2", "20:-1", "20:x"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_retry_budget(bad)
    assert format_retry_budget((12.5, 4)) == "12.5:4"
    assert parse_retry_budget(format_retry_budget((12.5, 4))) == (12.5, 4)
    ns = build_parser().parse_args(["run", "--config", "x"])
    assert ns.retry_budget == (20.0, 3) and ns.outlier_min_ejectable == 1
    assert ns.idempotent_503_retry is True
    ns = build_parser().parse_args(
        [
            "run",
            "--config",
            "x",
            "--retry-budget",
            "off",
            "--outlier-min-ejectable",
            "0",
            "--no-idempotent-503-retry",
        ]
    )
    opts = RunOptions(
        config=("x",),
        retry_budget=ns.retry_budget,
        outlier_min_ejectable=ns.outlier_min_ejectable,
        idempotent_503_retry=ns.idempotent_503_retry,
    )
    st = settings_for(opts)
    assert st.retry_budget_percent is None
    assert st.outlier_min_ejectable == 0 and st.default_retry_503 is False
    st = settings_for(RunOptions(config=("x",), retry_budget=(5.0, 1)))
    assert st.retry_budget_percent == 5.0 and st.retry_budget_min == 1
