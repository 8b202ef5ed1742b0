"""FairGate: at most its limit inside; waiters let in by user in turn; a cancelled waiter
loses its place, or passes on the place it was given."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from tierq.aio import FairGate, GatePass


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def entrant(
    gate_pass: GatePass, name: str, order: list[str], leave: asyncio.Event
) -> Callable[[], Coroutine[Any, Any, None]]:
    async def go() -> None:
        async with gate_pass:
            order.append(name)
            await leave.wait()

    return go


async def hold(gate: FairGate, until: asyncio.Event) -> None:
    """Hold a place (of user ``x``) until ``until`` is set."""
    async with gate.fair("x"):
        await until.wait()


async def test_users_take_turns() -> None:
    gate = FairGate(1)
    order: list[str] = []
    leave = asyncio.Event()
    holder = asyncio.Event()
    first = asyncio.create_task(hold(gate, holder))
    await settle()
    waiters = [("a1", gate.fair("a")), ("a2", gate.fair("a")), ("a3", gate.fair("a")),
               ("b1", gate.fair("b")), ("c1", gate.fair("c")), ("b2", gate.fair("b"))]  # fmt: skip
    tasks = []
    for name, gate_pass in waiters:
        tasks.append(asyncio.create_task(entrant(gate_pass, name, order, leave)()))
        await settle()
    assert order == []
    assert gate.waiting == 6
    leave.set()  # each one leaves as soon as it is in: the next one goes
    holder.set()
    await asyncio.wait_for(asyncio.gather(first, *tasks), 5)
    # a, b, c, a, b, a: one per user per turn, each user's in arrival order
    assert order == ["a1", "b1", "c1", "a2", "b2", "a3"]
    assert gate.waiting == 0


async def test_never_more_than_the_limit_inside() -> None:
    gate = FairGate(3)
    inside = peak = 0

    async def visit(gate_pass: GatePass) -> None:
        nonlocal inside, peak
        async with gate_pass:
            inside += 1
            peak = max(peak, inside)
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            inside -= 1

    passes = [gate.fair(f"u{i % 4}") for i in range(200)]
    await asyncio.wait_for(asyncio.gather(*(visit(p) for p in passes)), 5)
    assert peak == 3
    assert inside == 0
    # all places are back: 3 enter at once without waiting
    entered = [asyncio.create_task(visit(gate.fair("z"))) for _ in range(3)]
    await asyncio.wait_for(asyncio.gather(*entered), 5)


async def test_a_cancelled_waiter_loses_its_place() -> None:
    gate = FairGate(1)
    order: list[str] = []
    leave = asyncio.Event()
    leave.set()
    release = asyncio.Event()
    holder = asyncio.create_task(hold(gate, release))
    await settle()
    gone = asyncio.create_task(entrant(gate.fair("a"), "a1", order, leave)())
    kept = asyncio.create_task(entrant(gate.fair("b"), "b1", order, leave)())
    await settle()
    gone.cancel()
    await settle()
    assert gate.waiting == 1
    release.set()
    await asyncio.wait_for(asyncio.gather(holder, kept), 5)
    assert order == ["b1"]
    assert gone.cancelled()


async def test_a_waiter_cancelled_as_it_is_let_in_passes_the_place_on() -> None:
    gate = FairGate(1)
    order: list[str] = []
    leave = asyncio.Event()
    leave.set()
    await gate.acquire("x")
    late = asyncio.create_task(entrant(gate.fair("a"), "a1", order, leave)())
    next_one = asyncio.create_task(entrant(gate.fair("b"), "b1", order, leave)())
    await settle()
    gate.release()  # lets "a1" in (its waiter has the result) ...
    late.cancel()  # ... but "a1" is cancelled before it runs again
    await asyncio.wait_for(next_one, 5)
    assert order == ["b1"]
    assert late.cancelled()
    assert gate.waiting == 0
    async with asyncio.timeout(1):  # the place is free again
        async with gate.fair("c"):
            pass


async def test_idle_only_while_a_place_is_free_and_nobody_waits() -> None:
    gate = FairGate(1)
    assert gate.idle
    await gate.acquire("a")  # the one place taken
    assert not gate.idle
    waiter = asyncio.create_task(gate.acquire("b"))
    await settle()
    assert gate.waiting == 1
    gate.release()  # handed to b at once: still no place free
    await waiter
    assert not gate.idle
    gate.release()
    assert gate.idle
