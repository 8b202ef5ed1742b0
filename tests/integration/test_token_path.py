"""The token path on real Redis: coalesced deltas, the tail hub, followers, slow clients."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from helpers import async_wait_until
from tierq.contracts import Completed, Progress, Queued, Started
from tierq.embedded_redis import free_port
from tierq.errors import UpstreamError
from tierq.events.deltas import DeltaWriter
from tierq.events.hub import TailHub
from tierq.events.log import JobStore
from tierq.events.response import JobEventsResponse
from tierq.events.sse import JobFollower
from tierq.keys import AppKeys
from tierq.queues import QueueId

_n = itertools.count()


class Parts:
    """A job store, a delta writer and a tail hub on one real Redis, like one app process."""

    def __init__(self, client: aioredis.Redis, reader: aioredis.Redis, flush_ms: float) -> None:
        self.keys = AppKeys(f"stream{next(_n)}")
        self.store = JobStore(client, self.keys, retention_s=60)
        self.writer = DeltaWriter(self.store, flush_ms, max_chars=1000)
        self.hub = TailHub(reader, client, self.keys.tail_wake, buffer_bytes=2048)

    async def running_job(self) -> str:
        job_id = f"job_{next(_n)}"
        queued = Queued(jobId=job_id, queueId=QueueId.PAID_STREAM, tier="paid")
        assert await self.store.create(job_id, {"userId": "u"}, queued)
        assert await self.store.append(Started(jobId=job_id), status="running")
        return job_id

    async def complete(self, job_id: str, result: str) -> None:
        assert await self.store.append(Completed(jobId=job_id, result=result), status="completed")

    async def log(self, job_id: str) -> list[dict[str, Any]]:
        return [json.loads(raw) for _, raw in await self.store.read(job_id, None, 10_000)]

    async def deltas(self, job_id: str) -> list[str]:
        return [e["text"] for e in await self.log(job_id) if e["type"] == "delta"]


@pytest.fixture
async def clients(redis_url: str) -> AsyncIterator[tuple[aioredis.Redis, aioredis.Redis]]:
    client = aioredis.Redis.from_url(redis_url)
    reader = aioredis.Redis.from_url(redis_url, max_connections=1)  # the hub's one connection
    yield client, reader
    await client.aclose()
    await reader.aclose()


@pytest.fixture
async def parts(clients: tuple[aioredis.Redis, aioredis.Redis]) -> AsyncIterator[Parts]:
    p = Parts(*clients, flush_ms=40)
    yield p
    await p.writer.stop()
    await p.hub.stop()


async def make_parts(clients: tuple[aioredis.Redis, aioredis.Redis], flush_ms: float) -> Parts:
    return Parts(*clients, flush_ms=flush_ms)


# -- coalesced deltas -------------------------------------------------------------------------


async def test_chunks_coalesce_into_few_deltas_with_identical_text_and_dense_seq(
    parts: Parts,
) -> None:
    job_id = await parts.running_job()
    buffer = parts.writer.buffer(job_id)
    chunks = [f" w{i}" for i in range(200)]
    for index, chunk in enumerate(chunks):
        buffer.add(chunk)
        if index % 20 == 0:
            await asyncio.sleep(0.005)  # a model producing tokens over ~50 ms: several ticks
    await buffer.close()
    await parts.complete(job_id, "".join(chunks))
    log = await parts.log(job_id)
    deltas = [e["text"] for e in log if e["type"] == "delta"]
    assert "".join(deltas) == "".join(chunks)
    assert 2 <= len(deltas) < 20  # a few flush ticks, not one event per chunk
    assert deltas[0] == chunks[0]  # the first chunk went alone, at once
    assert [e["seq"] for e in log] == list(range(1, len(log) + 1))
    assert [e["type"] for e in log][-1] == "completed"


async def test_the_first_chunk_is_not_held_for_the_flush_interval(
    clients: tuple[aioredis.Redis, aioredis.Redis],
) -> None:
    parts = await make_parts(clients, flush_ms=1000)
    try:
        job_id = await parts.running_job()
        buffer = parts.writer.buffer(job_id)
        started = time.monotonic()
        buffer.add("first")
        await async_wait_until(lambda: parts.deltas(job_id), within_s=0.5)
        assert time.monotonic() - started < 0.5  # far less than the 1 s tick
        for chunk in (" a", " b", " c"):
            buffer.add(chunk)
        await buffer.close()  # flushes what is pending at once, too
        assert time.monotonic() - started < 0.9
        assert await parts.deltas(job_id) == ["first", " a b c"]
    finally:
        await parts.writer.stop()


async def test_text_waits_one_interval_from_its_arrival_even_behind_a_slow_flush(
    clients: tuple[aioredis.Redis, aioredis.Redis],
) -> None:
    """The tick is counted from the oldest pending text, not from the end of the previous
    flush: a busy process whose round trip is slow does not add it to every token's wait."""
    client = clients[0]
    parts = await make_parts(clients, flush_ms=500)
    try:
        job_id = await parts.running_job()
        buffer = parts.writer.buffer(job_id)
        buffer.add("first")  # a job's first text goes at once
        await async_wait_until(lambda: parts.deltas(job_id), within_s=2)
        buffer.add(" second")  # its tick: 500 ms from now
        await client.execute_command("CLIENT", "PAUSE", 1000, "WRITE")  # holds that tick
        try:
            await async_wait_until(lambda: _true(buffer.inflight), within_s=2, interval=0.005)
            added_ms = time.time() * 1000
            buffer.add(" third")  # arrives while " second" is held in Redis
            await async_wait_until(
                lambda: _has(parts.deltas(job_id), 3), within_s=3, interval=0.005
            )
        finally:
            await client.execute_command("CLIENT", "UNPAUSE")
        entries = await parts.store.read(job_id, None, 100)
        written_ms = int(entries[-1][0].split("-")[0])  # Redis's clock, when XADDed
        # one interval after it arrived (~500 ms, the held flush ends meanwhile); counted from
        # the end of the held flush it would be ~1,000 ms
        assert written_ms - added_ms < 750
        assert await parts.deltas(job_id) == ["first", " second", " third"]
    finally:
        await parts.writer.stop()


