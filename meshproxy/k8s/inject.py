"""Sidecar injection: a pure function from a Kubernetes object to the same object with meshproxy.

Theory of operation
-------------------
:func:`inject` takes one parsed object (a dict, as YAML or JSON gives it) and returns an
:class:`InjectResult`: the injected object (a new dict; the input is never mutated) or the input
itself with the reason it was left alone. It does no I/O, so ``meshproxy inject`` (files) and
``meshproxy webhook`` (admission requests) share it, and the tests compare whole manifests.

The pod template is found per kind (:data:`TEMPLATE_PATHS`): the object itself for a Pod,
``spec.template`` for Deployment / StatefulSet / DaemonSet / Job / ReplicaSet /
ReplicationController, ``spec.jobTemplate.spec.template`` for a CronJob. Anything else passes
through. A workload is skipped, as Istio's ``injectRequired`` does, when it is already injected
(the :data:`STATUS_ANNOTATION` or a container named :data:`SIDECAR_NAME`: this is what makes
``inject(inject(x)) == inject(x)``), when its pod uses ``hostNetwork``, when its namespace is one of
:data:`IGNORED_NAMESPACES`, or when ``sidecar.meshproxy.io/inject`` (label first, then annotation,
Istio's precedence) is anything but empty / ``y`` / ``yes`` / ``true`` / ``on``.

What is added mirrors Istio's ``injection-template.yaml`` under the ``meshproxy.io`` domain:

- init container ``meshproxy-init``: ``meshproxy capture`` with istio-iptables' arguments
  (``-p 15001 -z 15006 -u 1337 -i -x -b -d 15090,15021 -o``) in capture's long flag names, the
  ``traffic.sidecar.meshproxy.io/*`` annotations filling them in; root with NET_ADMIN/NET_RAW.
- the sidecar ``meshproxy``: ``meshproxy run --control-plane URL --node-id
  $(POD_NAME).$(POD_NAMESPACE)``; the downward-API env Istio gives ``istio-proxy``; uid/gid 1337,
  non-root, no privilege escalation, every capability dropped, read-only root filesystem (a
  memory ``emptyDir`` on ``/tmp``, where the TLS code writes its short-lived key files);
  Istio's default resources unless ``sidecar.meshproxy.io/proxyCPU`` & co. say otherwise;
  readiness and startup probes on ``/healthz/ready`` port 15021.
- Ports: 15001 (outbound) and 15006 (inbound) are reached only through the capture rules and
  15000 (admin) is bound to 127.0.0.1, so none of them is a ``containerPort`` (Istio declares none
  either); 15021 (health) and 15090 (metrics, Istio's ``http-envoy-prom`` name so existing
  Prometheus scrape configs find it) are.
- Inbound: the sidecar's inbound listener is ``0.0.0.0:15006`` (REDIRECT rewrites an inbound
  connection's destination to the pod IP) and ``--app`` is ``127.0.0.1:<first TCP containerPort
  of the first app container that declares one>``; a pod without a declared port gets no inbound
  listener (the proxy then serves outbound only, with ``--stop-order sidecar`` so that on
  SIGTERM it keeps serving the app's outbound calls as a sidecar with an inbound side does)
  and no inbound capture (``--include-inbound-ports ''``, overriding ``includeInboundPorts``):
  redirected to 15006, an inbound connection would find nothing listening and be refused.
  ``meshproxy run``'s ``--app`` takes one address today; the original-destination forwarding
  of capture makes the other ports work. The inbound listener speaks HTTP/1.1 only, so a
  declared port whose name says (Istio's protocol selection by prefix: ``grpc-x``, ``tcp``...)
  anything but HTTP / HTTP_PROXY / undeclared -- ``grpc``, ``grpc-web``, ``http2``,
  ``https``, ``tls``, ``tcp``, ``mongo``, ``redis``, ``mysql`` -- is
  added to ``--exclude-inbound-ports`` and is never ``--app``: its clients reach the app
  directly (no mTLS, no policy on that port, as with Istio's ``excludeInboundPorts``).
- Ordering (holdApplicationUntilProxyStarts, ON by default here, off in Istio): the sidecar is
  the first container and has a ``postStart`` hook running ``meshproxy wait`` against its health
  endpoint, so the kubelet starts the app only once the proxy is ready.
  ``sidecar.meshproxy.io/holdApplicationUntilProxyStarts: "false"`` appends it last, no hook.
  With native sidecars (``--native-sidecar`` or ``sidecar.meshproxy.io/nativeSidecar: "true"``)
  the sidecar is an init container right after ``meshproxy-init`` with ``restartPolicy: Always``;
  its startup probe then gates the app containers, so no hook is needed.
- Application probes (Istio's rewriteAppHTTPProbe, on unless
  ``sidecar.meshproxy.io/rewriteAppHTTPProbers: "false"``): a plaintext kubelet probe of a
  captured port is refused under PeerAuthentication STRICT, so each app container's httpGet /
  tcpSocket readiness, liveness and startup probe becomes ``httpGet`` on 15021 at
  ``/app-health/<container>/readyz|livez|startupz`` (timings kept), and the originals (named
  ports resolved) go to ``run --app-probers`` as Istio's ``ISTIO_KUBE_APP_PROBERS`` JSON; the
  sidecar's health listener performs them on localhost (:mod:`meshproxy.lifecycle`).
- Jobs: ``sidecar.meshproxy.io/exitWithApp: "port:8080"`` passes ``--exit-with-app`` so the
  sidecar drains and exits once the app's port is gone and the Job can complete (without it,
  the app calls ``POST 127.0.0.1:15000/quitquitquit``, or use native sidecars).
- Pod metadata: labels ``security.meshproxy.io/tlsMode``, ``service.meshproxy.io/canonical-name``
  and ``-revision`` (from ``app.kubernetes.io/name`` / ``app`` / the workload name and
  ``app.kubernetes.io/version`` / ``version`` / ``latest``), annotations
  ``sidecar.meshproxy.io/status`` (JSON naming what was injected, like ``sidecar.istio.io/status``),
  ``kubectl.kubernetes.io/default-container`` / ``default-logs-container`` (so ``kubectl logs``
  still picks the app when the sidecar is first), and Prometheus scrape annotations for 15090
  unless the pod already has its own.

A malformed workload (``containers`` not a list, an annotation that must be a number and is
not, a volume of its own named ``meshproxy-tmp`` or an init container named ``meshproxy-init``
that the injection would duplicate...) raises :class:`InjectError` naming the field path; the
commands turn it into exit 2 or a refused admission.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

SIDECAR_NAME = "meshproxy"
INIT_NAME = "meshproxy-init"
TMP_VOLUME = "meshproxy-tmp"
CA_VOLUME = "meshproxy-ca"
TOKEN_VOLUME = "meshproxy-token"
CA_MOUNT = "/etc/meshproxy/ca"
TOKEN_MOUNT = "/var/run/secrets/meshproxy/token"
CA_KEY = "ca.pem"  # the key of the --ca-configmap ConfigMap (meshproxy ca init's file name)
TOKEN_KEY = "token"  # the key of the --token-secret Secret

DOMAIN = "meshproxy.io"
STATUS_ANNOTATION = f"sidecar.{DOMAIN}/status"
INJECT_KEY = f"sidecar.{DOMAIN}/inject"
HOLD_ANNOTATION = f"sidecar.{DOMAIN}/holdApplicationUntilProxyStarts"
NATIVE_ANNOTATION = f"sidecar.{DOMAIN}/nativeSidecar"
IMAGE_ANNOTATION = f"sidecar.{DOMAIN}/proxyImage"
LOG_LEVEL_ANNOTATION = f"sidecar.{DOMAIN}/logLevel"
EXIT_WITH_APP_ANNOTATION = f"sidecar.{DOMAIN}/exitWithApp"
REWRITE_PROBES_ANNOTATION = f"sidecar.{DOMAIN}/rewriteAppHTTPProbers"
TLS_MODE_LABEL = f"security.{DOMAIN}/tlsMode"
CANONICAL_NAME_LABEL = f"service.{DOMAIN}/canonical-name"
CANONICAL_REVISION_LABEL = f"service.{DOMAIN}/canonical-revision"
TRAFFIC = f"traffic.sidecar.{DOMAIN}"
READINESS = f"readiness.status.sidecar.{DOMAIN}"
RESOURCE_ANNOTATIONS = {  # annotation -> (requests|limits, cpu|memory), as Istio's
    f"sidecar.{DOMAIN}/proxyCPU": ("requests", "cpu"),
    f"sidecar.{DOMAIN}/proxyMemory": ("requests", "memory"),
    f"sidecar.{DOMAIN}/proxyCPULimit": ("limits", "cpu"),
    f"sidecar.{DOMAIN}/proxyMemoryLimit": ("limits", "memory"),
}

PROXY_UID = 1337
OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
ADMIN_PORT = 15000
HEALTH_PORT = 15021
METRICS_PORT = 15090
HEALTH_PATH = "/healthz/ready"
METRICS_PATH = "/stats/prometheus"
HEALTH_URL = f"http://127.0.0.1:{HEALTH_PORT}{HEALTH_PATH}"
# probe field -> the /app-health/<container>/<suffix> the rewritten probe asks (Istio's names)
APP_PROBES = (
    ("readinessProbe", "readyz"),
    ("livenessProbe", "livez"),
    ("startupProbe", "startupz"),
)
WAIT_COMMAND = ["meshproxy", "wait", "--url", HEALTH_URL, "--timeout", "60s"]

DEFAULT_IMAGE = "meshproxy:0.1.0"
DEFAULT_CONTROL_PLANE = "http://meshproxy-control.istio-system.svc:15010"
# Istio's defaults (values.yaml global.proxy.resources)
DEFAULT_RESOURCES: dict[str, dict[str, str]] = {
    "requests": {"cpu": "100m", "memory": "128Mi"},
    "limits": {"cpu": "2000m", "memory": "1Gi"},
}
# Istio's global.proxy.readiness* defaults and its startup probe
READINESS_DEFAULTS = {"initialDelaySeconds": 0, "periodSeconds": 15, "failureThreshold": 4}
STARTUP_PROBE_FAILURE_THRESHOLD = 600

# Istio's IgnoredNamespaces: never injected, whatever the object says
IGNORED_NAMESPACES = ("kube-system", "kube-public", "kube-node-lease", "local-path-storage")
# labels a controller stamps on its pods: not part of the workload's identity for --labels
CONTROLLER_LABELS = frozenset(
    {
        "pod-template-hash",
        "controller-revision-hash",
        "pod-template-generation",
        "statefulset.kubernetes.io/pod-name",
        "apps.kubernetes.io/pod-index",
        "controller-uid",
        "job-name",
        "batch.kubernetes.io/controller-uid",
        "batch.kubernetes.io/job-name",
        "batch.kubernetes.io/job-completion-index",
    }
)

# kind -> where its pod template lives (the empty path: the object is the pod)
TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Pod": (),
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "ReplicationController": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}

# what the inbound listener (HTTP/1.1) serves: Istio's protocols that are HTTP/1, and None
# (no protocol declared: Istio sniffs, the listener tries HTTP/1)
HTTP1_PROTOCOLS = frozenset({"HTTP", "HTTP_PROXY", None})

_TRUE = ("y", "yes", "true", "on")
_FALSE = ("n", "no", "false", "off")
_LOG_LEVELS = ("debug", "info", "warning", "error")


class InjectError(ValueError):
    """A workload that cannot be injected as written; the message starts with the field path."""


@dataclass(frozen=True, slots=True)
class InjectOptions:
    """The injector's settings (``meshproxy inject`` / ``meshproxy webhook`` flags)."""

    image: str = DEFAULT_IMAGE
    control_plane: str = DEFAULT_CONTROL_PLANE
    # ConfigMap (key ca.pem) with the mesh CA an https control plane's certificate chains to
    ca_configmap: str | None = None
    # Secret (key token) holding the bootstrap token; "{serviceAccount}" is replaced by the
    # pod's service account, so one flag serves one Secret per service account
    token_secret: str | None = None
    image_pull_policy: str | None = None
    native_sidecar: bool = False
    hold_application: bool = True  # holdApplicationUntilProxyStarts, per pod by annotation
    resources: Mapping[str, Mapping[str, str]] = field(
        default_factory=lambda: copy.deepcopy(DEFAULT_RESOURCES)
    )


