"""The compatibility corpus (real Istio YAML, copied from istio/istio) validates with zero problems,
each file alone and the whole directory at once, and translates without problems."""

from __future__ import annotations

from pathlib import Path

import pytest

from control.istio import build_snapshot, validate_paths
from meshproxy.config.model import ProxyIdentity

CORPUS = Path(__file__).resolve().parents[2] / "data" / "istio-corpus"
FILES = sorted(str(p) for p in CORPUS.rglob("*.yaml"))


def test_corpus_is_present_with_its_readme() -> None:
    assert len(FILES) >= 50
    readme = (CORPUS / "README.md").read_text()
    assert "istio/istio" in readme and "copy" in readme


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(Path(p).relative_to(CORPUS)))
def test_each_file_alone_has_no_problems(path: str) -> None:
    report = validate_paths([path])
    assert report.problems == []


def test_whole_directory_has_no_problems() -> None:
    report = validate_paths([str(CORPUS)])
    assert report.problems == []
    # kinds a sidecar does not act on are skipped with a warning, not an error
    assert any("Gateway/bookinfo-gateway: kind: skipped" in w for w in report.warnings)
    assert any(
        "VirtualService/bookinfo: spec.gateways: applies only to gateways" in w
        for w in report.warnings
    )
    assert any("VirtualService/tls-routing: spec.tls:" in w for w in report.warnings)


def test_whole_directory_translates() -> None:
    snap, report = build_snapshot([str(CORPUS)], ProxyIdentity(namespace="testns"))
    assert report.problems == []
    assert snap is not None
    assert "c-weighted.extsvc.com|v1" in snap.clusters
    assert snap.routes.exact["c-weighted.extsvc.com"].name == "testns/c-weighted"
    assert ".bar.com" in snap.routes.wildcards  # the *.bar.com ServiceEntry
