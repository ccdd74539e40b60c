"""The injector's pure core, compared as whole manifests against golden files.

Each ``tests/data/inject/NAME.in.yaml`` is injected exactly as ``meshproxy inject -f
NAME.in.yaml ARGS`` would (ARGS from an optional first line ``# args: ...``, parsed by the real
argparse parser) and the output must equal ``NAME.out.yaml`` byte for byte; the stderr notes
(skipped workloads) must equal ``NAME.notes.txt`` (absent: none). To regenerate after an
intended change: ``UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/meshproxy/k8s/test_inject.py``,
then review the diff; without the variable a difference fails the test.
"""

from __future__ import annotations

import copy
import json
import os
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshproxy.cli import UsageError, build_parser
from meshproxy.k8s.capture import parse_options
from meshproxy.k8s.inject import (
    HOLD_ANNOTATION,
    INIT_NAME,
    SIDECAR_NAME,
    STATUS_ANNOTATION,
    WAIT_COMMAND,
    InjectError,
    InjectOptions,
    inject,
)
from meshproxy.k8s.inject_cli import (
    dump_documents,
    inject_documents,
    load_documents,
    options_from,
)

DATA = Path(__file__).resolve().parents[2] / "data" / "inject"
CASES = sorted(p.name[: -len(".in.yaml")] for p in DATA.glob("*.in.yaml"))
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"


def case_args(text: str) -> list[str]:
    first = text.splitlines()[0] if text else ""
    return shlex.split(first[len("# args:") :]) if first.startswith("# args:") else []


def options(args: list[str]) -> InjectOptions:
    return options_from(build_parser().parse_args(["inject", "-f", "-", *args]))


def run_case(name: str) -> tuple[str, str, list[Any], InjectOptions]:
    """(stdout text, stderr notes text, output documents, options) of one golden case."""
    text = (DATA / f"{name}.in.yaml").read_text()
    opts = options(case_args(text))
    docs, notes = inject_documents(f"{name}.in.yaml", load_documents(f"{name}.in.yaml", text), opts)
    note_text = "".join(f"meshproxy inject: {n}\n" for n in notes)
    return dump_documents(docs), note_text, docs, opts


def test_every_kind_has_a_case() -> None:
    assert len(CASES) >= 12
    kinds = set()
    for name in CASES:
        for _, doc in load_documents(name, (DATA / f"{name}.in.yaml").read_text()):
            kinds.add(doc["kind"])
            kinds.update(item["kind"] for item in doc.get("items", []))
    expected = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "Pod", "ReplicaSet"}
    assert expected | {"Service", "List", "ConfigMap", "VirtualService"} <= kinds


@pytest.mark.parametrize("name", CASES)
def test_golden(name: str) -> None:
    out, notes, _, _ = run_case(name)
    out_path, notes_path = DATA / f"{name}.out.yaml", DATA / f"{name}.notes.txt"
    if UPDATE:
        out_path.write_text(out)
        if notes:
            notes_path.write_text(notes)
        elif notes_path.exists():
            notes_path.unlink()
    assert out == out_path.read_text(), f"{name}: output differs from {out_path.name}"
    expected_notes = notes_path.read_text() if notes_path.exists() else ""
    assert notes == expected_notes


@pytest.mark.parametrize("name", CASES)
def test_golden_outputs_are_valid_kubernetes(name: str) -> None:
    """Every Kubernetes document of every output passes Kubernetes' own OpenAPI schema (1.30,
    strict: no unknown field), so ``kubectl apply`` would accept it; Istio kinds have no
    schema there and are skipped."""
    import kubernetes_validate

    _, _, docs, _ = run_case(name)
    checked = 0
    for doc in docs:
        for obj in doc.get("items", [doc]) if doc.get("kind") == "List" else [doc]:
            if obj["apiVersion"].endswith("istio.io/v1"):
                continue
            kubernetes_validate.validate(obj, "1.30", strict=True)
            checked += 1
    assert checked >= 1


@pytest.mark.parametrize("name", CASES)
def test_golden_injected_twice_equals_once(name: str) -> None:
    """Idempotence over every golden: the injected documents pass through a second run as
    they are, and every workload reports why ("already injected" or its skip reason)."""
    once, _, docs, opts = run_case(name)
    again, notes = inject_documents("again", list(enumerate(docs, 1)), opts)
    assert again == docs
    assert dump_documents(again) == once
    for line in notes:
        assert "not injected:" in line


