"""tierq's Redis pool (``tierq/redis_pool.py``) on a real Redis: the fast checkout keeps the
stock pool's promises — a bound on connections, waiting for one, reconnecting a broken one —
and the lean commands and pipelines give what redis-py's own give, fail as they fail and leave
no connection out of step with its replies."""

from __future__ import annotations

import asyncio
import errno
import time

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tierq import redis_pool
from tierq.redis_pool import LeanConnection, LeanPipeline, LeanPool, LeanRedis


def lean(
    redis_url: str,
    max_connections: int = 4,
    timeout: float = 5.0,
    socket_timeout: float = 5.0,
    retry: Retry | None = None,
) -> aioredis.Redis:
    options = {} if retry is None else {"retry": retry}
    pool = LeanPool.from_url(
        redis_url,
        max_connections=max_connections,
        timeout=timeout,
        socket_timeout=socket_timeout,
        **options,
    )
    return LeanRedis.from_pool(pool)


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


# -- lean pipelines and commands ----------------------------------------------------------------


def _queue_mix(pipe: aioredis.client.Pipeline, sha: str) -> None:
    pipe.delete("lp:h", "lp:z", "lp:s")
    pipe.hset("lp:h", mapping={"a": "1", "b": "2"})
    pipe.hgetall("lp:h")
    pipe.get("lp:missing")
    pipe.zadd("lp:z", {"m": 1.5})
    pipe.zscore("lp:z", "m")
    pipe.set("lp:s", "text")
    pipe.incr("lp:s")  # an error reply in the middle
    pipe.evalsha(sha, 1, "lp:h", "x")
    pipe.exists("lp:h", "lp:z")


async def test_a_lean_pipeline_answers_as_redis_pys_own(redis_url: str) -> None:
    r = lean(redis_url)
    stock = aioredis.Redis.from_url(redis_url)
    try:
        sha = await r.script_load("return {KEYS[1], ARGV[1]}")
        answers = []
        for client in (r, stock):
            pipe = client.pipeline(transaction=False)
            _queue_mix(pipe, sha)
            answers.append(await pipe.execute(raise_on_error=False))
        assert isinstance(r.pipeline(transaction=False), LeanPipeline)
        mine, theirs = answers
        assert [type(x) for x in mine] == [type(x) for x in theirs]
        assert isinstance(mine[7], ResponseError)
        # (the first DELETE found the keys the first run left: 0 vs 3)
        assert [x for x in mine[1:] if not isinstance(x, Exception)] == [
            x for x in theirs[1:] if not isinstance(x, Exception)
        ]
        assert mine[2] == {b"a": b"1", b"b": b"2"}
        assert mine[5] == 1.5
        assert mine[3] is None
        pipe = r.pipeline(transaction=False)
        _queue_mix(pipe, sha)
        with pytest.raises(ResponseError):
            await pipe.execute()  # raise_on_error: the first error reply
        assert await r.get("lp:s") == b"text"  # the connection is still in step
    finally:
        await r.aclose()
        await stock.aclose()


async def test_a_lean_pipeline_that_times_out_leaves_no_reply_behind(redis_url: str) -> None:
    r = lean(redis_url, max_connections=1, socket_timeout=0.3)
    try:
        await r.delete("lp:empty")
        pipe = r.pipeline(transaction=False)
        pipe.set("lp:t", "1")
        pipe.blpop(["lp:empty"], timeout=2)  # outlasts the socket timeout
        with pytest.raises(RedisTimeoutError):
            await pipe.execute()
        pusher = aioredis.Redis.from_url(redis_url)
        try:
            await pusher.rpush("lp:empty", "late")  # the abandoned BLPOP would take it
        finally:
            await pusher.aclose()
        pipe = r.pipeline(transaction=False)
        pipe.get("lp:t")
        pipe.lrange("lp:empty", 0, -1)
        assert await pipe.execute() == [b"1", [b"late"]]  # one connection: it is a fresh one
    finally:
        await r.aclose()


