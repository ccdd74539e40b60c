"""The control plane's certificate authority endpoint and its own TLS certificate.

Theory of operation
-------------------
``POST /v1/certificates`` takes ``{"csr": PEM, "token": TOKEN}``. :class:`Signer` answers it in
three steps, each with one outcome:

1. the edge (:meth:`Signer.handle`, on the loop): a body over :data:`MAX_BODY_BYTES` is ``413``
   (read no further than the cap, whatever ``Content-Length`` says), a body that is not a JSON
   object with string ``csr`` and ``token`` is ``400``; more than :data:`MAX_INFLIGHT` requests
   being signed at once is ``503`` with ``Retry-After`` (nothing queues without bound);
2. the decision (:func:`decide`, pure apart from CPU: no I/O, ``now`` an argument, run in a
   thread with ``asyncio.to_thread`` because verifying and signing cost milliseconds): the token
   is verified with the CA's ``token.key`` (MAC first, then expiry and trust domain), then
   :func:`certs.ca.sign_csr` signs the CSR only if its one and only SAN is exactly the SPIFFE id
   the token entitles. Any refusal -- bad, forged, expired or foreign token, a CSR for another
   identity, an unparsable CSR, a weak key -- is :class:`Refused`: ``403 {"error": ...}``,
   nothing is signed, and a WARNING names the identity the token claims (verified or not) and
   what the CSR asked for, never the token itself;
3. the answer: ``200 {"cert": leaf + intermediate PEM, "ca": root PEM}``.

A bootstrap token expires (24 h by default) while a proxy must renew forever, so over TLS a
second credential counts: the serving context asks for an *optional* client certificate,
verified against the mesh root when one is sent, and a request whose token is refused is still
entitled to the SPIFFE id of that verified certificate -- a workload can renew the identity it
already proves, never obtain another (Istio's CA accepts a workload's current certificate the
same way).

A certificate never outlives the CA: the TTL is clamped to the signer's remaining lifetime, and
an expired (or not yet valid) CA is :class:`Unavailable` (``503``), a server problem rather
than the caller's. The counters (``signed``, ``refused``, ``bad_requests``, ``unavailable``)
are plain attributes for the control plane's metrics.

:class:`ServingCert` is the control plane's own server certificate, issued by the same mesh CA
for ``spiffe://<td>/ns/istio-system/sa/meshproxy-control`` plus a DNS or IP SAN per host, so a
proxy verifies it with the mesh root and a hostname check. Its ``context`` is one
``ssl.SSLContext`` for the server's whole life; :meth:`ServingCert.run` reissues the
certificate at half its lifetime and reloads it into that same context (new handshakes present
the new certificate, open connections are untouched), so a long-running control plane never
serves an expired certificate. :func:`serving_context` is the one-shot form, with a
certificate lasting as long as the CA allows (at most :data:`MAX_STATIC_SERVING_TTL`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography import x509

from certs.ca import (
    CA,
    DEFAULT_WORKLOAD_TTL,
    issue_server,
    load_ca,
    remaining_lifetime,
    renewal_time,
    sign_csr,
)
from certs.spiffe import CAError, format_duration, make_spiffe_id, parse_spiffe_id
from certs.token import TokenError, decode_token, load_token_key, unverified_claims
from meshproxy.tls import load_chain, make_plain_server_context, peer_spiffe_id

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024  # a CSR is ~500 bytes, a token ~200: anything near this is abuse
MAX_INFLIGHT = 64  # requests being signed at once; more get 503 + Retry-After
RETRY_AFTER_SECONDS = 1
CONTROL_NAMESPACE = "istio-system"
CONTROL_SERVICE_ACCOUNT = "meshproxy-control"
DEFAULT_SERVING_HOSTS = ("localhost", "127.0.0.1", "::1")
DEFAULT_SERVING_TTL = timedelta(hours=24)
MAX_STATIC_SERVING_TTL = timedelta(days=365)
SERVING_RETRY_MIN = 1.0  # seconds before retrying a failed serving-cert renewal, doubling
SERVING_RETRY_MAX = 60.0
_SHOWN_MAX = 200  # characters of a CSR's names shown in a log line

Clock = Callable[[], datetime]


def _utcnow() -> datetime:
    return datetime.now(UTC)


# --------------------------------------------------------------------------- the decision


class Refused(Exception):
    """The request is not entitled to a certificate (403). ``claimed`` is the identity the
    token names (unverified when the token itself was refused), ``asked`` what the CSR asks
    for; both for the log line."""

    def __init__(self, reason: str, *, claimed: str, asked: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.claimed = claimed
        self.asked = asked


class Unavailable(Exception):
    """The CA cannot sign anything right now (503): it expired or is not valid yet."""


@dataclass(frozen=True, slots=True)
class Signed:
    """A signed certificate: the answer's ``cert`` and ``ca``, plus what the log names."""

    spiffe_id: str
    cert_pem: bytes  # leaf + intermediate (if any)
    ca_pem: bytes  # the root
    serial: int
    not_after: datetime


