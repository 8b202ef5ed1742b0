"""tierq's side of QStash: publish jobs to the named queues, read and set the queues.

Goes through the official ``qstash`` async SDK, so the same code drives Upstash and the embedded
broker. Which queue state wins (configuration, QStash, an operator's change) is decided above,
in :mod:`tierq.ops.queue_state`; here are only the calls.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

import httpx
import orjson
from qstash import AsyncQStash
from qstash.errors import QStashError
from qstash.message import BatchRequest

from tierq.config import QueueSettings, Settings
from tierq.contracts import WorkerBody
from tierq.errors import UpstreamError
from tierq.queues import QueueId


@dataclass(frozen=True)
class QueueStatus:
    name: str
    parallelism: int
    paused: bool
    lag: int


MAX_BATCH = 100
"""Messages per QStash batch request at most."""
MAX_SENDERS = 4
"""Batch requests in flight at once; publishes beyond them wait and go out together."""
_FAILURES = (QStashError, httpx.HTTPError)
_STATUS = re.compile(r"status: (\d{3})")


def _not_found(exc: QStashError) -> bool:
    """Whether QStash answered 404 (the SDK keeps the status only in its message)."""
    found = _STATUS.search(str(exc))
    return found is not None and found.group(1) == "404"


def qstash_client(settings: Settings) -> AsyncQStash:
    """The SDK client tierq uses: no SDK-side retries (a failed publish goes back to its line
    and dispatch tries again; an API call fails fast instead of backing off for half a minute)
    and a ``qstash_timeout_s`` timeout on every request."""
    client = AsyncQStash(settings.qstash_token or "", base_url=settings.qstash_url, retry=False)
    client.http._client.timeout = httpx.Timeout(settings.qstash_timeout_s)
    return client


class QStashGateway:
    """Publishing is a group commit through QStash's ``/v2/batch``: a publish goes out at once
    (no added latency) while fewer than :data:`MAX_SENDERS` requests are in flight; publishes
    that arrive while all are busy wait for one and then go out together in one request, each
    to its own queue. Under load that is one HTTP request (and one signed round trip in the
    broker) for many jobs instead of one each."""

    def __init__(self, qstash: AsyncQStash, settings: Settings) -> None:
        self.qstash = qstash
        self.settings = settings
        self._waiting: list[tuple[BatchRequest, asyncio.Future[str]]] = []
        self._senders: set[asyncio.Task[None]] = set()
        self.requests = 0  # publish HTTP requests made (for tests and metrics)

    async def publish(self, body: WorkerBody, url: str) -> str:
        """Enqueue one job into its named queue; returns the QStash message id."""
        return await self.publish_raw(
            body.queue_id.value, url, body.model_dump_json(by_alias=True), body.max_retries
        )

    async def publish_raw(
        self,
        queue: str,
        url: str,
        body: str,
        retries: int,
        dedup_id: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> str:
        """Enqueue a worker body (JSON) into ``queue``; returns the QStash message id. With
        ``dedup_id``, QStash accepts one message per id within its deduplication window (a
        second publish gets the first one's id back)."""
        request: BatchRequest = {
            "queue": queue,
            "url": url,
            "body": body,
            "content_type": "application/json",
            "retries": retries,
        }
        if dedup_id:
            request["deduplication_id"] = dedup_id
        if headers:  # forwarded with the message (the SDK adds Upstash-Forward-)
            request["headers"] = headers
        if self.settings.qstash_retry_delay is not None:
            request["retry_delay"] = self.settings.qstash_retry_delay
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiting.append((request, future))
        if len(self._senders) < MAX_SENDERS:
            sender = asyncio.create_task(self._send_waiting(), name="tierq-publish")
            self._senders.add(sender)
            sender.add_done_callback(self._senders.discard)
        return await future

    async def _send_waiting(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting[:MAX_BATCH], self._waiting[MAX_BATCH:]
            try:
                ids = await self._send([request for request, _ in batch])
            except Exception as exc:  # every waiting submit gets an answer, whatever failed
                failure = (
                    UpstreamError(f"qstash publish failed: {exc}")
                    if isinstance(exc, _FAILURES)
                    else exc
                )
                for _, future in batch:
                    if not future.done():
                        future.set_exception(failure)
                continue
            for (_, future), message_id in zip(batch, ids, strict=True):
                if not future.done():
                    future.set_result(message_id)

    async def _send(self, requests: list[BatchRequest]) -> list[str]:
        self.requests += 1
        replies = await self.qstash.message.batch(requests)
        return [str(reply.message_id) for reply in replies]  # type: ignore[union-attr]

    async def cancel(self, message_id: str) -> None:
        try:
            await self.qstash.message.cancel(message_id)
        except _FAILURES as exc:
            raise UpstreamError(f"qstash cancel failed: {exc}") from exc

    async def carries_job(self, message_id: str, job_id: str) -> bool:
        """Whether QStash holds message ``message_id`` and it carries job ``job_id`` (for the
        rare decisions that must not rest on an unsigned message id). ``False`` when QStash
        does not know the message; :class:`UpstreamError` when it cannot be asked."""
        try:
            message = await self.qstash.message.get(message_id)
        except QStashError as exc:
            if "status: 404" in str(exc):  # the SDK keeps the status only in its message
                return False
            raise UpstreamError(f"qstash message get failed: {exc}") from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(f"qstash message get failed: {exc}") from exc
        try:
            return bool(orjson.loads(message.body or "{}").get("jobId") == job_id)
        except (orjson.JSONDecodeError, AttributeError):
            return False

    async def upsert_queue(self, queue: str, *, parallelism: int, paused: bool) -> None:
        """Create ``queue`` or set both its fields (QStash's upsert always sets both)."""
        try:
            await self.qstash.queue.upsert(queue, parallelism=parallelism, paused=paused)
        except _FAILURES as exc:
            raise UpstreamError(f"qstash queue upsert failed for {queue}: {exc}") from exc

    async def sync_queue(self, queue: QueueId, conf: QueueSettings) -> None:
        await self.upsert_queue(queue.value, parallelism=conf.parallelism, paused=conf.paused)

    async def sync_queues(self) -> None:
        """Create/update the six queues (parallelism, paused) from configuration, whatever
        they hold now (``tierq queues sync``)."""
        for queue, conf in self.settings.queues.items():
            await self.sync_queue(queue, conf)

    async def queue_status(self, queue: str) -> QueueStatus:
        try:
            q = await self.qstash.queue.get(queue)
        except _FAILURES as exc:
            raise UpstreamError(f"qstash queue get failed for {queue}: {exc}") from exc
        return QueueStatus(q.name, q.parallelism, q.paused, q.lag)

    async def find_queue(self, queue: str) -> QueueStatus | None:
        """QStash's record of ``queue``; ``None`` when QStash does not have it."""
        try:
            return await self.queue_status(queue)
        except UpstreamError as exc:
            cause = exc.__cause__
            if isinstance(cause, QStashError) and _not_found(cause):
                return None
            raise

    async def list_queues(self) -> dict[str, QueueStatus]:
        """Every queue of the account, by name, in one call."""
        try:
            found = await self.qstash.queue.list()
        except _FAILURES as exc:
            raise UpstreamError(f"qstash queue list failed: {exc}") from exc
        return {q.name: QueueStatus(q.name, q.parallelism, q.paused, q.lag) for q in found}