async def test_a_cancelled_lean_pipeline_leaves_no_reply_behind(redis_url: str) -> None:
    r = lean(redis_url, max_connections=1)
    try:
        await r.delete("lp:c")
        pipe = r.pipeline(transaction=False)
        pipe.blpop(["lp:c"], timeout=3)
        task = asyncio.create_task(pipe.execute())
        await in_use(r, 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await r.rpush("lp:c", "v")
        pipe = r.pipeline(transaction=False)
        pipe.lrange("lp:c", 0, -1)
        pipe.llen("lp:c")
        assert await pipe.execute() == [[b"v"], 1]
    finally:
        await r.aclose()


@pytest.mark.parametrize("how", ["pipeline", "command"])
async def test_lean_calls_retry_a_connection_redis_dropped(redis_url: str, how: str) -> None:
    """The retry policy still applies: the connection dies under a blocked call, which is sent
    again on a new one and answers."""
    r = lean(redis_url, max_connections=1, retry=Retry(NoBackoff(), 1))
    admin = aioredis.Redis.from_url(redis_url)
    try:
        await r.delete("lp:r")
        if how == "pipeline":
            pipe = r.pipeline(transaction=False)
            pipe.blpop(["lp:r"], timeout=5)
            call = asyncio.create_task(pipe.execute())
        else:
            call = asyncio.create_task(r.blpop(["lp:r"], timeout=5))
        deadline = time.monotonic() + 5
        while not [c for c in await admin.client_list() if c.get("cmd") == "blpop"]:
            assert time.monotonic() < deadline, "the call never blocked"
            await asyncio.sleep(0.01)
        victim = next(c for c in await admin.client_list() if c.get("cmd") == "blpop")
        await admin.client_kill_filter(_id=victim["id"])
        while not [
            c
            for c in await admin.client_list()
            if c.get("cmd") == "blpop" and c["id"] != victim["id"]
        ]:
            assert time.monotonic() < deadline, "the call was not sent again"
            await asyncio.sleep(0.01)
        await admin.rpush("lp:r", "v")
        answer = await asyncio.wait_for(call, 5)
        assert answer == ([(b"lp:r", b"v")] if how == "pipeline" else (b"lp:r", b"v"))
    finally:
        await r.aclose()
        await admin.aclose()


async def test_lean_commands_answer_through_the_reply_callbacks(redis_url: str) -> None:
    r = lean(redis_url)
    try:
        await r.delete("lc:h", "lc:z")
        await r.hset("lc:h", mapping={"a": "1"})
        await r.zadd("lc:z", {"m": 2.5})
        assert await r.hgetall("lc:h") == {b"a": b"1"}
        assert await r.zscore("lc:z", "m") == 2.5
        assert await r.get("lc:missing") is None
        assert await r.exists("lc:h") == 1
        await r.set("lc:s", "text")
        with pytest.raises(ResponseError):
            await r.incr("lc:s")
        assert await r.get("lc:s") == b"text"
    finally:
        await r.aclose()


async def test_lean_commands_answer_as_redis_pys_own_with_their_options(redis_url: str) -> None:
    """Replies whose callbacks take options (``withscores``), a command answered by an
    ``EMPTY_RESPONSE`` instead of Redis's error (``MGET`` of no keys), the ``keys`` option kept
    from the callbacks, replies left undecoded: the same as redis-py's own client gives."""
    r = lean(redis_url)
    stock = aioredis.Redis.from_url(redis_url)
    try:
        await stock.delete("lo:z", "lo:a", "lo:b", "lo:h")
        await stock.zadd("lo:z", {"x": 1.5, "y": 2})
        await stock.mset({"lo:a": "1", "lo:b": "2"})
        await stock.hset("lo:h", mapping={"f": "v"})
        for client in (r, stock):
            assert await client.zrange("lo:z", 0, -1, withscores=True) == [(b"x", 1.5), (b"y", 2.0)]
            assert await client.zrange("lo:z", 0, -1, withscores=True, score_cast_func=int) == [
                (b"x", 1),
                (b"y", 2),
            ]
            assert await client.mget("lo:a", "lo:missing", "lo:b") == [b"1", None, b"2"]
            assert await client.mget([]) == []
            assert await client.hgetall("lo:h") == {b"f": b"v"}
            assert await client.dump("lo:a") == await stock.dump("lo:a")
            assert await client.xadd("lo:s", {"e": "1"}, id="1-1") == b"1-1"
            await client.delete("lo:s")
    finally:
        await r.aclose()
        await stock.aclose()


async def test_a_socket_timeout_mid_pipeline_raises_and_answers_nothing(redis_url: str) -> None:
    """A read that fails with ETIMEDOUT (a TimeoutError since Python 3.11) must fail the batch
    as redis-py does, never turn the replies still to come into ``None``s."""
    r = lean(redis_url, max_connections=1)
    try:
        await r.set("lp:to", "v")
        await r.delete("lp:none")
        connection = r.connection_pool._available_connections[-1]
        pipe = r.pipeline(transaction=False)
        pipe.blpop(["lp:none"], timeout=2)
        pipe.get("lp:to")
        task = asyncio.create_task(pipe.execute())
        await in_use(r, 1)
        connection._reader.set_exception(TimeoutError(errno.ETIMEDOUT, "Connection timed out"))
        with pytest.raises(RedisTimeoutError):
            await asyncio.wait_for(task, 5)
        assert await r.get("lp:to") == b"v"  # and the next call is in step again
    finally:
        await r.aclose()


# -- read deadlines: one timer per loop instead of an asyncio.timeout per reply ----------------


async def test_every_read_past_its_socket_timeout_fails_and_the_others_are_answered(
    redis_url: str,
) -> None:
    """Many reads in flight share the loop's one deadline timer: each blocked one times out
    after ``socket_timeout`` (not the first only, not never), replies that come in time are
    answered, and the pool goes on in step."""
    r = lean(redis_url, max_connections=12, socket_timeout=0.3)
    other = aioredis.Redis.from_url(redis_url)
    try:
        await r.delete(*(f"dl:{i}" for i in range(10)))
        started = time.monotonic()
        blocked = [asyncio.create_task(r.blpop([f"dl:{i}"], timeout=3)) for i in range(8)]
        answered = [asyncio.create_task(r.blpop([f"dl:{i}"], timeout=3)) for i in (8, 9)]
        await in_use(r, 10)
        await other.rpush("dl:8", "a")
        await other.rpush("dl:9", "b")
        assert await asyncio.gather(*answered) == [(b"dl:8", b"a"), (b"dl:9", b"b")]
        results = await asyncio.gather(*blocked, return_exceptions=True)
        assert all(isinstance(e, RedisTimeoutError) for e in results), results
        assert time.monotonic() - started < 2.5  # ~0.3 s: far less than the 3 s BLPOPs
        assert await r.ping()
    finally:
        await r.aclose()
        await other.aclose()


async def test_a_cancel_from_outside_at_the_deadline_stays_a_cancel(redis_url: str) -> None:
    """As with ``asyncio.timeout``: when the task is cancelled from outside as well as by its
    read's deadline, the caller sees the cancel, not a timeout."""
    r = lean(redis_url, max_connections=1, socket_timeout=5)
    try:
        await r.delete("dl:c")
        connection = r.connection_pool._available_connections[-1]
        task = asyncio.create_task(r.blpop(["dl:c"], timeout=3))
        await in_use(r, 1)
        watch = connection._watch
        assert watch.task is task
        watch.deadline = 0.0  # its deadline has passed ...
        task.cancel()  # ... and someone cancels it too, in the same turn of the loop
        deadlines = redis_pool._deadlines()
        deadlines._fire(deadlines._armed)
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await r.ping()
    finally:
        await r.aclose()


async def test_a_read_deadline_moves_as_redis_py_relaxes_it(redis_url: str) -> None:
    """redis-py's maintenance notifications relax a read in flight through the connection's
    ``_active_read_timeout`` (``update_current_socket_timeout``): the read keeps going past
    ``socket_timeout`` when relaxed to none, and times out by the new deadline otherwise."""
    r = lean(redis_url, max_connections=1, socket_timeout=0.3)
    other = aioredis.Redis.from_url(redis_url)
    try:
        await r.delete("dl:m")
        connection = r.connection_pool._available_connections[-1]
        task = asyncio.create_task(r.blpop(["dl:m"], timeout=5))
        await in_use(r, 1)
        connection.update_current_socket_timeout(None)  # no deadline while it lasts
        await asyncio.sleep(0.6)  # twice the socket timeout: the read is still waiting
        assert not task.done()
        await other.rpush("dl:m", "v")
        assert await task == (b"dl:m", b"v")
        task = asyncio.create_task(r.blpop(["dl:m"], timeout=5))
        await in_use(r, 1)
        started = time.monotonic()
        connection.update_current_socket_timeout(0.1)  # a tighter one
        with pytest.raises(RedisTimeoutError):
            await task
        assert time.monotonic() - started < 0.29  # by the new deadline, not the old one
    finally:
        await r.aclose()
        await other.aclose()
