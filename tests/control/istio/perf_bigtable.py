"""Profile of the Istio config pipeline on the issue's big table (not collected by pytest).

Theory of operation
-------------------
Generates 10,000 VirtualServices (5 ``http`` rules each with ``uri.prefix`` matches, hosts
``svc-N.bench.local``, a response header per rule, as ``benchmarks/bigtable.py`` does) plus a
ServiceEntry per host, in two layouts under a temp dir: ``many/`` (one file per
VirtualService + ServiceEntry pair) and ``one/`` (everything in one multi-document file).
For each layout it times, in CPU seconds of this process (``time.process_time``; the
machine is shared, wall time is printed too): reading + YAML parsing, decoding + validation
(with the cross-resource checks), translation, and a whole :func:`build_snapshot`; then an
:class:`IncrementalBuilder` cold build and rebuilds after editing one file (``many/``: a
weight change in one VirtualService file; ``one/``: the same edit in the big file).

    python tests/control/istio/perf_bigtable.py [--hosts N] [--profile STAGE] [--layout L]

``--profile`` runs that stage (``yaml``, ``decode``, ``translate``, ``build``, ``rebuild``)
under cProfile and prints the top functions.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from control.istio import IncrementalBuilder, build_snapshot
from control.istio.load import (
    _relevance_warnings,
    load_documents,
    paused_gc,
    read_documents,
    yaml_files,
)
from control.istio.resources import Resources
from control.istio.translate import translate
from control.istio.validate import ValidationReport, check_references
from meshproxy.config.model import ProxyIdentity

RULES = 5


def vs_yaml(i: int, weight: int = 100) -> str:
    rules = "".join(
        f"""  - name: r{k}
    match:
    - uri:
        prefix: {f"/api/v{k}/" if k < RULES - 1 else "/"}
    route:
    - destination:
        host: svc-{i}.bench.local
        port:
          number: 80
      weight: {weight}
    headers:
      response:
        set:
          x-bench-gen: "1"
"""
        for k in range(RULES)
    )
    return f"""apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: svc-{i}
  namespace: default
spec:
  hosts:
  - svc-{i}.bench.local
  http:
{rules}"""


def se_yaml(i: int) -> str:
    return f"""apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: svc-{i}
  namespace: default
spec:
  hosts: [svc-{i}.bench.local]
  location: MESH_EXTERNAL
  ports:
  - number: 80
    name: http
    protocol: HTTP
  resolution: STATIC
  endpoints:
  - address: 10.{i // 250 % 250}.{i % 250}.1
    ports:
      http: 8080
"""


def pair(i: int, weight: int = 100) -> str:
    return vs_yaml(i, weight) + "---\n" + se_yaml(i)


def generate(root: Path, hosts: int) -> tuple[Path, Path]:
    many = root / "many"
    many.mkdir()
    for i in range(hosts):
        (many / f"svc-{i:05d}.yaml").write_text(pair(i))
    one = root / "one"
    one.mkdir()
    (one / "all.yaml").write_text("---\n".join(pair(i) for i in range(hosts)))
    return many, one


class Timer:
    def __init__(self, profile: str | None) -> None:
        self.profile = profile

    def __call__(self, stage: str, fn: Callable[[], Any]) -> tuple[Any, float]:
        prof = cProfile.Profile() if self.profile == stage else None
        w0, c0 = time.perf_counter(), time.process_time()
        if prof is not None:
            prof.enable()
        with paused_gc():  # as the pipeline itself runs
            out = fn()
        if prof is not None:
            prof.disable()
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        print(f"  {stage:<28} {cpu:7.2f} s CPU  ({wall:6.2f} s wall)", flush=True)
        if prof is not None:
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        return out, cpu


def stages(path: Path, timer: Timer) -> None:
    proxy = ProxyIdentity()
    report = ValidationReport()

    def parse() -> list[tuple[str, list[Any]]]:
        return [(f, read_documents(f, report)) for f in yaml_files([str(path)], report)]

    docs, _ = timer("yaml (read + parse)", parse)

    def decode() -> Resources:
        items: list[Any] = []
        for f, d in docs:
            items.extend(load_documents(f, d, report, start_order=len(items)))
        res = Resources.of(items)
        check_references(res, report)
        _relevance_warnings(res, report)
        return res

    resources, _ = timer("decode + validate", decode)
    assert not report.problems, report.problems[:5]
    snap, _ = timer("translate", lambda: translate(resources, proxy))
    routes = sum(len(vh.routes) for vh in {id(v): v for v in snap.routes.exact.values()}.values())
    print(f"  -> {len(resources)} resources, {routes} routes, {len(snap.clusters)} clusters")
    (full, rep), _ = timer("build_snapshot (total)", lambda: build_snapshot([str(path)], proxy))
    assert full is not None, rep.problems[:5]


def incremental(path: Path, edit: Callable[[int], None], timer: Timer) -> None:
    proxy = ProxyIdentity()
    builder = IncrementalBuilder(proxy)
    (snap, rep), _ = timer("IncrementalBuilder cold", lambda: builder.build([str(path)]))
    assert snap is not None, rep.problems[:5]
    (again, _r), _ = timer("rebuild, nothing changed", lambda: builder.build([str(path)]))
    assert again is not None and again.version == snap.version
    for n in range(2):
        edit(n)
        (new, rep), _ = timer("rebuild after a 1-file edit", lambda: builder.build([str(path)]))
        assert new is not None and new.version != snap.version, rep.problems[:5]
        snap = new


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=int, default=10_000)
    ap.add_argument("--layout", choices=("many", "one", "both"), default="both")
    ap.add_argument("--profile", default=None)
    args = ap.parse_args()
    timer = Timer(args.profile)
    with tempfile.TemporaryDirectory() as tmp:
        many, one = generate(Path(tmp), args.hosts)
        if args.layout in ("many", "both"):
            print(f"{args.hosts} hosts, one file per VirtualService + ServiceEntry:")
            stages(many, timer)

            def edit_many(n: int) -> None:
                f = many / f"svc-{args.hosts // 2:05d}.yaml"
                f.write_text(pair(args.hosts // 2, weight=50 + n))

            incremental(many, edit_many, timer)
        if args.layout in ("one", "both"):
            print(f"{args.hosts} hosts, everything in one file:")
            stages(one, timer)
            big = one / "all.yaml"

            def edit_one(n: int) -> None:
                text = big.read_text()
                i = args.hosts // 2
                big.write_text(text.replace(pair(i, 100 - n), pair(i, 99 - n), 1))
                os.utime(big)

            incremental(one, edit_one, timer)


if __name__ == "__main__":
    main()
