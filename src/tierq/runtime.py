"""The long-lived parts one app process shares, built once at start-up (no import-time state)."""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis
from qstash import Receiver

from tierq.broker.client import QStashGateway, qstash_client
from tierq.config import Settings
from tierq.dispatch.dispatcher import Dispatcher
from tierq.events.cancel import CancelHub
from tierq.events.caps import StreamCaps
from tierq.events.deltas import DeltaWriter
from tierq.events.hub import TailHub
from tierq.events.log import JobStore
from tierq.guards.leases import Leases
from tierq.keys import AppKeys
from tierq.observability.metrics import Metrics
from tierq.providers.registry import ProviderRegistry


@dataclass
class Runtime:
    settings: Settings
    redis: aioredis.Redis
    keys: AppKeys
    jobs: JobStore
    leases: Leases
    gateway: QStashGateway
    receiver: Receiver
    providers: ProviderRegistry
    cancels: CancelHub
    metrics: Metrics
    deltas: DeltaWriter
    hub: TailHub
    dispatcher: Dispatcher
    streams: StreamCaps

    async def aclose_streams(self) -> None:
        """Stop dispatching, write pending deltas and stop following logs (at shutdown)."""
        await self.dispatcher.stop()
        await self.deltas.stop()
        await self.hub.stop()


def build_runtime(
    settings: Settings,
    client: aioredis.Redis,
    metrics: Metrics | None = None,
    tail_client: aioredis.Redis | None = None,
    pubsub_client: aioredis.Redis | None = None,
    gateway: QStashGateway | None = None,
) -> Runtime:
    """The runtime of one process; ``gateway`` replaces the QStash gateway (the publisher and
    the dispatcher share it), e.g. ``tierq sim``'s in-process queues."""
    keys = AppKeys(settings.key_prefix)
    jobs = JobStore(client, keys, settings.event_retention_s)
    if gateway is None:
        gateway = QStashGateway(qstash_client(settings), settings)
    receiver = Receiver(
        current_signing_key=settings.qstash_current_signing_key or "",
        next_signing_key=settings.qstash_next_signing_key or "",
    )
    metrics = metrics or Metrics()
    return Runtime(
        settings=settings,
        redis=client,
        keys=keys,
        jobs=jobs,
        leases=Leases(client),
        gateway=gateway,
        receiver=receiver,
        providers=ProviderRegistry(settings.models),
        cancels=CancelHub(pubsub_client or client, keys.cancel_channel),
        metrics=metrics,
        deltas=DeltaWriter(jobs, settings.delta_flush_ms, settings.delta_flush_max_chars),
        hub=TailHub(
            tail_client or client, client, keys.tail_wake, settings.sse_client_buffer_bytes
        ),
        dispatcher=Dispatcher(client, keys, settings, gateway, metrics, jobs),
        streams=StreamCaps(settings.sse_max_per_job, settings.sse_max_per_user),
    )
