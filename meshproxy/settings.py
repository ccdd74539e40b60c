"""Every deadline and limit of the data plane, named once, with its default.

Theory of operation: components receive a :class:`Settings` (frozen) from the composition root
(``meshproxy.app``) instead of reading constants of their own, so a test can shrink any
deadline and a reader can see every wait the proxy has in one place ("every wait has a
deadline").
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Settings:
    # downstream (client side)
    max_head_bytes: int = 60 * 1024  # request head larger than this: 431 (Envoy's default)
    max_headers: int = 100  # more header fields than this: 431 (Envoy's default)
    head_read_timeout: float = 10.0  # from first byte of a request to the end of its head
    downstream_idle_timeout: float = 60.0  # idle keep-alive client connection is closed
    # upstream (server side)
    upstream_idle_timeout: float = 60.0  # idle pooled upstream connection is closed
    max_idle_per_endpoint: int = 256  # idle connections kept per endpoint
    retry_buffer_bytes: int = 1024 * 1024  # request bodies up to this are replayable
    # lifecycle
    drain_seconds: float = 5.0
    reload_debounce: float = 0.1  # quiet time after a config file change before reloading
    # write-side flow control (bytes buffered in a transport before we pause the other side)
    high_water: int = 256 * 1024
    low_water: int = 64 * 1024


DEFAULT_SETTINGS = Settings()