@dataclass(frozen=True, slots=True)
class InjectResult:
    """``obj``: the object to emit. ``injected``: whether a sidecar was added. ``reason``: why
    not (None when injected). ``workload``: whether the kind has a pod template at all."""

    obj: Any
    injected: bool
    reason: str | None
    workload: bool


def inject(obj: Any, opts: InjectOptions, namespace: str | None = None) -> InjectResult:
    """Inject ``obj`` (any parsed document). ``namespace``: the namespace the object goes to
    when its metadata names none (the admission request's); otherwise "default"."""
    if not isinstance(obj, dict):
        return InjectResult(obj, False, "not a Kubernetes object", False)
    kind = obj.get("kind")
    if not isinstance(kind, str) or kind not in TEMPLATE_PATHS:
        return InjectResult(
            obj, False, f"{kind or 'an object without kind'} is not a workload", False
        )
    tpl_path = TEMPLATE_PATHS[kind]
    pod = _template(obj, tpl_path)
    meta = _mapping(pod, "metadata", tpl_path)
    spec = _mapping(pod, "spec", tpl_path)
    own_meta = _mapping(obj, "metadata", ())
    labels = _string_map(meta, "labels", (*tpl_path, "metadata"))
    annotations = _string_map(meta, "annotations", (*tpl_path, "metadata"))
    ns = _namespace(own_meta, meta, namespace)

    reason = _skip_reason(spec, labels, annotations, ns, tpl_path)
    if reason is not None:
        return InjectResult(obj, False, reason, True)

    out = copy.deepcopy(obj)
    out_pod = _template(out, tpl_path)
    _inject_pod(out_pod, kind, own_meta, labels, annotations, opts, tpl_path)
    return InjectResult(out, True, None, True)


