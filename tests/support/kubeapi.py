"""A fake Kubernetes API server speaking the real list/watch protocol over HTTP(S)/JSON.

Theory of operation
-------------------
:class:`FakeKubeAPI` serves, on 127.0.0.1 port 0, the collections the control plane watches
(:data:`RESOURCES`), cluster-wide (``/api/v1/pods``, ``/apis/G/V/PLURAL``) and per namespace
(``/api/v1/namespaces/NS/pods``, ``/apis/G/V/namespaces/NS/PLURAL``), as the Kubernetes API
concepts page describes ("Efficient detection of changes", "Watch bookmarks"):

* one global, monotonically increasing ``resourceVersion``: every create, update and delete
  takes the next one; objects carry the one of their last change, lists the current one;
* **list**: ``{"kind": "XList", "apiVersion": ..., "metadata": {"resourceVersion": "N"},
  "items": [...]}``; items of built-in kinds have no ``kind``/``apiVersion`` (as a real server
  sends typed lists), custom resources keep theirs;
* **watch** (``?watch=1``): a chunked ``application/json`` stream of newline-delimited
  ``{"type": ..., "object": ...}`` events after ``resourceVersion`` (unset or ``"0"``: synthetic
  ADDED events for the current objects first). A DELETED event carries the object's last
  state with the deletion's resourceVersion. ``allowWatchBookmarks=true`` gets BOOKMARK events
  (``{"kind", "apiVersion", "metadata": {"resourceVersion"}}`` only) every
  ``bookmark_interval`` seconds and on :meth:`bookmark`. ``timeoutSeconds`` ends the stream.
* a **bounded history** (``history`` events): a watch from a resourceVersion older than the
  oldest kept event (or than a :meth:`compact`) gets HTTP 200 and one
  ``{"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired", ...}}``
  event, then the end of the stream, as the apiserver's watch cache answers; with
  ``gone_as_http`` the watch request itself is answered ``410 Gone`` with that Status.
* bearer-token authentication (401 Status otherwise), unknown paths 404 Status.

Test hooks (synchronous, call them from the server's event loop): :meth:`create`,
:meth:`update`, :meth:`apply`, :meth:`delete`, :meth:`compact`, :meth:`close_watches`,
:meth:`bookmark`; ``gone_as_http`` (above), ``missing`` (kinds answered 404, as when a CRD is
not installed), ``forbidden`` (kinds answered 403 with the apiserver's RBAC message),
``versions`` (kind -> the one version served instead of v1, as Istio before 1.22 served
only v1beta1: objects go out converted to it), ``hang_watches`` (watch streams that stay
open and silent past their timeout, a stuck connection); ``requests`` records each request's
path and query. :meth:`start` serves over HTTPS with a trustme CA and writes a kubeconfig
(certificate-authority-data + token) that kubernetes_asyncio loads like any other.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import copy
import json
import os
import ssl
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import yaml
from aiohttp import web


@dataclass(frozen=True, slots=True)
class ResourceType:
    kind: str
    group: str
    version: str
    plural: str
    builtin: bool

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


RESOURCES: tuple[ResourceType, ...] = (
    ResourceType("VirtualService", "networking.istio.io", "v1", "virtualservices", False),
    ResourceType("DestinationRule", "networking.istio.io", "v1", "destinationrules", False),
    ResourceType("ServiceEntry", "networking.istio.io", "v1", "serviceentries", False),
    ResourceType("WorkloadEntry", "networking.istio.io", "v1", "workloadentries", False),
    ResourceType("PeerAuthentication", "security.istio.io", "v1", "peerauthentications", False),
    ResourceType("AuthorizationPolicy", "security.istio.io", "v1", "authorizationpolicies", False),
    ResourceType("Service", "", "v1", "services", True),
    ResourceType("EndpointSlice", "discovery.k8s.io", "v1", "endpointslices", True),
    ResourceType("Pod", "", "v1", "pods", True),
)
BY_KIND = {r.kind: r for r in RESOURCES}


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


@dataclass(slots=True)
class _Event:
    rv: int
    rtype: ResourceType
    type: str
    object: dict[str, Any]


@dataclass(eq=False, slots=True)
class _Watcher:
    rtype: ResourceType
    namespace: str | None
    bookmarks: bool
    queue: asyncio.Queue[dict[str, Any] | None] = field(default_factory=asyncio.Queue)

    def wants(self, ev: _Event) -> bool:
        if ev.rtype is not self.rtype:
            return False
        return self.namespace is None or ev.object["metadata"].get("namespace") == self.namespace


class FakeKubeAPI:
    """See the module docstring."""

    def __init__(
        self,
        *,
        token: str = "meshproxy-test-token",
        history: int = 1000,
        bookmark_interval: float | None = None,
        tls: bool = True,
    ) -> None:
        self.token = token
        self.history: collections.deque[_Event] = collections.deque(maxlen=history)
        self.bookmark_interval = bookmark_interval
        self.tls = tls
        self.rv = 100  # like a real cluster, not starting at 1
        self.compacted = self.rv  # watches from before this resourceVersion get 410
        self.objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {
            r.kind: {} for r in RESOURCES
        }
        self.watchers: set[_Watcher] = set()
        self.gone_as_http = False
        self.missing: set[str] = set()  # kinds answered 404 (their CRD "not installed")
        self.forbidden: set[str] = set()  # kinds answered 403 (no RBAC rule lets us read them)
        self.versions: dict[str, str] = {}  # kind -> the only version served (older Istio)
        self.hang_watches = False  # new watch streams stay silent and open, ignoring timeouts
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.url = ""
        self.ca_pem = b""
        self._runner: web.AppRunner | None = None

    # ------------------------------------------------------------------ hooks

    def _next(self) -> str:
        self.rv += 1
        return str(self.rv)

    def _emit(self, rtype: ResourceType, typ: str, obj: dict[str, Any]) -> None:
        ev = _Event(self.rv, rtype, typ, obj)
        if len(self.history) == self.history.maxlen:
            self.compacted = max(self.compacted, self.history[0].rv)
        self.history.append(ev)
        for w in list(self.watchers):
            if w.wants(ev):
                w.queue.put_nowait({"type": typ, "object": self._wire(rtype, obj)})

    def _api_version(self, rtype: ResourceType) -> str:
        """What the server answers for ``rtype`` (its objects converted to that version)."""
        version = self.versions.get(rtype.kind)
        return rtype.api_version if version is None else f"{rtype.group}/{version}"

    def _wire(self, rtype: ResourceType, obj: dict[str, Any]) -> dict[str, Any]:
        return {**copy.deepcopy(obj), "apiVersion": self._api_version(rtype), "kind": rtype.kind}

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Store a new object (``kind`` and ``metadata.name`` required); its stored copy."""
        rtype = BY_KIND[obj["kind"]]
        o = copy.deepcopy(obj)
        meta = o.setdefault("metadata", {})
        meta.setdefault("namespace", "default")
        key = (meta["namespace"], meta["name"])
        if key in self.objects[rtype.kind]:
            raise KeyError(f"{rtype.kind} {key} already exists")
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        meta["generation"] = 1
        meta["resourceVersion"] = self._next()
        o.pop("status", None)
        o["apiVersion"], o["kind"] = rtype.api_version, rtype.kind
        self.objects[rtype.kind][key] = o
        self._emit(rtype, "ADDED", o)
        return copy.deepcopy(o)

    def update(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Replace an existing object (server-owned metadata kept); its stored copy."""
        rtype = BY_KIND[obj["kind"]]
        meta_in = obj["metadata"]
        key = (meta_in.get("namespace", "default"), meta_in["name"])
        old = self.objects[rtype.kind][key]
        o = copy.deepcopy(obj)
        meta = o["metadata"]
        meta["namespace"] = key[0]
        for k in ("uid", "creationTimestamp"):
            meta[k] = old["metadata"][k]
        meta["generation"] = old["metadata"]["generation"] + (o.get("spec") != old.get("spec"))
        meta["resourceVersion"] = self._next()
        o["apiVersion"], o["kind"] = rtype.api_version, rtype.kind
        self.objects[rtype.kind][key] = o
        self._emit(rtype, "MODIFIED", o)
        return copy.deepcopy(o)

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create or update."""
        meta = obj["metadata"]
        key = (meta.get("namespace", "default"), meta["name"])
        if key in self.objects[BY_KIND[obj["kind"]].kind]:
            return self.update(obj)
        return self.create(obj)

    def delete(self, kind: str, namespace: str, name: str) -> None:
        rtype = BY_KIND[kind]
        o = copy.deepcopy(self.objects[kind].pop((namespace, name)))
        o["metadata"]["resourceVersion"] = self._next()
        self._emit(rtype, "DELETED", o)

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        return copy.deepcopy(self.objects[kind][(namespace, name)])

    def compact(self) -> None:
        """Forget the whole event history (etcd compaction): a watch from any resourceVersion
        before now gets 410."""
        self.history.clear()
        self.compacted = self.rv

    def close_watches(self) -> int:
        """End every open watch stream (as a restarting apiserver does); how many."""
        n = len(self.watchers)
        for w in list(self.watchers):
            self.watchers.discard(w)
            w.queue.put_nowait(None)
        return n

    def bookmark(self) -> None:
        """Send a BOOKMARK at the current resourceVersion to every watch that allows them."""
        for w in list(self.watchers):
            if w.bookmarks:
                w.queue.put_nowait(self._bookmark(w.rtype))

    def _bookmark(self, rtype: ResourceType) -> dict[str, Any]:
        return {
            "type": "BOOKMARK",
            "object": {
                "kind": rtype.kind,
                "apiVersion": self._api_version(rtype),
                "metadata": {"resourceVersion": str(self.rv)},
            },
        }

    def watch_count(self, kind: str | None = None) -> int:
        return sum(1 for w in self.watchers if kind is None or w.rtype.kind == kind)

    def request_count(self, plural: str, watch: bool) -> int:
        return sum(
            1
            for path, q in self.requests
            if path.endswith("/" + plural) and (q.get("watch") in ("1", "true")) == watch
        )

    # ------------------------------------------------------------------ HTTP

    def _route(self, path: str) -> tuple[ResourceType, str | None] | None:
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "v1"]:
            rest, group, version = parts[2:], "", "v1"
        elif len(parts) >= 3 and parts[0] == "apis":
            rest, group, version = parts[3:], parts[1], parts[2]
        else:
            return None
        namespace = None
        if len(rest) == 3 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        if len(rest) != 1:
            return None
        for r in RESOURCES:
            served = self.versions.get(r.kind, r.version)
            if (r.group, served, r.plural) == (group, version, rest[0]):
                return r, namespace
        return None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.path, dict(request.query)))
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response(status(401, "Unauthorized", "Unauthorized"), status=401)
        route = self._route(request.path)
        if route is None:
            return web.json_response(
                status(404, "NotFound", "the server could not find the requested resource"),
                status=404,
            )
        rtype, namespace = route
        if rtype.kind in self.missing:
            return web.json_response(
                status(404, "NotFound", "the server could not find the requested resource"),
                status=404,
            )
        if rtype.kind in self.forbidden:
            verb = "watch" if request.query.get("watch") in ("1", "true") else "list"
            scope = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
            message = (
                f'{rtype.plural} is forbidden: User "system:serviceaccount:istio-system:meshproxy" '
                f'cannot {verb} resource "{rtype.plural}" in API group "{rtype.group}" {scope}'
            )
            return web.json_response(status(403, "Forbidden", message), status=403)
        if request.query.get("watch") in ("1", "true"):
            return await self._watch(request, rtype, namespace)
        items = [
            o
            for (ns, _), o in sorted(self.objects[rtype.kind].items())
            if namespace is None or ns == namespace
        ]
        body = {
            "kind": rtype.kind + "List",
            "apiVersion": self._api_version(rtype),
            "metadata": {"resourceVersion": str(self.rv)},
            "items": [self._item(rtype, o) for o in items],
        }
        return web.json_response(body)

    def _item(self, rtype: ResourceType, obj: dict[str, Any]) -> dict[str, Any]:
        o = self._wire(rtype, obj)
        if rtype.builtin:
            o.pop("kind", None)
            o.pop("apiVersion", None)
        return o

    async def _watch(
        self, request: web.Request, rtype: ResourceType, namespace: str | None
    ) -> web.StreamResponse:
        q = request.query
        rv_param = q.get("resourceVersion", "")
        bookmarks = q.get("allowWatchBookmarks") == "true"
        timeout = float(q["timeoutSeconds"]) if "timeoutSeconds" in q else 1800.0
        # what to replay and the watcher that queues what comes next are set up together,
        # before the first await, so no event falls between the two
        watcher = _Watcher(rtype, namespace, bookmarks)
        initial: list[dict[str, Any]] = []
        backlog: list[dict[str, Any]] = []
        gone: dict[str, Any] | None = None
        if rv_param in ("", "0"):
            for (ns, _), o in sorted(self.objects[rtype.kind].items()):
                if namespace is None or ns == namespace:
                    initial.append({"type": "ADDED", "object": self._wire(rtype, o)})
        else:
            if not rv_param.isdigit():
                return web.json_response(
                    status(400, "BadRequest", f"invalid resource version: {rv_param!r}"),
                    status=400,
                )
            since = int(rv_param)
            if since < self.compacted:
                gone = status(
                    410, "Expired", f"too old resource version: {since} ({self.compacted + 1})"
                )
            else:
                backlog = [
                    {"type": ev.type, "object": self._wire(rtype, ev.object)}
                    for ev in self.history
                    if ev.rv > since and watcher.wants(ev)
                ]
        if gone is None:
            self.watchers.add(watcher)
        elif self.gone_as_http:
            return web.json_response(gone, status=410)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        try:
            await resp.prepare(request)
            if gone is not None:
                await resp.write(json.dumps({"type": "ERROR", "object": gone}).encode() + b"\n")
                await resp.write_eof()
                return resp
            if self.hang_watches:  # a stuck connection: nothing is sent until close_watches()
                await watcher.queue.get()
                return resp
            return await self._stream(resp, watcher, initial + backlog, timeout)
        finally:
            self.watchers.discard(watcher)

    async def _stream(
        self,
        resp: web.StreamResponse,
        watcher: _Watcher,
        replay: list[dict[str, Any]],
        timeout: float,
    ) -> web.StreamResponse:
        rtype, bookmarks = watcher.rtype, watcher.bookmarks
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        next_bookmark = (
            loop.time() + self.bookmark_interval if self.bookmark_interval else float("inf")
        )
        for ev in replay:
            await resp.write(json.dumps(ev).encode() + b"\n")
        while True:
            now = loop.time()
            if now >= deadline:
                break
            if bookmarks and now >= next_bookmark:
                watcher.queue.put_nowait(self._bookmark(rtype))
                next_bookmark = now + (self.bookmark_interval or 0)
            try:
                item = await asyncio.wait_for(
                    watcher.queue.get(), min(deadline, next_bookmark) - now
                )
            except TimeoutError:
                continue
            if item is None:  # close_watches()
                break
            await resp.write(json.dumps(item).encode() + b"\n")
        self.watchers.discard(watcher)
        with contextlib.suppress(ConnectionResetError):
            await resp.write_eof()
        return resp

    # ------------------------------------------------------------------ lifecycle

    async def start(self, kubeconfig: str | None = None) -> str:
        """Serve on 127.0.0.1:0; write ``kubeconfig`` (when given) pointing to it. Returns the
        server URL."""
        ssl_ctx: ssl.SSLContext | None = None
        if self.tls:
            import trustme

            ca = trustme.CA()
            cert = ca.issue_cert("127.0.0.1", "localhost")
            ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            cert.configure_cert(ssl_ctx)
            self.ca_pem = ca.cert_pem.bytes()
        app = web.Application()
        app.router.add_get("/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=ssl_ctx)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"{'https' if self.tls else 'http'}://127.0.0.1:{port}"
        if kubeconfig is not None:
            self.write_kubeconfig(kubeconfig)
        return self.url

    def kubeconfig(self, context: str = "fake") -> dict[str, Any]:
        cluster: dict[str, Any] = {"server": self.url}
        if self.tls:
            cluster["certificate-authority-data"] = base64.b64encode(self.ca_pem).decode()
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": cluster}],
            "users": [{"name": "meshproxy", "user": {"token": self.token}}],
            "contexts": [{"name": context, "context": {"cluster": "fake", "user": "meshproxy"}}],
            "current-context": context,
        }

    def write_kubeconfig(self, path: str, context: str = "fake") -> None:
        with open(path, "w") as f:
            yaml.safe_dump(self.kubeconfig(context), f)
        os.chmod(path, 0o600)

    async def close(self) -> None:
        self.close_watches()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
