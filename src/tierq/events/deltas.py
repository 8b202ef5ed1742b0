"""Coalesced ``delta`` events: the worker never waits on Redis between upstream chunks.

A running job writes its chunks into its :class:`DeltaBuffer` (a plain list append). One
:class:`DeltaWriter` per process flushes every buffer that has text, every ``flush_ms``: each
job's pending chunks become one ``delta`` event carrying their joined text, and all jobs' events
go to Redis in one round trip (one script call). A job's first chunk, and a buffer grown
past ``max_chars``, are flushed at once, so time to first token does not grow.

Guarantees: a job's text is written in order and exactly as the model produced it (the deltas
joined equal the model's output); ``seq`` stays dense (the script numbers each event); at most
one flush is in flight, so a job's deltas never overtake each other; :meth:`DeltaBuffer.close`
returns only once everything added has been written, so the terminal event the caller logs next
always follows the last delta. A flush that Redis refuses marks the buffers it carried
(``error``); a job Redis reports gone or terminal marks its buffer ``rejected``: the worker
stops that run.

On Redis Cluster (``cluster``) one script call cannot touch keys of several hash slots: a
tick's jobs are grouped by slot and the script is called once per slot, all calls pipelined
(one round trip per node, in parallel). With job keys sharing a bounded set of tags
(``AppKeys.job_tags``) that is a few calls per tick however many jobs run. A slot whose call
fails fails only its own jobs' buffers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from importlib import resources
from typing import TYPE_CHECKING, Any

import structlog
from redis.crc import key_slot
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from tierq.aio import Alarm, raise_if_cancelled
from tierq.errors import UpstreamError
from tierq.events.codec import delta_data, delta_entry, prefix_of
from tierq.events.log import JobStore, Written, written

if TYPE_CHECKING:
    from tierq.events.hub import TailHub

log = structlog.get_logger("tierq.events")


def _now_ms() -> int:
    return int(time.time() * 1000)


class DeltaBuffer:
    """One job's text not yet written. Only the job's own worker adds to it."""

    __slots__ = ("_changed", "_local", "_writer", "chars", "error", "first_ts", "flushed",
                 "inflight", "job_id", "parts", "rejected")  # fmt: skip

    def __init__(self, writer: DeltaWriter, job_id: str) -> None:
        self._writer = writer
        self.job_id = job_id
        self.parts: list[str] = []
        self.chars = 0
        self.first_ts = 0  # when the oldest pending chunk arrived (the event's ts)
        self.flushed = 0  # delta events written so far
        self.inflight = False
        self.rejected = False  # the job is gone or ended: stop the run
        self.error: UpstreamError | None = None
        self._changed: asyncio.Future[None] | None = None
        self._local: str | None = None  # the log the hub takes from us while we run

    def add(self, text: str) -> None:
        """Queue ``text`` for the next flush (at once when it is the job's first)."""
        if not text:
            return
        if self.parts:  # marked already (by the add that began them): only size may matter
            self.parts.append(text)
            self.chars += len(text)
            if self.chars >= self._writer.max_chars:
                self._writer.mark(self, urgent=True)
            return
        self.first_ts = _now_ms()
        self.parts.append(text)
        self.chars += len(text)
        first = self.flushed == 0 and not self.inflight
        self._writer.mark(self, urgent=first or self.chars >= self._writer.max_chars)

    async def close(self) -> None:
        """Write what is pending and wait until it is written; raise the flush's error if one
        failed (the caller's next write would fail the same way)."""
        try:
            while self.parts or self.inflight:
                if self.parts:
                    self._writer.mark(self, urgent=True)
                self._changed = asyncio.get_running_loop().create_future()
                await self._changed
        finally:
            if self._local is not None and self._writer.hub is not None:
                self._writer.hub.end_local(self._local)  # what follows comes by XREAD again
                self._local = None
        if self.error is not None:
            raise self.error

    def take(self) -> tuple[int, str]:
        """The pending text, joined, and when its oldest chunk arrived; the buffer is empty
        and in flight after this."""
        text = "".join(self.parts)
        self.parts.clear()
        self.chars = 0
        self.inflight = True
        return self.first_ts, text

    def settle(self, result: Written | UpstreamError) -> None:
        self.inflight = False
        if isinstance(result, UpstreamError):
            self.error = result
        elif result is None:
            self.rejected = True
        else:
            self.flushed += 1
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)


