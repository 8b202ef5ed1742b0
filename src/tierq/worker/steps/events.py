"""Step 5: record how the attempt ended, and answer QStash so it retries or dead-letters.

A retryable failure with retries left is logged as ``failed`` with ``retryable: true`` (not
terminal: QStash delivers the job again) and answered 500. A failure on the last attempt is
terminal and answered 500, so QStash moves it to the DLQ with that response; a permanent one is
answered 489 + ``Upstash-NonRetryable-Error`` so it goes there at once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from tierq.contracts import Cancelled, Completed, Failed, Usage, WorkerBody, WorkerEvent
from tierq.errors import UpstreamError
from tierq.observability.logging import log_job_event
from tierq.runtime import Runtime
from tierq.worker.result import Reply, done, error_reply, non_retryable
from tierq.worker.steps.execute import Outcome


def _now_ms() -> int:
    return int(time.time() * 1000)


async def record_cancelled(rt: Runtime, body: WorkerBody) -> Reply:
    """Log ``cancelled`` (for a cancel noticed outside the model run)."""
    rt.metrics.cancelled.labels(body.queue_id.value).inc()
    return await _cancelled(rt, body)


async def _cancelled(rt: Runtime, body: WorkerBody) -> Reply:
    now = _now_ms()
    await rt.jobs.append(
        Cancelled(jobId=body.job_id, ts=now), status="cancelled", fields={"finishedAt": str(now)}
    )
    return done("cancelled")


@dataclass(frozen=True)
class Ending:
    """How an attempt ended: the reply, whether the job is now finished (terminal), and
    ``write``, which queues the event (and state) that says so on a pipeline."""

    reply: Reply
    finished: bool
    write: Callable[[Any], None]


def settle(
    rt: Runtime, body: WorkerBody, outcome: Outcome, attempt: int, message_id: str
) -> Ending:
    """What the attempt's outcome means (counted and logged here); writing it is the caller's
    (:func:`tierq.worker.steps.cleanup.cleanup` does, in the round trip that frees the leases)."""
    ending = _settle(rt, body, outcome, attempt, message_id)
    queue = body.queue_id.value
    log_job_event(
        outcome.kind, rt.settings.log_sample_rates, terminal=ending.finished,
        code=outcome.code or None, attempt=attempt, status=ending.reply.status,
    )  # fmt: skip
    counter = {"completed": rt.metrics.completed, "cancelled": rt.metrics.cancelled}
    if ending.finished:
        counter.get(outcome.kind, rt.metrics.failed).labels(queue).inc()
    elif outcome.kind == "failed":
        rt.metrics.attempt_failures.labels(queue).inc()
    return ending


async def record(
    rt: Runtime, body: WorkerBody, outcome: Outcome, attempt: int, message_id: str
) -> tuple[Reply, bool]:
    """:func:`settle` and write it at once: the reply, and whether the job is now finished."""
    ending = settle(rt, body, outcome, attempt, message_id)
    try:
        await rt.dispatcher.run_pipeline(ending.write)
    except RedisError as exc:
        raise UpstreamError(f"redis: {exc}") from exc
    return ending.reply, ending.finished


def _settle(
    rt: Runtime, body: WorkerBody, outcome: Outcome, attempt: int, message_id: str
) -> Ending:
    now = _now_ms()
    job = body.job_id
    jobs = rt.jobs

    def write(event: WorkerEvent, status: str, fields: dict[str, str]) -> Callable[[Any], None]:
        return lambda pipe: jobs.queue_append(pipe, event, status=status, fields=fields)

    if outcome.kind == "cancelled":
        cancelled = Cancelled(jobId=job, ts=now)
        return Ending(
            done("cancelled"), True, write(cancelled, "cancelled", {"finishedAt": str(now)})
        )
    if outcome.kind == "completed":
        usage = outcome.usage or Usage()
        event = Completed(jobId=job, ts=now, result=outcome.result, usage=usage)
        fields = {
            "result": outcome.result,
            "usage": usage.model_dump_json(),
            "finishedAt": str(now),
        }
        return Ending(done("completed"), True, write(event, "completed", fields))
    last = not outcome.retryable or attempt >= body.max_retries
    failed = Failed(jobId=job, ts=now, code=outcome.code, message=outcome.message,
                    retryable=not last)  # fmt: skip
    error = json.dumps({"code": outcome.code, "message": outcome.message, "retryable": not last})
    if last:
        fields = {"error": error, "finishedAt": str(now), "failedMessageId": message_id}
        how = write(failed, "failed", fields)
    else:
        how = write(failed, "queued", {"error": error})
    if not outcome.retryable:
        return Ending(non_retryable(outcome.code, outcome.message), True, how)
    return Ending(error_reply(500, outcome.code, outcome.message), last, how)
