"""List and watch one Kubernetes resource, as client-go's reflector does.

Theory of operation
-------------------
A :class:`Reflector` keeps ``objects`` (``"NS/NAME"`` -> the object as the API gave it) in step
with one collection (``/api/v1/services``, ``/apis/networking.istio.io/v1/namespaces/NS/...``)
following the protocol of the Kubernetes API concepts page, "Efficient detection of changes":

1. **List** (no ``resourceVersion``: a consistent read), replace ``objects`` with the items and
   remember the list's ``metadata.resourceVersion``. After the first list, the replacement is
   diffed against the previous state (:func:`diff`), so a relist reports exactly the ADDED,
   MODIFIED (``resourceVersion`` changed) and DELETED objects of the gap.
2. **Watch** from that ``resourceVersion`` with ``allowWatchBookmarks=true`` and a
   ``timeoutSeconds`` drawn from [5, 10) minutes (client-go's spread), reading newline-delimited
   JSON events from the chunked stream (:class:`LineSplitter`, bounded). ADDED/MODIFIED/DELETED
   update ``objects`` and the resourceVersion to the object's; BOOKMARK only moves the
   resourceVersion (the server says nothing we watch changed up to there); ERROR with code 410
   (``Expired``/``Gone``: our resourceVersion left the server's history) -- or an HTTP 410 answer
   to the watch request -- means *relist* (step 1). The resourceVersion is opaque: it is only
   stored and sent back, never compared.
3. When the server ends the stream (its timeout, a restart, a dropped connection, our read
   timeout of ``timeoutSeconds`` + 30 s), the watch is reopened from the last resourceVersion
   seen, so every change since is replayed and none is lost; only 410 forces a relist. Failures
   (connection refused, 5xx, 401/403) are retried with exponential backoff and jitter
   (0.2 s doubling to 30 s, reset after a healthy stream); a failed list is retried the same way.
   A collection the server does not serve (404 on the first list: Istio's CRDs not installed)
   counts as synced and empty, so it does not hold back the first config, and is listed again
   with backoff until it appears -- after trying the kind's older version: Istio before 1.22
   serves its CRDs at ``v1beta1`` only, so on a 404 at ``v1`` the reflector lists (and then
   watches) that kind at ``v1beta1``, whose objects the validator accepts as well. Any other
   failing first list (403: the control plane's RBAC rules are missing) holds the first config
   back -- an empty config would remove every Service from every sidecar.
   :meth:`Reflector.problem` says either while it lasts, for ``/status`` ``errors`` and
   ``/ready``.

``on_event(kind, type, key, obj)`` is called for every change, from the event loop; it must not
block. A ``transform`` may slim objects before they are kept (client-go's TransformFunc: the
control plane keeps only a Pod's labels and service account). Reflectors never mutate the
objects they hand out (an update replaces the dict), so a shallow copy of ``objects`` is a
consistent snapshot.

:class:`KubeClient` wraps kubernetes_asyncio's ``ApiClient`` (in-cluster config when
``KUBERNETES_SERVICE_HOST`` is set, else a kubeconfig file and context): it brings the server
URL, TLS (CA, client certificates) and the bearer token; requests are raw ``GET``\\ s whose
streamed bodies are read here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

log = logging.getLogger("meshproxy.control.kube")

__all__ = [
    "KINDS",
    "Backoff",
    "Gone",
    "Kind",
    "KubeClient",
    "KubeError",
    "LineSplitter",
    "Reflector",
    "ReflectorSettings",
    "diff",
    "object_key",
]

MAX_LINE = 16 * 1024 * 1024  # one watch event; etcd's own limit is 1.5 MiB per object


@dataclass(frozen=True, slots=True)
class Kind:
    """One watched resource type and where it lives in the API."""

    kind: str
    group: str  # "" for the core group
    version: str
    plural: str
    older: str | None = None  # the version to fall back to when ``version`` is not served

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str | None = None, version: str | None = None) -> str:
        version = version or self.version
        root = f"/apis/{self.group}/{version}" if self.group else f"/api/{version}"
        if namespace is None:
            return f"{root}/{self.plural}"
        return f"{root}/namespaces/{namespace}/{self.plural}"


KINDS: tuple[Kind, ...] = (
    Kind("VirtualService", "networking.istio.io", "v1", "virtualservices", "v1beta1"),
    Kind("DestinationRule", "networking.istio.io", "v1", "destinationrules", "v1beta1"),
    Kind("ServiceEntry", "networking.istio.io", "v1", "serviceentries", "v1beta1"),
    Kind("WorkloadEntry", "networking.istio.io", "v1", "workloadentries", "v1beta1"),
    Kind("PeerAuthentication", "security.istio.io", "v1", "peerauthentications", "v1beta1"),
    Kind("AuthorizationPolicy", "security.istio.io", "v1", "authorizationpolicies", "v1beta1"),
    Kind("Service", "", "v1", "services"),
    Kind("EndpointSlice", "discovery.k8s.io", "v1", "endpointslices"),
    Kind("Pod", "", "v1", "pods"),
)


class KubeError(Exception):
    """A request to the API failed (status, transport, or a malformed answer)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class Gone(KubeError):
    """410: the resourceVersion we asked for is older than the server's history."""


