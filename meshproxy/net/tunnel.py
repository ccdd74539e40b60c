"""A TCP byte pipe from an accepted client connection to an upstream address.

Theory of operation
-------------------
Transparent capture sends *every* outbound TCP connection of the pod to the outbound
listener, not only HTTP: an application's TLS to an external API, a database protocol... When
such a connection was redirected and does not start like an HTTP request, the listener hands
it to a :class:`TcpTunnel`, Envoy's ``tcp_proxy`` to the ``PassthroughCluster``: the
client's bytes go to the original destination unchanged and the answer comes back.

* **Connect under a deadline** (Istio's ``connectTimeout``, 10 s) in one task owned by the
  tunnel; reading from the client is paused until the upstream is there and the bytes already
  received (held, never more than one read's worth) are written first.
* **Back-pressure both ways**: a side whose write buffer passes its high-water mark pauses
  reading on the other side (``pause_writing`` / ``resume_writing``), so neither buffers more
  than the transports' limits (the upstream gets the same limits as the client, the
  listener's ``high_water`` / ``low_water``). Each side's "paused writing" is remembered, so
  the end of the connect (which writes the held bytes, possibly pausing at once) resumes the
  client only if the upstream is not full, and an upstream connected while the client's
  buffer is full starts paused.
* **Half-close** is passed on (``write_eof``), so request/response protocols that end with a
  shutdown work. The EOF of each direction is recorded: once both directions have ended (or
  one has and the other side is already closing) the tunnel closes both transports (pending
  bytes are flushed first), so a connection whose two peers each shut down their sending side
  is not left open forever. Either side's close closes the other. :meth:`close` ends
  everything and cancels a connect in progress; nothing is left running after it.
* **Idle timeout** (Envoy's tcp_proxy ``idle_timeout``, 1 h by default): every read counts in
  :attr:`TcpTunnel.moved`; the data plane's periodic sweep (one timer for every connection,
  none per tunnel) calls :meth:`TcpTunnel.idle_check`, which closes a tunnel whose count has
  not changed for the timeout.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

__all__ = ["TcpTunnel"]


class _Upstream(asyncio.Protocol):
    """The upstream side: everything read goes to the client transport."""

    def __init__(self, tunnel: TcpTunnel) -> None:
        self.tunnel = tunnel

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        limits = self.tunnel.limits
        if limits is not None:
            transport.set_write_buffer_limits(*limits)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        tunnel = self.tunnel
        tunnel.moved += 1
        tunnel.client.write(data)

    def eof_received(self) -> bool:
        return self.tunnel.upstream_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self.tunnel.upstream_lost()

    def pause_writing(self) -> None:
        tunnel = self.tunnel
        tunnel.up_full = True
        tunnel.client.pause_reading()

    def resume_writing(self) -> None:
        tunnel = self.tunnel
        tunnel.up_full = False
        if tunnel._up is not None:  # while connecting the client stays paused
            tunnel.client.resume_reading()


class TcpTunnel:
    """Pipes ``client`` (an accepted transport whose protocol forwards its events here) to
    ``host:port``. ``first`` is what the client sent before the tunnel existed; ``limits``
    the upstream transport's write buffer (high, low) water marks (the client's, normally)."""

    def __init__(
        self,
        client: asyncio.Transport,
        first: bytes,
        on_close: Callable[[TcpTunnel], None] | None = None,
        limits: tuple[int, int] | None = None,
    ) -> None:
        self.client = client
        self.limits = limits
        self.up_full = False  # the upstream's write buffer is past its high-water mark
        self.client_full = False  # the client's write buffer is past its high-water mark
        self._held: list[bytes] = [first] if first else []
        self._client_eof = False  # the client half-closed (held back while connecting)
        self._up_eof = False  # the upstream half-closed
        self._up: asyncio.Transport | None = None
        self._task: asyncio.Task[None] | None = None
        self._on_close = on_close
        self.closed = False
        self.target = ""
        self.moved = 1  # reads so far, both ways (the idle check compares it with its last look)
        self._seen = 0  # `moved` at the idle check's last look, and since when it is unchanged
        self._seen_at = 0.0

    def start(self, host: str, port: int, timeout: float) -> None:
        """Connect in the background (the client is paused until then)."""
        self.target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.client.pause_reading()
        self._task = asyncio.get_running_loop().create_task(self._connect(host, port, timeout))

    async def _connect(self, host: str, port: int, timeout: float) -> None:
        try:
            async with asyncio.timeout(timeout):
                up, _ = await asyncio.get_running_loop().create_connection(
                    lambda: _Upstream(self), host, port
                )
        except (OSError, TimeoutError) as e:
            log.debug("tcp passthrough to %s failed: %s", self.target, e or type(e).__name__)
            self._task = None
            self.close()
            return
        self._task = None
        if self.closed:
            up.close()
            return
        self._up = up
        for piece in self._held:
            up.write(piece)
        self._held = []
        if self._client_eof:
            if self._up_eof or not up.can_write_eof():
                self.close()
                return
            up.write_eof()
        if self.client_full:  # upstream bytes that came while connecting filled the client
            up.pause_reading()
        if not self.up_full:  # the held bytes may have filled the upstream already
            self.client.resume_reading()

    # ------------------------------------------------------------------ client events

    def client_data(self, data: bytes) -> None:
        self.moved += 1
        up = self._up
        if up is not None:
            up.write(data)
        elif not self.closed:
            self._held.append(data)  # at most what arrived before pause_reading took effect

    def client_eof(self) -> bool:
        """The client half-closed; True keeps the client transport open for the answer
        (False: the tunnel is closed, both directions having ended)."""
        if self._client_eof or self.closed:
            return not self.closed
        self._client_eof = True
        up = self._up
        if up is None:
            return True  # passed on once connected
        if self._up_eof or up.is_closing() or not up.can_write_eof():
            self.close()
            return False
        up.write_eof()
        return True

    def upstream_eof(self) -> bool:
        """The upstream half-closed; True keeps the upstream transport open (the client may
        still send)."""
        if self._up_eof or self.closed:
            return not self.closed
        self._up_eof = True
        client = self.client
        if self._client_eof or client.is_closing() or not client.can_write_eof():
            self.close()
            return False
        client.write_eof()
        return True

    def client_paused_writing(self) -> None:
        self.client_full = True
        if self._up is not None:
            self._up.pause_reading()

    def client_resumed_writing(self) -> None:
        self.client_full = False
        if self._up is not None:
            self._up.resume_reading()

    # ------------------------------------------------------------------ endings

    def idle_check(self, now: float, timeout: float) -> None:
        """Called by the data plane's periodic sweep: close the tunnel once no byte has moved
        either way for ``timeout`` seconds (Envoy's tcp_proxy ``idle_timeout``)."""
        if self.moved != self._seen:
            self._seen = self.moved
            self._seen_at = now
        elif now - self._seen_at >= timeout:
            log.debug("tcp passthrough to %s idle for %.0fs: closed", self.target, timeout)
            # aborted, not closed: a peer that stopped reading would keep a flushing close
            # (and its buffered bytes) forever; Envoy's idle timeout closes with NoFlush too
            self.close(flush=False)

    def upstream_lost(self) -> None:
        self._up = None
        self.close()

    def close(self, flush: bool = True) -> None:
        """End the tunnel: cancel a connect in progress, close both sides (idempotent);
        ``flush=False`` aborts them, dropping what their write buffers still hold."""
        if self.closed:
            return
        self.closed = True
        if self._task is not None:
            self._task.cancel()
            self._task = None
        up, self._up = self._up, None
        if up is not None:
            up.close() if flush else up.abort()
        if not flush:
            self.client.abort()
        elif not self.client.is_closing():
            self.client.close()
        if self._on_close is not None:
            self._on_close(self)

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("open" if self._up is not None else "connecting")
        return f"TcpTunnel({self.target}, {state})"
