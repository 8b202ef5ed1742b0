"""raise_if_cancelled: a loop whose awaits may swallow a cancel still stops when cancelled.
PerLoop: one object per event loop, gone with its loop."""

from __future__ import annotations

import asyncio
import gc

import pytest
import uvloop

from tierq.aio import PerLoop, raise_if_cancelled
from tierq.providers.simulated import _Metronome
from tierq.redis_pool import ReadDeadlines, _ReadWatch


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


@pytest.mark.parametrize("new_loop", [asyncio.new_event_loop, uvloop.new_event_loop])
def test_per_loop_objects_are_made_once_per_loop_and_go_with_it(new_loop: object) -> None:
    """The Redis read deadlines (with a timer still pending when their loop closes) and the
    simulated model's metronome must not keep their loop alive: each held it (through the
    timer handle or a reference to the loop), so every closed loop of the tests stayed."""
    deadlines = PerLoop(ReadDeadlines)
    metronomes = PerLoop(_Metronome)

    async def use() -> None:
        loop = asyncio.get_running_loop()
        assert deadlines() is deadlines()
        task = asyncio.current_task()
        assert task is not None
        watch = _ReadWatch()
        deadlines().begin(watch, task, loop.time() + 30)  # its timer: pending at close
        deadlines().end(watch)
        await metronomes().wait(loop.time() + 0.002)

    for _ in range(3):
        loop = new_loop()  # type: ignore[operator]
        loop.run_until_complete(use())
        loop.close()
        del loop
    gc.collect()
    assert len(deadlines._made) == 0
    assert len(metronomes._made) == 0
