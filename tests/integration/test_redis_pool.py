"""tierq's Redis pool (``tierq/redis_pool.py``) on a real Redis: the fast checkout keeps the
stock pool's promises — a bound on connections, waiting for one, reconnecting a broken one."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from tierq.redis_pool import LeanConnection, LeanPool


def lean(redis_url: str, max_connections: int = 4, timeout: float = 5.0) -> aioredis.Redis:
    pool = LeanPool.from_url(
        redis_url, max_connections=max_connections, timeout=timeout, socket_timeout=5
    )
    return aioredis.Redis.from_pool(pool)


async def in_use(r: aioredis.Redis, count: int, within_s: float = 5.0) -> None:
    """Wait until ``count`` of the pool's connections are checked out."""
    deadline = time.monotonic() + within_s
    while len(r.connection_pool._in_use_connections) < count:
        assert time.monotonic() < deadline, f"{count} connections never in use"
        await asyncio.sleep(0.01)


async def test_commands_reuse_one_connection_when_one_at_a_time(redis_url: str) -> None:
    r = lean(redis_url)
    try:
        for n in range(50):
            await r.set("pool:k", n)
            assert int(await r.get("pool:k")) == n
        pool = r.connection_pool
        assert isinstance(pool, LeanPool)
        assert len(pool._available_connections) + len(pool._in_use_connections) == 1
        assert isinstance(pool._available_connections[0], LeanConnection)
    finally:
        await r.aclose()


async def test_never_more_connections_than_the_bound_and_callers_wait(redis_url: str) -> None:
    r = lean(redis_url, max_connections=3)
    names = [f"pool:list{n}" for n in range(8)]
    try:
        await r.delete(*names)
        # eight blocking pops need eight connections; three exist: five callers wait
        pops = [asyncio.create_task(r.blpop([name], timeout=5)) for name in names]
        pool = r.connection_pool
        await in_use(r, 3)
        pusher = aioredis.Redis.from_url(redis_url)
        try:
            for name in names:  # each push frees a connection for a waiting pop
                await pusher.rpush(name, "v")
        finally:
            await pusher.aclose()
        done = await asyncio.wait_for(asyncio.gather(*pops), 10)
        assert sorted(item[0].decode() for item in done) == sorted(names)
        assert len(pool._available_connections) + len(pool._in_use_connections) <= 3
    finally:
        await r.aclose()


async def test_a_caller_gives_up_after_the_pool_timeout(redis_url: str) -> None:
    r = lean(redis_url, max_connections=1, timeout=0.3)
    try:
        await r.delete("pool:empty")
        hold = asyncio.create_task(r.blpop(["pool:empty"], timeout=3))
        await in_use(r, 1)  # it holds the only connection
        with pytest.raises(RedisConnectionError, match="No connection available"):
            await r.get("pool:k")
        hold.cancel()
        await asyncio.gather(hold, return_exceptions=True)
    finally:
        await r.aclose()


async def test_a_connection_redis_closed_is_replaced(redis_url: str) -> None:
    r = lean(redis_url)
    admin = aioredis.Redis.from_url(redis_url)
    try:
        await r.client_setname("lean-pool-test")
        assert await r.ping()
        clients = await admin.client_list()
        ours = [c["id"] for c in clients if c.get("name") == "lean-pool-test"]
        assert ours
        for client_id in ours:
            await admin.client_kill_filter(_id=client_id)
        # Redis closed the idle pooled connection (as a restart or an idle timeout does); once
        # the event loop has seen that, the pool must not hand it out: the next commands work
        pooled = r.connection_pool._available_connections[0]
        deadline = time.monotonic() + 5
        while pooled._reader is not None and not pooled._reader.at_eof():
            assert time.monotonic() < deadline, "the close never reached the connection"
            await asyncio.sleep(0.01)
        await r.set("pool:after-kill", "1")
        assert await r.get("pool:after-kill") == b"1"
    finally:
        await admin.aclose()
        await r.aclose()


@pytest.mark.parametrize(
    "args",
    [
        ("SET", "k", "v"),
        ("SET", b"k", b"\x00\xff"),
        ("SET", "k", 0.5),
        ("SET", "k", 1e-7),
        ("SET", "k", -3),
        ("SET", "k", 12345678901234567890123),
        ("SET", "k", "é€"),
        ("SET", "k", memoryview(b"ab")),
        ("CONFIG GET", "maxmemory"),  # a two-word name: split into two arguments
        ("EVALSHA", "a" * 40, 2, *(f"key{i}" for i in range(600)), *(["x" * 100] * 300)),
    ],
)
def test_commands_are_packed_exactly_as_redis_py_packs_them(args: tuple[object, ...]) -> None:
    from redis.asyncio.connection import Connection  # noqa: PLC0415

    assert b"".join(LeanConnection().pack_command(*args)) == b"".join(
        Connection().pack_command(*args)
    )


def test_a_value_redis_py_refuses_is_still_refused() -> None:
    from redis.exceptions import DataError  # noqa: PLC0415

    with pytest.raises(DataError):
        LeanConnection().pack_command("SET", "k", True)
