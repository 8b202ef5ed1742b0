"""The one driver that composes the worker steps for a delivery.

validate → route decision → guard → execute → events, with cleanup on every way out:
success, failure, exception, timeout and cancellation (of the job or of the request itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import math
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, cast

import structlog
from opentelemetry.trace import SpanKind
from redis.exceptions import RedisError

from tierq.aio import raise_if_cancelled, ticks
from tierq.contracts import Started, WorkerBody
from tierq.dispatch.local import PENDING
from tierq.errors import UpstreamError
from tierq.events.cancel import poll_cancel_flag
from tierq.events.codec import entry
from tierq.events.state import JobState
from tierq.guards.heartbeat import heartbeat
from tierq.observability.logging import log_job_event, track_job
from tierq.observability.tracing import enabled as tracing_enabled
from tierq.observability.tracing import span
from tierq.queues import WorkerKind, worker_kind
from tierq.runtime import Runtime
from tierq.worker.result import Err, Ok, Reply, Result, done, error_reply
from tierq.worker.steps.cleanup import cleanup
from tierq.worker.steps.events import record_cancelled, settle
from tierq.worker.steps.execute import Outcome, execute
from tierq.worker.steps.guard import guard, park_again
from tierq.worker.steps.route import Decision, decide
from tierq.worker.steps.validate import validate

log = structlog.get_logger("tierq.worker")


_RUN_ENDS = frozenset({"completed", "failed", "cancelled"})
"""Event types that end a run (a failed one may be retried: the job goes on, that run not)."""

MAX_PASSES = 100
"""Looks at a job a delivery takes at most (each after a run elsewhere ended or lost its start)."""

RECORD_GRACE_MS = 5000
"""How long after its submit a dispatched job without a record is taken for one still being
recorded (its submit writes the record a round trip after admitting it), not a lost one."""


def _recording(body: WorkerBody) -> bool:
    return time.time() * 1000 - body.submitted_at_ms < RECORD_GRACE_MS


def _runner_alive_for(rt: Runtime, state: JobState | None) -> int:
    """Seconds until a running job's runner counts as dead (0: not running, or dead already).
    A run beats on the job record (``beatAt``, every ``heartbeat_s``); it is alive while its
    last beat is younger than ``lease_ttl_s``. (Its leases can't tell: dispatch takes them too,
    for the next delivery of the same job.)"""
    if state is None or state.status not in ("running", "waiting"):
        return 0
    beat = max(state.beat_at or 0, state.started_at or 0)
    left_ms = beat + rt.settings.lease_ttl_s * 1000 - time.time() * 1000
    return max(0, math.ceil(left_ms / 1000))


async def run_delivery(
    rt: Runtime,
    raw: bytes,
    route: WorkerKind,
    service: str,
    message_id: str,
    retried: int,
    headers: Mapping[str, str] | None = None,
    *,
    local: bool = False,
) -> Reply:
    """Run one delivery, traced as ``tierq.delivery`` in the job's trace: the ``traceparent``
    QStash forwarded (``headers``), else the one its body kept. ``local``: not a delivery but
    the run this process started when it dispatched the job (:mod:`tierq.dispatch.local`); a
    delivery of the same message that reaches this process meanwhile takes its answer."""
    checked = validate(raw, route, service)
    if isinstance(checked, Err):
        return checked.error
    body = checked.value
    structlog.contextvars.bind_contextvars(
        job_id=body.job_id, queue=body.queue_id.value, user=body.user_id
    )
    parent: Mapping[str, str] | None = None
    attributes: dict[str, str | int] = {}
    if tracing_enabled():
        forwarded = headers.get("traceparent") if headers else None
        parent = {"traceparent": forwarded or body.traceparent or ""}
        attributes = {"tierq.job_id": body.job_id, "tierq.queue": body.queue_id.value,
                      "tierq.message_id": message_id, "tierq.retried": retried}  # fmt: skip
    try:
        adopted = None if local else await _adopt(rt, body, message_id)
        if adopted is not None:
            return adopted
        with span("tierq.delivery", kind=SpanKind.SERVER, parent=parent, attributes=attributes):
            light = local  # a local start may skip the read and claim (see _read_and_claim)
            for _ in range(MAX_PASSES):  # None: it waited for a run elsewhere, look again
                if (reply := await _run(rt, body, raw, message_id, local, light)) is not None:
                    return reply
                light = False
            return error_reply(
                503, "busy", "the job's runs kept changing hands; retry", {"Retry-After": "1"}
            )
    except UpstreamError as exc:
        log.warning("worker.upstream_error", error=str(exc))
        # QStash honours Retry-After on a failed delivery (else its backoff: 12 s at first)
        return error_reply(
            503, "unavailable", "a dependency is unavailable; retry", {"Retry-After": "1"}
        )
    finally:
        structlog.contextvars.unbind_contextvars("job_id", "queue", "user")


async def run_local(
    rt: Runtime,
    raw: bytes,
    data: dict[str, Any],
    message_id: str,
    traceparent: str | None = None,
) -> Reply:
    """The run this process starts for a job it just published (see :mod:`tierq.dispatch.local`;
    ``data``: the worker body parsed), traced under the publish (``traceparent``) as its
    delivery would be."""
    headers = {"traceparent": traceparent} if traceparent else None
    route = worker_kind(data["experience"])
    return await run_delivery(
        rt, raw, route, str(data["service"]), message_id, 0, headers, local=True
    )


def enable_local_start(rt: Runtime) -> None:
    """With ``Settings.local_start``: jobs this process publishes start here at once."""
    if rt.settings.local_start:
        rt.local.bind(functools.partial(run_local, rt), rt.metrics)
        rt.dispatcher.local = rt.local


async def _adopt(rt: Runtime, body: WorkerBody, message_id: str) -> Reply | None:
    """The answer of this process's local run of this message (waiting for it to end), or
    ``None``: there is none, or it did not run the job (a delivery got there first). The wait
    is shielded: a delivery that goes away leaves the run going."""
    found = rt.local.find(body.job_id, message_id)
    if found is None:
        return None
    if isinstance(found, asyncio.Future):  # the run, or its publish on its way back
        rt.local.waiting += 1
        try:
            answer = await asyncio.shield(found)
        finally:
            rt.local.waiting -= 1
        if not isinstance(found, asyncio.Task):  # the publish answered: ask again
            return await _adopt(rt, body, message_id)
        found = answer
    reply = cast(Reply, found)
    if not reply.ran:
        return None
    rt.local.adopted += 1
    rt.metrics.local_runs.labels("adopted").inc()
    return reply


async def _unless_local(
    rt: Runtime, body: WorkerBody, message_id: str, local: bool, reply: Reply
) -> Reply:
    """``reply`` (the job runs elsewhere), unless the run is this process's local start of this
    message: then that run's answer."""
    adopted = None if local else await _adopt(rt, body, message_id)
    return reply if adopted is None else adopted


