"""examples/kubernetes/: every manifest checked as ``kubectl apply`` and the cluster would.

Theory of operation
-------------------
No cluster runs here, so each document is checked offline, in three layers:

- **Schema.** Every Kubernetes document is validated strictly (unknown fields are errors)
  against the OpenAPI-derived JSON schemas that ``kubernetes-validate`` ships, for the oldest
  Kubernetes the manifests claim (1.29, native sidecars) and the newest it knows. Every Istio
  document goes through ``meshproxy validate``'s own loader with no problem and no warning.
- **References**, within each install set (what a user applies together: the control plane,
  the webhook and the demo, un-injected or injected): Deployment selectors select their
  template, Services and PodDisruptionBudgets select some Deployment's Pods and name ports
  those Pods have, probes name ports the container has, mounts name volumes the Pod has,
  service accounts and namespaces exist, the ClusterRole grants exactly what ``meshproxy
  control --kubernetes`` watches (``control.kube_watch.KINDS``), the webhook configuration
  points at the webhook Service on ``/inject``, and every command line parses with meshproxy's
  real parser.
- **Provenance.** The demo is examples/mesh/ and examples/demo_backend.py verbatim, the
  webhook injects with the same flags as the injected demo file, and that file is exactly what
  the real ``meshproxy inject`` prints for the un-injected one, so none of them can go stale.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from control.istio.load import load_paths
from meshproxy.cli import build_parser
from meshproxy.k8s import inject, webhook

REPO = Path(__file__).resolve().parents[2]
KUBE = REPO / "examples" / "kubernetes"
CONTROL = KUBE / "control-plane.yaml"
WEBHOOK = KUBE / "webhook.yaml"
APP = KUBE / "demo" / "app.yaml"
ISTIO = KUBE / "demo" / "istio.yaml"
INJECTED = KUBE / "demo" / "app-injected.yaml"

# How demo/app-injected.yaml is made (README.md, "Kubernetes manifests"); the webhook's
# Deployment passes the same injection flags.
INJECT_FLAGS = [
    "--image",
    inject.DEFAULT_IMAGE,
    "--control-plane",
    "https://meshproxy-control.istio-system.svc:15010",
    "--ca-configmap",
    "meshproxy-ca-root-cert",
    "--token-secret",
    "meshproxy-token-{serviceAccount}",
]

# What issue 6 has `meshproxy control --kubernetes` list and watch: (API group, resource).
WATCHED = {
    ("networking.istio.io", "virtualservices"),
    ("networking.istio.io", "destinationrules"),
    ("networking.istio.io", "serviceentries"),
    ("networking.istio.io", "workloadentries"),
    ("security.istio.io", "peerauthentications"),
    ("security.istio.io", "authorizationpolicies"),
    ("", "services"),
    ("", "pods"),
    ("discovery.k8s.io", "endpointslices"),
}
SCHEMA_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
ISTIO_GROUPS = ("networking.istio.io/", "security.istio.io/")
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "MutatingWebhookConfiguration"}
WORKLOADS = {"Deployment"}
SIDECAR_INIT = inject.INIT_NAME  # runs as root with NET_ADMIN/NET_RAW by design

Doc = dict[str, Any]


def load(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def install_sets() -> dict[str, list[Path]]:
    sets = {"webhook": [CONTROL, WEBHOOK, APP, ISTIO]}
    if INJECTED.exists():
        sets["injected"] = [CONTROL, WEBHOOK, INJECTED, ISTIO]
    return sets


SETS = install_sets()
ALL_FILES = sorted(KUBE.rglob("*.y*ml"))


def docs_of(paths: list[Path]) -> list[tuple[Path, Doc]]:
    return [(p, d) for p in paths for d in load(p)]


def ref(path: Path, doc: Doc) -> str:
    return f"{path.relative_to(REPO)}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def is_istio(doc: Doc) -> bool:
    return str(doc.get("apiVersion", "")).startswith(ISTIO_GROUPS)


def of_kind(docs: list[tuple[Path, Doc]], kind: str) -> list[tuple[Path, Doc]]:
    return [(p, d) for p, d in docs if d["kind"] == kind]


def pod_spec(doc: Doc) -> Doc:
    return doc["spec"]["template"]["spec"]


def containers(spec: Doc) -> Iterator[tuple[Doc, bool]]:
    """(container, is_init) for every container of a pod spec."""
    for c in spec.get("initContainers", []):
        yield c, True
    for c in spec["containers"]:
        yield c, False


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def deployment_named(docs: list[tuple[Path, Doc]], namespace: str, name: str) -> Doc:
    (doc,) = [
        d
        for _, d in of_kind(docs, "Deployment")
        if d["metadata"]["name"] == name and d["metadata"]["namespace"] == namespace
    ]
    return doc


def container_args(doc: Doc, name: str) -> list[str]:
    (c,) = [c for c in pod_spec(doc)["containers"] if c["name"] == name]
    return [str(a) for a in c.get("command", [])[1:]] + [str(a) for a in c.get("args", [])]


def parse(args: list[str]) -> Any:
    """A container's command line through meshproxy's real parser: every flag exists."""
    try:
        return build_parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"meshproxy {' '.join(args)}: rejected by meshproxy's parser")


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


# --------------------------------------------------------------------------- every document


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: str(p.relative_to(KUBE)))
def test_documents_have_identity_and_scope(path: Path) -> None:
    docs = load(path)
    assert docs
    for doc in docs:
        assert isinstance(doc, dict), path
        assert doc.get("apiVersion") and doc.get("kind"), ref(path, doc)
        meta = doc.get("metadata") or {}
        assert meta.get("name"), ref(path, doc)
        # namespaced objects name their namespace, so `kubectl apply -f` never puts them in
        # whatever namespace the kubeconfig happens to select
        assert ("namespace" in meta) == (doc["kind"] not in CLUSTER_SCOPED), ref(path, doc)


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: str(p.relative_to(KUBE)))
def test_kubernetes_schemas_strict(path: Path, version: str) -> None:
    checked = 0
    for doc in load(path):
        if is_istio(doc):
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(str(p) for p in e.path)
            pytest.fail(f"{ref(path, doc)}: {where}: {e.message} (Kubernetes {version})")
        checked += 1
    assert checked or all(is_istio(d) for d in load(path))


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: str(p.relative_to(KUBE)))
def test_istio_documents_pass_meshproxy_validate(path: Path) -> None:
    loaded = load_paths([str(path)])
    assert loaded.report.problems == []
    istio_docs = [d for d in load(path) if is_istio(d)]
    skipped = len(load(path)) - len(istio_docs)
    # the only warnings: "not an Istio kind, skipped", once per Kubernetes document
    assert len(loaded.report.warnings) == skipped, loaded.report.warnings
    assert all(": kind: skipped: " in w for w in loaded.report.warnings)
    assert sorted((r.kind, r.name) for r in loaded.resources.all()) == sorted(
        (d["kind"], d["metadata"]["name"]) for d in istio_docs
    )


# --------------------------------------------------------------------------- install sets


@pytest.fixture(params=sorted(SETS), ids=str)
def docs(request: pytest.FixtureRequest) -> list[tuple[Path, Doc]]:
    return docs_of(SETS[request.param])


def test_names_are_unique_and_namespaces_exist(docs: list[tuple[Path, Doc]]) -> None:
    keys = [(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for _, d in docs]
    assert len(keys) == len(set(keys))
    namespaces = {d["metadata"]["name"] for _, d in of_kind(docs, "Namespace")}
    for path, doc in docs:
        ns = doc["metadata"].get("namespace")
        assert ns is None or ns in namespaces, f"{ref(path, doc)}: namespace {ns} not created"


def test_deployments(docs: list[tuple[Path, Doc]]) -> None:
    deployments = of_kind(docs, "Deployment")
    assert deployments
    accounts = {
        (d["metadata"]["namespace"], d["metadata"]["name"])
        for _, d in of_kind(docs, "ServiceAccount")
    }
    for path, doc in deployments:
        where = ref(path, doc)
        spec = doc["spec"]
        template_labels = spec["template"]["metadata"]["labels"]
        assert selects(spec["selector"]["matchLabels"], template_labels), where
        assert set(spec["selector"]) == {"matchLabels"}, where
        assert spec["strategy"] == {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
        }, where
        pod = pod_spec(doc)
        ns = doc["metadata"]["namespace"]
        assert (ns, pod["serviceAccountName"]) in accounts, f"{where}: no such ServiceAccount"
        volumes = {v["name"] for v in pod.get("volumes", [])}
        pod_ctx = pod.get("securityContext", {})
        assert pod_ctx.get("runAsNonRoot") is True, where
        assert pod_ctx.get("seccompProfile") == {"type": "RuntimeDefault"}, where
        for c, is_init in containers(pod):
            cwhere = f"{where}: container {c['name']}"
            assert c["name"] and c["image"] == inject.DEFAULT_IMAGE, cwhere
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes, f"{cwhere}: mounts unknown volume {m['name']}"
            assert c["resources"]["requests"] and c["resources"]["limits"], cwhere
            ctx = c["securityContext"]
            if is_init and c["name"] == SIDECAR_INIT:  # the capture rules need root, briefly
                assert ctx["capabilities"] == {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]}
                continue
            assert ctx["allowPrivilegeEscalation"] is False, cwhere
            assert ctx["readOnlyRootFilesystem"] is True, cwhere
            assert ctx["capabilities"] == {"drop": ["ALL"]}, cwhere
            assert ctx.get("runAsNonRoot", True) is True, cwhere
            assert ctx.get("runAsUser", pod_ctx.get("runAsUser")) != 0, cwhere
            assert c.get("readinessProbe"), f"{cwhere}: no readinessProbe"
            if c["name"] != inject.SIDECAR_NAME:  # the sidecar has Istio's startup probe
                assert c.get("livenessProbe"), f"{cwhere}: no livenessProbe"
            ports = {p["name"] for p in c.get("ports", []) if "name" in p} | {
                p["containerPort"] for p in c.get("ports", [])
            }
            # the kubelet probes the pod IP: a rewritten app probe (Istio's
            # rewriteAppHTTPProbe) asks the sidecar's declared health port
            if c["name"] != inject.SIDECAR_NAME:
                ports |= {
                    p["containerPort"]
                    for s, _ in containers(pod)
                    if s["name"] == inject.SIDECAR_NAME
                    for p in s.get("ports", [])
                }
            for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
                probe = c.get(kind)
                if probe is None:
                    continue
                action = probe.get("httpGet") or probe.get("tcpSocket")
                assert action is not None, f"{cwhere}: {kind} is neither httpGet nor tcpSocket"
                assert action["port"] in ports, f"{cwhere}: {kind} port {action['port']}"


def test_every_meshproxy_command_line_parses(docs: list[tuple[Path, Doc]]) -> None:
    """Containers of the meshproxy image without ``command`` run its ENTRYPOINT (meshproxy)
    with ``args``; exec hooks name ``meshproxy`` themselves. All go through the real parser,
    so a manifest (or the injector) cannot pass a flag meshproxy does not have."""
    lines: list[list[str]] = []
    for _, doc in of_kind(docs, "Deployment"):
        for c, _ in containers(pod_spec(doc)):
            if "command" not in c:
                lines.append([str(a) for a in c["args"]])
            hook = c.get("lifecycle", {}).get("postStart", {}).get("exec", {}).get("command")
            if hook:
                assert hook[0] == "meshproxy"
                lines.append([str(a) for a in hook[1:]])
    commands = {parse(line).command for line in lines}
    assert {"control", "webhook"} <= commands
    if any(inject.STATUS_ANNOTATION in json_of(d) for _, d in docs):
        assert {"run", "capture", "wait"} <= commands


def json_of(doc: Doc) -> str:
    return yaml.safe_dump(doc)


def _pods(docs: list[tuple[Path, Doc]], ns: str, selector: dict[str, str]) -> list[Doc]:
    return [
        d
        for _, d in of_kind(docs, "Deployment")
        if d["metadata"]["namespace"] == ns
        and selects(selector, d["spec"]["template"]["metadata"]["labels"])
    ]


def test_services_select_pods_with_their_ports(docs: list[tuple[Path, Doc]]) -> None:
    services = of_kind(docs, "Service")
    assert services
    for path, doc in services:
        selected = _pods(docs, doc["metadata"]["namespace"], doc["spec"]["selector"])
        assert selected, f"{ref(path, doc)}: selects no Deployment's Pods"
        for port in doc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for d in selected:
                have = [
                    p
                    for c in pod_spec(d)["containers"]
                    for p in c.get("ports", [])
                    if target in (p.get("name"), p["containerPort"])
                ]
                assert have, f"{ref(path, doc)}: {d['metadata']['name']} has no port {target}"


def test_disruption_budgets_protect_without_blocking_drains(
    docs: list[tuple[Path, Doc]],
) -> None:
    budgets = of_kind(docs, "PodDisruptionBudget")
    assert {d["metadata"]["name"] for _, d in budgets} >= {
        "meshproxy-control",
        "meshproxy-webhook",
        "reviews",
    }
    for path, doc in budgets:
        selected = _pods(docs, doc["metadata"]["namespace"], doc["spec"]["selector"]["matchLabels"])
        assert selected, f"{ref(path, doc)}: selects no Deployment's Pods"
        replicas = sum(d["spec"]["replicas"] for d in selected)
        # one Pod may always be evicted, so a node drain is never stuck on this budget
        assert 0 < doc["spec"]["minAvailable"] < replicas, ref(path, doc)


def test_rbac_grants_exactly_what_the_control_plane_watches(
    docs: list[tuple[Path, Doc]],
) -> None:
    (role,) = [
        d for _, d in of_kind(docs, "ClusterRole") if d["metadata"]["name"] == "meshproxy-control"
    ]
    granted: set[tuple[str, str]] = set()
    for rule in role["rules"]:
        assert rule["verbs"] == ["get", "list", "watch"], rule
        assert "resourceNames" not in rule
        granted |= {(g, r) for g in rule["apiGroups"] for r in rule["resources"]}
    assert granted == WATCHED
    from control.kube_watch import KINDS  # what the Kubernetes source really watches

    assert {(k.group, k.plural) for k in KINDS} == WATCHED
    (binding,) = of_kind(docs, "ClusterRoleBinding")
    binding_doc = binding[1]
    assert binding_doc["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    control = deployment_named(docs, "istio-system", "meshproxy-control")
    assert binding_doc["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": pod_spec(control)["serviceAccountName"],
            "namespace": "istio-system",
        }
    ]


def _service_port(docs: list[tuple[Path, Doc]], ns: str, name: str, port: int) -> Doc:
    (svc,) = [
        d
        for _, d in of_kind(docs, "Service")
        if d["metadata"]["name"] == name and d["metadata"]["namespace"] == ns
    ]
    (p,) = [p for p in svc["spec"]["ports"] if p["port"] == port]
    return p


def _container_port(doc: Doc, container: str, name: str) -> int:
    (c,) = [c for c in pod_spec(doc)["containers"] if c["name"] == container]
    (p,) = [p for p in c["ports"] if p.get("name") == name]
    return int(p["containerPort"])


def test_control_plane_command_line(docs: list[tuple[Path, Doc]]) -> None:
    control = deployment_named(docs, "istio-system", "meshproxy-control")
    args = container_args(control, "control")
    ns = parse(args)
    assert (ns.command, ns.kubernetes, ns.listen) == ("control", True, ("0.0.0.0", 15010))
    (mount,) = [
        m for c in pod_spec(control)["containers"] for m in c["volumeMounts"] if m["name"] == "ca"
    ]
    assert mount["mountPath"] == ns.ca_dir == "/etc/meshproxy/ca"
    # the URL the sidecars are given reaches this Service and is named in its certificate
    url = urlsplit(flag(INJECT_FLAGS, "--control-plane"))
    svc, svc_ns, _ = url.hostname.split(".", 2)
    port = _service_port(docs, svc_ns, svc, url.port)
    assert _container_port(control, "control", port["targetPort"]) == ns.listen[1]
    assert url.scheme == "https" and url.hostname in ns.server_name


def test_webhook_command_line_and_configuration(docs: list[tuple[Path, Doc]]) -> None:
    hook = deployment_named(docs, "istio-system", "meshproxy-webhook")
    args = container_args(hook, "webhook")
    ns = parse(args)
    assert ns.command == "webhook" and ns.listen == ("0.0.0.0", 15017)
    # the webhook injects exactly as demo/app-injected.yaml was made
    assert args[args.index("--image") :] == INJECT_FLAGS
    (mount,) = pod_spec(hook)["containers"][0]["volumeMounts"][:1]
    assert Path(ns.cert).parent == Path(ns.key).parent == Path(mount["mountPath"])

    (config,) = [d for _, d in of_kind(docs, "MutatingWebhookConfiguration")]
    assert config["apiVersion"] == "admissionregistration.k8s.io/v1"
    (wh,) = config["webhooks"]
    target = wh["clientConfig"]["service"]
    assert target["path"] == webhook.INJECT_PATH == "/inject"
    port = _service_port(docs, target["namespace"], target["name"], target["port"])
    assert _container_port(hook, "webhook", port["targetPort"]) == ns.listen[1]
    assert wh["rules"] == [
        {
            "operations": ["CREATE"],
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "resources": ["pods"],
            "scope": "Namespaced",
        }
    ]
    assert wh["namespaceSelector"] == {"matchLabels": {"meshproxy-injection": "enabled"}}
    assert wh["objectSelector"] == {
        "matchExpressions": [{"key": inject.INJECT_KEY, "operator": "NotIn", "values": ["false"]}]
    }
    assert (wh["failurePolicy"], wh["sideEffects"], wh["reinvocationPolicy"]) == (
        "Fail",
        "None",
        "Never",
    )
    assert wh["admissionReviewVersions"] == ["v1"]
    # the control plane and the webhook are never injected themselves
    for name in ("meshproxy-control", "meshproxy-webhook"):
        d = deployment_named(docs, "istio-system", name)
        assert d["spec"]["template"]["metadata"]["annotations"][inject.INJECT_KEY] == "false"
    (istio_system,) = [
        d for _, d in of_kind(docs, "Namespace") if d["metadata"]["name"] == "istio-system"
    ]
    assert "meshproxy-injection" not in istio_system["metadata"].get("labels", {})


# --------------------------------------------------------------------------- the demo


def test_demo_is_the_standalone_demo() -> None:
    docs = load(APP)
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert cm["data"]["demo_backend.py"] == (REPO / "examples" / "demo_backend.py").read_text()
    (ns,) = [d for d in docs if d["kind"] == "Namespace"]
    assert ns["metadata"]["labels"]["meshproxy-injection"] == "enabled"
    standalone = {
        (d["kind"], d["metadata"]["name"]): d["spec"]
        for d in load(REPO / "examples" / "mesh" / "reviews.yaml")
        if d["kind"] != "ServiceEntry"  # in Kubernetes the Service is the registry
    }
    routing = {(d["kind"], d["metadata"]["name"]): d["spec"] for d in load(ISTIO)}
    assert routing == standalone
    # the Service and the Pods carry what the ServiceEntry said: port 9080, app/version labels
    (entry,) = [
        d for d in load(REPO / "examples" / "mesh" / "reviews.yaml") if d["kind"] == "ServiceEntry"
    ]
    (reviews,) = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "reviews"]
    assert [p["port"] for p in reviews["spec"]["ports"]] == [
        p["number"] for p in entry["spec"]["ports"]
    ]
    pod_labels = [
        d["spec"]["template"]["metadata"]["labels"]
        for d in docs
        if d["kind"] == "Deployment" and d["metadata"]["labels"]["app"] == "reviews"
    ]
    assert pod_labels == [e["labels"] for e in entry["spec"]["endpoints"]]
    # the apps do not run as the sidecar's uid, whose traffic is never captured
    for d in docs:
        if d["kind"] == "Deployment":
            assert pod_spec(d)["securityContext"]["runAsUser"] != inject.PROXY_UID


def inject_cli(path: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "meshproxy", "inject", "-f", str(path), *INJECT_FLAGS],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def split_header(text: str) -> tuple[str, str]:
    lines = text.splitlines(keepends=True)
    n = 0
    while n < len(lines) and lines[n].startswith("#"):
        n += 1
    return "".join(lines[:n]), "".join(lines[n:])


@pytest.mark.skipif(not INJECTED.exists(), reason="demo/app-injected.yaml not generated")
def test_injected_demo_is_meshproxy_inject_of_the_demo() -> None:
    header, body = split_header(INJECTED.read_text())
    assert "meshproxy inject" in header
    expected = inject_cli(APP)
    if os.environ.get("UPDATE_GOLDEN") == "1":  # after an intended injector change; review it
        INJECTED.write_text(header + expected)
        body = expected
    assert body == expected, "demo/app-injected.yaml is stale: UPDATE_GOLDEN=1 regenerates it"
    docs = load(INJECTED)
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    assert len(deployments) == 3
    for d in deployments:
        names = [c["name"] for c in pod_spec(d)["containers"]]
        assert names[0] == inject.SIDECAR_NAME and len(names) == 2
        assert [c["name"] for c in pod_spec(d)["initContainers"]] == [inject.INIT_NAME]
    # injecting the injected file changes nothing
    assert split_header(INJECTED.read_text())[1] == inject_cli(INJECTED)
