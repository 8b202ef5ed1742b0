"""On Redis Cluster a job parked at admission can be dispatched by another process before its
submit has written its record (admit and record are two round trips there; on a single Redis
one script does both): its delivery must come back for it, not drop it. Run on a single Redis
with the submit told to record as on Cluster (``records_at_admission``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from helpers import wait_until
from system import PAID, System
from tierq.config import ModelSettings, TierLimits
from tierq.events.log import JobStore
from tierq.producer import submit

pytestmark = pytest.mark.timeout(60)

SLOW = "slow to record"


def test_a_job_dispatched_before_its_record_is_written_still_runs(
    make_system: Callable[..., System], monkeypatch: pytest.MonkeyPatch
) -> None:
    create = JobStore.create

    async def slow_create(self: JobStore, job_id: str, fields: Any, *args: Any) -> bool:
        if fields.get("userId") == "dev-paid" and SLOW in slow_jobs:
            slow_jobs.discard(SLOW)
            await asyncio.sleep(1.5)  # the first job's delivery ends meanwhile
        return await create(self, job_id, fields, *args)

    slow_jobs: set[str] = set()
    monkeypatch.setattr(submit, "records_at_admission", lambda settings: False)
    monkeypatch.setattr(JobStore, "create", slow_create)
    one = TierLimits(paid=1, free=1)
    system = make_system(
        user_limits=one, models={"sim": ModelSettings(limits=TierLimits(paid=4, free=1))}
    )
    first = system.submit(
        PAID, input={"prompt": "first", "simulate": {"tokens": 3, "token_latency_ms": 100}}
    )
    assert first.status_code == 202
    slow_jobs.add(SLOW)  # the next submit: admitted and parked (the user runs one job at once)
    second = system.submit(PAID, input={"prompt": SLOW, "simulate": {"tokens": 2}})
    assert second.status_code == 202, second.text
    job_id = second.json()["jobId"]
    # the first job's end dispatched the second while its record was not written: its first
    # delivery is told to come back (503, Retry-After 1), the next one runs it
    wait_until(lambda: system.job(job_id)["status"] == "completed", 20)
    assert system.metric("tierq_worker_deliveries_total", '{route="unified",status="503"}') >= 1
    events = system.log_events(job_id)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert [e["type"] for e in events][-1] == "completed"
    assert sum(e["type"] == "started" for e in events) == 1
