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

Jobs running in this process: their deltas do not come back by ``XREAD``. While a job's
:class:`~tierq.events.deltas.DeltaBuffer` is open (:meth:`TailHub.begin_local` … :meth:`end_local`)
its log is left out of the blocking read, and the delta writer hands each delta it wrote to
:meth:`TailHub.local_entry` (its entry id and JSON, from the flush script's reply). Measured at
500 streams: the hub's ``XREAD`` named 500 streams and cost Redis ~530 µs a call, a quarter of
Redis's CPU, and the app parsed every delta a second time. Anything else written to such a log
meanwhile (by another process, or by another path of this one) is not lost: followers check that
``seq`` is dense and read a gap from the log themselves (``JobFollower``), and once the buffer
closes the log is read by ``XREAD`` again from the last entry handed over.

Redis Cluster refuses one ``XREAD`` over keys of several hash slots (even on one node), so
there the hub runs one such read per slot it follows, each with a wake-up stream of its own in
that slot; job keys share a bounded set of hash tags (``AppKeys.job_tags``), which bounds the
blocked reads (and connections) of a process however many streams it follows. On a single node
it is one read for everything, as above.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable
from typing import Any, cast

import redis.asyncio as aioredis
import structlog
from redis.crc import key_slot
from redis.exceptions import RedisClusterException, RedisError

from tierq.aio import LazyDeadline, raise_if_cancelled
from tierq.events.codec import Entry, entry, stream_id

log = structlog.get_logger("tierq.events")
Rows = list[Entry]
"""Log entries, each parsed once however many subscribers take it."""
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

    __slots__ = ("_idle", "_waiter", "backfill_to", "closed", "key", "limit", "on_overflow",
                 "overflowed", "rows", "size")  # fmt: skip

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
        self._idle = LazyDeadline(self._wake)  # the wait in progress ends idle at its deadline

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
        self._idle.cancel()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next(self, timeout_s: float) -> Rows | None:
        """Entries received since the last call, waiting up to ``timeout_s``; ``None`` when
        nothing came. Returns ``[]`` at once once closed or overflowed."""
        if not (self.rows or self.closed or self.overflowed):
            # A lazy deadline, not a timer per wait: this runs once per event sent.
            loop = asyncio.get_running_loop()
            self._waiter = waiter = loop.create_future()
            self._idle.arm(loop, loop.time() + timeout_s)
            try:
                await waiter
            finally:
                self._waiter = None
                self._idle.disarm()
            if not (self.rows or self.closed or self.overflowed):
                return None
        rows, self.rows, self.size = self.rows, [], 0
        return rows


class _Followed:
    __slots__ = ("pos", "reader", "subs")

    def __init__(self, pos: str, reader: _Reader) -> None:
        self.pos = pos  # the last entry id fanned out (or the first subscriber's position)
        self.reader = reader
        self.subs: set[Subscription] = set()


class _Reader:
    """One blocking ``XREAD`` loop: over every followed stream on a single node; on Redis
    Cluster, over the followed streams of one hash slot (Cluster refuses one read across
    slots), with a wake-up stream in that slot."""

    __slots__ = ("issued", "keys", "reading", "slot", "task", "uncovered", "wake_key",
                 "wake_pos", "wake_task")  # fmt: skip

    def __init__(self, slot: int | None, wake_key: str) -> None:
        self.slot = slot  # None: a single node, one reader for every stream
        self.wake_key = wake_key
        self.wake_pos = "0-0"
        self.keys: set[str] = set()  # the followed streams it reads
        self.reading: set[str] | None = None  # the streams the XREAD in flight covers
        self.uncovered: set[str] = set()
        self.issued = asyncio.Event()  # replaced each time a read is sent
        self.task: asyncio.Task[None] | None = None
        self.wake_task: asyncio.Task[None] | None = None


def hash_tag(key: str) -> str:
    """What Redis Cluster hashes of ``key``: its ``{tag}`` when it has a non-empty one."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


class TailHub:
    """See the module doc. A reader task starts on the first subscription (of its slot, on
    Redis Cluster) and ends once it has no stream left to read.

    ``cluster``: ``reader`` and ``writer`` are Redis Cluster clients; followed streams are
    grouped by hash slot, one blocking read per slot, each with its own wake-up stream
    (``<wake_key>:<process>:{<tag>}``, in the slot). With job keys that share a bounded set of
    tags (``AppKeys.job_tags``) a process holds at most that many blocked reads. On a single
    node everything is one read, as the module doc says."""

    def __init__(
        self,
        reader: aioredis.Redis,
        writer: aioredis.Redis,
        wake_key: str,
        buffer_bytes: int,
        *,
        cluster: bool = False,
    ) -> None:
        self._reader = reader  # its own connection(s): a blocked XREAD holds one
        # the raw reply (lists of [id, [field, value]]): no dict per entry, bytes as they come
        reader.set_response_callback("XREAD", _raw)
        self._writer = writer
        self.cluster = cluster
        self.wake_key = f"{wake_key}:{uuid.uuid4().hex}"
        self.buffer_bytes = buffer_bytes
        self._streams: dict[str, _Followed] = {}
        self._readers: dict[int | None, _Reader] = {}
        self._local: dict[str, int] = {}  # logs written by this process's delta writer, counted
        self.reads = 0  # XREADs sent (for tests and metrics)

    @property
    def followed(self) -> int:
        return len(self._streams)

    @property
    def subscribers(self) -> int:
        return sum(len(f.subs) for f in self._streams.values())

    @property
    def readers(self) -> int:
        """Reader tasks running (one at most on a single node; one per slot on Cluster)."""
        return sum(1 for r in self._readers.values() if r.task is not None and not r.task.done())

    def subscribe(
        self, key: str, after: str, on_overflow: Callable[[], None] | None = None
    ) -> Subscription:
        """Follow ``key`` from entry id ``after`` (exclusive)."""
        sub = Subscription(key, self.buffer_bytes, on_overflow)
        followed = self._streams.get(key)
        if followed is None:
            reader = self._reader_for(key)
            self._streams[key] = followed = _Followed(after, reader)
            reader.keys.add(key)
            self._cover(reader, key)
        else:
            if stream_id(followed.pos) > stream_id(after):
                sub.backfill_to = followed.pos
            self._cover(followed.reader, key)  # restarts a reader that died, else nothing
        followed.subs.add(sub)
        return sub

    def begin_local(self, key: str) -> None:
        """This process writes ``key``'s deltas from now on (a job's run): leave it out of the
        blocking read; its deltas come by :meth:`local_entry`."""
        self._local[key] = self._local.get(key, 0) + 1

    def end_local(self, key: str) -> None:
        """The run that wrote ``key`` ended here: read it by ``XREAD`` again, from the last
        entry handed over (the terminal event, written next, comes that way)."""
        left = self._local.get(key, 0) - 1
        if left > 0:
            self._local[key] = left
            return
        self._local.pop(key, None)
        followed = self._streams.get(key)
        if followed is not None:
            self._cover(followed.reader, key)

    def local_entry(self, key: str, item: Entry) -> None:
        """A delta this process just wrote to ``key`` (see :meth:`begin_local`)."""
        followed = self._streams.get(key)
        if followed is None or key not in self._local:
            return
        if item.pos <= stream_id(followed.pos):
            return  # already fanned out (a read sent before the run began brought it)
        followed.pos = item.id
        rows = [item]
        for sub in followed.subs:
            sub.push(rows, len(item.raw))

    def unsubscribe(self, sub: Subscription) -> None:
        sub.close()
        followed = self._streams.get(sub.key)
        if followed is None:
            return
        followed.subs.discard(sub)
        if not followed.subs:  # the next read leaves it out
            del self._streams[sub.key]
            followed.reader.keys.discard(sub.key)
            followed.reader.uncovered.discard(sub.key)

    async def stop(self) -> None:
        tasks = [t for r in self._readers.values() for t in (r.task, r.wake_task) if t]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._readers.clear()
        for followed in self._streams.values():
            for sub in followed.subs:
                sub.close()
        self._streams.clear()

    # -- the readers -----------------------------------------------------------------------

    def _reader_for(self, key: str) -> _Reader:
        slot = key_slot(key.encode()) if self.cluster else None
        reader = self._readers.get(slot)
        if reader is None:
            wake_key = self.wake_key
            if slot is not None:
                wake_key = f"{wake_key}:{{{hash_tag(key)}}}"
                if key_slot(wake_key.encode()) != slot:
                    raise ValueError(f"no wake-up stream can share the slot of {key!r}")
            self._readers[slot] = reader = _Reader(slot, wake_key)
        return reader

    def _cover(self, reader: _Reader, key: str) -> None:
        if key in self._local and reader.task is not None and not reader.task.done():
            return  # its deltas come from the writer; XREAD takes it back at end_local
        if reader.task is None or reader.task.done():
            reader.task = asyncio.create_task(self._run(reader), name="tierq-tail-hub")
        elif reader.reading is not None and key not in reader.reading:
            # blocked in a read without this stream: wake it (when not blocked, the next read
            # is built with this stream in it)
            reader.uncovered.add(key)
            if reader.wake_task is None or reader.wake_task.done():
                reader.wake_task = asyncio.create_task(
                    self._wake(reader), name="tierq-tail-hub-wake"
                )

    async def _run(self, reader: _Reader) -> None:
        while reader.keys:
            local = self._local
            asked = {key: self._streams[key].pos for key in reader.keys if key not in local}
            reader.reading = set(asked)
            reader.uncovered.clear()
            issued, reader.issued = reader.issued, asyncio.Event()
            issued.set()
            self.reads += 1
            try:
                reply = await self._read(reader, asked)
            except (RedisError, RedisClusterException) as exc:  # the latter: Cluster topology
                log.warning("tail_hub.read_failed", error=str(exc))
                await asyncio.sleep(RETRY_S)
                continue
            finally:
                reader.reading = None
            raise_if_cancelled()  # stop() must end this loop, even through redis-py
            try:
                self._fan_out(reader, reply or [], asked)
            except Exception:  # a bug here must not stop every stream of the process
                log.exception("tail_hub.fan_out_failed")
                await asyncio.sleep(RETRY_S)
        if reader.slot is not None and self._readers.get(reader.slot) is reader:
            del self._readers[reader.slot]  # a later stream of this slot starts a new one

    async def _read(self, reader: _Reader, asked: dict[str, str]) -> Any:
        # The raw command: redis-py's xread() helper costs more than the read itself with
        # hundreds of streams (argument checks per call; measured under load).
        keys, ids = [reader.wake_key, *asked], [reader.wake_pos, *asked.values()]
        command = ("XREAD", "COUNT", READ_COUNT, "BLOCK", BLOCK_MS, "STREAMS", *keys, *ids)
        if reader.slot is None:
            return await self._reader.execute_command(*command)  # type: ignore[no-untyped-call] # redis-py leaves it untyped
        # Cluster: name the node, or redis-py asks the server for XREAD's keys on every call
        cluster = cast(Any, self._reader)
        await cluster.initialize()  # a no-op once the slot map is known
        node = cluster.get_node_from_key(reader.wake_key)
        return await cluster.execute_command(*command, target_nodes=node)

    def _fan_out(self, reader: _Reader, reply: Any, asked: dict[str, str]) -> None:
        # RESP3 answers a map of stream → entries, RESP2 a list of [stream, entries]
        for raw_key, entries in reply.items() if isinstance(reply, dict) else reply:
            key = _s(raw_key)
            if key == reader.wake_key:
                reader.wake_pos = _s(entries[-1][0])
                continue
            followed = self._streams.get(key)
            if followed is None or followed.pos != asked.get(key):
                continue  # no longer followed, or re-followed since: the next read covers it
            rows = [entry(i.decode(), f[1].decode()) for i, f in entries]
            followed.pos = rows[-1].id
            size = sum(len(item.raw) for item in rows)
            for sub in followed.subs:
                sub.push(rows, size)

    async def _wake(self, reader: _Reader) -> None:
        """Make the blocked read return until every followed stream is covered by one."""
        while reader.uncovered and reader.reading is not None:
            issued = reader.issued
            try:
                pipe = self._writer.pipeline(transaction=False)
                pipe.xadd(reader.wake_key, {"w": "1"}, maxlen=16, approximate=True)
                pipe.pexpire(reader.wake_key, WAKE_TTL_MS)
                await pipe.execute()
            except (RedisError, RedisClusterException) as exc:
                log.warning("tail_hub.wake_failed", error=str(exc))
                await asyncio.sleep(RETRY_S)
                continue
            raise_if_cancelled()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(BLOCK_MS / 1000 + 1):
                    await issued.wait()