async def _true(value: bool) -> bool:
    return value


async def _has(deltas: Any, count: int) -> bool:
    return len(await deltas) >= count


async def test_one_round_trip_per_tick_for_all_jobs(parts: Parts) -> None:
    jobs = [await parts.running_job() for _ in range(50)]
    buffers = [parts.writer.buffer(j) for j in jobs]
    before = parts.writer.flushes
    for buffer in buffers:
        buffer.add("one")
    await asyncio.gather(*(b.close() for b in buffers))
    assert parts.writer.flushes == before + 1
    for buffer in buffers:
        buffer.add(" two")
        buffer.add(" three")
    await asyncio.gather(*(b.close() for b in buffers))
    assert parts.writer.flushes == before + 2
    for job_id in jobs:
        assert await parts.deltas(job_id) == ["one", " two three"]


async def test_text_for_an_ended_job_is_refused_and_marks_the_buffer(parts: Parts) -> None:
    job_id = await parts.running_job()
    buffer = parts.writer.buffer(job_id)
    buffer.add("before")
    await buffer.close()
    await parts.complete(job_id, "before")
    buffer.add(" after")
    await buffer.close()
    assert buffer.rejected
    assert [e["type"] for e in await parts.log(job_id)][-1] == "completed"
    assert await parts.deltas(job_id) == ["before"]


# -- the tail hub and its followers -------------------------------------------------------------


async def follow_all(parts: Parts, job_id: str, after: str | None = None) -> list[dict[str, Any]]:
    follower = JobFollower(parts.store, parts.hub, job_id, after, idle_s=30)  # no idle rescue
    return [json.loads(e.raw) async for e in follower.entries()]


async def xread_connections(client: aioredis.Redis) -> int:
    return sum(1 for c in await client.client_list() if c.get("cmd") == "xread")


