"""Pure load-balancing pickers, one per cluster per snapshot.

Theory of operation
-------------------
The upstream layer calls :func:`make_picker` once for each :class:`Cluster` of a new snapshot
and keeps the picker next to the cluster's live state.  Per request it calls
``picker.pick(rand, active, available, hash_key)`` and gets an index into
``cluster.endpoints`` (or None: no endpoint can take the request -> 503 UH):

* ``rand`` -- a uniform float in ``[0, 1)`` drawn by the caller (deterministic in tests);
* ``active`` -- in-flight requests per endpoint, owned by the upstream layer;
* ``available`` -- False for ejected / unhealthy endpoints (None: all available);
* ``hash_key`` -- from :func:`hash_key_for` for CONSISTENT_HASH clusters.

Endpoints of weight 0 are never picked, by any picker.  Pickers never read a clock or call
``random``; the round-robin and weighted least-request pickers keep small mutable scheduling
state (per-cluster runtime state, like Envoy's per-worker load balancers), while the config
objects they were built from stay immutable.

The algorithms are Envoy's:

* LEAST_REQUEST, equal weights -- power of two choices: two distinct endpoints are derived from
  one ``rand`` and the one with fewer active requests wins (the first on a tie).  O(1).
* LEAST_REQUEST, unequal weights -- an earliest-deadline-first schedule in which an endpoint is
  re-inserted after each pick with effective weight ``weight / (active + 1) ** bias``
  (``bias`` = 1.0, Envoy's ``active_request_bias`` default).  O(log n).
* ROUND_ROBIN -- plain rotation for equal weights (start offset taken from the first ``rand``,
  as Envoy seeds its start at random), EDF with static weights otherwise (weights 3:1 give
  ``A A B A`` repeated).  Unavailable endpoints are skipped.
* RANDOM -- weighted random: bisect of ``rand * total`` over cumulative weights.
* CONSISTENT_HASH -- Envoy's ring hash: every endpoint gets ring points in proportion to its
  weight, the ring holds at least ``ring_size`` points (capped at 8M), each point is a stable
  64-bit hash of ``"IP:PORT_i"``; a key goes to the first point at or after its own hash.
  Unavailable endpoints are skipped by walking the ring forward, so ejecting an endpoint moves
  only that endpoint's keys.  The ring is built on first use.
* PASSTHROUGH -- the first pickable endpoint.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from typing import Protocol

from meshproxy.config.model import Cluster, ConsistentHash, Endpoint, LbKind
from meshproxy.core.routing import RequestInfo

__all__ = [
    "ACTIVE_REQUEST_BIAS",
    "MAX_RING_SIZE",
    "LeastRequestPicker",
    "PassthroughPicker",
    "Picker",
    "RandomPicker",
    "RingHashPicker",
    "RoundRobinPicker",
    "cookie_value",
    "hash64",
    "hash_key_for",
    "make_picker",
]

MAX_RING_SIZE = 8 * 1024 * 1024  # Envoy's maximum_ring_size default
ACTIVE_REQUEST_BIAS = 1.0  # Envoy's least_request active_request_bias default


class Picker(Protocol):
    def pick(
        self,
        rand: float,
        active: Sequence[int],
        available: Sequence[bool] | None = None,
        hash_key: bytes | None = None,
    ) -> int | None:
        """Index into ``cluster.endpoints`` for the next request, None when nothing can take
        it.  Called by the upstream layer once per attempt."""
        ...


def hash64(data: bytes) -> int:
    """Stable 64-bit hash (BLAKE2b, 8-byte digest): same bytes, same value, in every process."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def _eligible(endpoints: Sequence[Endpoint]) -> tuple[int, ...]:
    return tuple(i for i, ep in enumerate(endpoints) if ep.weight > 0)


def _weighted_choice(indexes: Sequence[int], weights: Sequence[int], rand: float) -> int:
    """``indexes[k]`` chosen with probability ``weights[k] / sum(weights)`` (all > 0)."""
    total = sum(weights)
    target = rand * total
    acc = 0
    for idx, w in zip(indexes, weights, strict=True):
        acc += w
        if target < acc:
            return idx
    return indexes[-1]


def _clamp_rand(rand: float) -> float:
    if rand < 0.0:
        return 0.0
    if rand >= 1.0:
        return math.nextafter(1.0, 0.0)
    return rand


