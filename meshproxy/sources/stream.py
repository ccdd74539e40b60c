"""Control-plane config source: subscribe to ``meshproxy control`` over ``/v1/stream``.

Theory of operation
-------------------
:meth:`StreamSource.run` keeps one WebSocket to the control plane open for the life of the
proxy. After connecting it sends a ``hello`` (node id, namespace, labels and the version it
runs, ``null`` before the first config) and then handles ``config`` frames one at a time, in
order (see :mod:`control.protocol`):

1. A frame whose version is the one already running is ACKed at once.
2. Otherwise the documents are decoded, validated and translated in a worker thread with the
   same code as standalone mode (``control.istio``: ``load_documents``, ``translate`` with a
   :class:`~control.istio.TranslationCache`; the cross-resource reference checks ran at the
   control plane over the whole directory, and on a proxy's subset only their warnings are
   kept). The frame's version must
   be the one its documents' digests give (a truncated or altered frame is refused), and the
   TLS files that SIMPLE / MUTUAL DestinationRules name must load, as Envoy requires of a
   cluster before accepting it.
3. Any problem: NACK with the problem lines; ``state.reject`` records them (``/config_dump``
   ``last_error``) and the last good snapshot stays live. Otherwise the snapshot is swapped in
   whole (``state.apply``, one reference store on the loop) and ACKed.

``/ready`` is 503 until the first config is applied (the admin reads ``state.applied``).

When the stream ends or cannot be opened, the proxy keeps serving its last config and
reconnects after a *full-jitter* exponential backoff: a uniform wait in [0, min(cap, base *
2^n)) (``base`` 0.5 s, ``cap`` 15 s), ``n`` counting failures since the last stream that
delivered a config or stayed up ``stable`` seconds. Jitter spreads a thousand proxies'
reconnections after a control-plane restart over the window instead of one thundering herd.
On reconnect the hello carries the running version, so a control plane with the same content
sends nothing, and one with newer content sends it: the proxy resynchronises either way.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from control.protocol import (
    MAX_MESSAGE,
    STREAM_PATH,
    Ack,
    Hello,
    ProtocolError,
    ack_message,
    config_version,
    hello_message,
    parse_message,
)
from meshproxy.capabilities import unsupported
from meshproxy.config.model import ProxyIdentity, Snapshot
from meshproxy.settings import Settings
from meshproxy.state import State

log = logging.getLogger("meshproxy.sources.stream")

SOURCE_NAME = "<control-plane>"  # the "file" in problem lines about pushed documents
MAX_NACK_LINES = 20


@dataclass(frozen=True, slots=True)
class ControlURL:
    """Where the control plane is: its HTTP base (for /v1/certificates) and stream URL."""

    base: str  # http(s)://host:port
    stream: str  # ws(s)://host:port/v1/stream
    tls: bool


def parse_control_url(url: str) -> ControlURL:
    """``http(s)://HOST:PORT`` (``ws(s)://`` too, the scheme in any case, a trailing
    ``/v1/stream`` ignored); ValueError with a reason otherwise."""
    text = url.strip()
    if "://" not in text:
        raise ValueError("expected http(s)://HOST:PORT or ws(s)://HOST:PORT")
    parts = urlsplit(text)
    schemes = {"http": "http", "ws": "http", "https": "https", "wss": "https"}
    scheme = schemes.get(parts.scheme.lower())
    if scheme is None:
        raise ValueError(f"unsupported scheme {parts.scheme!r} (http, https, ws or wss)")
    if not parts.hostname:
        raise ValueError("no host")
    try:
        parts.port  # noqa: B018 -- raises ValueError for a bad port
    except ValueError:
        raise ValueError("bad port") from None
    if parts.query or parts.fragment:
        raise ValueError("no query or fragment, please")
    path = parts.path.rstrip("/")
    path = path.removesuffix(STREAM_PATH)
    base = urlunsplit((scheme, parts.netloc, path, "", ""))
    ws_scheme = "wss" if scheme == "https" else "ws"
    ws = urlunsplit((ws_scheme, parts.netloc, path + STREAM_PATH, "", ""))
    return ControlURL(base, ws, scheme == "https")


@dataclass(frozen=True, slots=True)
class Backoff:
    base: float = 0.5
    cap: float = 15.0
    stable: float = 10.0  # a stream that lasted this long resets the failure count

    def delay(self, failures: int, rng: Callable[[], float] = random.random) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2**failures))."""
        return rng() * min(self.cap, self.base * (2 ** min(failures, 30)))


