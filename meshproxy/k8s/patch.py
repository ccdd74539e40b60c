"""RFC 6902 JSON Patch between two JSON documents: what a mutating admission webhook answers.

Theory of operation
-------------------
:func:`diff` walks the original and the target together and emits ``add`` / ``remove`` /
``replace`` operations that, applied in order to the original, yield exactly the target:

- objects: keys only in the original are removed, keys only in the target added, keys in both
  compared recursively (so a new annotation is one ``add`` under ``/metadata/annotations``);
- arrays: elements are matched with :class:`difflib.SequenceMatcher` on their canonical JSON, so
  a sidecar inserted at the head of ``containers`` is one ``add`` at ``/spec/containers/0``
  rather than a replacement of every container; changed runs are patched element-wise, and the
  index of every later operation accounts for the elements already added or removed;
- anything else (a scalar, or a value whose JSON type changed) is one ``replace``.
Scalars compare by JSON type as well as value (``true`` is not ``1``). Keys are escaped as RFC
6901 JSON Pointers (``~`` -> ``~0``, ``/`` -> ``~1``: annotation keys contain slashes). Pure.
"""

from __future__ import annotations

import json
from difflib import SequenceMatcher
from typing import Any

Op = dict[str, Any]


def diff(original: Any, target: Any) -> list[Op]:
    """The operations turning ``original`` into ``target`` (both JSON-compatible values)."""
    ops: list[Op] = []
    _diff("", original, target, ops)
    return ops


def pointer_token(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _diff(path: str, a: Any, b: Any, ops: list[Op]) -> None:
    if _same(a, b):
        return
    if isinstance(a, dict) and isinstance(b, dict):
        for key in a:
            if key not in b:
                ops.append({"op": "remove", "path": f"{path}/{pointer_token(key)}"})
        for key, value in b.items():
            child = f"{path}/{pointer_token(key)}"
            if key in a:
                _diff(child, a[key], value, ops)
            else:
                ops.append({"op": "add", "path": child, "value": value})
        return
    if isinstance(a, list) and isinstance(b, list):
        _diff_list(path, a, b, ops)
        return
    ops.append({"op": "replace", "path": path, "value": b})


def _diff_list(path: str, a: list[Any], b: list[Any], ops: list[Op]) -> None:
    matcher = SequenceMatcher(None, [_canonical(x) for x in a], [_canonical(y) for y in b], False)
    shift = 0  # where original element i now sits: i + shift
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            continue
        paired = min(i2 - i1, j2 - j1) if tag == "replace" else 0
        for k in range(paired):
            _diff(f"{path}/{i1 + k + shift}", a[i1 + k], b[j1 + k], ops)
        for _ in range(i2 - i1 - paired):  # surplus originals: removed at the same index
            ops.append({"op": "remove", "path": f"{path}/{i1 + paired + shift}"})
        shift -= i2 - i1 - paired
        for k in range(paired, j2 - j1):  # surplus targets: added after the paired ones
            ops.append({"op": "add", "path": f"{path}/{i1 + k + shift}", "value": b[j1 + k]})
        shift += j2 - j1 - paired
