"""meshproxy.workers: merging the workers' /clusters answers (pure)."""

from __future__ import annotations

from meshproxy.workers import merge_clusters


def _view(active: int, ejected: bool, peak: int, retries: int) -> dict[str, object]:
    return {
        "clusters": [
            {
                "name": "svc",
                "endpoints": [
                    {
                        "address": "127.0.0.1:1",
                        "healthy": not ejected,
                        "ejected": ejected,
                        "ejections": int(ejected),
                        "active_requests": active,
                    }
                ],
                "circuit_breakers": {
                    "rq_active": active,
                    "retries_active": retries,
                    "retries_peak": peak,
                },
            }
        ]
    }


def test_merge_sums_loads_keeps_the_largest_peak_and_any_ejection() -> None:
    merged = merge_clusters([_view(2, False, 3, 1), _view(5, True, 1, 0)])
    (c,) = merged["clusters"]
    (ep,) = c["endpoints"]
    assert ep["active_requests"] == 7 and ep["ejections"] == 1
    assert ep["ejected"] is True and ep["healthy"] is False
    assert c["circuit_breakers"] == {"rq_active": 7, "retries_active": 1, "retries_peak": 3}


def test_merge_does_not_alias_the_first_workers_answer() -> None:
    first = _view(1, False, 1, 0)
    merge_clusters([first, _view(1, False, 2, 0)])
    cb = first["clusters"][0]["circuit_breakers"]  # type: ignore[index]
    assert cb == {"rq_active": 1, "retries_active": 0, "retries_peak": 1}