async def _may_revive(rt: Runtime, body: WorkerBody, message_id: str, local: bool) -> bool:
    """Whether this message may run a job that failed for good: only a real new message that
    carries it. A local run leaves that to its delivery (whose claim takes the leases again)."""
    if local:
        return False
    if await rt.gateway.carries_job(message_id, body.job_id):
        return True
    log.warning("worker.revive_refused", message_id=message_id)
    return False


async def _lost_start(rt: Runtime, body: WorkerBody, message_id: str, local: bool) -> Reply | None:
    """Another run started the job first. A local start steps aside; a delivery takes this
    process's local start's answer, else looks again (``None``): a local start elsewhere is
    then waited for, another delivery's run gets ``429`` — this message is not acknowledged
    while someone still runs it."""
    if local:
        return done("running_elsewhere")
    return await _adopt(rt, body, message_id)


async def _await_run_elsewhere(rt: Runtime, body: WorkerBody, alive_s: int) -> None:
    """Until the job's log shows its run ended (an entry after the current last one that ends
    a run: completed, failed, cancelled), or for ``alive_s`` (then the caller looks again: a
    live run has beaten meanwhile, a dead one now counts as dead). Followed through the tail
    hub: no connection of its own, no polling."""
    try:
        last = await rt.jobs.last(body.job_id)
    except RedisError as exc:
        raise UpstreamError(f"redis: {exc}") from exc
    if last is not None and entry("0-0", last[1]).type in _RUN_ENDS:
        return  # it ended between the state read and now
    sub = rt.hub.subscribe(rt.keys.job_events(body.job_id), last[0] if last else "0-0")
    rt.local.awaiting_elsewhere += 1
    try:
        deadline = time.monotonic() + max(alive_s, 1)
        while (left := deadline - time.monotonic()) > 0:
            rows = await sub.next(left)
            if not rows:  # nothing within the window, or dropped
                return
            if any(row.type in _RUN_ENDS for row in rows):
                return
    finally:
        rt.local.awaiting_elsewhere -= 1
        rt.hub.unsubscribe(sub)


