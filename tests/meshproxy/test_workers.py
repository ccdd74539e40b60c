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


def test_workers_admin_and_the_supervisors_ports_are_out_of_inbound_captures_reach() -> None:
    """Inbound capture forwards a redirected connection to 127.0.0.1:<original port>: a
    worker's private admin listens on another loopback address, and the supervisor's fixed
    admin / health / metrics ports go to each worker as ports it must never forward to."""
    from meshproxy.cli import RunOptions, build_parser
    from meshproxy.workers import Supervisor

    opts = RunOptions(
        config=("x",),
        workers=2,
        admin=("127.0.0.1", 9901),
        health=("0.0.0.0", 15021),
        metrics=("0.0.0.0", 0),  # chosen by the OS later: nothing to pass
        inbound=("0.0.0.0", 15006),
        app=("127.0.0.1", 8080),
    )
    argv = Supervisor(opts, ("127.0.0.1", 15001), ("0.0.0.0", 15006)).worker_argv(1)
    assert argv[argv.index("--admin") + 1] == "127.0.0.2:0"
    ns = build_parser().parse_args(argv[3:])  # after: python -m meshproxy
    assert ns.own_ports == [9901, 15021]
