"""The fair dispatcher's scripts on a real Redis: who goes next, what holds a job, and that
nothing is stranded. (Publishing is covered end to end in tests/e2e/test_fair_dispatch.py.)"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from helpers import async_wait_until
from tierq.config import (
    ModelSettings,
    QueueSettings,
    ServiceSettings,
    Settings,
    TierLimits,
    UserOverride,
    UserSettings,
)
from tierq.contracts import JobInput, JobRequest, Queued, Waiting, WorkerBody, parse_event
from tierq.errors import UpstreamError
from tierq.producer import submit as submit_module
from tierq.producer.submit import submit
from tierq.queues import QueueId
from tierq.runtime import Runtime, build_runtime

pytestmark = pytest.mark.timeout(60)
_n = itertools.count()
Q = QueueId.PAID_BATCH


@pytest.fixture
async def make_rt(redis_url: str) -> AsyncIterator[Callable[..., Any]]:
    made: list[tuple[Runtime, aioredis.Redis]] = []

    async def make(parallelism: int = 1, **overrides: Any) -> Runtime:
        fields: dict[str, Any] = {
            "redis_url": redis_url,
            "key_prefix": f"disp{next(_n)}",
            "queues": {q: QueueSettings(parallelism=parallelism, admission_depth=1000)
                       for q in QueueId},
            "models": {"m1": ModelSettings(limits=TierLimits(paid=100, free=100)),
                       "m2": ModelSettings(limits=TierLimits(paid=100, free=100))},
            "user_limits": TierLimits(paid=100, free=100),
        }  # fmt: skip
        fields.update(overrides)
        settings = Settings(**fields).with_dev_defaults()
        client = aioredis.Redis.from_url(redis_url)
        rt = build_runtime(settings, client)
        made.append((rt, client))
        return rt

    yield make
    for rt, client in made:
        await rt.gateway.aclose()
        await client.aclose()


def job(user: str, name: str, model: str = "m1", queue: QueueId = Q) -> WorkerBody:
    return WorkerBody(
        jobId=name, userId=user, plan="paid", tier="paid", queueId=queue, modelId=model,
        service="chat", experience="batch", input=JobInput(prompt="p"), submittedAt=0,
        maxRetries=1,
    )  # fmt: skip


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def park(rt: Runtime, body: WorkerBody, front: bool = False) -> tuple[str, int, list[str]]:
    """Park one job; (what holds it or "" when dispatched, position, ids dispatched)."""
    raw = body.model_dump_json(by_alias=True)
    args = rt.dispatcher.park_args(body, raw, body.job_id, front)
    reply = await rt.dispatcher.call_script("park", args)
    return _s(reply[0]), int(reply[1]), [_s(x) for x in reply[2::3]]


async def release(rt: Runtime, body: WorkerBody) -> list[str]:
    key = rt.keys.model_guard(body.model_id, body.tier)
    args = [body.job_id, body.queue_id.value, body.user_id, key]
    return [_s(x) for x in (await rt.dispatcher.call_script("release", args))[::3]]


async def reconcile(rt: Runtime) -> list[str]:
    return [_s(x) for x in (await rt.dispatcher.call_script("reconcile", []))[::3]]


async def confirm(rt: Runtime, *job_ids: str) -> None:
    await rt.dispatcher.call_script("confirm", list(job_ids))


async def drain(rt: Runtime, bodies: dict[str, WorkerBody], running: list[str]) -> list[str]:
    """End the running job, one at a time, until nothing runs; the order jobs went out."""
    order: list[str] = []
    while running:
        done = running.pop(0)
        sent = await release(rt, bodies[done])
        await confirm(rt, *sent)
        order += sent
        running += sent
    return order


async def test_users_take_turns_and_keep_their_order(make_rt: Callable[..., Any]) -> None:
    rt = await make_rt()
    bodies = {f"{u}{i}": job(u, f"{u}{i}") for u in "abc" for i in range(1, 5)}
    running: list[str] = []
    for name in [f"{u}{i}" for u in "abc" for i in range(1, 5)]:  # a1..a4, then b, then c
        _, _, sent = await park(rt, bodies[name])
        running += sent
    assert running == ["a1"]  # one slot: the first job went out at once
    order = await drain(rt, bodies, running)
    assert order == ["a2", "b1", "c1", "a3", "b2", "c2", "a4", "b3", "c3", "b4", "c4"]


async def test_weight_three_gets_three_turns_for_one(make_rt: Callable[..., Any]) -> None:
    rt = await make_rt(user_overrides={"w": UserOverride(weight=3)})
    names = [f"w{i}" for i in range(1, 10)] + [f"u{i}" for i in range(1, 5)]
    bodies = {n: job(n[0], n) for n in names}
    running: list[str] = []
    for name in names:
        running += (await park(rt, bodies[name]))[2]
    order = await drain(rt, bodies, running)
    assert order[:12] == ["w2", "w3", "w4", "u1", "w5", "w6", "w7", "u2", "w8", "w9", "u3", "u4"]


async def test_a_full_model_holds_only_its_own_jobs(make_rt: Callable[..., Any]) -> None:
    models = {"m1": ModelSettings(limits=TierLimits(paid=1, free=1)),
              "m2": ModelSettings(limits=TierLimits(paid=5, free=5))}  # fmt: skip
    rt = await make_rt(parallelism=10, models=models)
    x = {n: job("a", n, model) for n, model in
         [("x1", "m1"), ("x2", "m1"), ("x3", "m2"), ("x4", "m1")]}  # fmt: skip
    assert (await park(rt, x["x1"]))[2] == ["x1"]
    reason, _, sent = await park(rt, x["x2"])
    assert (reason, sent) == ("model", [])
    assert (await park(rt, x["x3"]))[2] == ["x3"]  # same user, other model: not held back
    assert (await park(rt, x["x4"]))[0] == "model"
    other = job("b", "y1", "m2")
    assert (await park(rt, other))[2] == ["y1"]  # another user's job for another model
    assert await release(rt, x["x1"]) == ["x2"]  # and m1's own jobs stay in order


async def test_a_user_at_their_limit_holds_only_themselves(make_rt: Callable[..., Any]) -> None:
    rt = await make_rt(parallelism=10, user_limits=TierLimits(paid=1, free=1))
    assert (await park(rt, job("a", "a1")))[2] == ["a1"]
    reason, position, sent = await park(rt, job("a", "a2"))
    assert (reason, position, sent) == ("user", 0, [])
    assert (await park(rt, job("b", "b1")))[2] == ["b1"]
    assert await release(rt, job("a", "a1")) == ["a2"]


async def test_position_counts_the_jobs_that_go_first(make_rt: Callable[..., Any]) -> None:
    rt = await make_rt()
    assert (await park(rt, job("a", "a1")))[2] == ["a1"]
    assert (await park(rt, job("a", "a2")))[:2] == ("queue", 0)
    assert (await park(rt, job("b", "b1")))[:2] == ("queue", 1)  # a2 goes first
    assert (await park(rt, job("b", "b2")))[:2] == ("queue", 2)  # a2, b1
    assert (await park(rt, job("a", "a3")))[:2] == ("queue", 3)  # a2, b1, b2


async def test_paused_queue_sends_nothing_until_resumed(make_rt: Callable[..., Any]) -> None:
    rt = await make_rt(parallelism=4)
    await rt.redis.hset(rt.keys.queue_state(Q.value), "paused", "1")
    for name in ("a1", "a2", "b1"):
        reason, _, sent = await park(rt, job(name[0], name))
        assert (reason, sent) == ("paused", [])
    assert await reconcile(rt) == []
    await rt.redis.hset(rt.keys.queue_state(Q.value), "paused", "0")
    assert await reconcile(rt) == ["a1", "b1", "a2"]  # resumed: drained in fair order


async def test_operator_parallelism_wins_over_configuration(make_rt: Callable[..., Any]) -> None:
    rt = await make_rt(parallelism=1)
    await rt.redis.hset(rt.keys.queue_state(Q.value), "parallelism", "3")
    sent = [(await park(rt, job("a", f"a{i}")))[2] for i in range(1, 5)]
    assert sent == [["a1"], ["a2"], ["a3"], []]


async def test_unconfirmed_publish_goes_back_and_out_again(make_rt: Callable[..., Any]) -> None:
    rt = await make_rt(dispatch_confirm_s=0.3)
    a1, a2 = job("a", "a1"), job("a", "a2")
    assert (await park(rt, a1))[2] == ["a1"]  # dispatched; its publisher "dies" here
    assert (await park(rt, a2))[0] == "queue"
    slots = rt.keys.queue_slots(Q.value)
    assert await rt.redis.zrange(slots, 0, -1) == [b"a1"]

    async def sent_again() -> bool:
        return await reconcile(rt) == ["a1"]

    await async_wait_until(sent_again)  # back at the front of its line, out again
    assert await rt.redis.zrange(slots, 0, -1) == [b"a1"]  # one lease, not two
    await confirm(rt, "a1")
    assert await reconcile(rt) == []  # confirmed: never requeued
    assert await release(rt, a1) == ["a2"]


async def test_failed_publish_puts_the_job_back_first(make_rt: Callable[..., Any]) -> None:
    rt = await make_rt()
    a1, a2 = job("a", "a1"), job("a", "a2")
    assert (await park(rt, a1))[2] == ["a1"]
    await park(rt, a2)
    await rt.dispatcher.call_script("requeue", ["a1"])
    assert await rt.redis.zcard(rt.keys.queue_slots(Q.value)) == 0  # its leases came back
    assert await rt.redis.lrange(rt.keys.parked(Q.value, "a"), 0, -1) == [b"a1", b"a2"]
    assert await reconcile(rt) == ["a1"]


async def test_cancelled_parked_job_leaves_its_line(make_rt: Callable[..., Any]) -> None:
    rt = await make_rt()
    a1, a2 = job("a", "a1"), job("a", "a2")
    await park(rt, a1)
    await park(rt, a2)
    assert await release(rt, a2) == []  # cancel of a parked job: forgotten, nothing freed
    assert int(await rt.redis.hget(rt.keys.parked_counts, Q.value) or 0) == 0
    assert await release(rt, a1) == []


async def test_claim_keeps_dispatch_leases_or_parks_nothing(make_rt: Callable[..., Any]) -> None:
    models = {"m1": ModelSettings(limits=TierLimits(paid=1, free=1))}
    rt = await make_rt(parallelism=5, models=models)
    a1, b1 = job("a", "a1"), job("b", "b1")
    assert (await park(rt, a1))[2] == ["a1"]
    assert await rt.dispatcher.claim(a1) == "ok"  # its delivery finds the leases held
    assert await rt.dispatcher.claim(b1) == "model"  # a delivery without leases: model full
    assert await rt.redis.zrange(rt.keys.user_guard("b"), 0, -1) == []  # all or none


async def test_random_churn_strands_nothing(make_rt: Callable[..., Any]) -> None:
    """Many users, two models with small limits, parks and ends interleaved at random from
    concurrent tasks: every job goes out exactly once and every structure ends empty."""
    models = {"m1": ModelSettings(limits=TierLimits(paid=2, free=2)),
              "m2": ModelSettings(limits=TierLimits(paid=3, free=3))}  # fmt: skip
    rt = await make_rt(parallelism=4, models=models, user_limits=TierLimits(paid=2, free=2))
    rng = random.Random(7)
    bodies = {f"j{i}": job(f"u{rng.randrange(6)}", f"j{i}", rng.choice(["m1", "m2"]))
              for i in range(300)}  # fmt: skip
    sent: list[str] = []
    running: asyncio.Queue[str] = asyncio.Queue()

    async def publish(ids: list[str]) -> None:
        await confirm(rt, *ids)
        sent.extend(ids)
        for i in ids:
            running.put_nowait(i)

    async def producer() -> None:
        for body in bodies.values():
            await publish((await park(rt, body))[2])
            if rng.random() < 0.3:
                await asyncio.sleep(0)

    async def worker() -> None:
        while len(sent) < len(bodies) or not running.empty():
            try:
                name = await asyncio.wait_for(running.get(), 0.5)
            except TimeoutError:
                continue
            await publish(await release(rt, bodies[name]))

    await asyncio.wait_for(asyncio.gather(producer(), *(worker() for _ in range(4))), 50)
    assert sorted(sent) == sorted(bodies)  # each exactly once
    sched = rt.keys.sched
    leftovers = [_s(k) async for k in rt.redis.scan_iter(match=f"{sched}:*")]
    assert [k for k in leftovers if k != rt.keys.parked_counts] == []
    counts = await rt.redis.hgetall(rt.keys.parked_counts)
    assert all(int(v) == 0 for v in counts.values())


async def test_parked_jobs_hear_when_they_move_up(make_rt: Callable[..., Any]) -> None:
    rt = await make_rt()
    names = ["a1", "a2", "a3", "b1", "b2", "b3"]
    for name in names:
        job_id = name
        created = await rt.jobs.create(job_id, {"userId": name[0]}, Queued(
            jobId=job_id, queueId=Q, tier="paid"))  # fmt: skip
        assert created
        await park(rt, job(name[0], name))
    assert await rt.dispatcher.tell_positions(force=True) == 0  # nothing moved since parking
    await release(rt, job("a", "a1"))  # a2 goes out; everyone moves up by one
    await confirm(rt, "a2")
    told = await rt.dispatcher.tell_positions(force=True)
    positions = {}
    for name in names[2:]:
        events = [parse_event(raw) for _, raw in await rt.jobs.read(name, None)]
        positions[name] = [e.position for e in events if isinstance(e, Waiting)]
    # order when parked: a2 0, a3 1 (b1 was parked after it, and went before), b1 1, b2 3,
    # b3 4; now b1, a3, b2, b3: b1, b2 and b3 moved up by at least a fifth and are told;
    # a3 stays at 1
    assert positions == {"a3": [], "b1": [0], "b2": [2], "b3": [3]}
    assert told == 3
    assert await rt.dispatcher.tell_positions() >= 0  # takes the lock
    assert await rt.dispatcher.tell_positions() == 0  # within the interval: nobody else


async def test_admissions_in_flight_are_bounded_per_process(make_rt: Callable[..., Any]) -> None:
    """``admission_concurrency``: a burst of submits never has more admission round trips in
    flight than that (the others wait their turn), and every submit still gets through."""
    services = {"chat": ServiceSettings(experiences=["batch"], models=["m1"])}
    rt = await make_rt(admission_concurrency=2, services=services)
    await rt.dispatcher.set_queue(QueueId.PAID_BATCH.value, paused=True)  # parked: no publish
    admit = rt.dispatcher.admit
    in_flight, most = 0, 0

    async def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            await asyncio.sleep(0)  # let the others pile up behind the gate if they can
            return await admit(*args, **kwargs)
        finally:
            in_flight -= 1

    rt.dispatcher.admit = counted  # type: ignore[method-assign]
    user = UserSettings(id="u1", plan="paid")
    req = JobRequest(service="chat", experience="batch", mode="paid", model="m1",
                     input=JobInput(prompt="p"))  # fmt: skip
    replies = await asyncio.gather(*(submit(rt, user, req) for _ in range(12)))
    assert len({r.job_id for r in replies}) == 12
    assert most == 2
    stats = await rt.dispatcher.queue_stats(QueueId.PAID_BATCH.value)
    assert stats["parked"] == 12


async def test_a_pipeline_sends_again_only_what_redis_forgot(make_rt: Callable[..., Any]) -> None:
    """After Redis forgot the scripts (restart, failover, SCRIPT FLUSH), the commands it answered
    NOSCRIPT are sent again, and only they: a release that ran the first time keeps the jobs
    it dispatched (sent twice, it would dispatch nothing and they would sit unpublished)."""
    rt = await make_rt(models={"m1": ModelSettings(limits=TierLimits(paid=1, free=1))})
    a, b = job("u", "a"), job("u", "b")
    assert (await park(rt, a))[0] == ""  # dispatched: holds the model's one slot
    assert (await park(rt, b))[0] == "model"
    await rt.dispatcher.r.script_flush()
    for script in rt.dispatcher._scripts.values():  # dispatch's scripts back, the log's not
        await rt.dispatcher.r.script_load(script.script)
    release = [a.job_id, a.queue_id.value, a.user_id, rt.keys.model_guard("m1", "paid")]

    def build(pipe: Any) -> None:
        rt.jobs.queue_set_if_exists(pipe, a.job_id, {"note": "x"})  # NOSCRIPT: not run
        pipe.incr(f"{rt.keys.sched}:test-counter")  # runs once, whatever happens
        rt.dispatcher._queue_script(pipe, "release", release)  # runs, dispatches b

    replies = await rt.dispatcher.run_pipeline(build)
    assert [_s(x) for x in replies[-1][::3]] == ["b"]
    assert replies[1] == 1
    assert int(await rt.dispatcher.r.get(f"{rt.keys.sched}:test-counter")) == 1


async def _record(rt: Runtime, job_id: str) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """A job's state record and its events (``ts`` aside: when each was made)."""
    state = {_s(k): _s(v) for k, v in (await rt.redis.hgetall(rt.keys.job(job_id))).items()}
    rows = await rt.redis.xrange(rt.keys.job_events(job_id))
    events = [parse_event(_s(fields[b"e"])).model_dump(by_alias=True) for _, fields in rows]
    return state, [{k: v for k, v in e.items() if k != "ts"} for e in events]


