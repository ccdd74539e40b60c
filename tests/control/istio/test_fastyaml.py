"""The simple-YAML reader agrees with PyYAML on whatever it accepts, and declines the rest.

Differential: every text is parsed by both; the fast reader must either decline (None) or
give exactly ``yaml.load_all``'s documents, and must decline whatever PyYAML rejects.
Texts come from the test corpus, from hypothesis-generated values dumped by PyYAML in
several styles, and from those dumps mangled line by line (re-indented, cut, joined).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from control.istio.fastyaml import parse_simple
from control.istio.load import parse_yaml

REPO = Path(__file__).resolve().parents[3]


def reference(text: str) -> list[Any] | None:
    try:
        return list(yaml.load_all(text, Loader=yaml.CSafeLoader))
    except yaml.YAMLError:
        return None


def agrees(text: str) -> bool:
    """True when the fast reader accepted ``text`` (and then agreed with PyYAML)."""
    got = parse_simple(text)
    if got is None:
        return False
    ref = reference(text)
    assert ref is not None, f"accepted what PyYAML rejects: {text!r}"
    assert got == ref, text
    assert [type(x) for x in got] == [type(x) for x in ref]
    return True


def test_corpus_and_generated_configs() -> None:
    texts = [p.read_text() for p in (REPO / "tests" / "data").rglob("*.y*ml")]
    accepted = sum(agrees(t) for t in texts)
    assert accepted >= len(texts) // 2  # most real files stay inside the subset


def test_the_subset_and_its_edges() -> None:
    ok = [
        "",
        "---\n",
        "---\n---\n",
        "# only a comment\n",
        "a: 1\n---\nb: [x, 2, true, null, 1.5, ~]\n",
        "a:\n- x\n- y\nb: 1\n",
        "a:\n  - name: r\n    match:\n    - uri: {}\n  -\n    k: v\n",
        "k: 'single'\nq: \"double\"\ne: ''\nd: 2001-12-14\nn: -1\nh: 0x1f\nyes: no\n",
        "80: http\n1.5: x\ntrue: y\nnull: z\n",
        'x-bench-gen: "1"\nplain: a b  c\nurl: http://x/y?z=1\nbr: b]c{d}\n',
        "a:   spaced   \nb:\n",
        "-   a: 1\n    b: 2\n- 3\n",
    ]
    for text in ok:
        assert agrees(text), text
    declined = [
        "a: &x 1\nb: *x\n",  # anchors, aliases
        "a: !!str 1\n",  # tags
        "a: |\n  block\n",  # block scalars
        "a: b\n  c\n",  # a multi-line plain scalar
        "a: 1 # comment\n",
        "a:\n\tb: 1\n",  # tabs
        "a: {b: 1}\n",  # flow mappings
        'a: "x\\ty"\n',  # escapes
        "<<: {a: 1}\n",  # merge keys
        "%YAML 1.1\n---\na: 1\n",
        "a: 1\n...\n",
        "--- a\n",
        "scalar\n",
        " a: 1\n",
        "a:\n    b: 1\n  c: 2\n",  # PyYAML rejects this
        "- a\nb: 1\n",
        "a: b: c\n",
        "a: - b\n",
        "a: [b, [c]]\n",
        "a: [-]\n",
        "a: x\u2028b: y\n",
        "\ufeffa: 1\n",
        f"{'k' * 200}: v\n",
    ]
    for text in declined:
        assert parse_simple(text) is None, text
        ref = reference(text)
        if ref is not None:  # the general path still reads it
            assert parse_yaml(text) == ref


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=False, width=32),
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=8),
    st.sampled_from(["yes", "No", "~", "null", "1_000", "0o17", "2001-12-14", "- x", "a: b"]),
)
keys = st.one_of(
    st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_.-]{0,8}", fullmatch=True),
    st.integers(0, 99),
    st.sampled_from(["true", "null", "1.5", "x y", "<<", "=", "k:"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=20,
)


def dumps(value: Any, flow: bool | None, indent: int, start: bool) -> str:
    return yaml.safe_dump(
        value,
        default_flow_style=flow,
        indent=indent,
        explicit_start=start,
        allow_unicode=True,
        sort_keys=False,
    )


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(values, min_size=1, max_size=3),
    st.sampled_from([False, None]),
    st.sampled_from([2, 4]),
    st.booleans(),
)
def test_dumped_values(docs: list[Any], flow: bool | None, indent: int, start: bool) -> None:
    text = "".join(dumps(d, flow, indent, start or i > 0) for i, d in enumerate(docs))
    agrees(text)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values, st.data())
def test_mangled_dumps(value: Any, data: st.DataObject) -> None:
    lines = dumps(value, False, 2, False).split("\n")
    for _ in range(data.draw(st.integers(1, 4))):
        if not lines:
            break
        k = data.draw(st.integers(0, len(lines) - 1))
        op = data.draw(st.sampled_from(["indent", "dedent", "drop", "join", "dash", "colon"]))
        if op == "indent":
            lines[k] = " " * data.draw(st.integers(1, 3)) + lines[k]
        elif op == "dedent":
            lines[k] = lines[k][data.draw(st.integers(1, 3)) :]
        elif op == "drop":
            del lines[k]
        elif op == "join" and k + 1 < len(lines):
            lines[k : k + 2] = [lines[k] + " " + lines[k + 1].lstrip()]
        elif op == "dash":
            lines[k] = "- " + lines[k]
        elif op == "colon":
            lines[k] = lines[k] + ":"
    agrees("\n".join(lines))
