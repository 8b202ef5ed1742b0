"""The per-process tail hub: one blocking reader for every job log that SSE connections follow.

One task runs ``XREAD BLOCK`` over all followed streams at once (and over this hub's own wake-up
stream) and fans the entries out to the in-process :class:`Subscription` of each connection; a
connection holds no Redis connection of its own. A subscription's backlog is bounded by bytes:
a client too slow to take it is dropped (its backlog freed), and resumes with
``Last-Event-ID`` — it never grows memory without bound nor slows the others.

Following a new stream while an ``XREAD`` is blocked: the hub appends to its wake-up stream, so
the blocked read returns and the next one includes the new stream (``_uncovered`` keeps this
exact: a stream added after a read was sent is woken for, whatever the interleaving).

Positions: a stream first followed starts at its first subscriber's position; a subscriber that
joins a stream the hub already reads past must read the gap itself (``backfill_to``); the hub
may deliver entries a subscriber already has (a later joiner, or a read sent before the stream
was re-followed), so subscribers drop entries at or before their own position.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from tierq.aio import raise_if_cancelled
from tierq.events.codec import stream_id

log = structlog.get_logger("tierq.events")
Rows = list[tuple[str, str]]
BLOCK_MS = 5000
"""How long one ``XREAD`` blocks (new streams wake it at once, so this only bounds idling)."""
READ_COUNT = 1024
"""Entries per stream per read (a job's live tail; replays are read by their followers)."""
WAKE_TTL_MS = 3_600_000
RETRY_S = 0.5


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _raw(response: Any, **options: Any) -> Any:
    return response


class Subscription:
    """What one follower of one stream receives from the hub."""

    __slots__ = ("_waiter", "backfill_to", "closed", "key", "limit", "on_overflow", "overflowed",
                 "rows", "size")  # fmt: skip

    def __init__(self, key: str, limit: int, on_overflow: Callable[[], None] | None) -> None:
        self.key = key
        self.limit = limit
        self.on_overflow = on_overflow  # e.g. abort the client's blocked write
        self.rows: Rows = []
        self.size = 0
        self.backfill_to: str | None = None  # the follower must read (its position, this]
        self.overflowed = False  # dropped as too slow: the follower must end
        self.closed = False
        self._waiter: asyncio.Future[None] | None = None

    def push(self, rows: Rows, size: int) -> None:
        """Hand over ``rows`` (``size``: their bytes, counted once for every subscriber)."""
        if self.closed or self.overflowed:
            return
        behind = bool(self.rows)  # it has not taken what came before: a backlog is building
        self.rows.extend(rows)
        self.size += size
        if behind and self.size > self.limit:
            self.overflowed = True
            self.rows, self.size = [], 0
            if self.on_overflow is not None:
                self.on_overflow()
        self._wake()

    def close(self) -> None:
        """End the follower's wait (the client went away); idempotent."""
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next(self, timeout_s: float) -> Rows | None:
        """Entries received since the last call, waiting up to ``timeout_s``; ``None`` when
        nothing came. Returns ``[]`` at once once closed or overflowed."""
        if not (self.rows or self.closed or self.overflowed):
            # A bare future and timer, not asyncio.timeout(): this runs once per event sent
            # and asyncio.timeout costs several times more (measured under load).
            loop = asyncio.get_running_loop()
            self._waiter = waiter = loop.create_future()
            timer = loop.call_later(timeout_s, _expire, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
            if not (self.rows or self.closed or self.overflowed):
                return None
        rows, self.rows, self.size = self.rows, [], 0
        return rows


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class _Followed:
    __slots__ = ("pos", "subs")

    def __init__(self, pos: str) -> None:
        self.pos = pos  # the last entry id fanned out (or the first subscriber's position)
        self.subs: set[Subscription] = set()


class TailHub:
    """See the module doc. The reader task starts on the first subscription."""

    def __init__(
        self, reader: aioredis.Redis, writer: aioredis.Redis, wake_key: str, buffer_bytes: int
    ) -> None:
        self._reader = reader  # its own connection: a blocked XREAD holds it
        # the raw reply (lists of [id, [field, value]]): no dict per entry, bytes as they come
        reader.set_response_callback("XREAD", _raw)
        self._writer = writer
        self.wake_key = f"{wake_key}:{uuid.uuid4().hex}"
        self.buffer_bytes = buffer_bytes
        self._streams: dict[str, _Followed] = {}
        self._wake_pos = "0-0"
        self._reading: set[str] | None = None  # the streams the XREAD in flight covers
        self._uncovered: set[str] = set()
        self._issued = asyncio.Event()  # replaced each time a read is sent
        self._idle = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._wake_task: asyncio.Task[None] | None = None
        self.reads = 0  # XREADs sent (for tests and metrics)

    @property
    def followed(self) -> int:
        return len(self._streams)

    @property
    def subscribers(self) -> int:
        return sum(len(f.subs) for f in self._streams.values())

    def subscribe(
        self, key: str, after: str, on_overflow: Callable[[], None] | None = None
    ) -> Subscription:
        """Follow ``key`` from entry id ``after`` (exclusive)."""
        sub = Subscription(key, self.buffer_bytes, on_overflow)
        followed = self._streams.get(key)
        if followed is None:
            self._streams[key] = followed = _Followed(after)
            self._cover(key)
        elif stream_id(followed.pos) > stream_id(after):
            sub.backfill_to = followed.pos
        followed.subs.add(sub)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="tierq-tail-hub")
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        sub.close()
        followed = self._streams.get(sub.key)
        if followed is None:
            return
        followed.subs.discard(sub)
        if not followed.subs:  # the next read leaves it out
            del self._streams[sub.key]
            self._uncovered.discard(sub.key)

    async def stop(self) -> None:
        for task in (self._task, self._wake_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._task = self._wake_task = None
        for followed in self._streams.values():
            for sub in followed.subs:
                sub.close()
        self._streams.clear()

    # -- the reader ------------------------------------------------------------------------

    def _cover(self, key: str) -> None:
        if self._reading is None:
            self._idle.set()  # not blocked: the next read is built with this stream in it
        elif key not in self._reading:
            self._uncovered.add(key)
            if self._wake_task is None or self._wake_task.done():
                self._wake_task = asyncio.create_task(self._wake(), name="tierq-tail-hub-wake")

    async def _run(self) -> None:
        while True:
            if not self._streams:
                self._idle.clear()
                await self._idle.wait()
                continue
            asked = {key: followed.pos for key, followed in self._streams.items()}
            self._reading = set(asked)
            self._uncovered.clear()
            issued, self._issued = self._issued, asyncio.Event()
            issued.set()
            self.reads += 1
            # The raw command: redis-py's xread() helper costs more than the read itself with
            # hundreds of streams (argument checks per call; measured under load).
            keys, ids = [self.wake_key, *asked], [self._wake_pos, *asked.values()]
            try:
                reply: Any = await self._reader.execute_command(  # type: ignore[no-untyped-call] # redis-py leaves it untyped
                    "XREAD", "COUNT", READ_COUNT, "BLOCK", BLOCK_MS, "STREAMS", *keys, *ids
                )
            except RedisError as exc:
                log.warning("tail_hub.read_failed", error=str(exc))
                await asyncio.sleep(RETRY_S)
                continue
            finally:
                self._reading = None
            raise_if_cancelled()  # stop() must end this loop, even through redis-py
            try:
                self._fan_out(reply or [], asked)
            except Exception:  # a bug here must not stop every stream of the process
                log.exception("tail_hub.fan_out_failed")
                await asyncio.sleep(RETRY_S)

    def _fan_out(self, reply: Any, asked: dict[str, str]) -> None:
        # RESP3 answers a map of stream → entries, RESP2 a list of [stream, entries]
        for raw_key, entries in reply.items() if isinstance(reply, dict) else reply:
            key = _s(raw_key)
            if key == self.wake_key:
                self._wake_pos = _s(entries[-1][0])
                continue
            followed = self._streams.get(key)
            if followed is None or followed.pos != asked.get(key):
                continue  # no longer followed, or re-followed since: the next read covers it
            rows = [(i.decode(), f[1].decode()) for i, f in entries]
            followed.pos = rows[-1][0]
            size = sum(len(raw) for _, raw in rows)
            for sub in followed.subs:
                sub.push(rows, size)

    async def _wake(self) -> None:
        """Make the blocked read return until every followed stream is covered by one."""
        while self._uncovered and self._reading is not None:
            issued = self._issued
            try:
                pipe = self._writer.pipeline(transaction=False)
                pipe.xadd(self.wake_key, {"w": "1"}, maxlen=16, approximate=True)
                pipe.pexpire(self.wake_key, WAKE_TTL_MS)
                await pipe.execute()
            except RedisError as exc:
                log.warning("tail_hub.wake_failed", error=str(exc))
                await asyncio.sleep(RETRY_S)
                continue
            raise_if_cancelled()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(BLOCK_MS / 1000 + 1):
                    await issued.wait()
