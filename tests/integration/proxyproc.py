"""Helpers for integration tests: a real ``python -m meshproxy`` subprocess, a tiny real
upstream, the Istio YAML they share, and a raw HTTP/1.1 client for keep-alive checks.

Every process started here is stopped by its PID; every socket is on 127.0.0.1 with an
OS-chosen port.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.support.upstream import Recorded, Reply, UpstreamServer

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 20.0


# --------------------------------------------------------------------------- upstream


class Upstream:
    """A real upstream (the shared :class:`tests.support.upstream.UpstreamServer`) answering
    JSON ``{"name", "path", "headers"}``; ``/slow?s=N`` answers after N seconds."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.server = UpstreamServer(self._reply)
        self.port = 0

    def _reply(self, req: Recorded) -> Reply:
        url = urlsplit(req.target)
        delay = float(parse_qs(url.query).get("s", ["1"])[0]) if url.path == "/slow" else 0.0
        path = (
            req.target
            if req.target.startswith("/")
            else url.path + (f"?{url.query}" if url.query else "")
        )
        body = json.dumps({"name": self.name, "path": path, "headers": dict(req.headers)})
        return Reply(
            body=body.encode(), headers=[("content-type", "application/json")], delay=delay
        )

    @property
    def hits(self) -> int:
        return len(self.server.requests)

    async def start(self) -> Upstream:
        await self.server.start()
        self.port = self.server.port
        return self

    async def close(self) -> None:
        await self.server.close()


# --------------------------------------------------------------------------- config


def reviews_yaml(v1_port: int, v2_port: int, w1: int = 100, w2: int = 0) -> str:
    """ServiceEntry reviews (v1, v2 endpoints), DestinationRule subsets, VirtualService with a
    jason -> v2 rule and a weighted default."""
    return textwrap.dedent(
        f"""\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata:
          name: reviews
        spec:
          hosts: [reviews.default.svc.cluster.local]
          location: MESH_INTERNAL
          resolution: STATIC
          ports:
          - number: 9080
            name: http
            protocol: HTTP
          endpoints:
          - address: 127.0.0.1
            ports: {{http: {v1_port}}}
            labels: {{app: reviews, version: v1}}
          - address: 127.0.0.1
            ports: {{http: {v2_port}}}
            labels: {{app: reviews, version: v2}}
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata:
          name: reviews
        spec:
          host: reviews
          subsets:
          - name: v1
            labels: {{version: v1}}
          - name: v2
            labels: {{version: v2}}
        """
    ) + vs_yaml(w1, w2)


def vs_yaml(w1: int, w2: int) -> str:
    return textwrap.dedent(
        f"""\
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata:
          name: reviews
        spec:
          hosts: [reviews]
          http:
          - name: jason
            match:
            - headers:
                end-user: {{exact: jason}}
            route:
            - destination: {{host: reviews, subset: v2}}
          - name: split
            route:
            - destination: {{host: reviews, subset: v1}}
              weight: {w1}
            - destination: {{host: reviews, subset: v2}}
              weight: {w2}
        """
    )


