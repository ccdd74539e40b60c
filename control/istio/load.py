"""Loading Istio YAML: files and directories -> typed, validated :class:`Resources`.

Theory of operation
-------------------
:func:`load_paths` expands each path (a directory is walked recursively for ``*.yaml`` /
``*.yml``, sorted, hidden entries skipped), parses each file as multi-document YAML
(:func:`parse_yaml`: the plain block-style subset by :mod:`control.istio.fastyaml`, else
objects built from the C parser's events, else from its composed nodes; always the result
``yaml.load_all`` with the safe loader would give), and turns every non-empty document into a
:class:`~control.istio.resources.Resource`:

1. envelope: ``apiVersion``/``kind``/``metadata``/``spec`` (``status`` tolerated). Kinds we do
   not act on (Gateway, Sidecar, EnvoyFilter, Kubernetes kinds...) are skipped with a warning.
2. schema decoding of ``metadata`` and ``spec`` (unknown fields, wrong types),
3. Istio's semantic rules (:func:`control.istio.validate.check_spec`),
4. after all files: cross-resource checks (:func:`control.istio.validate.check_references`)
   and the sidecar-relevance warnings (gateway-only VirtualServices, tcp/tls routes).

A document with problems is reported and left out of the result; a YAML syntax error names
the file and line. Nothing here raises for a user mistake. Each kept resource carries the
sha256 of its canonical JSON so the snapshot version is a pure function of the content.

The big-table costs are the YAML, the decoding (a fast decoder with a checked fallback, see
:mod:`control.istio.schema`) and the rule checks (memoized per shared rule object); the GC is
paused meanwhile (:func:`paused_gc`). :class:`control.istio.IncrementalBuilder` reuses all of
it per file and per document across reloads.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import itertools
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.events import (
    AliasEvent,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
    StreamEndEvent,
)
from yaml.nodes import MappingNode, ScalarNode, SequenceNode

from control.istio import hosts as H
from control.istio.fastyaml import parse_simple
from control.istio.resources import API_VERSIONS, SPEC_TYPES, ObjectMeta, Resource, Resources
from control.istio.schema import Problem, decode
from control.istio.validate import Checker, ValidationReport, check_references, check_spec

try:
    _Loader: type = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - libyaml missing
    _Loader = yaml.SafeLoader

__all__ = [
    "Loaded",
    "cross_checks",
    "decode_text",
    "load_documents",
    "load_paths",
    "parse_bytes",
    "parse_yaml",
    "paused_gc",
    "read_documents",
    "split_documents",
    "yaml_files",
]

_NOTHING = object()
_ENVELOPE = frozenset({"apiVersion", "kind", "metadata", "spec", "status"})


@dataclass
class Loaded:
    """What :func:`load_paths` produced: the valid resources and the report."""

    resources: Resources
    report: ValidationReport = field(default_factory=ValidationReport)
    files: list[str] = field(default_factory=list)


def yaml_files(paths: Sequence[str], report: ValidationReport) -> list[str]:
    """Every YAML file under ``paths``, in a stable order (argument order, then sorted)."""
    out: list[str] = []
    seen: set[str] = set()
    for p in paths:
        if os.path.isdir(p):
            found: list[str] = []
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for f in files:
                    if f.endswith((".yaml", ".yml")) and not f.startswith("."):
                        found.append(os.path.join(root, f))
            for f in sorted(found):
                if f not in seen:
                    seen.add(f)
                    out.append(f)
        elif os.path.isfile(p):
            if p not in seen:
                seen.add(p)
                out.append(p)
        else:
            report.problems.append(f"{p}: no such file or directory")
    return out


def _canonical_digest(doc: Any) -> str:
    blob = json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def _doc_label(doc: dict[str, Any], index: int) -> str:
    kind = doc.get("kind")
    meta = doc.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    kind_s = kind if isinstance(kind, str) and kind else "<no kind>"
    name_s = name if isinstance(name, str) and name else f"<document {index + 1}>"
    return f"{kind_s}/{name_s}"


def load_documents(
    file: str,
    docs: Iterable[Any],
    report: ValidationReport,
    start_order: int = 0,
    start_index: int = 0,
) -> list[Resource[Any]]:
    """Decode and validate already-parsed YAML documents of ``file`` (``start_index``: the
    position in the file of the first of them, when they are not all of its documents)."""
    out: list[Resource[Any]] = []
    for index, doc in enumerate(docs, start_index):
        if doc is None:
            continue  # empty document
        if not isinstance(doc, dict):
            report.problems.append(
                f"{file}: <document {index + 1}>: must be a mapping with apiVersion, kind, "
                f"metadata and spec, not {type(doc).__name__}"
            )
            continue
        res = _load_one(file, index, doc, report, start_order + len(out))
        if res is not None:
            out.append(res)
    return out


def _load_one(
    file: str, index: int, doc: dict[str, Any], report: ValidationReport, order: int
) -> Resource[Any] | None:
    kind = doc.get("kind")
    c = Checker(file, _doc_label(doc, index), report)
    if not isinstance(kind, str) or not kind:
        c.err("kind", "required")
        return None
    if kind not in SPEC_TYPES:
        c.warn("kind", f"skipped: meshproxy does not use {kind} resources")
        return None
    before = len(report.problems)
    api = doc.get("apiVersion")
    if api not in API_VERSIONS[kind]:
        c.err(
            "apiVersion",
            f"unsupported apiVersion {api!r} for {kind} "
            f"(expected one of {', '.join(API_VERSIONS[kind])})",
        )
    for k in doc:
        if k not in _ENVELOPE:
            c.err(str(k), "unknown field")
    found: list[Problem] = []
    raw_meta = doc.get("metadata")
    meta = decode(ObjectMeta, raw_meta if raw_meta is not None else {}, "metadata", found)
    name = meta.name if meta is not None else None
    namespace = (meta.namespace if meta is not None else None) or "default"
    if not name:
        found.append(("metadata.name", "required"))
    elif not H.is_subdomain(name):
        found.append(
            ("metadata.name", f"invalid name {name!r} (must be a lower-case RFC 1123 subdomain)")
        )
    if not H.is_dns1123_label(namespace):
        found.append(("metadata.namespace", f"invalid namespace {namespace!r}"))
    raw_spec = doc.get("spec")
    spec = decode(SPEC_TYPES[kind], raw_spec if raw_spec is not None else {}, "spec", found)
    for path, msg in found:
        c.err(path, msg)
    if spec is not None:
        _semantic_checks(c, kind, namespace, spec, found, report)
    if len(report.problems) > before or spec is None or meta is None or not name:
        return None
    return Resource(
        kind=kind,
        name=name,
        namespace=namespace,
        spec=spec,
        file=file,
        order=order,
        api_version=str(api),
        labels=dict(meta.labels),
        annotations=dict(meta.annotations),
        digest=_canonical_digest(doc),
    )


def _semantic_checks(
    c: Checker,
    kind: str,
    namespace: str,
    spec: Any,
    schema_problems: list[Problem],
    report: ValidationReport,
) -> None:
    """Istio's rules on the decoded spec. A field the decoder rejected was left at its default,
    and so may its siblings be (``port: {name: http}`` decodes to a port whose ``number`` is
    unset): findings at or under such a field, on its parent, or anywhere under its parent
    would only echo the schema problem: they are dropped."""
    if not schema_problems:
        check_spec(c, kind, namespace, spec)
        return
    scratch = ValidationReport()
    check_spec(Checker("", "", scratch), kind, namespace, spec)
    bad = [p for p, _ in schema_problems]
    parents = {p.rsplit(".", 1)[0] for p in bad}

    def echo(line: str) -> bool:
        path = line[4:].split(": ", 1)[0]  # scratch lines are ": : path: message"
        if path in parents or any(path.startswith(p + ".") for p in parents):
            return True
        return any(path == b or path.startswith((b + ".", b + "[")) for b in bad)

    for line in scratch.problems:
        if not echo(line):
            path, msg = line[4:].split(": ", 1)
            c.err(path, msg)
    for line in scratch.warnings:
        if not echo(line):
            path, msg = line[4:].split(": ", 1)
            c.warn(path, msg)


_STR_TAG = "tag:yaml.org,2002:str"
_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"


def parse_yaml(text: str, docs: list[Any] | None = None) -> list[Any]:
    """Every document of ``text``, as :func:`yaml.load_all` with the safe loader returns them.

    Fast path: the objects are built straight from the C parser's events (no node graph),
    plain scalars resolved through the loader's own resolver and constructor, memoized by
    text (Istio files repeat the same keys and values endlessly). A document using anything
    beyond plain mappings, sequences and scalars (anchors, aliases, tags, merge keys ``<<``,
    non-scalar keys, a scalar type other than str/int/float/bool/null/timestamp) sends the
    whole text to :func:`_parse_composed`, which follows ``yaml.load_all`` closely. Either
    way the result is what ``yaml.load_all`` gives. Raises ``yaml.YAMLError``; the documents
    before the bad one are then already in ``docs`` (when given).
    """
    if docs is None:
        docs = []
    simple = parse_simple(text)
    if simple is not None:
        docs.extend(simple)
        return docs
    try:
        _parse_events(text, docs)
    except _Fallback:
        docs.clear()
        _parse_composed(text, docs)
    return docs


class _Fallback(Exception):
    """The event fast path met a construct it leaves to the composing loader."""


_PLAIN_TYPES = frozenset(
    {
        "tag:yaml.org,2002:int",
        "tag:yaml.org,2002:float",
        "tag:yaml.org,2002:bool",
        "tag:yaml.org,2002:null",
        "tag:yaml.org,2002:timestamp",
    }
)
_PLAIN: dict[str, Any] = {}  # plain scalar text -> its value (immutable values only)
_PLAIN_MAX = 200_000


def _parse_events(text: str, docs: list[Any]) -> None:
    loader = _Loader(text)
    get = loader.get_event
    resolve = loader.resolve
    plain = _PLAIN
    stack: list[Any] = []
    cur: Any = None  # the mapping or sequence being filled; None between documents
    key: Any = _NOTHING
    try:
        while True:
            e = get()
            t = type(e)
            if t is ScalarEvent:
                if e.anchor is not None or e.tag is not None:
                    raise _Fallback
                v = e.value
                if e.implicit[0]:
                    got = plain.get(v, _NOTHING)
                    if got is _NOTHING:
                        tag = resolve(ScalarNode, v, e.implicit)
                        if tag == _STR_TAG:
                            got = v
                        elif tag in _PLAIN_TYPES:
                            got = loader.construct_object(ScalarNode(tag, v), deep=True)
                        else:
                            raise _Fallback  # merge key, "=" ...
                        if len(plain) < _PLAIN_MAX:
                            plain[v] = got
                    v = got
                if cur is None:
                    docs.append(v)
                elif type(cur) is list:
                    cur.append(v)
                elif key is _NOTHING:
                    key = v
                else:
                    cur[key] = v
                    key = _NOTHING
            elif t is MappingStartEvent or t is SequenceStartEvent:
                if e.anchor is not None or e.tag is not None:
                    raise _Fallback
                new: Any = {} if t is MappingStartEvent else []
                if cur is not None:
                    if type(cur) is list:
                        cur.append(new)
                    elif key is _NOTHING:
                        raise _Fallback  # a mapping or sequence as a key
                    else:
                        cur[key] = new
                        key = _NOTHING
                stack.append(cur)
                cur = new
            elif t is MappingEndEvent or t is SequenceEndEvent:
                done = cur
                cur = stack.pop()
                if cur is None:
                    docs.append(done)  # only complete documents, as yaml.load_all yields
            elif t is AliasEvent:
                raise _Fallback
            elif t is StreamEndEvent:
                return
    finally:
        loader.dispose()


def _parse_composed(text: str, docs: list[Any]) -> None:
    """The general path: the loader composes the node graph; objects are built by
    :func:`_build`, memoizing plain scalars by ``(tag, text)``; merge keys, ``!!set`` and
    the like go through the loader's own constructor for that node."""
    loader = _Loader(text)
    scalars: dict[tuple[str, str], Any] = {}
    try:
        while loader.check_node():
            memo: dict[int, Any] = {}
            docs.append(_build(loader, loader.get_node(), memo, scalars))
    finally:
        loader.dispose()