def _pod_of(doc: dict[str, Any]) -> dict[str, Any]:
    if doc["kind"] == "Pod":
        return doc
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]
    return doc["spec"]["template"]


def test_deployment_injected_shape() -> None:
    """The facts the issue names, read off the parsed output rather than the bytes."""
    _, notes, docs, _ = run_case("multidoc-service-deployment")
    assert notes == ""
    assert [d["kind"] for d in docs] == ["Service", "ServiceAccount", "Deployment"]
    pod = _pod_of(docs[2])
    spec = pod["spec"]
    names = [c["name"] for c in spec["containers"]]
    assert names == [SIDECAR_NAME, "reviews"]  # hold: the sidecar first
    sidecar = spec["containers"][0]
    assert sidecar["lifecycle"] == {"postStart": {"exec": {"command": WAIT_COMMAND}}}
    assert WAIT_COMMAND == [
        "meshproxy",
        "wait",
        "--url",
        "http://127.0.0.1:15021/healthz/ready",
        "--timeout",
        "60s",
    ]
    args = sidecar["args"]
    assert args[:5] == ["run", "--control-plane", "http://meshproxy-control.istio-system.svc:15010",
                        "--node-id", "$(POD_NAME).$(POD_NAMESPACE)"]  # fmt: skip
    flags = dict(zip(args[1::2], args[2::2], strict=True))
    assert flags["--inbound"] == "0.0.0.0:15006"
    assert flags["--app"] == "127.0.0.1:9080"
    assert flags["--admin"] == "127.0.0.1:15000"
    assert flags["--outbound"] == "127.0.0.1:15001"
    assert flags["--health"] == "0.0.0.0:15021"
    assert flags["--metrics"] == "0.0.0.0:15090"
    assert sorted(p["containerPort"] for p in sidecar["ports"]) == [15021, 15090]
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/healthz/ready", "port": 15021}
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in sidecar["env"]}
    assert env == {
        "POD_NAME": "metadata.name",
        "POD_NAMESPACE": "metadata.namespace",
        "INSTANCE_IP": "status.podIP",
        "SERVICE_ACCOUNT": "spec.serviceAccountName",
    }
    sc = sidecar["securityContext"]
    assert (sc["runAsUser"], sc["runAsGroup"], sc["runAsNonRoot"]) == (1337, 1337, True)
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sidecar["resources"] == {
        "requests": {"cpu": "100m", "memory": "128Mi"},
        "limits": {"cpu": "2000m", "memory": "1Gi"},
    }
    init = spec["initContainers"][0]
    assert init["name"] == INIT_NAME and init["args"][0] == "capture"
    assert init["securityContext"]["capabilities"]["add"] == ["NET_ADMIN", "NET_RAW"]
    assert init["securityContext"]["runAsUser"] == 0
    assert init["securityContext"]["runAsNonRoot"] is False
    meta = pod["metadata"]
    assert meta["labels"]["security.meshproxy.io/tlsMode"] == "istio"
    assert meta["labels"]["service.meshproxy.io/canonical-name"] == "reviews"
    assert meta["labels"]["service.meshproxy.io/canonical-revision"] == "v1"
    status = json.loads(meta["annotations"][STATUS_ANNOTATION])
    assert status["containers"] == [SIDECAR_NAME]
    assert status["initContainers"] == [INIT_NAME]
    assert [v["name"] for v in spec["volumes"]] == ["tmp", *status["volumes"]]
    assert meta["annotations"]["prometheus.io/port"] == "15090"