def many_services_yaml(n: int) -> str:
    """``n`` STATIC ServiceEntries: a config that takes a noticeable time to translate."""
    return "---\n".join(
        textwrap.dedent(
            f"""\
            apiVersion: networking.istio.io/v1
            kind: ServiceEntry
            metadata: {{name: svc{i}}}
            spec:
              hosts: [svc{i}.default.svc.cluster.local]
              location: MESH_INTERNAL
              resolution: STATIC
              ports: [{{number: 80, name: http, protocol: HTTP}}]
              endpoints: [{{address: 127.0.0.1, ports: {{http: {20000 + i % 1000}}}}}]
            """
        )
        for i in range(n)
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path: Path, text: str) -> None:
    """Replace ``path`` atomically, as an editor or a config-management tool would."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- the proxy process


def meshproxy_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "meshproxy", *args]


def run_cli(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """``python -m meshproxy ARGS`` run to completion from the repository, output captured as
    text (a one-shot command: ``validate``, ``ca ...``)."""
    return subprocess.run(
        meshproxy_argv(*args), capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


async def kill_process(proc: asyncio.subprocess.Process | None) -> None:
    """SIGKILL ``proc`` by its PID, unless it has exited already, and reap it."""
    if proc is not None and proc.returncode is None:
        os.kill(proc.pid, signal.SIGKILL)
        await proc.wait()


async def start_listening(
    argv: Sequence[str], log_path: Path, what: str
) -> tuple[asyncio.subprocess.Process, dict[str, str]]:
    """Start ``python -m meshproxy ARGV`` (stderr to ``log_path``, run from the repository) and
    read its first stdout line, ``listening outbound=... [inbound=...] admin=...``; returns the
    process and that line's fields. A process that does not print the line within
    START_TIMEOUT, or prints another one, is killed and the test fails naming ``what`` with
    what the process wrote to stderr."""

    def stderr() -> str:
        return log_path.read_text(errors="replace") if log_path.exists() else ""

    log = open(log_path, "wb")
    try:
        proc = await asyncio.create_subprocess_exec(
            *meshproxy_argv(*argv),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
            cwd=REPO,
        )
    finally:
        log.close()
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT)
    except TimeoutError:
        await kill_process(proc)
        raise AssertionError(f"{what} did not start:\n{stderr()}") from None
    text = line.decode().strip()
    if not text.startswith("listening "):
        await kill_process(proc)
        raise AssertionError(
            f"{what}: unexpected first line {text!r} (exit {proc.returncode}):\n{stderr()}"
        )
    return proc, dict(p.split("=", 1) for p in text.split()[1:])


@dataclass
class MeshProxy:
    """``python -m meshproxy run`` as a subprocess; ``outbound`` / ``admin`` from its line."""

    config: Sequence[Path]
    extra: Sequence[str] = ()
    log_path: Path | None = None
    proc: asyncio.subprocess.Process | None = None
    outbound: str = ""
    admin: str = ""  # set before start() to choose the admin address

    async def start(self) -> MeshProxy:
        argv = ["run"]
        for c in self.config:
            argv += ["--config", str(c)]
        argv += ["--outbound", "127.0.0.1:0", "--admin", self.admin or "127.0.0.1:0", *self.extra]
        assert self.log_path is not None
        self.proc, fields = await start_listening(argv, self.log_path, "meshproxy")
        self.outbound, self.admin = fields["outbound"], fields["admin"]
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stderr(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    async def wait(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def kill(self) -> None:
        await kill_process(self.proc)

    async def stop(self) -> int:
        """SIGTERM, wait for exit; SIGKILL if it does not stop."""
        if self.proc is None or self.proc.returncode is not None:
            return -1 if self.proc is None else self.proc.returncode
        self.signal(signal.SIGTERM)
        try:
            return await self.wait()
        except TimeoutError:
            await self.kill()
            raise

    # -------------------------------------------------------------- clients

    async def get(
        self,
        session: aiohttp.ClientSession,
        path: str = "/",
        host: str = "reviews",
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        h = {"Host": host, **(headers or {})}
        async with session.get(f"http://{self.outbound}{path}", headers=h) as r:
            body = await r.read()
            try:
                return r.status, json.loads(body)
            except ValueError:
                return r.status, body.decode(errors="replace")

    async def admin_get(self, path: str) -> tuple[int, Any]:
        async with aiohttp.ClientSession() as s, s.get(f"http://{self.admin}{path}") as r:
            body = await r.read()
            if r.content_type == "application/json":
                return r.status, json.loads(body)
            return r.status, body.decode()

    async def admin_post(self, path: str) -> int:
        async with aiohttp.ClientSession() as s, s.post(f"http://{self.admin}{path}") as r:
            await r.read()
            return r.status


@dataclass
class Control:
    """``meshproxy control`` as a subprocess."""

    config_dir: Path
    log_path: Path
    listen: str = "127.0.0.1:0"
    extra: list[str] = field(default_factory=list)
    proc: asyncio.subprocess.Process | None = None
    addr: str = ""
    tls_ca: Path | None = None  # with --ca-dir: the mesh root that verifies it

    async def start(self) -> Control:
        argv = ["control", "--config", str(self.config_dir), "--listen", self.listen, *self.extra]
        self.proc, fields = await start_listening(argv, self.log_path, "meshproxy control")
        self.addr = fields["control"]
        self.listen = self.addr  # a restart comes back on the same port
        return self

    @property
    def url(self) -> str:
        return f"{'https' if self.tls_ca else 'http'}://{self.addr}"

    async def get(self, path: str) -> tuple[int, Any]:
        ctx = ssl.create_default_context(cafile=str(self.tls_ca)) if self.tls_ca else None
        async with aiohttp.ClientSession() as s, s.get(self.url + path, ssl=ctx or True) as r:
            body = await r.read()
            if r.content_type == "application/json":
                return r.status, json.loads(body)
            return r.status, body.decode()

    async def status(self) -> dict[str, Any]:
        code, body = await self.get("/status")
        assert code == 200
        return body

    async def metric(self, name: str) -> float:
        _, text = await self.get("/metrics")
        m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    async def kill(self) -> None:
        await kill_process(self.proc)

    async def stop(self) -> int | None:
        if self.proc is None or self.proc.returncode is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), 15)


async def ready(p: MeshProxy) -> bool:
    """``/ready`` answers 200 (False while it is not, or not listening yet)."""
    try:
        code, _ = await p.admin_get("/ready")
    except aiohttp.ClientError:
        return False
    return code == 200


def request_samples(text: str, name: str = "istio_requests_total") -> list[Any]:
    return [
        s for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name
    ]


async def wait_until(pred, timeout: float = 5.0, interval: float = 0.05) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = pred()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)


# --------------------------------------------------------------------------- raw client


class RawConn:
    """A raw HTTP/1.1 keep-alive client connection, to observe when the proxy closes it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, addr: str) -> RawConn:
        host, _, port = addr.rpartition(":")
        return cls(*await asyncio.open_connection(host, int(port)))

    async def request(self, path: str = "/", host: str = "reviews") -> tuple[int, bytes]:
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        await self.writer.drain()
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length":
                length = int(v)
        body = await self.reader.readexactly(length)
        return status, body

    async def closed_by_peer(self, timeout: float) -> bool:
        try:
            data = await asyncio.wait_for(self.reader.read(1), timeout)
        except TimeoutError:
            return False
        except ConnectionError:
            return True
        return data == b""

    def close(self) -> None:
        self.writer.close()