def _build(
    loader: Any, node: Any, memo: dict[int, Any], scalars: dict[tuple[str, str], Any]
) -> Any:
    cls = type(node)
    tag = node.tag
    if cls is ScalarNode:
        if tag == _STR_TAG:
            return node.value
        key = (tag, node.value)
        got = scalars.get(key, _NOTHING)
        if got is _NOTHING:
            got = scalars[key] = loader.construct_object(node, deep=True)
        return got
    got = memo.get(id(node), _NOTHING)
    if got is not _NOTHING:
        return got  # an alias: the same object, as yaml.load_all shares it
    if cls is MappingNode and tag == _MAP_TAG:
        pairs = node.value
        for k, _ in pairs:
            if type(k) is not ScalarNode or k.tag == _MERGE_TAG:
                break
        else:
            d: dict[Any, Any] = {}
            memo[id(node)] = d
            for k, v in pairs:
                kv = k.value if k.tag == _STR_TAG else _build(loader, k, memo, scalars)
                d[kv] = _build(loader, v, memo, scalars)
            return d
    elif cls is SequenceNode and tag == _SEQ_TAG:
        seq: list[Any] = []
        memo[id(node)] = seq
        for x in node.value:
            seq.append(_build(loader, x, memo, scalars))
        return seq
    out = memo[id(node)] = loader.construct_object(node, deep=True)
    return out


