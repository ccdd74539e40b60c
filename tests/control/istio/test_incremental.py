"""IncrementalBuilder: after every edit, the same answer as a from-scratch build_snapshot.

Pure: files in a temp dir, no sockets, no event loop. Each step edits the config, then
compares the incremental build with ``build_snapshot`` on the same files: the version, the
problem and warning lines, and a canonical dump of the snapshot (``repr`` keeps the order
of every mapping, which ``==`` on dicts would not check).
"""

from __future__ import annotations

import os
import shutil
import textwrap
from pathlib import Path

import pytest

from control.istio import IncrementalBuilder, TranslationCache, build_snapshot, load_paths
from control.istio.translate import translate
from meshproxy.config.model import ProxyIdentity, Snapshot

REPO = Path(__file__).resolve().parents[3]
BOOKINFO = REPO / "tests" / "data" / "istio-corpus" / "bookinfo"

REVIEWS_SE = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews}
spec:
  hosts: [reviews]
  location: MESH_INTERNAL
  ports:
  - {number: 9080, name: http, protocol: HTTP}
  resolution: STATIC
  endpoints:
  - {address: 10.0.0.1, labels: {app: reviews, version: v1}}
  - {address: 10.0.0.2, labels: {app: reviews, version: v2}, weight: 3}
  - {address: 10.0.0.3, labels: {app: reviews, version: v3}}
"""

REVIEWS_DR = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"""

REVIEWS_VS = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - route:
    - {destination: {host: reviews, subset: v1}, weight: WEIGHT1}
    - {destination: {host: reviews, subset: v2}, weight: WEIGHT2}
    retries: {attempts: 3, perTryTimeout: 2s}
"""

RATINGS = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ratings, namespace: shop}
spec:
  hosts: [ratings]
  ports:
  - {number: 9080, name: http}
  - {number: 9443, name: https, protocol: HTTPS}
  resolution: STATIC
  workloadSelector: {labels: {app: ratings}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: ratings-1, namespace: shop}
spec: {address: 10.1.0.1, labels: {app: ratings, version: v1}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings, namespace: shop}
spec:
  hosts: [ratings]
  http:
  - match: [{uri: {prefix: /v2}, sourceLabels: {app: productpage}}]
    route: [{destination: {host: ratings, port: {number: 9080}}}]
    mirror: {host: shadow.example.com}
  - route: [{destination: {host: ratings}}]
"""

WILD = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: wild}
spec:
  hosts: ["*.example.com"]
  http:
  - match: [{uri: {regex: "/x/[0-9]+"}}]
    route: [{destination: {host: api.example.com, port: {number: 8080}}}]
  - route: [{destination: {host: nowhere.example.com}}]
