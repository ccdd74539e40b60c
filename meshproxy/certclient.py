"""The proxy's certificate client: its workload identity, signed by the control plane.

Theory of operation
-------------------
A proxy started with ``--control-plane URL`` and no ``--cert-dir`` has no files to read: it
holds a bootstrap token (``meshproxy ca token``) instead. :class:`CertificateClient` turns it
into a live :class:`~meshproxy.tls.WorkloadIdentity`, one cycle at a time:

1. generate a fresh P-256 key and a CSR whose only SAN is the SPIFFE id the token names (read
   with :func:`certs.token.token_identity`, without checking the MAC: only the CA can) -- in a
   thread, since key generation and signing block;
2. ``POST {URL}/v1/certificates`` ``{"csr", "token"}`` under :data:`REQUEST_TIMEOUT`, over TLS
   verified with the context of :func:`control_plane_context` when the URL is ``https``;
3. check the answer exactly as a ``--cert-dir`` is checked (:func:`meshproxy.tls.
   identity_from_pem`: key matches, the SPIFFE id is the one asked for, valid now, chains to
   the returned root) and :meth:`~meshproxy.tls.IdentityStore.publish` it: the data plane reads
   ``IdentityStore.current`` and its subscribers see ``(old, new)`` as for a file reload;
4. when a context verifies the control plane (``https``), load the new certificate into it
   as its client certificate: the next renewal proves the identity it renews even after the
   bootstrap token expired (see :mod:`control.signing`), and any other client of the control
   plane sharing that context presents it too;
5. sleep until half the certificate's lifetime (:func:`certs.ca.renewal_time`, counted from
   when it arrived) and start again with a new key.

A failed cycle (control plane down, refused, a bad answer) is counted, kept in ``last_error``,
logged once per distinct message, and retried after :func:`backoff_delay` (jittered exponential,
1 s base, 30 s cap); the current identity stays live meanwhile -- it is only ever replaced by
a better one. :meth:`run` never raises except ``CancelledError``: a bug in one cycle is logged
with its traceback and retried like any failure, so the proxy never crashes for it.
:meth:`first` lets the composition root wait for the initial certificate.

``now`` (a clock) and ``rand`` are injectable; the two pure decisions (:func:`backoff_delay`
and when to renew) are tested without a loop or a socket.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from cryptography.hazmat.primitives import serialization

from certs.ca import generate_key, make_csr, read_file, renewal_time
from certs.spiffe import CAError, SpiffeId
from certs.token import token_identity
from control.protocol import CERTIFICATES_PATH
from meshproxy.tls import (
    IdentityError,
    IdentityStore,
    WorkloadIdentity,
    identity_from_pem,
    load_chain,
)

log = logging.getLogger(__name__)

BACKOFF_BASE = 1.0  # seconds: the first retry waits about this long
BACKOFF_CAP = 30.0  # seconds: no retry waits longer
REQUEST_TIMEOUT = 10.0  # seconds: one signing request, connect to answer
MAX_ANSWER_BYTES = 256 * 1024  # a chain and a root are a few KiB

Clock = Callable[[], datetime]


class CertClientError(Exception):
    """A user mistake in the certificate client's settings (bad URL, token or CA file): a
    one-line message for exit code 2."""


class _CycleError(Exception):
    """One signing cycle failed; the message says why (for ``last_error`` and the log)."""


def _utcnow() -> datetime:
    return datetime.now(UTC)


def backoff_delay(
    failures: int,
    rand: float,
    base: float = BACKOFF_BASE,
    cap: float = BACKOFF_CAP,
) -> float:
    """The wait before retry number ``failures`` (1 for the first): ``base * 2**(failures-1)``
    capped at ``cap``, jittered into its upper half by ``rand`` in [0, 1) so a thousand proxies
    that lost the control plane together do not return together."""
    step = min(cap, base * 2 ** max(0, min(failures - 1, 30)))
    return step / 2 + rand * step / 2


def certificates_url(control_plane: str) -> str:
    """``{control_plane}/v1/certificates`` for a ``--control-plane`` URL as the config stream
    reads it (:func:`meshproxy.sources.stream.parse_control_url`); raises
    :class:`CertClientError` for one it refuses."""
    from meshproxy.sources.stream import parse_control_url

    try:
        return parse_control_url(control_plane).base + CERTIFICATES_PATH
    except ValueError as e:
        raise CertClientError(f"--control-plane {control_plane!r}: {e}") from None


def control_plane_context(ca_file: str | Path) -> ssl.SSLContext:
    """A client context that verifies the control plane: its chain against the roots in
    ``ca_file`` (``--control-plane-ca``, the mesh root) and its hostname against the URL's
    host. Blocking (reads the file); raises :class:`CertClientError` naming the file."""
    path = Path(ca_file)
    try:
        data = read_file(path, CertClientError)
    except CertClientError as e:
        raise CertClientError(f"--control-plane-ca {e}") from None
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise CertClientError(f"--control-plane-ca {path}: no PEM certificate in it")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_verify_locations(cadata=data.decode("ascii", "replace"))
    except (ssl.SSLError, ValueError) as e:
        raise CertClientError(f"--control-plane-ca {path}: not usable certificates: {e}") from None
    return ctx


@dataclass(frozen=True, slots=True)
class _Answer:
    cert_pem: bytes
    ca_pem: bytes


class CertificateClient:
    """Obtains and renews this proxy's certificate from the control plane (see the module
    docstring). Construct, then run :meth:`run` as one task; ``store.current`` is the live
    identity once :meth:`first` returns."""

    def __init__(
        self,
        control_plane: str,
        token: str,
        ssl_context: ssl.SSLContext | None,
        store: IdentityStore,
        *,
        clock: Clock = _utcnow,
        rand: Callable[[], float] = random.random,
        backoff_base: float = BACKOFF_BASE,
        backoff_cap: float = BACKOFF_CAP,
        request_timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        """Raises :class:`CertClientError` for a URL or token that cannot work (exit 2)."""
        self.url = certificates_url(control_plane)
        token = token.strip()
        try:
            self.spiffe_id: SpiffeId = token_identity(token)
        except CAError as e:
            raise CertClientError(f"bootstrap token: {e}") from None
        self._token = token
        self.ssl_context = ssl_context
        self.store = store
        self._clock = clock
        self._rand = rand
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.request_timeout = request_timeout
        self.renewals_ok = 0
        self.renewals_failed = 0
        self.last_error: str | None = None
        self.next_renewal: datetime | None = None
        self._logged: str | None = None
        self._first = asyncio.Event()

    # ----------------------------------------------------------------- for the proxy

    async def first(self) -> WorkloadIdentity:
        """Wait until the first certificate is live (bound it with ``asyncio.wait_for``)."""
        await self._first.wait()
        ident = self.store.current
        assert ident is not None  # set only after a publish
        return ident

    @property
    def ready(self) -> bool:
        return self._first.is_set()

    def view(self) -> dict[str, Any]:
        """For ``/config_dump``: who we ask to be, where, and how renewal goes."""
        ident = self.store.current
        return {
            "control_plane": self.url,
            "spiffe_id": self.spiffe_id.uri,
            "renewals_ok": self.renewals_ok,
            "renewals_failed": self.renewals_failed,
            "last_error": self.last_error,
            "next_renewal": self.next_renewal.isoformat() if self.next_renewal else None,
            "serial": format(ident.serial, "x") if ident is not None else None,
            "not_after": ident.not_after.isoformat() if ident is not None else None,
        }

    async def run(self) -> None:
        """Obtain, publish, renew at half life, forever (cancel to stop). Never raises
        anything but ``CancelledError``."""
        failures = 0
        # a new connection per request: requests are hours apart, and a renewal must present
        # the client certificate loaded since the previous one
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            while True:
                try:
                    ident, received, pems = await self._cycle(session)
                    if self.ssl_context is not None:
                        await asyncio.to_thread(load_chain, self.ssl_context, *pems)
                except asyncio.CancelledError:
                    raise
                except _CycleError as e:
                    failures += 1
                    self._failed(str(e), None)
                except Exception as e:  # a bug of ours: logged, and the cycle retried
                    failures += 1
                    self._failed(f"internal error: {type(e).__name__}: {e}", e)
                else:
                    failures = 0
                    self._published(ident, received)
                if failures:
                    delay = backoff_delay(
                        failures, self._rand(), self.backoff_base, self.backoff_cap
                    )
                else:
                    assert self.next_renewal is not None
                    delay = (self.next_renewal - self._clock()).total_seconds()
                await asyncio.sleep(max(0.0, delay))

    # ----------------------------------------------------------------- one cycle

    async def _cycle(
        self, session: aiohttp.ClientSession
    ) -> tuple[WorkloadIdentity, datetime, tuple[bytes, bytes]]:
        """One key, one CSR, one request, one checked identity (not yet published)."""
        key_pem, csr_pem = await asyncio.to_thread(self._key_and_csr)
        answer = await self._post(session, csr_pem)
        received = self._clock()
        try:
            ident = await asyncio.to_thread(
                identity_from_pem,
                answer.cert_pem,
                key_pem,
                answer.ca_pem,
                source=f"certificate from {self.url}",
                expect_spiffe_id=self.spiffe_id.uri,
                now=received,
            )
        except IdentityError as e:
            raise _CycleError(str(e)) from None
        return ident, received, (answer.cert_pem, key_pem)

    def _key_and_csr(self) -> tuple[bytes, bytes]:
        key = generate_key()
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return key_pem, make_csr(key, self.spiffe_id.uri)

    async def _post(self, session: aiohttp.ClientSession, csr_pem: bytes) -> _Answer:
        body = {"csr": csr_pem.decode("ascii"), "token": self._token}
        timeout = aiohttp.ClientTimeout(total=self.request_timeout)
        ssl_arg: ssl.SSLContext | bool = self.ssl_context if self.ssl_context is not None else True
        try:
            async with session.post(self.url, json=body, ssl=ssl_arg, timeout=timeout) as resp:
                data = await resp.content.read(MAX_ANSWER_BYTES + 1)
                status = resp.status
        except TimeoutError:
            raise _CycleError(f"{self.url}: no answer within {self.request_timeout:g} s") from None
        except aiohttp.ClientConnectorCertificateError as e:
            raise _CycleError(
                f"{self.url}: the control plane's certificate is not trusted: {e.certificate_error}"
            ) from None
        except aiohttp.ClientSSLError as e:
            raise _CycleError(f"{self.url}: TLS failed: {e}") from None
        except (aiohttp.ClientError, OSError) as e:
            raise _CycleError(f"{self.url}: {type(e).__name__}: {e}") from None
        if len(data) > MAX_ANSWER_BYTES:
            raise _CycleError(f"{self.url}: answer larger than {MAX_ANSWER_BYTES} bytes")
        if status != 200:
            raise _CycleError(f"{self.url}: refused ({status}): {_error_text(data)}")
        try:
            doc = json.loads(data)
            cert, ca = doc["cert"], doc["ca"]
            if not isinstance(cert, str) or not isinstance(ca, str):
                raise TypeError
            return _Answer(cert.encode("ascii"), ca.encode("ascii"))
        except (ValueError, KeyError, TypeError, UnicodeEncodeError):
            raise _CycleError(f'{self.url}: the answer is not {{"cert": PEM, "ca": PEM}}') from None

    # ----------------------------------------------------------------- outcomes

    def _published(self, ident: WorkloadIdentity, received: datetime) -> None:
        old = self.store.current
        self.store.publish(ident)
        self.renewals_ok += 1
        self.last_error = None
        self._logged = None
        self.next_renewal = renewal_time(received, ident.not_after)
        log.info(
            "workload certificate %s: %s serial %x, valid until %s, renewal at %s%s",
            "obtained" if old is None else "renewed",
            ident.spiffe_id,
            ident.serial,
            ident.not_after.isoformat(),
            self.next_renewal.isoformat(),
            "" if old is None else f" (was serial {old.serial:x})",
        )
        self._first.set()

    def _failed(self, msg: str, bug: BaseException | None) -> None:
        self.renewals_failed += 1
        self.last_error = msg
        current = self.store.current
        if current is not None and self._clock() >= current.not_after:
            msg = f"{msg}; the live certificate expired at {current.not_after.isoformat()}"
            self.last_error = msg
        if msg == self._logged:
            return
        self._logged = msg
        keeping = "keeping the current one" if current is not None else "none yet"
        if bug is not None:
            log.error("workload certificate not obtained (%s): %s", keeping, msg, exc_info=bug)
        else:
            log.error("workload certificate not obtained (%s): %s", keeping, msg)

    def __repr__(self) -> str:
        return (
            f"CertificateClient({self.url!r}, id={self.spiffe_id.uri!r}, "
            f"ok={self.renewals_ok}, failed={self.renewals_failed}, "
            f"next={self.next_renewal.isoformat() if self.next_renewal else None})"
        )


def _error_text(data: bytes) -> str:
    """The ``error`` of a JSON error answer, else the start of the body."""
    try:
        doc = json.loads(data)
        if isinstance(doc, dict) and isinstance(doc.get("error"), str):
            return doc["error"][:300]
    except ValueError:
        pass
    return data[:200].decode("utf-8", "replace") or "(empty body)"