def _claimed(token: str) -> str:
    """What a token says it entitles, without trusting it (for log lines)."""
    try:
        return f"{unverified_claims(token).spiffe_id.uri} (unverified)"
    except (TokenError, CAError):
        return "an unreadable token"


def _asked(csr_pem: str) -> str:
    """The names a CSR asks for (for log lines; never raises)."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode("utf-8", "replace"))
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(getattr(n, "value", n)) for n in san]
    except x509.ExtensionNotFound:
        return "no SAN"
    except Exception:  # any parse failure of untrusted input is just "unparsable"
        return "an unparsable CSR"
    shown = ", ".join(names) or "no name"
    return shown if len(shown) <= _SHOWN_MAX else shown[: _SHOWN_MAX - 3] + "..."


def decide(
    ca: CA,
    token_key: bytes,
    csr_pem: str,
    token: str,
    ttl: timedelta,
    now: datetime,
    peer_id: str | None = None,
) -> Signed:
    """Sign ``csr_pem`` for the SPIFFE id ``token`` entitles, or raise :class:`Refused`
    (nothing signed) or :class:`Unavailable`. ``peer_id`` is the SPIFFE id of a client
    certificate the TLS layer verified against this mesh's root, if any: a workload renewing
    with its current certificate is entitled to that same id even once its bootstrap token
    expired. No I/O; blocking CPU work (call off the loop)."""
    try:
        claims = decode_token(token_key, token, trust_domain=ca.trust_domain, now=now.timestamp())
        entitled = make_spiffe_id(claims.trust_domain, claims.namespace, claims.service_account)
    except CAError as e:  # TokenError, or names a SPIFFE id cannot carry
        reason = f"token refused: {e}"
        try:
            if peer_id is None:
                raise CAError(reason)
            entitled = parse_spiffe_id(peer_id, ca.trust_domain)
        except CAError:
            raise Refused(reason, claimed=_claimed(token), asked=_asked(csr_pem)) from None
    remaining = remaining_lifetime(ca, now)
    if remaining <= timedelta(0):
        raise Unavailable(
            f"the mesh CA certificate expired at {ca.signer.not_valid_after_utc.isoformat()}"
        )
    if now < ca.signer.not_valid_before_utc:
        raise Unavailable(
            "the mesh CA certificate is not valid before "
            f"{ca.signer.not_valid_before_utc.isoformat()} (clock skew?)"
        )
    try:
        chain = sign_csr(ca, csr_pem, entitled.uri, min(ttl, remaining), now=now)
    except CAError as e:
        raise Refused(str(e), claimed=entitled.uri, asked=_asked(csr_pem)) from None
    leaf = x509.load_pem_x509_certificate(chain)
    return Signed(
        spiffe_id=entitled.uri,
        cert_pem=chain,
        ca_pem=ca.root_pem,
        serial=leaf.serial_number,
        not_after=leaf.not_valid_after_utc,
    )


# --------------------------------------------------------------------------- the endpoint


class BadRequest(Exception):
    """A request that is not ``{"csr": str, "token": str}`` (400)."""


def parse_request(body: bytes) -> tuple[str, str]:
    """``(csr, token)`` from a request body, or :class:`BadRequest` naming what is wrong."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the body is not JSON") from None
    if not isinstance(doc, dict):
        raise BadRequest('the body must be a JSON object {"csr": PEM, "token": TOKEN}')
    out: list[str] = []
    for field in ("csr", "token"):
        value = doc.get(field)
        if value is None:
            raise BadRequest(f"missing field {field!r}")
        if not isinstance(value, str) or not value:
            raise BadRequest(f"field {field!r} must be a non-empty string")
        out.append(value)
    return out[0], out[1]


def _error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers or None)


