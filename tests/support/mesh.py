"""Two real meshproxy sidecars and an app, talking mutual TLS with certificates from our own CA.

Theory of operation
-------------------
The topology the mTLS integration tests drive, every piece a real process or socket on
127.0.0.1 with an OS-chosen port::

    test client --plain HTTP--> sidecar A outbound --mTLS--> sidecar B inbound --> app

* PKI: :func:`make_pki` runs the real CLI (``meshproxy ca init`` / ``meshproxy ca issue``) to
  make the mesh CA, a second unrelated CA, and workload identities (``cert.pem``, ``key.pem``,
  ``ca.pem`` directories) for ``client-ns/client``, ``app-ns/web``, ``app-ns/intruder`` and a
  client from the other CA. :func:`expired_identity` signs, with the mesh CA's key, a
  certificate that expired an hour ago (no sleeping for a short TTL to run out).
* :class:`EchoApp` is the application behind sidecar B: it answers every request with JSON
  ``{"path", "headers": [[name, value], ...]}`` (header pairs, so a duplicated
  ``x-forwarded-client-cert`` would show), and counts what it received; ``/slow/...`` answers
  after 0.3 s, so concurrent requests force a sidecar to open new upstream connections.
* :class:`Sidecar` is ``python -m meshproxy run`` as a subprocess: its listener addresses come
  from the ``listening outbound=... [inbound=...] admin=...`` line, it is ready when ``/ready``
  answers 200, and it is stopped by its PID (SIGTERM, SIGKILL if it lingers).
* :func:`mesh` starts the app, sidecar B (``--inbound``/``--app``, its config from
  ``tests/data/mtls/``), reads B's inbound port, renders A's config (the placeholder endpoint
  port 59501 becomes B's inbound port) and starts A; it yields a :class:`Mesh` and stops
  everything on exit, asserting that neither sidecar printed a Python traceback.
* Clients that bypass sidecar A: :func:`plain_request` (raw TCP) and :func:`tls_request` (Python
  ``ssl`` presenting a chosen identity). Both return an :class:`Outcome` that tells a response
  from a connection closed without one, a failed handshake and a hang, so a test can insist on
  "refused" without mistaking a timeout for it.
* :func:`install_identity` replaces a ``--cert-dir`` the way a rotator does: new files written
  next to the old ones, then renamed over them one by one (cert, key, trust bundle).
* :class:`LoadLoop` drives a steady request rate through sidecar A from several kept-alive
  connections plus some new-connection-per-request clients, recording every failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import ssl
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
from cryptography import x509

from certs.ca import load_ca
from tests.integration.proxyproc import (
    REPO,
    kill_process,
    meshproxy_argv,
    request_samples,
    run_cli,
    start_listening,
    wait_until,
)
from tests.support.forge import forge_identity
from tests.support.rawhttp import Response, get, read_response
from tests.support.upstream import Recorded, Reply, UpstreamServer

DATA = Path(__file__).resolve().parents[1] / "data" / "mtls"
TRUST_DOMAIN = "cluster.local"
WEB_HOST = "web.app-ns.svc.cluster.local"
PLACEHOLDER = "59501"
READY_TIMEOUT = 10.0
IO_TIMEOUT = 5.0


def spiffe(namespace: str, sa: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{sa}"


CLIENT_ID = spiffe("client-ns", "client")
WEB_ID = spiffe("app-ns", "web")
INTRUDER_ID = spiffe("app-ns", "intruder")
EXPECTED_XFCC = f"By={WEB_ID};URI={CLIENT_ID}"


# --------------------------------------------------------------------------- PKI


def ca_cli(*args: str) -> str:
    """``meshproxy ca ARGS`` as a subprocess; its stdout (fails the test on a non-zero exit)."""
    p = run_cli("ca", *args, timeout=30)
    assert p.returncode == 0, f"meshproxy ca {' '.join(args)}: {p.returncode}\n{p.stderr}"
    return p.stdout


async def ca_cli_async(*args: str) -> str:
    """:func:`ca_cli` without blocking the event loop (used while a load is running)."""
    proc = await asyncio.create_subprocess_exec(
        *meshproxy_argv("ca", *args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, f"meshproxy ca {' '.join(args)}: {proc.returncode}\n{err!r}"
    return out.decode()


def ca_init(directory: Path) -> Path:
    ca_cli("init", "--dir", str(directory), "--trust-domain", TRUST_DOMAIN)
    return directory


def ca_issue(ca_dir: Path, spiffe_id: str, out: Path, ttl: str = "24h") -> Path:
    ca_cli("issue", "--dir", str(ca_dir), "--spiffe-id", spiffe_id, "--out", str(out), "--ttl", ttl)
    return out


async def ca_issue_async(ca_dir: Path, spiffe_id: str, out: Path, ttl: str = "24h") -> Path:
    await ca_cli_async(
        "issue", "--dir", str(ca_dir), "--spiffe-id", spiffe_id, "--out", str(out), "--ttl", ttl
    )
    return out


def expired_identity(ca_dir: Path, spiffe_id: str, out: Path) -> Path:
    """A workload identity signed by the CA in ``ca_dir`` (shaped as ``ca issue`` makes them)
    whose certificate expired an hour ago. :func:`certs.ca.issue` refuses a clock before the
    CA's own validity, so the certificate is forged with the CA's signing key."""
    now = datetime.now(UTC)
    return forge_identity(
        load_ca(ca_dir), out, [spiffe_id], now - timedelta(hours=2), now - timedelta(hours=1)
    )


@dataclass(frozen=True)
class Pki:
    """Every identity the tests use; each is a directory with cert.pem, key.pem, ca.pem."""

    ca: Path  # the mesh CA (ca init)
    other_ca: Path  # an unrelated CA with the same trust domain
    client: Path  # spiffe://cluster.local/ns/client-ns/sa/client
    web: Path  # spiffe://cluster.local/ns/app-ns/sa/web
    intruder: Path  # spiffe://cluster.local/ns/app-ns/sa/intruder (mesh CA)
    other_client: Path  # the client's SPIFFE id, signed by the other CA
    other_web: Path  # the web SPIFFE id, signed by the other CA

    @property
    def root(self) -> Path:
        return self.ca / "ca.pem"


def make_pki(base: Path) -> Pki:
    ca = ca_init(base / "ca")
    other = ca_init(base / "other-ca")
    return Pki(
        ca=ca,
        other_ca=other,
        client=ca_issue(ca, CLIENT_ID, base / "id-client"),
        web=ca_issue(ca, WEB_ID, base / "id-web"),
        intruder=ca_issue(ca, INTRUDER_ID, base / "id-intruder"),
        other_client=ca_issue(other, CLIENT_ID, base / "id-other-client"),
        other_web=ca_issue(other, WEB_ID, base / "id-other-web"),
    )


def copy_identity(src: Path, dst: Path) -> Path:
    """A private copy of an identity directory (the key stays 0600)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("cert.pem", "key.pem", "ca.pem"):
        target = dst / name
        target.write_bytes((src / name).read_bytes())
        os.chmod(target, 0o600 if name == "key.pem" else 0o644)
    return dst


