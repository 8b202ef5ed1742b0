"""One snapshot of the six queues, shared by every app process: behind the per-queue gauges
(``tierq_queue_*``) and the admin API's queue lists (what the dashboard and ``tierq queues
list`` poll).

A snapshot costs QStash two calls or more (the queue list, then the DLQ a page of 100 at a
time) and Redis a few round trips. Each process ticks every ``queue_metrics_s``; the one that
wins a Redis lock (``SET NX``, expiring after ``queue_metrics_s``) takes the snapshot and
stores it in Redis, the others read it there, so QStash is asked once per interval however
many processes run. Every process sets its gauges from the snapshot it has: N replicas export N
copies of one number (aggregate with ``max by (queue)``). A Prometheus scrape or a dashboard
viewer never causes a QStash call; a change through the admin API takes a fresh snapshot at
once, so the next view shows it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

import orjson
import structlog
from redis.exceptions import RedisError

from tierq.aio import raise_if_cancelled
from tierq.errors import UpstreamError
from tierq.keys import AppKeys
from tierq.ops.qstash_admin import dlq_entry
from tierq.ops.queue_state import QueueConf, applied, configured, records
from tierq.queues import QueueId
from tierq.runtime import Runtime

log = structlog.get_logger("tierq.ops.queue_metrics")

KEEP_INTERVALS = 12
"""A stored snapshot expires after this many intervals (at least a minute) without a new one."""


def snapshot_key(keys: AppKeys) -> str:
    """Where the shared snapshot lives (belongs in ``AppKeys``; kept here until then)."""
    return f"{keys.prefix}:queuesnap"


def poll_lock_key(keys: AppKeys) -> str:
    return f"{keys.prefix}:queuesnap:lock"


@dataclass(frozen=True)
class QueueFacts:
    """One queue in a snapshot. QStash's side: ``exists`` (else ``parallelism``/``paused`` are
    ``None`` and ``lag`` 0), ``lag``, ``dlq``; tierq's: ``in_flight``, ``admitted``,
    ``parked``, and what the dispatcher applies (``dispatch_*``)."""

    exists: bool
    parallelism: int | None
    paused: bool | None
    lag: int
    dlq: int
    in_flight: int
    admitted: int
    parked: int
    dispatch_parallelism: int
    dispatch_paused: bool

    @property
    def mismatch(self) -> bool:
        """QStash lacks the queue or applies something else than tierq's dispatcher."""
        return (self.parallelism, self.paused) != (
            self.dispatch_parallelism,
            self.dispatch_paused,
        )


@dataclass(frozen=True)
class Snapshot:
    at_ms: int
    queues: dict[str, QueueFacts]
    dlq_size: int

    def dumps(self) -> bytes:
        return orjson.dumps(dataclasses.asdict(self))

    @classmethod
    def loads(cls, raw: bytes | str) -> Snapshot | None:
        """``None`` for a snapshot this version cannot read (one stored by another version
        during a rolling deploy: the next snapshot replaces it)."""
        try:
            data = orjson.loads(raw)
            queues = {q: QueueFacts(**facts) for q, facts in data["queues"].items()}
            return cls(int(data["at_ms"]), queues, int(data["dlq_size"]))
        except (orjson.JSONDecodeError, TypeError, KeyError, ValueError, AttributeError):
            return None


def dlq_counts(messages: list[dict[str, Any]]) -> collections.Counter[str]:
    return collections.Counter(str(dlq_entry(m)["queueId"]) for m in messages)


def gauge_values(facts: QueueFacts, admission_depth: int | None) -> dict[str, float | None]:
    """The ``tierq_queue_*`` gauges of one queue (``None``: unknown, no sample)."""
    known = facts.exists
    return {
        "lag": facts.lag if known else None,
        "paused": float(bool(facts.paused)) if known else None,
        "parallelism": facts.parallelism if known else None,
        "in_flight": facts.in_flight,
        "admitted": facts.admitted,
        "admission_depth": admission_depth,
        "parked": facts.parked,
        "dlq": facts.dlq,
        "mismatch": float(facts.mismatch),
    }


async def _tierq_side(rt: Runtime, queue: QueueId, dispatch: QueueConf) -> dict[str, Any]:
    in_flight, admitted, stats = await asyncio.gather(
        rt.leases.count(rt.keys.queue_slots(queue.value)),
        rt.leases.count(rt.keys.admission(queue.value)),
        rt.dispatcher.queue_stats(queue.value, top=1),
    )
    return {
        "in_flight": in_flight,
        "admitted": admitted,
        "parked": int(stats["parked"]),
        "dispatch_parallelism": dispatch.parallelism,
        "dispatch_paused": dispatch.paused,
    }