async def _read_and_claim(
    rt: Runtime, body: WorkerBody, message_id: str, skip: bool
) -> tuple[JobState | None, str, bool, int, Result[Decision, Reply]]:
    """The job's state, the claim's answer, whether dispatch had the job, the seconds its run
    elsewhere counts as alive, and what this delivery does. The claim goes with the read (one
    round trip); a delivery that must not run gives back what it took, unless the job runs
    elsewhere (then they are that run's leases).

    A local start while nothing waits at the admission bound (``skip``) reads and claims
    nothing (state ``None``): its dispatch took the leases a moment ago. Its ``started`` is
    then ``fresh``: refused for a job cancelled, ended, started or cancel-requested meanwhile,
    one that ran before, or one whose record its submit is still writing, and the start goes
    the whole way (read and claim) instead. When submits or starts wait at the bound, the local
    start of a streamed job its submit has just published reads and claims in line like a
    delivery: without that round trip in line, the jobs of a 500-job burst started so early
    that their clients' streams opened later (measured: submit -> first token at the client p50
    ~0.5 -> ~0.9 s); the line paces those starts against the burst's submits. A batch or
    vision job (nobody streams it) and a job that waited parked and starts in the slot a
    release just freed skip the line: waiting behind a burst of submits kept a limited slot
    empty (measured on 20 ms jobs while 400 submits came in: the start's round trip ~10 ms;
    the first job of the burst started ~30 ms after the first submit)."""
    if skip:
        return None, "ok", True, 0, Ok(Decision("run"))
    async with rt.admission.fair(body.user_id):  # see Settings.admission_concurrency
        state, full, sent = await rt.dispatcher.claim_with_state(body)
    alive_s = _runner_alive_for(rt, state)
    # a redelivery while the run is alive comes back once the run would count as dead
    return state, full, sent, alive_s, decide(state, message_id, alive_s > 0, alive_s + 1)


def _in_line(rt: Runtime, body: WorkerBody, paced: bool) -> AbstractAsyncContextManager[None]:
    """A place at the admission bound in the user's line (``paced``), or none."""
    return rt.admission.fair(body.user_id) if paced else contextlib.nullcontext()