"""


def dump(snap: Snapshot | None) -> str:
    return repr(snap)


def check(builder: IncrementalBuilder, root: Path, proxy: ProxyIdentity) -> Snapshot | None:
    """Build both ways and assert they agree; returns the incremental snapshot."""
    inc, inc_report = builder.build([str(root)])
    full, full_report = build_snapshot([str(root)], proxy)
    assert inc_report.problems == full_report.problems
    assert inc_report.warnings == full_report.warnings
    assert dump(inc) == dump(full)
    if full is not None:
        assert inc is not None and inc.version == full.version
        assert inc == full
    return inc


def put(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))


def reviews_vs(w1: int, w2: int) -> str:
    return REVIEWS_VS.replace("WEIGHT1", str(w1)).replace("WEIGHT2", str(w2))


@pytest.mark.parametrize(
    "proxy",
    [
        ProxyIdentity(),
        ProxyIdentity(namespace="shop", labels={"app": "productpage"}),
    ],
)
def test_edit_sequence_matches_a_full_build_every_step(
    tmp_path: Path, proxy: ProxyIdentity
) -> None:
    root = tmp_path / "cfg"
    put(root / "reviews" / "se.yaml", REVIEWS_SE)
    put(root / "reviews" / "dr.yaml", REVIEWS_DR)
    put(root / "reviews" / "vs.yaml", reviews_vs(90, 10))
    put(root / "ratings.yaml", RATINGS)
    put(root / "wild.yaml", WILD)
    builder = IncrementalBuilder(proxy)
    first = check(builder, root, proxy)
    assert first is not None
    versions = {first.version}

    def step() -> Snapshot:
        snap = check(builder, root, proxy)
        assert snap is not None
        versions.add(snap.version)
        return snap

    # 1. weight change
    put(root / "reviews" / "vs.yaml", reviews_vs(50, 50))
    snap = step()
    assert builder.stats["parsed"] == 1
    # 2. a subset added to the DestinationRule, and a route to it
    dr_v3 = REVIEWS_DR + "  - {name: v3, labels: {version: v3}}\n"
    put(root / "reviews" / "dr.yaml", dr_v3)
    snap = step()
    assert "reviews.default.svc.cluster.local|v3" in snap.clusters
    put(
        root / "reviews" / "vs.yaml",
        reviews_vs(50, 50).replace("subset: v2}}]", "subset: v3}}]", 1),
    )
    step()
    # 3. a ServiceEntry endpoint removed (the subset's cluster loses it)
    put(root / "reviews" / "se.yaml", REVIEWS_SE.rsplit("  - {address: 10.0.0.3", 1)[0])
    snap = step()
    assert snap.clusters["reviews.default.svc.cluster.local|v3"].endpoints == ()
    # 4. the traffic policy changes: every cluster of the host changes, routes do not
    put(root / "reviews" / "dr.yaml", dr_v3.replace("ROUND_ROBIN", "RANDOM"))
    step()
    # 4b. a selected WorkloadEntry moves (the ServiceEntry itself is unchanged)
    put(root / "ratings.yaml", RATINGS.replace("10.1.0.1", "10.1.0.9"))
    snap = step()
    assert snap.clusters["ratings.shop.svc.cluster.local:9080"].endpoints[0].address == "10.1.0.9"
    put(root / "ratings.yaml", RATINGS)
    step()
    # 5. a file deleted (routes to its ServiceEntry's host get no endpoints, with a warning)
    (root / "reviews" / "se.yaml").unlink()
    snap = step()
    assert any("is not defined by any ServiceEntry" in w for w in snap.warnings)
    # 6. a file added, before the others in load order
    put(root / "a-first" / "se.yaml", REVIEWS_SE)
    put(root / "api.yaml", WILD.replace("name: wild", "name: api").replace('"*.', '"api.'))
    step()
    # 7. an invalid edit: no snapshot, the same problem lines; then fixed
    put(root / "ratings.yaml", RATINGS.replace("prefix: /v2", "prefx: /v2"))
    inc = check(builder, root, proxy)
    assert inc is None
    put(root / "ratings.yaml", RATINGS.replace("prefix: /v2", "prefix: /v3"))
    step()
    # 8. a document moved to another file (same content and order, other file names)
    text = (root / "ratings.yaml").read_text()
    se_doc, rest = text.split("---\n", 1)
    (root / "a-first" / "se.yaml").write_text(REVIEWS_SE + "---\n" + se_doc)
    (root / "ratings.yaml").write_text(rest)
    step()
    # 9. a file renamed, and a YAML syntax error then fixed
    os.replace(root / "wild.yaml", root / "zz-wild.yaml")
    step()
    put(root / "broken.yaml", "kind: [\n")
    assert check(builder, root, proxy) is None
    (root / "broken.yaml").unlink()
    # 10. nothing changed (files touched only): the very same snapshot object
    again = step()
    for f in root.rglob("*.yaml"):
        os.utime(f)
    assert builder.build([str(root)])[0] is again
    assert len(versions) >= 8


def test_destination_rule_precedence_edits_match_a_full_build(tmp_path: Path) -> None:
    """Which namespace's DestinationRule applies changes with rules elsewhere: the cached
    clusters and routes must follow (proxy in ``shop``, service in ``default``)."""
    proxy = ProxyIdentity(namespace="shop")
    root = tmp_path / "cfg"
    put(root / "reviews" / "se.yaml", REVIEWS_SE)
    put(root / "reviews" / "dr.yaml", REVIEWS_DR)
    put(root / "reviews" / "vs.yaml", reviews_vs(90, 10))
    builder = IncrementalBuilder(proxy)
    host = "reviews.default.svc.cluster.local"

    def policy() -> tuple[str, str] | None:
        snap = check(builder, root, proxy)
        assert snap is not None
        meta = snap.clusters[host].policy_meta
        return (meta.namespace, meta.name) if meta is not None else None

    assert policy() == ("default", "reviews")
    shop_wild = """\
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: wild, namespace: shop}
    spec:
      host: "*.svc.cluster.local"
      trafficPolicy: {loadBalancer: {simple: RANDOM}}
    """
    # the proxy namespace's wildcard beats the service namespace's exact host
    put(root / "shop-wild.yaml", shop_wild)
    assert policy() == ("shop", "wild")
    # ... and its subsets are gone with it: the routes to v1/v2 now select nothing
    snap = check(builder, root, proxy)
    assert snap is not None and snap.clusters[f"{host}|v1"].endpoints == ()
    assert any("subset 'v1' of host" in w for w in snap.warnings)
    (root / "shop-wild.yaml").unlink()
    assert policy() == ("default", "reviews")
    # the service's rule made private: the root namespace's mesh-wide rule applies
    put(root / "reviews" / "dr.yaml", REVIEWS_DR.replace("spec:\n", "spec:\n  exportTo: [.]\n"))
    put(root / "mesh.yaml", shop_wild.replace("namespace: shop", "namespace: istio-system"))
    assert policy() == ("istio-system", "wild")
    put(root / "reviews" / "dr.yaml", REVIEWS_DR)
    assert policy() == ("default", "reviews")


def test_recently_modified_files_are_rehashed_not_trusted(tmp_path: Path) -> None:
    proxy = ProxyIdentity()
    for i in range(5):
        put(tmp_path / f"svc-{i}.yaml", WILD.replace("wild", f"w{i}").replace("*", f"h{i}"))
    builder = IncrementalBuilder(proxy)
    check(builder, tmp_path, proxy)
    assert builder.stats["parsed"] == 5
    # written this instant: "racily clean", re-hashed (not parsed) while a same-size
    # rewrite could still share the mtime of the version we read
    check(builder, tmp_path, proxy)
    assert builder.stats == {"parsed": 0, "rehashed": 5, "reused": 0}


def test_a_one_file_edit_rereads_only_that_file(tmp_path: Path) -> None:
    proxy = ProxyIdentity()
    for i in range(30):
        put(tmp_path / f"svc-{i:02d}.yaml", WILD.replace("wild", f"w{i}").replace("*", f"h{i}"))
    builder = IncrementalBuilder(proxy, racy_ns=0)
    check(builder, tmp_path, proxy)
    assert builder.stats["parsed"] == 30
    check(builder, tmp_path, proxy)
    assert builder.stats == {"parsed": 0, "rehashed": 0, "reused": 30}
    edited = tmp_path / "svc-07.yaml"
    st = edited.stat()
    edited.write_text(edited.read_text().replace("8080", "8081"))  # same size
    os.utime(edited, ns=(st.st_atime_ns, st.st_mtime_ns))  # as if the clock had not moved
    snap = check(builder, tmp_path, proxy)
    assert snap is not None and "api.example.com:8081" in snap.clusters
    assert builder.stats == {"parsed": 1, "rehashed": 0, "reused": 29}


def test_the_same_bytes_are_not_parsed_again(tmp_path: Path) -> None:
    proxy = ProxyIdentity()
    shutil.copytree(BOOKINFO, tmp_path / "bookinfo")
    put(tmp_path / "se.yaml", REVIEWS_SE)
    builder = IncrementalBuilder(proxy)
    check(builder, tmp_path, proxy)
    f = tmp_path / "se.yaml"
    f.write_text(f.read_text())  # rewritten, same content: the signature changed, bytes did not
    check(builder, tmp_path, proxy)
    assert builder.stats["parsed"] == 0


def test_translation_cache_gives_equal_results_and_reuses_routes(tmp_path: Path) -> None:
    put(tmp_path / "se.yaml", REVIEWS_SE)
    put(tmp_path / "dr.yaml", REVIEWS_DR)
    put(tmp_path / "vs.yaml", reviews_vs(70, 30))
    put(tmp_path / "ratings.yaml", RATINGS)
    res = load_paths([str(tmp_path)]).resources
    proxy = ProxyIdentity(namespace="shop", labels={"app": "productpage"})
    cache = TranslationCache(proxy)
    plain = translate(res, proxy)
    a = translate(res, proxy, cache=cache)
    b = translate(res, proxy, cache=cache)
    assert repr(a) == repr(b) == repr(plain)
    vh = "reviews.default.svc.cluster.local"
    assert b.routes.exact[vh] is a.routes.exact[vh]  # reused whole
    assert len(cache.vhosts) == 2
    # a cache made for another proxy is ignored, not misused
    other = translate(res, ProxyIdentity(), cache=cache)
    assert repr(other) == repr(translate(res, ProxyIdentity()))


def test_one_big_multi_document_file_is_reparsed_piece_by_piece(tmp_path: Path) -> None:
    proxy = ProxyIdentity()
    docs = [REVIEWS_SE, REVIEWS_DR, reviews_vs(80, 20), *RATINGS.split("---\n")]
    docs += [WILD.replace("wild", f"w{i}").replace("*", f"h{i}") for i in range(20)]
    big = tmp_path / "all.yaml"

    def write(parts: list[str]) -> None:
        big.write_text("# the whole mesh\n" + "---\n".join(parts))

    write(docs)
    builder = IncrementalBuilder(proxy, racy_ns=0)
    check(builder, tmp_path, proxy)
    # one document edited: only its piece is parsed again (the rest is the same objects)
    specs = {r.name: r.spec for r in builder._files[str(big)].resources}
    docs[2] = reviews_vs(60, 40)
    write(docs)
    snap = check(builder, tmp_path, proxy)
    assert snap is not None
    assert builder.stats["parsed"] == 1
    assert len(builder._files[str(big)].pieces) == len(docs)
    again = {r.name: r.spec for r in builder._files[str(big)].resources}
    assert again.keys() == specs.keys()
    assert [n for n in specs if again[n] is not specs[n]] == ["reviews"]
    # a duplicated document, an empty one, a document end marker, a bad document then fixed
    write([*docs, docs[-1], "", "kind: Gateway\nmetadata: {name: g}\n...\n"])
    check(builder, tmp_path, proxy)
    write([*docs[:5], RATINGS.split("---\n")[2].replace("prefix:", "prefx:"), *docs[5:]])
    assert check(builder, tmp_path, proxy) is None
    write(docs)
    check(builder, tmp_path, proxy)
    # a YAML syntax error in one piece: the whole file's error line, as a full build gives it
    write([*docs[:7], "a: [1,\n", *docs[7:]])
    _, report = builder.build([str(tmp_path)])
    (problem,) = report.problems  # numbered in the whole file, not in its piece
    assert problem.startswith(f"{big}: line 77, column 1: invalid YAML: ")
    assert check(builder, tmp_path, proxy) is None
    # directives apply across markers: such a file is parsed whole
    big.write_text("%YAML 1.1\n---\n" + "---\n".join(docs))
    check(builder, tmp_path, proxy)


def test_pieces_parse_to_the_documents_of_the_whole() -> None:
    from control.istio.load import parse_yaml, split_documents

    texts = [p.read_text() for p in (REPO / "tests" / "data").rglob("*.yaml")]
    texts += ["a: 1\n---\n---\nb\n...\nc: [x]\n--- |\n  block\n---\n", "--- >\n  folded\n"]
    for text in texts:
        pieces = split_documents(text)
        assert pieces is not None and "".join(pieces) == text
        try:
            whole = parse_yaml(text)
        except Exception:
            continue
        assert [d for p in pieces for d in parse_yaml(p)] == whole
