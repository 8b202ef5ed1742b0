"""Admit a job: validate against the registry, resolve its tier, take an admission slot, record
it and publish it to its named queue — or leave nothing behind."""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import time
from collections.abc import Mapping
from typing import NoReturn

import structlog
from opentelemetry.trace import SpanKind

from tierq.config import Settings, UserSettings
from tierq.contracts import JobRequest, Queued, SubmitResponse, WorkerBody
from tierq.dispatch.dispatcher import Admission
from tierq.errors import Busy, ClientError, Forbidden, NotFound, UpstreamError
from tierq.observability.logging import log_job_event
from tierq.observability.tracing import current_traceparent, span
from tierq.producer.auth import events_token
from tierq.queues import Mode, Plan, QueueId, Tier, queue_for
from tierq.runtime import Runtime

log = structlog.get_logger("tierq.producer")


def resolve_tier(mode: Mode, plan: Plan) -> Tier:
    """auto uses the plan; paid needs a paid plan; free is always allowed."""
    if mode == "auto":
        return plan
    if mode == "paid" and plan != "paid":
        raise Forbidden("mode 'paid' needs a paid plan; use 'auto' or 'free'", code="plan_required")
    return mode


def check_registry(settings: Settings, req: JobRequest) -> None:
    service = settings.services.get(req.service)
    if service is None:
        raise NotFound(f"unknown service {req.service!r}", code="unknown_service")
    if req.experience not in service.experiences:
        raise ClientError(
            f"service {req.service!r} does not offer experience {req.experience!r}",
            code="unsupported_experience",
        )
    model = settings.models.get(req.model)
    if model is None or req.model not in service.models:
        raise NotFound(
            f"model {req.model!r} is not served by {req.service!r}", code="unknown_model"
        )
    if req.experience not in model.experiences:
        raise ClientError(
            f"model {req.model!r} does not support {req.experience!r}",
            code="unsupported_experience",
        )
    if req.experience == "vision" and not req.input.images:
        raise ClientError("vision jobs need at least one image", code="invalid_input")
    if len(req.input.images) > settings.max_images:
        raise ClientError(f"at most {settings.max_images} images per job", code="invalid_input")
    if len(req.input.prompt) > settings.max_prompt_chars:
        raise ClientError(
            f"prompt longer than {settings.max_prompt_chars} characters", code="invalid_input"
        )


IMAGE_TOKENS = 85
"""Tokens an image is estimated at (a low-detail image, in OpenAI's accounting)."""


