"""Schema-driven decoding of raw YAML values into frozen dataclasses, with path-qualified problems.

Theory of operation
-------------------
Every Istio message is a frozen dataclass in :mod:`control.istio.resources`; its field
annotations *are* the schema. :func:`decoder_for` compiles, once per class, a decoder from
those annotations (``str | None``, ``int | None``, ``float | None``, ``bool | None``,
:class:`Duration` ``| None``, a nested message, ``tuple[X, ...]`` for repeated fields,
``dict[str, X]`` for maps, ``object`` for values we keep opaque). A field's JSON name is the
lowerCamelCase of its Python name (``metadata={"json": ...}`` overrides it); like protobuf's
JSON mapping, the original snake_case proto name is accepted too. ``metadata={"enum": (...)}``
restricts a string to Istio's enum names.

Decoding never raises for a user mistake: a wrong type or an unknown field appends a
:class:`Problem` ``(path, message)`` and the field keeps its default, so one pass reports every
problem of a document (as Istio's schema validation does for unknown fields). Semantic rules
(ranges, one-ofs, cross-field constraints) live in :mod:`control.istio.validate`, which runs
on the typed objects only.

Durations use Go / protobuf-JSON syntax (``1.5s``, ``500ms``, ``1h2m``, ``300us``) and become
float seconds in a :class:`Duration` (a float subclass that remembers its source text).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = [
    "Duration",
    "Problem",
    "decode",
    "decoder_for",
    "fast_constructor",
    "fast_decoder_for",
    "parse_duration",
]

T = TypeVar("T")

Problem = tuple[str, str]
"""``(field.path, message)``; the file and resource are added by the caller."""


class Duration(float):
    """Seconds, as parsed from a Go / protobuf duration string; ``text`` is the original."""

    __slots__ = ("text",)
    text: str

    def __new__(cls, seconds: float, text: str = "") -> Duration:
        obj = super().__new__(cls, seconds)
        obj.text = text or f"{seconds}s"
        return obj

    def __repr__(self) -> str:
        return f"Duration({self.text!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Duration, (float(self), self.text))


_UNIT = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_DUR_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(text: str) -> float | None:
    """Seconds for a Go duration string (``1h2m3.5s``, ``-1s``, ``0``), None when malformed."""
    s = text.strip()
    if not s:
        return None
    sign = 1.0
    if s[0] in "+-":
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return 0.0
    pos = 0
    total = 0.0
    while pos < len(s):
        m = _DUR_PART.match(s, pos)
        if m is None:
            return None
        total += float(m.group(1)) * _UNIT[m.group(2)]
        pos = m.end()
    if pos == 0:
        return None
    return sign * total


def _camel(name: str) -> str:
    head, *rest = name.rstrip("_").split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


def _snake(camel: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", camel).lower()


Decoder = Callable[[Any, str, list[Problem]], Any]

_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean"}


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _scalar(kind: type, enum: tuple[str, ...] | None) -> Decoder:
    def dec(v: Any, path: str, out: list[Problem]) -> Any:
        if kind is float:
            ok = isinstance(v, int | float) and not isinstance(v, bool)
            if ok:
                return float(v)
        elif kind is int:
            if isinstance(v, int) and not isinstance(v, bool):
                return v
            if isinstance(v, float) and v.is_integer():
                return int(v)
            ok = False
        elif kind is str:
            ok = isinstance(v, str)
            if ok and enum is not None and v not in enum:
                out.append((path, f"invalid value {v!r}, must be one of {', '.join(enum)}"))
                return None
        else:
            ok = isinstance(v, kind)
        if not ok:
            out.append((path, f"must be {_TYPE_NAMES[kind]}, not {_describe(v)}"))
            return None
        return v

    return dec


def _duration(v: Any, path: str, out: list[Problem]) -> Any:
    if not isinstance(v, str):
        out.append((path, f"must be a duration string like '1.5s', not {_describe(v)}"))
        return None
    secs = parse_duration(v)
    if secs is None:
        out.append((path, f"invalid duration {v!r} (expected e.g. '10s', '500ms', '1h2m')"))
        return None
    return Duration(secs, v)


def _opaque(v: Any, path: str, out: list[Problem]) -> Any:
    return v


def _seq(item: Decoder) -> Decoder:
    def dec(v: Any, path: str, out: list[Problem]) -> Any:
        if not isinstance(v, list):
            out.append((path, f"must be a list, not {_describe(v)}"))
            return ()
        res = []
        for i, x in enumerate(v):
            p = f"{path}[{i}]"
            if x is None:
                out.append((p, "must not be null"))
                continue
            y = item(x, p, out)
            if y is not None:
                res.append(y)
        return tuple(res)

    return dec


def _map(key: type, item: Decoder, null_item: Callable[[], Any] | None) -> Decoder:
    def dec(v: Any, path: str, out: list[Problem]) -> Any:
        if not isinstance(v, dict):
            out.append((path, f"must be a mapping, not {_describe(v)}"))
            return {}
        res: dict[Any, Any] = {}
        for k, x in v.items():
            if key is int:
                if isinstance(k, str) and k.isdigit():
                    k = int(k)
                if not isinstance(k, int) or isinstance(k, bool):
                    out.append((f"{path}.{k}", "key must be an integer"))
                    continue
            elif not isinstance(k, str):
                k = str(k).lower() if isinstance(k, bool) else str(k)
            p = f"{path}.{k}"
            if x is None:
                if null_item is not None:
                    res[k] = null_item()
                    continue
                out.append((p, "must not be null"))
                continue
            y = item(x, p, out)
            if y is not None:
                res[k] = y
        return res

    return dec


_DECODERS: dict[type, Decoder] = {}


def _decoder_for_type(tp: Any, meta: typing.Mapping[str, Any]) -> Decoder:
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _decoder_for_type(args[0], meta)
    if tp is Duration:
        return _duration
    if tp in (str, int, float, bool):
        return _scalar(tp, meta.get("enum"))
    if tp is object or tp is Any:
        return _opaque
    if origin is tuple:
        return _seq(_decoder_for_type(typing.get_args(tp)[0], {}))
    if origin is dict:
        ktp, vtp = typing.get_args(tp)
        null_item = vtp if dataclasses.is_dataclass(vtp) and meta.get("null_is_empty") else None
        return _map(ktp, _decoder_for_type(vtp, {}), null_item)
    if dataclasses.is_dataclass(tp):
        return decoder_for(tp)
    raise TypeError(f"unsupported schema type {tp!r}")  # a bug in resources.py, not user input


def decoder_for(cls: type[T]) -> Callable[[Any, str, list[Problem]], T | None]:
    """The (cached) decoder of message class ``cls``: ``(raw, path, problems) -> cls | None``."""
    got = _DECODERS.get(cls)
    if got is not None:
        return got
    hints = typing.get_type_hints(cls)
    fields: dict[str, tuple[str, Decoder | None]] = {}

    def dec(v: Any, path: str, out: list[Problem]) -> Any:
        if not isinstance(v, dict):
            out.append((path, f"must be a mapping, not {_describe(v)}"))
            return None
        kwargs: dict[str, Any] = {}
        for k, x in v.items():
            spec = fields.get(k) if isinstance(k, str) else None
            sub = f"{path}.{k}" if path else str(k)
            if spec is None:
                out.append((sub, "unknown field"))
                continue
            pyname, fdec = spec
            if x is None or fdec is None:
                continue  # an explicit null is the same as an absent field (proto JSON)
            y = fdec(x, sub, out)
            if y is not None:
                kwargs[pyname] = y
        return cls(**kwargs)

    _DECODERS[cls] = dec  # registered before recursion so self-referencing messages work
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        json_name = f.metadata.get("json") or _camel(f.name)
        fdec = _decoder_for_type(hints[f.name], f.metadata)
        fields[json_name] = (f.name, fdec)
        snake = _snake(json_name)
        if snake != json_name:
            fields.setdefault(snake, (f.name, fdec))
    return dec


MEMOIZED: set[type] = set()
"""Message classes whose decoded objects are shared between equal raw values (set by the
schema's owner; see :func:`fast_decoder_for`): sub-structures that configs repeat."""
_MEMO_MAX = 8192


class _Reject(Exception):
    """Raised inside a fast decoder: the value is not plainly valid; take the checked path."""


FastDecoder = Callable[[Any], Any]
_FAST: dict[type, FastDecoder] = {}
_DURATIONS: dict[str, Duration] = {}


def _fast_str(enum: tuple[str, ...] | None) -> FastDecoder:
    if enum is None:

        def dec(v: Any) -> Any:
            if type(v) is not str:
                raise _Reject
            return v

        return dec
    allowed = frozenset(enum)

    def dec_enum(v: Any) -> Any:
        if type(v) is not str or v not in allowed:
            raise _Reject
        return v

    return dec_enum


def _fast_int(v: Any) -> Any:
    t = type(v)
    if t is int:
        return v
    if t is float and v.is_integer():
        return int(v)
    raise _Reject


def _fast_float(v: Any) -> Any:
    t = type(v)
    if t is float:
        return v
    if t is int:
        return float(v)
    raise _Reject


def _fast_bool(v: Any) -> Any:
    if type(v) is not bool:
        raise _Reject
    return v


def _fast_duration(v: Any) -> Any:
    got = _DURATIONS.get(v) if type(v) is str else None
    if got is None:
        if type(v) is not str:
            raise _Reject
        secs = parse_duration(v)
        if secs is None:
            raise _Reject
        got = Duration(secs, v)
        if len(_DURATIONS) < 4096:
            _DURATIONS[v] = got  # immutable in practice; durations repeat across a config
    return got


def _fast_seq(item: FastDecoder) -> FastDecoder:
    def dec(v: Any) -> Any:
        if type(v) is not list:
            raise _Reject
        if None in v:
            raise _Reject
        return tuple([item(x) for x in v])

    return dec


def _fast_map(key: type, item: FastDecoder, null_item: Callable[[], Any] | None) -> FastDecoder:
    def dec(v: Any) -> Any:
        if type(v) is not dict:
            raise _Reject
        res: dict[Any, Any] = {}
        for k, x in v.items():
            if key is int:
                if type(k) is str and k.isdigit():
                    k = int(k)
                elif type(k) is not int:
                    raise _Reject
            elif type(k) is not str:
                raise _Reject
            if x is None:
                if null_item is None:
                    raise _Reject
                res[k] = null_item()
            else:
                res[k] = item(x)
        return res

    return dec


def _fast_for_type(tp: Any, meta: typing.Mapping[str, Any], in_container: bool) -> FastDecoder:
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _fast_for_type(args[0], meta, in_container)
    if tp is Duration:
        return _fast_duration
    if tp is str:
        return _fast_str(meta.get("enum"))
    if tp is int:
        return _fast_int
    if tp is float:
        return _fast_float
    if tp is bool:
        return _fast_bool
    if tp is object or tp is Any:
        if in_container:  # a null item is a problem there; the checked path reports it
            return lambda v: v if v is not None else _reject()
        return _opaque_fast
    if origin is tuple:
        return _fast_seq(_fast_for_type(typing.get_args(tp)[0], {}, True))
    if origin is dict:
        ktp, vtp = typing.get_args(tp)
        null_item = vtp if dataclasses.is_dataclass(vtp) and meta.get("null_is_empty") else None
        return _fast_map(ktp, _fast_for_type(vtp, {}, True), null_item)
    if dataclasses.is_dataclass(tp):
        return fast_decoder_for(tp)
    raise TypeError(f"unsupported schema type {tp!r}")  # a bug in resources.py, not user input


def _reject() -> Any:
    raise _Reject


def _opaque_fast(v: Any) -> Any:
    return v


def fast_constructor(cls: type[T]) -> Callable[..., T]:
    """A keyword-only constructor of frozen, slotted dataclass ``cls`` that gives an object
    equal to ``cls(**kwargs)`` about three times faster.

    A frozen dataclass's ``__init__`` sets every field through ``object.__setattr__``, the
    slow generic path. Here the fields are stored with plain attribute stores on an instance
    of a mutable twin class with the very same ``__slots__`` layout, whose ``__class__`` is
    then switched to ``cls`` (CPython allows it between classes of identical layout). The
    result is a genuine ``cls``: frozen, same equality, hash and repr. Falls back to ``cls``
    itself when the class does not qualify (no slots, a ``__post_init__``) or the self-check
    fails."""
    slots = getattr(cls, "__slots__", None)
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    if not slots or hasattr(cls, "__post_init__") or tuple(slots) != tuple(f.name for f in fields):
        return cls
    twin = type(f"_Building{cls.__name__}", (object,), {"__slots__": tuple(slots)})
    env: dict[str, Any] = {"_new": object.__new__, "_Twin": twin, "_Cls": cls, "_F": object()}
    params: list[str] = []
    body: list[str] = []
    for f in fields:
        if f.default_factory is not dataclasses.MISSING:
            env[f"_fac_{f.name}"] = f.default_factory
            params.append(f"{f.name}=_F")
            body.append(f"    o.{f.name} = _fac_{f.name}() if {f.name} is _F else {f.name}")
        elif f.default is not dataclasses.MISSING:
            env[f"_d_{f.name}"] = f.default
            params.append(f"{f.name}=_d_{f.name}")
            body.append(f"    o.{f.name} = {f.name}")
        else:
            params.append(f.name)
            body.append(f"    o.{f.name} = {f.name}")
    src = (
        f"def make(*, {', '.join(params)}):\n    o = _new(_Twin)\n"
        + "\n".join(body)
        + "\n    o.__class__ = _Cls\n    return o\n"
    )
    try:
        exec(src, env)
        make: Callable[..., T] = env["make"]
        if all(
            f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            for f in fields
        ):
            probe = make()
            if type(probe) is not cls or probe != cls():
                return cls
    except (TypeError, SyntaxError):
        return cls
    return make


def fast_decoder_for(cls: type[T]) -> Callable[[Any], T]:
    """The (cached) fast decoder of ``cls``: ``raw -> cls``, raising ``_Reject`` at the first
    thing that is not plainly valid. It builds no field paths and no messages: for a valid
    document (the common case) it is several times faster than :func:`decoder_for`, which
    :func:`decode` then runs only when this one gives up, to report every problem."""
    got = _FAST.get(cls)
    if got is not None:
        return got
    hints = typing.get_type_hints(cls)
    fields: dict[str, tuple[str, FastDecoder]] = {}
    make = fast_constructor(cls)
    memo: dict[str, Any] | None = {} if cls in MEMOIZED else None

    def memo_dec(v: Any) -> Any:
        # ``repr`` tells apart every value YAML produces (1 / 1.0 / True / "1", None /
        # "None"...), so equal reprs decode to equal objects; one shared object is also
        # what lets later identity-keyed caches (validation, translation) hit
        if type(v) is not dict or memo is None:
            raise _Reject
        key = repr(v)
        got = memo.get(key)
        if got is None:
            got = dec(v)
            if len(memo) >= _MEMO_MAX:
                memo.clear()
            memo[key] = got
        return got

    def dec(v: Any) -> Any:
        if type(v) is not dict:
            raise _Reject
        kwargs: dict[str, Any] = {}
        get = fields.get
        for k, x in v.items():
            spec = get(k)
            if spec is None:
                raise _Reject  # unknown field (or a non-string key)
            if x is not None:  # an explicit null is the same as an absent field (proto JSON)
                kwargs[spec[0]] = spec[1](x)
        return make(**kwargs)

    _FAST[cls] = dec if memo is None else memo_dec  # registered before recursion
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        json_name = f.metadata.get("json") or _camel(f.name)
        fdec = _fast_for_type(hints[f.name], f.metadata, False)
        fields[json_name] = (f.name, fdec)
        snake = _snake(json_name)
        if snake != json_name:
            fields.setdefault(snake, (f.name, fdec))
    return _FAST[cls]


def decode(cls: type[T], raw: Any, path: str, problems: list[Problem]) -> T | None:
    """Decode ``raw`` as a ``cls`` message; problems are appended as ``(path, message)``.

    The fast decoder runs first; only a value it rejects goes through the checked decoder,
    whose result and problems are then the answer (the two agree on every valid value)."""
    try:
        return fast_decoder_for(cls)(raw)
    except _Reject:
        pass
    except RecursionError:
        pass
    return decoder_for(cls)(raw, path, problems)


def field_names(cls: type) -> list[str]:
    """The JSON names of ``cls``'s fields (used by tests and error hints)."""
    return [f.metadata.get("json") or _camel(f.name) for f in dataclasses.fields(cls)]
