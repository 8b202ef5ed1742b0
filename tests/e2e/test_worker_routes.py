"""The worker routes as QStash sees them: signature checks, redelivery, bad bodies, legacy routes.

Each test takes a realistic delivery from the broker: the job is submitted while its queue is
paused, so the broker holds the message and the test delivers it itself, signed as QStash does.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from qstash import QStash

from helpers import wait_until
from system import DEV, PAID, System
from tierq.broker.server.signing import new_signing_key, sign
from tierq.config import ModelSettings, TierLimits
from tierq.contracts import WorkerBody

STREAM_ROUTE = "/api/worker/stream/chat"
BATCH_ROUTE = "/api/worker/batch/chat"
LEGACY_ROUTE = "/api/worker/paid/stream/chat"


@pytest.fixture
def system(held_system: System) -> System:
    """Deliveries here are made by hand: no local start runs the job first."""
    return held_system


@dataclass
class Delivery:
    job_id: str
    message_id: str
    body: bytes


def paused_delivery(system: System, queue: str = "q_paid_stream", **job: Any) -> Delivery:
    """Submit a job while its queue is paused and read its message (the exact body) back."""
    client = QStash(DEV.token, base_url=system.broker.url)
    try:
        client.queue.pause(queue)
        res = system.submit(PAID, **job)
        assert res.status_code == 202, res.text
        job_id = res.json()["jobId"]
        raw_id = system.redis.hget(system.keys.job(job_id), "messageId")
        assert raw_id is not None
        message_id = raw_id.decode()
        message = client.message.get(message_id)
    finally:
        client.http._client.close()  # type: ignore[attr-defined]
    assert message.body is not None
    body = message.body.encode()
    assert WorkerBody.model_validate_json(body).job_id == job_id
    return Delivery(job_id, message_id, body)


def signed_headers(
    system: System,
    path: str,
    body: bytes,
    message_id: str,
    *,
    key: str = DEV.current_key,
    retried: int = 0,
) -> dict[str, str]:
    url = system.settings.public_url.rstrip("/") + path
    return {
        "Upstash-Signature": sign(key, url, body, int(time.time())),
        "Upstash-Message-Id": message_id,
        "Upstash-Retried": str(retried),
        "Content-Type": "application/json",
    }


def deliver(system: System, path: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return system.http.post(path, content=body, headers=headers)


def snapshot(system: System, job_id: str) -> tuple[dict[bytes, bytes], list[Any], int, int]:
    """Everything a delivery could change: state record, event log, model and user leases."""
    k = system.keys
    return (
        system.redis.hgetall(k.job(job_id)),
        system.redis.xrange(k.job_events(job_id)),
        system.slot_count(k.model_guard("sim", "paid")),
        system.slot_count(k.user_guard("dev-paid")),
    )


def event_types(system: System, job_id: str) -> list[str]:
    entries = system.redis.xrange(system.keys.job_events(job_id))
    return [json.loads(fields[b"e"])["type"] for _, fields in entries]


def assert_error(res: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert res.status_code == status, res.text
    assert res.headers["content-type"].startswith("application/json")
    error: dict[str, Any] = res.json()["error"]
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    return error


# -- signatures -----------------------------------------------------------------------------


def bad_deliveries(system: System, d: Delivery, path: str) -> dict[str, dict[str, Any]]:
    """Deliveries to ``path`` that must be refused, each as keyword arguments of ``deliver``."""
    tampered = json.loads(d.body)
    tampered["input"]["prompt"] = "something else"
    tampered_body = json.dumps(tampered).encode()
    other_path = BATCH_ROUTE if path == STREAM_ROUTE else STREAM_ROUTE
    good = signed_headers(system, path, d.body, d.message_id)
    missing = {k: v for k, v in good.items() if k != "Upstash-Signature"}
    return {
        "wrong key": {
            "body": d.body,
            "headers": signed_headers(system, path, d.body, d.message_id, key=new_signing_key()),
        },
        "tampered body": {"body": tampered_body, "headers": good},
        "missing header": {"body": d.body, "headers": missing},
        "other url": {
            "body": d.body,
            "headers": signed_headers(system, other_path, d.body, d.message_id),
        },
        "other host": {
            "body": d.body,
            "headers": {
                **good,
                "Upstash-Signature": sign(
                    DEV.current_key, "http://example.com" + path, d.body, int(time.time())
                ),
            },
        },
        "expired": {
            "body": d.body,
            "headers": {
                **good,
                "Upstash-Signature": sign(
                    DEV.current_key,
                    system.settings.public_url + path,
                    d.body,
                    int(time.time()) - 3600,
                ),
            },
        },
        "garbage": {"body": d.body, "headers": {**good, "Upstash-Signature": "not.a.jwt"}},
    }


def test_bad_signatures_are_refused_without_side_effects(system: System) -> None:
    d = paused_delivery(system)
    before = snapshot(system, d.job_id)
    assert before[2:] == (1, 1)  # the leases dispatch took when it published the job
    for name, request in bad_deliveries(system, d, STREAM_ROUTE).items():
        res = deliver(system, STREAM_ROUTE, **request)
        assert_error(res, 401, "bad_signature")
        assert snapshot(system, d.job_id) == before, name
    assert system.job(d.job_id)["status"] == "queued"
    assert event_types(system, d.job_id) == ["queued"]


def test_a_delivery_signed_with_the_next_key_is_accepted(system: System) -> None:
    d = paused_delivery(system, input={"prompt": "x", "simulate": {"tokens": 3}})
    headers = signed_headers(system, STREAM_ROUTE, d.body, d.message_id, key=DEV.next_key)
    res = deliver(system, STREAM_ROUTE, d.body, headers)
    assert res.status_code == 200, res.text
    assert res.json()["status"] == "completed"
    job = system.job(d.job_id)
    assert job["status"] == "completed"
    assert job["result"]
    assert event_types(system, d.job_id)[-1] == "completed"


def test_a_redelivered_message_does_not_run_the_job_again(system: System) -> None:
    d = paused_delivery(system, input={"prompt": "x", "simulate": {"tokens": 3}})
    headers = signed_headers(system, STREAM_ROUTE, d.body, d.message_id)
    first = deliver(system, STREAM_ROUTE, d.body, headers)
    assert first.status_code == 200, first.text
    kinds = event_types(system, d.job_id)
    assert kinds.count("completed") == 1
    state = system.job(d.job_id)
    assert state["status"] == "completed"
    for attempt in range(2):
        again = deliver(system, STREAM_ROUTE, d.body, headers)
        assert again.status_code == 200, (attempt, again.text)
        assert again.json()["status"] == "completed"
    assert event_types(system, d.job_id) == kinds
    assert system.job(d.job_id) == state
    assert snapshot(system, d.job_id)[2:] == (0, 0)


def test_a_delivery_without_leases_parks_its_job_again_when_full(
    make_system: Callable[..., System],
) -> None:
    system = make_system(
        local_start=False, models={"sim": ModelSettings(limits=TierLimits(paid=1, free=1))}
    )
    d = paused_delivery(system, input={"prompt": "x", "simulate": {"tokens": 2}})
    k = system.keys
    model = k.model_guard("sim", "paid")
    for key in (k.queue_slots("q_paid_stream"), k.user_guard("dev-paid"), model):
        assert system.redis.zrem(key, d.job_id) == 1  # its leases lapsed while QStash held it
    system.redis.zadd(model, {"other-job": time.time() * 1000 + 60_000})  # and the model filled
    headers = signed_headers(system, STREAM_ROUTE, d.body, d.message_id)
    res = deliver(system, STREAM_ROUTE, d.body, headers)
    assert res.status_code == 200, res.text
    assert res.json() == {"status": "parked", "guard": "model"}  # no 429: no retry spent
    assert event_types(system, d.job_id) == ["queued", "waiting"]
    assert system.redis.lrange(k.parked("q_paid_stream", "dev-paid"), 0, -1) == [d.job_id.encode()]
    assert snapshot(system, d.job_id)[2:] == (1, 0)  # it holds nothing
    system.redis.zrem(model, "other-job")  # room again: dispatch sends it (safety-net tick)
    wait_until(lambda: system.redis.hget(k.job(d.job_id), "messageId") != d.message_id.encode())
    client = QStash(DEV.token, base_url=system.broker.url)
    try:
        client.queue.resume("q_paid_stream")
    finally:
        client.http._client.close()  # type: ignore[attr-defined]
    wait_until(lambda: system.job(d.job_id)["status"] == "completed")
    kinds = event_types(system, d.job_id)
    assert (kinds.count("started"), kinds.count("completed")) == (1, 1)


def test_a_redelivery_while_the_job_runs_is_refused_with_retry_after(system: System) -> None:
    d = paused_delivery(
        system, input={"prompt": "x", "simulate": {"tokens": 20, "token_latency_ms": 50}}
    )
    headers = signed_headers(system, STREAM_ROUTE, d.body, d.message_id)

    def first_delivery() -> httpx.Response:
        with httpx.Client(base_url=system.app.url, timeout=30) as client:
            return client.post(STREAM_ROUTE, content=d.body, headers=headers)

    with ThreadPoolExecutor(max_workers=1) as pool:
        running = pool.submit(first_delivery)
        wait_until(lambda: system.job(d.job_id)["status"] == "running")
        again = deliver(system, STREAM_ROUTE, d.body, {**headers, "Upstash-Retried": "1"})
        assert_error(again, 429, "already_running")
        ttl = system.settings.lease_ttl_s  # back when the run would count as dead
        assert ttl - 2 <= int(again.headers["Retry-After"]) <= ttl + 1
        assert snapshot(system, d.job_id)[2:] == (1, 1)  # still one lease each, not two
        first = running.result(timeout=30)
    assert first.status_code == 200, first.text
    kinds = event_types(system, d.job_id)
    assert kinds.count("started") == 1
    assert kinds.count("completed") == 1
    wait_until(lambda: snapshot(system, d.job_id)[2:] == (0, 0), timeout=5)


# -- bodies that can never succeed ----------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [b'{"hello": "world"}', b"not json at all", b"[]", b""],
    ids=["other-json", "not-json", "array", "empty"],
)
def test_a_body_that_is_not_a_tierq_job_is_non_retryable(system: System, body: bytes) -> None:
    headers = signed_headers(system, STREAM_ROUTE, body, "msg_not_a_job")
    res = deliver(system, STREAM_ROUTE, body, headers)
    assert_error(res, 489, "invalid_body")
    assert res.headers["Upstash-NonRetryable-Error"] == "true"


def test_a_stream_job_on_the_batch_route_is_non_retryable(system: System) -> None:
    d = paused_delivery(system)
    before = snapshot(system, d.job_id)
    headers = signed_headers(system, BATCH_ROUTE, d.body, d.message_id)
    res = deliver(system, BATCH_ROUTE, d.body, headers)
    assert_error(res, 489, "wrong_route")
    assert res.headers["Upstash-NonRetryable-Error"] == "true"
    assert snapshot(system, d.job_id) == before


# -- legacy per-tier routes -----------------------------------------------------------------


def test_legacy_route_forwards_to_the_unified_handler(make_system: Callable[..., System]) -> None:
    system = make_system(local_start=False, legacy_routes="forward")
    d = paused_delivery(system, input={"prompt": "x", "simulate": {"tokens": 3}})
    headers = signed_headers(system, LEGACY_ROUTE, d.body, d.message_id)
    res = deliver(system, LEGACY_ROUTE, d.body, headers)
    assert res.status_code == 200, res.text
    assert res.json()["status"] == "completed"
    assert system.job(d.job_id)["status"] == "completed"
    kinds = event_types(system, d.job_id)
    assert kinds[0] == "queued"
    assert kinds[-1] == "completed"
    assert "delta" in kinds


def test_legacy_route_hint_names_the_unified_route(make_system: Callable[..., System]) -> None:
    system = make_system(local_start=False, legacy_routes="hint")
    d = paused_delivery(system)
    before = snapshot(system, d.job_id)
    headers = signed_headers(system, LEGACY_ROUTE, d.body, d.message_id)
    res = deliver(system, LEGACY_ROUTE, d.body, headers)
    error = assert_error(res, 410)
    assert STREAM_ROUTE in error["message"]
    assert snapshot(system, d.job_id) == before
    assert system.job(d.job_id)["status"] == "queued"


def test_legacy_route_off_is_absent(make_system: Callable[..., System]) -> None:
    system = make_system(local_start=False, legacy_routes="off")
    d = paused_delivery(system)
    before = snapshot(system, d.job_id)
    headers = signed_headers(system, LEGACY_ROUTE, d.body, d.message_id)
    res = deliver(system, LEGACY_ROUTE, d.body, headers)
    assert res.status_code == 404, res.text
    assert snapshot(system, d.job_id) == before
    # the unified route is still there
    unified = signed_headers(system, STREAM_ROUTE, d.body, d.message_id)
    assert deliver(system, STREAM_ROUTE, d.body, unified).status_code == 200


@pytest.mark.parametrize("mode", ["forward", "hint"])
def test_legacy_route_refuses_a_bad_signature(
    make_system: Callable[..., System], mode: str
) -> None:
    system = make_system(local_start=False, legacy_routes=mode)
    d = paused_delivery(system)
    before = snapshot(system, d.job_id)
    for name, request in bad_deliveries(system, d, LEGACY_ROUTE).items():
        res = deliver(system, LEGACY_ROUTE, **request)
        assert_error(res, 401, "bad_signature")
        assert snapshot(system, d.job_id) == before, name
    # signed for the unified route is not valid on the legacy one
    unified = signed_headers(system, STREAM_ROUTE, d.body, d.message_id)
    assert_error(deliver(system, LEGACY_ROUTE, d.body, unified), 401, "bad_signature")
    assert snapshot(system, d.job_id) == before


def test_concurrent_copies_of_one_delivery_run_the_job_once(system: System) -> None:
    d = paused_delivery(system, input={"prompt": "x", "simulate": {"tokens": 4}})
    headers = signed_headers(system, STREAM_ROUTE, d.body, d.message_id)
    with ThreadPoolExecutor(5) as pool:
        replies = list(pool.map(lambda _: deliver(system, STREAM_ROUTE, d.body, headers), range(5)))
    assert all(r.status_code in (200, 429) for r in replies), [r.text for r in replies]
    wait_until(lambda: system.job(d.job_id)["status"] == "completed")
    kinds = event_types(system, d.job_id)
    assert (kinds.count("started"), kinds.count("completed")) == (1, 1)


def test_a_forged_message_id_cannot_run_a_failed_job_again(system: System) -> None:
    d = paused_delivery(system, input={"prompt": "x", "simulate": {"fail": "fatal"}})
    first = deliver(system, STREAM_ROUTE, d.body, signed_headers(system, STREAM_ROUTE, d.body,
                                                                 d.message_id))  # fmt: skip
    assert first.status_code == 489
    kinds = event_types(system, d.job_id)
    forged = signed_headers(system, STREAM_ROUTE, d.body, "msg_forged_by_a_replay")
    again = deliver(system, STREAM_ROUTE, d.body, forged)
    assert (again.status_code, again.json()["status"]) == (200, "failed")
    assert event_types(system, d.job_id) == kinds  # no second run, no second terminal event


@pytest.mark.parametrize("retried", ["abc", "-1", "1e3", "0x1", "99999999"])
def test_a_malformed_retry_count_is_refused(system: System, retried: str) -> None:
    d = paused_delivery(system)
    headers = {
        **signed_headers(system, STREAM_ROUTE, d.body, d.message_id),
        "Upstash-Retried": retried,
    }
    res = deliver(system, STREAM_ROUTE, d.body, headers)
    assert res.status_code == 400
    assert res.json()["error"]["code"] == "bad_delivery"
    assert event_types(system, d.job_id) == ["queued"]


def test_a_forged_retry_count_does_not_end_a_job_early(make_system: Callable[..., System]) -> None:
    system = make_system(local_start=False, qstash_retries=3)
    d = paused_delivery(system, input={"prompt": "x", "simulate": {"fail": "error"}})
    headers = signed_headers(system, STREAM_ROUTE, d.body, d.message_id, retried=3)
    res = deliver(system, STREAM_ROUTE, d.body, headers)
    assert res.status_code == 500  # a retryable failure on the job's first run: QStash retries
    failed = [e for e in system.log_events(d.job_id) if e["type"] == "failed"]
    assert [e["retryable"] for e in failed] == [True]
    assert system.job(d.job_id)["status"] == "queued"


def test_a_dead_run_is_taken_over_despite_the_leases_dispatch_took(system: System) -> None:
    d = paused_delivery(system, input={"prompt": "x", "simulate": {"tokens": 2}})
    assert snapshot(system, d.job_id)[2:] == (1, 1)  # held by dispatch, for this delivery
    stale = int(time.time() * 1000) - int(system.settings.lease_ttl_s * 1000) - 1000
    # as a run that crashed: status running, its last beat older than a lease
    system.redis.hset(system.keys.job(d.job_id), mapping={"status": "running",
                                                          "startedAt": str(stale)})  # fmt: skip
    res = deliver(system, STREAM_ROUTE, d.body, signed_headers(system, STREAM_ROUTE, d.body,
                                                               d.message_id))  # fmt: skip
    assert res.status_code == 200, res.text
    assert system.job(d.job_id)["status"] == "completed"


def test_a_live_run_sends_the_redelivery_back_when_it_would_count_as_dead(system: System) -> None:
    d = paused_delivery(system)
    now = int(time.time() * 1000)
    system.redis.hset(system.keys.job(d.job_id), mapping={"status": "running",
                                                          "startedAt": str(now)})  # fmt: skip
    res = deliver(system, STREAM_ROUTE, d.body, signed_headers(system, STREAM_ROUTE, d.body,
                                                               d.message_id))  # fmt: skip
    assert res.status_code == 429
    assert res.json()["error"]["code"] == "already_running"
    ttl = system.settings.lease_ttl_s
    assert ttl - 2 <= int(res.headers["Retry-After"]) <= ttl + 1