@pytest.mark.parametrize("name", CASES)
def test_injected_command_lines_parse(name: str) -> None:
    """Every command the injector writes -- the sidecar's ``run``, the init container's
    ``capture``, the postStart ``wait`` -- is accepted by meshproxy's own parser, with the
    values the kubelet substitutes for ``$(POD_NAME)`` / ``$(POD_NAMESPACE)``; so a flag
    renamed in one command and not in the injector fails here."""
    _, _, docs, _ = run_case(name)
    parser = build_parser()
    seen = 0
    for doc in docs:
        for obj in doc.get("items", [doc]) if doc.get("kind") == "List" else [doc]:
            if obj.get("kind") not in ("Pod", "Deployment", "StatefulSet", "DaemonSet", "Job",
                                       "CronJob", "ReplicaSet"):  # fmt: skip
                continue
            spec = _pod_of(obj)["spec"]
            for c in spec["containers"] + spec.get("initContainers", []):
                if c["name"] not in (SIDECAR_NAME, INIT_NAME) or "args" not in c:
                    continue  # skip.in.yaml's hand-written "already injected" pod has none
                args = [a.replace("$(POD_NAME)", "p-1").replace("$(POD_NAMESPACE)", "ns")
                        for a in c["args"]]  # fmt: skip
                ns = parser.parse_args(args)
                assert ns.command == ("run" if c["name"] == SIDECAR_NAME else "capture")
                if ns.command == "run":
                    assert ns.node_id == "p-1.ns" and ns.namespace == "ns"
                    assert (ns.inbound is None) == (ns.app is None)
                    assert ns.health == ("0.0.0.0", 15021) and ns.metrics == ("0.0.0.0", 15090)
                hook = c.get("lifecycle", {}).get("postStart", {}).get("exec", {})
                if hook:
                    assert hook["command"][0] == "meshproxy"
                    assert parser.parse_args(hook["command"][1:]).command == "wait"
                seen += 1
    if name != "skip":
        assert seen >= 2


def _injected_pods(docs: list[Any]) -> list[dict[str, Any]]:
    """The injected pod templates of a case's output documents."""
    pods = []
    for doc in docs:
        for obj in doc.get("items", [doc]) if doc.get("kind") == "List" else [doc]:
            if obj.get("kind") not in ("Pod", "Deployment", "StatefulSet", "DaemonSet", "Job",
                                       "CronJob", "ReplicaSet"):  # fmt: skip
                continue
            pod = _pod_of(obj)
            names = [c["name"] for c in pod["spec"].get("initContainers", [])]
            if INIT_NAME in names:  # not skip.in.yaml's hand-written "already injected" pod
                pods.append(pod)
    return pods


def _injected(pod: dict[str, Any], name: str) -> dict[str, Any]:
    spec = pod["spec"]
    (c,) = [c for c in spec["containers"] + spec.get("initContainers", []) if c["name"] == name]
    return c


@pytest.mark.parametrize("name", CASES)
def test_inbound_capture_iff_inbound_listener(name: str) -> None:
    """The init container redirects inbound connections to 15006 exactly when the sidecar
    listens there: capture without a listener refuses every inbound connection."""
    _, _, docs, _ = run_case(name)
    parser = build_parser()
    pods = _injected_pods(docs)
    for pod in pods:
        run = parser.parse_args(_injected(pod, SIDECAR_NAME)["args"])
        capture = parser.parse_args(_injected(pod, INIT_NAME)["args"])

        opts = parse_options(
            include_inbound_ports=capture.include_inbound_ports,
            exclude_inbound_ports=capture.exclude_inbound_ports,
        )
        captures_inbound = opts.include_inbound_ports != ()
        assert captures_inbound == (run.inbound is not None), name
    if name not in ("skip",):
        assert pods


def test_no_declared_port_no_inbound_capture() -> None:
    """job.in.yaml declares no port: no --inbound, and capture is told to take no inbound
    port even when the pod's annotation asks for every one."""
    _, _, docs, _ = run_case("job")
    (pod,) = _injected_pods(docs)
    args = _injected(pod, INIT_NAME)["args"]
    assert args[args.index("--include-inbound-ports") + 1] == ""
    assert "--inbound" not in _injected(pod, SIDECAR_NAME)["args"]
    annotated = copy.deepcopy(
        _pod_of(load_documents("j", (DATA / "job.in.yaml").read_text())[0][1])
    )
    annotated.setdefault("metadata", {})["annotations"] = {
        "traffic.sidecar.meshproxy.io/includeInboundPorts": "*"
    }
    out = inject({"kind": "Pod", **annotated}, InjectOptions()).obj
    args = _injected(out, INIT_NAME)["args"]
    assert args[args.index("--include-inbound-ports") + 1] == ""


