"""The access log: line format (pure), buffering and flushing (a pipe, no sockets), and one
in-process data plane on 127.0.0.1 writing real lines for a routed request and a 404 NR."""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from meshproxy.accesslog import (
    AccessLog,
    AccessLogError,
    check_target,
    exchange_line,
    format_line,
    iso_utc_ms,
)
from meshproxy.dataplane import DataPlane
from meshproxy.settings import Settings
from meshproxy.state import State
from tests.support.fakes import FakeMetrics, service_snapshot
from tests.support.rawhttp import get, read_response
from tests.support.upstream import Reply, UpstreamServer

FIELDS = {
    "start_time": str,
    "method": str,
    "path": str,
    "authority": str,
    "response_code": int,
    "response_flags": str,
    "upstream_host": (str, type(None)),
    "upstream_cluster": (str, type(None)),
    "duration_ms": int,
    "bytes_received": int,
    "bytes_sent": int,
    "attempts": int,
    "request_id": (str, type(None)),
}
ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def check_shape(entry: dict[str, Any]) -> None:
    for name, typ in FIELDS.items():
        assert name in entry, name
        assert isinstance(entry[name], typ), (name, entry[name])
    assert ISO_MS.match(entry["start_time"]), entry["start_time"]


# --------------------------------------------------------------------------- pure format


def test_iso_utc_ms() -> None:
    assert iso_utc_ms(0.0) == "1970-01-01T00:00:00.000Z"
    assert iso_utc_ms(1_795_715_700.123) == "2026-11-26T17:55:00.123Z"
    assert iso_utc_ms(1_795_715_700.9999) == "2026-11-26T17:55:00.999Z"


def test_format_line_fields_and_types() -> None:
    line = format_line(
        start_time=1_795_715_700.5,
        method="GET",
        path="/a?b=1",
        authority="reviews:9080",
        response_code=200,
        response_flags="",
        upstream_host="127.0.0.1:9081",
        upstream_cluster="reviews|v1",
        duration_ms=3,
        bytes_received=0,
        bytes_sent=12,
        attempts=1,
        request_id="abc",
    )
    assert line.endswith("\n") and line.count("\n") == 1
    entry = json.loads(line)
    check_shape(entry)
    assert entry["response_flags"] == "-"  # Envoy's "no flag"
    assert entry["start_time"] == "2026-11-26T17:55:00.500Z"
    assert entry["path"] == "/a?b=1"
    assert entry["upstream_host"] == "127.0.0.1:9081"


def test_format_line_escapes_odd_bytes_as_json() -> None:
    line = format_line(
        start_time=0.0,
        method="GET",
        path='/"x"\\\n\xe9',
        authority="h",
        response_code=404,
        response_flags="NR",
        upstream_host=None,
        upstream_cluster=None,
        duration_ms=0,
        bytes_received=0,
        bytes_sent=0,
        attempts=0,
        request_id=None,
    )
    assert line.count("\n") == 1
    assert json.loads(line)["path"] == '/"x"\\\n\xe9'


def _fake_exchange(**kw: Any) -> Any:
    head = SimpleNamespace(
        method="GET",
        target="/p?q=1",
        host="reviews",
        headers=[(b"host", b"reviews")],
        t0=100.0,
    )
    fields: dict[str, Any] = {
        "head": head,
        "ep": None,
        "cluster": None,
        "attempts": 0,
        "request_id": b"",
        "req_bytes": 0,
        "resp_bytes": 9,
    }
    fields.update(kw)
    return SimpleNamespace(**fields)


def test_exchange_line_no_route_has_null_upstream_and_zero_attempts() -> None:
    ex = _fake_exchange()
    entry = json.loads(exchange_line(ex, 404, "NR", now_wall=1000.25, now_mono=100.25))
    check_shape(entry)
    assert entry["response_code"] == 404
    assert entry["response_flags"] == "NR"
    assert entry["upstream_host"] is None and entry["upstream_cluster"] is None
    assert entry["attempts"] == 0
    assert entry["duration_ms"] == 250
    assert entry["start_time"] == "1970-01-01T00:16:40.000Z"
    assert re.fullmatch(r"[0-9a-f-]{36}", entry["request_id"])  # generated, as Envoy does


def test_exchange_line_routed() -> None:
    ex = _fake_exchange(
        ep=SimpleNamespace(key="10.0.0.1:8080"),
        cluster=SimpleNamespace(name="reviews|v1"),
        attempts=1,
        request_id=b"rid-1",
        req_bytes=5,
    )
    entry = json.loads(exchange_line(ex, 200, "-", now_wall=1000.0, now_mono=100.0))
    assert entry["upstream_host"] == "10.0.0.1:8080"
    assert entry["upstream_cluster"] == "reviews|v1"
    assert entry["attempts"] == 1
    assert entry["request_id"] == "rid-1"
    assert entry["bytes_received"] == 5 and entry["bytes_sent"] == 9
    assert entry["path"] == "/p?q=1" and entry["authority"] == "reviews"