class Signer:
    """``POST /v1/certificates`` for one CA directory. Route it with
    ``app.router.add_post(CERTIFICATES_PATH, signer.handle)``."""

    def __init__(
        self,
        ca: CA,
        token_key: bytes,
        ttl: timedelta = DEFAULT_WORKLOAD_TTL,
        *,
        clock: Clock = _utcnow,
        max_inflight: int = MAX_INFLIGHT,
    ) -> None:
        if ttl <= timedelta(0):
            raise CAError(f"certificate TTL {format_duration(ttl)} must be greater than zero")
        self.ca = ca
        self.ttl = ttl
        self._token_key = token_key
        self._clock = clock
        self.max_inflight = max_inflight
        self.inflight = 0
        self.signed = 0
        self.refused = 0
        self.bad_requests = 0
        self.unavailable = 0
        self.last_refusal: str | None = None

    @classmethod
    def load(cls, ca_dir: str | Path, ttl: timedelta = DEFAULT_WORKLOAD_TTL) -> Signer:
        """Read ``ca_dir`` (the CA and its ``token.key``); blocking, for start-up. Raises
        :class:`CAError` with a one-line message naming the directory or file (exit 2)."""
        ca = load_ca(ca_dir)
        key = load_token_key(ca.directory)
        remaining = remaining_lifetime(ca)
        if remaining <= timedelta(0):
            raise CAError(
                f"{ca.directory}: the CA certificate expired at "
                f"{ca.signer.not_valid_after_utc.isoformat()}"
            )
        return cls(ca, key, ttl)

    def stats(self) -> dict[str, Any]:
        """The counters, for metrics and ``/status``."""
        return {
            "signed": self.signed,
            "refused": self.refused,
            "bad_requests": self.bad_requests,
            "unavailable": self.unavailable,
            "inflight": self.inflight,
        }

    async def handle(self, request: web.Request) -> web.Response:
        """aiohttp handler of ``POST /v1/certificates`` (see the module docstring)."""
        peer = request.remote or "?"
        body = await _read_capped(request, MAX_BODY_BYTES)
        if body is None:
            self.bad_requests += 1
            return _error(413, f"request body larger than {MAX_BODY_BYTES} bytes")
        try:
            csr, token = parse_request(body)
        except BadRequest as e:
            self.bad_requests += 1
            return _error(400, str(e))
        if self.inflight >= self.max_inflight:
            self.unavailable += 1
            return _error(503, "busy signing", **{"Retry-After": str(RETRY_AFTER_SECONDS)})
        self.inflight += 1
        try:
            signed = await asyncio.to_thread(
                decide,
                self.ca,
                self._token_key,
                csr,
                token,
                self.ttl,
                self._clock(),
                _verified_peer(request),
            )
        except Refused as e:
            self.refused += 1
            self.last_refusal = e.reason
            log.warning(
                "certificate refused to %s: token for %s asked for %s: %s",
                peer,
                e.claimed,
                e.asked,
                e.reason,
            )
            return _error(403, e.reason)
        except Unavailable as e:
            self.unavailable += 1
            log.error("certificate not signed for %s: %s", peer, e)
            return _error(503, str(e))
        finally:
            self.inflight -= 1
        self.signed += 1
        log.info(
            "certificate signed for %s (%s): serial %x, valid until %s",
            signed.spiffe_id,
            peer,
            signed.serial,
            signed.not_after.isoformat(),
        )
        return web.json_response(
            {"cert": signed.cert_pem.decode("ascii"), "ca": signed.ca_pem.decode("ascii")}
        )

    def __repr__(self) -> str:
        return (
            f"Signer(td={self.ca.trust_domain!r}, ttl={format_duration(self.ttl)}, "
            f"signed={self.signed}, refused={self.refused}, bad={self.bad_requests})"
        )


def _verified_peer(request: web.Request) -> str | None:
    """The SPIFFE id of the client certificate of ``request``'s TLS connection, if it sent
    one (the serving context verifies any certificate presented against the mesh root)."""
    transport = request.transport
    if transport is None:
        return None
    return peer_spiffe_id(transport.get_extra_info("ssl_object"))


