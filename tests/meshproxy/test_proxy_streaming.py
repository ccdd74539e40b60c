"""Large bodies stream through a proxy running in its own process with bounded memory."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from tests.support.rawhttp import read_response
from tests.support.upstream import Recorded, Reply, UpstreamServer

ROOT = Path(__file__).resolve().parents[2]
SIZE = 50 * 1024 * 1024


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@asynccontextmanager
async def proxy_process(*routes: str) -> AsyncIterator[tuple[int, int]]:
    args = [a for r in routes for a in ("--route", r)]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.support.proxy_process",
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert line.startswith(b"listening "), line
        port = int(line.split(b":")[-1])
        yield proc.pid, port
    finally:
        if proc.returncode is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                os.kill(proc.pid, signal.SIGKILL)
                await proc.wait()


class Sampler:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            self.peak = max(self.peak, rss_kib(self.pid))
            await asyncio.sleep(0.02)

    def stop(self) -> None:
        self._task.cancel()


async def test_50mb_upload_and_download_with_bounded_memory() -> None:
    payload = os.urandom(1024 * 1024) * 50
    assert len(payload) == SIZE

    def handler(rec: Recorded) -> Reply:
        if rec.method == "POST":
            return Reply(body=b"%d" % len(rec.body))
        return Reply(body=payload)

    async with UpstreamServer(handler) as up:
        async with proxy_process(f"svc={up.port}") as (pid, port):
            await asyncio.sleep(0.2)
            base = rss_kib(pid)
            sampler = Sampler(pid)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            # upload, Content-Length framed, written in 256 KiB pieces
            writer.write(b"POST /up HTTP/1.1\r\nHost: svc\r\nContent-Length: %d\r\n\r\n" % SIZE)
            view = memoryview(payload)
            for off in range(0, SIZE, 256 * 1024):
                writer.write(view[off : off + 256 * 1024])
                await writer.drain()
            r = await read_response(reader, timeout=60)
            assert r.status == 200 and r.body == b"%d" % SIZE
            assert up.requests[0].body == payload
            # download with a slow start: the proxy must stop reading the upstream meanwhile
            writer.write(b"GET /down HTTP/1.1\r\nHost: svc\r\n\r\n")
            await asyncio.sleep(0.5)
            r = await read_response(reader, timeout=60)
            assert r.status == 200 and len(r.body) == SIZE and r.body == payload
            writer.close()
            sampler.stop()
            growth_mib = (sampler.peak - base) / 1024
            assert growth_mib < 20, f"proxy RSS grew by {growth_mib:.1f} MiB"
