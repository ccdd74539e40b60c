"""A fast reader for the plain block-style YAML that big generated configs are made of.

Theory of operation
-------------------
PyYAML's C parser still creates a Python object per parser event (a 10,000-VirtualService
file has millions), which makes YAML the slowest stage of loading a big table. Generated
configs, and most hand-written ones, use a small regular subset of YAML: block mappings and
sequences indented with spaces, one entry per line, plain or simply quoted scalars, ``[]``
lists of plain scalars, comment lines. :func:`parse_simple` reads that subset line by line,
about five times faster, and **declines** (returns None) at the first thing outside it:
tabs, ``#`` after content, anchors, aliases, tags, block scalars, multi-line scalars, flow
mappings, quotes with escapes, document end markers, directives, unusual characters, any
indentation it does not fully understand. The caller then parses the text with PyYAML, so
the result is always exactly what ``yaml.load_all`` gives; whatever this module accepts it
must parse identically (a differential test against PyYAML guards that), and anything
PyYAML rejects it must decline.

Plain scalars are resolved by PyYAML's own resolver and constructor (ints, floats, bools,
nulls, timestamps), memoized by text.
"""

from __future__ import annotations

import re
import threading
from typing import Any

import yaml
from yaml.nodes import ScalarNode

__all__ = ["parse_simple"]

_STR_TAG = "tag:yaml.org,2002:str"
_RESOLVED = frozenset(
    {
        "tag:yaml.org,2002:int",
        "tag:yaml.org,2002:float",
        "tag:yaml.org,2002:bool",
        "tag:yaml.org,2002:null",
        "tag:yaml.org,2002:timestamp",
    }
)
# characters libyaml accepts in a stream (besides tab, LF, CR) minus the BOM and the
# exotic line breaks (NEL, LS, PS) that this line-based reader does not treat as breaks
_UNUSUAL = re.compile(
    "[^\n\x20-\x7e\xa0-\u2027\u202a-\ud7ff\ue000-\ufefe\uff00-\ufffd\U00010000-\U0010ffff]"
)
_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./-]*\Z")
_KEY_MAX = 128  # libyaml limits implicit keys to 1024 characters; stay well inside
_PLAIN_START_BAD = frozenset("-?:,[]{}#&*!|>'\"%@`")
_FLOW_ITEM_BAD = re.compile(r"[\[\]{}:#&*!|>'\"%@`?,]")

_plain: dict[str, Any] = {}
_PLAIN_MAX = 200_000
_resolver = yaml.resolver.Resolver()
_constructor = yaml.constructor.SafeConstructor()
_lock = threading.Lock()


class _Decline(Exception):
    """Outside the subset: the caller must use PyYAML."""


def _resolve(text: str) -> Any:
    """The value of plain scalar ``text`` (str, int, float, bool, None, date...)."""
    got = _plain.get(text, _plain)
    if got is not _plain:
        return got
    tag = _resolver.resolve(ScalarNode, text, (True, False))
    if tag == _STR_TAG:
        value: Any = text
    elif tag in _RESOLVED:
        with _lock:
            value = _constructor.construct_object(ScalarNode(tag, text), deep=True)
    else:
        raise _Decline  # "<<" merge keys, "=" value keys...
    if len(_plain) < _PLAIN_MAX:
        _plain[text] = value
    return value


_keys: dict[str, Any] = {}


def _key(text: str) -> Any:
    """The value of mapping key ``text`` (memoized: keys repeat in every document)."""
    if len(text) > _KEY_MAX or _KEY.match(text) is None:
        raise _Decline
    key = _resolve(text)
    if len(_keys) < _PLAIN_MAX:
        _keys[text] = key
    return key


def _scalar(text: str) -> Any:
    """A value written after ``key: `` or ``- `` on one line."""
    c = text[0]
    if c == '"':
        inner = text[1:-1]
        if len(text) < 2 or text[-1] != '"' or '"' in inner or "\\" in inner:
            raise _Decline
        return inner
    if c == "'":
        inner = text[1:-1]
        if len(text) < 2 or text[-1] != "'" or "'" in inner:
            raise _Decline
        return inner
    if c == "[":
        if text[-1] != "]":
            raise _Decline
        inner = text[1:-1].strip(" ")
        if not inner:
            return []
        items = []
        for item in inner.split(","):
            item = item.strip(" ")
            if not item or _FLOW_ITEM_BAD.search(item) or (item[0] == "-" and item[1:2] in "- "):
                raise _Decline
            items.append(_resolve(item))
        return items
    if c == "{":
        if text == "{}":
            return {}
        raise _Decline
    if c in _PLAIN_START_BAD and not (c == "-" and len(text) > 1 and text[1] != " "):
        raise _Decline
    if ": " in text or text[-1] == ":":
        raise _Decline
    return _resolve(text)