async def test_the_hub_serves_many_followers_on_one_reader(
    parts: Parts, clients: tuple[aioredis.Redis, aioredis.Redis]
) -> None:
    jobs = [await parts.running_job() for _ in range(20)]
    followers = [
        asyncio.create_task(follow_all(parts, job_id)) for job_id in jobs for _ in range(3)
    ]
    await async_wait_until(lambda: _followed(parts, len(jobs)))
    assert await xread_connections(clients[0]) <= 1  # one blocked read for all 60 followers
    buffers = [parts.writer.buffer(j) for j in jobs]
    for word in ("alpha", " beta", " gamma"):
        for buffer in buffers:
            buffer.add(word)
        await asyncio.gather(*(b.close() for b in buffers))
    for job_id in jobs:
        await parts.complete(job_id, "alpha beta gamma")
    seen = await asyncio.wait_for(asyncio.gather(*followers), 10)
    for index, events in enumerate(seen):
        job_id = jobs[index // 3]
        assert events == await parts.log(job_id)  # each entry once, in order, to the end
        assert "".join(e["text"] for e in events if e["type"] == "delta") == "alpha beta gamma"
    assert parts.hub.followed == 0  # finished followers leave the hub


async def _followed(parts: Parts, count: int) -> bool:
    return parts.hub.followed == count and parts.hub.subscribers == count * 3


async def test_a_late_follower_and_a_resume_see_each_entry_once(parts: Parts) -> None:
    job_id = await parts.running_job()
    early = asyncio.create_task(follow_all(parts, job_id))
    await async_wait_until(lambda: _followed_by(parts, 1))
    buffer = parts.writer.buffer(job_id)
    buffer.add("one")
    await buffer.close()
    # joins a stream the hub already reads past: reads the gap itself
    late = asyncio.create_task(follow_all(parts, job_id))
    await async_wait_until(lambda: _followed_by(parts, 2))
    buffer.add(" two")
    await buffer.close()
    await parts.complete(job_id, "one two")
    log = await parts.log(job_id)
    assert await asyncio.wait_for(early, 5) == log
    assert await asyncio.wait_for(late, 5) == log
    entry_ids = [i for i, _ in await parts.store.read(job_id, None)]
    resumed = await follow_all(parts, job_id, after=entry_ids[2])
    assert resumed == log[3:]


async def _followed_by(parts: Parts, count: int) -> bool:
    return parts.hub.subscribers == count


async def test_a_slow_client_is_dropped_without_disturbing_others(parts: Parts) -> None:
    job_id = await parts.running_job()
    stalled = asyncio.Event()
    fast_bodies: list[bytes] = []
    slow_bodies: list[bytes] = []

    async def slow_send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message["body"]:
            slow_bodies.append(message["body"])
            if len(slow_bodies) > 1:  # the replay went out; then the client stopped reading:
                stalled.set()  # its write never ends
                await asyncio.Event().wait()

    async def fast_send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            fast_bodies.append(message["body"])

    async def never_disconnects() -> dict[str, Any]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    def serve(send: Any) -> tuple[JobFollower, asyncio.Task[None]]:
        follower = JobFollower(parts.store, parts.hub, job_id, None, idle_s=30)
        response = JobEventsResponse(follower, send_timeout_s=30)
        return follower, asyncio.create_task(response({}, never_disconnects, send))

    slow, slow_task = serve(slow_send)
    fast, fast_task = serve(fast_send)
    await async_wait_until(lambda: _followed_by(parts, 2))
    buffer = parts.writer.buffer(job_id)
    buffer.add("first")
    await buffer.close()
    await asyncio.wait_for(stalled.wait(), 5)
    text = "x" * 300
    for _ in range(20):  # 6 KB of text, past the 2 KB backlog a follower may hold
        buffer.add(text)
        await buffer.close()
    await parts.complete(job_id, "first" + text * 20)
    await asyncio.wait_for(fast_task, 5)  # the fast client got everything, to the end
    assert b"event: completed" in b"".join(fast_bodies)
    await asyncio.wait_for(slow_task, 5)  # the slow one was dropped, long before its 30 s
    assert slow.dropped
    assert not fast.dropped
    assert parts.hub.followed == 0


async def test_a_closed_follower_ends_at_once(parts: Parts) -> None:
    job_id = await parts.running_job()
    follower = JobFollower(parts.store, parts.hub, job_id, None, idle_s=30)
    task = asyncio.create_task(_drain(follower))
    await async_wait_until(lambda: _followed_by(parts, 1))
    follower.close()
    assert await asyncio.wait_for(task, 2) == 2  # queued, started; then closed, not after 30 s
    assert parts.hub.followed == 0


async def _drain(follower: JobFollower) -> int:
    return len([e async for e in follower.entries()])


async def test_a_failed_flush_fails_the_job_text_and_is_raised_on_close() -> None:
    # A Redis nobody listens on: the flush fails for real (nothing mocked)
    client = aioredis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5)
    writer = DeltaWriter(JobStore(client, AppKeys("dead"), retention_s=60), 10, 100)
    try:
        buffer = writer.buffer("job_x")
        buffer.add("text")
        with pytest.raises(UpstreamError):
            await asyncio.wait_for(buffer.close(), 20)
        assert buffer.error is not None
        assert not buffer.rejected
    finally:
        await writer.stop()
        await client.aclose()