def test_app_probes_are_rewritten_to_the_health_port() -> None:
    """rewriteAppHTTPProbe: httpGet (named port resolved) and tcpSocket probes become
    httpGet :15021/app-health/<container>/<kind> with their timings, the originals reach
    the sidecar as --app-probers (accepted by run's parser); exec probes stay; the
    annotation "false" turns it off."""
    pod = {
        "kind": "Pod",
        "metadata": {"name": "p"},
        "spec": {
            "containers": [
                {
                    "name": "web",
                    "ports": [{"name": "http", "containerPort": 8080}],
                    "readinessProbe": {
                        "httpGet": {"path": "/r", "port": "http", "scheme": "HTTPS"},
                        "periodSeconds": 7,
                        "timeoutSeconds": 2,
                    },
                    "livenessProbe": {"tcpSocket": {"port": 8080}, "failureThreshold": 9},
                    "startupProbe": {"exec": {"command": ["true"]}},
                }
            ]
        },
    }
    out = inject(pod, InjectOptions()).obj
    web = _injected(out, "web")
    assert web["readinessProbe"] == {
        "httpGet": {"path": "/app-health/web/readyz", "port": 15021, "scheme": "HTTP"},
        "periodSeconds": 7,
        "timeoutSeconds": 2,
    }
    assert web["livenessProbe"] == {
        "httpGet": {"path": "/app-health/web/livez", "port": 15021, "scheme": "HTTP"},
        "failureThreshold": 9,
    }
    assert web["startupProbe"] == {"exec": {"command": ["true"]}}
    args = _injected(out, SIDECAR_NAME)["args"]
    probers = json.loads(args[args.index("--app-probers") + 1])
    assert probers == {
        "/app-health/web/readyz": {
            "httpGet": {"path": "/r", "port": 8080, "scheme": "HTTPS"},
            "timeoutSeconds": 2,
        },
        "/app-health/web/livez": {"tcpSocket": {"port": 8080}, "timeoutSeconds": 1},
    }
    ns = build_parser().parse_args(args)
    assert set(ns.app_probers) == set(probers)
    assert pod["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] == "http"

    off = copy.deepcopy(pod)
    off["metadata"]["annotations"] = {"sidecar.meshproxy.io/rewriteAppHTTPProbers": "false"}
    out = inject(off, InjectOptions()).obj
    assert _injected(out, "web")["readinessProbe"] == pod["spec"]["containers"][0]["readinessProbe"]
    assert "--app-probers" not in _injected(out, SIDECAR_NAME)["args"]


@pytest.mark.parametrize(
    ("probe", "message"),
    [
        (
            {"httpGet": {"port": 80}, "timeoutSeconds": "3"},
            "timeoutSeconds: expected a whole number >= 1",
        ),
        ({"httpGet": {"port": 80, "scheme": "FTP"}}, "httpGet.scheme: expected HTTP or HTTPS"),
        ({"httpGet": {"port": 80, "path": "ready"}}, "httpGet.path: expected an absolute path"),
    ],
)
def test_malformed_app_probes_name_the_field(probe: dict[str, Any], message: str) -> None:
    """A probe the sidecar's --app-probers parser would refuse fails injection, naming it."""
    doc = {
        "kind": "Pod",
        "spec": {"containers": [{"name": "a"}, {"name": "b", "livenessProbe": probe}]},
    }
    with pytest.raises(InjectError) as e:
        inject(doc, InjectOptions())
    assert str(e.value) == f"spec.containers[1].livenessProbe: {message}"


def test_annotations_case() -> None:
    _, _, docs, _ = run_case("deployment-annotations")
    spec = _pod_of(docs[0])["spec"]
    init_args = spec["initContainers"][0]["args"]
    flags = dict(zip(init_args[1::2], init_args[2::2], strict=True))
    assert flags == {
        "--proxy-port": "15001",
        "--inbound-port": "15006",
        "--proxy-uid": "1337",
        "--include-outbound-cidrs": "10.0.0.0/8,172.16.0.0/12",
        "--exclude-outbound-cidrs": "10.96.0.1/32",
        "--include-inbound-ports": "8080,8081",
        "--exclude-inbound-ports": "15090,15021,8081,9090",
        "--exclude-outbound-ports": "5432,6379",
    }
    sidecar = spec["containers"][0]
    # Istio's rule: annotations replace the default resources as a whole
    assert sidecar["resources"] == {"requests": {"cpu": "250m"}, "limits": {"memory": "256Mi"}}
    assert sidecar["image"] == "registry.example.com/mesh/meshproxy:0.1.1"
    assert sidecar["readinessProbe"]["periodSeconds"] == 5
    assert sidecar["readinessProbe"]["failureThreshold"] == 30
    assert sidecar["args"][-2:] == ["--log-level", "debug"]
    flags = dict(zip(sidecar["args"][1::2], sidecar["args"][2::2], strict=True))
    assert flags["--app"] == "127.0.0.1:8080"  # the UDP port of the first container is no app
    annotations = _pod_of(docs[0])["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "9090"  # the app's own scrape settings stay
    assert annotations["kubectl.kubernetes.io/default-container"] == "ratings"
    assert annotations["kubectl.kubernetes.io/default-logs-container"] == "metrics-exporter"


def test_native_and_hold_off() -> None:
    _, _, docs, _ = run_case("native-sidecar")
    spec = _pod_of(docs[0])["spec"]
    assert [c["name"] for c in spec["initContainers"]] == [INIT_NAME, SIDECAR_NAME, "fetch-config"]
    sidecar = spec["initContainers"][1]
    assert sidecar["restartPolicy"] == "Always"
    assert "lifecycle" not in sidecar and "startupProbe" in sidecar
    assert [c["name"] for c in spec["containers"]] == ["details"]

    _, _, docs, _ = run_case("hold-off")
    legacy, modern = (d["spec"] for d in docs)
    assert [c["name"] for c in legacy["containers"]] == ["legacy", SIDECAR_NAME]
    assert "lifecycle" not in legacy["containers"][1]
    assert [c["name"] for c in modern["initContainers"]] == [INIT_NAME, SIDECAR_NAME]
    assert "--inbound" not in modern["initContainers"][1]["args"]  # no declared port


def test_skip_reasons() -> None:
    _, notes, docs, _ = run_case("skip")
    original = [d for _, d in load_documents("skip", (DATA / "skip.in.yaml").read_text())]
    assert docs == original
    assert notes.splitlines() == [
        "meshproxy inject: skip.in.yaml: document 1 (Deployment/opted-out): not injected: "
        'annotation sidecar.meshproxy.io/inject="false"',
        "meshproxy inject: skip.in.yaml: document 2 (Deployment/label-wins): not injected: "
        'label sidecar.meshproxy.io/inject="false"',
        "meshproxy inject: skip.in.yaml: document 3 (DaemonSet/cni-agent): not injected: "
        "hostNetwork pod",
        "meshproxy inject: skip.in.yaml: document 4 (Deployment/coredns): not injected: "
        "namespace kube-system is never injected",
        "meshproxy inject: skip.in.yaml: document 5 (Pod/already): not injected: already injected",
    ]


def test_input_is_not_mutated_and_result_is_a_copy() -> None:
    _, docs = zip(*load_documents("x", (DATA / "statefulset.in.yaml").read_text()), strict=True)
    doc = docs[0]
    before = copy.deepcopy(doc)
    result = inject(doc, InjectOptions())
    assert result.injected and doc == before
    result.obj["spec"]["template"]["spec"]["containers"][1]["image"] = "changed"
    assert doc == before


def test_namespace_from_the_admission_request() -> None:
    pod = {"kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": [{"name": "a"}]}}
    assert inject(pod, InjectOptions(), namespace="shop").injected
    skipped = inject(pod, InjectOptions(), namespace="kube-public")
    assert not skipped.injected and skipped.obj is pod
    assert skipped.reason == "namespace kube-public is never injected"


@pytest.mark.parametrize(
    ("value", "injected"),
    [("true", True), ("YES", True), ("on", True), ("", True), ("false", False), ("no", False),
     ("disabled", False), (False, False), (True, True)],
)  # fmt: skip
def test_inject_annotation_values(value: object, injected: bool) -> None:
    """Istio's reading: y/yes/true/on (any case) or empty inject, anything else does not; an
    unquoted YAML boolean counts as its text."""
    pod = {
        "kind": "Pod",
        "metadata": {"name": "p", "annotations": {"sidecar.meshproxy.io/inject": value}},
        "spec": {"containers": [{"name": "a"}]},
    }
    assert inject(pod, InjectOptions()).injected is injected


def test_not_workloads() -> None:
    for doc in ({"kind": "Service", "metadata": {"name": "s"}}, {"apiVersion": "v1"}, [1], "x"):
        result = inject(doc, InjectOptions())
        assert result.obj is doc and not result.injected and not result.workload


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (
            {"kind": "Deployment", "metadata": {"name": "d"}, "spec": {}},
            "spec.template: missing or not a mapping",
        ),
        (
            {"kind": "CronJob", "spec": {"jobTemplate": {"spec": []}}},
            "spec.jobTemplate.spec: missing or not a mapping",
        ),
        (
            {"kind": "Pod", "spec": {"containers": {"name": "a"}}},
            "spec.containers: expected a list",
        ),
        ({"kind": "Pod", "spec": {"containers": []}}, "spec.containers: a pod needs a container"),
        ({"kind": "Pod", "spec": {"containers": ["a"]}}, "spec.containers[0]: expected a mapping"),
        ({"kind": "Pod", "metadata": {"name": "p"}}, "spec: missing"),
        (
            {"kind": "Pod", "metadata": {"labels": ["a"]}, "spec": {"containers": [{}]}},
            "metadata.labels: expected a mapping",
        ),
        (
            {
                "kind": "Deployment",
                "spec": {
                    "template": {
                        "metadata": {
                            "annotations": {
                                "readiness.status.sidecar.meshproxy.io/periodSeconds": "5s"
                            }
                        },
                        "spec": {"containers": [{"name": "a"}]},
                    }
                },
            },
            "spec.template.metadata.annotations[readiness.status.sidecar.meshproxy.io/"
            "periodSeconds]: expected a whole number, got '5s'",
        ),
        (
            {
                "kind": "Pod",
                "metadata": {"annotations": {HOLD_ANNOTATION: "maybe"}},
                "spec": {"containers": [{"name": "a"}]},
            },
            f"metadata.annotations[{HOLD_ANNOTATION}]: expected true or false, got 'maybe'",
        ),
        (
            {
                "kind": "Pod",
                "metadata": {
                    "annotations": {"traffic.sidecar.meshproxy.io/excludeInboundPorts": "80,http"}
                },
                "spec": {"containers": [{"name": "a"}]},
            },
            "metadata.annotations[traffic.sidecar.meshproxy.io/excludeInboundPorts]: 'http' is "
            "not a port (1-65535)",
        ),
        (
            {
                "kind": "Pod",
                "metadata": {
                    "annotations": {
                        "traffic.sidecar.meshproxy.io/excludeOutboundIPRanges": "10.0.0.0/8,10.1/33"
                    }
                },
                "spec": {"containers": [{"name": "a"}]},
            },
            "metadata.annotations[traffic.sidecar.meshproxy.io/excludeOutboundIPRanges]: "
            "'10.1/33' is not an IP address or CIDR",
        ),
        (
            {
                "kind": "Pod",
                "metadata": {"annotations": {"sidecar.meshproxy.io/logLevel": "trace"}},
                "spec": {"containers": [{"name": "a"}]},
            },
            "metadata.annotations[sidecar.meshproxy.io/logLevel]: expected one of debug, info, "
            "warning, error, got 'trace'",
        ),
        (
            {
                "kind": "Pod",
                "metadata": {"annotations": {"sidecar.meshproxy.io/exitWithApp": "port:x"}},
                "spec": {"containers": [{"name": "a"}]},
            },
            "metadata.annotations[sidecar.meshproxy.io/exitWithApp]: 'port:x': port: expects a "
            "number",
        ),
    ],
)
def test_inject_errors_name_the_field(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(InjectError) as e:
        inject(doc, InjectOptions())
    assert str(e.value) == message


@pytest.mark.parametrize(
    ("spec", "opts", "message"),
    [
        (
            {
                "containers": [{"name": "a"}],
                "volumes": [{"name": "data"}, {"name": "meshproxy-tmp"}],
            },
            InjectOptions(),
            "spec.template.spec.volumes[1].name: 'meshproxy-tmp' is the name of a volume the "
            "injection adds; rename it",
        ),
        (
            {"containers": [{"name": "a"}], "volumes": [{"name": "meshproxy-ca"}]},
            InjectOptions(ca_configmap="mesh-ca"),
            "spec.template.spec.volumes[0].name: 'meshproxy-ca' is the name of a volume the "
            "injection adds; rename it",
        ),
        (
            {"containers": [{"name": "a"}], "volumes": [{"name": "meshproxy-token"}]},
            InjectOptions(token_secret="tok"),
            "spec.template.spec.volumes[0].name: 'meshproxy-token' is the name of a volume the "
            "injection adds; rename it",
        ),
        (
            {"containers": [{"name": "a"}], "initContainers": [{"name": "meshproxy-init"}]},
            InjectOptions(),
            "spec.template.spec.initContainers[0].name: 'meshproxy-init' is the name of the init "
            "container the injection adds; rename it",
        ),
        (
            {"containers": [{"name": "a"}, {"name": "meshproxy-init"}]},
            InjectOptions(),
            "spec.template.spec.containers[1].name: 'meshproxy-init' is the name of the init "
            "container the injection adds; rename it",
        ),
    ],
)
def test_name_collisions_are_refused(
    spec: dict[str, Any], opts: InjectOptions, message: str
) -> None:
    """The workload's own volume or container with a name the injection adds would be emitted
    twice (the API server rejects duplicate names): refused, naming the field."""
    doc = {"kind": "Deployment", "metadata": {"name": "d"}, "spec": {"template": {"spec": spec}}}
    with pytest.raises(InjectError) as e:
        inject(doc, opts)
    assert str(e.value) == message
    # a volume that merely shares the prefix is fine
    spec = {"containers": [{"name": "a"}], "volumes": [{"name": "meshproxy-tmp2"}]}
    doc["spec"]["template"]["spec"] = spec
    assert inject(doc, opts).injected


def test_cli_level_errors_name_file_and_document() -> None:
    with pytest.raises(UsageError) as e:
        load_documents("f.yaml", "kind: Service\n---\nkind: Pod\nspec: [unclosed\n")
    assert str(e.value) == (
        "f.yaml: document 2: invalid YAML (line 5, column 1): did not find expected ',' or ']'"
    )
    with pytest.raises(UsageError, match=r"^f\.yaml: document 1: expected a mapping"):
        inject_documents("f.yaml", [(1, ["a"])], InjectOptions())
    with pytest.raises(UsageError) as e:
        inject_documents(
            "f.yaml", [(3, {"kind": "Pod", "metadata": {"name": "p"}})], InjectOptions()
        )
    assert str(e.value) == "f.yaml: document 3 (Pod/p): spec: missing"
    with pytest.raises(UsageError, match=r"^--control-plane ftp://x: "):
        options(["--control-plane", "ftp://x"])


def test_anchors_are_written_out_plainly() -> None:
    text = "kind: ConfigMap\ndata: &d {a: '1'}\nmetadata: {name: m, labels: *d}\n"
    docs, _ = inject_documents("f", load_documents("f", text), InjectOptions())
    assert dump_documents(docs) == "kind: ConfigMap\ndata:\n  a: '1'\nmetadata:\n  name: m\n" \
        "  labels:\n    a: '1'\n"  # fmt: skip


def test_empty_documents_are_dropped() -> None:
    docs = load_documents("f", "---\n# only a comment\n---\nkind: Service\n---\n")
    assert docs == [(2, {"kind": "Service"})]


# --------------------------------------------------------------------------- properties

_names = st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True)
_values = st.one_of(_names, st.sampled_from(["true", "false", "", "1", "y", "off"]))
_keys = st.one_of(
    _names,
    st.sampled_from(
        [
            "app",
            "version",
            "sidecar.meshproxy.io/inject",
            "sidecar.meshproxy.io/nativeSidecar",
            HOLD_ANNOTATION,
            "traffic.sidecar.meshproxy.io/excludeOutboundPorts",
            "prometheus.io/scrape",
        ]
    ),
)
_ports = st.lists(
    st.fixed_dictionaries(
        {"containerPort": st.integers(1, 65535)},
        optional={"protocol": st.sampled_from(["TCP", "UDP"]), "name": _names},
    ),
    max_size=3,
)
_container = st.fixed_dictionaries(
    {"name": _names, "image": _names}, optional={"ports": _ports, "args": st.lists(_names)}
)
_pod_spec = st.fixed_dictionaries(
    {"containers": st.lists(_container, min_size=1, max_size=3)},
    optional={
        "initContainers": st.lists(_container, max_size=2),
        "hostNetwork": st.booleans(),
        "serviceAccountName": _names,
        "volumes": st.lists(st.fixed_dictionaries({"name": _names, "emptyDir": st.just({})})),
    },
)
_meta = st.fixed_dictionaries(
    {},
    optional={
        "name": _names,
        "namespace": st.sampled_from(["default", "shop", "kube-system"]),
        "labels": st.dictionaries(_keys, _values, max_size=4),
        "annotations": st.dictionaries(_keys, _values, max_size=4),
    },
)
_pod_template = st.fixed_dictionaries({"metadata": _meta, "spec": _pod_spec})


