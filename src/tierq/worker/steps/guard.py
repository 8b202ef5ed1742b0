"""Step 3: take the user lease, then the model+tier lease, waiting (bounded) when full.

A full guard first makes the job wait inside the delivery, with a ``waiting`` event for the
user, because a ``429`` holds the queue's FIFO slot for the whole backoff and spends a retry;
``429`` + ``Retry-After`` is the fallback once ``guard_wait_s`` has passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Literal

from tierq.contracts import Waiting, WorkerBody
from tierq.observability.logging import log_job_event
from tierq.runtime import Runtime
from tierq.worker.result import Err, Ok, Reply, Result, error_reply


@dataclass
class Held:
    leases: list[tuple[str, str]] = field(default_factory=list)
    cancelled: bool = False


GuardName = Literal["user", "model"]


def guard_plan(rt: Runtime, body: WorkerBody) -> list[tuple[GuardName, str, int]]:
    """(guard name, key, limit) in acquisition order."""
    settings = rt.settings
    model = settings.models[body.model_id]
    return [
        ("user", rt.keys.user_guard(body.user_id), settings.user_limits.for_tier(body.plan)),
        ("model", rt.keys.model_guard(body.model_id, body.tier), model.limits.for_tier(body.tier)),
    ]


async def _wait(event: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), max(0.0, seconds))


async def guard(rt: Runtime, body: WorkerBody, cancel: asyncio.Event) -> Result[Held, Reply]:
    settings = rt.settings
    held = Held()
    deadline = time.monotonic() + settings.guard_wait_s
    for name, key, limit in guard_plan(rt, body):
        announced = False
        while True:
            got = await rt.leases.acquire(key, body.job_id, limit, settings.lease_ttl_s)
            if got.acquired:
                held.leases.append((key, body.job_id))
                break
            if cancel.is_set():
                held.cancelled = True
                return Ok(held)
            if not announced:
                rt.metrics.guard_waits.labels(name).inc()
                log_job_event("waiting", rt.settings.log_sample_rates, guard=name, limit=limit)
                waiting = Waiting(jobId=body.job_id, ts=int(time.time() * 1000), guard=name)
                await rt.jobs.append(waiting, status="waiting")
                announced = True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                rt.metrics.guard_rejections.labels(name).inc()
                await rt.leases.release_all(held.leases)
                await rt.jobs.set_fields(body.job_id, {"status": "queued"})
                retry = str(settings.guard_retry_after_s)
                message = f"{name} guard full ({limit} running); retry later"
                return Err(error_reply(429, f"{name}_busy", message, {"Retry-After": retry}))
            await _wait(cancel, min(settings.guard_poll_s, remaining))
    return Ok(held)
