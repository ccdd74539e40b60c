"""Loader: files, directories, multi-document YAML, empty documents, skipped kinds, bad YAML."""

from __future__ import annotations

from pathlib import Path

from control.istio import load_paths, validate_paths

VS = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: {name}
  namespace: {ns}
spec:
  hosts: [{name}]
  http:
  - route:
    - destination:
        host: {name}
"""


def test_multi_document_with_empty_documents(tmp_path: Path) -> None:
    f = tmp_path / "all.yaml"
    f.write_text(
        "---\n"
        + VS.format(name="a", ns="x")
        + "---\n---\n# only a comment\n---\n"
        + VS.format(name="b", ns="y")
    )
    loaded = load_paths([str(f)])
    assert loaded.report.problems == []
    assert [(r.name, r.namespace, r.order) for r in loaded.resources.virtual_services] == [
        ("a", "x", 0),
        ("b", "y", 1),
    ]
    assert all(r.file == str(f) for r in loaded.resources.virtual_services)


def test_directories_recursive_sorted_yaml_and_yml_only(tmp_path: Path) -> None:
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "z.yaml").write_text(VS.format(name="z", ns="default"))
    (tmp_path / "sub" / "b.yml").write_text(VS.format(name="b", ns="default"))
    (tmp_path / "sub" / "deeper" / "a.yaml").write_text(VS.format(name="a", ns="default"))
    (tmp_path / "notes.txt").write_text("not: yaml: at: all: [")
    (tmp_path / ".hidden.yaml").write_text("[")
    loaded = load_paths([str(tmp_path)])
    assert loaded.report.problems == []
    # sorted by path: sub/b.yml < sub/deeper/a.yaml < z.yaml
    assert [str(Path(f).relative_to(tmp_path)) for f in loaded.files] == [
        "sub/b.yml",
        "sub/deeper/a.yaml",
        "z.yaml",
    ]
    assert [r.name for r in loaded.resources.virtual_services] == ["b", "a", "z"]


def test_default_namespace_and_skipped_kinds(tmp_path: Path) -> None:
    f = tmp_path / "mixed.yaml"
    f.write_text(
        VS.format(name="a", ns="default").replace("  namespace: default\n", "")
        + "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: svc\nspec: {}\n"
        + "---\napiVersion: networking.istio.io/v1\nkind: Gateway\n"
        + "metadata:\n  name: gw\nspec: {}\n"
    )
    report = validate_paths([str(f)])
    assert report.problems == []
    assert report.warnings == [
        f"{f}: Service/svc: kind: skipped: meshproxy does not use Service resources",
        f"{f}: Gateway/gw: kind: skipped: meshproxy does not use Gateway resources",
    ]
    assert load_paths([str(f)]).resources.virtual_services[0].namespace == "default"


def test_syntax_error_names_file_and_line_and_other_files_still_load(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(VS.format(name="a", ns="default"))
    bad = tmp_path / "b.yaml"
    bad.write_text("apiVersion: v1\nkind: VirtualService\nmetadata:\n  name: x\n   bad: indent\n")
    loaded = load_paths([str(tmp_path)])
    assert loaded.report.problems == [
        f"{bad}: line 5, column 7: invalid YAML: mapping values are not allowed in this context"
    ]
    assert [r.name for r in loaded.resources.virtual_services] == ["a"]


def test_non_mapping_document_and_missing_path(tmp_path: Path) -> None:
    f = tmp_path / "list.yaml"
    f.write_text("- a\n- b\n")
    report = validate_paths([str(f), str(tmp_path / "nope.yaml")])
    assert report.problems == [
        f"{tmp_path / 'nope.yaml'}: no such file or directory",
        f"{f}: <document 1>: must be a mapping with apiVersion, kind, metadata and spec, not list",
    ]


def test_invalid_document_is_left_out_and_digest_is_content_based(tmp_path: Path) -> None:
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(VS.format(name="a", ns="default"))
    b.write_text(
        "# same content, different formatting\n"
        + VS.format(name="a", ns="default").replace("[a]", "\n  - a")
    )
    ra = load_paths([str(a)]).resources.virtual_services[0]
    rb = load_paths([str(b)]).resources.virtual_services[0]
    assert ra.digest == rb.digest and len(ra.digest) == 64
    b.write_text(VS.format(name="a", ns="default").replace("host: a", "host: a\n      weight: -1"))
    loaded = load_paths([str(b)])
    assert len(loaded.report.problems) == 1 and len(loaded.resources) == 0