@st.composite
def workloads(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["Pod", "Deployment", "StatefulSet", "Job", "CronJob"]))
    template = draw(_pod_template)
    if kind == "Pod":
        return {"apiVersion": "v1", "kind": "Pod", **template}
    meta = draw(_meta)
    if kind == "CronJob":
        spec = {"jobTemplate": {"spec": {"template": template}}}
    else:
        spec = {"template": template}
    return {"kind": kind, "metadata": meta, "spec": spec}


def _valid_annotations(doc: dict[str, Any]) -> bool:
    """Hypothesis also draws annotation values the injector must refuse; those are tested
    above, here only the documents it accepts count."""
    try:
        inject(doc, InjectOptions())
    except InjectError:
        return False
    return True


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(doc=workloads().filter(_valid_annotations), native=st.booleans(), hold=st.booleans())
def test_injecting_twice_equals_injecting_once(
    doc: dict[str, Any], native: bool, hold: bool
) -> None:
    opts = InjectOptions(native_sidecar=native, hold_application=hold)
    before = copy.deepcopy(doc)
    once = inject(doc, opts)
    assert doc == before  # never mutated
    twice = inject(once.obj, opts)
    assert twice.obj == once.obj
    assert not twice.injected
    if once.injected:
        assert twice.reason == "already injected"
        spec = _pod_of(once.obj)["spec"]
        every = [c["name"] for c in spec["containers"] + spec["initContainers"]]
        assert every.count(SIDECAR_NAME) == 1 and every.count(INIT_NAME) == 1
        assert spec["initContainers"][0]["name"] == INIT_NAME
        # round trip through YAML, as the CLI writes it
        assert yaml.safe_load(dump_documents([once.obj])) == once.obj


