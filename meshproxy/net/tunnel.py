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
  than the transports' limits.
* **Half-close** is passed on (``write_eof``), so request/response protocols that end with a
  shutdown work; either side's close closes the other. :meth:`close` ends everything and
  cancels a connect in progress; nothing is left running after it.
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

    def data_received(self, data: bytes) -> None:
        self.tunnel.client.write(data)

    def eof_received(self) -> bool:
        client = self.tunnel.client
        if client.can_write_eof() and not client.is_closing():
            client.write_eof()
            return True  # the client may still send: keep our side open
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.tunnel.upstream_lost()

    def pause_writing(self) -> None:
        self.tunnel.client.pause_reading()

    def resume_writing(self) -> None:
        self.tunnel.client.resume_reading()


class TcpTunnel:
    """Pipes ``client`` (an accepted transport whose protocol forwards its events here) to
    ``host:port``. ``first`` is what the client sent before the tunnel existed."""

    def __init__(
        self,
        client: asyncio.Transport,
        first: bytes,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.client = client
        self._held: list[bytes] = [first] if first else []
        self._held_eof = False
        self._up: asyncio.Transport | None = None
        self._task: asyncio.Task[None] | None = None
        self._on_close = on_close
        self.closed = False
        self.target = ""

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
        if self._held_eof and up.can_write_eof():
            up.write_eof()
        self.client.resume_reading()

    # ------------------------------------------------------------------ client events

    def client_data(self, data: bytes) -> None:
        up = self._up
        if up is not None:
            up.write(data)
        elif not self.closed:
            self._held.append(data)  # at most what arrived before pause_reading took effect

    def client_eof(self) -> bool:
        """The client half-closed; True keeps the client transport open for the answer."""
        up = self._up
        if up is None:
            self._held_eof = True
            return True
        if up.can_write_eof() and not up.is_closing():
            up.write_eof()
            return True
        return False

    def client_paused_writing(self) -> None:
        if self._up is not None:
            self._up.pause_reading()

    def client_resumed_writing(self) -> None:
        if self._up is not None:
            self._up.resume_reading()

    # ------------------------------------------------------------------ endings

    def upstream_lost(self) -> None:
        self._up = None
        self.close()

    def close(self) -> None:
        """End the tunnel: cancel a connect in progress, close both sides (idempotent)."""
        if self.closed:
            return
        self.closed = True
        if self._task is not None:
            self._task.cancel()
            self._task = None
        up, self._up = self._up, None
        if up is not None:
            up.close()
        if not self.client.is_closing():
            self.client.close()
        if self._on_close is not None:
            self._on_close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("open" if self._up is not None else "connecting")
        return f"TcpTunnel({self.target}, {state})"
