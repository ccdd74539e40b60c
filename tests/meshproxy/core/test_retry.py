"""Unit tests for meshproxy.core.retry: pure decisions, rand injected, no I/O, no event loop.

The expected values come from Envoy's source (retry_state_impl.cc, router.cc per-try timeout
handling, backoff_strategy.cc, resource_manager_impl.h) as summarised in the module docstring;
the token x outcome table below is written out independently of the module's own tables.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshproxy.config.model import DEFAULT_RETRY, RetryBudget, RetryPolicy
from meshproxy.core.retry import (
    IDEMPOTENT_METHODS,
    Outcome,
    backoff,
    budget_limit,
    parse_grpc_status,
    retriable,
    retry_allowed,
    retry_limit,
)
from meshproxy.settings import DEFAULT_SETTINGS

ALL_TOKENS = (
    "connect-failure",
    "reset-before-request",
    "reset",
    "5xx",
    "gateway-error",
    "retriable-4xx",
    "retriable-status-codes",
    "refused-stream",
    "cancelled",
    "deadline-exceeded",
    "resource-exhausted",
    "internal",
    "unavailable",
)

NON_RESPONSE = (
    Outcome.CONNECT_FAILURE,
    Outcome.RESET_BEFORE_REQUEST,
    Outcome.RESET,
    Outcome.PER_TRY_TIMEOUT,
)

# token -> outcomes (other than RESPONSE) it retries
RETRIES_ON: dict[str, set[Outcome]] = {
    "connect-failure": {Outcome.CONNECT_FAILURE},
    "reset-before-request": {Outcome.CONNECT_FAILURE, Outcome.RESET_BEFORE_REQUEST},
    "reset": set(NON_RESPONSE),
    "5xx": set(NON_RESPONSE),
    "gateway-error": set(NON_RESPONSE),
}


def only(*tokens: str, codes: frozenset[int] = frozenset(), attempts: int = 2) -> RetryPolicy:
    return RetryPolicy(attempts=attempts, retry_on=frozenset(tokens), retriable_status_codes=codes)


# --------------------------------------------------------------------------- outcome matrix


@pytest.mark.parametrize("outcome", NON_RESPONSE, ids=lambda o: o.name)
@pytest.mark.parametrize("token", ALL_TOKENS)
def test_token_outcome_matrix(token: str, outcome: Outcome) -> None:
    expected = outcome in RETRIES_ON.get(token, set())
    assert retriable(only(token, codes=frozenset({503, 504})), outcome) is expected


# token -> response statuses (100..599) it retries, with codes {418, 503} configured
RESPONSE_RETRIES: dict[str, set[int]] = {
    "5xx": set(range(500, 600)),
    "gateway-error": {502, 503, 504},
    "retriable-4xx": {409},
    "retriable-status-codes": {418, 503},
}


@pytest.mark.parametrize("token", ALL_TOKENS)
def test_token_response_matrix_every_status(token: str) -> None:
    policy = only(token, codes=frozenset({418, 503}))
    retried = {s for s in range(100, 600) if retriable(policy, Outcome.RESPONSE, s)}
    assert retried == RESPONSE_RETRIES.get(token, set())


def test_status_codes_without_their_token_do_nothing() -> None:
    # Envoy consults retriable_status_codes only under RETRY_ON_RETRIABLE_STATUS_CODES
    policy = only("connect-failure", codes=frozenset({503}))
    assert not retriable(policy, Outcome.RESPONSE, 503)


def test_retriable_status_codes_token_without_codes_retries_nothing() -> None:
    policy = only("retriable-status-codes")
    assert not any(retriable(policy, Outcome.RESPONSE, s) for s in range(100, 600))


def test_bare_codes_as_translated() -> None:
    # Istio `retryOn: "503,429"`: the numbers become codes and add the token
    policy = only("retriable-status-codes", codes=frozenset({503, 429}))
    assert retriable(policy, Outcome.RESPONSE, 429)
    assert retriable(policy, Outcome.RESPONSE, 503)
    assert not retriable(policy, Outcome.RESPONSE, 500)
    assert not retriable(policy, Outcome.CONNECT_FAILURE)


def test_combined_tokens_union() -> None:
    policy = only("connect-failure", "retriable-4xx")
    assert retriable(policy, Outcome.CONNECT_FAILURE)
    assert retriable(policy, Outcome.RESPONSE, 409)
    assert not retriable(policy, Outcome.RESPONSE, 503)
    assert not retriable(policy, Outcome.RESET)


# --------------------------------------------------------------------------- per-try timeout


def test_per_try_timeout_is_a_reset_not_a_504() -> None:
    # router.cc onPerTryTimeoutCommon -> maybeRetryReset(LocalReset): status codes do not apply
    codes_504 = only("retriable-status-codes", codes=frozenset({504}))
    assert not retriable(codes_504, Outcome.PER_TRY_TIMEOUT)
    assert retriable(only("gateway-error"), Outcome.PER_TRY_TIMEOUT)
    assert retriable(only("reset"), Outcome.PER_TRY_TIMEOUT)
    assert not retriable(only("reset-before-request"), Outcome.PER_TRY_TIMEOUT)


# --------------------------------------------------------------------------- Istio's default


@pytest.mark.parametrize(
    ("outcome", "status", "expected"),
    [
        # Istio >= 1.24 (istio/istio#52111): no retriable status codes by default
        (Outcome.RESPONSE, 503, False),
        (Outcome.RESPONSE, 500, False),
        (Outcome.RESPONSE, 502, False),
        (Outcome.RESPONSE, 504, False),
        (Outcome.RESPONSE, 409, False),
        (Outcome.RESPONSE, 200, False),
        (Outcome.CONNECT_FAILURE, 0, True),
        (Outcome.RESET_BEFORE_REQUEST, 0, False),
        (Outcome.RESET, 0, False),
        (Outcome.PER_TRY_TIMEOUT, 0, False),
    ],
)
def test_default_policy(outcome: Outcome, status: int, expected: bool) -> None:
    assert DEFAULT_RETRY.attempts == 2
    assert retriable(DEFAULT_RETRY, outcome, status) is expected


@pytest.mark.parametrize(
    ("grpc", "expected"),
    [(14, True), (1, True), (4, False), (8, False), (13, False), (0, False), (2, False)],
)
def test_default_policy_grpc(grpc: int, expected: bool) -> None:
    # DefaultPolicy: unavailable and cancelled only
    assert retriable(DEFAULT_RETRY, Outcome.RESPONSE, 200, grpc_status=grpc) is expected


# --------------------------------------------------------------------------- gRPC


@pytest.mark.parametrize(
    ("token", "code"),
    [
        ("cancelled", 1),
        ("deadline-exceeded", 4),
        ("resource-exhausted", 8),
        ("internal", 13),
        ("unavailable", 14),
    ],
)
def test_grpc_token_retries_exactly_its_code(token: str, code: int) -> None:
    policy = only(token)
    retried = {c for c in range(17) if retriable(policy, Outcome.RESPONSE, 200, grpc_status=c)}
    assert retried == {code}
    assert not retriable(policy, Outcome.RESPONSE, 200)  # no grpc-status header
    assert not retriable(policy, Outcome.RESPONSE, 503)


def test_grpc_status_does_not_hide_an_http_match() -> None:
    policy = only("5xx", "unavailable")
    assert retriable(policy, Outcome.RESPONSE, 503, grpc_status=0)
    assert retriable(policy, Outcome.RESPONSE, 200, grpc_status=14)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, None),
        (b"14", 14),
        (b" 1 ", 1),
        ("4", 4),
        (b"", None),
        (b"-1", None),
        (b"abc", None),
        (b"1e3", None),
        ("١٤", None),  # non-ASCII digits are not a status
        (b"99999999999", None),
    ],
)
def test_parse_grpc_status(raw: bytes | str | None, expected: int | None) -> None:
    assert parse_grpc_status(raw) == expected


# --------------------------------------------------------------------------- never retried


@pytest.mark.parametrize("token", ALL_TOKENS)
def test_overloaded_response_never_retried(token: str) -> None:
    policy = only(token, codes=frozenset({503}))
    for status in (409, 500, 502, 503, 504):
        assert not retriable(policy, Outcome.RESPONSE, status, grpc_status=14, overloaded=True)


def test_overloaded_flag_ignored_for_resets() -> None:
    assert retriable(only("5xx"), Outcome.RESET, overloaded=True)


@pytest.mark.parametrize("outcome", [*NON_RESPONSE, Outcome.RESPONSE], ids=lambda o: o.name)
def test_attempts_zero_never_retries(outcome: Outcome) -> None:
    everything = only(*ALL_TOKENS, codes=frozenset({503}), attempts=0)
    assert not retriable(everything, outcome, 503, grpc_status=14)
    assert not retriable(RetryPolicy(attempts=0), outcome, 503, grpc_status=14)


def test_success_and_client_errors_not_retried_by_everything_policy() -> None:
    everything = only(*ALL_TOKENS)
    for status in (200, 204, 301, 400, 404, 429):
        assert not retriable(everything, Outcome.RESPONSE, status)


# --------------------------------------------------------------------------- backoff


@pytest.mark.parametrize(
    ("retry", "bound_ms"),
    [(1, 25), (2, 50), (3, 100), (4, 200), (5, 250), (6, 250), (50, 250), (5000, 250)],
)
def test_backoff_bounds(retry: int, bound_ms: int) -> None:
    bound = bound_ms / 1000
    assert backoff(retry, 0.0) == 0.0
    assert backoff(retry, 0.5) == pytest.approx(bound / 2)
    top = backoff(retry, math.nextafter(1.0, 0.0))
    assert top < bound
    assert top == pytest.approx(bound)


def test_backoff_matches_envoy_integer_sequence() -> None:
    # JitteredExponentialBackOffStrategy with base 25 ms, max 250 ms, random() huge:
    # next = base; each call returns random % next, then next = next*2 if next < max/2 else max
    nxt, limit, bounds = 25, 250 // 2, []
    for _ in range(8):
        bounds.append(nxt)
        nxt = nxt * 2 if nxt < limit else 250
    for n, envoy_bound in enumerate(bounds, start=1):
        assert backoff(n, 0.999999) == pytest.approx(envoy_bound / 1000 * 0.999999)


def test_backoff_custom_base_and_cap() -> None:
    assert backoff(1, 0.5, base=0.1, cap=1.0) == pytest.approx(0.05)
    assert backoff(4, 0.5, base=0.1, cap=1.0) == pytest.approx(0.4)
    assert backoff(5, 0.5, base=0.1, cap=1.0) == pytest.approx(0.5)
    assert backoff(1, 0.5, base=0.5, cap=0.2) == pytest.approx(0.1)  # cap wins even at n=1


def test_backoff_retry_below_one_is_first_retry() -> None:
    assert backoff(0, 0.5) == backoff(1, 0.5) == pytest.approx(0.0125)


def test_backoff_defaults_are_settings() -> None:
    s = DEFAULT_SETTINGS
    for n in range(1, 8):
        assert backoff(n, 0.7) == backoff(n, 0.7, s.retry_backoff_base, s.retry_backoff_max)


@given(
    st.integers(min_value=1, max_value=10_000),
    st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
)
def test_backoff_always_within_cap(retry: int, rand: float) -> None:
    bound = min(0.25, 0.025 * 2 ** min(retry - 1, 64))
    assert 0.0 <= backoff(retry, rand) < bound


# --------------------------------------------------------------------------- retry budget

DEFAULT_BUDGET = RetryBudget(percent=20.0, min_concurrency=3)
UNLIMITED = 2**32 - 1  # Istio's default maxRetries


@pytest.mark.parametrize(("active", "limit"), [(0, 3), (10, 3), (15, 3), (20, 4), (100, 20)])
def test_budget_arithmetic(active: int, limit: int) -> None:
    assert budget_limit(DEFAULT_BUDGET, active, 0) == limit
    assert retry_limit(active, 0, DEFAULT_BUDGET, None, UNLIMITED) == limit


def test_budget_counts_pending_requests() -> None:
    assert retry_limit(60, 40, DEFAULT_BUDGET, None, UNLIMITED) == 20
    assert retry_limit(0, 100, DEFAULT_BUDGET, None, UNLIMITED) == 20


def test_budget_truncates_like_envoy() -> None:
    # uint64(20 / 100.0 * 24) = uint64(4.8) = 4
    assert retry_limit(24, 0, DEFAULT_BUDGET, None, UNLIMITED) == 4
    # same double arithmetic order as Envoy: 29 / 100.0 * 100 = 28.999999999999996 -> 28
    assert retry_limit(100, 0, RetryBudget(29.0, 0), None, UNLIMITED) == 28


@pytest.mark.parametrize(("active", "limit"), [(0, 10), (10, 10), (100, 10), (1000, 50)])
def test_min_concurrency_floor(active: int, limit: int) -> None:
    assert retry_limit(active, 0, RetryBudget(5.0, 10), None, UNLIMITED) == limit


def test_zero_percent_budget_is_min_concurrency_only() -> None:
    assert retry_limit(10_000, 0, RetryBudget(0.0, 2), None, UNLIMITED) == 2
    assert retry_limit(10_000, 0, RetryBudget(0.0, 0), None, UNLIMITED) == 0


def test_explicit_budget_ignores_max_retries_and_default() -> None:
    assert retry_limit(100, 0, DEFAULT_BUDGET, RetryBudget(1.0, 1), 1) == 20
    assert retry_limit(100, 0, RetryBudget(50.0, 3), DEFAULT_BUDGET, 1) == 50


@pytest.mark.parametrize(
    ("active", "max_retries", "limit"),
    [(100, 2, 2), (100, 50, 20), (0, 2, 2), (0, UNLIMITED, 3), (10, UNLIMITED, 3), (0, 0, 0)],
)
def test_default_budget_combined_with_max_retries(
    active: int, max_retries: int, limit: int
) -> None:
    assert retry_limit(active, 0, None, DEFAULT_BUDGET, max_retries) == limit


@pytest.mark.parametrize("active", [0, 10, 100, 10_000])
def test_no_default_budget_is_max_retries(active: int) -> None:
    assert retry_limit(active, 0, None, None, 7) == 7
    assert retry_limit(active, 0, None, None, UNLIMITED) == UNLIMITED


def test_default_budget_from_settings() -> None:
    s = DEFAULT_SETTINGS
    assert s.retry_budget_percent is not None
    default = RetryBudget(s.retry_budget_percent, s.retry_budget_min)
    assert retry_limit(100, 0, None, default, UNLIMITED) == 20
    assert retry_limit(0, 0, None, default, UNLIMITED) == 3


def test_retry_allowed_is_count_below_limit() -> None:
    # 100 active -> limit 20: the 20th concurrent retry may start, the 21st may not
    assert retry_allowed(19, 100, 0, DEFAULT_BUDGET, None, UNLIMITED)
    assert not retry_allowed(20, 100, 0, DEFAULT_BUDGET, None, UNLIMITED)
    assert retry_allowed(2, 0, 0, None, DEFAULT_BUDGET, UNLIMITED)
    assert not retry_allowed(3, 0, 0, None, DEFAULT_BUDGET, UNLIMITED)
    assert not retry_allowed(2, 1000, 0, None, DEFAULT_BUDGET, 2)
    assert not retry_allowed(0, 1000, 0, None, None, 0)
    assert retry_allowed(0, 0, 0, None, None, 1)


def test_budget_tolerates_odd_inputs() -> None:
    assert retry_limit(-5, -5, DEFAULT_BUDGET, None, UNLIMITED) == 3
    assert retry_limit(10, 0, RetryBudget(float("nan"), 2), None, UNLIMITED) == 2
    assert retry_limit(10, 0, RetryBudget(float("inf"), 2), None, UNLIMITED) == 2**64 - 1


# --------------------------------------------------------------------------- methods


def test_idempotent_methods_rfc9110() -> None:
    rfc = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
    assert rfc == IDEMPOTENT_METHODS
    assert b"POST" not in IDEMPOTENT_METHODS
    assert b"PATCH" not in IDEMPOTENT_METHODS
