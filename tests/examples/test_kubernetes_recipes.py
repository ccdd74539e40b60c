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
  paths answer 200 over HTTPS, and an ``AdmissionReview`` for the reviews-v1 Pod on the
  configured path comes back allowed with a JSONPatch which, applied by the independent
  ``jsonpatch`` library, gives exactly the pod template of demo/app-injected.yaml: the webhook
  Deployment's flags and the file's ``meshproxy inject`` flags inject the same sidecar.
- **Control plane.** ``meshproxy ca init`` makes the CA the ``meshproxy-ca`` Secret holds; the
  control plane runs with the Deployment's ``--ca-dir`` / ``--server-name`` arguments (the
  Istio YAML read from a directory, as no API server is here: ``--kubernetes`` is replaced by
  ``--config``); a client trusting only ``ca.pem`` (the ``meshproxy-ca-root-cert`` ConfigMap
  the sidecars mount) verifies it under the name in the injected ``--control-plane`` URL, and
  the readiness and liveness probes' paths answer 200 over HTTPS.
- **Demo apps.** examples/demo_backend.py runs with a Deployment's arguments and answers its
  probes.
- **The whole mesh.** An API server that speaks list/watch (:mod:`tests.support.kubeapi`)
  holds the demo as a cluster would once it is applied (its Istio objects, Services with
  cluster IPs, one Pod per Deployment, their EndpointSlices); the control plane runs with the
  Deployment's arguments, ``--kubernetes`` included (a kubeconfig stands in for the in-cluster
  config); productpage's sidecar runs with demo/app-injected.yaml's arguments (``$(POD_NAME)``
  expanded, addresses on loopback, the bootstrap token of its service account) and must get
  reviews' v1 and v2 subsets with the Pods' addresses. Every request the control plane made
  to the API server must be allowed by the manifest's ClusterRole, and every rule used.

