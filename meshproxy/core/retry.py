"""Retry decisions with Envoy's semantics as Istio configures them: pure, no I/O, no clock.

Theory of operation
-------------------
The attempt loop (``meshproxy.proxy``) owns the counting and the waiting; this module only
answers three questions, each a pure function of its arguments:

* :func:`retriable` -- *may this failed attempt be retried at all?*  Envoy's
  ``RetryStateImpl::wouldRetryFromHeaders`` / ``wouldRetryFromReset``
  (``source/common/router/retry_state_impl.cc``) applied to one :class:`Outcome`.
* :func:`backoff` -- *how long to wait before retry n?*  Envoy's
  ``JitteredExponentialBackOffStrategy`` (``source/common/common/backoff_strategy.cc``) with the
  uniform draw ``rand`` injected by the caller.
* :func:`retry_limit` / :func:`retry_allowed` -- *may the cluster start one more concurrent
  retry now?*  Envoy's ``ResourceManagerImpl::RetryBudgetImpl``
  (``source/common/upstream/resource_manager_impl.h``) plus our default budget.

The caller checks, in Envoy's order: the outcome is retriable, the request has retries left
(``policy.attempts`` counts retries, so at most ``1 + attempts`` tries), the cluster's retry
circuit breaker allows it (else the retry overflows: counted, and the failed answer is the
final one), then it sleeps :func:`backoff` and tries again.

Which ``retryOn`` token retries which outcome
---------------------------------------------
``Y`` = retried.  A per-try timeout is *not* a 504 for this decision: Envoy's
``Filter::onPerTryTimeoutCommon`` resets the upstream stream and asks ``maybeRetryReset`` with
reason ``LocalReset`` after the request was sent, so it retries exactly when a reset after the
request would (``retriable-status-codes`` with 504 does *not* retry it; the 504 UT is only the
final local answer when no retry happens).  A connect failure falls through Envoy's reset
checks too, so every reset token retries it, not only ``connect-failure``.

===========================  =======  ==============  =====  ===========  ================
token                        connect  reset before    reset  per-try      response
                             failure  request                timeout
===========================  =======  ==============  =====  ===========  ================
``connect-failure``          Y        .               .      .            .
``reset-before-request``     Y        Y               .      .            .
``reset``                    Y        Y               Y      Y            .
``5xx``                      Y        Y               Y      Y            500..599
``gateway-error``            Y        Y               Y      Y            502, 503, 504
``retriable-4xx``            .        .               .      .            409
``retriable-status-codes``   .        .               .      .            the route's codes
``refused-stream``           .        .               .      .            .
``cancelled``                .        .               .      .            grpc-status 1
``deadline-exceeded``        .        .               .      .            grpc-status 4
``resource-exhausted``       .        .               .      .            grpc-status 8
``internal``                 .        .               .      .            grpc-status 13
``unavailable``              .        .               .      .            grpc-status 14
===========================  =======  ==============  =====  ===========  ================

* ``refused-stream`` retries an HTTP/2 ``REFUSED_STREAM`` reset, which HTTP/1.1 upstreams
  never produce: the token is accepted and never fires.
* Bare status codes in Istio's ``retryOn`` become ``retriable_status_codes`` and add the
  ``retriable-status-codes`` token (translation does this); as in Envoy, the codes act only
  when that token is present.  Istio's default policy (:data:`DEFAULT_RETRY`, no ``retries``
  block; no codes since Istio 1.24) therefore retries a connect failure and gRPC unavailable /
  cancelled, and not a 503, a 500, a reset or a per-try timeout. (The data plane adds a 503
  retry for idempotent methods on that default policy, ``Settings.default_retry_503``.)
* gRPC tokens read ``grpc-status`` from the response head (a trailers-only gRPC response);
  a status in trailers comes after the response started streaming and cannot be retried.
* ``reset-before-request``: Envoy retries when no byte of the request reached the upstream
  (``first_upstream_tx_byte_sent_`` unset, sticky over the request's attempts).  Here it is
  decided per attempt from the outcome the data plane reports: ``CONNECT_FAILURE`` and
  ``RESET_BEFORE_REQUEST`` qualify, ``RESET`` and ``PER_TRY_TIMEOUT`` do not.
* A policy with ``attempts <= 0`` retries nothing.
* Not modelled (no outcome carries them): ``retriable-headers`` (Istio cannot configure the
  header matchers), ``envoy-ratelimited``, ``http3-post-connect-failure``, and local
  circuit-breaker overflow (Envoy never retries reason ``Overflow``; ours answers 503 UO before
  any attempt).

Beyond current Envoy: a response carrying ``x-envoy-overloaded`` is never retried
(``overloaded=True``), whatever the tokens.  Envoy did this from envoyproxy/envoy#1793 (2017)
until #10847 (2020) made it retry such responses; issue 3 asks for the original behaviour: an
overloaded upstream said "back off", and retrying multiplies the overload.

Backoff
-------
Envoy (current source; the router docs still quote the older ``(2^N - 1) * base`` strategy)
keeps ``next_interval`` = base, returns ``random() % next_interval`` milliseconds, then doubles
``next_interval`` while it is below ``max / 2`` and otherwise sets it to ``max``.  Retry ``n``
(1 = the first retry) therefore draws uniformly from ``[0, min(max, base * 2^(n-1)))``: with
Istio's defaults (base 25 ms, max 250 ms = 10 x base) the bounds are 25, 50, 100, 200, 250,
250, ... ms.  :func:`backoff` returns ``rand * interval`` in seconds -- the same uniform
distribution without Envoy's whole-millisecond rounding, so shrunk test settings still work.

Retry budget
------------
Envoy's retry circuit breaker allows a new retry while ``active_retries < limit``.  With a
budget, ``limit = max(uint64(percent / 100.0 * (active + pending requests)),
min_retry_concurrency)`` -- the float product truncated, evaluated in the same order as Envoy
so rounding matches -- and ``max_retries`` is ignored.  Without one, ``limit = max_retries``
(Istio's default 2^32 - 1, not Envoy's 3).  Our rule beyond Istio: a cluster whose
DestinationRule sets no ``retryBudget`` gets the default budget from Settings (20 %, at least
3) *and* its ``maxRetries``: both must allow, so ``limit = min(default budget, max_retries)``;
a default budget of ``None`` restores Istio's behaviour exactly.
"""

