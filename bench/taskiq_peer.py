"""The peer baseline of ``bench/jobs.py``: taskiq with taskiq-redis, one no-op task.

Broker: ``RedisStreamBroker`` (a Redis stream and a consumer group, acknowledged deliveries:
taskiq-redis's recommended broker) with ``RedisAsyncResultBackend`` (one key per result). The
workers run it as ``taskiq worker taskiq_peer:broker`` (this folder on ``PYTHONPATH``, the Redis
URL in ``BENCH_TASKIQ_REDIS_URL``); the bench builds its own kicker with ``make_broker``.

Needs the ``bench`` extra: ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import os
import time
from typing import Any

from taskiq import AsyncBroker
from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker

URL_ENV = "BENCH_TASKIQ_REDIS_URL"
QUEUE = "bench:taskiq:stream"
GROUP = "bench-taskiq"
RESULT_PREFIX = "bench:taskiq:result"
TASK_NAME = "bench_noop"
RESULT_TTL_S = 3600


def result_key(task_id: str) -> str:
    """The Redis key of one task's result (``RedisAsyncResultBackend`` with our prefix)."""
    return f"{RESULT_PREFIX}:{task_id}"


def make_broker(url: str) -> tuple[AsyncBroker, Any]:
    """The broker over ``url`` and its no-op task (which returns when it ran, in ms)."""
    backend: RedisAsyncResultBackend[Any] = RedisAsyncResultBackend(
        url, result_ex_time=RESULT_TTL_S, prefix_str=RESULT_PREFIX
    )
    broker = RedisStreamBroker(
        url=url, queue_name=QUEUE, consumer_group_name=GROUP
    ).with_result_backend(backend)

    @broker.task(task_name=TASK_NAME)
    async def noop() -> int:
        return int(time.time() * 1000)

    return broker, noop


broker, noop = make_broker(os.environ.get(URL_ENV, "redis://127.0.0.1:6379/0"))
