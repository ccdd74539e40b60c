"""``meshproxy webhook``: the sidecar injector as a Kubernetes mutating admission webhook.

Theory of operation
-------------------
The API server POSTs an ``AdmissionReview`` (``admission.k8s.io/v1``; ``v1beta1`` has the same
shape and is answered in kind, as Istio does) to ``/inject`` over TLS. :func:`review` is the
pure part: it checks the request, runs :func:`meshproxy.k8s.inject.inject` on
``request.object`` (namespace from ``request.namespace``) and answers an ``AdmissionReview``
with the same ``apiVersion`` and ``request.uid``, ``allowed: true`` and, when a sidecar was
added, ``patchType: JSONPatch`` with ``patch`` = base64 of the RFC 6902 operations
(:func:`meshproxy.k8s.patch.diff`) that turn the submitted Pod into the injected one.

Answers, following Istio's ``serveInject``:

- empty body: ``400 no body found``; a Content-Type other than ``application/json``: ``415``;
- a body that is not JSON, not an ``AdmissionReview`` of a known version, or has no
  ``request.uid`` / ``request.object``: ``400`` with a one-line message (Istio answers some of
  these with a 200 review that has no uid, which the API server rejects anyway);
- a skipped Pod (opted out, hostNetwork, kube-system, already injected) or an operation other
  than ``CREATE``: ``allowed: true`` and no patch;
- an object that is not a Pod (a misconfigured webhook rule): ``allowed: true``, no patch and a
  ``warnings`` entry, which kubectl shows to the user;
- a Pod the injector cannot handle (:class:`InjectError`): ``allowed: false`` with
  ``status.code`` 400 and the field path in ``status.message``, as Istio's
  ``toAdmissionResponse`` refuses it.

:func:`serve` is the edge: an aiohttp server on ``--listen`` with a TLS context from ``--cert`` /
``--key`` (re-read when the files change, so a rotated certificate needs no restart), ``GET
/ready`` for probes, ``GET /metrics`` (istiod's ``sidecar_injection_*`` counters as
``meshproxy_injection_*``), the ``listening webhook=HOST:PORT`` line once bound, SIGTERM/SIGINT
to stop.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import signal
import socket
import ssl
from dataclasses import dataclass
from typing import Any

from meshproxy.k8s.inject import InjectError, InjectOptions, inject
from meshproxy.k8s.patch import diff

log = logging.getLogger("meshproxy.webhook")

INJECT_PATH = "/inject"
READY_PATH = "/ready"
METRICS_PATH = "/metrics"
API_VERSIONS = ("admission.k8s.io/v1", "admission.k8s.io/v1beta1")
MAX_BODY = 3 * 1024 * 1024  # an etcd object is at most ~1.5 MiB; the review wraps it (and old)


@dataclass(frozen=True, slots=True)
class Answer:
    """An HTTP answer: ``body`` is a JSON object for 200, else a one-line text message."""

    status: int
    body: dict[str, Any] | str


def review(body: bytes, content_type: str | None, opts: InjectOptions) -> Answer:
    """Answer one ``POST /inject``. Pure: no I/O, no clock."""
    if not body:
        return Answer(400, "no body found")
    if (content_type or "").split(";")[0].strip().lower() != "application/json":
        return Answer(415, "invalid Content-Type, want `application/json`")
    try:
        ar = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        return Answer(400, f"malformed AdmissionReview: not JSON: {e}")
    if not isinstance(ar, dict):
        return Answer(400, "malformed AdmissionReview: expected a JSON object")
    api_version, kind = ar.get("apiVersion"), ar.get("kind")
    if kind != "AdmissionReview" or api_version not in API_VERSIONS:
        return Answer(
            400,
            f"expected kind AdmissionReview, apiVersion {' or '.join(API_VERSIONS)}; "
            f"got kind {kind!r}, apiVersion {api_version!r}",
        )
    req = ar.get("request")
    if not isinstance(req, dict):
        return Answer(400, "malformed AdmissionReview: request: missing or not an object")
    uid = req.get("uid")
    if not isinstance(uid, str) or not uid:
        return Answer(400, "malformed AdmissionReview: request.uid: missing")
    obj = req.get("object")
    if not isinstance(obj, dict):
        return Answer(400, "malformed AdmissionReview: request.object: missing or not an object")

    response: dict[str, Any] = {"uid": uid, "allowed": True}
    req_kind = req.get("kind") if isinstance(req.get("kind"), dict) else {}
    obj_kind = req_kind.get("kind") or obj.get("kind")
    if obj_kind != "Pod" or req_kind.get("group", "") != "":
        group = req_kind.get("group") or ""
        what = f"{group}/{obj_kind}" if group else str(obj_kind)
        response["warnings"] = [f"meshproxy injects Pods only; {what} passed unchanged"]
        return _reply(api_version, response)
    if req.get("operation", "CREATE") != "CREATE":
        return _reply(api_version, response)
    pod = dict(obj)
    pod.setdefault("kind", "Pod")  # the API server sends it; a hand-made review may not
    namespace = req.get("namespace") if isinstance(req.get("namespace"), str) else None
    try:
        result = inject(pod, opts, namespace=namespace)
    except InjectError as e:
        response["allowed"] = False
        response["status"] = {"code": 400, "message": f"meshproxy injection: {e}"}
        return _reply(api_version, response)
    if result.injected:
        # the ops touch metadata and spec only, so they apply to ``obj`` with or without kind
        ops = diff(pod, result.obj)
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(
            json.dumps(ops, separators=(",", ":")).encode()
        ).decode("ascii")
        log.info("injected %s/%s", namespace or "-", _pod_name(obj))
    else:
        log.info("skipped %s/%s: %s", namespace or "-", _pod_name(obj), result.reason)
    return _reply(api_version, response)


def _reply(api_version: str, response: dict[str, Any]) -> Answer:
    return Answer(200, {"apiVersion": api_version, "kind": "AdmissionReview", "response": response})


def _pod_name(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    return str(meta.get("name") or meta.get("generateName") or "?")


# --------------------------------------------------------------------------- the server


class ReloadingCert:
    """A server TLS context whose certificate and key are re-read when either file changes:
    the servername callback, which OpenSSL runs in every handshake, compares the files' mtimes
    (two stat calls) and hands the handshake the freshest context. The API server keeps its
    connections alive, so this is per connection, not per review."""

    def __init__(self, cert: str, key: str) -> None:
        self.cert, self.key = cert, key
        self._stamp = self._mtimes()
        self.context = self._load()
        self.context.sni_callback = self._sni
        self._fresh: ssl.SSLContext | None = None

    def _mtimes(self) -> tuple[float, float]:
        return os.stat(self.cert).st_mtime, os.stat(self.key).st_mtime

    def _load(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert, self.key)
        return ctx

    def _sni(self, sock: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext) -> None:
        try:
            stamp = self._mtimes()
            if stamp != self._stamp:
                fresh = self._load()
                self._stamp = stamp
                self._fresh = fresh
                log.info("reloaded the serving certificate %s", self.cert)
            if self._fresh is not None:
                sock.context = self._fresh
        except (OSError, ssl.SSLError) as e:  # a half-written rotation: keep the last good one
            log.warning("serving certificate not reloaded: %s", e)


def outcome(answer: Answer) -> tuple[str, str | None]:
    """``("success" | "skip" | "failure", failure type)`` of an answer, for the metrics."""
    if answer.status != 200 or not isinstance(answer.body, dict):
        return "failure", "unsupported_media_type" if answer.status == 415 else "bad_request"
    response = answer.body["response"]
    if not response["allowed"]:
        return "failure", "inject"
    return ("success", None) if "patch" in response else ("skip", None)


class _Metrics:
    """Istio's sidecar_injection_* counters (istiod's injector), under meshproxy_injection_*."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter

        r = self.registry = CollectorRegistry(auto_describe=True)
        p = "meshproxy_injection_"
        self.requests = Counter(
            p + "requests", "Admission reviews received (sidecar_injection_requests_total)",
            registry=r,
        )  # fmt: skip
        self.success = Counter(
            p + "success", "Pods patched with the sidecar (sidecar_injection_success_total)",
            registry=r,
        )  # fmt: skip
        self.skip = Counter(
            p + "skip", "Reviews allowed without a patch (sidecar_injection_skip_total)",
            registry=r,
        )  # fmt: skip
        self.failure = Counter(
            p + "failure",
            "Reviews refused or malformed, by type (sidecar_injection_failure_total)",
            ["type"],
            registry=r,
        )

    def count(self, answer: Answer) -> None:
        self.requests.inc()
        result, kind = outcome(answer)
        if result == "success":
            self.success.inc()
        elif result == "skip":
            self.skip.inc()
        else:
            self.failure.labels(type=kind).inc()


