"""A tiny demo backend for the example mesh: answers every request with JSON describing itself.

Theory of operation: one aiohttp server; each request (any method, any path) gets
``{"service", "version", "path", "method", "headers"}`` so you can see which version the proxy
routed to and which headers arrived (``x-request-id``, ``x-envoy-attempt-count``, ...).

    python examples/demo_backend.py --service reviews --version v1 --port 9081
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from aiohttp import web


def make_app(service: str, version: str) -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response(
            {
                "service": service,
                "version": version,
                "method": request.method,
                "path": request.path_qs,
                "headers": dict(request.headers),
                "body_bytes": len(body),
            }
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def serve(service: str, version: str, host: str, port: int) -> None:
    runner = web.AppRunner(make_app(service, version), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]
    print(f"listening {service} {version} on {host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--service", default="reviews")
    p.add_argument("--version", default="v1")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9081)
    args = p.parse_args()
    try:
        asyncio.run(serve(args.service, args.version, args.host, args.port))
    except OSError as e:
        print(f"demo_backend: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
