"""ConfigStore: all-or-nothing loads, content versions, per-file reuse (files only, no sockets)."""

from __future__ import annotations

from pathlib import Path

from control.protocol import config_version
from control.store import ConfigStore

SE = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}}}
spec:
  hosts: [{name}.example.com]
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1}}]
"""


def test_version_depends_on_content_only(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "one.yaml").write_text(SE.format(name="x") + "---\n" + SE.format(name="y"))
    (b / "renamed.yml").write_text(
        "# comment\n" + SE.format(name="x") + "---\n" + SE.format(name="y")
    )
    va = ConfigStore([str(a)]).load().config
    vb = ConfigStore([str(b)]).load().config
    assert va is not None and vb is not None
    assert va.version == vb.version  # another file name, a comment: same content
    assert va.version == ConfigStore([str(a)]).load().config.version  # a "restart"
    assert va.version == config_version(r.digest for r in va.resources.all())
    (a / "one.yaml").write_text(SE.format(name="y") + "---\n" + SE.format(name="x"))
    swapped = ConfigStore([str(a)]).load().config
    assert swapped is not None and swapped.version != va.version  # order is content


def test_documents_follow_resources(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(
        SE.format(name="x") + "---\nkind: Gateway\n---\n" + SE.format(name="y")
    )
    (tmp_path / "b.yaml").write_text(SE.format(name="z"))
    out = ConfigStore([str(tmp_path)]).load()
    assert out.config is not None
    names = [r.name for r in out.config.resources.all()]
    assert names == ["x", "y", "z"]
    for r in out.config.resources.all():
        assert out.config.document(r)["metadata"]["name"] == r.name
    assert any("Gateway" in w for w in out.warnings)


def test_problems_give_no_config_and_unchanged_files_are_not_parsed_again(tmp_path: Path) -> None:
    for i in range(5):
        (tmp_path / f"f{i}.yaml").write_text(SE.format(name=f"s{i}"))
    store = ConfigStore([str(tmp_path)])
    assert store.load().config is not None and store.parsed == 5
    (tmp_path / "f2.yaml").write_text(SE.format(name="s2").replace("STATIC", "STATIK"))
    out = store.load()
    assert out.config is None and store.parsed == 1
    assert len(out.problems) == 1 and "f2.yaml: ServiceEntry/s2: spec.resolution" in out.problems[0]
    (tmp_path / "f2.yaml").write_text(SE.format(name="s2"))
    out = store.load()
    assert out.config is not None and store.parsed == 1
    assert [r.order for r in out.config.resources.all()] == list(range(5))
