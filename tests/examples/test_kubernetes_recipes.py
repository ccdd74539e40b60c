"""examples/kubernetes/: the set-up the manifests document, done for real on loopback.

Theory of operation
-------------------
The manifests only work if what their comments tell a user to create fits what the containers
do with it, and if their probes name endpoints that answer. Without a cluster, each
server is started here as the manifest starts it (the container's own arguments, read from the
YAML, with only the listen address moved to ``127.0.0.1:0`` and file paths moved into a
scratch directory) and reached the way Kubernetes would reach it:

- **Webhook.** The ``openssl`` commands in webhook.yaml's header make the serving
  certificate; ``meshproxy webhook`` serves it; a client that trusts only that certificate
  (what the ``caBundle`` patch gives the API server) and checks the name
  ``<service>.<namespace>.svc`` of the MutatingWebhookConfiguration connects, the probes'
  paths answer 200 over HTTPS, and an ``AdmissionReview`` for a demo Pod on the configured
  path comes back allowed with a JSONPatch that adds the sidecar as the manifest's injection
  flags say.
- **Control plane.** ``meshproxy ca init`` makes the CA the ``meshproxy-ca`` Secret holds; the
  control plane runs with the Deployment's ``--ca-dir`` / ``--server-name`` arguments (the
  Istio YAML read from a directory, as no API server is here: ``--kubernetes`` is replaced by
  ``--config``); a client trusting only ``ca.pem`` (the ``meshproxy-ca-root-cert`` ConfigMap
  the sidecars mount) verifies it under the name in the injected ``--control-plane`` URL, and
  the readiness and liveness probes' paths answer 200 over HTTPS.
- **Demo apps.** examples/demo_backend.py runs with a Deployment's arguments and answers its
  probes.

Every process is started with an OS-chosen port on 127.0.0.1 and stopped by its PID.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import selectors
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from meshproxy.k8s import inject

REPO = Path(__file__).resolve().parents[2]
KUBE = REPO / "examples" / "kubernetes"
START_TIMEOUT = 30.0

Doc = dict[str, Any]


def docs(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def one(path: Path, kind: str, name: str | None = None) -> Doc:
    (doc,) = [
        d
        for d in docs(path)
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    return doc


def container(deployment: Doc, name: str) -> Doc:
    (c,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return c


def with_value(args: list[str], flag: str, value: str) -> list[str]:
    out = list(args)
    out[out.index(flag) + 1] = value
    return out


@contextmanager
def started(args: list[str], what: str, cwd: Path) -> Iterator[tuple[str, int]]:
    """Runs ``args`` until it prints ``WHAT=HOST:PORT`` (meshproxy's ``listening`` line) or
    ``WHAT HOST:PORT`` (demo_backend.py's); yields (host, port); stopped by its PID at the end."""
    proc = subprocess.Popen(
        args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + START_TIMEOUT
        line = ""
        while time.monotonic() < deadline and proc.poll() is None:
            if sel.select(timeout=0.2):
                line = proc.stdout.readline()
                m = re.search(rf"\b{what}[= ](\S+):(\d+)$", line.strip())
                if m:
                    yield m.group(1).strip("[]"), int(m.group(2))
                    return
        proc.kill()
        _, err = proc.communicate(timeout=10)
        raise AssertionError(f"{args}: never listening ({line!r}); stderr: {err[-2000:]}")
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def https(
    port: int, name: str, cafile: Path, method: str, path: str, body: bytes | None = None
) -> tuple[int, bytes, dict[str, Any]]:
    """One request to 127.0.0.1:port over TLS, verifying the server as ``name`` against
    ``cafile`` only (as the API server with a caBundle, or a sidecar with the mesh CA)."""
    ctx = ssl.create_default_context(cafile=str(cafile))
    ctx.load_verify_locations(cafile=str(cafile))
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    tls = ctx.wrap_socket(raw, server_hostname=name)
    peer = tls.getpeercert()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.sock = tls
    headers = {"Host": name}
    if body is not None:
        headers["Content-Type"] = "application/json"
    conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, data, peer


def probe_paths(c: Doc) -> set[str]:
    paths = set()
    for kind in ("readinessProbe", "livenessProbe"):
        get = c[kind]["httpGet"]
        assert get["scheme"] == "HTTPS"
        paths.add(get["path"])
    return paths


# --------------------------------------------------------------------------- webhook


def openssl_recipe(path: Path) -> str:
    """The ``openssl req`` command of a manifest's header comment, continuations joined."""
    lines = [line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#")]
    start = next(i for i, line in enumerate(lines) if line.startswith("openssl "))
    command = []
    for line in lines[start:]:
        command.append(line.rstrip("\\").strip())
        if not line.endswith("\\"):
            break
    return " ".join(command)


def test_webhook_recipe_certificate_probes_and_admission(tmp_path: Path) -> None:
    manifest = KUBE / "webhook.yaml"
    subprocess.run(
        shlex.split(openssl_recipe(manifest)), cwd=tmp_path, check=True, capture_output=True
    )
    deployment = one(manifest, "Deployment", "meshproxy-webhook")
    c = container(deployment, "webhook")
    args = with_value(c["args"], "--listen", "127.0.0.1:0")
    args = with_value(args, "--cert", str(tmp_path / "webhook.pem"))
    args = with_value(args, "--key", str(tmp_path / "webhook-key.pem"))
    hook = one(manifest, "MutatingWebhookConfiguration")["webhooks"][0]["clientConfig"]["service"]
    name = f"{hook['name']}.{hook['namespace']}.svc"
    ca = tmp_path / "webhook.pem"  # what the caBundle patch gives the API server

    app = KUBE / "demo" / "app.yaml"
    reviews = one(app, "Deployment", "reviews-v1")
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {**reviews["spec"]["template"]["metadata"], "generateName": "reviews-v1-"},
        "spec": reviews["spec"]["template"]["spec"],
    }
    review = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "0d2c8a1e-5f3b-4c7e-9a61-2b8f0e4d7c19",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "demo",
            "operation": "CREATE",
            "object": pod,
        },
    }
    with started([sys.executable, "-m", "meshproxy", *args], "webhook", tmp_path) as (_, port):
        for path in probe_paths(c):
            status, _, peer = https(port, name, ca, "GET", path)
            assert status == 200, path
            assert ("DNS", name) in peer["subjectAltName"]
        status, body, _ = https(port, name, ca, "POST", hook["path"], json.dumps(review).encode())
    assert status == 200
    answer = json.loads(body)
    response = answer["response"]
    assert answer["apiVersion"] == "admission.k8s.io/v1"
    assert response["uid"] == review["request"]["uid"] and response["allowed"] is True
    assert response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"]))
    added = json.dumps(patch)
    # the sidecar and its init container, configured by the manifest's injection flags
    for needle in (
        inject.SIDECAR_NAME,
        inject.INIT_NAME,
        c["args"][c["args"].index("--control-plane") + 1],
        "meshproxy-token-bookinfo-reviews",
        c["args"][c["args"].index("--ca-configmap") + 1],
    ):
        assert needle in added, needle


# --------------------------------------------------------------------------- control plane


def test_control_plane_recipe_tls_name_and_probes(tmp_path: Path) -> None:
    manifest = KUBE / "control-plane.yaml"
    ca_dir = tmp_path / "ca"
    subprocess.run(
        [sys.executable, "-m", "meshproxy", "ca", "init", "--dir", str(ca_dir)],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    # the Secret volume: every file of the CA directory, mode defaultMode (0440)
    deployment = one(manifest, "Deployment", "meshproxy-control")
    (volume,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "ca"]
    secret_dir = tmp_path / "secret"
    secret_dir.mkdir()
    for f in ca_dir.iterdir():
        (secret_dir / f.name).write_bytes(f.read_bytes())
        os.chmod(secret_dir / f.name, volume["secret"]["defaultMode"])
    mesh = tmp_path / "mesh"
    mesh.mkdir()
    (mesh / "istio.yaml").write_text((KUBE / "demo" / "istio.yaml").read_text())

    c = container(deployment, "control")
    args = with_value(c["args"], "--listen", "127.0.0.1:0")
    args = with_value(args, "--ca-dir", str(secret_dir))
    args[args.index("--kubernetes")] = f"--config={mesh}"  # no API server here
    hook_args = container(one(KUBE / "webhook.yaml", "Deployment"), "webhook")["args"]
    url = urlsplit(hook_args[hook_args.index("--control-plane") + 1])  # the sidecars' URL
    ca = ca_dir / "ca.pem"  # the meshproxy-ca-root-cert ConfigMap the sidecars mount
    with started([sys.executable, "-m", "meshproxy", *args], "control", tmp_path) as (_, port):
        for path in probe_paths(c):
            status, _, peer = https(port, str(url.hostname), ca, "GET", path)
            assert status == 200, path
            assert ("DNS", url.hostname) in peer["subjectAltName"]


# --------------------------------------------------------------------------- demo apps


def test_demo_apps_answer_their_probes(tmp_path: Path) -> None:
    app = KUBE / "demo" / "app.yaml"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for d in docs(app):
        if d["kind"] != "Deployment":
            continue
        (c,) = d["spec"]["template"]["spec"]["containers"]
        assert c["command"][1] == "/demo/demo_backend.py"  # the ConfigMap's file
        args = with_value(c["args"], "--host", "127.0.0.1")
        args = with_value(args, "--port", str(port))
        script = [sys.executable, str(REPO / "examples" / "demo_backend.py"), *args]
        with started(script, "on", tmp_path) as (_, bound):
            assert bound == port
            for kind in ("readinessProbe", "livenessProbe"):
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                conn.request("GET", c[kind]["httpGet"]["path"])
                resp = conn.getresponse()
                body = json.loads(resp.read())
                conn.close()
                assert resp.status == 200
                assert body["service"] == d["metadata"]["labels"]["app"]
                assert body["version"] == d["metadata"]["labels"]["version"]
