"""The job path on a real Redis Cluster: three masters of the same redis-server binary the rest
of the suite uses, formed with CLUSTER MEET + ADDSLOTS. The app runs on the cluster
(``redis_cluster``); the embedded broker keeps its own single-node Redis (the suite's).

Covered: submit → completed with a dense ``seq``; a user limit of 1 holds across the cluster
(two jobs of one user never run together, the second runs after the first); SSE resume with
``Last-Event-ID`` yields exactly the rest; cancelling a running job; the tail hub and delta
writer split by hash slot; where keys live (a job's keys in one slot, the scheduler's in one).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.cluster import RedisCluster
from redis.exceptions import MaxConnectionsError

from helpers import async_wait_until, wait_until
from system import FREE, PAID, System, start_system
from tierq.config import TierLimits
from tierq.contracts import Completed, Queued, Started
from tierq.embedded_cluster import EmbeddedCluster
from tierq.events.deltas import DeltaWriter
from tierq.events.hub import BLOCK_MS, TailHub, hash_tag
from tierq.events.log import JobStore
from tierq.events.sse import JobFollower
from tierq.keys import AppKeys
from tierq.queues import QueueId
from tierq.redis_cluster import cluster_client
from tierq.runtime import JOB_TAGS

pytestmark = pytest.mark.timeout(120)

HANG = {"fail": "hang"}
SLOW = {"tokens": 12, "token_latency_ms": 60}
TERMINAL = {"completed", "failed", "cancelled"}
PREFIX = "cl"
_n = itertools.count()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedCluster]:
    with EmbeddedCluster(tmp_path_factory.mktemp("cluster"), masters=3) as started:
        yield started


@pytest.fixture(scope="module")
def system(cluster: EmbeddedCluster, redis_url: str) -> Iterator[System]:
    """Broker on the suite's single-node Redis, app on the cluster; a free user may run one
    job at a time."""
    started = start_system(
        redis_url, prefix=PREFIX, app_redis_url=cluster.url, redis_cluster=True,
        user_limits=TierLimits(paid=8, free=1),
    )  # fmt: skip
    yield started
    started.close()


@pytest.fixture
def keys() -> AppKeys:
    return AppKeys(PREFIX, job_tags=JOB_TAGS)


def submit_ok(system: System, key: str = PAID, **job: Any) -> dict[str, Any]:
    res = system.submit(key, **job)
    assert res.status_code == 202, res.text
    reply: dict[str, Any] = res.json()
    return reply


def log_events(system: System, keys: AppKeys, job_id: str) -> list[dict[str, Any]]:
    return [json.loads(f[b"e"]) for _, f in system.redis.xrange(keys.job_events(job_id))]


def status(system: System, job_id: str, key: str = PAID) -> str:
    return str(system.job(job_id, key)["status"])


def test_the_cluster_has_three_masters_sharing_the_slots(system: System) -> None:
    client: Any = system.redis
    primaries = client.get_primaries()
    assert len(primaries) == 3
    info = client.cluster_info(target_nodes=RedisCluster.RANDOM)
    assert info["cluster_state"] == "ok"
    assert int(info["cluster_slots_assigned"]) == 16384


def test_a_job_completes_with_a_dense_seq(system: System, keys: AppKeys) -> None:
    job = submit_ok(system, input={"prompt": "hello cluster"})
    events = system.events(job["jobId"], job["eventsToken"])
    kinds = [e.event for e in events]
    assert kinds[0] == "queued"
    assert "started" in kinds
    assert kinds[-1] == "completed"
    assert [e.data["seq"] for e in events] == list(range(1, len(events) + 1))
    text = "".join(e.data["text"] for e in events if e.event == "delta")
    assert text == events[-1].data["result"]
    assert log_events(system, keys, job["jobId"]) == [e.data for e in events]
    assert system.job(job["jobId"])["status"] == "completed"


def test_a_jobs_keys_share_a_slot_and_the_schedulers_keys_share_one(
    system: System, keys: AppKeys
) -> None:
    job = submit_ok(system, input={"prompt": "where do my keys live", "simulate": HANG})
    job_id = job["jobId"]
    wait_until(lambda: status(system, job_id) == "running", timeout=20)  # holding its leases
    client: Any = system.redis

    def slot(key: str) -> int:
        return int(client.cluster_keyslot(key))  # the server's CLUSTER KEYSLOT

    assert client.exists(keys.job(job_id)) == 1
    assert client.exists(keys.job_events(job_id)) == 1
    assert slot(keys.job(job_id)) == slot(keys.job_events(job_id))
    # every key the app wrote, on every node: each job's keys in its job's slot, the
    # scheduler's all in one slot, the tail hub's wake-up streams each in the slot it wakes
    found = [k.decode() for k in client.scan_iter(match=f"{PREFIX}:*", count=1000)]
    sched = [k for k in found if k.startswith(keys.sched)]
    jobs = [k for k in found if k.startswith(f"{PREFIX}:job:")]
    wakes = [k for k in found if k.startswith(keys.tail_wake)]
    assert keys.job_events(job_id) in jobs
    assert keys.user_guard("dev-paid") in sched
    assert len({slot(k) for k in sched}) == 1
    for key in jobs:
        owner = key.removesuffix(":events").rsplit(":", 1)[1]
        assert slot(key) == slot(keys.job(owner)) == slot(keys.job_events(owner))
    for key in wakes:
        assert slot(key) == slot(hash_tag(key))
    named = [
        keys.model_guard("sim", "paid"),
        keys.user_guard("dev-free"),
        keys.queue_slots(QueueId.FREE_STREAM.value),
        keys.parked(QueueId.FREE_STREAM.value, "dev-free"),
        keys.admission(QueueId.PAID_STREAM.value),
        keys.user_pending(QueueId.PAID_STREAM.value, "dev-paid"),
        keys.dispatching,
    ]
    assert {slot(k) for k in named} == {slot(keys.sched)}
    # jobs spread over JOB_TAGS slots, on every node
    ids = [f"job_{i}" for i in range(2000)]
    assert len({client.keyslot(keys.job(i)) for i in ids}) == JOB_TAGS
    assert len({client.get_node_from_key(keys.job(i)).name for i in ids}) == 3
    res = system.http.delete(f"/api/jobs/{job_id}", headers={"Authorization": f"Bearer {PAID}"})
    assert res.status_code == 200, res.text
    wait_until(lambda: status(system, job_id) == "cancelled", timeout=10)


def test_a_user_limit_of_one_holds_on_the_cluster(system: System, keys: AppKeys) -> None:
    first = submit_ok(system, FREE, input={"prompt": "a", "simulate": SLOW})
    wait_until(lambda: status(system, first["jobId"], FREE) == "running", timeout=20)
    second = submit_ok(
        system, FREE, mode="free", experience="batch", input={"prompt": "b", "simulate": SLOW}
    )
    seen: list[set[str]] = []

    def both_ended() -> bool:
        # the second job is read before the first: "running" then "running" can only
        # mean both ran at the moment of the first read (the first started long ago and
        # was still running after it), whereas reading them the other way round would
        # see a hand-off that happens between the two reads as an overlap
        later = status(system, second["jobId"], FREE)
        earlier = status(system, first["jobId"], FREE)
        states = {earlier, later}
        seen.append(states)
        return states <= TERMINAL

    wait_until(both_ended, timeout=30)
    running_together = any(states == {"running"} for states in seen)
    assert not running_together
    one = system.events(first["jobId"], first["eventsToken"])
    two = system.events(second["jobId"], second["eventsToken"])
    assert one[-1].event == two[-1].event == "completed"
    assert [e.event for e in two][:2] == ["queued", "waiting"]
    assert two[1].data["guard"] == "user"
    started = next(e for e in two if e.event == "started").data["ts"]
    assert started >= one[-1].data["ts"]
    wait_until(lambda: system.slot_count(keys.user_guard("dev-free")) == 0, timeout=5)


def test_sse_resumes_after_last_event_id_with_exactly_the_rest(system: System) -> None:
    job = submit_ok(system, input={"prompt": "resume me", "simulate": SLOW})
    first = system.events(job["jobId"], job["eventsToken"], limit=4)  # live, mid-stream
    assert len(first) == 4
    rest = system.events(job["jobId"], job["eventsToken"], last_event_id=first[-1].id)
    everything = system.events(job["jobId"], job["eventsToken"])
    assert [e.id for e in first + rest] == [e.id for e in everything]
    assert [e.data for e in first + rest] == [e.data for e in everything]
    assert rest[-1].event == "completed"
    assert [e.data["seq"] for e in everything] == list(range(1, len(everything) + 1))


def test_many_streams_at_once_are_read_by_slot_and_written_by_slot(system: System) -> None:
    hub, writer = system.runtime.hub, system.runtime.deltas
    assert hub.cluster
    assert writer.cluster
    calls, flushes = writer.calls, writer.flushes
    jobs = [submit_ok(system, input={"prompt": f"p{i}", "simulate": SLOW}) for i in range(8)]
    readers: list[int] = []

    def follow(job: dict[str, Any]) -> list[Any]:
        events = []
        for event in system.iter_events(job["jobId"], job["eventsToken"]):
            events.append(event)
            readers.append(hub.readers)
        return events

    with ThreadPoolExecutor(len(jobs)) as pool:
        streams = list(pool.map(follow, jobs))
    for events in streams:
        assert events[-1].event == "completed"
        assert [e.data["seq"] for e in events] == list(range(1, len(events) + 1))
    assert max(readers) >= 2  # one blocked XREAD per slot followed, at once
    assert writer.calls - calls > writer.flushes - flushes  # ticks split into calls by slot
    wait_until(lambda: hub.followed == 0, timeout=5)


def test_cancel_of_a_running_job_ends_cancelled_through_pub_sub(system: System) -> None:
    job = submit_ok(system, input={"prompt": "hang", "simulate": HANG})
    job_id = job["jobId"]
    wait_until(lambda: status(system, job_id) == "running", timeout=20)
    res = system.http.delete(f"/api/jobs/{job_id}", headers={"Authorization": f"Bearer {PAID}"})
    assert res.status_code == 200, res.text
    assert res.json()["status"] == "cancelling"
    # the signal is a PUBLISH from the job's node, which a cluster relays to every node (the
    # subscription is on one of them);
    # the flag poll (the safety net) would take heartbeat_s (10 s)
    wait_until(lambda: status(system, job_id) == "cancelled", timeout=3)
    events = system.events(job_id, job["eventsToken"])
    assert events[-1].event == "cancelled"
    assert [e.data["seq"] for e in events] == list(range(1, len(events) + 1))


def test_the_broker_keeps_its_own_single_node_redis(system: System, redis_url: str) -> None:
    single = redis.Redis.from_url(redis_url)
    try:
        assert single.info("cluster")["cluster_enabled"] == 0
        assert any(True for _ in single.scan_iter(match=f"{PREFIX}b:*", count=1000))
    finally:
        single.close()


# -- the tail hub and the delta writer on the cluster, without the app -------------------------


@pytest.fixture
async def clients(cluster: EmbeddedCluster) -> AsyncIterator[tuple[aioredis.Redis, aioredis.Redis]]:
    commands = cluster_client(cluster.url, permits=16)
    tails = cluster_client(cluster.url, max_connections=JOB_TAGS + 2)
    yield commands, tails
    await commands.aclose()
    await tails.aclose()


class Parts:
    """A job store, delta writer and tail hub on the cluster, like one app process's."""

    def __init__(self, commands: aioredis.Redis, tails: aioredis.Redis) -> None:
        self.keys = AppKeys(f"clp{next(_n)}", job_tags=JOB_TAGS)
        self.store = JobStore(commands, self.keys, retention_s=60)
        self.writer = DeltaWriter(self.store, 20, max_chars=1000, cluster=True)
        self.hub = TailHub(tails, commands, self.keys.tail_wake, 1 << 20, cluster=True)

    def job_ids(self, count: int, *, same_slot_as: str | None = None) -> list[str]:
        """Fresh job ids: in one slot (``same_slot_as``'s) or each in a slot of its own."""
        out: list[str] = []
        tags = {self.keys.job_tag(same_slot_as)} if same_slot_as else set()
        while len(out) < count:
            job_id = f"job_{next(_n)}"
            tag = self.keys.job_tag(job_id)
            if (same_slot_as and tag in tags) or (not same_slot_as and tag not in tags):
                out.append(job_id)
                tags.add(tag)
        return out

    async def start(self, job_id: str) -> None:
        queued = Queued(jobId=job_id, queueId=QueueId.PAID_STREAM, tier="paid")
        assert await self.store.create(job_id, {"userId": "u"}, queued)
        assert await self.store.append(Started(jobId=job_id), status="running")

    async def log(self, job_id: str) -> list[dict[str, Any]]:
        return [json.loads(raw) for _, raw in await self.store.read(job_id, None, 10_000)]

    async def stop(self) -> None:
        await self.writer.stop()
        await self.hub.stop()