@pytest.mark.parametrize("paused", [False, True], ids=["dispatched", "parked"])
async def test_the_admission_records_a_job_as_a_second_call_would(
    make_rt: Callable[..., Any], paused: bool
) -> None:
    """On a single Redis a submit's admission writes the job's record in the same script
    (``admit_record``): the record and first events (``queued``, then ``waiting`` for a parked
    job) are those ``create`` writes after a bare admission (on Cluster, the submit's second
    call)."""
    two_calls, one_call = await make_rt(), await make_rt()
    body = job("u1", "j1")
    raw = body.model_dump_json(by_alias=True)
    fields = {"userId": "u1", "queueId": Q.value, "createdAt": "5"}
    queued = Queued(jobId="j1", ts=5, queueId=Q, tier="paid")
    for rt in (two_calls, one_call):
        if paused:
            await rt.dispatcher.set_queue(Q.value, paused=True)
    first = await two_calls.dispatcher.admit(body, raw, depth=10, share=10)
    then = None if first.parked.dispatched else first.parked.event("j1")
    assert await two_calls.jobs.create("j1", fields, queued, then)
    record = one_call.jobs.record_args("j1", fields, queued, 5)
    second = await one_call.dispatcher.admit(body, raw, depth=10, share=10, record=record)
    assert (first.refused, first.parked) == (second.refused, second.parked)
    assert second.parked.reason == ("paused" if paused else "")
    assert await _record(one_call, "j1") == await _record(two_calls, "j1")
    state, events = await _record(one_call, "j1")
    assert state["status"] == "queued"
    assert [e["type"] for e in events] == (["queued", "waiting"] if paused else ["queued"])
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))


