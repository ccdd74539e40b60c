"""``meshproxy webhook``: AdmissionReview answers, over real TLS and as a real subprocess.

The patch of every answer is decoded and applied to the submitted Pod with the ``jsonpatch``
library (an RFC 6902 implementation independent of ours); the result must equal what
:func:`meshproxy.k8s.inject.inject` makes of that Pod. The server runs on 127.0.0.1 with an
OS-chosen port and a certificate from a trustme test CA; the client verifies it.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import os
import signal
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jsonpatch
import pytest
import trustme
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from meshproxy.k8s.inject import InjectOptions, inject
from meshproxy.k8s.inject_cli import load_documents
from meshproxy.k8s.patch import diff
from meshproxy.k8s.webhook import ReloadingCert, review, serve
from tests.integration.proxyproc import kill_process, run_cli, start_listening
from tests.meshproxy.k8s.test_inject import json_paths

DATA = Path(__file__).resolve().parents[2] / "data" / "inject"
OPTS = InjectOptions()


def golden_pods() -> list[tuple[str, dict[str, Any]]]:
    """Every workload of the golden inputs as the Pod its controller would create."""
    pods = []
    for path in sorted(DATA.glob("*.in.yaml")):
        for index, doc in load_documents(path.name, path.read_text()):
            for obj in doc.get("items", [doc]):
                kind = obj.get("kind")
                ns = (obj.get("metadata") or {}).get("namespace")
                if kind == "Pod":
                    pod = copy.deepcopy(obj)
                elif kind == "CronJob":
                    pod = copy.deepcopy(obj["spec"]["jobTemplate"]["spec"]["template"])
                elif isinstance(obj.get("spec"), dict) and "template" in obj["spec"]:
                    pod = copy.deepcopy(obj["spec"]["template"])
                else:
                    continue
                pod = {"apiVersion": "v1", "kind": "Pod", **pod}
                if ns:
                    pod.setdefault("metadata", {})["namespace"] = ns
                pods.append((f"{path.name}#{index}/{_name(obj)}", pod))
    return pods


def _name(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return str(meta.get("name") or meta.get("generateName"))


PODS = golden_pods()


def admission_review(
    obj: Any, uid: str = "705ab4f5-6393-11e8-b7cc-42010a800002", **request: Any
) -> dict[str, Any]:
    """An AdmissionReview as the API server sends it for a Pod CREATE."""
    req = {
        "uid": uid,
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
        "namespace": (obj.get("metadata") or {}).get("namespace", "default")
        if isinstance(obj, dict)
        else "default",
        "operation": "CREATE",
        "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
        "object": obj,
        "oldObject": None,
        "dryRun": False,
        "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"},
    }
    req.update(request)
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": req}


def encode(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def applied(pod: dict[str, Any], response: dict[str, Any]) -> dict[str, Any]:
    ops = json.loads(base64.b64decode(response["patch"]))
    return jsonpatch.apply_patch(copy.deepcopy(pod), ops)


# --------------------------------------------------------------------------- pure: review()


@pytest.mark.parametrize(("name", "pod"), PODS, ids=[n for n, _ in PODS])
def test_review_patch_yields_the_injected_pod(name: str, pod: dict[str, Any]) -> None:
    answer = review(encode(admission_review(pod)), "application/json", OPTS)
    assert answer.status == 200
    expected = inject(pod, OPTS, namespace=pod["metadata"].get("namespace", "default"))
    body = answer.body
    assert isinstance(body, dict)
    if expected.injected:
        assert body == {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "response": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "allowed": True,
                "patchType": "JSONPatch",
                "patch": body["response"]["patch"],
            },
        }
        assert applied(pod, body["response"]) == expected.obj
    else:
        assert body["response"] == {"uid": "705ab4f5-6393-11e8-b7cc-42010a800002", "allowed": True}


def test_golden_pods_cover_injection_and_skips() -> None:
    outcomes = [inject(p, OPTS, namespace=p["metadata"].get("namespace")).injected for _, p in PODS]
    assert outcomes.count(True) >= 10 and outcomes.count(False) >= 5


def test_patch_is_small_for_a_sidecar_insertion() -> None:
    """The sidecar goes in front of ``containers``: one add there, not a rewrite of the app."""
    pod = {
        "kind": "Pod",
        "metadata": {"name": "p", "labels": {"app": "a"}},
        "spec": {"containers": [{"name": "a", "image": "a:1", "ports": [{"containerPort": 80}]}]},
    }
    ops = diff(pod, inject(pod, OPTS).obj)
    paths = [(op["op"], op["path"]) for op in ops]
    assert ("add", "/spec/containers/0") in paths
    assert not any(p.startswith("/spec/containers/1") for _, p in paths)
    assert ("add", "/metadata/annotations") in paths
    assert ("add", "/metadata/labels/security.meshproxy.io~1tlsMode") in paths


def test_review_pod_without_kind_and_namespace_from_request() -> None:
    pod = {"metadata": {"generateName": "web-"}, "spec": {"containers": [{"name": "web"}]}}
    answer = review(
        encode(admission_review(pod, namespace="kube-system")), "application/json", OPTS
    )
    assert isinstance(answer.body, dict)
    assert answer.body["response"] == {
        "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
        "allowed": True,
    }
    answer = review(encode(admission_review(pod, namespace="web")), "application/json", OPTS)
    assert isinstance(answer.body, dict)
    patched = applied(pod, answer.body["response"])
    assert "kind" not in patched
    assert patched == {
        k: v for k, v in inject({"kind": "Pod", **pod}, OPTS).obj.items() if k != "kind"
    }


def test_review_v1beta1_answered_in_kind() -> None:
    ar = admission_review(PODS[0][1])
    ar["apiVersion"] = "admission.k8s.io/v1beta1"
    answer = review(encode(ar), "application/json; charset=utf-8", OPTS)
    assert isinstance(answer.body, dict)
    assert answer.body["apiVersion"] == "admission.k8s.io/v1beta1"
    assert answer.body["response"]["patchType"] == "JSONPatch"


def test_review_not_a_pod_is_allowed_with_a_warning() -> None:
    deploy = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}}
    ar = admission_review(deploy, kind={"group": "apps", "version": "v1", "kind": "Deployment"})
    answer = review(encode(ar), "application/json", OPTS)
    assert answer == type(answer)(
        200,
        {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "response": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "allowed": True,
                "warnings": ["meshproxy injects Pods only; apps/Deployment passed unchanged"],
            },
        },
    )


def test_review_update_is_not_patched() -> None:
    answer = review(
        encode(admission_review(PODS[0][1], operation="UPDATE")), "application/json", OPTS
    )
    assert isinstance(answer.body, dict)
    assert answer.body["response"] == {
        "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
        "allowed": True,
    }


def test_review_refuses_a_pod_it_cannot_inject() -> None:
    pod = {
        "kind": "Pod",
        "metadata": {"name": "p", "annotations": {"sidecar.meshproxy.io/logLevel": "loud"}},
        "spec": {"containers": [{"name": "a"}]},
    }
    answer = review(encode(admission_review(pod, uid="u-9")), "application/json", OPTS)
    assert isinstance(answer.body, dict)
    assert answer.body["response"] == {
        "uid": "u-9",
        "allowed": False,
        "status": {
            "code": 400,
            "message": "meshproxy injection: metadata.annotations[sidecar.meshproxy.io/logLevel]: "
            "expected one of debug, info, warning, error, got 'loud'",
        },
    }


@pytest.mark.parametrize(
    ("body", "content_type", "status", "message"),
    [
        (b"", "application/json", 400, "no body found"),
        (b"{}", "text/plain", 415, "invalid Content-Type, want `application/json`"),
        (b"{}", None, 415, "invalid Content-Type, want `application/json`"),
        (b"{", "application/json", 400, "malformed AdmissionReview: not JSON: "),
        (b"\xff\xfe", "application/json", 400, "malformed AdmissionReview: not JSON: "),
        (b"[1]", "application/json", 400, "malformed AdmissionReview: expected a JSON object"),
        (
            b'{"apiVersion": "admission.k8s.io/v2", "kind": "AdmissionReview"}',
            "application/json",
            400,
            "expected kind AdmissionReview, apiVersion admission.k8s.io/v1 or "
            "admission.k8s.io/v1beta1; got kind 'AdmissionReview', apiVersion "
            "'admission.k8s.io/v2'",
        ),
        (
            b'{"apiVersion": "v1", "kind": "Pod"}',
            "application/json",
            400,
            "expected kind AdmissionReview",
        ),
        (
            b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}',
            "application/json",
            400,
            "malformed AdmissionReview: request: missing or not an object",
        ),
        (
            encode(admission_review({"kind": "Pod"}, uid="")),
            "application/json",
            400,
            "malformed AdmissionReview: request.uid: missing",
        ),
        (
            encode(admission_review("a pod")),
            "application/json",
            400,
            "malformed AdmissionReview: request.object: missing or not an object",
        ),
    ],
)
def test_review_malformed(body: bytes, content_type: str | None, status: int, message: str) -> None:
    answer = review(body, content_type, OPTS)
    assert answer.status == status
    assert isinstance(answer.body, str) and answer.body.startswith(message)
    assert "\n" not in answer.body


_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from(["a", "b/c", "~"])),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.sampled_from(["x", "y", "a/b", "c~d", "e"]), inner, max_size=4),
    ),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(a=_json, b=_json)
def test_diff_applied_with_jsonpatch_gives_the_target(a: Any, b: Any) -> None:
    ops = diff(a, b)
    result = jsonpatch.apply_patch(copy.deepcopy(a), ops)
    assert json.dumps(result, sort_keys=True) == json.dumps(b, sort_keys=True)
    if json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True):
        assert ops == []


# --------------------------------------------------------------------------- real TLS server


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def cert_files(tmp_path: Path, ca: trustme.CA) -> tuple[Path, Path]:
    leaf = ca.issue_cert("127.0.0.1", "meshproxy-webhook.istio-system.svc")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    return cert, key


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


@pytest.fixture
async def server(cert_files: tuple[Path, Path]) -> AsyncIterator[tuple[str, ReloadingCert]]:
    cert = ReloadingCert(str(cert_files[0]), str(cert_files[1]))
    runner, (host, port) = await serve("127.0.0.1", 0, cert.context, OPTS)
    try:
        yield f"https://{host}:{port}", cert
    finally:
        await runner.cleanup()


async def post(base: str, ctx: ssl.SSLContext, body: bytes, ctype: str = "application/json"):
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"{base}/inject", data=body, headers={"Content-Type": ctype}, ssl=ctx
        ) as r:
            return r.status, r.headers.get("Content-Type", ""), await r.read()


async def test_server_answers_reviews_over_tls(
    server: tuple[str, ReloadingCert], ca: trustme.CA
) -> None:
    base, _ = server
    ctx = client_context(ca)
    for name, pod in PODS:
        uid = f"uid-{name}"
        status, ctype, raw = await post(base, ctx, encode(admission_review(pod, uid=uid)))
        assert status == 200 and ctype.startswith("application/json"), name
        body = json.loads(raw)
        expected = inject(pod, OPTS, namespace=pod["metadata"].get("namespace", "default"))
        if expected.injected:
            assert set(body["response"]) == {"uid", "allowed", "patchType", "patch"}
            assert body["response"]["uid"] == uid
            assert applied(pod, body["response"]) == expected.obj, name
        else:
            assert body == {
                "apiVersion": "admission.k8s.io/v1",
                "kind": "AdmissionReview",
                "response": {"uid": uid, "allowed": True},
            }


async def test_server_errors_and_ready(server: tuple[str, ReloadingCert], ca: trustme.CA) -> None:
    base, _ = server
    ctx = client_context(ca)
    status, _, raw = await post(base, ctx, b"{not json")
    assert status == 400 and raw.decode().startswith("malformed AdmissionReview: not JSON")
    status, _, raw = await post(base, ctx, b"{}", "application/yaml")
    assert status == 415
    status, _, raw = await post(base, ctx, b"")
    assert (status, raw) == (400, b"no body found\n")
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{base}/ready", ssl=ctx) as r:
            assert (r.status, await r.text()) == (200, "ok\n")
        async with s.get(f"{base}/inject", ssl=ctx) as r:
            assert r.status == 405
        async with s.post(f"{base}/other", data=b"{}", ssl=ctx) as r:
            assert r.status == 404
    # plaintext on the TLS port gets no answer
    with pytest.raises(aiohttp.ClientError):
        async with aiohttp.ClientSession() as s:
            async with s.get(base.replace("https", "http") + "/ready") as r:
                await r.read()


async def test_server_metrics_count_every_outcome(
    server: tuple[str, ReloadingCert], ca: trustme.CA
) -> None:
    base, _ = server
    ctx = client_context(ca)
    injected = [p for _, p in PODS if inject(p, OPTS).injected][:3]
    skipped = {"kind": "Pod", "metadata": {"name": "h"}, "spec": {"hostNetwork": True}}
    refused = {
        "kind": "Pod",
        "metadata": {"annotations": {"sidecar.meshproxy.io/nativeSidecar": "perhaps"}},
        "spec": {"containers": [{"name": "a"}]},
    }
    for pod in [*injected, skipped, refused]:
        assert (await post(base, ctx, encode(admission_review(pod))))[0] == 200
    assert (await post(base, ctx, b"{"))[0] == 400
    assert (await post(base, ctx, b"{}", "text/plain"))[0] == 415
    async with aiohttp.ClientSession() as s, s.get(f"{base}/metrics", ssl=ctx) as r:
        assert r.status == 200 and r.content_type == "text/plain"
        text = await r.text()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("meshproxy_injection_") and not sample.name.endswith("_created")
    }
    assert samples == {
        ("meshproxy_injection_requests_total", ()): 7,
        ("meshproxy_injection_success_total", ()): 3,
        ("meshproxy_injection_skip_total", ()): 1,
        ("meshproxy_injection_failure_total", (("type", "inject"),)): 1,
        ("meshproxy_injection_failure_total", (("type", "bad_request"),)): 1,
        ("meshproxy_injection_failure_total", (("type", "unsupported_media_type"),)): 1,
    }


async def test_server_reloads_a_rotated_certificate(
    server: tuple[str, ReloadingCert], cert_files: tuple[Path, Path], ca: trustme.CA
) -> None:
    base, _ = server
    new_ca = trustme.CA()
    leaf = new_ca.issue_cert("127.0.0.1")
    cert, key = cert_files
    # the mtime must move even on a coarse-grained filesystem clock
    for path, data in (
        (key, leaf.private_key_pem.bytes()),
        (cert, leaf.cert_chain_pems[0].bytes()),
    ):
        path.write_bytes(data)
        st_ = path.stat()
        os.utime(path, ns=(st_.st_atime_ns, st_.st_mtime_ns + 2_000_000_000))
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{base}/ready", ssl=client_context(new_ca)) as r:
            assert r.status == 200
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{base}/ready", ssl=client_context(ca)) as r:
                await r.read()


# --------------------------------------------------------------------------- the command


async def test_webhook_command(
    tmp_path: Path, cert_files: tuple[Path, Path], ca: trustme.CA
) -> None:
    cert, key = cert_files
    proc = None
    try:
        proc, fields = await start_listening(
            [
                "webhook",
                "--listen",
                "127.0.0.1:0",
                "--cert",
                str(cert),
                "--key",
                str(key),
                "--native-sidecar",
                "--image",
                "registry.example.com/meshproxy:9",
            ],
            tmp_path / "webhook.log",
            "meshproxy webhook",
        )
        assert list(fields) == ["webhook"]
        host, port = fields["webhook"].rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
        pod = PODS[0][1]
        status, _, raw = await post(f"https://{fields['webhook']}", client_context(ca),
                                    encode(admission_review(pod)))  # fmt: skip
        assert status == 200
        opts = InjectOptions(native_sidecar=True, image="registry.example.com/meshproxy:9")
        expected = inject(pod, opts, namespace=pod["metadata"].get("namespace", "default"))
        assert expected.injected
        assert applied(pod, json.loads(raw)["response"]) == expected.obj
        os.kill(proc.pid, signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        log = (tmp_path / "webhook.log").read_text()
        assert "injected" in log and "Traceback" not in log
    finally:
        await kill_process(proc)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--cert", "/nonexistent/c.pem", "--key", "{key}"],
            "--cert /nonexistent/c.pem: no such file",
        ),
        (["--cert", "{cert}", "--key", "{cert}"], "not a usable pair"),
        (["--cert", "{cert}"], "the following arguments are required: --key"),
        (["--cert", "{cert}", "--key", "{key}", "--listen", "nohost"], "expected HOST:PORT"),
        (
            ["--cert", "{cert}", "--key", "{key}", "--control-plane", "meshproxy-control:15010"],
            "--control-plane meshproxy-control:15010: ",
        ),
        (["--cert", "{cert}", "--key", "{key}", "--listen", "127.0.0.1:{busy}"], "cannot listen"),
    ],
)
def test_webhook_usage_errors(cert_files: tuple[Path, Path], args: list[str], message: str) -> None:
    import socket

    cert, key = cert_files
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        argv = [a.format(cert=cert, key=key, busy=busy.getsockname()[1]) for a in args]
        proc = run_cli("webhook", *argv, timeout=30)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(("meshproxy: error: ", "meshproxy webhook: error: ")), proc.stderr
    assert message in last
    assert [ln for ln in proc.stderr.splitlines() if "error:" in ln] == [last]  # one line
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_golden_reviews_as_yaml_round_trip() -> None:
    """The webhook's patches and the CLI's YAML agree: the Pod injected through a review
    equals the Pod of the CLI's golden output for the same input (pod.in.yaml)."""
    (_, pod), *_ = [(n, p) for n, p in PODS if n.startswith("pod.in.yaml")]
    answer = review(encode(admission_review(pod)), "application/json", OPTS)
    assert isinstance(answer.body, dict)
    golden = yaml.safe_load((DATA / "pod.out.yaml").read_text())
    assert applied(pod, answer.body["response"]) == golden


_JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-1, 3),
    st.sampled_from(["", "Pod", "CREATE", "UPDATE", "admission.k8s.io/v1", "x"]),
    st.lists(st.none(), max_size=1),
    st.dictionaries(st.sampled_from(["kind", "group"]), st.sampled_from(["Pod", "", "apps"])),
)
_REVIEW = admission_review(
    {"kind": "Pod", "metadata": {"name": "p", "labels": {"a": "b"}}, "spec": {"containers": [{}]}}
)


@settings(max_examples=400, deadline=None)
@given(path=st.sampled_from(json_paths(_REVIEW)[1:]), value=_JUNK)
def test_review_never_fails_on_odd_fields(path: tuple[Any, ...], value: Any) -> None:
    """Any field of a review replaced by any JSON value: a 200 review (same uid when it has
    one) or a 400 line, never an exception (which aiohttp would turn into a 500)."""
    ar = copy.deepcopy(_REVIEW)
    node: Any = ar
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    answer = review(encode(ar), "application/json", OPTS)
    assert answer.status in (200, 400)
    if answer.status == 200:
        assert isinstance(answer.body, dict)
        assert answer.body["response"]["uid"] == ar["request"]["uid"]
