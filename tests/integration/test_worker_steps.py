"""The Redis-touching worker steps one by one (guard, execute, record, cleanup), on real Redis."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from tierq.config import ModelSettings, Settings, TierLimits
from tierq.contracts import Delta, JobInput, Queued, Simulate, WorkerBody, parse_event
from tierq.queues import QueueId
from tierq.runtime import Runtime, build_runtime
from tierq.worker.result import Err, Ok
from tierq.worker.steps.cleanup import cleanup
from tierq.worker.steps.events import record
from tierq.worker.steps.execute import Outcome, execute
from tierq.worker.steps.guard import guard

_n = itertools.count()


@pytest.fixture
async def rt(redis_url: str) -> AsyncIterator[Runtime]:
    settings = Settings(
        redis_url=redis_url,
        key_prefix=f"steps{next(_n)}",
        models={"sim": ModelSettings(limits=TierLimits(paid=1, free=1), timeout_s=0.5)},
        guard_retry_after_s=4,
    ).with_dev_defaults()
    client = aioredis.Redis.from_url(redis_url)
    runtime = build_runtime(settings, client)
    await runtime.cancels.start()
    yield runtime
    await runtime.aclose_streams()
    await runtime.cancels.stop()
    await runtime.gateway.aclose()
    await client.aclose()


async def new_job(rt: Runtime, simulate: dict[str, Any] | None = None) -> WorkerBody:
    job_id = f"job_{next(_n)}"
    body = WorkerBody(
        jobId=job_id, userId="dev-paid", plan="paid", tier="paid", queueId=QueueId.PAID_STREAM,
        modelId="sim", service="chat", experience="stream",
        input=JobInput(prompt="hello", simulate=Simulate(**simulate) if simulate else None),
        submittedAt=0, maxRetries=2,
    )  # fmt: skip
    queued = Queued(jobId=job_id, queueId=QueueId.PAID_STREAM, tier="paid")
    assert await rt.jobs.create(job_id, {"userId": "dev-paid"}, queued)
    return body


async def event_types(rt: Runtime, job_id: str) -> list[str]:
    return [parse_event(raw).type for _, raw in await rt.jobs.read(job_id, None)]


async def has_waiting(rt: Runtime, job_id: str) -> bool:
    return "waiting" in await event_types(rt, job_id)


def raw(body: WorkerBody) -> bytes:
    return body.model_dump_json(by_alias=True).encode()


async def test_guard_takes_queue_user_and_model_leases(rt: Runtime) -> None:
    body = await new_job(rt)
    result = await guard(rt, body, raw(body), "msg_1")
    assert isinstance(result, Ok)
    assert result.value == [
        (rt.keys.queue_slots(body.queue_id.value), body.job_id),
        (rt.keys.user_guard("dev-paid"), body.job_id),
        (rt.keys.model_guard("sim", "paid"), body.job_id),
    ]
    assert await event_types(rt, body.job_id) == ["queued"]  # no wait, no waiting event


async def test_guard_finds_the_leases_dispatch_took(rt: Runtime) -> None:
    body = await new_job(rt)
    args = rt.dispatcher.park_args(body, raw(body), body.job_id)
    reply = await rt.dispatcher.call_script("park", args)  # dispatched (not published here)
    assert reply[2::3] == [body.job_id.encode()]
    model_key = rt.keys.model_guard("sim", "paid")
    assert not (await rt.leases.acquire(model_key, "other-job", 1, 30)).acquired  # it is full
    result = await guard(rt, body, raw(body), "msg_1")
    assert isinstance(result, Ok)
    assert await rt.leases.holders(model_key) == [body.job_id]


async def test_full_guard_parks_the_job_again_holding_nothing(rt: Runtime) -> None:
    model_key = rt.keys.model_guard("sim", "paid")
    assert (await rt.leases.acquire(model_key, "other-job", 1, 30)).acquired
    body = await new_job(rt)
    result = await guard(rt, body, raw(body), "msg_1")
    assert isinstance(result, Err)
    assert (result.error.status, result.error.body) == (200, {"status": "parked", "guard": "model"})
    assert await event_types(rt, body.job_id) == ["queued", "waiting"]
    waiting = parse_event((await rt.jobs.read(body.job_id, None))[-1][1])
    assert waiting.model_dump(include={"guard", "position"}) == {"guard": "model", "position": 0}
    assert await rt.leases.holders(rt.keys.user_guard("dev-paid")) == []
    assert await rt.leases.holders(model_key) == ["other-job"]
    parked = rt.keys.parked(body.queue_id.value, "dev-paid")
    assert await rt.redis.lrange(parked, 0, -1) == [body.job_id.encode()]
    state = await rt.jobs.state(body.job_id)
    assert state is not None
    assert state.status == "queued"


@pytest.mark.parametrize(
    ("simulate", "expected"),
    [
        ({"tokens": 3, "token_latency_ms": 0}, Outcome("completed")),
        ({"fail": "fatal"}, Outcome("failed", code="simulated_fatal", retryable=False)),
        ({"fail": "error", "tokens": 4}, Outcome("failed", code="simulated_error", retryable=True)),
        ({"fail": "exception"}, Outcome("failed", code="internal_error", retryable=True)),
        ({"fail": "hang"}, Outcome("failed", code="timeout", retryable=True)),
    ],
)
async def test_execute_outcomes(rt: Runtime, simulate: dict[str, Any], expected: Outcome) -> None:
    body = await new_job(rt, simulate)
    outcome = await execute(rt, body, 0, asyncio.Event())
    assert (outcome.kind, outcome.code, outcome.retryable) == (
        expected.kind, expected.code, expected.retryable,
    )  # fmt: skip
    events = [parse_event(raw) for _, raw in await rt.jobs.read(body.job_id, None)]
    text = "".join(e.text for e in events if isinstance(e, Delta))  # deltas coalesce
    words = {"completed": 3, "simulated_error": 2}.get(outcome.code or outcome.kind, 0)
    assert len(text.split()) == words
    if outcome.kind == "completed":
        assert text == outcome.result


async def test_execute_stops_within_100ms_of_cancel(rt: Runtime) -> None:
    body = await new_job(rt, {"fail": "hang"})
    cancel = asyncio.Event()
    task = asyncio.create_task(execute(rt, body, 0, cancel))
    await asyncio.sleep(0.05)  # let the model start hanging
    started = time.monotonic()
    cancel.set()
    outcome = await asyncio.wait_for(task, 2)
    assert outcome.kind == "cancelled"
    assert time.monotonic() - started < 0.1


@pytest.mark.parametrize(
    ("outcome", "attempt", "status", "event", "terminal"),
    [
        (Outcome("completed", result="r"), 0, 200, "completed", True),
        (Outcome("cancelled"), 0, 200, "cancelled", True),
        (Outcome("failed", code="x", retryable=True), 0, 500, "failed", False),
        (Outcome("failed", code="x", retryable=True), 2, 500, "failed", True),
        (Outcome("failed", code="x", retryable=False), 0, 489, "failed", True),
    ],
)
async def test_record(
    rt: Runtime, outcome: Outcome, attempt: int, status: int, event: str, terminal: bool
) -> None:
    body = await new_job(rt)
    reply, finished = await record(rt, body, outcome, attempt, "msg_1")
    assert reply.status == status
    assert finished is terminal
    assert (await event_types(rt, body.job_id))[-1] == event
    state = await rt.jobs.state(body.job_id)
    assert state is not None
    assert state.terminal is terminal
    assert (state.terminal_seq is not None) is terminal
    if status == 489:
        assert reply.headers["Upstash-NonRetryable-Error"] == "true"


async def test_terminal_event_is_never_written_twice(rt: Runtime) -> None:
    body = await new_job(rt)
    await record(rt, body, Outcome("completed", result="r"), 0, "msg_1")
    await record(rt, body, Outcome("completed", result="r"), 0, "msg_1")
    await record(rt, body, Outcome("cancelled"), 0, "msg_1")
    assert (await event_types(rt, body.job_id)).count("completed") == 1
    assert "cancelled" not in await event_types(rt, body.job_id)


@pytest.mark.parametrize("finished", [True, False])
async def test_cleanup_releases_leases_and_admission_when_finished(
    rt: Runtime, finished: bool
) -> None:
    body = await new_job(rt)
    admission = rt.keys.admission(body.queue_id.value)
    await rt.leases.acquire(admission, body.job_id, 10, 60)
    held = await guard(rt, body, raw(body), "msg_1")
    assert isinstance(held, Ok)
    await cleanup(rt, body, held.value, finished)
    assert await rt.leases.count(rt.keys.queue_slots(body.queue_id.value)) == 0
    assert await rt.leases.count(rt.keys.user_guard("dev-paid")) == 0
    assert await rt.leases.count(rt.keys.model_guard("sim", "paid")) == 0
    assert await rt.leases.count(admission) == (0 if finished else 1)