async def take_snapshot(rt: Runtime) -> Snapshot:
    """Ask QStash (queue list, DLQ) and Redis now; ``at_ms`` is when the asking began."""
    at_ms = int(time.time() * 1000)
    listed, messages, held = await asyncio.gather(
        rt.gateway.list_queues(), rt.gateway.dlq_all(), records(rt)
    )
    counts = dlq_counts(messages)
    queues = list(rt.settings.queues)
    ours = await asyncio.gather(
        *(_tierq_side(rt, q, applied(configured(rt, q), held[q])) for q in queues)
    )
    facts = {}
    for queue, mine in zip(queues, ours, strict=True):
        q = listed.get(queue.value)
        facts[queue.value] = QueueFacts(
            exists=q is not None,
            parallelism=q.parallelism if q else None,
            paused=q.paused if q else None,
            lag=q.lag if q else 0,
            dlq=counts[queue.value],
            **mine,
        )
    return Snapshot(at_ms, facts, len(messages))


class QueueCollector:
    """The shared snapshot for one app process: :meth:`start` its tick task, :meth:`snapshot`
    for views, :meth:`refresh` after a change."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.every_s = rt.settings.queue_metrics_s
        self._task: asyncio.Task[None] | None = None
        self._inline = asyncio.Lock()  # at most one poll for views at a time per process
        lua = resources.files("tierq.ops") / "lua" / "store_snapshot.lua"
        self._store = rt.redis.register_script(lua.read_text())

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="tierq-queue-metrics")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except UpstreamError as exc:
                log.warning("queue_metrics.tick_failed", error=str(exc))
            except Exception:  # a bug must not stop the gauges for good: say it, go on
                log.exception("queue_metrics.tick_crashed")
            raise_if_cancelled()
            await asyncio.sleep(self.every_s)

    async def tick(self) -> Snapshot | None:
        """Take the snapshot if this process wins this interval's lock, else read the stored
        one; set the gauges from it. ``None``: there is none yet (the winner is still at it)."""
        try:
            won = await self.rt.redis.set(
                poll_lock_key(self.rt.keys), "1", nx=True, px=max(1, round(self.every_s * 1000))
            )
        except RedisError as exc:
            raise UpstreamError(f"redis: {exc}") from exc
        if won:
            return await self.refresh()
        snap = await self.stored()
        if snap is not None:
            self._apply(snap)
        return snap

    async def refresh(self) -> Snapshot:
        """Take a snapshot now, store it for every process (unless one taken later is there
        already: then that one is the answer), set the gauges."""
        metrics = self.rt.metrics
        try:
            snap = await take_snapshot(self.rt)
            keep_ms = round(max(60.0, KEEP_INTERVALS * self.every_s) * 1000)
            key = snapshot_key(self.rt.keys)
            stored = await self._store(keys=[key], args=[snap.at_ms, snap.dumps(), keep_ms])
            snap = snap if stored else (await self.stored() or snap)
        except RedisError as exc:
            metrics.queue_polls.labels("error").inc()
            raise UpstreamError(f"redis: {exc}") from exc
        except UpstreamError:
            metrics.queue_polls.labels("error").inc()
            raise
        metrics.queue_polls.labels("ok").inc()
        self._apply(snap)
        return snap

    async def stored(self) -> Snapshot | None:
        try:
            raw = await self.rt.redis.get(snapshot_key(self.rt.keys))
        except RedisError as exc:
            raise UpstreamError(f"redis: {exc}") from exc
        return Snapshot.loads(raw) if raw else None

    async def snapshot(self) -> Snapshot:
        """The stored snapshot; taken now when there is none (at start, or after QStash or
        Redis failed for longer than the snapshot is kept)."""
        snap = await self.stored()
        if snap is not None:
            return snap
        async with self._inline:
            return await self.stored() or await self.refresh()

    def _apply(self, snap: Snapshot) -> None:
        metrics = self.rt.metrics
        for queue, facts in snap.queues.items():
            conf = self.rt.settings.queues.get(QueueId(queue))
            depth = conf.admission_depth if conf else None
            metrics.set_queue(queue, gauge_values(facts, depth))
        metrics.queue_snapshot_at.set(snap.at_ms / 1000)