from __future__ import annotations

import enum

from meshproxy.config.model import RetryBudget, RetryPolicy

__all__ = [
    "GRPC_RETRY_TOKENS",
    "IDEMPOTENT_METHODS",
    "Outcome",
    "backoff",
    "budget_limit",
    "parse_grpc_status",
    "retriable",
    "retry_allowed",
    "retry_limit",
]


class Outcome(enum.Enum):
    """How one upstream attempt ended, as far as the retry decision cares."""

    CONNECT_FAILURE = "connect-failure"  # refused / unreachable / connect timeout: never sent
    RESET_BEFORE_REQUEST = "reset-before-request"  # lost before the request was fully written
    RESET = "reset"  # lost after the request was sent, before the response head
    PER_TRY_TIMEOUT = "per-try-timeout"  # no response head within perTryTimeout
    RESPONSE = "response"  # a response head arrived (status etc. passed separately)


# Tokens that retry each non-response outcome (see the table in the module docstring).
_RESET_ANY = frozenset({"reset", "5xx", "gateway-error"})
_TOKENS_FOR: dict[Outcome, frozenset[str]] = {
    Outcome.CONNECT_FAILURE: _RESET_ANY | {"connect-failure", "reset-before-request"},
    Outcome.RESET_BEFORE_REQUEST: _RESET_ANY | {"reset-before-request"},
    Outcome.RESET: _RESET_ANY,
    Outcome.PER_TRY_TIMEOUT: _RESET_ANY,
}

_GATEWAY_ERRORS = frozenset({502, 503, 504})  # Envoy's CodeUtility::isGatewayError
_CONFLICT = 409  # the only status `retriable-4xx` retries

GRPC_RETRY_TOKENS: dict[int, str] = {
    1: "cancelled",
    4: "deadline-exceeded",
    8: "resource-exhausted",
    13: "internal",
    14: "unavailable",
}
"""gRPC status code -> the ``retryOn`` token that retries it."""