# -- lazy timers: one per subscription / connection, not one per event ------------------------


async def _never_disconnects() -> dict[str, Any]:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


async def test_a_write_that_hangs_past_the_send_timeout_ends_the_stream(parts: Parts) -> None:
    job_id = await parts.running_job()
    bodies: list[bytes] = []

    async def hangs_on_the_second_write(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message["body"]:
            bodies.append(message["body"])
            if len(bodies) > 1:
                await asyncio.Event().wait()  # the client stopped reading

    follower = JobFollower(parts.store, parts.hub, job_id, None, idle_s=30)
    response = JobEventsResponse(follower, send_timeout_s=0.3)
    task = asyncio.create_task(response({}, _never_disconnects, hangs_on_the_second_write))
    await async_wait_until(lambda: _followed_by(parts, 1))
    buffer = parts.writer.buffer(job_id)
    buffer.add("stuck")
    await buffer.close()
    started = time.monotonic()
    await asyncio.wait_for(task, 5)  # cut off, not stuck for ever
    assert 0.2 <= time.monotonic() - started < 3
    assert len(bodies) == 2
    assert parts.hub.followed == 0


async def test_quick_writes_over_many_send_timeouts_are_never_cut_off(parts: Parts) -> None:
    """The lazy send timer fires while writes keep going: it must re-arm for the write in
    progress, not cut off a stream whose every write is quick."""
    job_id = await parts.running_job()
    bodies: list[bytes] = []

    async def slowish(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            bodies.append(message["body"])
            await asyncio.sleep(0.03)  # each write takes a while, far below the timeout

    follower = JobFollower(parts.store, parts.hub, job_id, None, idle_s=30)
    response = JobEventsResponse(follower, send_timeout_s=0.1)
    task = asyncio.create_task(response({}, _never_disconnects, slowish))
    await async_wait_until(lambda: _followed_by(parts, 1))
    buffer = parts.writer.buffer(job_id)
    deadline = time.monotonic() + 0.8  # eight send timeouts of steady writing
    sent = 0
    while time.monotonic() < deadline:
        buffer.add(f"w{sent} ")
        await buffer.close()
        sent += 1
        await asyncio.sleep(0.02)
    await parts.complete(job_id, "")
    await asyncio.wait_for(task, 5)
    joined = b"".join(bodies)
    assert b"event: completed" in joined  # the stream reached its end: never cut off
    assert all(f"w{i} ".encode() in joined for i in range(sent))


async def test_an_idle_wait_ends_after_its_interval_and_a_busy_one_never_does(
    parts: Parts,
) -> None:
    busy = parts.hub.subscribe("busy-stream", "0-0")
    idle = parts.hub.subscribe("idle-stream", "0-0")
    results: list[Any] = []

    async def pushes() -> None:
        for n in range(30):  # 0.6 s of entries, 20 ms apart: never 0.1 s without one
            busy.push([(f"{n + 1}-0", "x")], 1)
            await asyncio.sleep(0.02)

    async def takes() -> None:
        while len(results) < 30 and not any(r is None for r in results):
            rows = await busy.next(0.1)
            results.extend([None] if rows is None else rows)

    started = time.monotonic()
    assert await asyncio.wait_for(idle.next(0.2), 2) is None  # idle: ends after its interval
    assert 0.15 <= time.monotonic() - started < 1.5
    await asyncio.wait_for(asyncio.gather(pushes(), takes()), 5)
    assert None not in results
    assert len(results) == 30
    assert await asyncio.wait_for(busy.next(0.1), 2) is None  # and idle again once it stops
    parts.hub.unsubscribe(busy)
    parts.hub.unsubscribe(idle)


# -- this process's own deltas reach its followers without being read back ---------------------


@pytest.fixture
async def local(clients: tuple[aioredis.Redis, aioredis.Redis]) -> AsyncIterator[Parts]:
    """Parts whose delta writer hands its deltas to the hub (as in an app process)."""
    p = Parts(*clients, flush_ms=20)
    p.writer = DeltaWriter(p.store, 20, max_chars=1000, hub=p.hub)
    yield p
    await p.writer.stop()
    await p.hub.stop()


async def test_the_hub_takes_this_process_deltas_without_reading_them_back(local: Parts) -> None:
    jobs = [await local.running_job() for _ in range(20)]
    buffers = [local.writer.buffer(j) for j in jobs]  # the runs begin: their logs are local
    tasks = [asyncio.create_task(follow_all(local, j)) for j in jobs]
    await async_wait_until(lambda: _followed_by(local, len(jobs)))
    reads = local.hub.reads
    for n in range(30):
        for buffer in buffers:
            buffer.add(f" t{n}")
        await asyncio.sleep(0.005)  # a model's pace: the writer flushes every few tokens
    assert local.hub.reads - reads <= 1  # not one read per flush tick (30 ticks of 20 logs)
    for buffer in buffers:
        await buffer.close()  # the run ends: back to XREAD for what follows
    for job_id in jobs:
        await local.complete(job_id, "".join(f" t{n}" for n in range(30)))
    for job_id, task in zip(jobs, tasks, strict=True):
        events = await asyncio.wait_for(task, 10)
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        assert "".join(e["text"] for e in events if e["type"] == "delta") == "".join(
            f" t{n}" for n in range(30)
        )
        assert events[-1]["type"] == "completed"
        assert events == await local.log(job_id)  # exactly the log, each entry once


async def test_an_event_written_elsewhere_during_a_local_run_is_not_lost(local: Parts) -> None:
    """Another writer appends to the log between two of this process's deltas: the hub
    never reads it (the log is local), so the follower must notice the gap in ``seq``."""
    job_id = await local.running_job()
    buffer = local.writer.buffer(job_id)
    task = asyncio.create_task(follow_all(local, job_id))
    await async_wait_until(lambda: _followed_by(local, 1))
    buffer.add("a")  # a job's first text is written at once
    await async_wait_until(lambda: _has_deltas(local, job_id, 1))
    # written by someone else: not through this writer, so not handed to the hub
    assert await local.store.append(Progress(jobId=job_id, value=0.5), status="running")
    buffer.add(" b")
    await buffer.close()
    await local.complete(job_id, "a b")
    events = await asyncio.wait_for(task, 10)
    assert [e["type"] for e in events] == ["queued", "started", "delta", "progress", "delta",
                                           "completed"]  # fmt: skip
    assert [e["seq"] for e in events] == list(range(1, 7))


async def _has_deltas(parts: Parts, job_id: str, count: int) -> bool:
    return len(await parts.deltas(job_id)) >= count