# --------------------------------------------------------------------------- pickers


class PassthroughPicker:
    """PASSTHROUGH: the first endpoint that may be picked (Istio's original-destination
    clusters have at most the one endpoint the request was addressed to)."""

    __slots__ = ("_eligible",)

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        self._eligible = _eligible(endpoints)

    def pick(
        self,
        rand: float,
        active: Sequence[int],
        available: Sequence[bool] | None = None,
        hash_key: bytes | None = None,
    ) -> int | None:
        for i in self._eligible:
            if available is None or available[i]:
                return i
        return None

    def __repr__(self) -> str:
        return f"PassthroughPicker(eligible={list(self._eligible)})"


class RandomPicker:
    """RANDOM: weighted random over the available endpoints."""

    __slots__ = ("_by_index", "_cum", "_eligible", "_total", "_weights")

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        self._eligible = _eligible(endpoints)
        self._by_index = tuple(ep.weight for ep in endpoints)
        self._weights = tuple(endpoints[i].weight for i in self._eligible)
        cum: list[int] = []
        acc = 0
        for w in self._weights:
            acc += w
            cum.append(acc)
        self._cum = tuple(cum)
        self._total = acc

    def pick(
        self,
        rand: float,
        active: Sequence[int],
        available: Sequence[bool] | None = None,
        hash_key: bytes | None = None,
    ) -> int | None:
        if not self._eligible:
            return None
        rand = _clamp_rand(rand)
        k = bisect_right(self._cum, rand * self._total)
        if k >= len(self._eligible):
            k = len(self._eligible) - 1
        idx = self._eligible[k]
        if available is None or available[idx]:
            return idx
        # Slow path (the drawn endpoint is out): a weighted pick among the available ones,
        # with rand re-spread over [0, 1) from where it fell inside the drawn endpoint's
        # interval, so the overall distribution is exactly weight / available weight.
        idxs = [i for i in self._eligible if available[i]]
        if not idxs:
            return None
        lo = self._cum[k - 1] if k else 0
        rest = (rand * self._total - lo) / self._weights[k]
        return _weighted_choice(idxs, [self._by_index[i] for i in idxs], _clamp_rand(rest))

    def __repr__(self) -> str:
        pairs = dict(zip(self._eligible, self._weights, strict=True))
        return f"RandomPicker(weights={pairs})"


class _Edf:
    """Earliest-deadline-first schedule over ``(index, weight)`` entries (Envoy's
    ``EdfScheduler``): an entry of weight ``w`` is due ``1 / w`` after its last turn; ties go
    to the entry scheduled earliest.  With integer weights the deadlines are exact integers
    (``lcm(weights) / w`` per turn) so equal deadlines really tie."""

    __slots__ = ("_heap", "_lcm", "_seq")

    def __init__(self, entries: Sequence[tuple[int, int]]) -> None:
        lcm = 1
        for _, w in entries:
            lcm = math.lcm(lcm, w)
            if lcm > 1 << 62:
                lcm = 0  # fall back to float deadlines
                break
        self._lcm = lcm
        self._seq = 0
        self._heap: list[tuple[float, int, int]] = []
        for idx, w in entries:
            self._push(0, idx, w)

    def step(self, weight: float) -> float:
        if self._lcm and isinstance(weight, int):
            return self._lcm // weight
        return (self._lcm or 1) / weight

    def _push(self, now: float, idx: int, weight: float) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (now + self.step(weight), self._seq, idx))

    def pop(self) -> tuple[float, int]:
        deadline, _, idx = heapq.heappop(self._heap)
        return deadline, idx

    def push(self, deadline: float, idx: int, weight: float) -> None:
        self._push(deadline, idx, weight)

    def __len__(self) -> int:
        return len(self._heap)


def _edf_if_weighted(eligible: Sequence[int], weights: Sequence[int]) -> _Edf | None:
    """An EDF schedule when the eligible endpoints' weights differ, else None."""
    if len({weights[i] for i in eligible}) > 1:
        return _Edf([(i, weights[i]) for i in eligible])
    return None


