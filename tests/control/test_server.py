"""The control plane and the proxy's stream source in one process, over real sockets.

A :class:`ControlPlane` serves on 127.0.0.1:0; real :class:`StreamSource` clients (the code
``meshproxy run --control-plane`` runs) and raw WebSocket clients (to send what a real proxy
would not: bad hellos, stale ACKs) connect to it. These cover the protocol's edges quickly;
tests/integration/test_control_plane.py covers the same through the CLI with real processes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from control.protocol import Hello, config_version, hello_message
from control.server import ControlPlane, ControlSettings
from meshproxy.config.model import ProxyIdentity
from meshproxy.settings import Settings
from meshproxy.sources.stream import Backoff, StreamSource
from meshproxy.state import State

SE = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: {ns}}}
spec:
  hosts: [{name}.example.com]
  exportTo: {export}
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: {port}}}}}]
"""


def se(name: str, ns: str = "default", export: str = '["*"]', port: int = 8080) -> str:
    return SE.format(name=name, ns=ns, export=export, port=port)


async def wait_for(pred: Any, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


class Env:
    def __init__(self, tmp: Path) -> None:
        self.dir = tmp / "mesh"
        self.dir.mkdir()
        self.cp: ControlPlane | None = None
        self.url = ""
        self.tasks: list[asyncio.Task[None]] = []

    def write(self, name: str, text: str) -> None:
        (self.dir / name).write_text(text)

    async def start(self) -> ControlPlane:
        self.cp = ControlPlane([str(self.dir)], ControlSettings(hello_timeout=2.0))
        out = self.cp.load_initial()
        assert out.config is not None, out.problems
        host, port = await self.cp.start("127.0.0.1", 0)
        self.url = f"http://{host}:{port}"
        return self.cp

    def proxy(
        self, node: str, ns: str = "default", labels: dict[str, str] | None = None
    ) -> StreamSource:
        src = StreamSource(
            self.url,
            node,
            ProxyIdentity(ns, labels or {}),
            State(),
            Settings(),
            backoff=Backoff(base=0.05, cap=0.2),
        )
        self.tasks.append(asyncio.create_task(src.run()))
        return src

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.cp is not None:
            await self.cp.close()


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    e = Env(tmp_path)
    try:
        yield e
    finally:
        await e.close()


def clusters(src: StreamSource) -> set[str]:
    return {c.host for c in src.state.snapshot.clusters.values()}


async def test_scoped_push_and_per_group_versions(env: Env) -> None:
    env.write("a.yaml", se("shared") + "---\n" + se("private", "team-a", '["."]'))
    cp = await env.start()
    a = env.proxy("a", "team-a")
    b = env.proxy("b", "team-b")
    await wait_for(lambda: a.state.applied and b.state.applied)
    assert clusters(a) == {"shared.example.com", "private.example.com"}
    assert clusters(b) == {"shared.example.com"}  # exportTo "." keeps it in team-a
    await wait_for(lambda: all(c.status == "SYNCED" for c in cp.conns.values()))
    st = cp.status()
    va, vb = (p["acked_version"] for p in st["proxies"])
    assert va != vb  # different documents, different versions
    assert a.state.snapshot.version == va and b.state.snapshot.version == vb
    assert st["version"] == va  # team-a sees every document: the whole config's version
    assert len(cp._plans) == 2
    c = env.proxy("c", "team-b", {"app": "other"})  # other labels, the same documents as b
    await wait_for(lambda: c.state.applied)
    assert c.state.snapshot.version == vb
    plans = cp._plans
    assert plans[("team-b", (("app", "other"),))] is plans[("team-b", ())]  # one shared plan


async def test_an_unchanged_plan_is_not_pushed_again(env: Env) -> None:
    env.write("a.yaml", se("shared") + "---\n" + se("private", "team-a", '["."]'))
    cp = await env.start()
    sent: list[str] = []
    cp.on_push = lambda c: sent.append(c.node_id)
    a = env.proxy("a", "team-a")
    b = env.proxy("b", "team-b")
    await wait_for(
        lambda: all(c.status == "SYNCED" for c in cp.conns.values()) and len(cp.conns) == 2
    )
    assert sorted(sent) == ["a", "b"]
    vb = b.state.snapshot.version
    # a change only team-a can see: only a gets a push
    env.write("a.yaml", se("shared") + "---\n" + se("private", "team-a", '["."]', port=9090))
    assert await cp.reload()
    await wait_for(lambda: all(c.status == "SYNCED" for c in cp.conns.values()))
    assert sorted(sent) == ["a", "a", "b"]
    assert b.state.snapshot.version == vb
    assert a.acks == 2 and b.acks == 1
    # same content again: no new version, nothing pushed
    env.write("a.yaml", se("shared") + "---\n" + se("private", "team-a", '["."]', port=9090))
    assert not await cp.reload()
    assert sorted(sent) == ["a", "a", "b"]


async def test_invalid_directory_keeps_the_last_valid_config(env: Env) -> None:
    env.write("a.yaml", se("one"))
    cp = await env.start()
    a = env.proxy("a")
    await wait_for(lambda: a.state.applied)
    v0 = cp.config.version if cp.config else None
    env.write("b.yaml", se("two").replace("resolution: STATIC", "resolution: STATIK"))
    assert not await cp.reload()
    assert cp.config is not None and cp.config.version == v0
    assert len(cp.errors) == 1 and "b.yaml: ServiceEntry/two: spec.resolution" in cp.errors[0]
    assert cp.status()["errors"] == list(cp.errors)
    assert clusters(a) == {"one.example.com"}
    env.write("b.yaml", se("two"))
    assert await cp.reload()
    assert cp.errors == ()
    await wait_for(lambda: clusters(a) == {"one.example.com", "two.example.com"})


async def raw_stream(url: str, session: aiohttp.ClientSession) -> aiohttp.ClientWebSocketResponse:
    return await session.ws_connect(url.replace("http://", "ws://") + "/v1/stream")


async def test_hello_with_the_current_version_gets_nothing(env: Env) -> None:
    env.write("a.yaml", se("one"))
    cp = await env.start()
    assert cp.config is not None
    docs = [json.loads(json.dumps(d)) for d in cp.config.documents]
    from control.istio.load import _canonical_digest

    version = config_version(_canonical_digest(d) for d in docs)
    async with aiohttp.ClientSession() as s:
        ws = await raw_stream(env.url, s)
        await ws.send_str(hello_message(Hello("raw", "default", {}, version)))
        with pytest.raises(TimeoutError):
            await ws.receive(timeout=0.5)
        assert cp.conns["raw"].status == "SYNCED"
        assert cp.metrics.pushes._value.get() == 0
        # a stale hello version gets the config
        ws2 = await raw_stream(env.url, s)
        await ws2.send_str(hello_message(Hello("raw2", "default", {}, "0000")))
        msg = json.loads((await ws2.receive(timeout=5)).data)
        assert msg["type"] == "config" and msg["version"] == version
        assert msg["resources"] == docs
        await ws.close()
        await ws2.close()


async def test_bad_hello_is_answered_with_an_error_and_closed(env: Env) -> None:
    env.write("a.yaml", se("one"))
    cp = await env.start()
    async with aiohttp.ClientSession() as s:
        for frame in (
            '{"type": "ack"}',
            "not json",
            '{"type":"hello","node_id":"","namespace":"x"}',
        ):
            ws = await raw_stream(env.url, s)
            await ws.send_str(frame)
            msg = await ws.receive(timeout=5)
            assert msg.type == aiohttp.WSMsgType.TEXT
            assert json.loads(msg.data)["type"] == "error"
            assert (await ws.receive(timeout=5)).type in (
                aiohttp.WSMsgType.CLOSE,
                aiohttp.WSMsgType.CLOSED,
            )
        ws = await raw_stream(env.url, s)  # silent: closed after hello_timeout
        msg = await ws.receive(timeout=5)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    assert cp.conns == {}


async def test_stale_ack_is_ignored_and_nack_recorded(env: Env) -> None:
    env.write("a.yaml", se("one"))
    cp = await env.start()
    async with aiohttp.ClientSession() as s:
        ws = await raw_stream(env.url, s)
        await ws.send_str(hello_message(Hello("raw", "default", {}, None)))
        first = json.loads((await ws.receive(timeout=5)).data)
        env.write("a.yaml", se("one", port=9999))
        assert await cp.reload()
        second = json.loads((await ws.receive(timeout=5)).data)
        conn = cp.conns["raw"]
        # an ACK for the first (stale) nonce changes nothing
        await ws.send_str(
            json.dumps({"type": "ack", "nonce": first["nonce"], "version": first["version"]})
        )
        await asyncio.sleep(0.2)
        assert conn.status == "STALE" and conn.acked_version is None
        await ws.send_str(
            json.dumps(
                {
                    "type": "nack",
                    "nonce": second["nonce"],
                    "version": second["version"],
                    "error": "no thanks",
                }
            )
        )
        await wait_for(lambda: conn.status == "NACKED")
        view = cp.status()["proxies"][0]
        assert view["nacked"] == "no thanks" and view["expected_version"] == second["version"]
        assert cp.metrics.nacks._value.get() == 1
        await ws.close()


async def test_a_new_stream_with_the_same_node_id_replaces_the_old(env: Env) -> None:
    env.write("a.yaml", se("one"))
    cp = await env.start()
    async with aiohttp.ClientSession() as s:
        old = await raw_stream(env.url, s)
        await old.send_str(hello_message(Hello("same", "default", {}, None)))
        await old.receive(timeout=5)
        new = await raw_stream(env.url, s)
        await new.send_str(hello_message(Hello("same", "default", {}, None)))
        await new.receive(timeout=5)
        msg = await old.receive(timeout=5)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        await wait_for(lambda: len(cp.conns) == 1 and cp.conns["same"].ws is not None)
        assert cp.metrics.connected._value.get() == 1
        await new.close()
    await wait_for(lambda: cp.conns == {})


async def test_proxy_nacks_a_damaged_config_and_keeps_its_own(env: Env) -> None:
    env.write("a.yaml", se("one"))
    cp = await env.start()
    a = env.proxy("a")
    await wait_for(lambda: a.state.applied)
    v0 = a.state.snapshot.version
    assert cp.config is not None
    doc = dict(cp.config.documents[0])
    ack = await a.on_config(
        {"type": "config", "nonce": "n1", "version": "ffffffffffffffff", "resources": [doc]}
    )
    assert ack.error is not None and "does not match its documents" in ack.error
    bad = json.loads(json.dumps(doc))
    bad["spec"]["resolution"] = "STATIK"
    ack = await a.on_config({"type": "config", "nonce": "n2", "version": "x", "resources": [bad]})
    assert (
        ack.error is not None and "<control-plane>: ServiceEntry/one: spec.resolution" in ack.error
    )
    assert a.state.snapshot.version == v0 and a.nacks == 2
    assert a.state.last_error == ack.error


async def test_proxy_reconnects_and_resynchronises(env: Env, tmp_path: Path) -> None:
    env.write("a.yaml", se("one"))
    cp = await env.start()
    port = int(env.url.rsplit(":", 1)[1])
    a = env.proxy("a")
    await wait_for(lambda: a.state.applied)
    await cp.close()
    await wait_for(lambda: not a.connected)
    assert a.state.applied and clusters(a) == {"one.example.com"}  # still serving
    env.write("a.yaml", se("one") + "---\n" + se("two"))
    cp2 = ControlPlane([str(env.dir)])
    assert cp2.load_initial().config is not None
    env.cp = cp2
    await cp2.start("127.0.0.1", port)
    await wait_for(lambda: clusters(a) == {"one.example.com", "two.example.com"})
    assert a.connects >= 2


def test_backoff_is_jittered_and_capped() -> None:
    b = Backoff(base=0.5, cap=15.0)
    assert b.delay(0, lambda: 0.999) < 0.5
    assert b.delay(3, lambda: 0.5) == pytest.approx(2.0)
    assert b.delay(100, lambda: 0.999) < 15.0
    assert b.delay(5, lambda: 0.0) == 0.0


VS_TO_SUBSET = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: to-v1, namespace: team-b}
spec:
  hosts: [shared.example.com]
  http:
  - route:
    - destination: {host: shared.example.com, subset: v1}
"""

ROOT_DR = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: root-wild, namespace: istio-system}
spec:
  host: "*.example.com"
  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
"""


async def test_pushed_config_is_not_refused_for_a_reference_outside_its_scope(env: Env) -> None:
    """The control plane checked references over the whole directory; a proxy's subset may
    leave a subset's DestinationRule out (exported elsewhere), which is not a reason to NACK."""
    import yaml

    from control.istio.load import _canonical_digest

    env.write("a.yaml", se("shared"))
    await env.start()
    a = env.proxy("a", "team-b")
    await wait_for(lambda: a.state.applied)
    # with the rule that defines v1 left out (exported elsewhere), the root rule is the one
    # the reference check finds, and it has no v1: an error over this subset alone
    docs = [yaml.safe_load(x) for x in (se("shared"), VS_TO_SUBSET, ROOT_DR)]
    version = config_version(_canonical_digest(d) for d in docs)
    ack = await a.on_config({"type": "config", "nonce": "n", "version": version, "resources": docs})
    assert ack.error is None, ack.error
    assert a.state.snapshot.version == version
