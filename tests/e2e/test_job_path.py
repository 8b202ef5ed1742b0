"""The job path end to end: producer → named queue → unified worker → guards → SSE."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis
from qstash import QStash

from helpers import most_at_once
from system import DEV, FREE, PAID, System
from tierq.config import ModelSettings, QueueSettings, TierLimits
from tierq.queues import QueueId

SLOW = {"token_latency_ms": 60, "tokens": 5}


def types(events: list[Any]) -> list[str]:
    return [e.event for e in events]


def assert_job_sequence(events: list[Any], *, stream: bool) -> None:
    kinds = types(events)
    assert kinds[0] == "queued"
    assert kinds[-1] == "completed"
    assert "started" in kinds
    middle = kinds[kinds.index("started") + 1 : -1]
    if stream:
        assert middle
        assert set(middle) == {"delta"}
    else:
        assert middle == []
    assert [e.data["seq"] for e in events] == list(range(1, len(events) + 1))
    assert all(e.data["type"] == e.event for e in events)


@pytest.mark.parametrize(
    ("key", "mode", "queue", "tier"),
    [
        (PAID, "auto", "q_paid_stream", "paid"),
        (PAID, "paid", "q_paid_stream", "paid"),
        (PAID, "free", "q_free_stream", "free"),
        (FREE, "auto", "q_free_stream", "free"),
        (FREE, "free", "q_free_stream", "free"),
    ],
)
def test_three_state_sse(system: System, key: str, mode: str, queue: str, tier: str) -> None:
    res = system.submit(key, mode=mode)
    assert res.status_code == 202, res.text
    reply = res.json()
    assert reply["queueId"] == queue
    assert reply["tier"] == tier
    assert reply["eventsUrl"] == f"/api/jobs/{reply['jobId']}/events"
    events = system.events(reply["jobId"], reply["eventsToken"])
    assert_job_sequence(events, stream=True)
    assert events[0].data["queueId"] == queue
    completed = events[-1].data
    assert completed["result"] == "".join(e.data["text"] for e in events if e.event == "delta")
    job = system.job(reply["jobId"], key)
    assert job["status"] == "completed"
    assert job["result"] == completed["result"]


def test_paid_mode_needs_paid_plan(system: System) -> None:
    res = system.submit(FREE, mode="paid")
    assert res.status_code == 403
    assert res.json()["error"]["code"] == "plan_required"


@pytest.mark.parametrize("tier", ["paid", "free"])
@pytest.mark.parametrize(
    ("experience", "service", "route"),
    [
        ("stream", "chat", "/api/worker/stream/chat"),
        ("batch", "chat", "/api/worker/batch/chat"),
        ("vision", "describe", "/api/worker/batch/describe"),
    ],
)
def test_six_combinations_reach_their_route(
    system: System, tier: str, experience: str, service: str, route: str
) -> None:
    job_input: dict[str, Any] = {"prompt": "look"}
    if experience == "vision":
        job_input["images"] = ["data:image/png;base64,iVBORw0KGgo="]
    res = system.submit(PAID, mode=tier, experience=experience, service=service, input=job_input)
    assert res.status_code == 202, res.text
    reply = res.json()
    assert reply["queueId"] == f"q_{tier}_{experience}"
    events = system.events(reply["jobId"], reply["eventsToken"])
    assert_job_sequence(events, stream=experience == "stream")
    qstash = QStash(DEV.token, base_url=system.broker.url)
    try:
        message_id = system.job(reply["jobId"])["jobId"] and system.redis.hget(
            system.keys.job(reply["jobId"]), "messageId"
        )
        assert message_id is not None
        logs = qstash.log.list(filter={"message_ids": [message_id.decode()]}).logs
    finally:
        qstash.http._client.close()
    delivered = [log for log in logs if log.state.value == "DELIVERED"]
    assert len(delivered) == 1
    assert delivered[0].url == system.settings.public_url + route
    assert delivered[0].queue == reply["queueId"]


def test_queue_parallelism_is_honoured(make_system: Callable[..., System]) -> None:
    queues = {q: QueueSettings(parallelism=1, admission_depth=100) for q in QueueId}
    queues[QueueId.PAID_BATCH] = QueueSettings(parallelism=3, admission_depth=100)
    system = make_system(
        queues=queues,
        user_limits=TierLimits(paid=50, free=50),
        models={"sim": ModelSettings(limits=TierLimits(paid=50, free=50))},
    )
    replies = [
        system.submit(PAID, experience="batch", input={"prompt": f"p{i}", "simulate": SLOW}).json()
        for i in range(9)
    ]
    intervals = []
    for reply in replies:
        events = system.events(reply["jobId"], reply["eventsToken"])
        by_type = {e.event: e.data["ts"] for e in events}
        intervals.append((by_type["started"], by_type["completed"]))
    assert most_at_once(intervals) == 3


def test_paused_queue_holds_jobs_until_resumed(held_system: System) -> None:
    system = held_system
    qstash = QStash(DEV.token, base_url=system.broker.url)
    try:
        qstash.queue.pause("q_paid_stream")
        replies = [system.submit(PAID).json() for _ in range(3)]
        other = system.submit(PAID, mode="free").json()
        system.events(other["jobId"], other["eventsToken"])  # another queue still flows
        assert all(system.job(r["jobId"])["status"] == "queued" for r in replies)
        assert qstash.queue.get("q_paid_stream").lag == 3
        qstash.queue.resume("q_paid_stream")
        for reply in replies:
            assert types(system.events(reply["jobId"], reply["eventsToken"]))[-1] == "completed"
    finally:
        qstash.http._client.close()


def test_publishes_that_may_wait_linger_and_go_out_together(held_system: System) -> None:
    """A publish whose answer may wait (a job already running here needs its message id only
    at its end) lingers for others: two made together go out in one request after the
    linger, and a publish that cannot wait takes the lingering ones along at once."""
    system = held_system
    gateway = system.runtime.gateway
    qstash = QStash(DEV.token, base_url=system.broker.url)
    qstash.queue.pause("q_free_vision")  # nothing published here is delivered
    qstash.http._client.close()  # type: ignore[attr-defined]
    url = system.settings.public_url.rstrip("/") + "/api/worker/batch/chat"

    async def publish(linger_s: float) -> str:
        return await gateway.publish_raw("q_free_vision", url, "{}", 0, linger_s=linger_s)

    async def together() -> tuple[int, int]:
        before = gateway.requests
        first = asyncio.ensure_future(publish(3600.0))  # would wait an hour
        await system.runtime.redis.ping()  # a round trip: a publish sent at once is out now
        second = asyncio.ensure_future(publish(3600.0))
        await publish(0)  # cannot wait: takes both along
        await asyncio.gather(first, second)
        taken = gateway.requests - before
        alone = gateway.requests
        await publish(0.01)  # nobody comes: it goes out on its own after its linger
        return taken, gateway.requests - alone

    assert system.app.loop is not None
    run = asyncio.run_coroutine_threadsafe(together(), system.app.loop)
    assert run.result(timeout=20) == (1, 1)


def test_submits_arriving_together_are_published_in_batches(held_system: System) -> None:
    system = held_system
    kinds = [("batch", "paid"), ("batch", "free"), ("stream", "paid"), ("stream", "free")] * 15
    qstash = QStash(DEV.token, base_url=system.broker.url)
    qstash.queue.pause("q_free_batch")  # shows each batched message went to its own queue

    def submit(kind: tuple[str, str]) -> Any:
        return system.submit(PAID, experience=kind[0], mode=kind[1])

    before = system.runtime.gateway.requests
    with ThreadPoolExecutor(max_workers=20) as pool:
        replies = list(pool.map(submit, kinds))
    assert [r.status_code for r in replies] == [202] * len(kinds)
    assert system.runtime.gateway.requests - before < len(kinds)  # some went out together
    jobs = [(kind, reply.json()) for kind, reply in zip(kinds, replies, strict=True)]
    for (experience, mode), job in jobs:
        assert job["queueId"] == f"q_{mode}_{experience}"
        if job["queueId"] != "q_free_batch":
            events = system.events(job["jobId"], job["eventsToken"])  # delivered, run once
            assert_job_sequence(events, stream=experience == "stream")
    held = [job for _, job in jobs if job["queueId"] == "q_free_batch"]
    assert {system.job(job["jobId"])["status"] for job in held} == {"queued"}
    qstash.queue.resume("q_free_batch")
    qstash.http._client.close()  # type: ignore[attr-defined]
    for job in held:
        assert_job_sequence(system.events(job["jobId"], job["eventsToken"]), stream=False)


def test_the_app_loads_its_scripts_before_the_first_request(
    redis_url: str, make_system: Callable[..., System]
) -> None:
    """A burst of first requests meets every script loaded: none is answered NOSCRIPT (each
    such caller would load the scripts and call again: round trips more for the first jobs)."""
    redis.Redis.from_url(redis_url).script_flush()
    system = make_system()
    rt = system.runtime
    scripts = [*rt.dispatcher._scripts.values(), *rt.jobs.scripts(), *rt.leases._scripts.values()]
    shas = [script.sha for script in [*scripts, rt.ledger.script]]
    assert all(system.redis.script_exists(*shas))