def _edf_pick(
    edf: _Edf,
    weight_of: Sequence[int],
    available: Sequence[bool] | None,
    eff_weight: Sequence[int] | None = None,
    active: Sequence[int] | None = None,
) -> int | None:
    """Pop the earliest available entry and re-schedule it; unavailable entries popped on
    the way are re-scheduled one period after *now* (no catch-up burst when they return)."""
    skipped: list[tuple[float, int]] = []
    chosen: int | None = None
    now = 0.0
    for _ in range(len(edf)):
        deadline, idx = edf.pop()
        now = deadline
        if available is None or available[idx]:
            chosen = idx
            break
        skipped.append((deadline, idx))
    if chosen is not None:
        w: float = weight_of[chosen]
        if active is not None:
            w = weight_of[chosen] / (active[chosen] + 1) ** ACTIVE_REQUEST_BIAS
        edf.push(now, chosen, w)
    for _, idx in skipped:
        edf.push(now, idx, weight_of[idx])
    return chosen


class RoundRobinPicker:
    """ROUND_ROBIN: rotation for equal weights, EDF (weighted round robin) otherwise."""

    __slots__ = ("_edf", "_eligible", "_next", "_weights")

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        self._eligible = _eligible(endpoints)
        self._weights = tuple(ep.weight for ep in endpoints)
        self._next = -1  # -1: not started (first pick seeds the start from rand)
        self._edf = _edf_if_weighted(self._eligible, self._weights)

    def pick(
        self,
        rand: float,
        active: Sequence[int],
        available: Sequence[bool] | None = None,
        hash_key: bytes | None = None,
    ) -> int | None:
        if self._edf is not None:
            return _edf_pick(self._edf, self._weights, available)
        elig = self._eligible
        n = len(elig)
        if n == 0:
            return None
        k = self._next
        if k < 0:
            k = int(_clamp_rand(rand) * n)
        for _ in range(n):
            idx = elig[k]
            k = k + 1 if k + 1 < n else 0
            if available is None or available[idx]:
                self._next = k
                return idx
        self._next = k
        return None

    def __repr__(self) -> str:
        mode = "edf" if self._edf is not None else "rotation"
        return f"RoundRobinPicker(mode={mode}, eligible={list(self._eligible)}, next={self._next})"


class LeastRequestPicker:
    """LEAST_REQUEST: power of two choices for equal weights; EDF with effective weight
    ``weight / (active + 1) ** bias`` when weights differ (Envoy's weighted least request)."""

    __slots__ = ("_edf", "_eligible", "_weights")

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        self._eligible = _eligible(endpoints)
        self._weights = tuple(ep.weight for ep in endpoints)
        self._edf = _edf_if_weighted(self._eligible, self._weights)

    def pick(
        self,
        rand: float,
        active: Sequence[int],
        available: Sequence[bool] | None = None,
        hash_key: bytes | None = None,
    ) -> int | None:
        if self._edf is not None:
            return _edf_pick(self._edf, self._weights, available, active=active)
        elig = self._eligible
        a, b = self._two(elig, rand)
        if a is None:
            return None
        if available is not None and not (available[a] and (b is None or available[b])):
            # Slow path: choose among the available ones only (Envoy's host set is the
            # healthy hosts), with the entropy of rand left over by the first draw, so
            # every available pair stays equally likely.
            n = len(elig)
            rest = rand * (n * (n - 1)) if n > 1 else rand
            elig = tuple(i for i in elig if available[i])
            a, b = self._two(elig, rest - int(rest))
            if a is None:
                return None
        if b is not None and active[b] < active[a]:
            return b
        return a

    @staticmethod
    def _two(elig: Sequence[int], rand: float) -> tuple[int | None, int | None]:
        """Two distinct endpoints from one uniform ``rand`` (every ordered pair equally likely)."""
        n = len(elig)
        if n == 0:
            return None, None
        if n == 1:
            return elig[0], None
        k = int(_clamp_rand(rand) * (n * (n - 1)))
        i, j = divmod(k, n - 1)
        if j >= i:
            j += 1
        return elig[i], elig[j]

    def __repr__(self) -> str:
        mode = "edf" if self._edf is not None else "p2c"
        return f"LeastRequestPicker(mode={mode}, eligible={list(self._eligible)})"


