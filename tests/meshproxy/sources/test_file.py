"""FileSource: initial load, reload verdicts, watching real files, loop not stalled.

The translation is injected (``build=``), so these tests exercise the source's own logic:
which snapshot goes live, what is recorded on a rejected edit, when nothing happens.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from meshproxy.config.model import ProxyIdentity, Snapshot
from meshproxy.settings import Settings
from meshproxy.sources.file import ConfigError, FileSource
from meshproxy.state import State


@dataclass
class FakeReport:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class Recorder:
    def __init__(self) -> None:
        self.results: list[str] = []

    def config_reload(self, result: str) -> None:
        self.results.append(result)


def file_builder(paths: list[str], proxy: ProxyIdentity) -> tuple[Snapshot | None, FakeReport]:
    """Version = the concatenated file contents; a line starting with 'bad' is a problem."""
    texts = []
    for p in paths:
        if os.path.isdir(p):
            for name in sorted(os.listdir(p)):
                if name.endswith((".yaml", ".yml")):
                    texts.append(Path(p, name).read_text())
        else:
            texts.append(Path(p).read_text())
    content = "".join(texts).strip()
    problems = [
        f"{paths[0]}: VirtualService/x: spec.http: {ln}"
        for ln in content.splitlines()
        if ln.startswith("bad")
    ]
    if problems:
        return None, FakeReport(problems=problems)
    return Snapshot(version=content, proxy=proxy), FakeReport(warnings=["w: skipped Gateway/gw"])


def make(tmp_path: Path, content: str = "v1", **kw) -> tuple[FileSource, State, Recorder, Path]:
    cfg = tmp_path / "mesh.yaml"
    cfg.write_text(content)
    state = State()
    rec = Recorder()
    src = FileSource(
        [str(cfg)],
        ProxyIdentity(),
        state,
        Settings(reload_debounce=0.05),
        rec,
        build=kw.get("build", file_builder),
    )
    return src, state, rec, cfg


def test_load_initial_applies(tmp_path: Path) -> None:
    src, state, rec, _ = make(tmp_path)
    snap = src.load_initial()
    assert state.snapshot is snap and snap.version == "v1" and state.applied
    assert rec.results == ["success"]


def test_load_initial_problems_raise(tmp_path: Path) -> None:
    src, state, _, _ = make(tmp_path, "bad weight\nbad host")
    with pytest.raises(ConfigError) as exc:
        src.load_initial()
    assert len(exc.value.problems) == 2
    assert "VirtualService/x: spec.http: bad weight" in exc.value.problems[0]
    assert not state.applied


async def test_reload_verdicts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src, state, rec, cfg = make(tmp_path)
    src.load_initial()
    swaps: list[str] = []
    state.subscribe(lambda old, new: swaps.append(new.version))

    assert await src.reload() is False  # same content: no swap
    assert swaps == []

    cfg.write_text("bad route")
    with caplog.at_level("WARNING"):
        assert await src.reload() is False
    assert state.snapshot.version == "v1"  # last good stays live
    assert state.last_error is not None and "spec.http: bad route" in state.last_error
    assert any("spec.http: bad route" in r.getMessage() for r in caplog.records)
    assert rec.results[-1] == "rejected"

    cfg.write_text("v2")
    assert await src.reload() is True
    assert state.snapshot.version == "v2" and state.last_error is None
    assert swaps == ["v2"]
    assert rec.results == ["success", "rejected", "success"]


async def test_reverted_bad_edit_clears_error(tmp_path: Path) -> None:
    src, state, _, cfg = make(tmp_path)
    src.load_initial()
    cfg.write_text("bad")
    await src.reload()
    cfg.write_text("v1")
    assert await src.reload() is False
    assert state.last_error is None


async def test_builder_crash_is_a_rejection(tmp_path: Path) -> None:
    calls = {"n": 0}

    def flaky(paths: list[str], proxy: ProxyIdentity):
        calls["n"] += 1
        if calls["n"] > 1:
            raise RuntimeError("boom")
        return file_builder(paths, proxy)

    src, state, rec, _ = make(tmp_path, build=flaky)
    src.load_initial()
    assert await src.reload() is False
    assert state.snapshot.version == "v1"
    assert state.last_error is not None and "boom" in state.last_error
    assert rec.results[-1] == "rejected"


def test_watch_roots_and_relevance(tmp_path: Path) -> None:
    d = tmp_path / "dir"
    d.mkdir()
    f = tmp_path / "other" / "one.yaml"
    f.parent.mkdir()
    f.write_text("x")
    src = FileSource([str(d), str(f)], ProxyIdentity(), State(), Settings())
    assert src.watch_roots() == [str(d), str(f.parent)]
    assert src.is_relevant(str(d / "a.yaml"))
    assert src.is_relevant(str(d / "sub" / "b.yml"))
    assert not src.is_relevant(str(d / ".a.yaml.swp"))
    assert src.is_relevant(str(f))
    assert not src.is_relevant(str(f.parent / "unrelated.yaml"))
    assert not src.is_relevant(str(tmp_path / "elsewhere.yaml"))


async def wait_for(pred, timeout: float = 2.0) -> float:
    start = time.monotonic()
    while not pred():
        if time.monotonic() - start > timeout:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def test_watch_applies_edits_within_2s(tmp_path: Path) -> None:
    src, state, _, cfg = make(tmp_path)
    src.load_initial()
    task = asyncio.create_task(src.watch())
    try:
        await asyncio.sleep(0.3)  # let the watcher start
        cfg.write_text("v2")
        await wait_for(lambda: state.snapshot.version == "v2")
        # replace by rename, as editors and `kubectl`-style tools do
        tmp = tmp_path / ".mesh.yaml.tmp"
        tmp.write_text("v3")
        os.replace(tmp, cfg)
        await wait_for(lambda: state.snapshot.version == "v3")
        cfg.write_text("bad edit")
        await wait_for(lambda: state.last_error is not None)
        assert state.snapshot.version == "v3"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_watch_directory(tmp_path: Path) -> None:
    d = tmp_path / "mesh"
    d.mkdir()
    (d / "a.yaml").write_text("a")
    state = State()
    src = FileSource(
        [str(d)], ProxyIdentity(), state, Settings(reload_debounce=0.05), build=file_builder
    )
    src.load_initial()
    task = asyncio.create_task(src.watch())
    try:
        await asyncio.sleep(0.3)
        (d / "b.yaml").write_text("b")
        await wait_for(lambda: state.snapshot.version == "ab")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_slow_build_does_not_stall_the_loop(tmp_path: Path) -> None:
    """A 0.5 s CPU-bound translation runs off the loop: loop lag stays well under 100 ms."""

    def slow(paths: list[str], proxy: ProxyIdentity):
        deadline = time.perf_counter() + 0.5
        n = 0
        while time.perf_counter() < deadline:
            n += sum(range(200))
        return Snapshot(version=f"slow-{n}"), FakeReport()

    src, state, _, _ = make(tmp_path, build=slow)
    max_lag = 0.0
    done = False

    async def ticker() -> None:
        nonlocal max_lag
        while not done:
            t = time.perf_counter()
            await asyncio.sleep(0.005)
            max_lag = max(max_lag, time.perf_counter() - t - 0.005)

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.02)
    assert await src.reload() is True
    done = True
    await tick
    assert state.snapshot.version.startswith("slow-")
    assert max_lag < 0.1, f"event loop stalled for {max_lag * 1000:.0f} ms"


async def test_reload_builds_with_gc_off_and_freezes_the_result(tmp_path: Path) -> None:
    """No collection may run between a build and the freeze of what it allocated (a
    collection over a big fresh config stalls the loop); afterwards the GC is on again."""
    import gc

    seen: list[bool] = []

    def builder(paths: list[str], proxy: ProxyIdentity) -> tuple[Snapshot | None, FakeReport]:
        seen.append(gc.isenabled())
        return file_builder(paths, proxy)

    src, state, _, cfg = make(tmp_path, build=builder)
    src.load_initial()
    cfg.write_text("v2")
    frozen = gc.get_freeze_count()
    assert await src.reload() is True
    assert state.snapshot.version == "v2"
    assert seen[-1] is False, "the build ran with the cyclic GC enabled"
    assert gc.isenabled()
    assert gc.get_freeze_count() > frozen
