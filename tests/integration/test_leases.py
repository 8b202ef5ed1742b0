"""Leases and the heartbeat against the real embedded Redis (no mocks: concurrency is real)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from tierq.embedded_redis import free_port
from tierq.errors import UpstreamError
from tierq.guards.heartbeat import heartbeat
from tierq.guards.leases import KEY_GRACE_MS, Leases

pytestmark = pytest.mark.timeout(20)

T = TypeVar("T")
SHORT_TTL_S = 0.2
BEAT_TTL_S, BEAT_EVERY_S = 0.3, 0.05


async def eventually(
    probe: Callable[[], Awaitable[T]],
    until: Callable[[T], bool],
    within_s: float = 5.0,
    interval: float = 0.02,
) -> T:
    """Poll ``probe`` until ``until(value)`` holds or the deadline passes (then fail)."""
    deadline = time.monotonic() + within_s
    while True:
        value = await probe()
        if until(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within_s}s; last value {value!r}")
        await asyncio.sleep(interval)


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.Redis.from_url(redis_url)
    yield c
    await c.aclose()


@pytest.fixture
def leases(client: aioredis.Redis) -> Leases:
    return Leases(client)


@pytest.fixture
def key() -> str:
    return f"test:lease:{uuid.uuid4().hex}"


def new_key() -> str:
    return f"test:lease:{uuid.uuid4().hex}"


async def test_limit_honoured_under_concurrent_acquires(leases: Leases, key: str) -> None:
    holders = [f"job-{i}" for i in range(50)]
    results = await asyncio.gather(*(leases.acquire(key, h, 5, 30) for h in holders))
    winners = {h for h, r in zip(holders, results, strict=True) if r.acquired}
    assert len(winners) == 5
    assert all(r.count == 5 for r in results if not r.acquired)
    assert await leases.count(key) == 5
    assert set(await leases.holders(key)) == winners


async def test_reacquire_by_same_holder_takes_no_second_slot(leases: Leases, key: str) -> None:
    first = await leases.acquire(key, "a", 2, 30)
    again = await leases.acquire(key, "a", 2, 30)
    assert (first.acquired, first.count) == (True, 1)
    assert (again.acquired, again.count) == (True, 1)
    assert (await leases.acquire(key, "b", 2, 30)).acquired
    full = await leases.acquire(key, "c", 2, 30)
    assert (full.acquired, full.count) == (False, 2)
    redelivered = await leases.acquire(key, "a", 2, 30)  # full, yet its own slot is kept
    assert (redelivered.acquired, redelivered.count) == (True, 2)


async def test_release_frees_a_slot_and_is_idempotent(leases: Leases, key: str) -> None:
    assert (await leases.acquire(key, "a", 1, 30)).acquired
    assert not (await leases.acquire(key, "b", 1, 30)).acquired
    assert await leases.release(key, "a") is True
    assert await leases.release(key, "a") is False
    assert (await leases.acquire(key, "b", 1, 30)).acquired


async def test_expired_leases_are_reclaimed(leases: Leases, key: str) -> None:
    assert (await leases.acquire(key, "crashed", 1, SHORT_TTL_S)).acquired
    assert not (await leases.acquire(key, "b", 1, 30)).acquired
    await eventually(lambda: leases.count(key), lambda n: n == 0)
    got = await leases.acquire(key, "b", 1, 30)
    assert (got.acquired, got.count) == (True, 1)
    assert await leases.holders(key) == ["b"]


async def test_renewed_lease_outlives_its_ttl_unrenewed_does_not(leases: Leases, key: str) -> None:
    assert (await leases.acquire(key, "renewed", 2, SHORT_TTL_S)).acquired
    assert (await leases.acquire(key, "idle", 2, SHORT_TTL_S)).acquired
    assert await leases.renew(key, "renewed", 30) is True
    # "idle" was taken after "renewed": once it has expired, so has renewed's original TTL.
    assert await eventually(lambda: leases.holders(key), lambda h: "idle" not in h) == ["renewed"]


async def test_renew_of_a_lost_lease_returns_false(leases: Leases, key: str) -> None:
    assert await leases.renew(key, "never", 30) is False
    assert (await leases.acquire(key, "a", 1, SHORT_TTL_S)).acquired
    await eventually(lambda: leases.count(key), lambda n: n == 0)
    assert await leases.renew(key, "a", 30) is False
    assert await leases.count(key) == 0  # not brought back
    assert (await leases.acquire(key, "b", 1, 30)).acquired
    await leases.release(key, "b")
    assert await leases.renew(key, "b", 30) is False


async def test_guard_key_has_a_ttl_and_disappears(
    leases: Leases, client: aioredis.Redis, key: str
) -> None:
    await leases.acquire(key, "a", 2, 30)
    assert 0 < await client.pttl(key) <= 30_000 + KEY_GRACE_MS
    await leases.release(key, "a")
    assert await client.exists(key) == 0
    await leases.acquire(key, "b", 2, SHORT_TTL_S)
    assert 0 < await client.pttl(key) <= SHORT_TTL_S * 1000 + KEY_GRACE_MS
    await eventually(lambda: client.exists(key), lambda n: n == 0)


async def test_short_lease_never_shortens_the_key_ttl(
    leases: Leases, client: aioredis.Redis, key: str
) -> None:
    await leases.acquire(key, "long", 2, 30)
    await leases.acquire(key, "short", 2, SHORT_TTL_S)
    assert await client.pttl(key) > 20_000


async def test_heartbeat_keeps_leases_alive_across_several_ttls(leases: Leases) -> None:
    keys = [new_key(), new_key()]
    for k in keys:
        assert (await leases.acquire(k, "job", 1, BEAT_TTL_S)).acquired
    lost: list[str] = []
    held = [(k, "job") for k in keys]
    beat = asyncio.create_task(heartbeat(leases, held, BEAT_TTL_S, BEAT_EVERY_S, lost.append))
    try:
        until = time.monotonic() + 4 * BEAT_TTL_S
        while time.monotonic() < until:  # watch every lease through four TTLs
            assert [await leases.holders(k) for k in keys] == [["job"], ["job"]]
            await asyncio.sleep(0.02)
    finally:
        beat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beat
    assert lost == []


async def test_heartbeat_reports_a_lost_lease_once(leases: Leases, client: aioredis.Redis) -> None:
    stolen, kept = new_key(), new_key()
    for k in (stolen, kept):
        assert (await leases.acquire(k, "job", 1, 5)).acquired
    lost: list[str] = []
    held = [(stolen, "job"), (kept, "job")]
    beat = asyncio.create_task(heartbeat(leases, held, 5, BEAT_EVERY_S, lost.append))
    try:
        await client.zrem(stolen, "job")  # behind the holder's back
        await eventually(lambda: _value(lost), lambda got: got == [stolen])
        for _ in range(3):  # several more beats renew the other lease, and report nothing new
            before = await client.zscore(kept, "job")
            await eventually(lambda: client.zscore(kept, "job"), _differs_from(before))
    finally:
        beat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beat
    assert lost == [stolen]
    assert await leases.holders(kept) == ["job"]


async def test_heartbeat_returns_once_every_lease_is_lost(leases: Leases, key: str) -> None:
    assert (await leases.acquire(key, "job", 1, 5)).acquired
    lost: list[str] = []
    beat = asyncio.create_task(heartbeat(leases, [(key, "job")], 5, BEAT_EVERY_S, lost.append))
    await leases.release(key, "job")
    await asyncio.wait_for(beat, timeout=5)
    assert lost == [key]


async def test_heartbeat_rejects_an_interval_not_below_the_ttl(leases: Leases) -> None:
    with pytest.raises(ValueError, match="every_s"):
        await heartbeat(leases, [], 1, 1, None)


async def test_release_all_in_one_round_trip(leases: Leases) -> None:
    keys = [new_key(), new_key(), new_key()]
    for k in keys[:2]:
        assert (await leases.acquire(k, "job", 1, 30)).acquired
    assert await leases.release_all([(k, "job") for k in keys]) == [True, True, False]
    assert [await leases.count(k) for k in keys] == [0, 0, 0]
    assert await leases.release_all([]) == []


async def test_decoding_client_gives_the_same_answers(redis_url: str, key: str) -> None:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        leases = Leases(client)
        assert await leases.acquire(key, "a", 1, 30) == await leases.acquire(key, "a", 1, 30)
        assert await leases.holders(key) == ["a"]
        assert await leases.count(key) == 1
        assert await leases.renew(key, "a", 30) is True
        assert await leases.release_all([(key, "a")]) == [True]
    finally:
        await client.aclose()


async def test_redis_failure_becomes_upstream_error(key: str) -> None:
    client = aioredis.Redis(port=free_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))
    try:
        leases = Leases(client)
        with pytest.raises(UpstreamError):
            await leases.acquire(key, "a", 1, 30)
        with pytest.raises(UpstreamError):
            await leases.release_all([(key, "a")])
    finally:
        await client.aclose()


async def _value(x: T) -> T:
    return x


def _differs_from(old: object) -> Callable[[object], bool]:
    return lambda new: new != old