def make_app(opts: InjectOptions) -> Any:
    from aiohttp import web
    from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

    metrics = _Metrics()

    async def inject_handler(request: web.Request) -> web.Response:
        body = await request.read()
        answer = review(body, request.headers.get("Content-Type"), opts)
        metrics.count(answer)
        if isinstance(answer.body, dict):
            return web.json_response(answer.body, status=answer.status)
        log.warning("POST %s: %d %s", INJECT_PATH, answer.status, answer.body)
        return web.Response(status=answer.status, text=answer.body + "\n")

    async def ready_handler(_request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def metrics_handler(_request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_post(INJECT_PATH, inject_handler)
    app.router.add_get(READY_PATH, ready_handler)
    app.router.add_get(METRICS_PATH, metrics_handler)
    return app


async def serve(host: str, port: int, tls: ssl.SSLContext, opts: InjectOptions) -> Any:
    """Start the server; returns (runner, bound (host, port)). The caller cleans the runner up."""
    from aiohttp import web

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, reuse_port=False)
    runner = web.AppRunner(make_app(opts), access_log=None)
    await runner.setup()
    try:
        await web.SockSite(runner, sock, ssl_context=tls).start()
    except BaseException:
        await runner.cleanup()
        sock.close()
        raise
    sockname = sock.getsockname()
    return runner, (sockname[0], sockname[1])


async def run_until_signalled(
    host: str, port: int, cert: ReloadingCert, opts: InjectOptions
) -> int:
    from meshproxy.cli import UsageError, format_addr

    try:
        runner, addr = await serve(host, port, cert.context, opts)
    except OSError as e:
        raise UsageError(f"cannot listen on {format_addr((host, port))}: {e}") from None
    print(f"listening webhook={format_addr(addr)}", flush=True)
    log.info("injection webhook on https://%s%s", format_addr(addr), INJECT_PATH)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("stopping")
        await runner.cleanup()
    return 0