async def _run(
    rt: Runtime, body: WorkerBody, raw: bytes, message_id: str, local: bool, light: bool
) -> Reply | None:
    """One pass of the delivery; ``None``: ask again (it waited for a run elsewhere, or a
    local start that read nothing was refused its start: the next pass reads and claims)."""
    with rt.cancels.watch(body.job_id) as cancel:  # before reading state: no cancel is missed
        # a job that waited parked starts in the slot a release just freed, as its publish
        # goes out (no message id yet): it skips the admission line, and waits for its
        # message id only where it needs it (parking the job again, its end)
        handoff = local and not message_id
        # a streamed job its submit published waits its turn at the admission bound to start
        # (see _read_and_claim); a batch or vision job, like a hand-off, starts at once
        paced = not handoff and not (local and body.experience != "stream")
        # nothing read nor claimed (see _read_and_claim): a local start that is not paced, or
        # one that is while nothing waits at the admission bound
        fresh = light and (not paced or rt.admission.idle)
        state, full, sent, alive_s, decision = await _read_and_claim(rt, body, message_id, fresh)
        if isinstance(decision, Err):
            if state is None and sent and _recording(body):
                # dispatched while its submit was still writing its record (on Cluster, where
                # the record is written after the admission: a job parked at admission can be
                # sent by another process at once): it keeps its leases and comes back in a
                # moment; past RECORD_GRACE_MS it is gone (its submit died)
                return error_reply(
                    503, "not_recorded_yet", "the job is being recorded; retry",
                    {"Retry-After": "1"},
                )  # fmt: skip
            if state is None or state.terminal:
                await rt.dispatcher.release(body)  # nobody runs a job that is gone or ended
                return decision.error
            # it may have started here (at dispatch) while this delivery read its state
            reply = await _unless_local(rt, body, message_id, local, decision.error)
            if reply is decision.error and not local and state.local_run in (message_id, PENDING):
                # another process's local start runs this very message: wait for its end,
                # then answer as if this delivery came then (QStash keeps its retries)
                await _await_run_elsewhere(rt, body, alive_s)
                return None
            return reply
        if decision.value.revive and not await _may_revive(rt, body, message_id, local):
            await rt.dispatcher.release(body)
            return done("failed")  # a failed job runs again only from a real new message
        if decision.value.action == "cancel":
            reply = await record_cancelled(rt, body)
            await cleanup(rt, body, [], True, _ended_unrun(rt, body))
            _track(body, "cancelled")
            return dataclasses.replace(reply, ran=True)
        held: list[tuple[str, str]] = []
        finished = False
        hands_off = False  # the job is parked again, or another delivery runs it: keep out
        try:
            guarded = await guard(rt, body, raw, message_id, full, early=handoff)
            if isinstance(guarded, Err):
                hands_off = True
                return guarded.error
            held = guarded.value
            if cancel.is_set():
                finished = hands_off = True
                reply = await record_cancelled(rt, body)
                await cleanup(rt, body, held, True, _ended_unrun(rt, body))
                _track(body, "cancelled")
                return dataclasses.replace(reply, ran=True)
            outcome, run = await _begin(
                rt, body, state, decision.value, message_id, local, held, cancel, paced, fresh
            )
            if isinstance(run, str):
                if fresh or run == "taken":
                    # fresh: the job changed since its dispatch; the next pass reads it, claims
                    # and decides (its leases stay). taken: a concurrent delivery (or a local
                    # start) started it first (the leases are that run's)
                    hands_off = True
                    return None if fresh else await _lost_start(rt, body, message_id, local)
                finished = True  # cancelled (or expired) while we took the guards
                return done("skipped")
            assert outcome is not None  # it is whenever the start was not refused
            hands_off = True  # _end cleans up
            return await _end(rt, body, raw, held, run, outcome, message_id, handoff)
        finally:
            if not hands_off:
                await cleanup(rt, body, held, finished)


@dataclass(frozen=True)
class _Run:
    number: int  # how many runs this job had before (0 for the first)
    started_ms: int


async def _end(
    rt: Runtime,
    body: WorkerBody,
    raw: bytes,
    held: list[tuple[str, str]],
    run: _Run,
    outcome: Outcome,
    message_id: str,
    early: bool = False,
) -> Reply:
    """Write how the attempt ended (its outcome, its ledger line, its model's adaptive limit)
    in the round trip that gives the leases back, and correct the token quotas if the job
    ended. Attempts count by the job's own run count: QStash's retry header is not signed, and
    a job parked again goes out as a new message.

    ``early``: a local run that started as its publish went out (no message id yet). One
    whose publish failed (:mod:`tierq.dispatch.local`) has no QStash message to
    retry it: an attempt to retry goes back to the front of its line instead (and out again
    at once when its slot is free). One that ended needs nothing more: the release forgets
    it in dispatch (it is not sent again)."""
    published = True
    if early:  # its publish went out as it started: wait for its answer
        message_id = await rt.local.message_of(body.job_id)
        published = bool(message_id)
    ending = settle(rt, body, outcome, run.number, message_id)
    finished = ending.finished
    usage = outcome.usage
    used = usage.prompt_tokens + usage.completion_tokens if usage and finished else None
    account = _account(rt, body, run, outcome, finished)
    adapt = _adaptation(rt, body, outcome)

    def write(pipe: Any) -> None:
        ending.write(pipe)
        account(pipe)
        if adapt:
            rt.dispatcher.queue_adapt(pipe, body, adapt)

    await cleanup(rt, body, held, finished, write, used)
    if not published and not finished:
        rt.local.detach(body.job_id)  # the next run may start here
        await park_again(rt, body, raw, "")
    if finished:
        _track(body, outcome.kind, run, outcome)
    return dataclasses.replace(ending.reply, ran=True)


def _adaptation(rt: Runtime, body: WorkerBody, outcome: Outcome) -> str | None:
    """How this attempt moves its model's adaptive limit (``None``: not adaptive, or no
    signal): down on an upstream 429, a little down when its quota runs low, up on success."""
    if not rt.settings.models[body.model_id].adaptive.enabled:
        return None
    if outcome.code == "upstream_429":
        return "decrease"
    if outcome.low_on_quota:
        return "slow"
    return "increase" if outcome.kind == "completed" else None