async def test_a_refused_admission_records_nothing(make_rt: Callable[..., Any]) -> None:
    rt = await make_rt()
    body = job("u1", "j1")
    queued = Queued(jobId="j1", ts=5, queueId=Q, tier="paid")
    record = rt.jobs.record_args("j1", {"userId": "u1"}, queued, 5)
    admission = await rt.dispatcher.admit(
        body, body.model_dump_json(by_alias=True), depth=10, share=0, record=record
    )
    assert admission.refused == "user"
    assert not await rt.redis.exists(rt.keys.job("j1"), rt.keys.job_events("j1"))


async def test_a_submit_admits_and_records_its_job_in_one_script_call(
    make_rt: Callable[..., Any],
) -> None:
    """A parked job's submit on a single Redis: one script call (admission, parking and its
    record), where it took two (the record in a call of its own)."""
    services = {"chat": ServiceSettings(experiences=["batch"], models=["m1"])}
    rt = await make_rt(services=services)
    await rt.dispatcher.set_queue(Q.value, paused=True)  # parked: nothing is published

    async def script_calls() -> int:
        stats = await rt.redis.info("commandstats")
        return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))

    user = UserSettings(id="u1", plan="paid")
    req = JobRequest(service="chat", experience="batch", mode="paid", model="m1",
                     input=JobInput(prompt="p"))  # fmt: skip
    await submit(rt, user, req)  # scripts loaded, anything once-only done
    before = await script_calls()
    reply = await submit(rt, user, req)
    assert await script_calls() - before == 1
    state, events = await _record(rt, reply.job_id)
    assert state["status"] == "queued"
    assert [e["type"] for e in events] == ["queued", "waiting"]


