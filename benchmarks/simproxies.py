"""Simulated proxies for the control-plane scale benchmark (``control_scale.py``).

Usage: ``python benchmarks/simproxies.py --url http://HOST:PORT --first K --count M``
(``--help`` for the mesh shape and compression options).

Theory of operation
-------------------
One process holds ``--count`` WebSocket streams to ``meshproxy control``'s ``/v1/stream``, each
a proxy of its own: node id ``sim-NNNNN``, a namespace and labels given by :func:`identity`
(proxies spread over the namespaces first, then over the apps, then over two versions, so that
many distinct (namespace, labels) groups exist). Each stream is opened the way the real proxy's
client (:mod:`meshproxy.sources.stream`) opens it: aiohttp ``ws_connect`` with the same
``max_msg_size`` and heartbeat, and aiohttp's default per-message deflate offer (the real client
makes it too; ``--no-compress`` leaves it out). It sends the ``hello`` of
:mod:`control.protocol` and answers every ``config`` frame with an ``ack`` for its nonce after
parsing the frame's JSON. A simulated proxy does **not** decode, validate or translate the
documents (a real proxy does, in a worker thread): what is measured is the control plane and the
wire, not the proxies' translation. With ``--parse shared`` a process parses each distinct frame
body once and the other proxies that receive the same body reuse it (:class:`SharedParser`):
a thousand proxies parsing 120 KiB frames with ``json.loads`` cost ~3 s of one core per change,
which would measure the sims, not the control plane.

To prove that a config carries the change the benchmark made, a proxy also reads the weights of
every VirtualService in the frame (:func:`vs_weights`) and reports which ones differ from the
previous frame it received (:func:`weights_changed`); the harness checks that the changed
VirtualService shows up there with its new weights.

Output, on stdout, one JSON object per line (flushed every ``--flush`` seconds, so the harness
can follow the file while the run goes on):

* ``{"n": node, "v": version, "r": t_received, "a": t_acked, "d": documents, "b": characters,
  "c": [[ "ns/name", [weights]], ...] or null}`` per config frame (times are ``time.time()``:
  ``r`` when the whole frame was received, ``a`` when the ACK was written; ``c`` is null for a
  proxy's first frame);
* ``{"connected": count, "failed": count, "t": time}`` once every stream has been opened (or
  failed to);
* ``{"closed": node, "why": text}`` when a stream ends before the process is told to stop, and
  ``{"error": node, "why": text}`` when one could not be opened or the control plane refused it.

SIGTERM or SIGINT closes every stream and exits 0. The process raises its RLIMIT_NOFILE soft
limit to what ``--count`` streams need and exits 2 with a message when the hard limit is lower.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import resource
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:  # control.protocol comes from the checkout this script is in
    sys.path.insert(0, str(REPO))

FD_MARGIN = 64  # descriptors a process needs besides its streams (stdio, loop, resolver)
CONNECT_CONCURRENCY = 64  # streams being opened at once (a ramp, not a thundering herd)
CONNECT_TIMEOUT = 30.0  # seconds for one stream to open
HEARTBEAT = 15.0  # the real proxy's control_heartbeat (meshproxy.settings)

Weights = dict[str, list[int]]


def identity(k: int, namespaces: int, services: int) -> tuple[str, dict[str, str]]:
    """Namespace and labels of simulated proxy number ``k``: namespaces first, then the apps
    of a namespace, then versions v1 / v2, so N proxies make min(N, 2 x namespaces x services)
    distinct groups."""
    ns = f"ns{k % namespaces}"
    app = f"svc{(k // namespaces) % services}"
    version = f"v{1 + (k // (namespaces * services)) % 2}"
    return ns, {"app": app, "version": version}


def node_id(k: int) -> str:
    return f"sim-{k:05d}"


def vs_weights(documents: Sequence[Any]) -> Weights:
    """``namespace/name`` -> the weights of every route destination, for each VirtualService
    among ``documents`` (Istio documents as a config frame carries them)."""
    out: Weights = {}
    for doc in documents:
        if not isinstance(doc, dict) or doc.get("kind") != "VirtualService":
            continue
        meta = doc.get("metadata") or {}
        key = f"{meta.get('namespace', 'default')}/{meta.get('name', '')}"
        weights: list[int] = []
        for rule in (doc.get("spec") or {}).get("http") or []:
            for dest in rule.get("route") or []:
                weights.append(int(dest.get("weight", 0)))
        out[key] = weights
    return out


def weights_changed(old: Mapping[str, list[int]], new: Mapping[str, list[int]]) -> list[Any]:
    """``[[key, weights], ...]`` of the VirtualServices that are new or changed in ``new``,
    sorted by key (removed ones are ``[key, None]``)."""
    out: list[Any] = [[k, w] for k, w in new.items() if old.get(k) != w]
    out += [[k, None] for k in old if k not in new]
    return sorted(out, key=lambda x: x[0])


@dataclass(frozen=True, slots=True)
class Frame:
    """What a simulated proxy needs from a frame it received."""

    kind: str
    nonce: str = ""
    version: str = ""
    documents: int = 0
    weights: Weights = field(default_factory=dict)
    error: str = ""


def parse_frame(text: str) -> Frame:
    """The whole frame through ``json.loads``, as a proxy does before it translates."""
    obj = json.loads(text)
    kind = obj.get("type")
    if kind == "config":
        docs = obj.get("resources") or []
        return Frame("config", obj["nonce"], obj["version"], len(docs), vs_weights(docs))
    return Frame(str(kind), error=str(obj.get("error")))


SHARED_KEEP = 256  # distinct frame bodies a sim process remembers in --parse shared


class SharedParser:
    """``--parse shared``: each distinct config body is parsed once per sim process.

    The control plane encodes one body per distinct config and prefixes the nonce
    (:func:`control.protocol.config_message`): ``{"type":"config","nonce":N,`` + body. The
    prefix is parsed on its own; the body is looked up among those already parsed (hashing
    and comparing it is ~0.1 ms against ~3 ms for ``json.loads`` of 120 KiB). Any other layout
    goes through :func:`parse_frame`. This stands in for many proxies parsing the same frame
    in parallel on their own machines, so a few sim processes do not become the bottleneck
    of the measurement."""

    PREFIX = '{"type":"config","nonce":'
    SPLIT = ',"version":'

    def __init__(self) -> None:
        self.bodies: dict[str, tuple[str, int, Weights]] = {}
        self.parsed = 0

    def __call__(self, text: str) -> Frame:
        head, sep, tail = text.partition(self.SPLIT)
        if not head.startswith(self.PREFIX) or not sep:
            return parse_frame(text)
        nonce = json.loads(head[len(self.PREFIX) :])
        got = self.bodies.get(tail)
        if got is None:
            frame = parse_frame(text)
            self.parsed += 1
            if len(self.bodies) >= SHARED_KEEP:
                self.bodies.pop(next(iter(self.bodies)))
            self.bodies[tail] = got = (frame.version, frame.documents, frame.weights)
        version, documents, weights = got
        return Frame("config", nonce, version, documents, weights)


class Sims:
    """The streams of this process and the lines they report."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.lines: list[str] = []
        self.stopping = False
        self.connected = 0
        self.failed = 0
        self.parse: Callable[[str], Frame] = (
            SharedParser() if args.parse == "shared" else parse_frame
        )

    def emit(self, obj: Mapping[str, Any]) -> None:
        self.lines.append(json.dumps(obj, separators=(",", ":")))

    def flush(self) -> None:
        if self.lines:
            data = "\n".join(self.lines) + "\n"
            self.lines.clear()
            sys.stdout.write(data)
            sys.stdout.flush()

    async def flusher(self) -> None:
        while True:
            await asyncio.sleep(self.args.flush)
            self.flush()

    async def proxy(self, session: Any, k: int, gate: asyncio.Semaphore, opened: Any) -> None:
        import aiohttp

        from control.protocol import (
            MAX_MESSAGE,
            STREAM_PATH,
            Ack,
            Hello,
            ack_message,
            hello_message,
        )

        node = node_id(k)
        ns, labels = identity(k, self.args.namespaces, self.args.services)
        url = self.args.url.rstrip("/") + STREAM_PATH
        try:
            async with gate:
                ws = await asyncio.wait_for(
                    session.ws_connect(
                        url,
                        heartbeat=HEARTBEAT,
                        max_msg_size=MAX_MESSAGE,
                        compress=0 if self.args.no_compress else 15,
                    ),
                    CONNECT_TIMEOUT,
                )
                await ws.send_str(hello_message(Hello(node, ns, labels, None)))
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            self.failed += 1
            self.emit({"error": node, "why": f"{type(e).__name__}: {e}"})
            opened()
            return
        self.connected += 1
        opened()
        previous: Weights | None = None
        why = "closed by the control plane"
        try:
            async for msg in ws:
                received = time.time()
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    continue
                frame = self.parse(msg.data)
                if frame.kind == "error":
                    self.emit({"error": node, "why": frame.error})
                    break
                if frame.kind != "config":
                    continue
                changed = None if previous is None else weights_changed(previous, frame.weights)
                previous = frame.weights
                await ws.send_str(ack_message(Ack(frame.nonce, frame.version)))
                self.emit(
                    {
                        "n": node,
                        "v": frame.version,
                        "r": received,
                        "a": time.time(),
                        "d": frame.documents,
                        "b": len(msg.data),
                        "c": changed,
                    }
                )
        except (aiohttp.ClientError, OSError, ValueError, KeyError) as e:
            why = f"{type(e).__name__}: {e}"
        finally:
            await ws.close()
        if not self.stopping:
            self.emit({"closed": node, "why": why})

    async def run(self) -> int:
        import aiohttp

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        flusher = asyncio.create_task(self.flusher())
        gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
        remaining = self.args.count

        def opened() -> None:
            nonlocal remaining
            remaining -= 1
            if remaining == 0:
                self.emit({"connected": self.connected, "failed": self.failed, "t": time.time()})

        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        async with aiohttp.ClientSession(connector=connector) as session:
            tasks = [
                asyncio.create_task(self.proxy(session, k, gate, opened))
                for k in range(self.args.first, self.args.first + self.args.count)
            ]
            await stop.wait()
            self.stopping = True
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        flusher.cancel()
        self.flush()
        return 0


def raise_nofile(needed: int) -> str | None:
    """Raise this process's RLIMIT_NOFILE soft limit to at least ``needed`` (up to the hard
    limit); the problem, when the hard limit is lower, else None."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        return (
            f"RLIMIT_NOFILE hard limit {hard} is below the {needed} descriptors needed; "
            f"raise it (ulimit -Hn {needed}) or use fewer proxies"
        )
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Simulated proxies: WebSocket streams to meshproxy control that ACK every "
        "config (parsed, not translated) and report when they got and acked it."
    )
    ap.add_argument("--url", required=True, help="the control plane, http://HOST:PORT")
    ap.add_argument("--first", type=int, default=0, help="number of the first proxy [0]")
    ap.add_argument("--count", type=int, required=True, help="how many proxies")
    ap.add_argument("--namespaces", type=int, default=10, help="namespaces of the mesh [10]")
    ap.add_argument("--services", type=int, default=10, help="services per namespace [10]")
    ap.add_argument("--no-compress", action="store_true", help="do not offer permessage-deflate")
    ap.add_argument(
        "--parse",
        choices=["each", "shared"],
        default="each",
        help="each: every proxy json.loads every frame; shared: each distinct frame body is "
        "parsed once per process [each]",
    )
    ap.add_argument("--flush", type=float, default=0.05, help="seconds between output flushes")
    args = ap.parse_args(argv)
    if args.count < 1 or args.first < 0 or args.namespaces < 1 or args.services < 1:
        ap.error("--count, --namespaces and --services must be >= 1, --first >= 0")
    if not args.url.startswith(("http://", "https://")):
        ap.error("--url must start with http:// or https://")
    if args.flush <= 0:
        ap.error("--flush must be > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = raise_nofile(args.count + FD_MARGIN)
    if problem is not None:
        print(f"simproxies.py: {problem}", file=sys.stderr)
        return 2
    # Cyclic GC off: a process holding hundreds of streams would otherwise run full collections
    # over all of them while parsing frames (measured: json.loads of a 120 KiB frame 8.9 ms with
    # it, 2.6 ms without), charging the sims' bookkeeping to every simulated parse. The parsed
    # frames are acyclic and freed by reference counting.
    gc.disable()
    try:
        import uvloop

        return uvloop.run(Sims(args).run())
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