def read_documents(file: str, report: ValidationReport) -> list[Any]:
    """The parsed documents of ``file``; an unreadable file or bad YAML is one problem line."""
    try:
        with open(file, "rb") as fh:
            data = fh.read()
    except OSError as e:
        report.problems.append(f"{file}: cannot read: {e}")
        return []
    return parse_bytes(file, data, report)


def parse_bytes(file: str, data: bytes, report: ValidationReport) -> list[Any]:
    """:func:`parse_yaml` of ``file``'s content ``data``; problems go to ``report``."""
    text = decode_text(file, data, report)
    if text is None:
        return []
    docs: list[Any] = []
    try:
        parse_yaml(text, docs)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "?"
        what = "; ".join(x for x in (e.context, e.problem) if x)
        report.problems.append(f"{file}: {where}: invalid YAML: {what}")
    except yaml.YAMLError as e:
        report.problems.append(f"{file}: invalid YAML: {e}")
    except RecursionError:
        report.problems.append(f"{file}: invalid YAML: nested too deeply")
    return docs


_read = read_documents


def split_documents(text: str) -> list[str] | None:
    """``text`` cut before every ``---`` document marker, or None when it must be parsed
    whole (YAML directives, which apply across markers).

    A ``---`` followed by a blank at the start of a line always starts a document for
    libyaml, whatever context it appears in (in a quoted or flow scalar it is an error), so
    parsing the pieces one by one gives the documents of the whole, as long as every piece
    parses; a caller falls back to the whole text when one does not (for the exact error and
    line number)."""
    if text.startswith("%") or "\n%" in text:
        return None
    starts = [0]
    find = text.find
    i = 0 if text.startswith("---") else find("\n---")
    while i >= 0:
        at = i + 1 if text[i] == "\n" else i  # the marker's first dash
        after = text[at + 3 : at + 4]
        if after in ("", " ", "\t", "\n") and at > 0:
            starts.append(at)
        i = find("\n---", at + 3)
    starts.append(len(text))
    return [text[a:b] for a, b in itertools.pairwise(starts) if b > a]