async def test_a_submit_whose_admission_answer_was_lost_takes_its_job_back(
    make_rt: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The admission's script ran (the job admitted and recorded) but its answer never came
    (Redis went away), and the undo fails too: the submit answers its error, and the undo goes
    on until Redis answers. A job whose client was told "not admitted" must not stay."""
    services = {"chat": ServiceSettings(experiences=["batch"], models=["m1"])}
    rt = await make_rt(services=services)
    await rt.dispatcher.set_queue(Q.value, paused=True)
    admit, delete = rt.dispatcher.admit, rt.jobs.delete
    down = True  # Redis refuses the undo's calls until the test says otherwise
    undos = 0

    async def answer_lost(*args: Any, **kwargs: Any) -> Any:
        await admit(*args, **kwargs)
        raise UpstreamError("redis: connection lost")

    async def delete_while_down(job_id: str) -> None:
        nonlocal undos
        undos += 1
        if down:
            raise UpstreamError("redis: connection refused")
        await delete(job_id)

    rt.dispatcher.admit = answer_lost  # type: ignore[method-assign]
    rt.jobs.delete = delete_while_down  # type: ignore[method-assign]
    monkeypatch.setattr(submit_module, "UNDO_RETRY_S", 0.01)
    user = UserSettings(id="u1", plan="paid")
    req = JobRequest(service="chat", experience="batch", mode="paid", model="m1",
                     input=JobInput(prompt="p"))  # fmt: skip
    with pytest.raises(UpstreamError):
        await submit(rt, user, req)
    [key] = [k async for k in rt.redis.scan_iter(match=rt.keys.job("*")) if b":events" not in k]
    await async_wait_until(lambda: asyncio.sleep(0, undos >= 3))  # tried again, and again
    assert await rt.redis.exists(key)  # still there while Redis is "down"
    down = False

    async def gone() -> bool:
        stats = await rt.dispatcher.queue_stats(Q.value)
        return not await rt.redis.exists(key) and stats["parked"] == 0

    await async_wait_until(gone)
