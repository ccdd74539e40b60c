"""Unit tests for meshproxy.core.outlier: deterministic (``now`` is an argument), no I/O."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshproxy.config.model import OutlierPolicy
from meshproxy.core.outlier import (
    REASON_5XX,
    REASON_GATEWAY,
    REASON_LOCAL,
    Ejection,
    HostHealth,
    OutlierDetector,
)


def make(
    n: int = 10, *, min_ejectable: int = 1, **policy: object
) -> tuple[OutlierDetector, list[HostHealth]]:
    hosts = [HostHealth() for _ in range(n)]
    return OutlierDetector(OutlierPolicy(**policy), hosts, min_ejectable=min_ejectable), hosts  # type: ignore[arg-type]


def statuses(d: OutlierDetector, i: int, codes: list[int], now: float = 0.0) -> list[Ejection]:
    out = [d.on_status(i, code, now) for code in codes]
    return [e for e in out if e is not None]


def eject(d: OutlierDetector, i: int, now: float) -> Ejection | None:
    """Drive host ``i`` to the 5xx threshold (the policy's default 5) at time ``now``."""
    got = statuses(d, i, [500] * 5, now)
    return got[0] if got else None


# --------------------------------------------------------------------------- consecutive 5xx


def test_fifth_consecutive_5xx_ejects_not_the_fourth() -> None:
    d, hosts = make()
    assert statuses(d, 3, [500, 503, 500, 599]) == []
    assert not hosts[3].ejected and hosts[3].consecutive_5xx == 4
    assert d.on_status(3, 500, 7.0) == Ejection(3, REASON_5XX, 30.0)
    assert hosts[3].ejected and hosts[3].ejected_at == 7.0
    assert hosts[3].last_reason == REASON_5XX and hosts[3].ejections_total == 1


def test_custom_threshold_is_exact() -> None:
    d, _ = make(consecutive_5xx=2)
    assert d.on_status(0, 500, 0.0) is None
    assert d.on_status(0, 500, 0.0) == Ejection(0, REASON_5XX, 30.0)


@pytest.mark.parametrize("ok", [200, 204, 301, 404, 499, 600])
def test_non_5xx_status_resets_both_counters(ok: int) -> None:
    d, hosts = make(consecutive_gateway_errors=5)
    statuses(d, 0, [503] * 4)
    assert d.on_status(0, ok, 0.0) is None
    assert (hosts[0].consecutive_5xx, hosts[0].consecutive_gateway) == (0, 0)
    assert statuses(d, 0, [503] * 4) == []
    assert not hosts[0].ejected


@pytest.mark.parametrize("threshold", [None, 0])
def test_consecutive_5xx_disabled(threshold: int | None) -> None:
    d, hosts = make(consecutive_5xx=threshold)
    assert statuses(d, 0, [500] * 100) == []
    assert not hosts[0].ejected and d.available is None


# --------------------------------------------------------------------------- gateway errors


def test_gateway_errors_502_503_504_eject_with_their_own_reason() -> None:
    d, _ = make(consecutive_5xx=None, consecutive_gateway_errors=3)
    assert statuses(d, 1, [502, 503]) == []
    assert d.on_status(1, 504, 2.0) == Ejection(1, REASON_GATEWAY, 30.0)


def test_other_5xx_resets_gateway_counter_only() -> None:
    d, hosts = make(consecutive_5xx=None, consecutive_gateway_errors=3)
    assert statuses(d, 0, [502, 502, 500, 502, 502]) == []
    assert hosts[0].consecutive_gateway == 2 and hosts[0].consecutive_5xx == 5
    assert d.on_status(0, 503, 0.0) == Ejection(0, REASON_GATEWAY, 30.0)


def test_500_between_gateway_errors_still_counts_as_5xx() -> None:
    d, _ = make(consecutive_5xx=5, consecutive_gateway_errors=3)
    got = statuses(d, 0, [502, 502, 500, 502, 502])
    assert got == [Ejection(0, REASON_5XX, 30.0)]


def test_unset_gateway_detector_never_ejects() -> None:
    # Istio leaves Envoy's gateway detector unenforced when consecutiveGatewayErrors is unset
    d, hosts = make(consecutive_5xx=None)
    assert statuses(d, 0, [503] * 50) == []
    assert not hosts[0].ejected


def test_both_detectors_firing_on_one_response_eject_once_as_gateway() -> None:
    d, hosts = make(consecutive_5xx=5, consecutive_gateway_errors=5)
    assert statuses(d, 0, [503] * 5) == [Ejection(0, REASON_GATEWAY, 30.0)]
    assert hosts[0].ejections_total == 1
    # the gateway counter was reset by its ejection; the 5xx detector found the host ejected
    assert hosts[0].consecutive_gateway == 0 and hosts[0].consecutive_5xx == 5


# --------------------------------------------------------------------------- counter resets


def test_refused_ejection_resets_the_counter_so_it_can_fire_again() -> None:
    d, hosts = make(3, min_ejectable=0)  # 3 hosts at 10 %: Envoy ejects nothing
    assert statuses(d, 0, [500] * 5) == []
    assert hosts[0].consecutive_5xx == 0
    assert statuses(d, 0, [500] * 4) == [] and hosts[0].consecutive_5xx == 4


def test_counter_runs_past_threshold_while_ejected_without_firing() -> None:
    d, hosts = make()
    assert eject(d, 0, 0.0) is not None
    assert hosts[0].consecutive_5xx == 0
    assert statuses(d, 0, [500] * 12) == []  # in-flight responses from the ejected host
    assert hosts[0].consecutive_5xx == 12 and hosts[0].ejections_total == 1


@pytest.mark.parametrize(
    ("field", "reason"),
    [("consecutive_5xx", REASON_5XX), ("consecutive_gateway_errors", REASON_GATEWAY)],
)
def test_counter_above_a_lowered_threshold_does_not_fire(field: str, reason: str) -> None:
    # Envoy compares with ==: a counter carried past a threshold lowered by a reload waits
    # for a reset (success, un-ejection) before it can fire again
    other = "consecutive_gateway_errors" if field == "consecutive_5xx" else "consecutive_5xx"
    hosts = [HostHealth() for _ in range(10)]
    d = OutlierDetector(OutlierPolicy(**{field: 10, other: None}), hosts)  # type: ignore[arg-type]
    statuses(d, 0, [503] * 6)
    d2 = OutlierDetector(OutlierPolicy(**{field: 3, other: None}), hosts)  # type: ignore[arg-type]
    assert statuses(d2, 0, [503] * 5) == []
    d2.on_status(0, 200, 0.0)
    assert statuses(d2, 0, [503] * 3) == [Ejection(0, reason, 30.0)]


def test_unejection_resets_all_counters() -> None:
    d, hosts = make(consecutive_gateway_errors=9)
    eject(d, 0, 0.0)
    statuses(d, 0, [503, 503], 1.0)
    assert (hosts[0].consecutive_5xx, hosts[0].consecutive_gateway) == (2, 2)
    assert d.sweep(30.0) == [0]
    assert (hosts[0].consecutive_5xx, hosts[0].consecutive_gateway) == (0, 0)
    # needs a full threshold of new errors to be ejected again
    assert statuses(d, 0, [500] * 4, 31.0) == []


# --------------------------------------------------------------------------- local origin


def test_unsplit_local_failures_map_to_503_504_503() -> None:
    d, hosts = make(consecutive_5xx=3)
    assert d.on_local_failure(0, "connect", 0.0) is None
    assert d.on_local_failure(0, "timeout", 0.0) is None
    assert hosts[0].consecutive_5xx == 2 and hosts[0].consecutive_gateway == 2
    assert hosts[0].consecutive_local == 0
    assert d.on_local_failure(0, "reset", 1.0) == Ejection(0, REASON_5XX, 30.0)


@pytest.mark.parametrize("kind", ["connect", "timeout", "reset"])
def test_unsplit_local_failures_are_gateway_errors(kind: str) -> None:
    d, _ = make(consecutive_5xx=None, consecutive_gateway_errors=2)
    assert d.on_status(0, 502, 0.0) is None
    assert d.on_local_failure(0, kind, 0.0) == Ejection(0, REASON_GATEWAY, 30.0)


def test_unsplit_local_success_is_not_a_5xx_reset() -> None:
    d, hosts = make()
    statuses(d, 0, [500] * 4)
    d.on_local_success(0)
    assert hosts[0].consecutive_5xx == 4
    assert d.on_status(0, 500, 0.0) is not None


def test_split_local_failures_count_only_locally() -> None:
    d, hosts = make(split_external_local_origin_errors=True, consecutive_local_origin_failures=3)
    assert d.on_local_failure(0, "connect", 0.0) is None
    assert d.on_local_failure(0, "timeout", 0.0) is None
    assert (hosts[0].consecutive_5xx, hosts[0].consecutive_gateway) == (0, 0)
    assert d.on_local_failure(0, "reset", 4.0) == Ejection(0, REASON_LOCAL, 30.0)
    assert hosts[0].consecutive_local == 0 and hosts[0].last_reason == REASON_LOCAL


@pytest.mark.parametrize("head", [200, 503])
def test_split_response_head_resets_local_counter(head: int) -> None:
    d, hosts = make(split_external_local_origin_errors=True, consecutive_local_origin_failures=3)
    d.on_local_failure(0, "timeout", 0.0)
    d.on_local_failure(0, "timeout", 0.0)
    d.on_status(0, head, 0.0)
    assert hosts[0].consecutive_local == 0
    d.on_local_failure(0, "timeout", 0.0)
    assert d.on_local_failure(0, "timeout", 0.0) is None and not hosts[0].ejected


def test_split_local_success_resets_local_counter() -> None:
    d, _ = make(split_external_local_origin_errors=True, consecutive_local_origin_failures=2)
    d.on_local_failure(0, "connect", 0.0)
    d.on_local_success(0)
    assert d.on_local_failure(0, "connect", 0.0) is None
    assert d.on_local_failure(0, "connect", 0.0) == Ejection(0, REASON_LOCAL, 30.0)


def test_split_keeps_5xx_detection_of_response_codes() -> None:
    d, _ = make(split_external_local_origin_errors=True, consecutive_local_origin_failures=2)
    assert statuses(d, 0, [500] * 5) == [Ejection(0, REASON_5XX, 30.0)]


def test_split_without_local_threshold_never_ejects_on_local_failures() -> None:
    d, hosts = make(split_external_local_origin_errors=True, consecutive_local_origin_failures=None)
    for _ in range(20):
        assert d.on_local_failure(0, "connect", 0.0) is None
    assert hosts[0].consecutive_5xx == 0 and not hosts[0].ejected


def test_unknown_local_failure_kind_is_a_programming_error() -> None:
    d, _ = make()
    with pytest.raises(ValueError, match="unknown local failure kind"):
        d.on_local_failure(0, "dns", 0.0)


# --------------------------------------------------------------------------- ejection time


def test_ejection_duration_grows_30_60_90_and_caps_at_300() -> None:
    d, hosts = make()
    now = 0.0
    durations = []
    for _ in range(13):
        e = eject(d, 0, now)
        assert e is not None
        durations.append(e.duration)
        now += e.duration
        assert d.sweep(now) == [0]  # re-ejected at once: no healthy interval to decay
    assert durations == [30.0 * k for k in range(1, 11)] + [300.0, 300.0, 300.0]
    # Envoy stops growing the multiplier once multiplier * base >= max + base
    assert hosts[0].multiplier == 11


def test_max_ejection_time_is_base_when_base_exceeds_300() -> None:
    d, _ = make(base_ejection_time=400.0)
    e1 = eject(d, 0, 0.0)
    assert e1 is not None and e1.duration == 400.0
    d.sweep(400.0)
    e2 = eject(d, 0, 400.0)
    assert e2 is not None and e2.duration == 400.0


def test_unejection_happens_at_the_first_sweep_after_the_duration() -> None:
    d, hosts = make()
    eject(d, 2, 5.0)
    for t in (10.0, 20.0, 30.0):
        assert d.sweep(t) == []
        assert hosts[2].ejected
    assert d.sweep(40.0) == [2]
    assert not hosts[2].ejected and hosts[2].unejected_at == 40.0


def test_unejection_boundary_is_inclusive_and_tolerates_an_early_timer() -> None:
    d, _ = make()
    eject(d, 0, 10.0)
    assert d.sweep(39.9) == []
    assert d.sweep(40.0) == [0]
    early, _ = make()
    eject(early, 0, 10.0)
    assert early.sweep(39.999) == [0]  # a timer one millisecond early still counts


def test_sweep_with_nothing_ejected_returns_empty() -> None:
    d, _ = make()
    assert d.sweep(10.0) == [] and d.available is None


# --------------------------------------------------------------------------- multiplier decay


def test_multiplier_decays_one_per_healthy_interval_not_in_the_unejection_sweep() -> None:
    d, hosts = make(interval=10.0)
    now = 0.0
    for _ in range(3):  # ejections of 30, 60, 90 s back to back
        e = eject(d, 0, now)
        assert e is not None
        now += e.duration
        d.sweep(now)
    assert hosts[0].multiplier == 3 and not hosts[0].ejected
    seen = []
    for _ in range(5):
        now += 10.0
        d.sweep(now)
        seen.append(hosts[0].multiplier)
    assert seen == [2, 1, 0, 0, 0]


def test_decay_then_reejection_uses_the_decayed_multiplier() -> None:
    d, hosts = make(interval=10.0)
    now = 0.0
    for _ in range(3):
        e = eject(d, 0, now)
        assert e is not None
        now += e.duration
        d.sweep(now)
    d.sweep(now + 10.0)  # 3 -> 2
    e = eject(d, 0, now + 15.0)
    assert e is not None and e.duration == 90.0 and hosts[0].multiplier == 3


def test_no_decay_while_ejected() -> None:
    d, hosts = make(interval=10.0)
    eject(d, 0, 0.0)
    d.sweep(30.0)
    eject(d, 0, 35.0)  # multiplier 2, 60 s
    for t in (40.0, 50.0, 60.0, 70.0, 80.0, 90.0):
        d.sweep(t)
        assert hosts[0].multiplier == 2
    assert d.sweep(100.0) == [0]


def test_decay_needs_a_full_interval_since_unejection() -> None:
    d, hosts = make(interval=10.0)
    eject(d, 0, 0.0)
    d.sweep(30.0)
    d.sweep(35.0)  # an irregular early sweep: only 5 s healthy
    assert hosts[0].multiplier == 1
    d.sweep(40.0)
    assert hosts[0].multiplier == 0


# --------------------------------------------------------------------------- max ejection percent


def eject_all(d: OutlierDetector, n: int) -> int:
    return sum(1 for i in range(n) if eject(d, i, 0.0) is not None)


@pytest.mark.parametrize(
    ("n", "percent", "allowed"),
    [
        (2, 10, 0),
        (2, 50, 1),
        (2, 100, 2),
        (3, 10, 0),
        (3, 50, 1),
        (3, 100, 3),
        (10, 10, 1),
        (10, 50, 5),
        (10, 100, 10),
        (20, 10, 2),
        (20, 50, 10),
        (20, 100, 20),
        (1, 100, 1),
    ],
)
def test_max_ejection_percent_is_envoys_check_with_min_ejectable_0(
    n: int, percent: int, allowed: int
) -> None:
    d, hosts = make(n, max_ejection_percent=percent, min_ejectable=0)
    assert eject_all(d, n) == allowed
    assert d.ejected_count == allowed == sum(h.ejected for h in hosts)


@pytest.mark.parametrize(
    ("n", "percent", "allowed"),
    [
        (1, 10, 0),  # never the last endpoint
        (2, 10, 1),
        (3, 10, 1),
        (9, 10, 1),
        (2, 50, 1),
        (3, 50, 1),
        (10, 10, 1),
        (20, 10, 2),  # Envoy's own allowance wins when larger
        (2, 100, 2),  # the rule never removes an ejection Envoy makes
        (1, 100, 1),
    ],
)
def test_small_pool_rule_with_default_min_ejectable(n: int, percent: int, allowed: int) -> None:
    d, _ = make(n, max_ejection_percent=percent)
    assert eject_all(d, n) == allowed


def test_min_ejectable_2_keeps_one_endpoint() -> None:
    d3, _ = make(3, min_ejectable=2)
    assert eject_all(d3, 3) == 2
    d2, _ = make(2, min_ejectable=2)
    assert eject_all(d2, 2) == 1


def test_slot_freed_by_unejection_can_be_reused() -> None:
    d, hosts = make(3)
    assert eject(d, 0, 0.0) is not None
    assert eject(d, 1, 0.0) is None and hosts[1].consecutive_5xx == 0
    d.sweep(30.0)
    assert eject(d, 1, 31.0) is not None and d.ejected_count == 1


def test_negative_min_ejectable_is_rejected() -> None:
    with pytest.raises(ValueError, match="min_ejectable"):
        make(min_ejectable=-1)


# --------------------------------------------------------------------------- availability, panic


def test_available_tracks_ejections_and_reuses_one_list() -> None:
    d, _ = make(4, max_ejection_percent=100)
    assert d.available is None
    eject(d, 1, 0.0)
    first = d.available
    assert first == [True, False, True, True]
    eject(d, 3, 5.0)
    assert d.available is first and first == [True, False, True, False]
    d.sweep(30.0)
    assert d.available == [True, True, True, False]
    d.sweep(40.0)
    assert d.available is None and d.ejected_count == 0


@pytest.mark.parametrize(
    ("threshold", "panics_at"),
    [(50, 3), (75, 2), (100, 1), (1, 4)],
)
def test_min_health_percent_is_the_panic_threshold(threshold: int, panics_at: int) -> None:
    d, _ = make(4, max_ejection_percent=100, min_health_percent=threshold)
    for k in range(1, 5):
        eject(d, k - 1, 0.0)
        assert d.ejected_count == k
        assert d.panic is (k >= panics_at)
        assert (d.available is None) is d.panic


def test_panic_ends_when_hosts_return() -> None:
    d, _ = make(4, max_ejection_percent=100, min_health_percent=50)
    for i in range(3):
        eject(d, i, 0.0)
    assert d.panic and d.available is None
    d.sweep(30.0)
    assert not d.panic and d.available is None and d.ejected_count == 0


def test_zero_min_health_never_panics() -> None:
    d, _ = make(3, max_ejection_percent=100, min_health_percent=0)
    eject_all(d, 3)
    assert not d.panic and d.available == [False, False, False]


# --------------------------------------------------------------------------- carried-over state


def test_constructor_counts_carried_over_ejections() -> None:
    d, hosts = make(3)
    eject(d, 0, 100.0)
    statuses(d, 1, [500] * 4, 101.0)
    # a reload rebuilds the detector over the same HostHealth objects
    d2 = OutlierDetector(OutlierPolicy(), hosts, min_ejectable=1)
    assert d2.ejected_count == 1 and d2.available == [False, True, True]
    assert eject(d2, 2, 102.0) is None  # the small-pool allowance is already used
    assert d2.on_status(1, 500, 102.0) is None  # counter carried (5th), but no room to eject
    assert hosts[1].consecutive_5xx == 0
    assert d2.sweep(130.0) == [0] and d2.available is None


def test_carried_over_host_uses_the_new_policy_duration() -> None:
    hosts = [HostHealth() for _ in range(10)]
    d = OutlierDetector(OutlierPolicy(), hosts)
    eject(d, 0, 0.0)
    d2 = OutlierDetector(OutlierPolicy(base_ejection_time=5.0, interval=1.0), hosts)
    assert d2.sweep(4.0) == []
    assert d2.sweep(5.0) == [0]
    assert hosts[0].multiplier == 1 and hosts[0].ejections_total == 1


def test_carried_over_panic_state() -> None:
    hosts = [HostHealth() for _ in range(2)]
    hosts[0].ejected = True
    hosts[0].multiplier = 1
    d = OutlierDetector(OutlierPolicy(min_health_percent=60), hosts)
    assert d.panic and d.available is None and d.ejected_count == 1


def test_sweep_adopts_an_ejection_made_through_another_detector() -> None:
    # a request that began before a reload reports to the old detector over the same objects
    hosts = [HostHealth() for _ in range(4)]
    old = OutlierDetector(OutlierPolicy(), hosts)
    new = OutlierDetector(OutlierPolicy(), hosts)
    assert eject(old, 2, 0.0) is not None
    assert new.ejected_count == 0 and new.available is None  # not seen until the sweep
    assert new.sweep(10.0) == []
    assert new.ejected_count == 1 and new.available == [True, True, False, True]
    assert new.sweep(30.0) == [2]
    assert new.ejected_count == 0 and new.available is None
    assert new.sweep(40.0) == [] and new.ejected_count == 0


# --------------------------------------------------------------------------- reading


def test_host_info_reports_state_and_time_left() -> None:
    d, _ = make(consecutive_gateway_errors=7)
    statuses(d, 1, [502, 502], 0.0)
    info = d.host_info(1, 0.0)
    assert info == {
        "ejected": False,
        "ejections_total": 0,
        "multiplier": 0,
        "consecutive_5xx": 2,
        "consecutive_gateway_failure": 2,
        "consecutive_local_origin_failure": 0,
        "last_reason": "",
        "uneject_in": 0.0,
    }
    eject(d, 1, 10.0)
    info = d.host_info(1, 22.5)
    assert info["ejected"] is True and info["uneject_in"] == 17.5
    assert info["last_reason"] == REASON_5XX and info["multiplier"] == 1
    assert d.host_info(1, 45.0)["uneject_in"] == 0.0  # overdue until the next sweep


def test_reprs_show_what_tests_assert_on() -> None:
    d, hosts = make(3)
    eject(d, 0, 1.0)
    assert "ejected=1" in repr(d) and "min_ejectable=1" in repr(d)
    assert "ejected@1" in repr(hosts[0]) and "ok" in repr(hosts[1])


# --------------------------------------------------------------------------- invariants

_event = st.tuples(
    st.integers(0, 5),  # host
    st.sampled_from([200, 404, 500, 502, 503, 504, "connect", "timeout", "reset", "sweep"]),
    st.floats(0.0, 40.0),  # time step
)


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 6),
    percent=st.integers(0, 100),
    min_health=st.integers(0, 100),
    min_ejectable=st.integers(0, 3),
    split=st.booleans(),
    events=st.lists(_event, max_size=120),
)
def test_invariants_under_random_traffic(
    n: int,
    percent: int,
    min_health: int,
    min_ejectable: int,
    split: bool,
    events: list[tuple[int, int | str, float]],
) -> None:
    d, hosts = make(
        n,
        min_ejectable=min_ejectable,
        consecutive_5xx=2,
        consecutive_gateway_errors=2,
        split_external_local_origin_errors=split,
        consecutive_local_origin_failures=2,
        max_ejection_percent=percent,
        min_health_percent=min_health,
    )
    envoy_allowed = percent * n // 100
    allowed = max(envoy_allowed, min(min_ejectable, n - 1))
    now = 0.0
    for host, what, step in events:
        now += step
        i = host % n
        if what == "sweep":
            d.sweep(now)
        elif isinstance(what, str):
            d.on_local_failure(i, what, now)
        else:
            d.on_status(i, what, now)
        ejected = [h.ejected for h in hosts]
        assert d.ejected_count == sum(ejected) <= allowed
        healthy = n - sum(ejected)
        assert d.panic is (100 * healthy < min_health * n)
        if d.ejected_count == 0 or d.panic:
            assert d.available is None
        else:
            assert d.available == [not e for e in ejected]
        assert all(0 <= h.multiplier <= 11 for h in hosts)
