"""raise_if_cancelled: a loop whose awaits may swallow a cancel still stops when cancelled."""

from __future__ import annotations

import asyncio

import pytest

from tierq.aio import raise_if_cancelled


async def swallowing_call() -> str:
    """What redis-py's send does on Python 3.11 when a cancel lands as the command completes."""
    try:
        await asyncio.sleep(10)
    except asyncio.CancelledError:
        return "reply"
    return "reply"


async def test_a_swallowed_cancel_is_raised_again() -> None:
    calls = 0

    async def loop() -> None:
        nonlocal calls
        while True:
            calls += 1
            await swallowing_call()
            raise_if_cancelled()

    task = asyncio.create_task(loop())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 2)
    assert calls == 1  # it did not go round again


async def test_nothing_happens_without_a_cancel() -> None:
    async def job() -> str:
        await asyncio.sleep(0)
        raise_if_cancelled()
        return "done"

    assert await asyncio.wait_for(asyncio.create_task(job()), 2) == "done"
