"""meshproxy.app's Proxy helpers that need no listener: cut-short waits and cancellation."""

from __future__ import annotations

import asyncio
import types

from meshproxy.app import Proxy


async def _slow_to_cancel(cancelled: asyncio.Event) -> bool:
    """Waits forever; once cancelled, takes a moment to clean up (like a drain wait)."""
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        cancelled.set()
        await asyncio.sleep(0.2)
        raise
    return True


async def test_until_forced_returns_none_when_a_second_signal_cuts_the_wait() -> None:
    fake = types.SimpleNamespace(_force=asyncio.Event())
    cancelled = asyncio.Event()
    task = asyncio.create_task(Proxy._until_forced(fake, _slow_to_cancel(cancelled)))  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    fake._force.set()
    assert await asyncio.wait_for(task, 2) is None
    assert cancelled.is_set()


async def test_until_forced_does_not_swallow_its_own_cancellation() -> None:
    """serve() cancelled while the forced wait is being cancelled must end cancelled."""
    fake = types.SimpleNamespace(_force=asyncio.Event())
    cancelled = asyncio.Event()
    task = asyncio.create_task(Proxy._until_forced(fake, _slow_to_cancel(cancelled)))  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    fake._force.set()
    await asyncio.wait_for(cancelled.wait(), 2)  # now awaiting the wait's own cancellation
    task.cancel()
    await asyncio.wait({task}, timeout=2)
    assert task.cancelled()


async def test_until_forced_returns_the_result() -> None:
    fake = types.SimpleNamespace(_force=asyncio.Event())

    async def quick() -> bool:
        return False

    assert await Proxy._until_forced(fake, quick()) is False  # type: ignore[arg-type]