# --------------------------------------------------------------------------- decisions


def _skip_reason(
    spec: dict[str, Any],
    labels: dict[str, str],
    annotations: dict[str, str],
    namespace: str,
    tpl_path: tuple[str, ...],
) -> str | None:
    if STATUS_ANNOTATION in annotations or _has_sidecar(spec, tpl_path):
        return "already injected"
    if spec.get("hostNetwork") is True:
        return "hostNetwork pod"
    if namespace in IGNORED_NAMESPACES:
        return f"namespace {namespace} is never injected"
    for where, values in (("label", labels), ("annotation", annotations)):
        if INJECT_KEY in values:  # the label wins over the annotation, as in Istio
            value = values[INJECT_KEY]
            if value.strip().lower() in ("", *_TRUE):
                return None
            return f"{where} {INJECT_KEY}={json.dumps(value)}"
    return None


def _has_sidecar(spec: dict[str, Any], tpl_path: tuple[str, ...]) -> bool:
    for key in ("containers", "initContainers"):
        for c in _containers(spec, key, tpl_path):
            if c.get("name") == SIDECAR_NAME:
                return True
    return False


def _flag(annotations: dict[str, str], key: str, default: bool, tpl_path: tuple[str, ...]) -> bool:
    if key not in annotations:
        return default
    value = annotations[key].strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise InjectError(
        f"{_annotation_path(tpl_path, key)}: expected true or false, got {annotations[key]!r}"
    )


