"""How long a big ``/config_dump`` takes and how long it holds the event loop.

Theory of operation
-------------------
The admin server shares the proxy's process, event loop and GIL with the data path, so a dump
of a big table must not hold the loop. This script measures exactly that, in-process:

1. :func:`bigtable.generate` writes the big table (10,000 hosts, 50,000 routes by default) and
   ``control.istio.build_snapshot`` translates it, as ``meshproxy run`` would (then
   ``gc.freeze()``, as the file source does after applying a snapshot);
2. an :class:`meshproxy.admin.Admin` serves it on 127.0.0.1 (OS-chosen port) on uvloop, with a
   backend that builds the dump document in a thread as ``meshproxy.app.Proxy`` does;
3. a loop-lag probe (``asyncio.sleep(0.001)`` in a loop, lateness = how much later than 1 ms it
   woke) runs on the same loop, standing in for the data path;
4. a separate client process (this script with ``--fetch``, so its reading does not compete
   for our GIL) GETs ``/config_dump`` (plus ``--query``) and reports status, bytes, seconds.

Reported: the dump's bytes and seconds, and the longest and p99 loop lag while it ran.
``PYTHONPATH=OTHER_CHECKOUT python benchmarks/dumpstall.py`` measures another version of
``meshproxy.admin`` (e.g. the one before streaming) with the same harness.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import bigtable
from harness import REPO, http_get

if str(REPO) not in sys.path:
    sys.path.append(str(REPO))  # after PYTHONPATH, so another checkout can be measured


def fetch(port: int, path: str, timeout: float) -> None:
    """The client side (``--fetch``): one GET, a JSON summary on stdout."""
    t0 = time.monotonic()
    reply = http_get(port, path, host="127.0.0.1", timeout=timeout)
    took = time.monotonic() - t0
    try:
        version = json.loads(reply.body).get("version")
        valid = True
    except ValueError:
        version, valid = None, False
    summary = {
        "status": reply.status,
        "bytes": len(reply.body),
        "seconds": round(took, 3),
        "valid_json": valid,
        "version": version,
        "content_length": reply.headers.get("content-length"),
    }
    print(json.dumps(summary))


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))] if ordered else 0.0


async def measure(snapshot: Any, query: str, timeout: float) -> dict[str, Any]:
    from meshproxy.admin import Admin, snapshot_dump

    class Backend:
        async def is_ready(self) -> bool:
            return True

        async def config_dump(self) -> dict[str, Any]:
            return await asyncio.to_thread(snapshot_dump, snapshot)

        async def clusters(self) -> dict[str, Any]:
            return {"clusters": []}

        async def stats_export(self) -> Any:
            return {}

        async def drain(self) -> None:
            return None

        def request_quit(self) -> None:
            return None

    admin = Admin(Backend())  # type: ignore[arg-type]
    _, port = await admin.start("127.0.0.1", 0)
    loop = asyncio.get_running_loop()
    lags: list[float] = []
    done = asyncio.Event()

    async def probe() -> None:
        clock = time.perf_counter  # loop.time() is uvloop's millisecond clock: too coarse
        while not done.is_set():
            t0 = clock()
            await asyncio.sleep(0.001)
            lags.append(clock() - t0 - 0.001)

    task = loop.create_task(probe())
    path = "/config_dump" + (f"?{query}" if query else "")
    client = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--fetch",
        str(port),
        path,
        str(timeout),
        stdout=subprocess.PIPE,
    )
    try:
        out, _ = await asyncio.wait_for(client.communicate(), timeout + 10)
    finally:
        if client.returncode is None:
            client.kill()
            await client.wait()
        done.set()
        await task
        await admin.close()
    result: dict[str, Any] = json.loads(out) if out.strip() else {"error": "client failed"}
    result["loop_lag_max_ms"] = round(max(lags, default=0.0) * 1e3, 2)
    result["loop_lag_p99_ms"] = round(percentile(lags, 99) * 1e3, 2)
    result["loop_lag_samples"] = len(lags)
    return result


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--fetch":
        fetch(int(sys.argv[2]), sys.argv[3], float(sys.argv[4]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hosts", type=int, default=10_000, help="hosts in the table [10000]")
    ap.add_argument(
        "--query", default="", help="query string for /config_dump, e.g. resource=version"
    )
    ap.add_argument("--repeat", type=int, default=1, help="dumps to measure in a row [1]")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per dump [120]")
    args = ap.parse_args()

    import uvloop

    from control.istio import build_snapshot
    from meshproxy.config.model import ProxyIdentity

    with tempfile.TemporaryDirectory(prefix="dumpstall-") as tmp:
        table = Path(tmp) / "table"
        bigtable.generate(table, args.hosts, upstream_port=9)
        t0 = time.monotonic()
        snapshot, report = build_snapshot([str(table)], ProxyIdentity())
        if snapshot is None:
            print("\n".join(report.problems), file=sys.stderr)
            return 1
        gc.freeze()
        print(f"{args.hosts:,} hosts translated in {time.monotonic() - t0:.1f} s", flush=True)
        for _ in range(args.repeat):
            res = uvloop.run(measure(snapshot, args.query, args.timeout))
            print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
