"""``meshproxy inject`` and ``meshproxy webhook``: argparse wiring, YAML in and out.

Theory of operation
-------------------
:func:`add_inject_parsers` registers both commands on :mod:`meshproxy.cli`'s subparsers with
the same injection flags (:func:`options_from`). ``inject`` reads ``-f FILE`` (``-`` = stdin)
as multi-document YAML, runs every document through the pure
:func:`meshproxy.k8s.inject.inject` (the items of a ``kind: List`` one by one), and writes the
documents back in their order, as multi-document YAML, to stdout or ``-o OUT``. Non-workload
documents (Services, ConfigMaps, Istio resources...) come out unchanged; empty documents are
dropped as kubectl drops them. Keys keep their input order and the injected parts have a fixed
order, so the same input always gives the same bytes. A skipped workload is reported on stderr
(``FILE: document N (Kind/name): not injected: REASON``). Bad YAML, a document that is not a
mapping, or a workload the injector refuses: exit 2 with ``FILE: document N...`` and nothing
written. ``webhook`` checks its files and serves :mod:`meshproxy.k8s.webhook` until SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from meshproxy.cli import LOG_LEVELS, UsageError, parse_addr, setup_logging
from meshproxy.k8s.inject import DEFAULT_CONTROL_PLANE, DEFAULT_IMAGE, InjectError, InjectOptions

DEFAULT_WEBHOOK_LISTEN = "0.0.0.0:15017"  # istiod's injection webhook port
PULL_POLICIES = ("Always", "IfNotPresent", "Never")

_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Dumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):  # type: ignore[misc]
    """Plain YAML: a value the input shared through an anchor is written out each time
    (kubectl and most tools accept ``&id001`` / ``*id001``, but a reader should not meet them)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _add_injection_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("injection")
    g.add_argument(
        "--image",
        default=DEFAULT_IMAGE,
        help=f"image of the sidecar and of its init container [{DEFAULT_IMAGE}]",
    )
    g.add_argument(
        "--control-plane",
        default=DEFAULT_CONTROL_PLANE,
        metavar="URL",
        help=f"the control plane the sidecars subscribe to [{DEFAULT_CONTROL_PLANE}]",
    )
    g.add_argument(
        "--ca-configmap",
        default=None,
        metavar="NAME",
        help="ConfigMap (key ca.pem: the mesh CA) mounted into the sidecar to verify an https "
        "control plane (--control-plane-ca)",
    )
    g.add_argument(
        "--token-secret",
        default=None,
        metavar="NAME",
        help="Secret (key token: meshproxy ca token) mounted into the sidecar as its "
        "--token-file; {serviceAccount} in NAME is replaced by the pod's service account",
    )
    g.add_argument(
        "--image-pull-policy", choices=PULL_POLICIES, default=None, help="[Kubernetes' default]"
    )
    g.add_argument(
        "--native-sidecar",
        action="store_true",
        help="emit the sidecar as an init container with restartPolicy: Always (Kubernetes "
        "native sidecars, 1.29+); per pod: annotation sidecar.meshproxy.io/nativeSidecar",
    )
    g.add_argument(
        "--hold-application-until-proxy-starts",
        dest="hold_application",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="sidecar first, the app started once it is ready (meshproxy wait postStart hook); "
        "per pod: annotation sidecar.meshproxy.io/holdApplicationUntilProxyStarts [on]",
    )


def add_inject_parsers(sub: Any) -> None:
    inj = sub.add_parser(
        "inject",
        help="add the meshproxy sidecar to Kubernetes workloads (like istioctl kube-inject)",
        description="Read Kubernetes YAML (multi-document; Deployment, StatefulSet, DaemonSet, "
        "Job, CronJob, Pod, ReplicaSet, ReplicationController, also inside kind: List) and "
        "write it back with the meshproxy sidecar and its meshproxy capture init container. "
        "Other documents pass through unchanged; skipped workloads are named on stderr.",
    )
    inj.add_argument(
        "-f", "--filename", required=True, metavar="FILE", help="input YAML; - reads stdin"
    )
    inj.add_argument(
        "-o", "--output", default=None, metavar="OUT", help="write here instead of stdout"
    )
    _add_injection_flags(inj)

    wh = sub.add_parser(
        "webhook",
        help="serve the sidecar injector as a mutating admission webhook",
        description="Serve POST /inject over TLS: AdmissionReview (admission.k8s.io/v1) in, "
        "AdmissionReview out with a JSONPatch adding the sidecar to the Pod. GET /ready "
        "answers 200. Prints 'listening webhook=HOST:PORT' once bound.",
    )
    wh.add_argument(
        "--listen",
        type=parse_addr,
        default=DEFAULT_WEBHOOK_LISTEN,
        metavar="ADDR",
        help=f"HOST:PORT to serve on (port 0: OS-chosen) [{DEFAULT_WEBHOOK_LISTEN}]",
    )
    wh.add_argument("--cert", required=True, metavar="FILE", help="serving certificate (PEM)")
    wh.add_argument(
        "--key", required=True, metavar="FILE", help="its private key (PEM); both re-read on change"
    )
    wh.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="[info]")
    _add_injection_flags(wh)