class _Reader:
    __slots__ = ("content", "indent", "n")

    def __init__(self, indent: list[int], content: list[str]) -> None:
        self.indent = indent
        self.content = content
        self.n = len(content)

    def block(self, i: int) -> tuple[Any, int]:
        c = self.content[i]
        if c == "-" or c.startswith("- "):
            return self.seq(i, self.indent[i])
        return self.map(i, self.indent[i])

    def map(self, i: int, indent: int) -> tuple[dict[Any, Any], int]:
        d: dict[Any, Any] = {}
        ind, content, n = self.indent, self.content, self.n
        while i < n and ind[i] == indent:
            c = content[i]
            if c.endswith(":"):
                key_text, rest = c[:-1], ""
            else:
                key_text, sep, rest = c.partition(": ")
                if not sep:
                    raise _Decline
                rest = rest.lstrip(" ")
            key = _keys.get(key_text, _keys)
            if key is _keys:
                key = _key(key_text)
            i += 1
            if not rest:
                if i < n and ind[i] > indent:
                    value, i = self.block(i)
                elif i < n and ind[i] == indent and (content[i] == "-" or content[i][:2] == "- "):
                    value, i = self.seq(i, indent)
                else:
                    value = None
            else:
                value = _scalar(rest)
                if i < n and ind[i] > indent:
                    raise _Decline  # a multi-line scalar
            d[key] = value
        return d, i

    def seq(self, i: int, indent: int) -> tuple[list[Any], int]:
        out: list[Any] = []
        ind, content, n = self.indent, self.content, self.n
        while i < n and ind[i] == indent:
            c = content[i]
            if c == "-":
                i += 1
                if i < n and ind[i] > indent:
                    value, i = self.block(i)
                else:
                    value = None
            elif c[:2] == "- ":
                rest = c[2:]
                stripped = rest.lstrip(" ")
                inner = indent + 2 + len(rest) - len(stripped)
                if stripped == "-" or stripped[:2] == "- ":
                    raise _Decline  # "- - x"
                if stripped.endswith(":") or ": " in stripped:
                    # "- key: value": a mapping whose first key sits after the dash
                    ind[i], content[i] = inner, stripped
                    value, i = self.map(i, inner)
                else:
                    value = _scalar(stripped)
                    i += 1
                    if i < n and ind[i] > indent:
                        raise _Decline  # a multi-line scalar
            else:
                break  # a key after "key:\n- item" lists at the key's indent; the caller sees
            out.append(value)
        return out, i


def _document(lines: list[str], explicit: bool, plain: bool) -> Any:
    """One document's lines; ``plain``: the text has no ``#`` and no tab at all."""
    indent: list[int] = []
    content: list[str] = []
    add_indent, add_content = indent.append, content.append
    for line in lines:
        s = line.lstrip(" ")
        if not s:
            continue
        if not plain:
            if s[0] == "#":
                continue
            if "#" in s or "\t" in s:
                raise _Decline
        add_indent(len(line) - len(s))
        add_content(s.rstrip(" ") if s[-1] == " " else s)
    if not content:
        if explicit:
            return None  # "---" alone: an empty document
        raise _NoDocument
    if indent[0] != 0:
        raise _Decline
    r = _Reader(indent, content)
    value, i = r.block(0)
    if i != r.n:
        raise _Decline
    return value


class _NoDocument(Exception):
    """Only comments and blank lines: no document at all."""


def parse_simple(text: str) -> list[Any] | None:
    """The documents of ``text`` when it stays inside the simple subset, else None."""
    if _UNUSUAL.search(text) is not None or text.startswith("%") or "\n%" in text:
        return None
    docs: list[Any] = []
    plain = "#" not in text and "\t" not in text
    lines = text.split("\n")
    start = 0
    explicit = False
    try:
        for k, line in enumerate(lines):
            if line.startswith("---") and (len(line) == 3 or line[3] in " \t"):
                if line.rstrip(" \t") != "---":
                    return None  # content after the marker
                if k > start or explicit:
                    _append(docs, lines[start:k], explicit, plain)
                start, explicit = k + 1, True
            elif line.startswith("...") and (len(line) == 3 or line[3] in " \t"):
                return None
        _append(docs, lines[start:], explicit, plain)
    except _Decline:
        return None
    return docs


def _append(docs: list[Any], lines: list[str], explicit: bool, plain: bool) -> None:
    try:
        docs.append(_document(lines, explicit, plain))
    except _NoDocument:
        pass