class Rejected(Exception):
    """A pushed config the proxy refuses (NACK); the message is the problem lines."""


class StreamSource:
    """The proxy's side of ``/v1/stream``: apply pushed configs, ACK/NACK, reconnect."""

    def __init__(
        self,
        url: str,
        node_id: str,
        proxy: ProxyIdentity,
        state: State,
        settings: Settings,
        metrics: Any = None,
        *,
        ssl_context: ssl.SSLContext | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        from control.istio import TranslationCache

        self.url = parse_control_url(url)
        self.node_id = node_id
        self.proxy = proxy
        self.state = state
        self.settings = settings
        self.metrics = metrics
        self.ssl_context = ssl_context
        self.backoff = backoff or Backoff()
        self._cache = TranslationCache(proxy)
        self.connected = False
        self.connects = 0  # streams opened
        self.acks = 0
        self.nacks = 0
        self.failures = 0  # consecutive failed / short streams
        self.last_error: str | None = None  # why the last stream ended or failed
        self.last_nack: str | None = None
        self.connected_at: float | None = None

    def __repr__(self) -> str:
        return (
            f"StreamSource({self.url.stream!r}, node={self.node_id!r}, "
            f"connected={self.connected}, version={self.state.snapshot.version!r})"
        )

    def view(self) -> dict[str, Any]:
        """For ``/config_dump``."""
        return {
            "url": self.url.base,
            "node_id": self.node_id,
            "connected": self.connected,
            "streams": self.connects,
            "acks": self.acks,
            "nacks": self.nacks,
            "last_nack": self.last_nack,
            "last_error": self.last_error,
        }

    # ------------------------------------------------------------------ connection loop

    async def run(self) -> None:
        """Stay subscribed until cancelled."""
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10.0)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                started = time.monotonic()
                delivered = False
                try:
                    delivered = await self._stream(session)
                    self.last_error = "stream closed by the control plane"
                except asyncio.CancelledError:
                    raise
                except (aiohttp.ClientError, OSError, TimeoutError, ProtocolError) as e:
                    self.last_error = _describe(e)
                except Exception as e:  # a bug must not stop the subscription
                    log.exception("control-plane stream failed")
                    self.last_error = repr(e)
                finally:
                    self.connected = False
                if delivered or time.monotonic() - started >= self.backoff.stable:
                    self.failures = 0
                pause = self.backoff.delay(self.failures)
                self.failures += 1
                log.warning(
                    "control plane %s: %s; serving version %s, reconnecting in %.2fs",
                    self.url.base,
                    self.last_error,
                    self.state.snapshot.version if self.state.applied else None,
                    pause,
                )
                await asyncio.sleep(pause)

    async def _stream(self, session: aiohttp.ClientSession) -> bool:
        """One stream; returns whether it delivered a config frame."""
        delivered = False
        async with session.ws_connect(
            self.url.stream,
            heartbeat=self.settings.control_heartbeat,
            max_msg_size=MAX_MESSAGE,
            ssl=self.ssl_context if self.ssl_context is not None else True,
        ) as ws:
            self.connected = True
            self.connects += 1
            self.connected_at = time.time()
            running = self.state.snapshot.version if self.state.applied else None
            await ws.send_str(
                hello_message(
                    Hello(self.node_id, self.proxy.namespace, dict(self.proxy.labels), running)
                )
            )
            log.info("subscribed to %s as %s (running %s)", self.url.base, self.node_id, running)
            async for msg in ws:
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    continue
                obj = parse_message(msg.data)
                kind = obj.get("type")
                if kind == "config":
                    delivered = True
                    await ws.send_str(ack_message(await self.on_config(obj)))
                elif kind == "error":
                    raise ProtocolError(f"control plane refused us: {obj.get('error')}")
                else:
                    log.debug("ignoring a %r frame", kind)
        return delivered

    # ------------------------------------------------------------------ applying

    async def on_config(self, obj: dict[str, Any]) -> Ack:
        """Apply one ``config`` frame (or refuse it); the answer to send."""
        nonce = obj.get("nonce")
        version = obj.get("version")
        docs = obj.get("resources")
        if not isinstance(nonce, str) or not isinstance(version, str) or not isinstance(docs, list):
            raise ProtocolError("config frame without nonce, version and resources")
        if self.state.applied and version == self.state.snapshot.version:
            self.acks += 1
            return Ack(nonce, version)
        gc_was_enabled = gc.isenabled()
        gc.disable()  # as the file source: no full collections over a fresh snapshot
        try:
            try:
                snapshot, warnings = await asyncio.to_thread(self.build, version, docs)
            except Rejected as e:
                return self._nack(nonce, version, str(e))
            for w in warnings:
                log.warning("%s", w)
            self.state.apply(snapshot)
            gc.freeze()
        finally:
            if gc_was_enabled:
                gc.enable()
        self.acks += 1
        if self.metrics is not None:
            self.metrics.config_reload("success")
        log.info(
            "applied config version %s from the control plane (%d clusters)",
            version,
            len(snapshot.clusters),
        )
        return Ack(nonce, version)

    def _nack(self, nonce: str, version: str, error: str) -> Ack:
        self.nacks += 1
        self.last_nack = error
        self.state.reject(error)
        if self.metrics is not None:
            self.metrics.config_reload("rejected")
        log.warning(
            "refused config version %s (NACK), keeping %s: %s",
            version,
            self.state.snapshot.version if self.state.applied else None,
            error,
        )
        return Ack(nonce, version, error)

    def build(self, version: str, docs: list[Any]) -> tuple[Snapshot, list[str]]:
        """Blocking (a worker thread): documents -> snapshot, or :class:`Rejected`."""
        from control.istio import Resources, translate
        from control.istio.load import cross_checks, load_documents
        from control.istio.validate import ValidationReport
        from meshproxy.upstream.pool import check_tls_files

        report = ValidationReport()
        try:
            items = load_documents(SOURCE_NAME, docs, report)
            resources = Resources.of(items)
            # References between resources were checked by the control plane over the whole
            # directory; on this proxy's subset a reference to a document it does not need
            # (e.g. a subset defined in a rule exported elsewhere) looks dangling, so here
            # only the warnings count.
            refs = ValidationReport()
            cross_checks(resources, refs)
            report.warnings.extend(refs.warnings)
            if not report.problems:
                got = config_version(r.digest for r in items)
                if got != version:
                    report.problems.append(
                        f"{SOURCE_NAME}: version {version} does not match its documents "
                        f"({got}): refusing a damaged config"
                    )
            if report.problems:
                raise Rejected(_lines(report.problems))
            snapshot = translate(resources, self.proxy, version=version, cache=self._cache)
            tls = check_tls_files(snapshot.clusters.values())
            if tls:
                raise Rejected(_lines(tls))
        except Rejected:
            raise
        except Exception as e:  # a translation bug must not take the proxy down: refuse
            log.exception("building pushed config %s failed", version)
            raise Rejected(f"internal error while building config: {e!r}") from None
        warnings = [*report.warnings, *snapshot.warnings, *unsupported(snapshot)]
        return snapshot, list(dict.fromkeys(warnings))


def _lines(problems: list[str]) -> str:
    shown = problems[:MAX_NACK_LINES]
    more = len(problems) - len(shown)
    return "\n".join(shown) + (f"\n... and {more} more" if more > 0 else "")


def _describe(e: BaseException) -> str:
    if isinstance(e, aiohttp.WSServerHandshakeError):
        return f"stream refused: HTTP {e.status}"
    if isinstance(e, aiohttp.ClientConnectorCertificateError):
        return f"control plane certificate not trusted: {e.certificate_error}"
    if isinstance(e, aiohttp.ClientConnectorError):
        return f"cannot connect: {e.os_error.strerror or e.os_error}"
    if isinstance(e, TimeoutError):
        return "timed out"
    return str(e) or type(e).__name__