@pytest.fixture
async def parts(clients: tuple[aioredis.Redis, aioredis.Redis]) -> AsyncIterator[Parts]:
    made = Parts(*clients)
    yield made
    await made.stop()


async def follow_all(parts: Parts, job_id: str) -> list[dict[str, Any]]:
    follower = JobFollower(parts.store, parts.hub, job_id, None, idle_s=30)
    return [json.loads(e.raw) async for e in follower.entries()]


async def test_one_tick_for_jobs_of_many_slots_is_one_pipelined_call_per_slot(
    parts: Parts, clients: tuple[aioredis.Redis, aioredis.Redis]
) -> None:
    jobs = parts.job_ids(12)
    for job_id in jobs:
        await parts.start(job_id)
    ended = jobs[-1]
    assert await parts.store.append(Completed(jobId=ended, result=""), status="completed")
    buffers = [parts.writer.buffer(j) for j in jobs]
    flushes, calls = parts.writer.flushes, parts.writer.calls
    for buffer in buffers:
        buffer.add("one")
    await asyncio.gather(*(b.close() for b in buffers))
    assert parts.writer.flushes == flushes + 1  # one tick
    assert parts.writer.calls == calls + len(jobs)  # one script call per slot
    assert buffers[-1].rejected  # the ended job's text is refused, the others' written
    assert not any(b.rejected for b in buffers[:-1])
    # one primary forgets the script (restarted, failed over): its slots' calls are sent
    # again once it is loaded; the other nodes' calls ran and are not sent twice
    cluster: Any = clients[0]
    nodes = {cluster.get_node_from_key(parts.keys.job(j)).name for j in jobs[:-1]}
    assert len(nodes) == 3
    forgetful = cluster.get_node_from_key(parts.keys.job(jobs[0]))
    await cluster.execute_command("SCRIPT", "FLUSH", target_nodes=forgetful)
    for buffer in buffers[:-1]:
        buffer.add(" two")
        buffer.add(" three")
    await asyncio.gather(*(b.close() for b in buffers[:-1]))
    for job_id in jobs[:-1]:
        events = await parts.log(job_id)
        assert [e["text"] for e in events if e["type"] == "delta"] == ["one", " two three"]
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))


