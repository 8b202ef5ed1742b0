"""The long-lived parts one app process shares, built once at start-up (no import-time state)."""

from __future__ import annotations

from dataclasses import dataclass, field

import redis.asyncio as aioredis
from qstash import Receiver

from tierq.aio import FairGate
from tierq.broker.client import QStashGateway, qstash_client
from tierq.config import Settings
from tierq.dispatch.dispatcher import Dispatcher
from tierq.dispatch.local import LocalRuns
from tierq.events.cancel import CancelHub
from tierq.events.caps import StreamCaps
from tierq.events.deltas import DeltaWriter
from tierq.events.hub import BLOCK_MS, TailHub
from tierq.events.log import JobStore
from tierq.guards.leases import Leases
from tierq.keys import AppKeys
from tierq.observability.metrics import Metrics
from tierq.providers.registry import ProviderRegistry
from tierq.redis_cluster import cluster_client
from tierq.redis_pool import LeanConnection, LeanPool, LeanRedis
from tierq.usage.ledger import Ledger


@dataclass
class RedisClients:
    """Three pools, because blocking reads must not starve commands (nor time out):
    ``commands`` (bounded; callers wait for a free connection), ``tails`` (the tail hub's one
    blocking ``XREAD`` for every SSE stream), ``pubsub`` (the cancel subscription, no read
    timeout).

    With ``redis_cluster`` each is a Redis Cluster client (:mod:`tierq.redis_cluster`, typed
    as ``Redis`` for the code that uses it: the commands tierq sends work on both): commands
    still wait for one of ``redis_max_connections`` permits; the tail hub blocks once per
    hash slot it follows (``JOB_TAGS`` at most); the cancel subscription is a plain
    ``SUBSCRIBE`` on one node (a ``PUBLISH`` reaches every node of a cluster)."""

    commands: aioredis.Redis
    tails: aioredis.Redis
    pubsub: aioredis.Redis

    async def aclose(self) -> None:
        for client in (self.commands, self.tails, self.pubsub):
            await client.aclose()


JOB_TAGS = 64
"""On Redis Cluster, the hash tags job keys share (``AppKeys.job_tags``): jobs spread over
this many slots (so over every node of a cluster of up to a few dozen masters), and a process
holds at most this many blocked tail reads and makes at most this many delta calls a tick."""


def redis_clients(settings: Settings) -> RedisClients:
    url = settings.redis_url or "redis://127.0.0.1:6379/0"
    name = settings.redis_client_name  # every connection says who it is (CLIENT LIST)
    if settings.redis_cluster:
        return _cluster_clients(settings, url)
    pool = LeanPool.from_url(
        url,
        max_connections=settings.redis_max_connections,
        timeout=settings.redis_pool_timeout_s,
        socket_timeout=settings.redis_socket_timeout_s,
        client_name=name,
    )
    return RedisClients(
        commands=LeanRedis.from_pool(pool),  # the client owns (and closes) the pool
        tails=aioredis.Redis.from_url(
            url,
            connection_class=LeanConnection,  # the hub's XREAD names every followed stream
            max_connections=2,
            socket_timeout=BLOCK_MS / 1000 + settings.redis_socket_timeout_s,
            client_name=name,
        ),
        pubsub=aioredis.Redis.from_url(
            url, socket_timeout=None, health_check_interval=30, client_name=name
        ),
    )


def _cluster_clients(settings: Settings, url: str) -> RedisClients:
    """The three pools on Redis Cluster (``url``: any node; the others are discovered)."""
    name = settings.redis_client_name
    return RedisClients(
        commands=cluster_client(
            url,
            permits=settings.redis_max_connections,
            wait_s=settings.redis_pool_timeout_s,
            socket_timeout=settings.redis_socket_timeout_s,
            client_name=name,
        ),
        tails=cluster_client(
            url,
            max_connections=JOB_TAGS + 2,  # per node: one blocked read per slot followed
            socket_timeout=BLOCK_MS / 1000 + settings.redis_socket_timeout_s,
            client_name=name,
        ),
        pubsub=cluster_client(url, socket_timeout=None, health_check_interval=30, client_name=name),
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
    ledger: Ledger
    admission: FairGate
    """Bounds the job-admission round trips in flight in this process (a submit's admission,
    a delivery's claim and start; see ``Settings.admission_concurrency``): waiters go in by
    user, in turn."""

    local: LocalRuns = field(default_factory=LocalRuns)
    """The runs this process started at dispatch (``Settings.local_start``; the worker layer
    enables it: :func:`tierq.worker.pipeline.enable_local_start`)."""

    async def aclose_streams(self) -> None:
        """Stop local runs and dispatching, write pending deltas and stop following logs (at
        shutdown)."""
        await self.local.stop()
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
    keys = AppKeys(settings.key_prefix, job_tags=JOB_TAGS if settings.redis_cluster else 0)
    jobs = JobStore(client, keys, settings.event_retention_s)
    if gateway is None:
        gateway = QStashGateway(qstash_client(settings), settings)
    receiver = Receiver(
        current_signing_key=settings.qstash_current_signing_key or "",
        next_signing_key=settings.qstash_next_signing_key or "",
    )
    metrics = metrics or Metrics()
    dispatcher = Dispatcher(client, keys, settings, gateway, metrics, jobs)
    ledger = Ledger(client, keys, settings.usage_retention_days, settings.usage_ledger)
    dispatcher.also_scripts.append(ledger.script)  # queued on its pipelines too
    hub = TailHub(
        tail_client or client,
        client,
        keys.tail_wake,
        settings.sse_client_buffer_bytes,
        cluster=settings.redis_cluster,
    )
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
        deltas=DeltaWriter(
            jobs,
            settings.delta_flush_ms,
            settings.delta_flush_max_chars,
            cluster=settings.redis_cluster,
            hub=hub,
        ),
        hub=hub,
        dispatcher=dispatcher,
        streams=StreamCaps(settings.sse_max_per_job, settings.sse_max_per_user),
        ledger=ledger,
        admission=FairGate(settings.admission_concurrency),
    )
