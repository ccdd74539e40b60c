"""SPIFFE id and duration parsing: every accepted shape and every refusal, no I/O."""

from __future__ import annotations

from datetime import timedelta

import pytest

from certs.spiffe import CAError, SpiffeId, format_duration, parse_duration, parse_spiffe_id


def test_parse_valid_id() -> None:
    sid = parse_spiffe_id("spiffe://cluster.local/ns/default/sa/reviews")
    assert sid == SpiffeId("cluster.local", "default", "reviews")
    assert sid.uri == "spiffe://cluster.local/ns/default/sa/reviews"
    assert str(sid) == sid.uri


def test_parse_with_matching_trust_domain() -> None:
    sid = parse_spiffe_id("spiffe://mesh.example_1/ns/a.b-c/sa/S_A", "mesh.example_1")
    assert (sid.namespace, sid.service_account) == ("a.b-c", "S_A")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("http://cluster.local/ns/a/sa/b", "must start with spiffe://"),
        ("cluster.local/ns/a/sa/b", "must start with spiffe://"),
        ("SPIFFE://cluster.local/ns/a/sa/b", "lowercase"),
        ("spiffe:///ns/a/sa/b", "trust domain is empty"),
        ("spiffe://Cluster.Local/ns/a/sa/b", "lowercase letters"),
        ("spiffe://cluster.local:8080/ns/a/sa/b", "port"),
        ("spiffe://cluster.local", "path must be"),
        ("spiffe://cluster.local/", "path must be"),
        ("spiffe://cluster.local/ns/a", "path must be"),
        ("spiffe://cluster.local/ns/a/sa", "path must be"),
        ("spiffe://cluster.local/ns/a/sa/b/extra", "path must be"),
        ("spiffe://cluster.local/namespace/a/sa/b", "path must be"),
        ("spiffe://cluster.local/ns/a/serviceaccount/b", "path must be"),
        ("spiffe://cluster.local/ns//sa/b", "namespace is empty"),
        ("spiffe://cluster.local/ns/a/sa/", "service account is empty"),
        ("spiffe://cluster.local/ns/../sa/b", "not allowed"),
        ("spiffe://cluster.local/ns/a b/sa/b", "only letters"),
        ("spiffe://cluster.local/ns/a/sa/b*", "only letters"),
        ("spiffe://cluster.local/ns/a/sa/b?x=1", "no query"),
        ("spiffe://cluster.local/ns/a/sa/b#f", "no query"),
        ("spiffe://u@cluster.local/ns/a/sa/b", "no query"),
        ("spiffe://cluster.local/ns/a%2F/sa/b", "no query"),
        ("spiffe://" + "a" * 300 + "/ns/a/sa/b", "longer than"),
    ],
)
def test_parse_refuses(text: str, fragment: str) -> None:
    with pytest.raises(CAError) as e:
        parse_spiffe_id(text)
    msg = str(e.value)
    assert fragment in msg
    assert "\n" not in msg


def test_trust_domain_mismatch() -> None:
    with pytest.raises(CAError, match="not this CA's"):
        parse_spiffe_id("spiffe://other.local/ns/a/sa/b", "cluster.local")


def test_very_long_id_is_shortened_in_the_message() -> None:
    with pytest.raises(CAError) as e:
        parse_spiffe_id("spiffe://cluster.local/ns/" + "x" * 5000 + "/sa/b")
    assert len(str(e.value)) < 300


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("24h", 86400),
        ("90m", 5400),
        ("3600s", 3600),
        ("1h30m", 5400),
        ("1m30s", 90),
        ("7d", 7 * 86400),
        ("500ms", 0.5),
        ("1.5h", 5400),
        (" 10s ", 10),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("0s", "zero"),
        ("0h0m", "zero"),
        ("-1h", "negative"),
        ("", "empty"),
        ("24", "expected a duration"),
        ("h", "expected a duration"),
        ("1x", "expected a duration"),
        ("1h 30m", "expected a duration"),
        ("1h-", "expected a duration"),
        ("99999999999999d", "too long"),
    ],
)
def test_parse_duration_refuses(text: str, fragment: str) -> None:
    with pytest.raises(CAError, match=fragment):
        parse_duration(text)


def test_format_duration() -> None:
    assert format_duration(timedelta(hours=24)) == "1d"
    assert format_duration(timedelta(minutes=90)) == "1h30m"
    assert format_duration(timedelta(seconds=45)) == "45s"
    assert format_duration(timedelta(0)) == "0s"