async def _read_capped(request: web.Request, cap: int) -> bytes | None:
    """The request body, or None when it is longer than ``cap`` (nothing past ``cap`` + 1
    bytes is read)."""
    if request.content_length is not None and request.content_length > cap:
        return None
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await request.content.read(cap + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if size > cap:
            return None
    return b"".join(chunks)


# --------------------------------------------------------------------------- serving TLS


def control_plane_spiffe_id(ca: CA) -> str:
    """``spiffe://<td>/ns/istio-system/sa/meshproxy-control``: the control plane's identity."""
    return make_spiffe_id(ca.trust_domain, CONTROL_NAMESPACE, CONTROL_SERVICE_ACCOUNT).uri


def serving_hosts(*hosts: str) -> list[str]:
    """``hosts`` (e.g. the listen host) then the loopback names, without duplicates."""
    out: list[str] = []
    for h in (*hosts, *DEFAULT_SERVING_HOSTS):
        if h and h not in out:
            out.append(h)
    return out


class ServingCert:
    """The control plane's server certificate in one long-lived ``context``, reissued at half
    its lifetime by :meth:`run`. Building one issues the first certificate (blocking; raises
    :class:`CAError`, e.g. for a host that is no DNS name or an expired CA)."""

    def __init__(
        self,
        ca: CA,
        hosts: list[str] | tuple[str, ...],
        ttl: timedelta = DEFAULT_SERVING_TTL,
        *,
        clock: Clock = _utcnow,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.ca = ca
        self.hosts = tuple(hosts)
        self.ttl = ttl
        self.spiffe_id = control_plane_spiffe_id(ca)
        self._clock = clock
        self._rand = rand
        self.renewals = 0
        self.renewals_failed = 0
        self.last_error: str | None = None
        now = clock()
        issued = issue_server(ca, self.spiffe_id, self.hosts, self._ttl_at(now), now=now)
        try:
            self.context = make_plain_server_context(issued.cert_pem, issued.key_pem)
            # a client certificate is optional, and verified against the mesh root when sent:
            # a proxy renewing proves its identity with the certificate it holds
            self.context.load_verify_locations(cadata=ca.root_pem.decode("ascii"))
            self.context.verify_mode = ssl.CERT_OPTIONAL
        except ssl.SSLError as e:
            raise CAError(f"the TLS library refused the serving certificate: {e}") from None
        self._note(issued.cert_pem, now)

    def _ttl_at(self, now: datetime) -> timedelta:
        remaining = remaining_lifetime(self.ca, now)
        if remaining <= timedelta(0):
            raise CAError(
                f"{self.ca.directory}: the CA certificate expired at "
                f"{self.ca.signer.not_valid_after_utc.isoformat()}"
            )
        return min(self.ttl, remaining)

    def _note(self, cert_pem: bytes, now: datetime) -> None:
        leaf = x509.load_pem_x509_certificate(cert_pem)
        self.serial = leaf.serial_number
        self.not_after = leaf.not_valid_after_utc
        self.renew_at = renewal_time(now, self.not_after)

    def renew(self) -> None:
        """Issue a new certificate and load it into ``context`` (blocking). Raises
        :class:`CAError` or ``ssl.SSLError``; the previous certificate stays in use then."""
        now = self._clock()
        issued = issue_server(self.ca, self.spiffe_id, self.hosts, self._ttl_at(now), now=now)
        load_chain(self.context, issued.cert_pem, issued.key_pem)
        self._note(issued.cert_pem, now)

    async def run(self) -> None:
        """Renew at half life forever (cancel to stop); a failed renewal is logged and retried
        with a doubling, jittered delay, the current certificate serving meanwhile."""
        failures = 0
        while True:
            if failures:
                step = min(SERVING_RETRY_MAX, SERVING_RETRY_MIN * 2 ** (failures - 1))
                delay = step / 2 + self._rand() * step / 2
            else:
                delay = (self.renew_at - self._clock()).total_seconds()
            await asyncio.sleep(max(0.0, delay))
            try:
                await asyncio.to_thread(self.renew)
            except (CAError, ssl.SSLError, OSError) as e:
                failures += 1
                self.renewals_failed += 1
                self.last_error = str(e)
                log.error("control plane certificate not renewed (serving the current one): %s", e)
                continue
            failures = 0
            self.renewals += 1
            self.last_error = None
            log.info(
                "control plane certificate renewed: serial %x, valid until %s",
                self.serial,
                self.not_after.isoformat(),
            )

    def __repr__(self) -> str:
        return (
            f"ServingCert({self.spiffe_id!r}, hosts={list(self.hosts)!r}, serial={self.serial:x}, "
            f"not_after={self.not_after.isoformat()}, renewals={self.renewals})"
        )


def serving_context(
    ca: CA, hosts: list[str] | tuple[str, ...], ttl: timedelta | None = None
) -> ssl.SSLContext:
    """A server context with a control-plane certificate for ``hosts`` that is never renewed:
    its TTL defaults to as long as the CA allows, at most :data:`MAX_STATIC_SERVING_TTL`.
    Prefer :class:`ServingCert` and its :meth:`~ServingCert.run` for a short TTL."""
    if ttl is None:
        ttl = min(MAX_STATIC_SERVING_TTL, remaining_lifetime(ca))
    return ServingCert(ca, hosts, ttl).context
