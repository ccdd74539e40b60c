"""The push protocol between ``meshproxy control`` and its proxies (``/v1/stream``).

Theory of operation
-------------------
One WebSocket per proxy, JSON text frames, each an object with a ``type``:

* proxy -> control plane, first frame: ``hello`` ``{"node_id", "namespace", "labels",
  "version"}``. ``version`` is the config version the proxy already runs (``null`` when it has
  none, e.g. just started). A proxy that reconnects after a control-plane restart says what it
  holds; when that is exactly what the control plane would send it, nothing is sent.
* control plane -> proxy: ``config`` ``{"version", "nonce", "resources": [doc, ...]}``. The
  resources are the Istio documents (``apiVersion``, ``kind``, ``metadata``, ``spec``) that
  apply to this proxy, already validated, in load order. The proxy decodes, validates and
  translates them with the same code as standalone mode (``control.istio``) and swaps the
  result in whole, or keeps its last good config.
* proxy -> control plane: ``ack`` ``{"nonce", "version"}`` once applied, or ``nack``
  ``{"nonce", "version", "error"}`` when it refused the config (its last good one stays live).
  An ACK/NACK whose nonce is not the last one sent is stale and only logged, as in xDS.
* control plane -> proxy: ``error`` ``{"error"}`` (a malformed hello), then close.

Why Istio documents rather than translated snapshots on the wire: the translation is pure
and deterministic, so running it at the proxy yields exactly the snapshot the control plane
would have built, while the wire carries a small, stable, public schema (as Istio's own MCP
carried Istio resources between components); the model objects hold compiled regular
expressions and shared sub-structures that do not serialise. The control plane still does the
work that must be central: reading and validating the directory, refusing invalid content,
scoping per proxy, versioning, and tracking who runs what.

The version of a proxy's config is the hex SHA-256 prefix of the digests of its documents
(each the SHA-256 of the document's canonical JSON, the same digest ``control.istio`` stores on
every resource) in order: it depends on content only, so the same content has the same version
across control-plane restarts, and two proxies that see the same documents share a version.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "PROTOCOL_VERSION",
    "STREAM_PATH",
    "Ack",
    "Hello",
    "ProtocolError",
    "config_message",
    "config_version",
    "encode",
    "parse_message",
]

STREAM_PATH = "/v1/stream"
CERTIFICATES_PATH = "/v1/certificates"
PROTOCOL_VERSION = 1
VERSION_LEN = 16
MAX_MESSAGE = 64 * 1024 * 1024  # a config message may be large (a big mesh); frames above fail
MAX_NODE_ID = 253


class ProtocolError(ValueError):
    """A frame that does not follow this protocol; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class Hello:
    node_id: str
    namespace: str
    labels: Mapping[str, str]
    version: str | None


@dataclass(frozen=True, slots=True)
class Ack:
    """An ``ack`` (``error`` is None) or a ``nack`` (``error`` is the proxy's reason)."""

    nonce: str
    version: str
    error: str | None = None


def config_version(digests: Iterable[str]) -> str:
    """The version of a config made of documents with these digests, in order."""
    h = hashlib.sha256(f"meshproxy-config/{PROTOCOL_VERSION}\n".encode())
    for d in digests:
        h.update(d.encode())
        h.update(b"\n")
    return h.hexdigest()[:VERSION_LEN]


def encode(obj: Mapping[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def config_message(nonce: str, body: str) -> str:
    """A ``config`` frame from a pre-encoded ``body`` (see :func:`config_body`): many proxies
    share one body, so the control plane encodes the documents once per distinct config."""
    return f'{{"type":"config","nonce":{json.dumps(nonce)},{body}'


def config_body(version: str, documents: list[Any]) -> str:
    """The shared tail of a ``config`` frame: ``"version":...,"resources":[...]}``."""
    return f'"version":{json.dumps(version)},"resources":{encode_list(documents)}}}'


def config_body_encoded(version: str, encoded: list[str]) -> str:
    """:func:`config_body` from documents already encoded with :func:`encode_document`
    (byte for byte the same result: the control plane encodes each document once)."""
    return f'"version":{json.dumps(version)},"resources":[{",".join(encoded)}]}}'


def encode_document(doc: Any) -> str:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False, default=str)


def encode_list(items: list[Any]) -> str:
    return json.dumps(items, separators=(",", ":"), ensure_ascii=False, default=str)


def _str(obj: Mapping[str, Any], key: str, *, optional: bool = False, limit: int = 4096) -> Any:
    v = obj.get(key)
    if v is None and optional:
        return None
    if not isinstance(v, str) or not v or len(v) > limit:
        raise ProtocolError(f"{key}: expected a non-empty string of at most {limit} characters")
    return v


def parse_message(text: str | bytes) -> dict[str, Any]:
    """A frame's JSON object with a string ``type``; ProtocolError otherwise."""
    try:
        obj = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"not JSON: {e}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        raise ProtocolError("expected a JSON object with a string 'type'")
    return obj


def parse_hello(obj: Mapping[str, Any]) -> Hello:
    if obj.get("type") != "hello":
        raise ProtocolError(f"expected hello first, got {obj.get('type')!r}")
    node_id = _str(obj, "node_id", limit=MAX_NODE_ID)
    namespace = _str(obj, "namespace", limit=63)
    labels = obj.get("labels") or {}
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        raise ProtocolError("labels: expected an object of strings")
    version = _str(obj, "version", optional=True, limit=128)
    return Hello(node_id, namespace, dict(labels), version)


def hello_message(hello: Hello) -> str:
    return encode(
        {
            "type": "hello",
            "node_id": hello.node_id,
            "namespace": hello.namespace,
            "labels": dict(hello.labels),
            "version": hello.version,
        }
    )


def parse_ack(obj: Mapping[str, Any]) -> Ack:
    kind = obj.get("type")
    if kind not in ("ack", "nack"):
        raise ProtocolError(f"expected ack or nack, got {kind!r}")
    nonce = _str(obj, "nonce", limit=128)
    version = _str(obj, "version", limit=128)
    if kind == "ack":
        return Ack(nonce, version)
    error = obj.get("error")
    if not isinstance(error, str) or not error:
        error = "(no reason given)"
    return Ack(nonce, version, error[:8192])


def ack_message(ack: Ack) -> str:
    if ack.error is None:
        return encode({"type": "ack", "nonce": ack.nonce, "version": ack.version})
    return encode({"type": "nack", "nonce": ack.nonce, "version": ack.version, "error": ack.error})
