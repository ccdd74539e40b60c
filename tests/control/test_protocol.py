"""The /v1/stream frames: parsing, refusals, the shared config body (no sockets)."""

from __future__ import annotations

import json

import pytest

from control.protocol import (
    Ack,
    Hello,
    ProtocolError,
    ack_message,
    config_body,
    config_message,
    config_version,
    hello_message,
    parse_ack,
    parse_hello,
    parse_message,
)


def test_hello_round_trip_and_refusals() -> None:
    h = Hello("node-1", "ns", {"app": "web"}, None)
    assert parse_hello(parse_message(hello_message(h))) == h
    for bad, why in (
        ({"type": "ack"}, "expected hello"),
        ({"type": "hello", "namespace": "x"}, "node_id"),
        ({"type": "hello", "node_id": "n", "namespace": "x", "labels": {"a": 1}}, "labels"),
        ({"type": "hello", "node_id": "n" * 300, "namespace": "x"}, "node_id"),
        ({"type": "hello", "node_id": "n", "namespace": "x", "version": 3}, "version"),
    ):
        with pytest.raises(ProtocolError, match=why):
            parse_hello(bad)
    for text in ("[1]", "nope", '{"type": 1}'):
        with pytest.raises(ProtocolError):
            parse_message(text)


def test_ack_and_nack() -> None:
    assert parse_ack(json.loads(ack_message(Ack("n1", "v1")))) == Ack("n1", "v1")
    nack = parse_ack(json.loads(ack_message(Ack("n1", "v1", "bad file"))))
    assert nack.error == "bad file"
    assert parse_ack({"type": "nack", "nonce": "n", "version": "v"}).error == "(no reason given)"
    with pytest.raises(ProtocolError):
        parse_ack({"type": "ack", "version": "v"})


def test_config_message_is_json_with_a_shared_body() -> None:
    docs = [{"kind": "ServiceEntry", "metadata": {"name": "ü"}, "spec": {}}]
    body = config_body("abc", docs)
    one, two = json.loads(config_message("n1", body)), json.loads(config_message("n2", body))
    assert one == {"type": "config", "nonce": "n1", "version": "abc", "resources": docs}
    assert two["nonce"] == "n2" and two["resources"] == docs


def test_config_version_is_order_and_content_sensitive() -> None:
    assert config_version(["a", "b"]) == config_version(["a", "b"])
    assert config_version(["a", "b"]) != config_version(["b", "a"])
    assert config_version([]) != config_version([""])
    assert len(config_version(["a"])) == 16


def test_pre_encoded_body_is_byte_identical() -> None:
    from control.protocol import config_body_encoded, encode_document

    docs = [{"a": [1, 2.5, None, True]}, {"name": 'ü\n"q"'}, {}]
    assert config_body_encoded("v", [encode_document(d) for d in docs]) == config_body("v", docs)
    assert config_body_encoded("v", []) == config_body("v", [])