def json_paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path into a JSON value, the root's ``()`` first."""
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += json_paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += json_paths(v, (*prefix, i))
    return out


def replaced(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    """``doc`` (copied) with the node at ``path`` replaced by ``value``."""
    if not path:
        return copy.deepcopy(value)
    out = copy.deepcopy(doc)
    node = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = copy.deepcopy(value)
    return out


JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-2, 70000),
    st.text(max_size=4),
    st.lists(st.none() | st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=2), st.none() | st.integers(), max_size=2),
)
FUZZ_BASE = yaml.safe_load((DATA / "deployment-annotations.in.yaml").read_text())
FUZZ_PATHS = json_paths(FUZZ_BASE)


@settings(max_examples=500, deadline=None)
@given(
    edits=st.lists(st.tuples(st.sampled_from(FUZZ_PATHS), JUNK), min_size=1, max_size=3),
    as_pod=st.booleans(),
)
def test_malformed_workloads_raise_inject_error_only(
    edits: list[tuple[tuple[Any, ...], Any]], as_pod: bool
) -> None:
    """Any field of a workload replaced by any JSON value: the injector answers or raises
    InjectError (exit 2 / a refused admission), never another exception."""
    doc: Any = FUZZ_BASE
    for path, value in edits:
        try:
            doc = replaced(doc, path, value)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit removed that path
    if as_pod and isinstance(doc, dict) and isinstance(doc.get("spec"), dict):
        template = doc["spec"].get("template")
        doc = {"kind": "Pod", **template} if isinstance(template, dict) else doc
    try:
        result = inject(doc, InjectOptions())
    except InjectError:
        return
    if result.injected:
        assert inject(result.obj, InjectOptions()).reason == "already injected"