# --------------------------------------------------------------------------- pure parts


def object_key(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    return f"{meta.get('namespace') or ''}/{meta.get('name') or ''}"


def resource_version(obj: Mapping[str, Any]) -> str | None:
    meta = obj.get("metadata")
    rv = meta.get("resourceVersion") if isinstance(meta, dict) else None
    return rv if isinstance(rv, str) and rv else None


def diff(
    old: Mapping[str, dict[str, Any]], new: Mapping[str, dict[str, Any]]
) -> list[tuple[str, str, dict[str, Any]]]:
    """``(type, key, object)`` events that turn ``old`` into ``new``: DELETED (with the last
    known object) for keys gone, ADDED for new keys, MODIFIED where the resourceVersion moved."""
    out: list[tuple[str, str, dict[str, Any]]] = []
    for key, obj in old.items():
        if key not in new:
            out.append(("DELETED", key, obj))
    for key, obj in new.items():
        before = old.get(key)
        if before is None:
            out.append(("ADDED", key, obj))
        elif resource_version(before) != resource_version(obj) or resource_version(obj) is None:
            if before != obj:
                out.append(("MODIFIED", key, obj))
    return out


class LineSplitter:
    """Newline-delimited JSON from arbitrary chunks; a line longer than ``limit`` is an error."""

    def __init__(self, limit: int = MAX_LINE) -> None:
        self.limit = limit
        self._buf = bytearray()

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        self._buf += chunk
        start = 0
        while True:
            i = self._buf.find(b"\n", start)
            if i < 0:
                break
            line = bytes(self._buf[start:i]).strip()
            start = i + 1
            if line:
                yield line
        del self._buf[:start]
        if len(self._buf) > self.limit:
            raise KubeError(f"a watch event longer than {self.limit} bytes")

    def tail(self) -> bytes:
        """What is left without a newline (the server closed mid-line)."""
        return bytes(self._buf).strip()


@dataclass(slots=True)
class Backoff:
    """Exponential backoff with full jitter in [d/2, d]; ``rand`` injected for tests."""

    initial: float = 0.2
    maximum: float = 30.0
    rand: Callable[[], float] = random.random
    _next: float = field(default=0.0)

    def __post_init__(self) -> None:
        self._next = self.initial

    def next(self) -> float:
        d = self._next
        self._next = min(self.maximum, d * 2)
        return d / 2 + d / 2 * self.rand()

    def reset(self) -> None:
        self._next = self.initial


# --------------------------------------------------------------------------- client


def kubeconfig_path(kubeconfig: str | None) -> tuple[str, str]:
    """The kubeconfig file to read and how to name it in an error: ``kubeconfig`` itself, else
    the first existing file of ``$KUBECONFIG`` (a path list, kubectl's precedence), else
    ``~/.kube/config``."""
    if kubeconfig is not None:
        return kubeconfig, f"kubeconfig {kubeconfig}"
    listed = [p for p in os.environ.get("KUBECONFIG", "").split(os.pathsep) if p]
    if listed:
        path = next((p for p in listed if os.path.isfile(p)), listed[0])
        return path, f"$KUBECONFIG {os.pathsep.join(listed)}"
    path = os.path.expanduser("~/.kube/config")
    return path, f"~/.kube/config ({path})"


class KubeClient:
    """kubernetes_asyncio's configuration (URL, TLS, token) and raw streaming GETs."""

    def __init__(self, api: Any) -> None:
        self.api = api  # kubernetes_asyncio.client.ApiClient

    @classmethod
    async def create(cls, kubeconfig: str | None = None, context: str | None = None) -> KubeClient:
        """In-cluster when ``KUBERNETES_SERVICE_HOST`` is set and no ``kubeconfig`` is given,
        else the kubeconfig file (``$KUBECONFIG``, then ``~/.kube/config``). Raises
        :class:`KubeError` with a one-line reason."""
        from kubernetes_asyncio import client, config

        cfg = client.Configuration()
        where = "in-cluster"
        in_cluster = kubeconfig is None and bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
        if not in_cluster:
            path, named = kubeconfig_path(kubeconfig)
            where = path
            if not os.path.isfile(path):  # the loader would say "Expected key current-context"
                raise KubeError(
                    f"{named}: no such file"
                    + ("" if kubeconfig else " (and KUBERNETES_SERVICE_HOST is not set)")
                )
        try:
            if in_cluster:
                config.load_incluster_config(client_configuration=cfg)
            else:
                await config.load_kube_config(
                    config_file=path, context=context, client_configuration=cfg
                )
        except Exception as e:  # the loader raises anything for a bad file (yaml, KeyError...)
            reason = " ".join(str(e).split()) or type(e).__name__
            raise KubeError(
                f"cannot load the Kubernetes client config ({where}): {reason}"
            ) from None
        return cls(client.ApiClient(configuration=cfg))

    @property
    def host(self) -> str:
        return str(self.api.configuration.host)

    async def get(
        self, path: str, params: list[tuple[str, str]], read_timeout: float | None
    ) -> aiohttp.ClientResponse:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=read_timeout)
        try:
            resp = await self.api.call_api(
                path,
                "GET",
                query_params=params,
                header_params={"Accept": "application/json"},
                auth_settings=["BearerToken"],
                _preload_content=False,
                _request_timeout=timeout,
            )
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise KubeError(f"GET {path}: {e or type(e).__name__}") from None
        if resp.status == 200:
            return resp
        body = await resp.read()
        resp.release()
        message = body[:300].decode("utf-8", "replace")
        try:
            message = str(json.loads(body).get("message") or message)
        except (ValueError, AttributeError):
            pass
        err = Gone if resp.status == 410 else KubeError
        raise err(f"GET {path}: {resp.status}: {message}", resp.status)

    async def close(self) -> None:
        await self.api.close()


