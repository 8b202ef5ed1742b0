"""The one driver that composes the worker steps for a delivery.

validate → route decision → guard → execute → events, with cleanup on every way out:
success, failure, exception, timeout and cancellation (of the job or of the request itself).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import structlog

from tierq.contracts import Started, WorkerBody
from tierq.errors import UpstreamError
from tierq.events.cancel import poll_cancel_flag
from tierq.guards.heartbeat import heartbeat
from tierq.observability.logging import log_job_event
from tierq.queues import WorkerKind
from tierq.runtime import Runtime
from tierq.worker.result import Err, Reply, done, error_reply
from tierq.worker.steps.cleanup import cleanup
from tierq.worker.steps.events import record, record_cancelled
from tierq.worker.steps.execute import Outcome, execute
from tierq.worker.steps.guard import guard
from tierq.worker.steps.route import decide
from tierq.worker.steps.validate import validate

log = structlog.get_logger("tierq.worker")


async def _runner_alive(rt: Runtime, body: WorkerBody, state: dict[str, str] | None) -> bool:
    if state is None or state.get("status") not in ("running", "waiting"):
        return False
    key = rt.keys.model_guard(body.model_id, body.tier)
    return body.job_id in await rt.leases.holders(key)


async def run_delivery(
    rt: Runtime, raw: bytes, route: WorkerKind, service: str, message_id: str, retried: int
) -> Reply:
    checked = validate(raw, route, service)
    if isinstance(checked, Err):
        return checked.error
    body = checked.value
    structlog.contextvars.bind_contextvars(
        job_id=body.job_id, queue=body.queue_id.value, user=body.user_id
    )
    try:
        return await _run(rt, body, raw, message_id, retried)
    except UpstreamError as exc:
        log.warning("worker.upstream_error", error=str(exc))
        return error_reply(503, "unavailable", "a dependency is unavailable; retry")
    finally:
        structlog.contextvars.unbind_contextvars("job_id", "queue", "user")


async def _run(rt: Runtime, body: WorkerBody, raw: bytes, message_id: str, retried: int) -> Reply:
    with rt.cancels.watch(body.job_id) as cancel:  # before reading state: no cancel is missed
        state = await rt.jobs.state(body.job_id)
        alive = await _runner_alive(rt, body, state)
        decision = decide(state, message_id, alive, rt.settings.guard_retry_after_s)
        if isinstance(decision, Err):
            if state is None:  # nobody runs a job that is gone: free what dispatch gave it
                await rt.dispatcher.release(body)
            return decision.error
        if decision.value.revive and not await rt.gateway.carries_job(message_id, body.job_id):
            log.warning("worker.revive_refused", message_id=message_id)
            return done("failed")  # a failed job runs again only from a real new message
        if decision.value.action == "cancel":
            reply = await record_cancelled(rt, body)
            await cleanup(rt, body, [], finished=True)
            return reply
        held: list[tuple[str, str]] = []
        finished = False
        hands_off = False  # the job is parked again, or another delivery runs it: keep out
        try:
            guarded = await guard(rt, body, raw, message_id)
            if isinstance(guarded, Err):
                hands_off = True
                return guarded.error
            held = guarded.value
            if cancel.is_set():
                finished = True
                return await record_cancelled(rt, body)
            run = await _start(rt, body, state, decision.value.revive)
            if run == "taken":  # a concurrent delivery of this job started this run first
                hands_off = True
                return done("running_elsewhere")
            if isinstance(run, str):  # cancelled (or expired) while we took the guards
                finished = True
                return done("skipped")
            outcome = await _execute(rt, body, run, held, cancel)
            # attempts by the job's own run count: QStash's retry header is not signed, and a job
            # parked again goes out as a new message
            reply, finished = await record(rt, body, outcome, run.number, message_id)
            return reply
        finally:
            if not hands_off:
                await cleanup(rt, body, held, finished)


@dataclass(frozen=True)
class _Run:
    number: int  # how many runs this job had before (0 for the first)
    started_ms: int


async def _start(
    rt: Runtime,
    body: WorkerBody,
    state: dict[str, str] | None,
    revive: bool,
) -> _Run | str:
    """Log ``started``; else why not: ``taken`` (another delivery started this run), or the job
    ended meanwhile."""
    now = int(time.time() * 1000)
    number = int((state or {}).get("attempts", "0"))
    started = await rt.jobs.start(
        Started(jobId=body.job_id, ts=now, attempt=number),
        number,
        {"startedAt": str(now), "attempts": str(number + 1)},
        revive=revive,
    )
    if isinstance(started, str):
        return started
    queue = body.queue_id.value
    log_job_event("started", rt.settings.log_sample_rates, attempt=number)
    rt.metrics.queue_wait.labels(queue).observe(max(0, now - body.submitted_at_ms) / 1000)
    return _Run(number, now)


async def _execute(
    rt: Runtime, body: WorkerBody, run: _Run, held: list[tuple[str, str]], cancel: asyncio.Event
) -> Outcome:
    """The model run, with its siblings: the lease heartbeat and the cancel-flag poll."""
    every = rt.settings.heartbeat_s
    siblings = [
        asyncio.create_task(heartbeat(rt.leases, held, rt.settings.lease_ttl_s, every)),
        asyncio.create_task(poll_cancel_flag(rt.jobs, body.job_id, cancel, every)),
    ]
    try:
        outcome = await execute(rt, body, run.number, cancel)
    finally:
        for task in siblings:
            task.cancel()
        await asyncio.gather(*siblings, return_exceptions=True)
    rt.metrics.run_time.labels(body.queue_id.value).observe(time.time() - run.started_ms / 1000)
    return outcome