def _replace(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def install_identity(cert_dir: Path, src: Path | None = None, ca_pem: bytes | None = None) -> None:
    """Rotate ``cert_dir`` as a real rotator would: each new file is written beside the old one
    and renamed over it, in the order cert, key, trust bundle (so a watcher may see a new
    certificate with the old key for a moment). ``src`` gives the new cert/key (and ca.pem
    unless ``ca_pem`` is given); with ``src`` None only the trust bundle changes."""
    if src is not None:
        _replace(cert_dir / "cert.pem", (src / "cert.pem").read_bytes(), 0o644)
        _replace(cert_dir / "key.pem", (src / "key.pem").read_bytes(), 0o600)
    bundle = ca_pem if ca_pem is not None else (src / "ca.pem").read_bytes() if src else None
    if bundle is not None:
        _replace(cert_dir / "ca.pem", bundle, 0o644)


def leaf_serial(identity: Path) -> int:
    return x509.load_pem_x509_certificates((identity / "cert.pem").read_bytes())[0].serial_number


# --------------------------------------------------------------------------- the app


class EchoApp:
    """The application behind sidecar B: JSON ``{"path", "headers": [[k, v], ...]}``."""

    def __init__(self) -> None:
        self.server = UpstreamServer(self._reply)

    SLOW_PREFIX = "/slow/"  # answered after SLOW_DELAY: keeps a connection busy
    SLOW_DELAY = 0.3

    @classmethod
    def _reply(cls, req: Recorded) -> Reply:
        body = json.dumps({"path": req.target, "headers": [list(h) for h in req.headers]})
        delay = cls.SLOW_DELAY if req.target.startswith(cls.SLOW_PREFIX) else 0.0
        return Reply(
            body=body.encode(), headers=[("content-type", "application/json")], delay=delay
        )

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def requests(self) -> list[Recorded]:
        return self.server.requests

    @property
    def hits(self) -> int:
        return len(self.server.requests)

    def seen(self, path: str) -> list[Recorded]:
        return [r for r in self.server.requests if r.target == path]

    async def start(self) -> EchoApp:
        await self.server.start()
        return self

    async def close(self) -> None:
        await self.server.close()


def xfcc_of(body: Any) -> list[str]:
    """Every ``x-forwarded-client-cert`` value the app reports having received."""
    assert isinstance(body, dict), body
    return [v for k, v in body["headers"] if k == "x-forwarded-client-cert"]


# --------------------------------------------------------------------------- the sidecar


@dataclass
class Sidecar:
    """``python -m meshproxy run`` as a subprocess, stopped by its PID."""

    name: str
    config: Path
    workdir: Path
    cert_dir: Path | None = None
    namespace: str = "default"
    labels: str = ""
    app_port: int | None = None  # with it, --inbound 127.0.0.1:0 --app 127.0.0.1:PORT
    extra: Sequence[str] = ()
    proc: asyncio.subprocess.Process | None = None
    outbound: str = ""
    inbound: str = ""
    admin: str = ""
    access_log: Path = field(init=False)
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.access_log = self.workdir / f"{self.name}-access.log"
        self.log_path = self.workdir / f"{self.name}.log"

    def argv(self) -> list[str]:
        argv = ["run", "--config", str(self.config), "--outbound", "127.0.0.1:0"]
        argv += ["--admin", "127.0.0.1:0", "--access-log", str(self.access_log)]
        if self.app_port is not None:
            argv += ["--inbound", "127.0.0.1:0", "--app", f"127.0.0.1:{self.app_port}"]
            # SIGTERM (stop()) exits once no connection is open, without the 5 s minimum a
            # real pod's sidecar waits for its app (tests/integration/test_shutdown_order.py)
            argv += ["--min-drain-seconds", "0"]
        if self.cert_dir is not None:
            argv += ["--cert-dir", str(self.cert_dir)]
        argv += ["--namespace", self.namespace]
        if self.labels:
            argv += ["--labels", self.labels]
        return [*argv, *self.extra]

    async def start(self) -> Sidecar:
        self.proc, fields = await start_listening(
            self.argv(), self.log_path, f"sidecar {self.name}"
        )
        self.outbound, self.admin = fields["outbound"], fields["admin"]
        if self.app_port is not None:
            assert "inbound" in fields, f"sidecar {self.name}: no inbound= in {fields!r}"
            self.inbound = fields["inbound"]

        async def ready() -> bool:
            return (await self.admin_get("/ready"))[0] == 200

        try:
            await wait_until(ready, READY_TIMEOUT)
        except AssertionError:
            await self.kill()
            raise AssertionError(f"sidecar {self.name} never ready:\n{self.stderr()}") from None
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stderr(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def kill(self) -> None:
        await kill_process(self.proc)

    async def stop(self) -> int:
        """SIGTERM by PID and wait; SIGKILL if it does not exit in time."""
        if self.proc is None:
            return -1
        if self.proc.returncode is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except TimeoutError:
                await self.kill()
        assert self.proc.returncode is not None
        return self.proc.returncode

    async def admin_get(self, path: str) -> tuple[int, str]:
        timeout = aiohttp.ClientTimeout(total=IO_TIMEOUT)
        async with (
            aiohttp.ClientSession(timeout=timeout) as s,
            s.get(f"http://{self.admin}{path}") as r,
        ):
            return r.status, (await r.read()).decode(errors="replace")

    async def requests_total(self, **labels: str) -> float:
        """``istio_requests_total`` summed over the samples carrying all ``labels``."""
        code, text = await self.admin_get("/stats/prometheus")
        assert code == 200, text
        return sum(
            s.value
            for s in request_samples(text)
            if all(s.labels.get(k) == v for k, v in labels.items())
        )

    async def metric_text(self) -> str:
        code, text = await self.admin_get("/stats/prometheus")
        assert code == 200, text
        return text

    def access_entries(self) -> list[dict[str, Any]]:
        if not self.access_log.exists():
            return []
        lines = self.access_log.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    async def access_entry(self, path: str, timeout: float = IO_TIMEOUT) -> dict[str, Any]:
        """The access-log entry of the one request to ``path`` (the log is flushed lazily)."""
        found: list[dict[str, Any]] = []

        def there() -> bool:
            nonlocal found
            found = [e for e in self.access_entries() if e.get("path") == path]
            return bool(found)

        await wait_until(there, timeout)
        assert len(found) == 1, found
        return found[0]


# --------------------------------------------------------------------------- clients


@dataclass
class Outcome:
    """What a direct client got: ``response``, ``closed`` (EOF or reset, no response),
    ``handshake_failed`` or ``timeout`` (nothing within the deadline)."""

    kind: str
    response: Response | None = None
    error: str = ""

    @property
    def refused(self) -> bool:
        return self.kind in ("closed", "handshake_failed")

    def __str__(self) -> str:
        if self.response is not None:
            return f"response {self.response.status} {self.response.body[:200]!r}"
        return f"{self.kind} {self.error}"


def _split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host, int(port)


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> Outcome:
    try:
        writer.write(request)
        await writer.drain()
        resp = await read_response(reader, timeout=IO_TIMEOUT)
        return Outcome("response", resp)
    except TimeoutError:
        return Outcome("timeout", error="no answer and no close")
    except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, OSError) as e:
        return Outcome("closed", error=repr(e))
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def forged_xfcc_header(value: str) -> str:
    return f"x-forwarded-client-cert: {value}\r\n"


async def plain_request(addr: str, path: str = "/", extra: str = "") -> Outcome:
    """A plaintext HTTP/1.1 GET straight to ``addr`` (``extra``: more header lines)."""
    reader, writer = await asyncio.open_connection(*_split(addr))
    return await _exchange(reader, writer, get(path, WEB_HOST, extra))


def client_context(identity: Path | None, trust: Path) -> ssl.SSLContext:
    """A TLS client context trusting ``trust`` and presenting ``identity`` (if any); the
    server's SPIFFE id is not checked here (only its chain)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cafile=str(trust))
    if identity is not None:
        ctx.load_cert_chain(str(identity / "cert.pem"), str(identity / "key.pem"))
    return ctx


async def tls_request(
    addr: str, identity: Path | None, trust: Path, path: str = "/", extra: str = ""
) -> Outcome:
    """An HTTPS GET straight to a sidecar's inbound ``addr`` presenting ``identity``."""
    host, port = _split(addr)
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                host, port, ssl=client_context(identity, trust), server_hostname=WEB_HOST
            ),
            IO_TIMEOUT,
        )
    except TimeoutError:
        return Outcome("timeout", error="handshake did not finish")
    except (ssl.SSLError, ConnectionError, OSError) as e:
        return Outcome("handshake_failed", error=repr(e))
    return await _exchange(reader, writer, get(path, WEB_HOST, extra))


