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
from tierq.events.hub import BLOCK_MS, TailHub
from tierq.events.log import JobStore
from tierq.guards.leases import Leases
from tierq.keys import AppKeys
from tierq.observability.metrics import Metrics
from tierq.providers.registry import ProviderRegistry


@dataclass
class RedisClients:
    """Three pools, because blocking reads must not starve commands (nor time out):
    ``commands`` (bounded; callers wait for a free connection), ``tails`` (the tail hub's one
    blocking ``XREAD`` for every SSE stream), ``pubsub`` (the cancel subscription, no read
    timeout)."""

    commands: aioredis.Redis
    tails: aioredis.Redis
    pubsub: aioredis.Redis

    async def aclose(self) -> None:
        for client in (self.commands, self.tails, self.pubsub):
            await client.aclose()


REDIS_CLIENT_NAME = "tierq-app"


def redis_clients(settings: Settings) -> RedisClients:
    url = settings.redis_url or "redis://127.0.0.1:6379/0"
    name = REDIS_CLIENT_NAME  # every connection says who it is (CLIENT LIST)
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=settings.redis_max_connections,
        timeout=settings.redis_pool_timeout_s,
        socket_timeout=settings.redis_socket_timeout_s,
        client_name=name,
    )
    return RedisClients(
        commands=aioredis.Redis.from_pool(pool),  # the client owns (and closes) the pool
        tails=aioredis.Redis.from_url(
            url,
            max_connections=2,
            socket_timeout=BLOCK_MS / 1000 + settings.redis_socket_timeout_s,
            client_name=name,
        ),
        pubsub=aioredis.Redis.from_url(
            url, socket_timeout=None, health_check_interval=30, client_name=name
        ),
    )


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
