"""Unit tests for meshproxy.core.routing: pure, no sockets, no event loop."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping

import pytest

from meshproxy.config.model import (
    HeaderOps,
    Match,
    MatchKind,
    Meta,
    Redirect,
    Rewrite,
    Route,
    RouteTable,
    StringMatch,
    VirtualHost,
    WeightedCluster,
)
from meshproxy.core.routing import (
    RequestInfo,
    apply_header_ops,
    find_virtual_host,
    matches,
    pick_cluster,
    redirect_response,
    rewritten_path,
    select_route,
    split_path,
    string_match,
)

META = Meta(kind="VirtualService", name="test")


def req(
    path: str = "/",
    *,
    method: str = "GET",
    host: str = "reviews",
    port: int | None = None,
    scheme: str = "http",
    headers: Mapping[str, str] | None = None,
    authority: str | None = None,
) -> RequestInfo:
    if authority is None:
        authority = host if port is None else f"{host}:{port}"
    return RequestInfo(
        method=method,
        path=path,
        host=host,
        port=port,
        scheme=scheme,
        headers=headers or {},
        authority=authority,
    )


def exact(v: str, ignore_case: bool = False) -> StringMatch:
    return StringMatch(MatchKind.EXACT, v.lower() if ignore_case else v, ignore_case)


def prefix(v: str, ignore_case: bool = False) -> StringMatch:
    return StringMatch(MatchKind.PREFIX, v.lower() if ignore_case else v, ignore_case)


def regex(v: str, ignore_case: bool = False) -> StringMatch:
    return StringMatch(
        MatchKind.REGEX, v, ignore_case, re.compile(v, re.IGNORECASE if ignore_case else 0)
    )


PRESENT = StringMatch(MatchKind.PRESENT)


def route(name: str, *ms: Match, **kw: object) -> Route:
    kw.setdefault("clusters", (WeightedCluster(cluster=f"{name}-c", weight=100, host=name),))
    kw.setdefault("total_weight", 100)
    return Route(name=name, meta=META, matches=ms, **kw)  # type: ignore[arg-type]


def vhost(name: str, *routes: Route) -> VirtualHost:
    return VirtualHost(name=name, meta=META, domains=(name,), routes=routes)


# --------------------------------------------------------------------------- string_match


class TestStringMatch:
    def test_exact(self) -> None:
        assert string_match(exact("/a"), "/a")
        assert not string_match(exact("/a"), "/a/")
        assert not string_match(exact("/a"), "/A")

    def test_prefix(self) -> None:
        assert string_match(prefix("/api"), "/api/v1")
        assert string_match(prefix("/api"), "/api")
        assert not string_match(prefix("/api"), "/ap")

    def test_regex_is_full_match(self) -> None:
        sm = regex(r"/v[0-9]+")
        assert string_match(sm, "/v12")
        assert not string_match(sm, "/v12/x")  # search would match; full match must not
        assert not string_match(sm, "x/v1")

    def test_regex_compiled_lazily_when_missing(self) -> None:
        assert string_match(StringMatch(MatchKind.REGEX, "a+b"), "aab")
        assert not string_match(StringMatch(MatchKind.REGEX, "a+b"), "aabc")

    def test_present(self) -> None:
        assert string_match(PRESENT, "")
        assert string_match(PRESENT, "x")
        assert not string_match(PRESENT, None)

    def test_absent_never_matches(self) -> None:
        for sm in (exact(""), prefix(""), regex(".*"), PRESENT):
            assert not string_match(sm, None)

    def test_ignore_case(self) -> None:
        assert string_match(exact("/Api", ignore_case=True), "/API")
        assert string_match(prefix("/API", ignore_case=True), "/api/x")
        assert string_match(regex("/ab+", ignore_case=True), "/ABB")
        assert not string_match(exact("/api"), "/API")


# --------------------------------------------------------------------------- matches


class TestMatches:
    def test_empty_match_matches_everything(self) -> None:
        assert matches(Match(), req("/anything?x=1"))

    def test_uri_ignores_query(self) -> None:
        m = Match(uri=exact("/reviews"))
        assert matches(m, req("/reviews?id=1"))
        assert matches(m, req("/reviews"))
        assert not matches(m, req("/reviews/1?id=1"))

    def test_uri_regex_does_not_see_query(self) -> None:
        m = Match(uri=regex("/r/[0-9]+"))
        assert matches(m, req("/r/42?q=abc"))

    def test_method(self) -> None:
        m = Match(method=exact("POST"))
        assert matches(m, req(method="POST"))
        assert not matches(m, req(method="GET"))

    def test_scheme(self) -> None:
        m = Match(scheme=exact("https"))
        assert matches(m, req(scheme="https"))
        assert not matches(m, req(scheme="http"))

    def test_authority_is_matched_with_port(self) -> None:
        m = Match(authority=exact("reviews:9080"))
        assert matches(m, req(port=9080))
        assert not matches(m, req(port=None))
        assert matches(Match(authority=prefix("reviews")), req(port=9080))

    def test_port(self) -> None:
        m = Match(port=9080)
        assert matches(m, req(port=9080))
        assert not matches(m, req(port=9081))

    def test_port_defaults_from_scheme(self) -> None:
        assert matches(Match(port=80), req(port=None))
        assert not matches(Match(port=80), req(port=None, scheme="https"))
        assert matches(Match(port=443), req(port=None, scheme="https"))

    def test_headers(self) -> None:
        m = Match(headers=(("end-user", exact("jason")), ("x-ver", prefix("v2"))))
        assert matches(m, req(headers={"end-user": "jason", "x-ver": "v2.1"}))
        assert not matches(m, req(headers={"end-user": "jason"}))
        assert not matches(m, req(headers={"end-user": "json", "x-ver": "v2"}))

    def test_header_regex_and_present(self) -> None:
        m = Match(headers=(("cookie", regex(".*user=jason.*")), ("x-canary", PRESENT)))
        assert matches(m, req(headers={"cookie": "a=1; user=jason", "x-canary": ""}))
        assert not matches(m, req(headers={"cookie": "a=1; user=jason"}))

    def test_repeated_header_matches_joined_value(self) -> None:
        m = Match(headers=(("x-a", exact("1,2")),))
        assert matches(m, req(headers={"x-a": "1,2"}))

    def test_without_headers(self) -> None:
        m = Match(without_headers=(("x-debug", exact("1")),))
        assert matches(m, req(headers={}))  # absent header satisfies withoutHeaders
        assert matches(m, req(headers={"x-debug": "0"}))
        assert not matches(m, req(headers={"x-debug": "1"}))

    def test_without_headers_present(self) -> None:
        m = Match(without_headers=(("x-debug", PRESENT),))
        assert matches(m, req(headers={"other": "1"}))
        assert not matches(m, req(headers={"x-debug": ""}))

    def test_without_headers_any_condition_excludes(self) -> None:
        m = Match(without_headers=(("a", exact("1")), ("b", exact("2"))))
        assert matches(m, req(headers={"a": "0", "b": "0"}))
        assert not matches(m, req(headers={"a": "0", "b": "2"}))

    def test_query_params(self) -> None:
        m = Match(query_params=(("v", exact("2")), ("debug", PRESENT), ("n", regex("[0-9]+"))))
        assert matches(m, req("/x?v=2&debug&n=42"))
        assert matches(m, req("/x?debug=&n=1&v=2"))
        assert not matches(m, req("/x?v=2&n=42"))
        assert not matches(m, req("/x?v=3&debug&n=42"))
        assert not matches(m, req("/x"))

    def test_query_params_decoded_first_value_wins(self) -> None:
        m = Match(query_params=(("name", exact("a b")),))
        assert matches(m, req("/x?name=a%20b&name=zzz"))
        assert not matches(m, req("/x?name=zzz&name=a%20b"))

    def test_query_prefix(self) -> None:
        assert matches(Match(query_params=(("q", prefix("ab")),)), req("/?q=abc"))

    def test_all_conditions_are_anded(self) -> None:
        m = Match(uri=prefix("/api"), method=exact("GET"), headers=(("x", exact("1")),))
        assert matches(m, req("/api/v1", headers={"x": "1"}))
        assert not matches(m, req("/api/v1", method="PUT", headers={"x": "1"}))
        assert not matches(m, req("/web", headers={"x": "1"}))

    def test_query_parsed_at_most_once(self) -> None:
        r = req("/x?a=1&b=2")
        m1 = Match(query_params=(("a", exact("1")),))
        m2 = Match(query_params=(("b", exact("2")),))
        assert matches(m1, r)
        q = r.query
        assert matches(m2, r)
        assert r.query is q

    def test_query_not_parsed_without_query_conditions(self) -> None:
        r = req("/x?a=1")
        assert matches(Match(uri=prefix("/x"), headers=(("h", PRESENT),)), r) is False
        assert r._query is None


# --------------------------------------------------------------------------- select_route


class TestSelectRoute:
    def test_first_match_wins(self) -> None:
        r1 = route("r1", Match(uri=prefix("/api")))
        r2 = route("r2", Match(uri=prefix("/api/v2")))
        vh = vhost("h", r1, r2)
        got = select_route(vh, req("/api/v2/x"))
        assert got is not None and got[0] is r1

    def test_matches_are_ored_and_first_matching_returned(self) -> None:
        m1 = Match(uri=prefix("/a"))
        m2 = Match(uri=prefix("/b"))
        vh = vhost("h", route("r", m1, m2))
        assert select_route(vh, req("/b/1")) == (vh.routes[0], m2)
        assert select_route(vh, req("/a/1")) == (vh.routes[0], m1)

    def test_route_without_matches_is_catch_all(self) -> None:
        r1 = route("r1", Match(headers=(("end-user", exact("jason")),)))
        r2 = route("r2")
        vh = vhost("h", r1, r2)
        assert select_route(vh, req(headers={"end-user": "jason"})) == (r1, r1.matches[0])
        assert select_route(vh, req()) == (r2, None)

    def test_no_route(self) -> None:
        vh = vhost("h", route("r1", Match(uri=exact("/only"))))
        assert select_route(vh, req("/other")) is None
        assert select_route(vhost("empty"), req()) is None


# --------------------------------------------------------------------------- host lookup


class CountingDict(dict[str, VirtualHost]):
    """A dict that fails the test if anybody iterates it (a linear scan)."""

    def __iter__(self) -> Iterator[str]:
        raise AssertionError("route table iterated: linear scan")

    def items(self):  # type: ignore[override]
        raise AssertionError("route table iterated: linear scan")

    def values(self):  # type: ignore[override]
        raise AssertionError("route table iterated: linear scan")

    def keys(self):  # type: ignore[override]
        raise AssertionError("route table iterated: linear scan")


def _table(n: int) -> tuple[RouteTable, VirtualHost, VirtualHost]:
    exact_map: dict[str, VirtualHost] = {}
    for i in range(n):
        vh = vhost(f"svc{i}.default.svc.cluster.local", route(f"r{i}"))
        for alias in (
            f"svc{i}.default.svc.cluster.local",
            f"svc{i}.default.svc",
            f"svc{i}.default",
            f"svc{i}",
        ):
            exact_map[alias] = vh
    wild = vhost("*.example.com", route("wild"))
    deeper = vhost("*.api.example.com", route("deeper"))
    catch = vhost("*", route("catch"))
    table = RouteTable(
        exact=CountingDict(exact_map),
        wildcards=CountingDict({".example.com": wild, ".api.example.com": deeper}),
        catch_all=catch,
    )
    return table, wild, deeper


class TestFindVirtualHost:
    def test_exact_and_aliases(self) -> None:
        table, _, _ = _table(10)
        vh = find_virtual_host(table, "svc3")
        assert vh is not None and vh.name == "svc3.default.svc.cluster.local"
        for alias in ("svc3.default", "svc3.default.svc", "svc3.default.svc.cluster.local"):
            assert find_virtual_host(table, alias) is vh

    def test_wildcards_longest_suffix_first(self) -> None:
        table, wild, deeper = _table(10)
        assert find_virtual_host(table, "www.example.com") is wild
        assert find_virtual_host(table, "a.b.example.com") is wild
        assert find_virtual_host(table, "v1.api.example.com") is deeper
        assert find_virtual_host(table, "x.y.api.example.com") is deeper

    def test_wildcard_does_not_match_bare_domain(self) -> None:
        table, _, _ = _table(10)
        vh = find_virtual_host(table, "example.com")
        assert vh is not None and vh.name == "*"

    def test_wildcard_needs_a_non_empty_label(self) -> None:
        table, _, _ = _table(1)
        vh = find_virtual_host(table, ".example.com")
        assert vh is not None and vh.name == "*"

    def test_catch_all_and_none(self) -> None:
        table, _, _ = _table(1)
        vh = find_virtual_host(table, "unknown.host")
        assert vh is not None and vh.name == "*"
        assert find_virtual_host(RouteTable(), "unknown.host") is None

    @pytest.mark.parametrize("n", [10, 10_000])
    def test_no_linear_scan(self, n: int) -> None:
        table, _, _ = _table(n)
        # CountingDict raises on iteration: lookups must be by key only, whatever the size.
        vh = find_virtual_host(table, f"svc{n - 1}")
        assert vh is not None
        assert select_route(vh, req()) is not None
        assert find_virtual_host(table, "a.b.c.example.com") is not None
        assert find_virtual_host(table, "nothing.here.at.all") is table.catch_all


# --------------------------------------------------------------------------- pick_cluster


def _weighted_route(*weights: int, **wc_kw: object) -> Route:
    clusters = tuple(
        WeightedCluster(cluster=f"c{i}", weight=w, host=f"h{i}", **wc_kw)  # type: ignore[arg-type]
        for i, w in enumerate(weights)
    )
    return Route(name="w", meta=META, clusters=clusters, total_weight=sum(weights))


class TestPickCluster:
    def test_distribution_90_10(self) -> None:
        r = _weighted_route(90, 10)
        n = 10_000
        counts = [0, 0]
        for k in range(n):
            _, name = pick_cluster(r, k / n, None)
            counts[int(name[1])] += 1
        assert counts == [9000, 1000]  # evenly spaced rand: exact

    def test_boundaries_and_determinism(self) -> None:
        r = _weighted_route(50, 50)
        assert pick_cluster(r, 0.0, None)[1] == "c0"
        assert pick_cluster(r, 0.4999, None)[1] == "c0"
        assert pick_cluster(r, 0.5, None)[1] == "c1"
        assert pick_cluster(r, 0.9999999, None)[1] == "c1"
        assert pick_cluster(r, 1.0, None)[1] == "c1"  # out-of-range rand stays in range
        assert pick_cluster(r, 0.3, None) == pick_cluster(r, 0.3, None)

    def test_zero_weight_never_picked(self) -> None:
        r = _weighted_route(0, 100, 0)
        assert {pick_cluster(r, k / 1000, None)[1] for k in range(1000)} == {"c1"}

    def test_single_destination(self) -> None:
        r = _weighted_route(100)
        assert pick_cluster(r, 0.99, None)[1] == "c0"

    def test_by_port(self) -> None:
        wc = WeightedCluster(
            cluster="svc:80", weight=100, host="svc", by_port={80: "svc:80", 9090: "svc:9090"}
        )
        r = Route(name="p", meta=META, clusters=(wc,), total_weight=100)
        assert pick_cluster(r, 0.1, 9090) == (wc, "svc:9090")
        assert pick_cluster(r, 0.1, 80) == (wc, "svc:80")
        assert pick_cluster(r, 0.1, 7777) == (wc, "svc:80")  # unknown port: first port
        assert pick_cluster(r, 0.1, None) == (wc, "svc:80")

    def test_by_port_ignored_when_destination_names_a_port(self) -> None:
        wc = WeightedCluster(
            cluster="svc:80", weight=100, host="svc", port=80, by_port={9090: "svc:9090"}
        )
        r = Route(name="p", meta=META, clusters=(wc,), total_weight=100)
        assert pick_cluster(r, 0.1, 9090) == (wc, "svc:80")


# --------------------------------------------------------------------------- rewrite


class TestRewrite:
    def test_no_rewrite(self) -> None:
        assert rewritten_path(route("r"), None, "/a") is None
        r = route("r", rewrite=Rewrite(authority="other"))
        assert rewritten_path(r, None, "/a") is None

    def test_prefix_rewrite_replaces_matched_prefix_and_keeps_query(self) -> None:
        m = Match(uri=prefix("/v1/getProductRatings"))
        r = route("r", m, rewrite=Rewrite(uri="/v1/bookRatings"))
        assert rewritten_path(r, m, "/v1/getProductRatings/7?x=1") == "/v1/bookRatings/7?x=1"

    def test_prefix_rewrite_to_root(self) -> None:
        m = Match(uri=prefix("/api"))
        r = route("r", m, rewrite=Rewrite(uri="/"))
        assert rewritten_path(r, m, "/api/users?p=2") == "//users?p=2"  # Envoy: literal swap
        m2 = Match(uri=prefix("/api/"))
        r2 = route("r", m2, rewrite=Rewrite(uri="/"))
        assert rewritten_path(r2, m2, "/api/users?p=2") == "/users?p=2"

    def test_ignore_case_prefix_replaces_same_length(self) -> None:
        m = Match(uri=prefix("/API", ignore_case=True))
        r = route("r", m, rewrite=Rewrite(uri="/v2"))
        assert rewritten_path(r, m, "/Api/x") == "/v2/x"

    def test_exact_match_replaces_whole_path_keeps_query(self) -> None:
        m = Match(uri=exact("/old"))
        r = route("r", m, rewrite=Rewrite(uri="/new"))
        assert rewritten_path(r, m, "/old?a=b") == "/new?a=b"
        assert rewritten_path(r, m, "/old") == "/new"

    def test_regex_match_replaces_whole_path(self) -> None:
        m = Match(uri=regex("/u/[0-9]+"))
        r = route("r", m, rewrite=Rewrite(uri="/user"))
        assert rewritten_path(r, m, "/u/42?x") == "/user?x"

    def test_no_uri_match_is_prefix_slash(self) -> None:
        # Istio turns a match without uri into Envoy's `prefix: /`, so "/" is replaced.
        m = Match(headers=(("x", PRESENT),))
        r = route("r", m, rewrite=Rewrite(uri="/v2/"))
        assert rewritten_path(r, m, "/foo?q=1") == "/v2/foo?q=1"
        assert rewritten_path(route("r", rewrite=Rewrite(uri="/v2/")), None, "/a") == "/v2/a"

    def test_regex_rewrite_keeps_query(self) -> None:
        rw = Rewrite(
            uri_regex=re.compile(r"^/service/([^/]+)(/.*)$"), uri_regex_sub=r"\2/instance/\1"
        )
        r = route("r", rewrite=rw)
        assert rewritten_path(r, None, "/service/foo/v1/api?x=1") == "/v1/api/instance/foo?x=1"

    def test_regex_rewrite_replaces_all_occurrences(self) -> None:
        rw = Rewrite(uri_regex=re.compile("a"), uri_regex_sub="b")
        assert rewritten_path(route("r", rewrite=rw), None, "/aXa?a=a") == "/bXb?a=a"


# --------------------------------------------------------------------------- redirect


class TestRedirect:
    def test_uri_and_authority_default_301(self) -> None:
        m = Match(uri=exact("/v1/getProductRatings"))
        rd = Redirect(uri="/v1/bookRatings", authority="newratings.default.svc.cluster.local")
        code, loc = redirect_response(rd, req("/v1/getProductRatings", host="ratings"), m)
        assert code == 301
        assert loc == "http://newratings.default.svc.cluster.local/v1/bookRatings"

    def test_uri_replaces_whole_path_even_for_prefix_match(self) -> None:
        m = Match(uri=prefix("/old"))
        _, loc = redirect_response(Redirect(uri="/new"), req("/old/deep/x"), m)
        assert loc == "http://reviews/new"

    def test_prefix_marker_replaces_matched_prefix(self) -> None:
        m = Match(uri=prefix("/old"))
        _, loc = redirect_response(Redirect(uri="%PREFIX()%/new"), req("/old/deep?q=1"), m)
        assert loc == "http://reviews/new/deep?q=1"

    def test_query_kept_unless_uri_has_one(self) -> None:
        _, loc = redirect_response(Redirect(uri="/new"), req("/old?a=1&b=2"), None)
        assert loc == "http://reviews/new?a=1&b=2"
        _, loc = redirect_response(Redirect(uri="/new?z=9"), req("/old?a=1"), None)
        assert loc == "http://reviews/new?z=9"

    def test_no_uri_keeps_path_and_query(self) -> None:
        _, loc = redirect_response(Redirect(authority="other"), req("/p?q=1"), None)
        assert loc == "http://other/p?q=1"

    def test_request_port_kept_by_default(self) -> None:
        _, loc = redirect_response(Redirect(uri="/n"), req("/o", port=9080), None)
        assert loc == "http://reviews:9080/n"

    def test_code(self) -> None:
        code, _ = redirect_response(Redirect(uri="/n", code=308), req(), None)
        assert code == 308

    def test_scheme_change_drops_default_port_of_old_scheme(self) -> None:
        _, loc = redirect_response(Redirect(scheme="https"), req("/a", port=80), None)
        assert loc == "https://reviews/a"
        _, loc = redirect_response(Redirect(scheme="https"), req("/a", port=8080), None)
        assert loc == "https://reviews:8080/a"

    def test_explicit_port(self) -> None:
        rd = Redirect(scheme="https", port=8443)
        _, loc = redirect_response(rd, req("/a?x=1", port=9080), None)
        assert loc == "https://reviews:8443/a?x=1"
        rd = Redirect(authority="other:1234", port=8443)
        _, loc = redirect_response(rd, req("/a"), None)
        assert loc == "http://other:8443/a"

    def test_derive_port_from_protocol_default_drops_port(self) -> None:
        rd = Redirect(scheme="https", derive_port="FROM_PROTOCOL_DEFAULT")
        _, loc = redirect_response(rd, req("/a", port=9080), None)
        assert loc == "https://reviews/a"

    def test_derive_port_from_request_port(self) -> None:
        rd = Redirect(authority="other", derive_port="FROM_REQUEST_PORT")
        _, loc = redirect_response(rd, req("/a", port=9080), None)
        assert loc == "http://other:9080/a"
        _, loc = redirect_response(rd, req("/a"), None)
        assert loc == "http://other:80/a"  # Istio sets port_redirect to the listener port

    def test_ipv6_authority(self) -> None:
        r = req("/a", host="::1", port=8080, authority="[::1]:8080")
        _, loc = redirect_response(Redirect(port=9090), r, None)
        assert loc == "http://[::1]:9090/a"
        _, loc = redirect_response(Redirect(uri="/b"), r, None)
        assert loc == "http://[::1]:8080/b"

    def test_relative_uri_gets_leading_slash(self) -> None:
        _, loc = redirect_response(Redirect(uri="rel"), req("/a"), None)
        assert loc == "http://reviews/rel"


# --------------------------------------------------------------------------- header ops


class TestHeaderOps:
    def test_empty_ops_return_input(self) -> None:
        h = [("a", "1")]
        assert apply_header_ops(h, HeaderOps()) is h

    def test_set_replaces_all_values_case_insensitively(self) -> None:
        h = [("X-Ver", "1"), ("other", "o"), ("x-ver", "2")]
        out = apply_header_ops(h, HeaderOps(set=(("x-ver", "3"),)))
        assert out == [("other", "o"), ("x-ver", "3")]
        assert h == [("X-Ver", "1"), ("other", "o"), ("x-ver", "2")]  # input untouched

    def test_set_adds_when_absent(self) -> None:
        assert apply_header_ops([], HeaderOps(set=(("x-a", "1"),))) == [("x-a", "1")]

    def test_add_appends(self) -> None:
        out = apply_header_ops([("X-A", "1")], HeaderOps(add=(("x-a", "2"),)))
        assert out == [("X-A", "1"), ("x-a", "2")]

    def test_remove_case_insensitive(self) -> None:
        out = apply_header_ops([("X-Secret", "s"), ("keep", "k")], HeaderOps(remove=("x-secret",)))
        assert out == [("keep", "k")]

    def test_order_remove_then_set_then_add(self) -> None:
        ops = HeaderOps(set=(("x-a", "set"),), add=(("x-a", "added"),), remove=("x-a",))
        out = apply_header_ops([("X-A", "orig")], ops)
        # Envoy removes first, then evaluates set (overwrite) and add (append).
        assert out == [("x-a", "set"), ("x-a", "added")]

    def test_set_then_add_other_header(self) -> None:
        ops = HeaderOps(set=(("x-b", "1"),), add=(("x-c", "2"),))
        assert apply_header_ops([("x-b", "0")], ops) == [("x-b", "1"), ("x-c", "2")]


def test_split_path() -> None:
    assert split_path("/a?b=1") == ("/a", "?b=1")
    assert split_path("/a") == ("/a", "")
    assert split_path("/a?") == ("/a", "?")