def decode_text(file: str, data: bytes, report: ValidationReport) -> str | None:
    """``data`` as text with universal newlines, None (and a problem) when not UTF-8."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        report.problems.append(f"{file}: cannot read: {e}")
        return None
    if "\r" in text:  # universal newlines, as reading the file in text mode does
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def _relevance_warnings(resources: Resources, report: ValidationReport) -> None:
    for vs in resources.virtual_services:
        c = Checker(vs.file, vs.ref, report)
        s = vs.spec
        if s.gateways and "mesh" not in s.gateways:
            c.warn(
                "spec.gateways",
                "applies only to gateways (no 'mesh'); sidecars ignore this VirtualService",
            )
            continue
        if not s.hosts:
            c.warn(
                "spec.hosts",
                "delegate VirtualService (no hosts): only used through a delegate reference",
            )
        for i, r in enumerate(s.http):
            if r.delegate is not None:
                c.warn(
                    f"spec.http[{i}].delegate",
                    "delegation is not supported by meshproxy; rule ignored",
                )
        if s.tcp:
            c.warn("spec.tcp", "tcp routes are not acted on by the meshproxy HTTP sidecar")
        if s.tls:
            c.warn("spec.tls", "tls routes are not acted on by the meshproxy HTTP sidecar")


def cross_checks(resources: Resources, report: ValidationReport) -> None:
    """What needs every resource at once: references between resources, then the
    sidecar-relevance warnings (the last step of :func:`load_paths`)."""
    check_references(resources, report)
    _relevance_warnings(resources, report)


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic GC: loading and translating allocate hundreds of thousands of small
    acyclic objects, and the collections they trigger would rescan every live object
    (the big table loads about 3x faster without them)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def load_paths(paths: Sequence[str]) -> Loaded:
    """Load, decode and validate every Istio document under ``paths``."""
    report = ValidationReport()
    with paused_gc():
        files = yaml_files(paths, report)
        items: list[Resource[Any]] = []
        for f in files:
            items.extend(load_documents(f, _read(f, report), report, start_order=len(items)))
        resources = Resources.of(items)
        cross_checks(resources, report)
    return Loaded(resources=resources, report=report, files=files)


def validate_paths(paths: Sequence[str]) -> ValidationReport:
    """``meshproxy validate``: every problem and warning for the files under ``paths``."""
    return load_paths(paths).report