def estimate_tokens(settings: Settings, req: JobRequest) -> int:
    """What a job is expected to use, for the rate quotas (corrected when it ends): its prompt
    (about 4 characters a token), its images, and the completion the model may write (its
    ``max_tokens``, the simulated model's token count, else ``estimated_completion_tokens``)."""
    model = settings.models[req.model]
    prompt = -(-len(req.input.prompt) // 4) + IMAGE_TOKENS * len(req.input.images)
    if model.max_tokens is not None:
        completion = model.max_tokens
    elif model.provider == "simulated":
        completion = model.tokens
    else:
        completion = settings.estimated_completion_tokens
    return prompt + completion


def duration(seconds: float) -> str:
    """A reset time as OpenAI writes it: ``1s``, ``6m0s``, ``1h2m3s``, ``250ms``."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    whole = int(seconds + 0.999)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def rate_headers(admission: Admission) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-*`` headers for the quotas the user has."""
    headers: dict[str, str] = {}
    for name, quota in (("requests", admission.requests), ("tokens", admission.tokens)):
        if quota is not None:
            headers[f"x-ratelimit-limit-{name}"] = str(quota.limit)
            headers[f"x-ratelimit-remaining-{name}"] = str(quota.remaining)
            headers[f"x-ratelimit-reset-{name}"] = duration(quota.reset_s)
    return headers


def job_records(
    job_id: str, user: UserSettings, tier: Tier, req: JobRequest, now_ms: int, max_retries: int
) -> tuple[WorkerBody, dict[str, str]]:
    """What is published for a job (its worker body) and its first state record fields."""
    queue = queue_for(tier, req.experience)
    body = WorkerBody(
        jobId=job_id,
        userId=user.id,
        plan=user.plan,
        tier=tier,
        queueId=queue,
        modelId=req.model,
        service=req.service,
        experience=req.experience,
        input=req.input,
        submittedAt=now_ms,
        maxRetries=max_retries,
    )
    fields = {
        "userId": user.id,
        "tier": tier,
        "queueId": queue.value,
        "modelId": req.model,
        "service": req.service,
        "experience": req.experience,
        "createdAt": str(now_ms),
    }
    return body, fields


def new_job_id() -> str:
    return "job_" + secrets.token_urlsafe(16)


async def submit(
    rt: Runtime, user: UserSettings, req: JobRequest, headers: Mapping[str, str] | None = None
) -> SubmitResponse:
    """Admit the job (the user's share of the queue, then the queue's depth) and park it for
    the dispatcher (one script), record it, then publish it when it may run now. A job that
    cannot be recorded or published leaves nothing behind. Traced as ``tierq.submit``, in the
    trace of the request's ``traceparent`` (``headers``) when it has one."""
    with span("tierq.submit", kind=SpanKind.SERVER, parent=headers) as current:
        reply = await _submit(rt, user, req)
        current.set_attribute("tierq.job_id", reply.job_id)
        return reply


def records_at_admission(settings: Settings) -> bool:
    """Whether the admission's script writes the job's record too (one round trip a submit,
    not two): on a single Redis. On Cluster the record's keys live under the job's own hash
    tag, apart from the dispatcher's: the record is written in a second call, after it."""
    return not settings.redis_cluster


async def _submit(rt: Runtime, user: UserSettings, req: JobRequest) -> SubmitResponse:
    settings = rt.settings
    check_registry(settings, req)
    tier = resolve_tier(req.mode, user.plan)
    queue = queue_for(tier, req.experience)
    job_id = new_job_id()
    now_ms = int(time.time() * 1000)
    body, fields = job_records(job_id, user, tier, req, now_ms, settings.qstash_retries)
    body.traceparent = current_traceparent()
    body.estimated_tokens = estimate_tokens(settings, req)
    queued = Queued(jobId=job_id, ts=now_ms, queueId=queue, tier=tier)
    lease_keys = [rt.keys.admission(queue.value), rt.keys.user_pending(queue.value, user.id)]
    record = (
        rt.jobs.record_args(job_id, fields, queued, now_ms)
        if records_at_admission(settings)
        else []
    )
    async with rt.admission.fair(user.id):  # see Settings.admission_concurrency
        try:
            admission = await rt.dispatcher.admit(
                body,
                body.model_dump_json(by_alias=True, exclude_none=True),
                depth=settings.queues[queue].admission_depth,
                share=settings.user_queue_limit(user.id, user.plan),
                record=record,
            )
        except BaseException:
            if record:  # it may have been admitted and recorded before the error reached us
                await _undo(rt, body, lease_keys)
            raise
    if admission.refused:
        _refuse(rt, user, queue.value, admission)
    parked = admission.parked
    if not record:
        try:
            await rt.jobs.create(
                job_id, fields, queued, None if parked.dispatched else parked.event(job_id)
            )
        except BaseException:
            await _undo(rt, body, lease_keys)
            with contextlib.suppress(UpstreamError):  # the others dispatched meanwhile still go
                await rt.dispatcher.publish(admission, job_id, skip=True)
            raise
    try:
        await rt.dispatcher.publish(admission, job_id)
    except BaseException:
        await _undo(rt, body, lease_keys)
        raise
    rt.metrics.submitted.labels(queue.value).inc()
    log_job_event(
        "queued", settings.log_sample_rates, job_id=job_id, queue=queue.value, user=user.id,
        parked=parked.reason or None,
    )  # fmt: skip
    return SubmitResponse(
        job_id=job_id,
        queue_id=queue,
        tier=tier,
        events_url=f"/api/jobs/{job_id}/events",
        events_token=events_token(settings.events_secret or "", job_id),
        rate_headers=rate_headers(admission),
    )


def _refuse(rt: Runtime, user: UserSettings, queue: str, admission: Admission) -> NoReturn:
    """429: the user's rate quota (``requests``/``tokens``), their share of the queue
    (``user``) or the queue's admission depth is full."""
    rt.metrics.admission_rejections.labels(queue).inc()
    settings = rt.settings
    full = admission.refused
    if full in ("requests", "tokens"):
        rt.metrics.rate_limited.labels(full).inc()
        rate = settings.user_rate(user.id, user.plan)
        limit = rate.rpm if full == "requests" else rate.tpm
        raise Busy(
            f"rate limit reached: {limit} {full} per minute; retry after "
            f"{duration(admission.retry_after_s)}",
            retry_after_s=max(1, math.ceil(admission.retry_after_s)),
            code="rate_limited",
        )
    if full == "user":
        limit = settings.user_queue_limit(user.id, user.plan)
        raise Busy(
            f"you have {limit} jobs admitted to {queue} already; retry later",
            retry_after_s=settings.admission_retry_after_s,
            code="user_queue_full",
        )
    depth = settings.queues[QueueId(queue)].admission_depth
    raise Busy(
        f"queue {queue} is full ({depth} jobs admitted); retry later",
        retry_after_s=settings.admission_retry_after_s,
        code="queue_full",
    )


UNDO_RETRY_S = 0.2
"""How often an undo that met Redis unavailable is tried again (see :func:`_undo`)."""
UNDO_FOR_S = 120.0
"""How long it is tried again, at most."""
_undoing: set[asyncio.Task[None]] = set()  # undos going on after their submit answered


async def _undo(rt: Runtime, body: WorkerBody, lease_keys: list[str]) -> None:
    """Nothing half-written: drop the job record, take it out of dispatch and give its slots
    back (a publish already made finds no job and ends at once). When Redis does not answer
    (the call that failed the submit may have run there: the job admitted and recorded, its
    answer lost), the undo goes on in the background, every ``UNDO_RETRY_S`` for up to
    ``UNDO_FOR_S``, after the submit has answered its 5xx: a job its client was told was not
    admitted must not run once Redis is back (``tests/e2e/test_chaos.py``)."""
    if not await _undo_once(rt, body, lease_keys):
        task = asyncio.get_running_loop().create_task(
            _undo_later(rt, body, lease_keys), name=f"tierq-undo-{body.job_id}"
        )
        _undoing.add(task)
        task.add_done_callback(_undoing.discard)


async def _undo_once(rt: Runtime, body: WorkerBody, lease_keys: list[str]) -> bool:
    job_id = body.job_id
    try:
        await rt.jobs.delete(job_id)
        await rt.dispatcher.release(body, also=[(key, job_id) for key in lease_keys])
    except UpstreamError:
        return False
    return True


async def _undo_later(rt: Runtime, body: WorkerBody, lease_keys: list[str]) -> None:
    deadline = time.monotonic() + UNDO_FOR_S
    while time.monotonic() < deadline:
        await asyncio.sleep(UNDO_RETRY_S)
        if await _undo_once(rt, body, lease_keys):
            return
    log.warning("submit.undo_gave_up", job_id=body.job_id)
