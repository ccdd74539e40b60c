"""TLS between a plain event-loop transport and a protocol, with the fewest calls per record.

Theory of operation
-------------------
asyncio's and uvloop's TLS transports are general: every record goes through an application
transport wrapper, write queues, flow-control bookkeeping and a 256 KiB read buffer, which on
small HTTP exchanges costs several times what the encryption does: each read asks the TLS object
for 256 KiB, an allocation that alone costs about 16 us per record (measured between two
sidecars: about 28 us of CPU per kept-alive request on each side, against about 3 us for the
``ssl`` calls themselves). :class:`TlsLayer` keeps the event loop's fast plain TCP transport
and runs one ``ssl`` object over two memory BIOs itself:

* it is the plain transport's **protocol**: ``data_received`` writes the ciphertext into the
  incoming BIO and reads decrypted bytes out -- one ``read`` per record in the common case (a
  second only while the BIO or the TLS object still holds bytes) -- and hands them to the
  inner protocol's ``data_received``;
* it is the inner protocol's **transport**: ``write`` encrypts into the outgoing BIO and writes
  the ciphertext to the plain transport in the same call; reading pauses, write-buffer limits
  and sizes, ``get_extra_info`` (plus ``ssl_object``) and flow-control callbacks
  (``pause_writing`` / ``resume_writing``) pass straight through.

The handshake is driven the same way (``do_handshake`` on each arrival of bytes). When it
completes, :attr:`handshake` (a future) is resolved and the inner protocol gets
``connection_made(self)``; a failure resolves it with the exception and aborts the plain
transport. The client side offers a saved session (``session=`` on ``wrap_bio``: TLS 1.3
resumption between sidecars). Closing sends ``close_notify`` when it can; a received
``close_notify`` is an end of stream (``eof_received``) for the inner protocol, exactly like a
plain FIN. The private ``SSLObject._sslobj`` (the C object) is called directly on the data
path, which saves a Python frame per call; everything else uses the public API.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

# Decrypted bytes asked for per read: one record carries at most 16 KiB, and ``read(n)``
# allocates n bytes first -- asking for 256 KiB (as asyncio's / uvloop's TLS transports do)
# makes each read an mmap-sized allocation, about 16 us per record measured here.
READ_SIZE = 16 * 1024

_WantRead = ssl.SSLWantReadError
_ZeroReturn = ssl.SSLZeroReturnError


def _retrieve(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()


class TlsLayer(asyncio.Protocol):
    """TLS for ``inner`` over a plain transport (see the module docstring)."""

    __slots__ = (
        "_c",
        "_closing",
        "_eof",
        "_error",
        "_in",
        "_lost",
        "_obj",
        "_out",
        "_raw",
        "_started",
        "_write_paused",
        "_wrote_eof",
        "handshake",
        "inner",
    )

    def __init__(
        self,
        context: ssl.SSLContext,
        inner: asyncio.Protocol,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        session: ssl.SSLSession | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.inner = inner
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = context.wrap_bio(
            self._in,
            self._out,
            server_side=server_side,
            server_hostname=server_hostname,
            session=session,
        )
        self._c: Any = getattr(self._obj, "_sslobj", self._obj)  # the C object when present
        self._raw: asyncio.Transport | None = None
        self._started = False  # handshake done, inner protocol connected
        self._closing = False
        self._wrote_eof = False
        self._write_paused = False
        self._eof = False
        self._lost = False
        self._error: Exception | None = None  # a TLS error that ended the connection
        loop = loop or asyncio.get_running_loop()
        self.handshake: asyncio.Future[None] = loop.create_future()
        # nobody may be waiting when a connect is abandoned: never "exception never retrieved"
        self.handshake.add_done_callback(_retrieve)

    # ------------------------------------------------------------------ plain side (protocol)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._raw = transport  # type: ignore[assignment]
        if self._closing:  # aborted before the transport existed
            transport.abort()  # type: ignore[attr-defined]
            return
        self._step_handshake()  # the client speaks first; a server just waits

    def data_received(self, data: bytes) -> None:
        if self._closing:  # closed or aborted by the inner protocol: nothing more for it
            return
        self._in.write(data)
        if not self._started:
            self._step_handshake()
            if not self._started or self._closing or not self._in.pending:
                return
        c = self._c
        inner = self.inner
        while True:
            try:
                chunk = c.read(READ_SIZE)
            except _WantRead:
                break
            except _ZeroReturn:  # close_notify: the peer's end of stream
                self._peer_closed()
                return
            except ssl.SSLError as e:
                self._fail(e)
                return
            if not chunk:
                self._peer_closed()
                return
            inner.data_received(chunk)
            if self._closing or self._lost or (not self._in.pending and not c.pending()):
                break
        out = self._out
        if out.pending and self._raw is not None:  # key updates, session tickets
            self._raw.write(out.read())

    def eof_received(self) -> bool | None:
        if not self._started:
            return False
        if self._eof:  # close_notify came first: the inner protocol was told already
            return True
        self._eof = True
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if not self.handshake.done():
            self.handshake.set_exception(
                exc or ConnectionResetError("connection closed during the TLS handshake")
            )
            return
        if self._started:
            self.inner.connection_lost(exc or self._error)

    def pause_writing(self) -> None:
        self._write_paused = True
        if self._started:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._started:
            self.inner.resume_writing()

    # ------------------------------------------------------------------ handshake

    def _step_handshake(self) -> None:
        raw = self._raw
        if raw is None or self.handshake.done():
            return
        try:
            self._obj.do_handshake()
        except _WantRead:
            if self._out.pending:
                raw.write(self._out.read())
            return
        except (ssl.SSLError, OSError, ValueError) as e:
            self.handshake.set_exception(e)
            if self._out.pending:  # the alert, so the peer knows why: sent before a FIN
                raw.write(self._out.read())
                raw.close()
            else:
                raw.abort()
            return
        if self._out.pending:
            raw.write(self._out.read())
        self._started = True
        self.handshake.set_result(None)
        self.inner.connection_made(self)
        if self._write_paused:  # the plain transport filled up during the handshake
            self.inner.pause_writing()

    def _peer_closed(self) -> None:
        if self._eof:
            return
        self._eof = True
        keep = self.inner.eof_received()
        if not keep and self._raw is not None:
            self.close()

    def _fail(self, exc: Exception) -> None:
        """A TLS error (a bad record, the peer's alert): the inner protocol's
        ``connection_lost`` gets it as the reason."""
        self._error = exc
        self._closing = True
        if self._raw is not None:
            self._raw.abort()

    # ------------------------------------------------------------------ TLS side (transport)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        raw = self._raw
        if raw is None or self._closing or self._wrote_eof or self._lost:
            return
        try:
            self._c.write(data)
        except ssl.SSLError as e:
            self._fail(e)
            return
        raw.write(self._out.read())

    def writelines(self, lines: Any) -> None:
        self.write(b"".join(lines))

    def close(self) -> None:
        raw = self._raw
        if raw is None or self._closing:
            return
        self._closing = True
        if self._started and not self._lost and not self._wrote_eof:
            try:
                self._obj.unwrap()  # queues close_notify; the peer's is not waited for
            except (ssl.SSLError, ValueError):
                pass
            if self._out.pending:
                raw.write(self._out.read())
        raw.close()

    def abort(self) -> None:
        self._closing = True
        if self._raw is not None:
            self._raw.abort()

    def is_closing(self) -> bool:
        return self._closing or self._raw is None or self._raw.is_closing()

    def pause_reading(self) -> None:
        if self._raw is not None:
            self._raw.pause_reading()

    def resume_reading(self) -> None:
        if self._raw is not None:
            self._raw.resume_reading()

    def is_reading(self) -> bool:
        return self._raw is not None and self._raw.is_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._raw is not None:
            self._raw.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return 0 if self._raw is None else self._raw.get_write_buffer_size()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        """close_notify, then a FIN; reading goes on (the inner protocol may linger)."""
        raw = self._raw
        if raw is None or self._closing or self._wrote_eof or self._lost or not self._started:
            return
        try:
            self._obj.unwrap()
        except (ssl.SSLError, ValueError):
            pass
        if self._out.pending:
            raw.write(self._out.read())
        self._wrote_eof = True  # no more writes; reads still go to the inner protocol
        if raw.can_write_eof():
            raw.write_eof()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._obj
        if name == "peercert":
            return self._obj.getpeercert()
        if name == "cipher":
            return self._obj.cipher()
        if self._raw is None:
            return default
        return self._raw.get_extra_info(name, default)

    @property
    def ssl_object(self) -> ssl.SSLObject:
        return self._obj

    def __repr__(self) -> str:
        state = "open" if self._started else "handshaking"
        return f"TlsLayer({state}, inner={type(self.inner).__name__})"
