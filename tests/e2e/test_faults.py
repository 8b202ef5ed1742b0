"""Faults the app must answer promptly and cleanly: QStash down or hanging."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from helpers import ServerThread, wait_until
from system import PAID, System
from tierq.config import QueueSettings
from tierq.queues import QueueId

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def hanging_qstash() -> Iterator[ServerThread]:
    """A QStash that accepts connections and never answers."""

    async def hang(request: Request) -> Response:
        await asyncio.sleep(5)
        return JSONResponse({}, status_code=500)

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH"]
    server = ServerThread(Starlette(routes=[Route("/{path:path}", hang, methods=methods)]))
    yield server.start()
    server.stop()


def assert_nothing_left(system: System) -> None:
    k = system.keys
    assert system.slot_count(k.admission("q_paid_stream")) == 0
    assert system.slot_count(k.queue_slots("q_paid_stream")) == 0
    assert system.redis.hget(k.parked_counts, "q_paid_stream") in (None, b"0")
    assert system.redis.zcard(k.dispatching) == 0
    assert list(system.redis.scan_iter(match=k.job("*"))) == []


def submit_is_prompt_503(system: System, within_s: float) -> None:
    started = time.monotonic()
    res = system.submit(PAID)
    assert time.monotonic() - started < within_s
    assert res.status_code == 503, res.text
    assert res.headers["Retry-After"] == "2"
    assert res.json()["error"]["code"] == "unavailable"
    assert_nothing_left(system)
    chat = system.http.post(
        "/v1/chat/completions",
        json={"model": "sim", "messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": f"Bearer {PAID}"},
    )
    assert chat.status_code == 503
    assert chat.json()["error"]["code"] == "service_unavailable"
    started = time.monotonic()
    assert system.http.get("/readyz").status_code == 503
    assert time.monotonic() - started < within_s


def test_broker_down_is_a_prompt_503_that_leaves_nothing(
    make_system: Callable[..., System],
) -> None:
    system = make_system(qstash_timeout_s=1)
    system.broker.stop()
    submit_is_prompt_503(system, within_s=3)


def test_broker_hanging_is_a_503_after_the_timeout(
    make_system: Callable[..., System], hanging_qstash: ServerThread
) -> None:
    system = make_system(qstash_timeout_s=1, qstash_url=hanging_qstash.url)
    submit_is_prompt_503(system, within_s=4)


def test_admission_counts_the_jobs_that_exist(make_system: Callable[..., System]) -> None:
    queues = {q: QueueSettings(parallelism=1, admission_depth=3) for q in QueueId}
    system = make_system(queues=queues, admission_ttl_s=1.5, admission_sweep_s=0.3,
                         dispatch_reconcile_s=0.1)  # fmt: skip
    admin = {"Authorization": f"Bearer {system.settings.admin_token}"}
    assert system.http.post("/api/admin/queues/q_paid_stream/pause", headers=admin).is_success
    ids = [system.submit(PAID).json()["jobId"] for _ in range(3)]
    key = system.keys.admission("q_paid_stream")
    first_expiry = max(float(system.redis.zscore(key, job_id) or 0) for job_id in ids)

    def redis_ms() -> float:
        seconds, micros = system.redis.time()
        return seconds * 1000 + micros / 1000

    # the leases they were admitted with have run out; the jobs live on, parked, and so do
    # their admission slots (renewed by the sweep): the queue is still full
    wait_until(lambda: redis_ms() > first_expiry + 300)
    assert system.slot_count(key) == 3
    full = system.submit(PAID)
    assert (full.status_code, full.json()["error"]["code"]) == (429, "queue_full")
    # a job whose record vanished gives its slot back at the next sweep
    system.redis.delete(system.keys.job(ids[0]))
    wait_until(lambda: system.slot_count(key) == 2)
    assert system.submit(PAID).status_code == 202
