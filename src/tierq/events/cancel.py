"""Cancel signals for running jobs: one pub/sub subscription per process, fanned out locally."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisClusterException, RedisError

from tierq.aio import raise_if_cancelled, ticks
from tierq.events.log import JobStore

log = structlog.get_logger("tierq.worker")
_RECONNECT_S = 1.0


async def poll_cancel_flag(
    jobs: JobStore, job_id: str, cancel: asyncio.Event, every_s: float, first_s: float | None = None
) -> None:
    """A safety net beside the pub/sub signal (which a reconnect can miss): look at the job's
    ``cancelRequested`` flag every ``every_s`` (the first time after ``first_s``, by default
    ``every_s``) and set ``cancel`` when it is there."""
    if cancel.is_set():
        return
    async for _ in ticks(every_s, first_s):
        try:
            state = await jobs.state(job_id)
        except RedisError as exc:
            log.warning("cancel_poll.failed", error=str(exc))
        else:
            raise_if_cancelled()  # stopped at cleanup even if redis-py swallowed the cancel
            if state is not None and state.cancel_requested:
                cancel.set()
        if cancel.is_set():
            return


class CancelHub:
    def __init__(self, client: aioredis.Redis, channel: str) -> None:
        self._client = client
        self._channel = channel
        self._watchers: dict[str, list[asyncio.Event]] = {}
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    @contextlib.contextmanager
    def watch(self, job_id: str) -> Iterator[asyncio.Event]:
        """An event set when ``job_id`` is cancelled, for the duration of the block."""
        event = asyncio.Event()
        self._watchers.setdefault(job_id, []).append(event)
        try:
            yield event
        finally:
            events = self._watchers.get(job_id, [])
            events.remove(event)
            if not events:
                self._watchers.pop(job_id, None)

    def _signal(self, job_id: str) -> None:
        for event in self._watchers.get(job_id, []):
            event.set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="tierq-cancel-hub")
        await asyncio.wait_for(self._ready.wait(), timeout=10)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _listen(self) -> None:
        while True:
            try:
                await self._client.initialize()  # Redis Cluster: learn the slot map first
                async with self._client.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(self._channel)
                    self._ready.set()
                    async for message in pubsub.listen():
                        data = message.get("data")
                        job_id = data.decode() if isinstance(data, bytes) else str(data)
                        self._signal(job_id)
            except (RedisError, RedisClusterException) as exc:  # the latter: Cluster topology
                log.warning("cancel_hub.reconnect", error=str(exc))
                await asyncio.sleep(_RECONNECT_S)
