"""Step 5: record how the attempt ended, and answer QStash so it retries or dead-letters.

A retryable failure with retries left is logged as ``failed`` with ``retryable: true`` (not
terminal: QStash delivers the job again) and answered 500. A failure on the last attempt is
terminal and answered 500, so QStash moves it to the DLQ with that response; a permanent one is
answered 489 + ``Upstash-NonRetryable-Error`` so it goes there at once.
"""

from __future__ import annotations

import json
import time

from tierq.contracts import Cancelled, Completed, Failed, Usage, WorkerBody
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


async def record(
    rt: Runtime, body: WorkerBody, outcome: Outcome, attempt: int, message_id: str
) -> tuple[Reply, bool]:
    """The reply, and whether the job is now finished (terminal)."""
    reply, finished = await _record(rt, body, outcome, attempt, message_id)
    queue = body.queue_id.value
    log_job_event(
        outcome.kind, rt.settings.log_sample_rates, terminal=finished, code=outcome.code or None,
        attempt=attempt, status=reply.status,
    )  # fmt: skip
    counter = {"completed": rt.metrics.completed, "cancelled": rt.metrics.cancelled}
    if finished:
        counter.get(outcome.kind, rt.metrics.failed).labels(queue).inc()
    elif outcome.kind == "failed":
        rt.metrics.attempt_failures.labels(queue).inc()
    return reply, finished


async def _record(
    rt: Runtime, body: WorkerBody, outcome: Outcome, attempt: int, message_id: str
) -> tuple[Reply, bool]:
    now = _now_ms()
    job = body.job_id
    if outcome.kind == "cancelled":
        return await _cancelled(rt, body), True
    if outcome.kind == "completed":
        usage = outcome.usage or Usage()
        event = Completed(jobId=job, ts=now, result=outcome.result, usage=usage)
        fields = {
            "result": outcome.result,
            "usage": usage.model_dump_json(),
            "finishedAt": str(now),
        }
        await rt.jobs.append(event, status="completed", fields=fields)
        return done("completed"), True
    last = not outcome.retryable or attempt >= body.max_retries
    failed = Failed(jobId=job, ts=now, code=outcome.code, message=outcome.message,
                    retryable=not last)  # fmt: skip
    error = json.dumps({"code": outcome.code, "message": outcome.message, "retryable": not last})
    if last:
        fields = {"error": error, "finishedAt": str(now), "failedMessageId": message_id}
        await rt.jobs.append(failed, status="failed", fields=fields)
    else:
        await rt.jobs.append(failed, status="queued", fields={"error": error})
    if not outcome.retryable:
        return non_retryable(outcome.code, outcome.message), True
    return error_reply(500, outcome.code, outcome.message), last