def test_exchange_line_absolute_form_and_client_request_id() -> None:
    head = SimpleNamespace(
        method="GET",
        target="http://ratings:9080/x?y",
        host="ignored",
        headers=[(b"x-request-id", b"from-client")],
        t0=1.0,
    )
    entry = json.loads(exchange_line(_fake_exchange(head=head), 503, "UH", 10.0, 1.0))
    assert entry["path"] == "/x?y"
    assert entry["authority"] == "ratings:9080"
    assert entry["request_id"] == "from-client"


# --------------------------------------------------------------------------- buffering


def _read_all(fd: int) -> bytes:
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 1 << 20)
    except BlockingIOError:
        return b""


async def test_lines_are_held_until_start_then_flushed_by_the_timer() -> None:
    r, w = os.pipe()
    try:
        al = AccessLog(w, owned=False, flush_interval=0.05)
        al.append('{"a":1}\n')
        await asyncio.sleep(0.1)
        assert _read_all(r) == b""  # not started: the listening line must come first
        al.start()
        al.append('{"a":2}\n')
        assert _read_all(r) == b""  # buffered, no write per line
        await asyncio.sleep(0.15)
        assert _read_all(r) == b'{"a":1}\n{"a":2}\n'
        al.close()
    finally:
        os.close(r)
        os.close(w)


async def test_buffer_over_the_threshold_is_written_at_once_in_whole_lines() -> None:
    r, w = os.pipe()
    try:
        al = AccessLog(w, owned=False, flush_bytes=120, flush_interval=60.0)
        al.start()
        line = json.dumps({"x": "y" * 40}) + "\n"
        al.append(line)
        assert _read_all(r) == b""
        al.append(line)
        al.append(line)  # over 120 bytes: one write of the three lines
        assert _read_all(r) == line.encode() * 3
        al.append(line)
        al.close()  # exit: what is left is written
        assert _read_all(r) == line.encode()
        al.append(line)  # after close: ignored
        assert _read_all(r) == b""
    finally:
        os.close(r)
        os.close(w)


def test_open_off_is_none_and_bad_path_is_a_clear_error(tmp_path: Path) -> None:
    assert AccessLog.open("off") is None
    with pytest.raises(AccessLogError, match=r"cannot open access log .*nonexistent"):
        AccessLog.open(str(tmp_path / "nonexistent" / "x.log"))
    with pytest.raises(AccessLogError):
        check_target(str(tmp_path / "nonexistent" / "x.log"))
    check_target("-")
    check_target("off")


def test_path_is_opened_in_append_mode(tmp_path: Path) -> None:
    p = tmp_path / "access.log"
    p.write_text('{"old":true}\n')
    al = AccessLog.open(str(p))
    assert al is not None
    al.append('{"new":true}\n')
    al.close()
    assert p.read_text() == '{"old":true}\n{"new":true}\n'


# --------------------------------------------------------------------------- in a data plane


async def test_dataplane_writes_one_line_per_request(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    al = AccessLog.open(str(path))
    assert al is not None
    al.start()
    async with UpstreamServer(Reply(body=b"hello")) as up:
        state = State()
        state.apply(service_snapshot("svc", [up.port]))
        dp = DataPlane(state, FakeMetrics(), Settings(), al)  # type: ignore[arg-type]
        host, port = await dp.start_outbound("127.0.0.1", 0)
        try:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(get("/ok?x=1", host="svc"))
            resp = await read_response(reader)
            assert (resp.status, resp.body) == (200, b"hello")
            writer.write(get("/nope", host="unknown"))
            assert (await read_response(reader)).status == 404
            writer.close()
        finally:
            await dp.close()
            al.close()
        seen = up.requests[0].header("x-request-id")
    entries = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(entries) == 2
    ok, nr = entries
    for e in entries:
        check_shape(e)
    assert ok["response_code"] == 200 and ok["response_flags"] == "-"
    assert ok["upstream_host"] == f"127.0.0.1:{up.port}"
    assert ok["upstream_cluster"] == "svc"
    assert ok["path"] == "/ok?x=1" and ok["authority"] == "svc"
    assert ok["bytes_sent"] == 5 and ok["attempts"] == 1
    assert ok["request_id"] == seen
    assert nr["response_code"] == 404 and nr["response_flags"] == "NR"
    assert nr["upstream_host"] is None and nr["upstream_cluster"] is None
    assert nr["attempts"] == 0