def _ended_unrun(rt: Runtime, body: WorkerBody) -> Callable[[Any], None]:
    """The ledger line of a job that ended (cancelled) before it ran."""
    now = int(time.time() * 1000)
    rt.metrics.usage_jobs.labels(body.model_id, body.tier, "cancelled").inc()
    return lambda pipe: rt.ledger.queue_record(pipe, body.user_id, body.model_id, now, jobs=1)


def _account(
    rt: Runtime, body: WorkerBody, run: _Run, outcome: Outcome, finished: bool
) -> Callable[[Any], None]:
    """The attempt's line in the usage ledger (and Prometheus): its tokens and run time; the
    job itself once it ended (a failure if it failed)."""
    now = int(time.time() * 1000)
    usage = outcome.usage
    prompt = usage.prompt_tokens if usage else 0
    completion = usage.completion_tokens if usage else 0
    failed = finished and outcome.kind == "failed"
    rt.metrics.usage_tokens.labels(body.model_id, body.tier, "prompt").inc(prompt)
    rt.metrics.usage_tokens.labels(body.model_id, body.tier, "completion").inc(completion)
    if finished:
        rt.metrics.usage_jobs.labels(body.model_id, body.tier, outcome.kind).inc()

    def account(pipe: Any) -> None:
        rt.ledger.queue_record(
            pipe, body.user_id, body.model_id, now, jobs=int(finished), prompt_tokens=prompt,
            completion_tokens=completion, run_ms=max(0, now - run.started_ms), failures=int(failed),
        )  # fmt: skip

    return account


def _track(
    body: WorkerBody, kind: str, run: _Run | None = None, outcome: Outcome | None = None
) -> None:
    """The job ended here: its lifecycle record (see :func:`track_job`)."""
    now = int(time.time() * 1000)
    fields: dict[str, object] = {
        "job_id": body.job_id,
        "queue": body.queue_id.value,
        "tier": body.tier,
        "model": body.model_id,
        "user": body.user_id,
        "service": body.service,
        "experience": body.experience,
        "total_ms": max(0, now - body.submitted_at_ms),
    }
    if run is not None:
        fields["wait_ms"] = max(0, run.started_ms - body.submitted_at_ms)
        fields["run_ms"] = max(0, now - run.started_ms)
        fields["attempts"] = run.number + 1
    if outcome is not None:
        if outcome.code:
            fields["code"] = outcome.code
        if outcome.usage is not None:
            fields["usage"] = outcome.usage.model_dump(mode="json")
    track_job(kind, **fields)


async def _start(
    rt: Runtime,
    body: WorkerBody,
    state: JobState | None,
    revive: bool,
    message_id: str,
    local: bool,
    fresh: bool = False,
    now: int | None = None,
) -> _Run | str:
    """Log ``started`` (at ``now``, ms: by default, now); else why not: ``taken`` (another
    delivery started this run), or the job ended meanwhile. A local start says so on the record
    (``localRun``): a delivery of its message that reaches another process waits for it."""
    now = int(time.time() * 1000) if now is None else now
    number = (state.attempts or 0) if state else 0
    started = await rt.jobs.start(
        Started(jobId=body.job_id, ts=now, attempt=number),
        number,
        {
            "startedAt": str(now),
            "attempts": str(number + 1),
            "localRun": (message_id or rt.local.message_now(body.job_id) or PENDING)
            if local
            else "",
        },
        revive=revive,
        fresh=fresh,
    )
    if isinstance(started, str):
        return started
    queue = body.queue_id.value
    log_job_event("started", rt.settings.log_sample_rates, attempt=number)
    rt.metrics.queue_wait.labels(queue).observe(max(0, now - body.submitted_at_ms) / 1000)
    return _Run(number, now)


async def _begin(
    rt: Runtime,
    body: WorkerBody,
    state: JobState | None,
    decision: Decision,
    message_id: str,
    local: bool,
    held: list[tuple[str, str]],
    cancel: asyncio.Event,
    paced: bool,
    fresh: bool,
) -> tuple[Outcome | None, _Run | str]:
    """Log ``started`` (in the user's line at the admission bound if ``paced``), then run the
    model: its outcome and the run, or ``None`` and why the start was refused. A fresh start
    not paced runs its model as ``started`` is written (see :func:`_start_running`)."""
    if fresh and not paced:
        return await _start_running(rt, body, held, cancel, message_id)
    async with _in_line(rt, body, paced):
        run = await _start(rt, body, state, decision.revive, message_id, local, fresh)
    if isinstance(run, str):
        return None, run
    return await _execute(rt, body, run, held, cancel), run


