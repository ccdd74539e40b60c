"""Outlier detection for one cluster: Envoy's consecutive-error detectors as Istio configures them.

Theory of operation
-------------------
Every endpoint of a cluster has a :class:`HostHealth` (counters and ejection state). It lives on
the endpoint's run-time state, not in the detector, so a config reload that rebuilds the
cluster's :class:`OutlierDetector` keeps counters, ejections and multipliers. The detector is a
small synchronous state machine with no clock and no I/O: the data plane feeds it outcomes and
the interval timer's ``now``, and reads back :attr:`OutlierDetector.available` (the mask the
pickers of :mod:`meshproxy.core.balance` take), :class:`Ejection` records (for the metric and
the log) and :meth:`OutlierDetector.host_info` (for ``/clusters``).

Who calls what:

* ``on_status(i, status, now)`` -- each upstream response head from endpoint ``i``.
* ``on_local_failure(i, kind, now)`` -- an attempt to ``i`` failed before a response head:
  ``"connect"`` (refused, unreachable, connect timeout), ``"timeout"`` (per-try or route timeout
  while waiting for the head), ``"reset"`` (connection closed before the head).
* ``on_local_success(i)`` -- ``i``'s connection carried the request to a response head.
* ``sweep(now)`` -- every ``interval`` seconds, from one timer per cluster.

Semantics (Envoy ``source/common/upstream/outlier_detection_impl.cc``; Istio
``applyOutlierDetection`` in ``pilot/pkg/networking/core/cluster_traffic_policy.go``):

* A 5xx status increments the host's consecutive-5xx counter; a 502/503/504 also increments its
  consecutive-gateway counter, any other 5xx resets the gateway counter; any other status resets
  both. A detector fires when its counter becomes *equal* to its threshold (``==``, as Envoy:
  a counter that runs past the threshold while the host is already ejected does not fire again
  until a success, the host's un-ejection, or a refused ejection resets it). When both fire on
  one response, the gateway detector is handled first (Envoy posts it first).
* Istio enforces a detector at 100 % when its threshold is > 0 and not at all when it is 0; an
  unset ``consecutiveGatewayErrors`` leaves Envoy's gateway detector unenforced. Here a
  threshold of ``None`` or 0 disables the detector (success-rate and failure-percentage
  detection, which Istio switches off, are not implemented).
* Local-origin failures: without ``splitExternalLocalOriginErrors`` they count as the status
  Envoy maps them to -- connect failure and reset 503, timeout 504 -- in the 5xx/gateway
  counters. With the split they count only in the local-origin counter (threshold
  ``consecutiveLocalOriginFailures``), which a response head resets. Envoy resets it when a
  connection is handed to the request (pool ready), which means a host that accepts connections
  but never answers is never ejected in split mode; resetting at the response head instead
  makes such a host eject after the threshold of consecutive timeouts/resets.
* When a detector fires on a host that is not ejected, the triggering counter is reset and the
  host is ejected if the cluster may eject one more: Envoy's exact check
  ``100 * (ejected + 1) / hosts <= maxEjectionPercent``. Ejection increments the host's
  multiplier while ``multiplier * base < max + base``; the ejection lasts
  ``min(baseEjectionTime * multiplier, max)``, where ``max`` is Envoy's default
  ``max_ejection_time`` (300 s) or ``baseEjectionTime`` if larger (Istio has no field for it).
  So a host ejected again and again stays out 30, 60, 90 ... 300 s.
* ``sweep`` un-ejects every host whose ejection has lasted its duration (un-ejection resets the
  three counters) and then, for every host not ejected that was un-ejected at least one
  interval ago, decrements the multiplier by one. A host un-ejected by this very sweep does not
  decay in it. Time comparisons allow :data:`TIMER_SLACK` so a timer that fires a millisecond
  early (uvloop rounds delays to milliseconds) does not cost a whole interval.
* ``minHealthPercent`` is Envoy's healthy panic threshold (Istio always sets it, 0 when unset):
  while ``100 * healthy / hosts < minHealthPercent`` the cluster is in panic and the load
  balancer ignores ejections (``available`` is None). 0 never panics.

Beyond Envoy -- the small-pool rule: under Istio's default ``maxEjectionPercent`` of 10 %, a
pool of fewer than 10 endpoints can never eject anything in Envoy (one host of 3 is 33 % >
10 %), so one bad endpoint keeps failing a third of the requests forever. Here an ejection that
Envoy's check refuses is still made while the cluster has fewer than ``min_ejectable`` hosts
ejected (``Settings.outlier_min_ejectable``, default 1) and at least one host would stay
un-ejected: 3 endpoints at 10 % may eject one; 2 endpoints at 10 % may eject one; 1 endpoint
never. The rule only adds ejections, never removes any Envoy would make (2 endpoints at 100 %
may both be ejected, as in Envoy). ``min_ejectable=0`` is Envoy exactly.

``available`` is kept up to date on every ejection, un-ejection and panic change; it is None
whenever nothing is ejected, so the hot path neither allocates nor scans.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from meshproxy.config.model import OutlierPolicy

__all__ = [
    "DEFAULT_MAX_EJECTION_TIME",
    "LOCAL_FAILURE_STATUS",
    "REASON_5XX",
    "REASON_GATEWAY",
    "REASON_LOCAL",
    "TIMER_SLACK",
    "Ejection",
    "HostHealth",
    "OutlierDetector",
]

DEFAULT_MAX_EJECTION_TIME = 300.0  # Envoy's max_ejection_time default (10 x 30 s base)
# How early the interval timer may fire and still count as a full interval / a full ejection.
TIMER_SLACK = 0.005

REASON_5XX = "consecutive_5xx"
REASON_GATEWAY = "consecutive_gateway_failure"
REASON_LOCAL = "consecutive_local_origin_failure"

# Envoy's resultToHttpCode(): LocalOriginConnectFailed -> 503 (the router reports an upstream
# reset as a connect failure too), LocalOriginTimeout -> 504.
LOCAL_FAILURE_STATUS: dict[str, int] = {"connect": 503, "reset": 503, "timeout": 504}


class HostHealth:
    """Outlier state of one endpoint; survives cluster redefinitions (the data plane carries it
    over to the endpoint's new run-time state when the endpoint's key is unchanged)."""

    __slots__ = (
        "consecutive_5xx",
        "consecutive_gateway",
        "consecutive_local",
        "ejected",
        "ejected_at",
        "ejections_total",
        "last_reason",
        "multiplier",
        "unejected_at",
    )

    def __init__(self) -> None:
        self.consecutive_5xx = 0
        self.consecutive_gateway = 0
        self.consecutive_local = 0
        self.ejected = False
        self.ejected_at = 0.0
        self.multiplier = 0  # Envoy's ejectTimeBackoff
        self.ejections_total = 0
        self.last_reason = ""
        self.unejected_at: float | None = None  # None: never un-ejected

    def __repr__(self) -> str:
        state = f"ejected@{self.ejected_at:g}" if self.ejected else "ok"
        return (
            f"HostHealth({state}, 5xx={self.consecutive_5xx}, gw={self.consecutive_gateway}, "
            f"local={self.consecutive_local}, multiplier={self.multiplier}, "
            f"ejections={self.ejections_total})"
        )


class Ejection(NamedTuple):
    """One ejection the detector made: the data plane counts it and logs it."""

    index: int
    reason: str  # REASON_5XX | REASON_GATEWAY | REASON_LOCAL
    duration: float  # seconds this ejection lasts (un-ejected at the first sweep after)


def _threshold(value: int | None) -> int:
    """0 = detector disabled (Istio's enforcing 0); a counter >= 1 never equals it."""
    return value if value is not None and value > 0 else 0


class OutlierDetector:
    """Consecutive-error outlier detection over one cluster's endpoints (index = position in
    ``cluster.endpoints``). Built by the data plane for each cluster that has an
    :class:`OutlierPolicy`, over that cluster's :class:`HostHealth` objects (fresh or carried
    over). ``available`` is read by the picker on every pick."""

    __slots__ = (
        "_base",
        "_ejected",
        "_gw",
        "_hosts",
        "_interval",
        "_local",
        "_mask",
        "_max_percent",
        "_max_time",
        "_min_ejectable",
        "_panic",
        "_panic_threshold",
        "_split",
        "_x5xx",
        "available",
        "policy",
    )

    def __init__(
        self, policy: OutlierPolicy, hosts: Sequence[HostHealth], *, min_ejectable: int = 1
    ) -> None:
        if min_ejectable < 0:
            raise ValueError(f"min_ejectable must be >= 0, got {min_ejectable}")
        self.policy = policy
        self._hosts = hosts
        self._x5xx = _threshold(policy.consecutive_5xx)
        self._gw = _threshold(policy.consecutive_gateway_errors)
        self._split = policy.split_external_local_origin_errors
        self._local = _threshold(policy.consecutive_local_origin_failures) if self._split else 0
        self._interval = policy.interval
        self._base = policy.base_ejection_time
        self._max_time = max(DEFAULT_MAX_EJECTION_TIME, policy.base_ejection_time)
        self._max_percent = min(100, max(0, policy.max_ejection_percent))
        self._panic_threshold = min(100, max(0, policy.min_health_percent))
        self._min_ejectable = min_ejectable
        self._mask = [not h.ejected for h in hosts]
        self._ejected = len(hosts) - sum(self._mask)
        self._panic = False
        self.available: list[bool] | None = None
        self._refresh()

    # ------------------------------------------------------------------ outcomes (hot path)

    def on_status(self, i: int, status: int, now: float) -> Ejection | None:
        """An upstream response head with ``status`` arrived from host ``i`` (called by the
        attempt loop for every head, including those of retried attempts)."""
        h = self._hosts[i]
        if self._split:
            h.consecutive_local = 0
        if status < 500 or status > 599:
            h.consecutive_5xx = 0
            h.consecutive_gateway = 0
            return None
        return self._count_5xx(i, h, status, now)

    def on_local_failure(self, i: int, kind: str, now: float) -> Ejection | None:
        """An attempt to host ``i`` failed before a response head; ``kind`` is ``"connect"``,
        ``"timeout"`` or ``"reset"`` (see the module docstring for how each counts)."""
        status = LOCAL_FAILURE_STATUS.get(kind)
        if status is None:
            raise ValueError(f"unknown local failure kind {kind!r}")
        h = self._hosts[i]
        if not self._split:
            return self._count_5xx(i, h, status, now)
        h.consecutive_local += 1
        if h.consecutive_local == self._local:
            return self._detected(i, h, REASON_LOCAL, now)
        return None

    def on_local_success(self, i: int) -> None:
        """Host ``i``'s connection carried the request to a response head (``on_status``
        implies it). Resets the local-origin counter when errors are split; no-op otherwise."""
        if self._split:
            self._hosts[i].consecutive_local = 0

    def _count_5xx(self, i: int, h: HostHealth, status: int, now: float) -> Ejection | None:
        gateway_hit = False
        if 502 <= status <= 504:
            h.consecutive_gateway += 1
            gateway_hit = h.consecutive_gateway == self._gw
        else:
            h.consecutive_gateway = 0
        h.consecutive_5xx += 1
        x5xx_hit = h.consecutive_5xx == self._x5xx
        ejection = None
        if gateway_hit:
            ejection = self._detected(i, h, REASON_GATEWAY, now)
        if x5xx_hit:
            second = self._detected(i, h, REASON_5XX, now)
            if ejection is None:
                ejection = second
        return ejection

    # ------------------------------------------------------------------ ejection

    def _detected(self, i: int, h: HostHealth, reason: str, now: float) -> Ejection | None:
        """A detector fired (Envoy's onConsecutiveErrorWorker): ignored for an ejected host;
        otherwise the triggering counter is reset whether or not the ejection is allowed."""
        if h.ejected:
            return None
        ejection = self._eject(i, h, reason, now) if self._may_eject() else None
        if reason == REASON_5XX:
            h.consecutive_5xx = 0
        elif reason == REASON_GATEWAY:
            h.consecutive_gateway = 0
        else:
            h.consecutive_local = 0
        return ejection

    def _may_eject(self) -> bool:
        n = len(self._hosts)
        after = self._ejected + 1
        if 100 * after <= self._max_percent * n:  # Envoy: 100.0 * (ejected + 1) / n <= max
            return True
        return after <= self._min_ejectable and after < n

    def _eject(self, i: int, h: HostHealth, reason: str, now: float) -> Ejection:
        h.ejected = True
        h.ejected_at = now
        h.ejections_total += 1
        h.last_reason = reason
        if h.multiplier * self._base < self._max_time + self._base:
            h.multiplier += 1
        self._mask[i] = False
        self._ejected += 1
        self._refresh()
        return Ejection(i, reason, self._duration(h))

    def _duration(self, h: HostHealth) -> float:
        return min(self._base * h.multiplier, self._max_time)

    def _refresh(self) -> None:
        n = len(self._hosts)
        healthy = n - self._ejected
        # Envoy isHostSetInPanic: healthy_percent < threshold (an empty set is 0 % healthy)
        self._panic = 100 * healthy < self._panic_threshold * n if n else self._panic_threshold > 0
        self.available = self._mask if self._ejected and not self._panic else None

    # ------------------------------------------------------------------ interval timer

    def sweep(self, now: float) -> list[int]:
        """The interval timer (every ``policy.interval`` seconds): un-eject the hosts whose
        ejection has run out and decay the multiplier of hosts healthy for an interval.
        Returns the indices un-ejected, for the log.

        The same pass recounts the ejected hosts from the :class:`HostHealth` objects, so an
        ejection made through another detector over shared objects (a request that started
        before a reload reporting to the old cluster state) is adopted within an interval."""
        unejected: list[int] = []
        mask = self._mask
        ejected = 0
        healthy_for = self._interval - TIMER_SLACK
        for i, h in enumerate(self._hosts):
            if h.ejected:
                if self._duration(h) <= now - h.ejected_at + TIMER_SLACK:
                    h.ejected = False
                    h.unejected_at = now
                    h.consecutive_5xx = 0
                    h.consecutive_gateway = 0
                    h.consecutive_local = 0
                    mask[i] = True
                    unejected.append(i)
                else:
                    mask[i] = False
                    ejected += 1
            else:
                mask[i] = True
                # Envoy: healthy and un-ejected at least an interval ago (so never in the
                # sweep that un-ejected it)
                back = h.unejected_at
                if h.multiplier and back is not None and now - back >= healthy_for:
                    h.multiplier -= 1
        if unejected or ejected != self._ejected:
            self._ejected = ejected
            self._refresh()
        return unejected

    # ------------------------------------------------------------------ reading

    @property
    def ejected_count(self) -> int:
        """Hosts currently ejected (whether or not the cluster is in panic)."""
        return self._ejected

    @property
    def panic(self) -> bool:
        """True while fewer than ``min_health_percent`` % of hosts are un-ejected."""
        return self._panic

    def host_info(self, i: int, now: float) -> dict[str, object]:
        """Host ``i``'s outlier state for ``/clusters``. ``uneject_in`` is the seconds until
        the ejection has run out (the host returns at the first sweep after that); 0 when
        not ejected."""
        h = self._hosts[i]
        remaining = max(0.0, h.ejected_at + self._duration(h) - now) if h.ejected else 0.0
        return {
            "ejected": h.ejected,
            "ejections_total": h.ejections_total,
            "multiplier": h.multiplier,
            "consecutive_5xx": h.consecutive_5xx,
            "consecutive_gateway_failure": h.consecutive_gateway,
            "consecutive_local_origin_failure": h.consecutive_local,
            "last_reason": h.last_reason,
            "uneject_in": round(remaining, 3),
        }

    def __repr__(self) -> str:
        return (
            f"OutlierDetector(hosts={len(self._hosts)}, ejected={self._ejected}, "
            f"panic={self._panic}, 5xx={self._x5xx}, gateway={self._gw}, "
            f"local={self._local if self._split else 'unsplit'}, "
            f"max_percent={self._max_percent}, min_ejectable={self._min_ejectable})"
        )
