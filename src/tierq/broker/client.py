"""tierq's side of QStash: publish jobs to the named queues, keep the queues configured.

Goes through the official ``qstash`` async SDK, so the same code drives Upstash and the embedded
broker.
"""

from __future__ import annotations

from dataclasses import dataclass

from qstash import AsyncQStash
from qstash.errors import QStashError

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


class QStashGateway:
    def __init__(self, qstash: AsyncQStash, settings: Settings) -> None:
        self.qstash = qstash
        self.settings = settings

    async def publish(self, body: WorkerBody, url: str) -> str:
        """Enqueue one job into its named queue; returns the QStash message id."""
        try:
            res = await self.qstash.message.enqueue(
                queue=body.queue_id.value,
                url=url,
                body=body.model_dump_json(by_alias=True),
                content_type="application/json",
                retries=body.max_retries,
                retry_delay=self.settings.qstash_retry_delay,
            )
        except QStashError as exc:
            raise UpstreamError(f"qstash publish failed: {exc}") from exc
        return str(res.message_id)  # type: ignore[union-attr]

    async def cancel(self, message_id: str) -> None:
        try:
            await self.qstash.message.cancel(message_id)
        except QStashError as exc:
            raise UpstreamError(f"qstash cancel failed: {exc}") from exc

    async def sync_queue(self, queue: QueueId, conf: QueueSettings) -> None:
        try:
            await self.qstash.queue.upsert(
                queue.value, parallelism=conf.parallelism, paused=conf.paused
            )
        except QStashError as exc:
            raise UpstreamError(f"qstash queue upsert failed for {queue}: {exc}") from exc

    async def sync_queues(self) -> None:
        """Create/update the six queues (parallelism, paused) from configuration."""
        for queue, conf in self.settings.queues.items():
            await self.sync_queue(queue, conf)

    async def queue_status(self, queue: str) -> QueueStatus:
        try:
            q = await self.qstash.queue.get(queue)
        except QStashError as exc:
            raise UpstreamError(f"qstash queue get failed for {queue}: {exc}") from exc
        return QueueStatus(q.name, q.parallelism, q.paused, q.lag)