async def test_the_hub_reads_once_per_slot_and_wakes_a_blocked_read_for_a_new_stream(
    parts: Parts,
) -> None:
    first, same = parts.job_ids(2, same_slot_as=parts.job_ids(1)[0])[:2]
    other = next(j for j in parts.job_ids(4) if parts.keys.job_tag(j) != parts.keys.job_tag(first))
    for job_id in (first, same, other):
        await parts.start(job_id)
    one = asyncio.create_task(follow_all(parts, first))
    await async_wait_until(lambda: _is(parts.hub.readers == 1 and parts.hub.followed == 1))
    # that slot's read is sent and blocked (its stream has nothing new)
    await async_wait_until(lambda: _is(any(r.reading for r in parts.hub._readers.values())))
    reads = parts.hub.reads
    # a stream of the same slot joins while that slot's read is blocked: the read is woken
    # through the slot's own wake-up stream and the next one covers both, far within BLOCK_MS
    started = time.monotonic()
    two = asyncio.create_task(follow_all(parts, same))
    three = asyncio.create_task(follow_all(parts, other))
    await async_wait_until(lambda: _is(parts.hub.followed == 3))
    await async_wait_until(lambda: _is(parts.hub.readers == 2))  # one per slot
    for job_id in (first, same, other):
        buffer = parts.writer.buffer(job_id)
        buffer.add(f"text of {job_id}")
        await buffer.close()
        assert await parts.store.append(
            Completed(jobId=job_id, result=f"text of {job_id}"), status="completed"
        )
    seen = await asyncio.wait_for(asyncio.gather(one, two, three), 10)
    assert time.monotonic() - started < BLOCK_MS / 1000
    assert parts.hub.reads > reads
    for job_id, events in zip((first, same, other), seen, strict=True):
        assert events == await parts.log(job_id)
        assert events[-1]["type"] == "completed"
    assert parts.hub.followed == 0