def options_from(ns: argparse.Namespace) -> InjectOptions:
    from meshproxy.sources.stream import parse_control_url

    try:
        parse_control_url(ns.control_plane)
    except ValueError as e:
        raise UsageError(f"--control-plane {ns.control_plane}: {e}") from None
    for flag, value in (("--image", ns.image), ("--ca-configmap", ns.ca_configmap)):
        if value is not None and not value.strip():
            raise UsageError(f"{flag}: must not be empty")
    if ns.token_secret is not None and not ns.token_secret.strip():
        raise UsageError("--token-secret: must not be empty")
    return InjectOptions(
        image=ns.image,
        control_plane=ns.control_plane,
        ca_configmap=ns.ca_configmap,
        token_secret=ns.token_secret,
        image_pull_policy=ns.image_pull_policy,
        native_sidecar=ns.native_sidecar,
        hold_application=ns.hold_application,
    )


# --------------------------------------------------------------------------- inject


def _read(path: str) -> tuple[str, str]:
    """(display name, text) of ``-f``."""
    if path == "-":
        name = "<stdin>"
        data = sys.stdin.buffer.read()
    else:
        from certs.ca import read_file

        name = path
        data = read_file(Path(path), UsageError)
    try:
        return name, data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UsageError(f"{name}: not UTF-8 text (byte {e.start})") from None


def load_documents(name: str, text: str) -> list[tuple[int, Any]]:
    """The non-empty documents of ``text``; bad YAML -> UsageError naming the document."""
    docs: list[tuple[int, Any]] = []
    index = 0
    try:
        for doc in yaml.load_all(text, Loader=_Loader):
            index += 1
            if doc is not None:
                docs.append((index, doc))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UsageError(f"{name}: document {index + 1}: invalid YAML{where}: {problem}") from None
    return docs


def _describe(obj: Any) -> str:
    if not isinstance(obj, dict):
        return ""
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    return f" ({obj.get('kind', '?')}/{meta.get('name') or meta.get('generateName') or '?'})"


def inject_documents(
    name: str, docs: list[tuple[int, Any]], opts: InjectOptions
) -> tuple[list[Any], list[str]]:
    """(output documents, stderr notes) for ``(index, document)`` pairs."""
    from meshproxy.k8s.inject import inject

    out: list[Any] = []
    notes: list[str] = []

    def one(obj: Any, where: str) -> Any:
        try:
            result = inject(obj, opts)
        except InjectError as e:
            raise UsageError(f"{name}: {where}{_describe(obj)}: {e}") from None
        if result.workload and not result.injected:
            notes.append(f"{name}: {where}{_describe(obj)}: not injected: {result.reason}")
        return result.obj

    for index, doc in docs:
        where = f"document {index}"
        if not isinstance(doc, dict):
            raise UsageError(f"{name}: {where}: expected a mapping (a Kubernetes object)")
        if doc.get("kind") == "List" and isinstance(doc.get("items"), list):
            items = [one(item, f"{where} items[{i}]") for i, item in enumerate(doc["items"])]
            out.append({**doc, "items": items})
        else:
            out.append(one(doc, where))
    return out, notes


def dump_documents(docs: list[Any]) -> str:
    return yaml.dump_all(
        docs,
        Dumper=_Dumper,
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=True,
        width=4096,
        explicit_start=len(docs) > 1,
    )


def run_inject(ns: argparse.Namespace) -> int:
    opts = options_from(ns)
    if ns.output is not None and os.path.isdir(ns.output):
        raise UsageError(f"-o {ns.output}: is a directory")
    name, text = _read(ns.filename)
    docs, notes = inject_documents(name, load_documents(name, text), opts)
    rendered = dump_documents(docs) if docs else ""
    for note in notes:
        print(f"meshproxy inject: {note}", file=sys.stderr)
    if ns.output is None:
        sys.stdout.write(rendered)
        sys.stdout.flush()
        return 0
    tmp = f"{ns.output}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(rendered)
        os.replace(tmp, ns.output)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise UsageError(f"-o {ns.output}: {e.strerror or e}") from None
    return 0


# --------------------------------------------------------------------------- webhook


def run_webhook(ns: argparse.Namespace) -> int:
    import ssl

    opts = options_from(ns)
    for flag, path in (("--cert", ns.cert), ("--key", ns.key)):
        if not os.path.isfile(path):
            raise UsageError(f"{flag} {path}: no such file")
    from meshproxy.k8s.webhook import ReloadingCert, run_until_signalled

    try:
        cert = ReloadingCert(ns.cert, ns.key)
    except (ssl.SSLError, OSError) as e:
        raise UsageError(f"--cert {ns.cert} / --key {ns.key}: not a usable pair: {e}") from None
    setup_logging(ns.log_level)
    import prometheus_client
    import uvloop

    prometheus_client.disable_created_metrics()  # no *_created series in /metrics

    host, port = ns.listen
    return uvloop.run(run_until_signalled(host, port, cert, opts))
