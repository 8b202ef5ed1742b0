"""Model and user leases, admission backpressure, cleanup on every exit path, DLQ, crash."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from qstash import QStash

from helpers import wait_until
from system import DEV, FREE, PAID, System
from tierq.config import ModelSettings, QueueSettings, TierLimits, UserSettings
from tierq.queues import QueueId

HANG = {"fail": "hang"}
SLOW = {"token_latency_ms": 100, "tokens": 6}


def guard_keys(system: System) -> list[str]:
    k = system.keys
    return [
        k.model_guard("sim", "paid"),
        k.model_guard("sim", "free"),
        k.user_guard("dev-paid"),
        k.user_guard("dev-free"),
        *(k.queue_slots(q.value) for q in QueueId),
        *(k.admission(q.value) for q in QueueId),
        *(k.user_pending(q.value, user) for q in QueueId for user in ("dev-paid", "dev-free")),
    ]


def assert_no_slots_held(system: System) -> None:
    wait_until(lambda: all(system.slot_count(key) == 0 for key in guard_keys(system)), timeout=5)


def submit_ok(system: System, key: str = PAID, **job: Any) -> dict[str, Any]:
    res = system.submit(key, **job)
    assert res.status_code == 202, res.text
    reply: dict[str, Any] = res.json()
    return reply


def test_model_guard_full_makes_the_next_job_wait(make_system: Callable[..., System]) -> None:
    system = make_system(models={"sim": ModelSettings(limits=TierLimits(paid=1, free=1))})
    first = submit_ok(system, input={"prompt": "a", "simulate": SLOW})
    wait_until(lambda: system.job(first["jobId"])["status"] == "running")
    second = submit_ok(system, input={"prompt": "b"})
    events = system.events(second["jobId"], second["eventsToken"])
    kinds = [e.event for e in events]
    assert kinds[:2] == ["queued", "waiting"]
    assert events[1].data["guard"] == "model"
    assert kinds[-1] == "completed"
    first_done = system.events(first["jobId"], first["eventsToken"])[-1].data["ts"]
    second_started = next(e for e in events if e.event == "started").data["ts"]
    assert second_started >= first_done
    assert_no_slots_held(system)


def test_user_guard_full_makes_the_next_job_wait(make_system: Callable[..., System]) -> None:
    system = make_system(user_limits=TierLimits(paid=5, free=1))
    first = submit_ok(system, FREE, input={"prompt": "a", "simulate": SLOW})
    wait_until(lambda: system.job(first["jobId"], FREE)["status"] == "running")
    second = submit_ok(system, FREE, mode="free", experience="batch", input={"prompt": "b"})
    events = system.events(second["jobId"], second["eventsToken"])
    assert [e.event for e in events][:2] == ["queued", "waiting"]
    assert events[1].data["guard"] == "user"
    assert events[-1].event == "completed"
    assert_no_slots_held(system)


def test_a_full_guard_never_spends_a_retry(make_system: Callable[..., System]) -> None:
    system = make_system(
        models={"sim": ModelSettings(limits=TierLimits(paid=1, free=1))}, qstash_retries=0
    )
    slow = {"token_latency_ms": 100, "tokens": 8}
    first = submit_ok(system, input={"prompt": "a", "simulate": slow})
    wait_until(lambda: system.job(first["jobId"])["status"] == "running")
    second = submit_ok(system, input={"prompt": "b"})
    events = system.events(second["jobId"], second["eventsToken"])
    kinds = [e.event for e in events]
    assert (kinds[:3], kinds[-1], kinds.count("waiting")) == (
        ["queued", "waiting", "started"], "completed", 1,
    )  # fmt: skip
    assert events[1].data["guard"] == "model"
    message_id = system.redis.hget(system.keys.job(second["jobId"]), "messageId")
    assert message_id is not None
    qstash = QStash(DEV.token, base_url=system.broker.url)
    try:
        logs = qstash.log.list(filter={"message_ids": [message_id.decode()]}).logs
    finally:
        qstash.http._client.close()
    states = {log.state.value for log in logs}
    assert "DELIVERED" in states
    assert "ERROR" not in states  # published when it could run: no 429, no retry
    assert_no_slots_held(system)


@pytest.mark.parametrize(
    ("simulate", "final"),
    [
        (None, "completed"),
        ({"fail": "fatal"}, "failed"),
        ({"fail": "exception"}, "failed"),
        ({"fail": "error"}, "failed"),
    ],
)
def test_slots_return_to_zero_after_each_outcome(
    make_system: Callable[..., System], simulate: dict[str, Any] | None, final: str
) -> None:
    system = make_system(qstash_retries=1)
    job_input: dict[str, Any] = {"prompt": "x"}
    if simulate:
        job_input["simulate"] = simulate
    reply = submit_ok(system, input=job_input)
    events = system.events(reply["jobId"], reply["eventsToken"])
    assert events[-1].event == final
    assert [e.event for e in events].count(final) == 1 or final == "failed"
    assert_no_slots_held(system)


def test_timeout_releases_slots(make_system: Callable[..., System]) -> None:
    system = make_system(qstash_retries=0, models={"sim": ModelSettings(timeout_s=0.5)})
    reply = submit_ok(system, input={"prompt": "x", "simulate": HANG})
    events = system.events(reply["jobId"], reply["eventsToken"])
    assert events[-1].event == "failed"
    assert events[-1].data["code"] == "timeout"
    assert_no_slots_held(system)


def test_cancel_running_job_stops_within_100ms_and_releases(system: System) -> None:
    reply = submit_ok(system, input={"prompt": "x", "simulate": HANG})
    job_id = reply["jobId"]
    wait_until(lambda: system.job(job_id)["status"] == "running")
    asked_ms = time.time() * 1000
    res = system.http.delete(f"/api/jobs/{job_id}", headers={"Authorization": f"Bearer {PAID}"})
    assert res.status_code == 200
    assert res.json()["status"] == "cancelling"
    events = system.events(job_id, reply["eventsToken"])
    assert events[-1].event == "cancelled"
    assert events[-1].data["ts"] - asked_ms < 100  # same machine, same clock
    assert_no_slots_held(system)
    assert system.job(job_id)["status"] == "cancelled"


def test_cancel_queued_job(held_system: System) -> None:
    system = held_system
    qstash = QStash(DEV.token, base_url=system.broker.url)
    try:
        qstash.queue.pause("q_paid_stream")
        reply = submit_ok(system)
        res = system.http.delete(
            f"/api/jobs/{reply['jobId']}", headers={"Authorization": f"Bearer {PAID}"}
        )
        assert res.json()["status"] == "cancelled"
        events = system.events(reply["jobId"], reply["eventsToken"])
        assert [e.event for e in events] == ["queued", "cancelled"]
        assert qstash.queue.get("q_paid_stream").lag == 0  # the QStash message was cancelled too
    finally:
        qstash.http._client.close()
    assert_no_slots_held(system)


def test_admission_full_answers_429_then_recovers(make_system: Callable[..., System]) -> None:
    queues = {q: QueueSettings(parallelism=1, admission_depth=2) for q in QueueId}
    system = make_system(queues=queues, admission_retry_after_s=3, local_start=False)
    qstash = QStash(DEV.token, base_url=system.broker.url)
    try:
        qstash.queue.pause("q_paid_stream")
        first, second = submit_ok(system), submit_ok(system)
        res = system.submit(PAID)
        assert res.status_code == 429
        assert res.headers["Retry-After"] == "3"
        assert res.json()["error"]["code"] == "queue_full"
        # parallelism 1: one job published (QStash holds it, paused), the other parked
        assert qstash.queue.get("q_paid_stream").lag == 1
        assert system.redis.hget(system.keys.parked_counts, "q_paid_stream") == b"1"
        qstash.queue.resume("q_paid_stream")
        for reply in (first, second):
            assert system.events(reply["jobId"], reply["eventsToken"])[-1].event == "completed"
        third = submit_ok(system)
        assert system.events(third["jobId"], third["eventsToken"])[-1].event == "completed"
    finally:
        qstash.http._client.close()


def test_failing_job_lands_in_dlq_and_completes_after_retry(
    make_system: Callable[..., System],
) -> None:
    system = make_system(qstash_retries=1)
    reply = submit_ok(
        system, input={"prompt": "x", "simulate": {"fail": "error", "fail_attempts": 2}}
    )
    events = system.events(reply["jobId"], reply["eventsToken"])
    assert events[-1].event == "failed"
    assert events[-1].data["retryable"] is False
    qstash = QStash(DEV.token, base_url=system.broker.url)
    try:
        entry = wait_until(lambda: qstash.dlq.list().messages)[0]
        assert entry.response_status == 500
        assert json.loads(entry.response_body)["error"]["code"] == "simulated_error"
        assert json.loads(entry.body)["jobId"] == reply["jobId"]
        with httpx.Client() as raw:
            res = raw.post(
                f"{system.broker.url}/v2/dlq/retry/{entry.dlq_id}",
                headers={"Authorization": f"Bearer {DEV.token}"},
            )
        assert res.status_code == 201
    finally:
        qstash.http._client.close()
    wait_until(lambda: system.job(reply["jobId"])["status"] == "completed")
    assert system.job(reply["jobId"])["result"]


def test_one_user_cannot_take_a_whole_queue(make_system: Callable[..., System]) -> None:
    other = "tq_test_free_2"
    keys = {FREE: UserSettings(id="dev-free", plan="free"),
            other: UserSettings(id="free-2", plan="free")}  # fmt: skip
    system = make_system(
        api_keys=keys, user_queue_limits=TierLimits(paid=5, free=2), local_start=False
    )
    qstash = QStash(DEV.token, base_url=system.broker.url)
    qstash.queue.pause("q_free_stream")  # jobs stay admitted, not finished
    try:
        mine = [submit_ok(system, FREE) for _ in range(2)]
        refused = system.submit(FREE)
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "user_queue_full"
        assert int(refused.headers["retry-after"]) >= 1
        theirs = submit_ok(system, other)  # another user of the same queue is not refused
        assert theirs["queueId"] == mine[0]["queueId"] == "q_free_stream"
        pending = system.keys.user_pending("q_free_stream", "dev-free")
        assert system.slot_count(pending) == 2  # nothing taken by the refused submit
        res = system.http.delete(
            f"/api/jobs/{mine[0]['jobId']}", headers={"Authorization": f"Bearer {FREE}"}
        )
        assert res.json()["status"] == "cancelled"
        assert system.slot_count(pending) == 1  # a cancelled queued job gives its share back
        again = submit_ok(system, FREE)
    finally:
        qstash.queue.resume("q_free_stream")
        qstash.http._client.close()  # type: ignore[attr-defined]
    for job in (mine[1], again, theirs):  # finishing gives the share back too
        assert system.events(job["jobId"], job["eventsToken"])[-1].event == "completed"
    wait_until(lambda: system.slot_count(pending) == 0, timeout=5)
    assert system.slot_count(system.keys.user_pending("q_free_stream", "free-2")) == 0