IDEMPOTENT_METHODS: frozenset[bytes] = frozenset(
    {b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"}
)
"""RFC 9110 section 9.2.2 idempotent methods (not used by the Istio-faithful decision)."""

_UINT64 = 2**64
_MAX_DOUBLINGS = 62  # beyond this base * 2^k exceeds any sane cap; avoids float overflow


def retriable(
    policy: RetryPolicy,
    outcome: Outcome,
    status: int = 0,
    *,
    grpc_status: int | None = None,
    overloaded: bool = False,
) -> bool:
    """True when ``policy`` retries an attempt that ended with ``outcome``.

    For :attr:`Outcome.RESPONSE`, ``status`` is the response status, ``grpc_status`` the
    integer ``grpc-status`` of the response head (None when absent or unparsable) and
    ``overloaded`` whether the head carries ``x-envoy-overloaded``.  Retries left and the
    cluster's retry budget are the caller's (and :func:`retry_allowed`'s) business.
    """
    if policy.attempts <= 0:
        return False
    on = policy.retry_on
    if outcome is not Outcome.RESPONSE:
        return not on.isdisjoint(_TOKENS_FOR[outcome])
    if overloaded:
        return False
    if 500 <= status < 600:
        if "5xx" in on or (status in _GATEWAY_ERRORS and "gateway-error" in on):
            return True
    elif status == _CONFLICT and "retriable-4xx" in on:
        return True
    if status in policy.retriable_status_codes and "retriable-status-codes" in on:
        return True
    if grpc_status is not None:
        token = GRPC_RETRY_TOKENS.get(grpc_status)
        return token is not None and token in on
    return False


def parse_grpc_status(value: bytes | str | None) -> int | None:
    """The ``grpc-status`` header value as an int, None when absent or not a plain decimal
    number (Envoy's ``Grpc::Common::getGrpcStatus`` then yields no retriable code either)."""
    if value is None:
        return None
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    text = text.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 10:
        return None
    return int(text)


def backoff(retry: int, rand: float, base: float = 0.025, cap: float = 0.25) -> float:
    """Seconds to wait before retry number ``retry`` (1 for the first retry).

    Full jitter: uniform in ``[0, min(cap, base * 2^(retry-1)))`` given ``rand`` uniform in
    ``[0, 1)``, as Envoy's ``JitteredExponentialBackOffStrategy``.  ``retry < 1`` is treated
    as the first retry.
    """
    doublings = retry - 1 if retry > 1 else 0
    if doublings > _MAX_DOUBLINGS:
        interval = cap
    else:
        interval = min(cap, base * (1 << doublings))
    return rand * interval


def budget_limit(budget: RetryBudget, active_requests: int, pending_requests: int) -> int:
    """Concurrent retries ``budget`` allows with this many active + pending requests:
    ``max(trunc(percent / 100 * (active + pending)), min_concurrency)`` as Envoy computes it."""
    outstanding = max(0, active_requests) + max(0, pending_requests)
    by_percent = budget.percent / 100.0 * outstanding
    if not by_percent > 0:  # also NaN
        allowed = 0
    elif by_percent >= _UINT64:
        allowed = _UINT64 - 1
    else:
        allowed = int(by_percent)
    return max(allowed, budget.min_concurrency)


def retry_limit(
    active_requests: int,
    pending_requests: int,
    budget: RetryBudget | None,
    default_budget: RetryBudget | None,
    max_retries: int,
) -> int:
    """Concurrent retries the cluster allows now.

    ``budget`` is the cluster's own ``retryBudget`` (then ``max_retries`` is ignored, as in
    Envoy); otherwise ``default_budget`` (from Settings, None = none) and ``max_retries``
    (``connectionPool.http.maxRetries``) both apply.
    """
    if budget is not None:
        return budget_limit(budget, active_requests, pending_requests)
    if default_budget is not None:
        return min(budget_limit(default_budget, active_requests, pending_requests), max_retries)
    return max_retries


def retry_allowed(
    active_retries: int,
    active_requests: int,
    pending_requests: int,
    budget: RetryBudget | None,
    default_budget: RetryBudget | None,
    max_retries: int,
) -> bool:
    """True when one more retry may start while ``active_retries`` are already running
    (Envoy's ``canCreate``: ``count < max``)."""
    return active_retries < retry_limit(
        active_requests, pending_requests, budget, default_budget, max_retries
    )