# --------------------------------------------------------------------------- reflector

EventCallback = Callable[[str, str, str, dict[str, Any]], None]


@dataclass(frozen=True, slots=True)
class ReflectorSettings:
    min_watch_timeout: float = 300.0  # timeoutSeconds in [min, 2 * min), as client-go
    read_margin: float = 30.0  # our read timeout beyond timeoutSeconds
    list_timeout: float = 60.0
    backoff_initial: float = 0.2
    backoff_max: float = 30.0


class Reflector:
    """List-then-watch of one collection into ``objects`` (see the module docstring)."""

    def __init__(
        self,
        client: KubeClient,
        kind: Kind,
        namespace: str | None,
        on_event: EventCallback,
        settings: ReflectorSettings | None = None,
        rand: Callable[[], float] = random.random,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        self.client = client
        self.transform = transform
        self.kind = kind
        self.namespace = namespace
        self.version = kind.version
        self.path = kind.path(namespace)
        self.on_event = on_event
        self.settings = settings or ReflectorSettings()
        self.rand = rand
        self.objects: dict[str, dict[str, Any]] = {}
        self.resource_version: str | None = None
        self.synced = asyncio.Event()  # the first list is in
        self.lists = 0
        self.watches = 0
        self.bookmarks = 0
        self.gone = 0
        self.errors = 0
        self.last_error: str | None = None
        self.failing = 0  # failed requests since the last success
        self.not_served = False  # the last list got 404 (a CRD not installed)

    def __repr__(self) -> str:
        return (
            f"Reflector({self.path}, rv={self.resource_version!r}, objects={len(self.objects)}, "
            f"lists={self.lists}, watches={self.watches}, gone={self.gone})"
        )

    async def run(self) -> None:
        """List and watch until cancelled."""
        s = self.settings
        backoff = Backoff(s.backoff_initial, s.backoff_max, self.rand)
        need_list = True
        relisted = False  # a relist after a 410 had no healthy watch yet
        while True:
            try:
                if need_list:
                    await self.list()
                    need_list = False
                if await self.watch():
                    backoff.reset()
                    relisted = False
                    continue
                delay = backoff.next()  # closed at once with nothing said: do not spin
            except Gone as e:
                self.gone += 1
                log.info("%s; relisting", e)
                need_list = True
                delay = backoff.next() if relisted else 0.0  # at once, unless it repeats
                relisted = True
            except KubeError as e:
                self.errors += 1
                self.failing += 1
                self.last_error = str(e)
                if e.status == 404 and need_list and self._use_older():
                    continue  # list again at once at the older version
                delay = backoff.next()
                if e.status == 404 and need_list:
                    self._use(self.kind.version)  # the next attempt: the newest first again
                if e.status == 404 and need_list and not self.synced.is_set():
                    # the resource type is not served (Istio's CRDs not installed): count it
                    # as listed and empty, so the rest of the config is not held back, and keep
                    # trying to list it
                    log.warning("%s: not served by this API server; retrying", self.path)
                    self.not_served = True
                    self._mark_synced()
                else:
                    log.warning("%s (retrying in %.1f s)", e, delay)
            await asyncio.sleep(delay)

    def _use(self, version: str) -> None:
        self.version = version
        self.path = self.kind.path(self.namespace, version)

    def _use_older(self) -> bool:
        """Fall back to the kind's older version (Istio before 1.22 serves its CRDs at v1beta1
        only) unless already there; whether it did."""
        older = self.kind.older
        if older is None or self.version == older:
            return False
        log.info("%s: not served; trying %s", self.path, older)
        self._use(older)
        return True

    def problem(self) -> str | None:
        """What ``/status`` ``errors`` should say about this collection now, if anything: a
        collection the server does not serve (taken as empty), a first list that keeps
        failing (a 403: the RBAC rules are missing; the first config waits for it), or
        requests that keep failing (3 in a row) after it."""
        where = f"k8s://{self.kind.kind}"
        if self.not_served:
            older = f" (nor at {self.kind.older})" if self.kind.older else ""
            return (
                f"{where}: {self.path}{older} is not served by the API server (CRD not "
                "installed?): taken as empty, listed again with backoff"
            )
        if not self.failing:
            return None
        if not self.synced.is_set():
            return f"{where}: {self.last_error} (no config until it is listed; retrying)"
        if self.failing >= 3:
            return f"{where}: {self.last_error} ({self.failing} failures in a row; retrying)"
        return None

    def _mark_synced(self) -> None:
        if not self.synced.is_set():
            self.synced.set()
            self.on_event(self.kind.kind, "SYNCED", "", {})

    async def list(self) -> None:
        resp = await self.client.get(self.path, [], self.settings.list_timeout)
        try:
            body = await resp.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise KubeError(f"GET {self.path}: {e or type(e).__name__}") from None
        finally:
            resp.release()
        try:
            obj = json.loads(body)
            items = obj["items"]
            rv = obj["metadata"]["resourceVersion"]
        except (ValueError, KeyError, TypeError):
            raise KubeError(f"GET {self.path}: not a {self.kind.kind}List") from None
        if not isinstance(items, list) or not isinstance(rv, str):
            raise KubeError(f"GET {self.path}: not a {self.kind.kind}List")
        new: dict[str, dict[str, Any]] = {}
        for item in items:
            if isinstance(item, dict):
                new[object_key(item)] = self._typed(item)
        old, self.objects = self.objects, new
        self.resource_version = rv
        self.lists += 1
        self.failing, self.not_served = 0, False
        for typ, key, o in diff(old, new):
            self.on_event(self.kind.kind, typ, key, o)
        self._mark_synced()
        log.debug("%s: listed %d at %s", self.path, len(new), rv)

    def _typed(self, obj: dict[str, Any]) -> dict[str, Any]:
        # list items of built-in kinds come without kind/apiVersion
        if "kind" not in obj or "apiVersion" not in obj:
            obj = {"apiVersion": self.kind.api_version, "kind": self.kind.kind, **obj}
        return self.transform(obj) if self.transform is not None else obj

    async def watch(self) -> bool:
        """One watch request; returns when the server ends the stream (True when it delivered
        anything or lasted, i.e. the connection was healthy)."""
        s = self.settings
        timeout = int(s.min_watch_timeout * (1 + self.rand()))
        params = [
            ("watch", "1"),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", str(timeout)),
        ]
        if self.resource_version is not None:
            params.append(("resourceVersion", self.resource_version))
        resp = await self.client.get(self.path, params, timeout + s.read_margin)
        self.watches += 1
        self.failing = 0
        started = asyncio.get_running_loop().time()
        events = 0
        lines = LineSplitter()
        try:
            async for chunk in resp.content.iter_any():
                for line in lines.feed(chunk):
                    self._event(line)
                    events += 1
            if lines.tail():
                log.debug(
                    "%s: stream ended mid-event (%d bytes dropped)", self.path, len(lines.tail())
                )
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise KubeError(f"watch {self.path}: {e or type(e).__name__}") from None
        finally:
            resp.release()
        return events > 0 or asyncio.get_running_loop().time() - started > 1.0

    def _event(self, line: bytes) -> None:
        try:
            ev = json.loads(line)
            typ = ev["type"]
            obj = ev["object"]
        except (ValueError, KeyError, TypeError):
            raise KubeError(f"watch {self.path}: malformed event {line[:200]!r}") from None
        if not isinstance(obj, dict):
            raise KubeError(f"watch {self.path}: malformed event {line[:200]!r}")
        if typ == "ERROR":
            code = obj.get("code")
            message = f"watch {self.path}: {code} {obj.get('reason')}: {obj.get('message')}"
            if code == 410:
                raise Gone(message, 410)
            raise KubeError(message, code if isinstance(code, int) else 0)
        rv = resource_version(obj)
        if typ == "BOOKMARK":
            if rv is not None:
                self.resource_version = rv
                self.bookmarks += 1
            return
        if typ not in ("ADDED", "MODIFIED", "DELETED"):
            log.debug("%s: ignoring a %s event", self.path, typ)
            return
        obj = self._typed(obj)
        key = object_key(obj)
        if rv is not None:
            self.resource_version = rv
        if typ == "DELETED":
            self.objects.pop(key, None)
        elif self.objects.get(key) == obj:
            return  # nothing that we keep changed (a transformed object's status, say)
        else:
            self.objects[key] = obj
        self.on_event(self.kind.kind, typ, key, obj)
