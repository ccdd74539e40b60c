"""What keeps a big table cheap: the per-snapshot authority memo of
``ProxyContext.lookup`` (bounded by the snapshot's names, never by the Host headers clients make
up, and big enough for every host of a big table), the GC hook the data plane installs, and
``/clusters`` staying lazy for clusters that served nothing.

No sockets: ``ProxyContext`` only needs a running loop, so these are plain async tests."""

from __future__ import annotations

import gc

from meshproxy.config.model import RouteTable, Snapshot
from meshproxy.dataplane import DataPlane
from meshproxy.metrics import Metrics
from meshproxy.proxy import (
    AUTHORITY_CACHE_BASE,
    AUTHORITY_CACHE_PER_NAME,
    ProxyContext,
    authority_cache_limit,
)
from meshproxy.settings import Settings
from meshproxy.state import State
from meshproxy.upstream.pool import Pools
from tests.support.fakes import FakeMetrics, cluster, snapshot, to_cluster, vhost


def big_snapshot(hosts: int, version: str = "v1") -> Snapshot:
    c = cluster("up.local", [8080])
    vhs = [vhost(f"svc-{i}.bench.local", (to_cluster("up.local"),)) for i in range(hosts)]
    return snapshot(vhs, [c], version)


def context(snap: Snapshot) -> ProxyContext:
    state = State()
    state.apply(snap)
    metrics = FakeMetrics()
    settings = Settings()
    return ProxyContext(state, Pools(metrics, settings), metrics, settings)  # type: ignore[arg-type]


def test_limit_scales_with_the_snapshot_names() -> None:
    small = big_snapshot(3)
    assert authority_cache_limit(small) == AUTHORITY_CACHE_BASE + AUTHORITY_CACHE_PER_NAME * 3
    big = big_snapshot(10_000)
    assert authority_cache_limit(big) == AUTHORITY_CACHE_BASE + AUTHORITY_CACHE_PER_NAME * 10_000
    vh = vhost("w", (to_cluster("up.local"),))
    wild = Snapshot(version="w", routes=RouteTable(wildcards={".a.com": vh, ".b.com": vh}))
    assert authority_cache_limit(wild) == AUTHORITY_CACHE_BASE + AUTHORITY_CACHE_PER_NAME * 2


async def test_every_host_of_a_big_table_is_memoised() -> None:
    hosts = AUTHORITY_CACHE_BASE + 6_000  # more than the fixed allowance alone
    snap = big_snapshot(hosts)
    ctx = context(snap)
    first = [ctx.lookup(snap, f"svc-{i}.bench.local") for i in range(hosts)]
    assert all(d.vh is not None for d in first)
    assert len(ctx.cache) == hosts
    # a second pass over the rotation is answered from the memo: the same objects come back
    again = [ctx.lookup(snap, f"svc-{i}.bench.local") for i in range(hosts)]
    assert all(a is b for a, b in zip(first, again, strict=True))
    # with a port, each host is one more authority, and still fits
    for i in range(hosts):
        ctx.lookup(snap, f"svc-{i}.bench.local:80")
    assert len(ctx.cache) == 2 * hosts
    assert ctx.lookup(snap, "svc-7.bench.local:80") is ctx.cache["svc-7.bench.local:80"]


async def test_made_up_hosts_do_not_grow_the_memo() -> None:
    snap = big_snapshot(3)
    ctx = context(snap)
    limit = authority_cache_limit(snap)
    peak = 0
    for i in range(3 * limit + 17):
        d = ctx.lookup(snap, f"junk-{i}.example")
        assert d.vh is None  # unknown: 404 NR
        peak = max(peak, len(ctx.cache))
    assert peak == limit
    assert len(ctx.cache) <= limit
    # real hosts are still resolved (and memoised again) after the flood
    d = ctx.lookup(snap, "svc-1.bench.local")
    assert d.vh is not None and d.vh.name == "svc-1.bench.local"
    assert ctx.cache["svc-1.bench.local"] is d


async def test_memo_is_per_snapshot() -> None:
    old = big_snapshot(5, "v1")
    ctx = context(old)
    d_old = ctx.lookup(old, "svc-1.bench.local")
    new = big_snapshot(2, "v2")  # svc-4 is gone in the new config
    ctx.state.apply(new)
    d_new = ctx.lookup(new, "svc-1.bench.local")
    assert d_new is not d_old and d_new.vh is new.routes.exact["svc-1.bench.local"]
    assert ctx.lookup(new, "svc-4.bench.local").vh is None
    assert set(ctx.cache) == {"svc-1.bench.local", "svc-4.bench.local"}
    assert ctx.cache_limit == authority_cache_limit(new)


async def test_dataplane_installs_the_gc_hook_while_it_runs() -> None:
    metrics = Metrics()
    dp = DataPlane(State(), metrics, Settings())
    assert metrics.gc in gc.callbacks
    gc.collect(0)
    assert metrics.gc.collections[0] >= 1
    await dp.close()
    assert metrics.gc not in gc.callbacks


async def test_clusters_view_builds_no_live_state_for_idle_clusters() -> None:
    clusters = [cluster(f"c{i}", [9000 + i]) for i in range(500)]
    snap = snapshot([vhost("h", (to_cluster("c0"),))], clusters)
    state = State()
    state.apply(snap)
    dp = DataPlane(state, FakeMetrics(), Settings())  # type: ignore[arg-type]
    try:
        view = dp.clusters_view()["clusters"]
        assert [c["name"] for c in view] == [f"c{i}" for i in range(500)]
        assert view[7]["endpoints"] == [
            {
                "address": "127.0.0.1:9007",
                "healthy": True,
                "ejected": False,
                "ejections": 0,
                "active_requests": 0,
            }
        ]
        assert dp._pools.states() == {}  # nothing built for clusters that served nothing
    finally:
        await dp.close()