def _whole(annotations: dict[str, str], key: str, default: int, tpl_path: tuple[str, ...]) -> int:
    if key not in annotations:
        return default
    text = annotations[key].strip()
    if not text.isdigit():
        raise InjectError(
            f"{_annotation_path(tpl_path, key)}: expected a whole number, got {annotations[key]!r}"
        )
    return int(text)


# --------------------------------------------------------------------------- the mutation


def _inject_pod(
    pod: dict[str, Any],
    kind: str,
    own_meta: dict[str, Any],
    labels: dict[str, str],
    annotations: dict[str, str],
    opts: InjectOptions,
    tpl_path: tuple[str, ...],
) -> None:
    if not isinstance(pod.get("metadata"), dict):  # absent or null
        pod["metadata"] = {}
    meta = pod["metadata"]
    spec = pod["spec"]
    native = _flag(annotations, NATIVE_ANNOTATION, opts.native_sidecar, tpl_path)
    hold = _flag(annotations, HOLD_ANNOTATION, opts.hold_application, tpl_path)
    app_containers = _containers(spec, "containers", tpl_path)
    if not app_containers:
        raise InjectError(f"{_dotted((*tpl_path, 'spec', 'containers'))}: a pod needs a container")

    # labels first: the sidecar's --labels carries the pod's identity, canonical labels included
    new_labels = dict(meta.get("labels") or {})
    new_labels.setdefault(TLS_MODE_LABEL, "istio")
    new_labels.setdefault(
        CANONICAL_NAME_LABEL,
        labels.get("app.kubernetes.io/name")
        or labels.get("app")
        or _workload_name(kind, own_meta, labels),
    )
    new_labels.setdefault(
        CANONICAL_REVISION_LABEL,
        labels.get("app.kubernetes.io/version") or labels.get("version") or "latest",
    )
    meta["labels"] = new_labels

    volumes = [_tmp_volume()]
    mounts = [{"name": TMP_VOLUME, "mountPath": "/tmp"}]
    if opts.ca_configmap:
        volumes.append(
            {
                "name": CA_VOLUME,
                "configMap": {
                    "name": opts.ca_configmap,
                    "items": [{"key": CA_KEY, "path": CA_KEY}],
                },
            }
        )
        mounts.append({"name": CA_VOLUME, "mountPath": CA_MOUNT, "readOnly": True})
    if opts.token_secret:
        sa = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
        secret = opts.token_secret.replace("{serviceAccount}", str(sa))
        volumes.append(
            {
                "name": TOKEN_VOLUME,
                "secret": {
                    "secretName": secret,
                    "items": [{"key": TOKEN_KEY, "path": TOKEN_KEY}],
                },
            }
        )
        mounts.append({"name": TOKEN_VOLUME, "mountPath": TOKEN_MOUNT, "readOnly": True})

    _check_collisions(spec, [v["name"] for v in volumes], tpl_path)
    resources = _resources(annotations, opts)
    probers: dict[str, Any] = {}
    if _flag(annotations, REWRITE_PROBES_ANNOTATION, True, tpl_path):
        probers = _rewrite_probes(app_containers, tpl_path)
    ports = _declared_ports(app_containers)
    app_port = next((port for port, http1 in ports if http1), None)
    not_http1 = [port for port, http1 in ports if not http1]
    init = _init_container(annotations, opts, resources, app_port is not None, not_http1, tpl_path)
    sidecar = _sidecar_container(
        app_port, probers, new_labels, annotations, opts, resources, mounts, tpl_path
    )
    if native:
        sidecar["restartPolicy"] = "Always"
        spec["initContainers"] = [init, sidecar, *_containers(spec, "initContainers", tpl_path)]
    else:
        spec["initContainers"] = [init, *_containers(spec, "initContainers", tpl_path)]
        if hold:
            sidecar["lifecycle"] = {"postStart": {"exec": {"command": list(WAIT_COMMAND)}}}
            spec["containers"] = [sidecar, *app_containers]
        else:
            spec["containers"] = [*app_containers, sidecar]
    spec["volumes"] = [*_list(spec, "volumes", tpl_path), *volumes]

    new_annotations = dict(meta.get("annotations") or {})
    first_app = app_containers[0].get("name")
    if isinstance(first_app, str):
        new_annotations.setdefault("kubectl.kubernetes.io/default-container", first_app)
        new_annotations.setdefault("kubectl.kubernetes.io/default-logs-container", first_app)
    if "prometheus.io/scrape" not in annotations:
        new_annotations["prometheus.io/scrape"] = "true"
        new_annotations["prometheus.io/port"] = str(METRICS_PORT)
        new_annotations["prometheus.io/path"] = METRICS_PATH
    new_annotations[STATUS_ANNOTATION] = json.dumps(
        {
            "initContainers": [INIT_NAME, SIDECAR_NAME] if native else [INIT_NAME],
            "containers": None if native else [SIDECAR_NAME],
            "volumes": [v["name"] for v in volumes],
            "imagePullSecrets": None,
            "revision": "default",
        },
        separators=(",", ":"),
    )
    meta["annotations"] = new_annotations


