"""PeerAuthentication resolution (pure): Istio's documented examples and precedence rules."""

from __future__ import annotations

import pytest
import yaml

from control.istio import Resources, ValidationReport, load_documents
from control.istio.security import translate_security
from meshproxy.config.model import Meta
from meshproxy.config.security import MtlsMode, PeerAuthnPolicy, PeerAuthnTable
from meshproxy.core.peerauthn import resolve_mtls, resolve_workload

STRICT, PERMISSIVE, DISABLE = MtlsMode.STRICT, MtlsMode.PERMISSIVE, MtlsMode.DISABLE


def pa(name: str, ns: str, spec: str) -> str:
    body = "\n".join("  " + line for line in spec.strip("\n").splitlines()) or "  {}"
    return (
        f"apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
        f"metadata: {{name: {name}, namespace: {ns}}}\nspec:\n{body}\n---\n"
    )


def table(text: str) -> PeerAuthnTable:
    report = ValidationReport()
    docs = list(yaml.load_all(text, Loader=yaml.CSafeLoader))
    res = Resources.of(load_documents("pa.yaml", docs, report))
    assert report.ok, report.problems
    return translate_security(res).config.peer_authn


APP = {"app": "finance"}


def test_default_is_permissive() -> None:
    assert resolve_mtls(PeerAuthnTable(), "foo", APP, 8080) is PERMISSIVE


def test_doc_example_namespace_strict() -> None:
    t = table(pa("default", "foo", "mtls: {mode: STRICT}"))
    assert resolve_mtls(t, "foo", APP, 80) is STRICT
    assert resolve_mtls(t, "bar", APP, 80) is PERMISSIVE


def test_doc_example_workload_strict_with_port_disable() -> None:
    t = table(
        pa(
            "finance",
            "foo",
            "selector: {matchLabels: {app: finance}}\nmtls: {mode: STRICT}\n"
            "portLevelMtls:\n  8080: {mode: DISABLE}",
        )
    )
    assert resolve_mtls(t, "foo", APP, 80) is STRICT
    assert resolve_mtls(t, "foo", APP, 8080) is DISABLE
    assert resolve_mtls(t, "foo", {"app": "other"}, 8080) is PERMISSIVE


def test_doc_example_workload_inherits_and_disables_one_port() -> None:
    t = table(
        pa("default", "foo", "mtls: {mode: STRICT}")
        + pa(
            "finance",
            "foo",
            "selector: {matchLabels: {app: finance}}\nportLevelMtls:\n  8080: {mode: DISABLE}",
        )
    )
    assert resolve_mtls(t, "foo", APP, 80) is STRICT
    assert resolve_mtls(t, "foo", APP, 8080) is DISABLE


def test_mesh_wide_in_root_namespace() -> None:
    t = table(pa("default", "istio-system", "mtls: {mode: STRICT}"))
    assert resolve_mtls(t, "anything", {}, 80) is STRICT
    assert resolve_mtls(t, "istio-system", {}, 80) is STRICT


def test_precedence_workload_over_namespace_over_mesh() -> None:
    t = table(
        pa("mesh", "istio-system", "mtls: {mode: STRICT}")
        + pa("ns", "foo", "mtls: {mode: PERMISSIVE}")
        + pa("wl", "foo", "selector: {matchLabels: {app: finance}}\nmtls: {mode: DISABLE}")
    )
    assert resolve_mtls(t, "foo", APP, 80) is DISABLE
    assert resolve_mtls(t, "foo", {"app": "x"}, 80) is PERMISSIVE
    assert resolve_mtls(t, "bar", APP, 80) is STRICT
    w = resolve_workload(t, "foo", APP)
    assert w.policies == ("istio-system/mesh", "foo/ns", "foo/wl")


@pytest.mark.parametrize("unset", ["mtls: {mode: UNSET}", "mtls: {}", ""])
def test_unset_inherits_from_parent(unset: str) -> None:
    t = table(
        pa("mesh", "istio-system", "mtls: {mode: STRICT}")
        + pa("ns", "foo", unset)
        + pa("wl", "foo", "selector: {matchLabels: {app: finance}}\n" + unset)
    )
    assert resolve_mtls(t, "foo", APP, 80) is STRICT


def test_unset_port_inherits_workload_mode() -> None:
    t = table(
        pa(
            "wl",
            "foo",
            "selector: {matchLabels: {app: finance}}\nmtls: {mode: DISABLE}\n"
            "portLevelMtls:\n  9000: {mode: UNSET}\n  9001: {mode: STRICT}",
        )
    )
    assert resolve_mtls(t, "foo", APP, 9000) is DISABLE
    assert resolve_mtls(t, "foo", APP, 9001) is STRICT


def test_oldest_wins_within_a_level() -> None:
    t = table(
        pa("first", "foo", "mtls: {mode: STRICT}")
        + pa("second", "foo", "mtls: {mode: DISABLE}")
        + pa("w1", "foo", "selector: {matchLabels: {app: finance}}\nmtls: {mode: PERMISSIVE}")
        + pa("w2", "foo", "selector: {matchLabels: {tier: db}}\nmtls: {mode: DISABLE}")
    )
    assert resolve_mtls(t, "foo", {"tier": "db"}, 80) is DISABLE
    assert resolve_mtls(t, "foo", {"app": "finance", "tier": "db"}, 80) is PERMISSIVE
    assert resolve_mtls(t, "foo", {}, 80) is STRICT


def test_rank_orders_by_timestamp_then_name() -> None:
    def p(name: str, rank: tuple[object, ...], mode: MtlsMode) -> PeerAuthnPolicy:
        return PeerAuthnPolicy(Meta("PeerAuthentication", name, "foo"), "foo", mode=mode, rank=rank)

    t = PeerAuthnTable.of(
        [
            p("b", ("2024-01-01T00:00:00Z", "b"), STRICT),
            p("a", ("2024-01-02T00:00:00Z", "a"), DISABLE),
            p("c", ("2024-01-01T00:00:00Z", "c"), PERMISSIVE),
        ]
    )
    assert resolve_mtls(t, "foo", {}, 80) is STRICT


def test_selector_policy_in_root_namespace_applies_to_no_workload() -> None:
    t = table(
        pa(
            "rootsel",
            "istio-system",
            "selector: {matchLabels: {app: finance}}\nmtls: {mode: STRICT}",
        )
    )
    assert resolve_mtls(t, "foo", APP, 80) is PERMISSIVE
    assert resolve_mtls(t, "istio-system", APP, 80) is PERMISSIVE
    assert len(t) == 0


def test_selector_must_be_subset_of_labels() -> None:
    t = table(
        pa("wl", "foo", "selector: {matchLabels: {app: finance, v: '1'}}\nmtls: {mode: STRICT}")
    )
    assert resolve_mtls(t, "foo", {"app": "finance"}, 80) is PERMISSIVE
    assert resolve_mtls(t, "foo", {"app": "finance", "v": "1", "x": "y"}, 80) is STRICT


def test_corpus_peer_authn_strict() -> None:
    from pathlib import Path

    from control.istio import load_paths

    f = (
        Path(__file__).resolve().parents[3]
        / "tests/data/istio-corpus/testdata/peer-authn-strict.yaml"
    )
    loaded = load_paths([str(f)])
    assert loaded.report.ok
    t = translate_security(loaded.resources).config.peer_authn
    assert resolve_mtls(t, "testns", {}, 80) is STRICT
    assert resolve_mtls(t, "default", {}, 80) is PERMISSIVE
