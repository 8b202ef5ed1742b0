"""Small asyncio helpers every layer may use (a leaf: imports nothing of tierq)."""

from __future__ import annotations

import asyncio
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


def raise_if_cancelled() -> None:
    """Re-raise a cancellation that a library swallowed.

    On Python 3.11, ``asyncio.wait_for`` returns the result when a cancel lands just as the
    operation completes, and redis-py uses it to send every command: a task cancelled during
    a Redis call can go on as if nothing happened (seen in tests: about one call in ten when
    cancelled mid-command). The task still counts the request (``cancelling()``), so loops that
    must stop when cancelled call this after each such await."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class PerLoop(Generic[T]):
    """One ``make()`` per event loop, the running loop's made on first use (calling the
    ``PerLoop``) and dropped with its loop (a loop's
    shared timer, say). What ``make`` returns must not hold the loop (it would keep the loop,
    and itself, alive for ever): it asks ``asyncio.get_running_loop()`` when it needs it."""

    __slots__ = ("_made", "_make")

    def __init__(self, make: Callable[[], T]) -> None:
        self._make = make
        self._made: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T] = (
            weakref.WeakKeyDictionary()
        )

    def __call__(self) -> T:
        loop = asyncio.get_running_loop()
        made = self._made.get(loop)
        if made is None:
            self._made[loop] = made = self._make()
        return made


async def ticks(every_s: float, first_s: float | None = None) -> AsyncIterator[None]:
    """Yield every ``every_s`` seconds for ever, the first time after ``first_s`` (by default
    one interval): the rhythm of a periodic task."""
    wait = every_s if first_s is None else first_s
    while True:
        await asyncio.sleep(wait)
        wait = every_s
        yield


class Alarm:
    """A wait that ends at a deadline or when :meth:`wake` is called, whichever comes first:
    a bare future and one timer. ``asyncio.wait_for`` over an event makes a task per wait and
    takes several loop turns to hand a wake-up (or, at the deadline, a cancel) through it; on
    a loop that waits like this for every tick or publish, each of those turns is latency."""

    __slots__ = ("_waiter",)

    def __init__(self) -> None:
        self._waiter: asyncio.Future[bool] | None = None

    def wake(self) -> None:
        """End the wait in progress (its :meth:`until` returns ``False``); none: nothing."""
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(False)

    async def until(self, when: float) -> bool:
        """Wait until loop time ``when`` (``True``) or a :meth:`wake` (``False``)."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self._waiter = waiter
        timer = loop.call_at(when, _ring, waiter)
        try:
            return await waiter
        finally:
            timer.cancel()
            self._waiter = None


def _ring(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(True)


TIMER_SLACK_S = 0.001
"""uvloop's clock and timers have millisecond resolution: a deadline this close counts as
reached (instead of re-arming for a fraction of a millisecond)."""


class LazyDeadline:
    """One timer for a deadline that moves forward once per event (an SSE wait, an SSE write):
    :meth:`arm` only moves the deadline while a timer is pending, and the timer, when it fires
    early, re-arms itself for the deadline then in force, so it fires at most about once per
    interval instead of a timer being made and cancelled per event (that cost more than the
    wait itself under load; measured with ``bench/streaming.py``). ``on_due`` runs once the
    armed deadline has passed without :meth:`disarm`."""

    __slots__ = ("_due", "_handle", "_loop", "_on_due")

    def __init__(self, on_due: Callable[[], None]) -> None:
        self._on_due = on_due
        self._due: float | None = None  # loop time; None: nothing is due
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def arm(self, loop: asyncio.AbstractEventLoop, due: float) -> None:
        self._due = due
        if self._handle is None:
            self._loop = loop
            self._handle = loop.call_at(due, self._fire)

    def disarm(self) -> None:
        """Nothing is due now (a pending timer stays, and does nothing when it fires)."""
        self._due = None

    def cancel(self) -> None:
        self._due = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        due, loop = self._due, self._loop
        if due is None or loop is None:
            return  # disarmed: the next arm makes a timer again
        if loop.time() + TIMER_SLACK_S >= due:
            self._due = None
            self._on_due()
        else:
            self._handle = loop.call_at(due, self._fire)


class FairGate:
    """At most ``limit`` holders at once; waiters are let in one key at a time in rotation
    (``key``: the user a submit or a job start is for), in arrival order within a key. So a
    user with many requests waiting delays another's by at most one turn each. A waiter
    cancelled once let in passes its place on."""

    __slots__ = ("_free", "_lines", "_turns")

    def __init__(self, limit: int) -> None:
        self._free = limit
        self._lines: dict[str, deque[asyncio.Future[None]]] = {}  # key -> its waiters
        self._turns: deque[str] = deque()  # keys with waiters, in the order of their turns

    def fair(self, key: str) -> GatePass:
        return GatePass(self, key)

    @property
    def waiting(self) -> int:
        return sum(len(line) for line in self._lines.values())

    @property
    def idle(self) -> bool:
        """Nobody waits and a place is free: one more holder would go in at once."""
        return self._free > 0 and not self._lines

    async def acquire(self, key: str) -> None:
        if self.idle:
            self._free -= 1
            return
        line = self._lines.get(key)
        if line is None:
            line = self._lines[key] = deque()
            self._turns.append(key)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        line.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # let in just as it was cancelled: the next one goes
            else:
                self._drop(key, waiter)
            raise

    def release(self) -> None:
        waiter = self._next()
        if waiter is None:
            self._free += 1
        else:
            waiter.set_result(None)

    def _next(self) -> asyncio.Future[None] | None:
        if not self._turns:
            return None
        key = self._turns.popleft()
        line = self._lines[key]
        waiter = line.popleft()
        if line:
            self._turns.append(key)  # its next waiter comes after the other keys' turns
        else:
            del self._lines[key]
        return waiter

    def _drop(self, key: str, waiter: asyncio.Future[None]) -> None:
        line = self._lines.get(key)
        if line is None:
            return
        line.remove(waiter)
        if not line:
            del self._lines[key]
            self._turns.remove(key)


class GatePass:
    """``async with``: a place in a :class:`FairGate`, in ``key``'s line."""

    __slots__ = ("_gate", "_key")

    def __init__(self, gate: FairGate, key: str) -> None:
        self._gate, self._key = gate, key

    async def __aenter__(self) -> None:
        await self._gate.acquire(self._key)

    async def __aexit__(self, *exc: object) -> None:
        self._gate.release()