def _check_collisions(spec: dict[str, Any], volumes: list[str], tpl_path: tuple[str, ...]) -> None:
    """A volume or init container of the workload's own that has a name the injection adds
    would be emitted twice, which the API server rejects: refuse it here, naming the field.
    (A container named ``meshproxy`` means "already injected" and never gets this far.)"""
    base = (*tpl_path, "spec")
    for i, v in enumerate(_list(spec, "volumes", tpl_path)):
        name = v.get("name") if isinstance(v, dict) else None
        if name in volumes:
            raise InjectError(
                f"{_dotted((*base, 'volumes'))}[{i}].name: {name!r} is the name of a volume "
                "the injection adds; rename it"
            )
    for key in ("initContainers", "containers"):
        for i, c in enumerate(_containers(spec, key, tpl_path)):
            if c.get("name") == INIT_NAME:
                raise InjectError(
                    f"{_dotted((*base, key))}[{i}].name: {INIT_NAME!r} is the name of the "
                    "init container the injection adds; rename it"
                )


def _tmp_volume() -> dict[str, Any]:
    return {"name": TMP_VOLUME, "emptyDir": {"medium": "Memory"}}


def _resources(annotations: dict[str, str], opts: InjectOptions) -> dict[str, dict[str, str]]:
    """Istio's rule: any proxyCPU/proxyMemory(/Limit) annotation replaces the defaults whole."""
    if not any(key in annotations for key in RESOURCE_ANNOTATIONS):
        return {kind: dict(values) for kind, values in opts.resources.items()}
    out: dict[str, dict[str, str]] = {}
    for key, (kind, resource) in RESOURCE_ANNOTATIONS.items():
        if key in annotations:
            out.setdefault(kind, {})[resource] = annotations[key]
    return {kind: out[kind] for kind in ("requests", "limits") if kind in out}


