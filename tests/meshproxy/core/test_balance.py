"""Unit tests for meshproxy.core.balance: deterministic (rand is an argument), no I/O."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshproxy.config.model import (
    Cluster,
    ConsistentHash,
    Endpoint,
    LbKind,
    LoadBalancer,
)
from meshproxy.core.balance import (
    LeastRequestPicker,
    PassthroughPicker,
    RandomPicker,
    RingHashPicker,
    RoundRobinPicker,
    cookie_value,
    hash64,
    hash_key_for,
    make_picker,
)
from meshproxy.core.routing import RequestInfo


def eps(*weights: int) -> tuple[Endpoint, ...]:
    return tuple(Endpoint(f"10.0.0.{i + 1}", 8080, weight=w) for i, w in enumerate(weights))


def cluster(kind: LbKind, *weights: int, hash: ConsistentHash | None = None) -> Cluster:
    return Cluster(
        name="svc",
        host="svc.default.svc.cluster.local",
        port=8080,
        endpoints=eps(*weights),
        lb=LoadBalancer(kind=kind, hash=hash),
    )


def spaced(n: int) -> list[float]:
    """n evenly spaced values in [0, 1): a deterministic stand-in for uniform rand."""
    return [k / n for k in range(n)]


ALL_KINDS = list(LbKind)


# --------------------------------------------------------------------------- common rules


class TestCommonRules:
    def test_make_picker_kinds(self) -> None:
        assert isinstance(make_picker(cluster(LbKind.LEAST_REQUEST, 1)), LeastRequestPicker)
        assert isinstance(make_picker(cluster(LbKind.ROUND_ROBIN, 1)), RoundRobinPicker)
        assert isinstance(make_picker(cluster(LbKind.RANDOM, 1)), RandomPicker)
        assert isinstance(make_picker(cluster(LbKind.PASSTHROUGH, 1)), PassthroughPicker)
        ch = ConsistentHash(header="x-user", ring_size=64)
        p = make_picker(cluster(LbKind.CONSISTENT_HASH, 1, 1, hash=ch))
        assert isinstance(p, RingHashPicker)
        assert p.ring_size >= 64

    @pytest.mark.parametrize("kind", ALL_KINDS)
    def test_no_endpoints(self, kind: LbKind) -> None:
        p = make_picker(cluster(kind))
        assert p.pick(0.5, []) is None
        assert p.pick(0.5, [], [], b"k") is None

    @pytest.mark.parametrize("kind", ALL_KINDS)
    def test_zero_weight_never_picked(self, kind: LbKind) -> None:
        p = make_picker(cluster(kind, 0, 5, 0, 5))
        picked = {p.pick(r, [0, 0, 0, 0], None, f"{r}".encode()) for r in spaced(500)}
        assert picked <= {1, 3}
        assert make_picker(cluster(kind, 0, 0)).pick(0.3, [0, 0]) is None

    @pytest.mark.parametrize("kind", ALL_KINDS)
    def test_all_unavailable_gives_none(self, kind: LbKind) -> None:
        p = make_picker(cluster(kind, 1, 2, 3))
        for r in spaced(20):
            assert p.pick(r, [0, 0, 0], [False, False, False], b"key") is None

    @pytest.mark.parametrize("kind", ALL_KINDS)
    def test_unavailable_never_picked(self, kind: LbKind) -> None:
        p = make_picker(cluster(kind, 1, 1, 2, 1))
        avail = [True, False, True, False]
        got = {p.pick(r, [0, 0, 0, 0], avail, f"k{r}".encode()) for r in spaced(400)}
        assert got <= {0, 2}
        assert got  # something was picked

    @pytest.mark.parametrize("kind", ALL_KINDS)
    def test_available_none_means_all(self, kind: LbKind) -> None:
        p = make_picker(cluster(kind, 1))
        assert p.pick(0.7, [3], None) == 0

    def test_repr_is_readable(self) -> None:
        assert "p2c" in repr(make_picker(cluster(LbKind.LEAST_REQUEST, 1, 1)))
        assert "edf" in repr(make_picker(cluster(LbKind.ROUND_ROBIN, 3, 1)))


# --------------------------------------------------------------------------- random


class TestRandom:
    def test_distribution_90_10(self) -> None:
        p = make_picker(cluster(LbKind.RANDOM, 90, 10))
        counts = Counter(p.pick(r, [0, 0]) for r in spaced(10_000))
        assert counts == {0: 9000, 1: 1000}

    def test_weighted_fallback_among_available(self) -> None:
        p = make_picker(cluster(LbKind.RANDOM, 10, 30, 60))
        counts = Counter(p.pick(r, [0, 0, 0], [True, True, False]) for r in spaced(10_000))
        assert set(counts) == {0, 1}
        assert abs(counts[0] - 2500) <= 50 and abs(counts[1] - 7500) <= 50

    def test_deterministic(self) -> None:
        p = make_picker(cluster(LbKind.RANDOM, 1, 2, 3))
        assert [p.pick(r, [0] * 3) for r in spaced(50)] == [p.pick(r, [0] * 3) for r in spaced(50)]

    def test_rand_edges_stay_in_range(self) -> None:
        p = make_picker(cluster(LbKind.RANDOM, 1, 1))
        assert p.pick(0.0, [0, 0]) == 0
        assert p.pick(1.0, [0, 0]) == 1
        assert p.pick(-0.1, [0, 0]) == 0


# --------------------------------------------------------------------------- least request


class TestLeastRequest:
    def test_p2c_prefers_less_loaded(self) -> None:
        p = make_picker(cluster(LbKind.LEAST_REQUEST, 1, 1))
        # The two choices are always distinct: with two endpoints the idle one always wins.
        assert {p.pick(r, [10, 0]) for r in spaced(100)} == {1}
        assert {p.pick(r, [0, 10]) for r in spaced(100)} == {0}

    def test_p2c_three_endpoints(self) -> None:
        p = make_picker(cluster(LbKind.LEAST_REQUEST, 1, 1, 1))
        counts = Counter(p.pick(r, [5, 0, 5]) for r in spaced(6000))
        # The idle endpoint wins whenever it is one of the two (4 of 6 ordered pairs).
        assert counts[1] == 4000
        # The most loaded endpoint is never picked when it is paired with a lighter one.
        counts = Counter(p.pick(r, [0, 1, 9]) for r in spaced(6000))
        assert counts[2] == 0
        assert counts == {0: 4000, 1: 2000}

    def test_p2c_uniform_when_idle(self) -> None:
        p = make_picker(cluster(LbKind.LEAST_REQUEST, 1, 1, 1, 1))
        counts = Counter(p.pick(r, [0, 0, 0, 0]) for r in spaced(12_000))
        assert counts == {0: 3000, 1: 3000, 2: 3000, 3: 3000}

    def test_p2c_single_endpoint(self) -> None:
        p = make_picker(cluster(LbKind.LEAST_REQUEST, 1))
        assert p.pick(0.99, [100]) == 0
        assert p.pick(0.99, [100], [False]) is None

    def test_p2c_skips_unavailable(self) -> None:
        p = make_picker(cluster(LbKind.LEAST_REQUEST, 1, 1, 1))
        # The idle endpoint is ejected: the picker must choose among the others.
        counts = Counter(p.pick(r, [3, 0, 1], [True, False, True]) for r in spaced(600))
        assert counts == {2: 600}

    def test_p2c_uniform_among_available(self) -> None:
        p = make_picker(cluster(LbKind.LEAST_REQUEST, 1, 1, 1, 1))
        counts = Counter(p.pick(r, [0] * 4, [True, False, True, True]) for r in spaced(12_000))
        assert set(counts) == {0, 2, 3}
        for i in (0, 2, 3):
            assert abs(counts[i] - 4000) <= 120, counts

    def test_weighted_least_request_honours_weights_when_idle(self) -> None:
        p = make_picker(cluster(LbKind.LEAST_REQUEST, 3, 1))
        assert "edf" in repr(p)
        counts = Counter(p.pick(0.0, [0, 0]) for _ in range(4000))
        assert counts == {0: 3000, 1: 1000}

    def test_weighted_least_request_accounts_for_active(self) -> None:
        p = make_picker(cluster(LbKind.LEAST_REQUEST, 2, 1))
        # effective weights 2/(3+1) = 0.5 and 1/(0+1) = 1: the lighter endpoint gets ~2/3.
        counts = Counter(p.pick(0.0, [3, 0]) for _ in range(3000))
        assert abs(counts[1] - 2000) <= 20

    def test_weighted_least_request_skips_unavailable(self) -> None:
        p = make_picker(cluster(LbKind.LEAST_REQUEST, 5, 1, 2))
        got = {p.pick(0.0, [0, 0, 0], [False, True, True]) for _ in range(100)}
        assert got == {1, 2}


# --------------------------------------------------------------------------- round robin


class TestRoundRobin:
    def test_equal_weights_rotation(self) -> None:
        p = make_picker(cluster(LbKind.ROUND_ROBIN, 1, 1, 1))
        assert [p.pick(0.0, [0] * 3) for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]

    def test_start_seeded_from_first_rand(self) -> None:
        p = make_picker(cluster(LbKind.ROUND_ROBIN, 1, 1, 1, 1))
        # The first rand picks the start (as Envoy seeds it); later rands do not matter.
        assert [p.pick(r, [0] * 4) for r in (0.5, 0.9, 0.1, 0.0)] == [2, 3, 0, 1]

    def test_rotation_skips_unavailable(self) -> None:
        p = make_picker(cluster(LbKind.ROUND_ROBIN, 1, 1, 1))
        avail = [True, False, True]
        assert [p.pick(0.0, [0] * 3, avail) for _ in range(4)] == [0, 2, 0, 2]

    def test_wrr_exact_sequence_3_to_1(self) -> None:
        p = make_picker(cluster(LbKind.ROUND_ROBIN, 3, 1))
        seq = "".join("AB"[p.pick(0.0, [0, 0])] for _ in range(12))  # type: ignore[index]
        assert seq == "AABA" * 3

    def test_wrr_proportions(self) -> None:
        p = make_picker(cluster(LbKind.ROUND_ROBIN, 5, 3, 2))
        counts = Counter(p.pick(0.0, [0, 0, 0]) for _ in range(1000))
        assert counts == {0: 500, 1: 300, 2: 200}

    def test_wrr_skips_unavailable_without_burst_on_return(self) -> None:
        p = make_picker(cluster(LbKind.ROUND_ROBIN, 3, 1))
        assert [p.pick(0.0, [0, 0], [False, True]) for _ in range(5)] == [1] * 5
        window = [p.pick(0.0, [0, 0]) for _ in range(8)]
        assert Counter(window) == {0: 6, 1: 2}  # A back at its share, no catch-up burst


# --------------------------------------------------------------------------- ring hash


KEYS = [f"user-{i}".encode() for i in range(5000)]


def owners(p: RingHashPicker, n: int, available: Sequence[bool] | None = None) -> list[int | None]:
    return [p.pick(0.0, [0] * n, available, k) for k in KEYS]


class TestRingHash:
    def test_same_key_same_endpoint_across_instances(self) -> None:
        a = RingHashPicker(eps(1, 1, 1, 1))
        b = RingHashPicker(eps(1, 1, 1, 1))
        assert owners(a, 4) == owners(b, 4)
        assert a.pick(0.9, [9, 0, 0, 0], None, b"k") == a.pick(0.1, [0, 9, 9, 9], None, b"k")

    def test_hash64_is_stable(self) -> None:
        # A fixed value: the ring must not depend on PYTHONHASHSEED or the process.
        assert hash64(b"abc") == 0xD8BB14D833D59559
        assert hash64(b"abc") != hash64(b"abd")
        assert 0 <= hash64(b"x") < 2**64

    def test_ring_size_minimum_and_weights(self) -> None:
        p = RingHashPicker(eps(3, 1), ring_size=1024)
        assert p.ring_size == 1024
        p = RingHashPicker(eps(1, 1, 1), ring_size=100)
        assert 100 <= p.ring_size <= 103

    def test_spread_even_weights(self) -> None:
        p = RingHashPicker(eps(1, 1, 1, 1))
        counts = Counter(owners(p, 4))
        for i in range(4):
            assert 0.7 * 1250 <= counts[i] <= 1.3 * 1250, counts

    def test_spread_follows_weights(self) -> None:
        p = RingHashPicker(eps(3, 1))
        counts = Counter(owners(p, 2))
        assert 0.68 <= counts[0] / len(KEYS) <= 0.82, counts

    def test_no_key_uses_rand(self) -> None:
        p = RingHashPicker(eps(1, 1, 1, 1))
        counts = Counter(p.pick(r, [0] * 4, None, None) for r in spaced(4000))
        assert set(counts) == {0, 1, 2, 3}
        assert p.pick(0.25, [0] * 4) == p.pick(0.25, [0] * 4)

    def test_ejection_moves_only_that_endpoints_keys(self) -> None:
        p = RingHashPicker(eps(1, 1, 1, 1, 1))
        before = owners(p, 5)
        after = owners(p, 5, [True, True, False, True, True])
        for b, a in zip(before, after, strict=True):
            if b == 2:
                assert a != 2 and a is not None
            else:
                assert a == b

    @settings(max_examples=40, deadline=None)
    @given(
        weights=st.lists(st.integers(min_value=1, max_value=5), min_size=2, max_size=8),
        data=st.data(),
    )
    def test_ejection_property(self, weights: list[int], data: st.DataObject) -> None:
        n = len(weights)
        out = data.draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=n - 1))
        keys = data.draw(st.lists(st.binary(min_size=0, max_size=16), min_size=1, max_size=50))
        p = RingHashPicker(eps(*weights), ring_size=128)
        avail = [i not in out for i in range(n)]
        for k in keys:
            b = p.pick(0.0, [0] * n, None, k)
            a = p.pick(0.0, [0] * n, avail, k)
            assert a is not None and avail[a]
            if b not in out:
                assert a == b

    def test_removing_an_endpoint_from_config(self) -> None:
        full = RingHashPicker(eps(1, 1, 1, 1, 1, 1, 1, 1, 1, 1))
        less = RingHashPicker(eps(1, 1, 1, 1, 1, 1, 1, 1, 1))  # 10.0.0.10 removed
        before, after = owners(full, 10), owners(less, 9)
        moved_others = sum(1 for b, a in zip(before, after, strict=True) if b != 9 and a != b)
        assert all(a != 9 for a in after)
        # Envoy's ring sizing (ring >= ring_size) re-spreads points when the set shrinks, so a
        # small share of the other endpoints' keys moves too; the removed one's keys all move.
        assert moved_others / len(KEYS) < 0.12


# --------------------------------------------------------------------------- passthrough


def test_passthrough() -> None:
    p = make_picker(cluster(LbKind.PASSTHROUGH, 1, 1))
    assert p.pick(0.9, [5, 0]) == 0
    assert p.pick(0.9, [5, 0], [False, True]) == 1


# --------------------------------------------------------------------------- hash keys


def request(path: str = "/", headers: dict[str, str] | None = None) -> RequestInfo:
    return RequestInfo(
        method="GET",
        path=path,
        host="svc",
        port=None,
        scheme="http",
        headers=headers or {},
        authority="svc",
    )


class TestHashKey:
    def test_header(self) -> None:
        ch = ConsistentHash(header="X-User")
        assert hash_key_for(ch, request(headers={"x-user": "jason"}), "1.2.3.4") == b"jason"
        assert hash_key_for(ch, request(headers={"x-user": ""}), "1.2.3.4") == b""
        assert hash_key_for(ch, request(), "1.2.3.4") is None

    def test_cookie(self) -> None:
        ch = ConsistentHash(cookie="session")
        hdrs = {"cookie": 'a=1; session="abc"; b=2'}
        assert hash_key_for(ch, request(headers=hdrs), "") == b"abc"
        hdrs = {"cookie": "session=xyz"}
        assert hash_key_for(ch, request(headers=hdrs), "") == b"xyz"
        assert hash_key_for(ch, request(headers={"cookie": "sessionx=1; a"}), "") is None
        assert hash_key_for(ch, request(), "") is None

    def test_cookie_value_first_wins(self) -> None:
        assert cookie_value("a=1;a=2", "a") == "1"
        assert cookie_value("  a = 1 ", "a") == "1"
        assert cookie_value(None, "a") is None

    def test_query_param(self) -> None:
        ch = ConsistentHash(query_param="user")
        assert hash_key_for(ch, request("/x?user=j%20s&y=1"), "") == b"j s"
        assert hash_key_for(ch, request("/x?y=1"), "") is None

    def test_source_ip(self) -> None:
        ch = ConsistentHash(source_ip=True)
        assert hash_key_for(ch, request(), "10.1.2.3") == b"10.1.2.3"
        assert hash_key_for(ch, request(), "") is None

    def test_no_source_configured(self) -> None:
        assert hash_key_for(ConsistentHash(), request(headers={"x": "1"}), "1.1.1.1") is None

    def test_key_routes_consistently(self) -> None:
        ch = ConsistentHash(header="x-user", ring_size=256)
        p = make_picker(cluster(LbKind.CONSISTENT_HASH, 1, 1, 1, hash=ch))
        k = hash_key_for(ch, request(headers={"x-user": "alice"}), "")
        assert len({p.pick(r, [0, 0, 0], None, k) for r in spaced(50)}) == 1