async def presented_serial(addr: str, identity: Path, trust: Path) -> int:
    """The serial number of the leaf certificate ``addr`` presents to a new TLS connection."""
    host, port = _split(addr)
    _, writer = await asyncio.wait_for(
        asyncio.open_connection(
            host, port, ssl=client_context(identity, trust), server_hostname=WEB_HOST
        ),
        IO_TIMEOUT,
    )
    try:
        sslobj = writer.get_extra_info("ssl_object")
        der = sslobj.getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der).serial_number
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def via_a(
    session: aiohttp.ClientSession,
    a: Sidecar,
    path: str = "/",
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """GET ``path`` of the web service through sidecar A's outbound listener: (status, body as
    JSON when it is JSON, else text)."""
    h = {"Host": WEB_HOST, **(headers or {})}
    async with session.get(f"http://{a.outbound}{path}", headers=h) as r:
        raw = await r.read()
        try:
            return r.status, json.loads(raw)
        except ValueError:
            return r.status, raw.decode(errors="replace")


# --------------------------------------------------------------------------- topology


def render_client_config(fixture: str, b_inbound: str, out: Path) -> Path:
    text = (DATA / fixture).read_text()
    assert text.count(PLACEHOLDER) == 1, fixture
    _, port = _split(b_inbound)
    out.write_text(re.sub(rf"\b{PLACEHOLDER}\b", str(port), text))
    return out


def write_config(path: Path, text: str) -> None:
    """Replace a config file atomically (as an editor or config tool would)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class Mesh:
    app: EchoApp
    a: Sidecar
    b: Sidecar
    session: aiohttp.ClientSession
    workdir: Path

    async def get(self, path: str = "/", headers: dict[str, str] | None = None) -> tuple[int, Any]:
        return await via_a(self.session, self.a, path, headers)


@asynccontextmanager
async def mesh(
    workdir: Path,
    pki: Pki,
    *,
    server_fixture: str = "server-permissive.yaml",
    client_fixture: str = "client.yaml",
    client_identity: Path | None = None,
    server_identity: Path | None = None,
    client_has_identity: bool = True,
    server_has_identity: bool = True,
) -> AsyncIterator[Mesh]:
    """app <- sidecar B (inbound, ``server_fixture``) <- sidecar A (``client_fixture``).
    Each sidecar gets a private copy of its identity in ``workdir`` (``certs-a``, ``certs-b``);
    with ``client_has_identity`` / ``server_has_identity`` False, A / B runs without
    ``--cert-dir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    certs_a: Path | None = None
    if client_has_identity:
        certs_a = copy_identity(client_identity or pki.client, workdir / "certs-a")
    certs_b: Path | None = None
    if server_has_identity:
        certs_b = copy_identity(server_identity or pki.web, workdir / "certs-b")
    b_cfg = workdir / "B.yaml"
    b_cfg.write_text((DATA / server_fixture).read_text())
    app = await EchoApp().start()
    b = Sidecar(
        "B",
        b_cfg,
        workdir,
        cert_dir=certs_b,
        namespace="app-ns",
        labels="app=web",
        app_port=app.port,
    )
    a: Sidecar | None = None
    try:
        await b.start()
        a_cfg = render_client_config(client_fixture, b.inbound, workdir / "A.yaml")
        a = Sidecar(
            "A", a_cfg, workdir, cert_dir=certs_a, namespace="client-ns", labels="app=client"
        )
        await a.start()
        timeout = aiohttp.ClientTimeout(total=15)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            yield Mesh(app, a, b, session, workdir)
        for side in (a, b):
            code = await side.stop()
            assert code == 0, f"sidecar {side.name} exited {code}:\n{side.stderr()}"
            assert "Traceback" not in side.stderr(), side.stderr()
    finally:
        for side in (a, b):
            if side is not None:
                await side.kill()
        await app.close()


# --------------------------------------------------------------------------- load


@dataclass
class LoadResult:
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    new_connections: int = 0


class LoadLoop:
    """``rate`` requests/s through sidecar A for as long as it runs: ``keepalive`` clients each
    on one kept-alive connection, plus ``fresh`` clients opening a new connection per request.
    Each client sends on its own schedule (rate / clients per second); anything but a 200 from
    the app is a failure, recorded with what happened."""

    def __init__(self, outbound: str, rate: float, keepalive: int = 8, fresh: int = 2) -> None:
        self.addr = _split(outbound)
        self.rate = rate
        self.keepalive = keepalive
        self.fresh = fresh
        self.result = LoadResult()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        clients = self.keepalive + self.fresh
        interval = clients / self.rate
        for i in range(clients):
            fresh = i >= self.keepalive
            offset = interval * i / clients
            self._tasks.append(asyncio.create_task(self._client(i, fresh, interval, offset)))

    async def stop(self) -> LoadResult:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        return self.result

    def _request(self, n: int, fresh: bool) -> bytes:
        extra = "connection: close\r\n" if fresh else ""
        return get(f"/load/{n}", WEB_HOST, extra)

    async def _client(self, idx: int, fresh: bool, interval: float, offset: float) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time() + offset
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        n = 0
        try:
            while not self._stop.is_set():
                delay = next_at - loop.time()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), delay)
                    if self._stop.is_set():
                        break
                next_at += interval
                n += 1
                what = f"client {idx} request {n} at {time.strftime('%H:%M:%S')}"
                try:
                    if conn is None:
                        conn = await asyncio.open_connection(*self.addr)
                        self.result.new_connections += 1
                    reader, writer = conn
                    writer.write(self._request(n, fresh))
                    await writer.drain()
                    resp = await read_response(reader, timeout=IO_TIMEOUT)
                except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as e:
                    self.result.failures.append(f"{what}: {e!r}")
                    if conn is not None:
                        conn[1].close()
                    conn = None
                    continue
                if resp.status == 200:
                    self.result.ok += 1
                else:
                    self.result.failures.append(f"{what}: {resp.status} {resp.body[:200]!r}")
                if fresh or (resp.header("connection") or "").lower() == "close":
                    conn[1].close()
                    conn = None
        finally:
            if conn is not None:
                conn[1].close()