def _init_container(
    annotations: dict[str, str],
    opts: InjectOptions,
    resources: dict[str, dict[str, str]],
    inbound: bool,
    not_http1: list[int],
    tpl_path: tuple[str, ...],
) -> dict[str, Any]:
    """istio-init's arguments (-p -z -u -i -x -b -d -o) in ``meshproxy capture``'s names,
    checked with capture's own parser so that a bad annotation fails injection (naming the
    annotation) rather than the pod's init container. Without an inbound listener
    (``inbound`` false) nothing inbound is captured, whatever ``includeInboundPorts`` says:
    a connection redirected to 15006 would find nothing listening there. ``not_http1``: the
    declared ports whose protocol the HTTP/1.1 inbound listener cannot serve, never captured."""
    from meshproxy.k8s.capture import CaptureError, parse_options

    sources = {  # capture flag -> (the annotation that sets it, Istio's default)
        "--include-outbound-cidrs": ("includeOutboundIPRanges", "*"),
        "--exclude-outbound-cidrs": ("excludeOutboundIPRanges", ""),
        "--include-inbound-ports": ("includeInboundPorts", "*"),
        "--exclude-inbound-ports": ("excludeInboundPorts", ""),
        "--exclude-outbound-ports": ("excludeOutboundPorts", ""),
    }
    values = {
        flag: annotations.get(f"{TRAFFIC}/{name}", default).strip()
        for flag, (name, default) in sources.items()
    }
    if not inbound:
        values["--include-inbound-ports"] = ""
    exclude_inbound = [str(METRICS_PORT), str(HEALTH_PORT)]  # never captured, as in Istio
    for p in [*values["--exclude-inbound-ports"].split(","), *map(str, not_http1)]:
        if p.strip() and p.strip() not in exclude_inbound:
            exclude_inbound.append(p.strip())
    values["--exclude-inbound-ports"] = ",".join(exclude_inbound)
    try:
        parse_options(
            proxy_port=str(OUTBOUND_PORT),
            inbound_port=str(INBOUND_PORT),
            proxy_uid=str(PROXY_UID),
            **{flag[2:].replace("-", "_"): value for flag, value in values.items()},
        )
    except CaptureError as e:  # e.flag is one of ``sources``: the other values are constants
        key = f"{TRAFFIC}/{sources[e.flag][0]}"
        problem = str(e).removeprefix(f"{e.flag}: ")
        raise InjectError(f"{_annotation_path(tpl_path, key)}: {problem}") from None
    args = [
        "capture",
        "--proxy-port",
        str(OUTBOUND_PORT),
        "--inbound-port",
        str(INBOUND_PORT),
        "--proxy-uid",
        str(PROXY_UID),
    ]
    for flag, value in values.items():
        args += [flag, value]
    container = _base_container(INIT_NAME, annotations, opts, args)
    container["resources"] = copy.deepcopy(resources)
    container["securityContext"] = {
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        "readOnlyRootFilesystem": False,
        "runAsGroup": 0,
        "runAsNonRoot": False,
        "runAsUser": 0,
    }
    return container


def _sidecar_container(
    app_port: int | None,
    probers: dict[str, Any],
    labels: dict[str, str],
    annotations: dict[str, str],
    opts: InjectOptions,
    resources: dict[str, dict[str, str]],
    mounts: list[dict[str, Any]],
    tpl_path: tuple[str, ...],
) -> dict[str, Any]:
    args = [
        "run",
        "--control-plane",
        opts.control_plane,
        "--node-id",
        "$(POD_NAME).$(POD_NAMESPACE)",
    ]
    if opts.ca_configmap:
        args += ["--control-plane-ca", f"{CA_MOUNT}/{CA_KEY}"]
    if opts.token_secret:
        args += ["--token-file", f"{TOKEN_MOUNT}/{TOKEN_KEY}"]
    args += ["--outbound", f"127.0.0.1:{OUTBOUND_PORT}"]
    if app_port is not None:
        args += ["--inbound", f"0.0.0.0:{INBOUND_PORT}", "--app", f"127.0.0.1:{app_port}"]
    else:  # no inbound listener: still a sidecar, serving the app's calls while it stops
        args += ["--stop-order", "sidecar"]
    args += [
        "--admin",
        f"127.0.0.1:{ADMIN_PORT}",
        "--health",
        f"0.0.0.0:{HEALTH_PORT}",
        "--metrics",
        f"0.0.0.0:{METRICS_PORT}",
        "--namespace",
        "$(POD_NAMESPACE)",
    ]
    identity = ",".join(f"{k}={v}" for k, v in sorted(labels.items()) if k not in CONTROLLER_LABELS)
    if identity:
        args += ["--labels", identity]
    if LOG_LEVEL_ANNOTATION in annotations:
        level = annotations[LOG_LEVEL_ANNOTATION].strip().lower()
        if level not in _LOG_LEVELS:
            raise InjectError(
                f"{_annotation_path(tpl_path, LOG_LEVEL_ANNOTATION)}: expected one of "
                f"{', '.join(_LOG_LEVELS)}, got {annotations[LOG_LEVEL_ANNOTATION]!r}"
            )
        args += ["--log-level", level]
    if EXIT_WITH_APP_ANNOTATION in annotations:  # Jobs: the sidecar ends with the app
        target = annotations[EXIT_WITH_APP_ANNOTATION].strip()
        from argparse import ArgumentTypeError

        from meshproxy.lifecycle import parse_app_target

        try:
            parse_app_target(target)
        except ArgumentTypeError as e:
            where = _annotation_path(tpl_path, EXIT_WITH_APP_ANNOTATION)
            raise InjectError(f"{where}: {e}") from None
        args += ["--exit-with-app", target]
    if probers:
        args += ["--app-probers", json.dumps(probers, separators=(",", ":"), sort_keys=True)]

    probe_handler = {"httpGet": {"path": HEALTH_PATH, "port": HEALTH_PORT}}
    readiness = {
        **copy.deepcopy(probe_handler),
        "initialDelaySeconds": _whole(
            annotations,
            f"{READINESS}/initialDelaySeconds",
            READINESS_DEFAULTS["initialDelaySeconds"],
            tpl_path,
        ),
        "periodSeconds": _whole(
            annotations, f"{READINESS}/periodSeconds", READINESS_DEFAULTS["periodSeconds"], tpl_path
        ),
        "timeoutSeconds": 3,
        "failureThreshold": _whole(
            annotations,
            f"{READINESS}/failureThreshold",
            READINESS_DEFAULTS["failureThreshold"],
            tpl_path,
        ),
    }
    container = _base_container(SIDECAR_NAME, annotations, opts, args)
    container.update(
        {
            "ports": [
                {"name": "http-health", "containerPort": HEALTH_PORT, "protocol": "TCP"},
                {"name": "http-envoy-prom", "containerPort": METRICS_PORT, "protocol": "TCP"},
            ],
            "env": [
                _field_env("POD_NAME", "metadata.name"),
                _field_env("POD_NAMESPACE", "metadata.namespace"),
                _field_env("INSTANCE_IP", "status.podIP"),
                _field_env("SERVICE_ACCOUNT", "spec.serviceAccountName"),
            ],
            "readinessProbe": readiness,
            "startupProbe": {
                **copy.deepcopy(probe_handler),
                "initialDelaySeconds": 0,
                "periodSeconds": 1,
                "timeoutSeconds": 3,
                "failureThreshold": STARTUP_PROBE_FAILURE_THRESHOLD,
            },
            "resources": copy.deepcopy(resources),
            "securityContext": {
                "allowPrivilegeEscalation": False,
                "privileged": False,
                "capabilities": {"drop": ["ALL"]},
                "readOnlyRootFilesystem": True,
                "runAsGroup": PROXY_UID,
                "runAsNonRoot": True,
                "runAsUser": PROXY_UID,
            },
            "volumeMounts": copy.deepcopy(mounts),
        }
    )
    return container


