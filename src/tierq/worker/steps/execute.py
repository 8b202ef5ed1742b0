"""Step 4: run the model, racing it against cancel and the job's timeout.

Chunks go into the job's delta buffer as they come (the process's delta writer coalesces and
writes them: the model is never kept waiting on Redis); before the outcome (completed, failed,
cancelled) is returned for the events step to record, everything buffered is written, so the
terminal event always follows the last delta. Any exception from provider code becomes a
retryable failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Literal

from tierq.contracts import Usage, WorkerBody
from tierq.events.deltas import DeltaBuffer
from tierq.providers.base import Finish, ProviderError, ProviderRequest
from tierq.runtime import Runtime

OutcomeKind = Literal["completed", "failed", "cancelled"]


@dataclass(frozen=True)
class Outcome:
    kind: OutcomeKind
    result: str = ""
    usage: Usage | None = None
    code: str = ""
    message: str = ""
    retryable: bool = False
    low_on_quota: bool = False


async def _consume(
    rt: Runtime,
    body: WorkerBody,
    attempt: int,
    buffer: DeltaBuffer,
    gate: asyncio.Future[bool] | None,
) -> Outcome:
    model = rt.settings.models[body.model_id]
    request = ProviderRequest(
        job_id=body.job_id,
        model_id=body.model_id,
        upstream_model=model.upstream or body.model_id,
        experience=body.experience,
        input=body.input,
        attempt=attempt,
    )
    started = time.monotonic()
    first = True
    # aclosing: a cancel or an early return closes the provider's stream (and its upstream
    # HTTP response) at once, not whenever the abandoned generator is collected.
    async with contextlib.aclosing(rt.providers.get(body.model_id).run(request)) as items:
        async for item in items:
            if isinstance(item, Finish):
                return Outcome(
                    "completed", result=item.text, usage=item.usage, low_on_quota=item.low_on_quota
                )
            if first:
                if gate is not None and not await asyncio.shield(gate):
                    return Outcome("cancelled")  # its start was refused: nothing is written
                rt.metrics.ttft.labels(body.queue_id.value).observe(time.monotonic() - started)
                first = False
            if buffer.rejected:
                return Outcome("cancelled")  # the job ended behind our back
            if buffer.error is not None:
                raise buffer.error
            buffer.add(item.text)
    return Outcome("failed", code="no_result", message="the model ended without a result",
                   retryable=True)  # fmt: skip


async def execute(
    rt: Runtime,
    body: WorkerBody,
    attempt: int,
    cancel: asyncio.Event,
    gate: asyncio.Future[bool] | None = None,
) -> Outcome:
    """The run's outcome. ``gate``: the run began while its ``started`` was being written
    (True once written, False if refused): its text waits for it (the job's log shows
    ``started`` before any delta), and a refusal stops the run at once."""
    timeout = min(rt.settings.job_timeout_s, rt.settings.models[body.model_id].timeout_s)
    buffer = rt.deltas.buffer(body.job_id)
    try:
        outcome = await _race(rt, body, attempt, cancel, buffer, timeout, gate)
    finally:
        await buffer.close()  # the buffered text is written before any terminal event
    if outcome.kind == "completed" and buffer.rejected:
        return Outcome("cancelled")
    return outcome


async def _race(
    rt: Runtime,
    body: WorkerBody,
    attempt: int,
    cancel: asyncio.Event,
    buffer: DeltaBuffer,
    limit_s: float,
    gate: asyncio.Future[bool] | None,
) -> Outcome:
    """The model run in a task of its own, awaited directly; a cancel (``cancel`` set) or the
    time limit cancels it. Its outcome reaches the caller one turn of the event loop after the
    run ends. Waiting on the run and on the cancel flag together, then gathering both, took
    four or five turns (traced on 20 ms jobs at 8 limited slots: model's end -> outcome 0.6-1.0
    ms -> 0.3-0.6 ms at steady load, 4.6-8 -> ~1.3 ms while 400 submits came in): time a
    limited slot stays taken for nothing."""
    if cancel.is_set():
        return Outcome("cancelled")
    run = asyncio.create_task(_consume(rt, body, attempt, buffer, gate))
    stopped: list[OutcomeKind] = []  # why this side ended the run, if it did

    def stop(kind: OutcomeKind) -> None:
        if not run.done() and not stopped:
            stopped.append(kind)
            run.cancel()

    if gate is not None:  # a refused start stops the run (its caller drops the outcome)
        gate.add_done_callback(lambda opened: None if opened.result() else stop("cancelled"))

    watch = asyncio.create_task(cancel.wait())
    watch.add_done_callback(lambda task: None if task.cancelled() else stop("cancelled"))
    timer = asyncio.get_running_loop().call_later(limit_s, stop, "failed")
    outcome: Outcome | None = None
    try:
        outcome = await run
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if not stopped or (current is not None and current.cancelling()):
            raise  # this delivery itself is cancelled
    except ProviderError as exc:
        outcome = Outcome("failed", code=exc.code, message=str(exc), retryable=exc.retryable)
    except Exception as exc:
        outcome = Outcome("failed", code="internal_error", message=f"{type(exc).__name__}: {exc}",
                          retryable=True)  # fmt: skip
    finally:
        timer.cancel()
        watch.cancel()
        if not run.done():  # cancelled from outside: the run does not outlive its delivery
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
    if stopped == ["cancelled"]:
        return Outcome("cancelled")
    if stopped or outcome is None:
        return Outcome("failed", code="timeout", message=f"no result within {limit_s:g}s",
                       retryable=True)  # fmt: skip
    return outcome