Every process is started with an OS-chosen port on 127.0.0.1 and stopped by its PID.
"""

from __future__ import annotations

import asyncio
import base64
import copy
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

import aiohttp
import jsonpatch
import yaml

from meshproxy.k8s import inject
from tests.support.kubeapi import FakeKubeAPI

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
    mutated = jsonpatch.apply_patch(copy.deepcopy(pod), patch)
    # the webhook (webhook.yaml's flags) does to the Pod what `meshproxy inject` did to the
    # Deployment's template in demo/app-injected.yaml
    injected = one(KUBE / "demo" / "app-injected.yaml", "Deployment", "reviews-v1")
    assert mutated["spec"] == injected["spec"]["template"]["spec"]
    assert mutated["metadata"]["labels"] == injected["spec"]["template"]["metadata"]["labels"]
    assert (
        mutated["metadata"]["annotations"]
        == injected["spec"]["template"]["metadata"]["annotations"]
    )


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


# --------------------------------------------------------------------------- whole mesh


def cluster_objects() -> list[Doc]:
    """The demo as an API server holds it once applied: its Istio objects, its Services with
    cluster IPs, one running Pod per Deployment and the EndpointSlices the endpoint-slice
    controller would write for them."""
    app = KUBE / "demo" / "app.yaml"
    objects: list[Doc] = list(docs(KUBE / "demo" / "istio.yaml"))
    pods: list[tuple[Doc, str]] = []
    for i, d in enumerate(x for x in docs(app) if x["kind"] == "Deployment"):
        template = d["spec"]["template"]
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"{d['metadata']['name']}-0",
                "namespace": d["metadata"]["namespace"],
                "labels": template["metadata"]["labels"],
            },
            "spec": template["spec"],
        }
        pods.append((pod, f"10.244.0.{10 + i}"))
        objects.append(pod)
    for i, svc in enumerate(x for x in docs(app) if x["kind"] == "Service"):
        ns, name = svc["metadata"]["namespace"], svc["metadata"]["name"]
        ip = f"10.96.0.{10 + i}"
        objects.append({**svc, "spec": {**svc["spec"], "clusterIP": ip, "clusterIPs": [ip]}})
        selected = [
            (p, pod_ip)
            for p, pod_ip in pods
            if all(p["metadata"]["labels"].get(k) == v for k, v in svc["spec"]["selector"].items())
        ]
        objects.append(
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": f"{name}-x7k2p",
                    "namespace": ns,
                    "labels": {"kubernetes.io/service-name": name},
                },
                "addressType": "IPv4",
                "ports": [
                    {"name": port["name"], "port": 9080, "protocol": "TCP"}
                    for port in svc["spec"]["ports"]
                ],
                "endpoints": [
                    {
                        "addresses": [pod_ip],
                        "conditions": {"ready": True},
                        "targetRef": {
                            "kind": "Pod",
                            "namespace": ns,
                            "name": p["metadata"]["name"],
                        },
                    }
                    for p, pod_ip in selected
                ],
            }
        )
    return objects


def substitute(args: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' $(VAR) expansion of container args."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in args]


async def _listening(proc: asyncio.subprocess.Process, what: str) -> int:
    assert proc.stdout is not None
    async with asyncio.timeout(START_TIMEOUT):
        while True:
            line = (await proc.stdout.readline()).decode()
            assert line, f"{what}: exited before listening"
            m = re.search(rf"\b{what}=\S+:(\d+)", line)
            if m:
                return int(m.group(1))


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            async with asyncio.timeout(10):
                await proc.wait()
        except TimeoutError:
            os.kill(proc.pid, signal.SIGKILL)
            await proc.wait()


def _allowed(rules: list[Doc], group: str, plural: str, verb: str) -> bool:
    return any(
        group in r["apiGroups"] and plural in r["resources"] and verb in r["verbs"] for r in rules
    )


async def test_injected_sidecar_gets_the_demo_from_the_control_plane_of_the_manifests(
    tmp_path: Path,
) -> None:
    """The control plane as control-plane.yaml runs it, against an API server holding the
    demo, with the identity and permissions the manifest grants; the sidecar as
    demo/app-injected.yaml runs it for productpage gets reviews' subsets with the Pods'
    addresses."""
    api = FakeKubeAPI()
    kubeconfig = tmp_path / "kubeconfig"
    await api.start(str(kubeconfig))
    procs: list[asyncio.subprocess.Process] = []
    try:
        for obj in cluster_objects():
            api.create(obj)
        ca_dir = tmp_path / "ca"
        meshproxy = [sys.executable, "-m", "meshproxy"]
        subprocess.run(
            [*meshproxy, "ca", "init", "--dir", str(ca_dir)], check=True, capture_output=True
        )

        control = one(KUBE / "control-plane.yaml", "Deployment", "meshproxy-control")
        args = with_value(container(control, "control")["args"], "--listen", "127.0.0.1:0")
        args = with_value(args, "--ca-dir", str(ca_dir))
        args += ["--kubeconfig", str(kubeconfig)]  # in a Pod: the in-cluster config instead
        proc = await asyncio.create_subprocess_exec(
            *meshproxy, *args, stdout=asyncio.subprocess.PIPE, cwd=tmp_path
        )
        procs.append(proc)
        control_port = await _listening(proc, "control")

        injected = one(KUBE / "demo" / "app-injected.yaml", "Deployment", "productpage-v1")
        pod = injected["spec"]["template"]["spec"]
        sidecar = container(injected, inject.SIDECAR_NAME)
        sa = pod["serviceAccountName"]
        token = tmp_path / "token"
        token.write_text(
            subprocess.run(
                [*meshproxy, "ca", "token", "--dir", str(ca_dir), "--namespace", "demo",
                 "--service-account", sa],
                check=True, capture_output=True, text=True,
            ).stdout.strip()
        )  # fmt: skip
        env = {"POD_NAME": "productpage-v1-0", "POD_NAMESPACE": "demo"}
        args = substitute([str(a) for a in sidecar["args"]], env)
        url = urlsplit(args[args.index("--control-plane") + 1])
        args = with_value(args, "--control-plane", f"https://127.0.0.1:{control_port}")
        args = with_value(args, "--control-plane-ca", str(ca_dir / "ca.pem"))
        args = with_value(args, "--token-file", str(token))
        for flag in ("--outbound", "--inbound", "--admin", "--health", "--metrics"):
            args = with_value(args, flag, "127.0.0.1:0")
        assert url.hostname == "meshproxy-control.istio-system.svc"
        proc = await asyncio.create_subprocess_exec(
            *meshproxy, *args, stdout=asyncio.subprocess.PIPE, cwd=tmp_path
        )
        procs.append(proc)
        admin = await _listening(proc, "admin")

        async with aiohttp.ClientSession() as session:
            async with asyncio.timeout(START_TIMEOUT):
                while True:
                    async with session.get(f"http://127.0.0.1:{admin}/ready") as r:
                        if r.status == 200:
                            break
                    await asyncio.sleep(0.1)
            async with session.get(f"http://127.0.0.1:{admin}/clusters") as r:
                clusters = {c["name"]: c["endpoints"] for c in (await r.json())["clusters"]}
        # cluster_objects gives productpage-v1, reviews-v1, reviews-v2 10.244.0.10, .11, .12
        subsets = {
            name.rsplit("|", 1)[1]: sorted(e["address"] for e in endpoints)
            for name, endpoints in clusters.items()
            if name.startswith("reviews.demo.svc.cluster.local|")
        }
        assert subsets == {"v1": ["10.244.0.11:9080"], "v2": ["10.244.0.12:9080"]}, clusters

        # everything the control plane asked the API server, the ClusterRole allows, and it
        # uses every rule
        rules = one(KUBE / "control-plane.yaml", "ClusterRole")["rules"]
        used: set[tuple[str, str]] = set()
        for path, query in api.requests:
            parts = path.strip("/").split("/")
            group = "" if parts[0] == "api" else parts[1]
            plural = parts[-1]
            verb = "watch" if query.get("watch") in ("1", "true") else "list"
            assert _allowed(rules, group, plural, verb), (path, query)
            used.add((group, plural))
        assert used == {(g, p) for r in rules for g in r["apiGroups"] for p in r["resources"]}
    finally:
        for p in procs:
            await _stop(p)
        await api.close()