async def _is(value: bool) -> bool:
    return value


async def test_cluster_commands_wait_for_a_permit_instead_of_failing(
    cluster: EmbeddedCluster,
) -> None:
    """redis-py's cluster client fails past ``max_connections`` on a node; tierq's waits for
    a permit (``redis_max_connections``), as the single-node pool waits for a connection."""
    keys = [f"{{gate}}:{i}" for i in range(40)]  # one node: the worst case
    plain = aioredis.RedisCluster.from_url(cluster.url, max_connections=4)
    gated = cluster_client(cluster.url, permits=4, wait_s=10)
    impatient = cluster_client(cluster.url, permits=1, wait_s=0.05)
    try:
        replies = await asyncio.gather(
            *(plain.blpop([k], timeout=0.05) for k in keys), return_exceptions=True
        )
        assert any(isinstance(r, MaxConnectionsError) for r in replies)
        assert await asyncio.gather(*(gated.blpop([k], timeout=0.05) for k in keys)) == [
            None
        ] * len(keys)
        pipe = gated.pipeline(transaction=False)
        for key in keys:
            pipe.rpush(key, "x")
        assert await pipe.execute() == [1] * len(keys)
        assert await gated.delete(*keys) == len(keys)  # split by slot inside: no deadlock
        held = asyncio.create_task(impatient.blpop(["{gate}:held"], timeout=1))
        await async_wait_until(lambda: _is(impatient.gate is not None and _busy(impatient)))
        with pytest.raises(MaxConnectionsError):
            await impatient.get("{gate}:other")
        await held
    finally:
        for client in (plain, gated, impatient):
            await client.aclose()


def _busy(client: Any) -> bool:
    return bool(client.gate._sem.locked())