def _base_container(
    name: str, annotations: dict[str, str], opts: InjectOptions, args: list[str]
) -> dict[str, Any]:
    """name, image (``sidecar.meshproxy.io/proxyImage`` first), args, imagePullPolicy."""
    container: dict[str, Any] = {
        "name": name,
        "image": annotations.get(IMAGE_ANNOTATION) or opts.image,
        "args": args,
    }
    if opts.image_pull_policy:
        container["imagePullPolicy"] = opts.image_pull_policy
    return container


def _field_env(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def _rewrite_probes(containers: list[dict[str, Any]], tpl_path: tuple[str, ...]) -> dict[str, Any]:
    """Istio's rewriteAppHTTPProbe, in place on the (copied) app containers: each httpGet or
    tcpSocket readiness / liveness / startup probe becomes ``httpGet`` on the health port at
    ``/app-health/<container>/readyz|livez|startupz`` (thresholds and timings kept), and the
    original, its named port resolved against the container's ports, goes into the returned
    ``--app-probers`` map. A probe whose port name the container does not declare (the kubelet
    would fail it anyway), an exec or grpc probe, or a container without a name is left as is.
    Each original is checked with ``run --app-probers``' own parser, so a malformed probe
    fails injection naming its field rather than the sidecar at start-up."""
    from argparse import ArgumentTypeError

    from meshproxy.lifecycle import parse_app_probers

    probers: dict[str, Any] = {}
    for i, c in enumerate(containers):
        name = c.get("name")
        if not isinstance(name, str) or not name:
            continue
        named: dict[str, int] = {}
        for p in _list_or_empty(c.get("ports")):
            if isinstance(p, dict) and isinstance(p.get("name"), str):
                port = p.get("containerPort")
                if isinstance(port, int) and not isinstance(port, bool):
                    named.setdefault(p["name"], port)
        for field_name, suffix in APP_PROBES:
            probe = c.get(field_name)
            if not isinstance(probe, dict):
                continue
            kinds = [k for k in ("httpGet", "tcpSocket") if isinstance(probe.get(k), dict)]
            if len(kinds) != 1:
                continue
            kind = kinds[0]
            action = dict(probe[kind])
            port = action.get("port")
            if isinstance(port, str):
                port = int(port) if port.isdigit() else named.get(port)
            if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
                continue
            action["port"] = port
            timeout = probe.get("timeoutSeconds", 1)
            path = f"/app-health/{name}/{suffix}"
            entry = {kind: action, "timeoutSeconds": timeout}
            try:
                parse_app_probers(json.dumps({path: entry}))
            except ArgumentTypeError as e:
                where = _dotted((*tpl_path, "spec", "containers"))
                problem = str(e).removeprefix(f"{path}: ")
                raise InjectError(f"{where}[{i}].{field_name}: {problem}") from None
            probers[path] = entry
            c[field_name] = {
                "httpGet": {"path": path, "port": HEALTH_PORT, "scheme": "HTTP"},
                **{k: v for k, v in probe.items() if k != kind},
            }
    return probers


def _declared_ports(containers: list[dict[str, Any]]) -> list[tuple[int, bool]]:
    """The app containers' TCP ``containerPort`` s in order, each with whether the inbound
    listener (HTTP/1.1) can serve it: Istio's protocol selection by the port name's prefix says
    HTTP or HTTP_PROXY, or nothing (unnamed, or a prefix Istio does not know: Istio would sniff).
    A ContainerPort has no ``appProtocol`` (a Service port has), so the name is all there is."""
    from control.kube_registry import port_protocol

    out: list[tuple[int, bool]] = []
    for c in containers:
        for p in _list_or_empty(c.get("ports")):
            if not isinstance(p, dict):
                continue
            port = p.get("containerPort")
            if isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536:
                if str(p.get("protocol", "TCP")).upper() == "TCP":
                    name = p.get("name")
                    protocol = port_protocol(name if isinstance(name, str) else "", None)
                    if all(port != seen for seen, _ in out):
                        out.append((port, protocol in HTTP1_PROTOCOLS))
    return out


def _workload_name(kind: str, own_meta: dict[str, Any], labels: dict[str, str]) -> str:
    """Istio's DeploymentMeta.Name: the workload's name; for a bare Pod its controller's name
    (a ReplicaSet's without the pod-template-hash), its own name, or its generateName."""
    name = own_meta.get("name")
    if kind != "Pod":
        return str(name or kind.lower())
    for ref in _list_or_empty(own_meta.get("ownerReferences")):
        if isinstance(ref, dict) and ref.get("controller") and ref.get("name"):
            owner = str(ref["name"])
            suffix = "-" + labels.get("pod-template-hash", "\0")
            if ref.get("kind") == "ReplicaSet" and owner.endswith(suffix):
                return owner[: -len(suffix)]
            return owner
    if name:
        return str(name)
    return str(own_meta.get("generateName") or "pod").rstrip("-") or "pod"


def _namespace(own_meta: dict[str, Any], meta: dict[str, Any], namespace: str | None) -> str:
    for candidate in (own_meta.get("namespace"), meta.get("namespace"), namespace):
        if isinstance(candidate, str) and candidate:
            return candidate
    return "default"


# --------------------------------------------------------------------------- structure access


def _dotted(path: tuple[str, ...]) -> str:
    return ".".join(path) if path else "(object)"


def _annotation_path(tpl_path: tuple[str, ...], key: str) -> str:
    return f"{_dotted((*tpl_path, 'metadata', 'annotations'))}[{key}]"


def _template(obj: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    node: Any = obj
    for i, key in enumerate(path):
        nxt = node.get(key) if isinstance(node, dict) else None
        if not isinstance(nxt, dict):
            raise InjectError(f"{_dotted(path[: i + 1])}: missing or not a mapping")
        node = nxt
    return node


def _mapping(node: dict[str, Any], key: str, base: tuple[str, ...]) -> dict[str, Any]:
    value = node.get(key)
    if value is None:
        if key == "spec":
            raise InjectError(f"{_dotted((*base, key))}: missing")
        return {}
    if not isinstance(value, dict):
        raise InjectError(f"{_dotted((*base, key))}: expected a mapping")
    return value


def _string_map(meta: dict[str, Any], key: str, base: tuple[str, ...]) -> dict[str, str]:
    """Labels / annotations as strings (YAML may give ``inject: false`` unquoted)."""
    value = _mapping(meta, key, base)
    out: dict[str, str] = {}
    for k, v in value.items():
        if isinstance(v, bool):
            out[str(k)] = "true" if v else "false"
        elif v is None:
            out[str(k)] = ""
        else:
            out[str(k)] = str(v)
    return out


def _list_or_empty(value: Any) -> list[Any]:
    """Optional informational lists (container ports, owner references): the API server has
    validated them; anything else is read as none."""
    return value if isinstance(value, list) else []


def _list(spec: dict[str, Any], key: str, tpl_path: tuple[str, ...]) -> list[Any]:
    value = spec.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise InjectError(f"{_dotted((*tpl_path, 'spec', key))}: expected a list")
    return value


def _containers(spec: dict[str, Any], key: str, tpl_path: tuple[str, ...]) -> list[dict[str, Any]]:
    items = _list(spec, key, tpl_path)
    for i, c in enumerate(items):
        if not isinstance(c, dict):
            raise InjectError(f"{_dotted((*tpl_path, 'spec', key))}[{i}]: expected a mapping")
    return items
