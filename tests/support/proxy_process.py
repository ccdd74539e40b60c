"""Run a DataPlane in its own process, for tests that measure it from outside (memory, CPU).

``python -m tests.support.proxy_process --route HOST=PORT[,PORT...]`` starts an outbound
listener on 127.0.0.1:0 routing each HOST to 127.0.0.1:PORTs, prints
``listening HOST:PORT`` (flushed) and serves until SIGTERM/SIGINT. Metrics calls are counted,
not rendered; ``SIGUSR1`` prints ``stats requests=N opened=N``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from meshproxy.config.model import Snapshot
from meshproxy.dataplane import DataPlane
from meshproxy.settings import Settings
from meshproxy.state import State
from tests.support.fakes import cluster, snapshot, to_cluster, vhost


class CountingMetrics:
    def __init__(self) -> None:
        self.requests = 0
        self.opened = 0

    def record_request(self, *args: object) -> None:
        self.requests += 1

    def upstream_connection_opened(self, cluster_name: str) -> None:
        self.opened += 1

    def downstream_connections(self, delta: int) -> None:
        pass


def build(routes: list[str]) -> Snapshot:
    vhs, cls = [], []
    for spec in routes:
        host, _, ports = spec.partition("=")
        vhs.append(vhost(host, (to_cluster(host),)))
        cls.append(cluster(host, [int(p) for p in ports.split(",") if p]))
    return snapshot(vhs, cls)


async def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--route", action="append", default=[])
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args(argv)
    state = State()
    state.apply(build(args.route))
    metrics = CountingMetrics()
    dp = DataPlane(state, metrics, Settings())  # type: ignore[arg-type]
    host, port = await dp.start_outbound("127.0.0.1", args.port)
    print(f"listening {host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(
        signal.SIGUSR1,
        lambda: print(f"stats requests={metrics.requests} opened={metrics.opened}", flush=True),
    )
    await stop.wait()
    await dp.close()
    return 0


if __name__ == "__main__":
    import uvloop

    sys.exit(uvloop.run(main(sys.argv[1:])))