class RingHashPicker:
    """CONSISTENT_HASH: Envoy's ring hash (ketama-like), built on the first pick."""

    __slots__ = ("_eligible", "_endpoints", "_hashes", "_min_size", "_owners")

    def __init__(self, endpoints: Sequence[Endpoint], ring_size: int = 1024) -> None:
        self._endpoints = tuple(endpoints)
        self._eligible = _eligible(endpoints)
        self._min_size = max(1, min(ring_size, MAX_RING_SIZE))
        self._hashes: list[int] | None = None
        self._owners: list[int] = []

    def _build(self) -> list[int]:
        """Envoy ``RingHashLoadBalancer::Ring``: ``scale`` makes the lightest endpoint get
        ``ceil(min_normalized_weight * min_ring_size)`` points; points are handed out with a
        running target so rounding never accumulates."""
        elig = self._eligible
        total = sum(self._endpoints[i].weight for i in elig)
        points: list[tuple[int, int]] = []
        if total:
            min_norm = min(self._endpoints[i].weight for i in elig) / total
            scale = min(math.ceil(min_norm * self._min_size) / min_norm, MAX_RING_SIZE)
            target = 0.0
            current = 0
            for i in elig:
                ep = self._endpoints[i]
                target += scale * ep.weight / total
                prefix = f"{ep.key}_"
                k = 0
                while current < target:
                    points.append((hash64(f"{prefix}{k}".encode()), i))
                    k += 1
                    current += 1
        points.sort()
        self._owners = [i for _, i in points]
        self._hashes = [h for h, _ in points]
        return self._hashes

    @property
    def ring_size(self) -> int:
        hashes = self._hashes if self._hashes is not None else self._build()
        return len(hashes)

    def pick(
        self,
        rand: float,
        active: Sequence[int],
        available: Sequence[bool] | None = None,
        hash_key: bytes | None = None,
    ) -> int | None:
        hashes = self._hashes if self._hashes is not None else self._build()
        size = len(hashes)
        if size == 0:
            return None
        if hash_key is None:
            pos = int(_clamp_rand(rand) * size)
        else:
            pos = bisect_left(hashes, hash64(hash_key))
            if pos == size:
                pos = 0
        owners = self._owners
        idx = owners[pos]
        if available is None or available[idx]:
            return idx
        if not any(available[i] for i in self._eligible):
            return None
        for step in range(1, size):
            idx = owners[(pos + step) % size]
            if available[idx]:
                return idx
        return None

    def __repr__(self) -> str:
        built = len(self._hashes) if self._hashes is not None else "unbuilt"
        return f"RingHashPicker(eligible={list(self._eligible)}, ring={built})"


def make_picker(cluster: Cluster) -> Picker:
    """The picker for ``cluster.lb``; called by the upstream layer once per cluster per
    snapshot."""
    eps = cluster.endpoints
    kind = cluster.lb.kind
    if kind is LbKind.ROUND_ROBIN:
        return RoundRobinPicker(eps)
    if kind is LbKind.RANDOM:
        return RandomPicker(eps)
    if kind is LbKind.PASSTHROUGH:
        return PassthroughPicker(eps)
    if kind is LbKind.CONSISTENT_HASH:
        ch = cluster.lb.hash
        return RingHashPicker(eps, ch.ring_size if ch is not None else 1024)
    return LeastRequestPicker(eps)


# --------------------------------------------------------------------------- hash keys


def cookie_value(cookie_header: str | None, name: str) -> str | None:
    """Value of cookie ``name`` in a ``Cookie`` header (``a=1; b="2"``), surrounding double
    quotes removed as Envoy does; None when absent.  The first occurrence wins."""
    if not cookie_header:
        return None
    for part in cookie_header.split(";"):
        eq = part.find("=")
        if eq < 0:
            continue
        if part[:eq].strip() == name:
            value = part[eq + 1 :].strip()
            if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
                value = value[1:-1]
            return value
    return None


def hash_key_for(ch: ConsistentHash, req: RequestInfo, source_ip: str) -> bytes | None:
    """The bytes to hash for ``req`` under Istio's ``consistentHash`` (``httpHeaderName``,
    ``httpCookie``, ``httpQueryParameterName`` or ``useSourceIp``); None when the request does
    not carry the key (the picker then picks at random with ``rand``)."""
    value: str | None
    if ch.header is not None:
        value = req.headers.get(ch.header.lower())
    elif ch.cookie is not None:
        value = cookie_value(req.headers.get("cookie"), ch.cookie)
    elif ch.query_param is not None:
        value = req.query.get(ch.query_param)
    elif ch.source_ip:
        value = source_ip or None
    else:
        value = None
    return None if value is None else value.encode("utf-8", "surrogateescape")