class DeltaWriter:
    """The process's flusher (see module doc). Starts its task on first use."""

    def __init__(
        self,
        store: JobStore,
        flush_ms: float,
        max_chars: int,
        *,
        cluster: bool = False,
        hub: TailHub | None = None,
    ) -> None:
        self.store = store
        self.hub = hub  # this process's tail hub: it takes our deltas from us, not by XREAD
        self.flush_s = flush_ms / 1000
        self.max_chars = max_chars
        self.cluster = cluster
        if cluster:  # the same script JobStore.append_deltas runs, called by sha per slot
            text = (resources.files("tierq.events") / "lua" / "append_deltas.lua").read_text()
            self._script = store.r.register_script(text)
        self._pending: dict[str, DeltaBuffer] = {}
        self._urgent_ids: set[str] = set()
        self._has_pending = asyncio.Event()
        self._since = 0.0  # when the oldest pending text arrived (loop time)
        self._alarm = Alarm()  # the tick's wait: ends at the tick, or early for urgent text
        self._task: asyncio.Task[None] | None = None
        self.flushes = 0  # ticks written: one round trip each (for tests and metrics)
        self.calls = 0  # script calls made: one a tick, or one per slot on Cluster

    def buffer(self, job_id: str) -> DeltaBuffer:
        """A running job's buffer; until it is closed, this process's tail hub takes the
        job's deltas straight from this writer (see :meth:`TailHub.begin_local`)."""
        buffer = DeltaBuffer(self, job_id)
        if self.hub is not None:
            buffer._local = self.store.keys.job_events(job_id)
            self.hub.begin_local(buffer._local)
        return buffer

    def mark(self, buffer: DeltaBuffer, *, urgent: bool) -> None:
        if not self._pending:  # the first pending text since the last flush: the tick's start
            self._since = asyncio.get_running_loop().time()
        self._pending[buffer.job_id] = buffer
        self._has_pending.set()
        if urgent:
            self._urgent_ids.add(buffer.job_id)
            self._alarm.wake()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="tierq-delta-writer")

    async def stop(self) -> None:
        """Write what is pending, then stop the task."""
        if self._pending:
            await self._flush(None)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        """One tick: ``flush_s`` after the oldest pending text arrived, write every buffer.
        The oldest text waits ``flush_s`` (or for the write in flight, if that is longer), not
        ``flush_s`` counted from the end of the previous write: at 500 streams, where a tick's
        round trip and fan-out take ~8 ms, that cut the token delay p50 / p99 by ~16 % / ~12 %
        for ~20 % more delta events and ~10 % more app CPU per token (bench/streaming.py,
        four alternating runs). With no text pending the writer sleeps; there is no grid. Urgent
        buffers (a job's first text, an oversized one, one being closed) are written at once,
        alone: they do not cut the others' tick short (that would defeat coalescing whenever
        many jobs start)."""
        loop = asyncio.get_running_loop()
        while True:
            await self._has_pending.wait()
            tick_at = self._since + self.flush_s
            while True:
                whole = loop.time() >= tick_at
                if not whole and not self._urgent_ids:
                    whole = await self._alarm.until(tick_at)
                try:
                    await self._flush(None if whole else set(self._urgent_ids))
                except Exception:  # a bug here must not stop every job's text (buffers settled)
                    log.exception("deltas.flush_crashed")
                raise_if_cancelled()  # stop() must end this loop, even through redis-py
                if whole or not self._pending:
                    break

    async def _flush(self, only: set[str] | None) -> None:
        """Write the pending text of every buffer (``only``: of those jobs)."""
        ids = list(self._pending) if only is None else [i for i in only if i in self._pending]
        self._urgent_ids.difference_update(ids)
        batch = []
        for job_id in ids:
            buffer = self._pending[job_id]
            if buffer.inflight:  # written after the round trip it is in (only under stop())
                continue
            del self._pending[job_id]
            if buffer.parts:
                batch.append(buffer)
        if not self._pending:
            self._has_pending.clear()
        if not batch:
            return
        items = []
        events = []
        for buffer in batch:
            ts, text = buffer.take()
            data = delta_data(buffer.job_id, ts, text)
            events.append(data)
            items.append((buffer.job_id, prefix_of(data)))
        results: list[Written | UpstreamError]
        self.flushes += 1
        try:
            results = await self._append(items)
        except UpstreamError as exc:
            log.warning("deltas.flush_failed", jobs=len(batch), error=str(exc))
            results = [exc] * len(batch)
        except BaseException as exc:  # cancelled or broken mid-flush: nobody waits for ever
            for buffer in batch:
                buffer.settle(UpstreamError(f"flush interrupted: {type(exc).__name__}"))
            raise
        hub = self.hub
        for buffer, (_, prefix), data, result in zip(batch, items, events, results, strict=True):
            if hub is not None and buffer._local is not None and isinstance(result, tuple):
                seq, entry_id = result
                hub.local_entry(buffer._local, delta_entry(entry_id, prefix, seq, data))
            buffer.settle(result)

    async def _append(self, items: list[tuple[str, bytes]]) -> list[Written | UpstreamError]:
        """One delta per job: one script call (a single node, or one slot), else one per
        slot, pipelined; each result as :meth:`JobStore.append_deltas` gives it, or the error
        of its slot's call."""
        if not self.cluster:
            self.calls += 1
            return list(await self.store.append_deltas(items))
        slots: dict[int, list[int]] = {}
        for index, (job_id, _) in enumerate(items):
            slots.setdefault(key_slot(self.store.keys.job(job_id).encode()), []).append(index)
        self.calls += len(slots)
        if len(slots) == 1:
            return list(await self.store.append_deltas(items))
        groups = list(slots.values())
        replies = await self._pipelined([[items[i] for i in group] for group in groups])
        results: list[Written | UpstreamError] = [None] * len(items)
        for group, reply in zip(groups, replies, strict=True):
            for position, index in enumerate(group):
                if isinstance(reply, BaseException):
                    results[index] = UpstreamError(f"redis: {reply}")
                else:
                    results[index] = written(reply[position])
        return results

    async def _pipelined(self, groups: Sequence[Sequence[tuple[str, bytes]]]) -> list[Any]:
        """The script once per group (each group's keys in one slot), in one pipeline: each
        group's reply, or its error. Groups a node answered ``NOSCRIPT`` (it restarted or failed
        over: nothing ran) are sent again, once, after loading the script on every primary; the
        others are never sent twice (a call appends)."""
        replies: list[Any] = [None] * len(groups)
        todo = list(range(len(groups)))
        for attempt in (0, 1):
            pipe = self.store.r.pipeline(transaction=False)
            for index in todo:
                self._queue(pipe, groups[index])
            try:
                answers: list[Any] = await pipe.execute(raise_on_error=False)
            except (RedisError, RedisClusterException) as exc:
                raise UpstreamError(f"redis: {exc}") from exc
            for index, answer in zip(todo, answers, strict=True):
                replies[index] = answer
            todo = [i for i in todo if isinstance(replies[i], NoScriptError)]
            if not todo or attempt:
                break
            try:
                await self.store.r.script_load(self._script.script)  # every primary
            except (RedisError, RedisClusterException) as exc:
                raise UpstreamError(f"redis: {exc}") from exc
        return replies

    def _queue(self, pipe: Any, group: Sequence[tuple[str, bytes]]) -> None:
        keys = self.store.keys
        names = [k for job_id, _ in group for k in (keys.job(job_id), keys.job_events(job_id))]
        # not pipe.evalsha(): redis-py refuses it in a cluster pipeline
        pipe.execute_command(
            "EVALSHA", self._script.sha, len(names), *names, *(p for _, p in group)
        )