async def _start_running(
    rt: Runtime,
    body: WorkerBody,
    held: list[tuple[str, str]],
    cancel: asyncio.Event,
    message_id: str,
) -> tuple[Outcome | None, _Run | str]:
    """A fresh local start (see :func:`_read_and_claim`): the model run begins as its
    ``started`` is written, not one round trip later. Its text waits for that write (nothing
    reaches the job's log before ``started``); a refused start stops the run at once and its
    outcome is dropped (``None``): the job changed since its dispatch a moment ago (a cancel,
    a record still being written), rare, and then one upstream call was made for nothing.
    Measured on 20 ms jobs at 8 limited slots (``bench/dispatch.py`` A): the round trip (~2 ms
    at steady load, ~10 ms while a burst of submits comes in) no longer keeps each slot taken
    for nothing."""
    now = int(time.time() * 1000)  # the run below and its record start at the same time
    starting = asyncio.ensure_future(_start(rt, body, None, False, message_id, True, True, now))
    opened: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    def settle(task: asyncio.Future[_Run | str]) -> None:
        failed = task.cancelled() or task.exception() is not None
        opened.set_result(not failed and not isinstance(task.result(), str))

    starting.add_done_callback(settle)
    try:
        outcome = await _execute(rt, body, _Run(0, now), held, cancel, opened)
    except asyncio.CancelledError:  # this delivery is cancelled: so is its start
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        raise
    except Exception:  # the run failed (a write): its start ends first, as it would have
        await asyncio.gather(starting, return_exceptions=True)
        raise
    run = await starting  # a model quicker than the round trip waits for it; its error is ours
    return (None if isinstance(run, str) else outcome), run


async def _beat(rt: Runtime, job_id: str, every_s: float, first_s: float) -> None:
    """Tell later deliveries this run is alive (``beatAt`` on the job record): after
    ``first_s``, then every ``every_s``."""
    async for _ in ticks(every_s, first_s):
        try:
            await rt.jobs.set_if_exists(job_id, {"beatAt": str(int(time.time() * 1000))})
        except UpstreamError as exc:
            log.warning("worker.beat_failed", error=str(exc))
        raise_if_cancelled()


async def _execute(
    rt: Runtime,
    body: WorkerBody,
    run: _Run,
    held: list[tuple[str, str]],
    cancel: asyncio.Event,
    gate: asyncio.Future[bool] | None = None,
) -> Outcome:
    """The model run, with its siblings: the lease heartbeat, the cancel-flag poll and the
    run's beat. Each first acts one ``heartbeat_s`` into the run, so they are started only
    then: a run shorter than that (most) never creates their three tasks."""
    every = rt.settings.heartbeat_s
    siblings: list[asyncio.Task[Any]] = []

    def start_siblings() -> None:  # each kept as soon as made: the finally below stops it
        siblings.append(
            asyncio.create_task(
                heartbeat(
                    rt.leases,
                    held,
                    rt.settings.lease_ttl_s,
                    every,
                    rt.metrics.lease_lost,
                    first_s=0,
                )
            )
        )
        siblings.append(
            asyncio.create_task(poll_cancel_flag(rt.jobs, body.job_id, cancel, every, first_s=0))
        )
        siblings.append(asyncio.create_task(_beat(rt, body.job_id, every, first_s=0)))  # fmt: skip

    later = asyncio.get_running_loop().call_later(every, start_siblings)
    try:
        attributes = {"tierq.job_id": body.job_id, "tierq.model": body.model_id,
                      "tierq.attempt": run.number}  # fmt: skip
        with span("tierq.provider", kind=SpanKind.CLIENT, attributes=attributes) as call:
            outcome = await execute(rt, body, run.number, cancel, gate)
            call.set_attribute("tierq.outcome", outcome.kind)
    finally:
        later.cancel()
        for task in siblings:
            task.cancel()
        if siblings:
            await asyncio.gather(*siblings, return_exceptions=True)
    rt.metrics.run_time.labels(body.queue_id.value).observe(time.time() - run.started_ms / 1000)
    return outcome
