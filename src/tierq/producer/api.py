"""The client API: submit, status, cancel, and the job's events over SSE."""

from __future__ import annotations

import contextlib
import json
import re
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from tierq.config import UserSettings
from tierq.contracts import Cancelled, JobRequest
from tierq.errors import ClientError, NotFound, Unauthorized, UpstreamError
from tierq.events.response import JobEventsResponse
from tierq.events.sse import JobFollower
from tierq.events.state import JobState
from tierq.observability.logging import track_job
from tierq.producer.auth import authenticate_user, bearer, events_token_valid
from tierq.producer.submit import submit
from tierq.runtime import Runtime

router = APIRouter()
_STREAM_ID = re.compile(r"\d{1,20}-\d{1,20}")


def runtime(request: Request) -> Runtime:
    rt: Runtime = request.app.state.runtime
    return rt


async def _owned_state(rt: Runtime, user: UserSettings, job_id: str) -> JobState:
    state = await rt.jobs.state(job_id)
    if state is None or state.user_id != user.id:
        raise NotFound(f"job {job_id} not found", code="job_not_found")
    return state


def job_view(job_id: str, state: JobState) -> dict[str, Any]:
    """The API's ``Job``: a field the record does not hold yet is left out (the first seven
    are always there, ``null`` when unknown)."""
    view: dict[str, Any] = {
        "jobId": job_id,
        "status": state.status,
        "queueId": state.queue_id,
        "tier": state.tier,
        "modelId": state.model_id,
        "service": state.service,
        "experience": state.experience,
    }
    for name, number in (
        ("createdAt", state.created_at),
        ("startedAt", state.started_at),
        ("finishedAt", state.finished_at),
        ("attempts", state.attempts),
    ):
        if number is not None:
            view[name] = number
    if state.result is not None:
        view["result"] = state.result
    for name, text in (("usage", state.usage), ("error", state.error)):
        if text is not None:
            view[name] = json.loads(text)
    return view


STREAMED = (
    "Submit and follow in one request (``Accept: text/event-stream``): the job is admitted "
    "as with ``202``, and this response is its event stream from the first event, as "
    "``GET eventsUrl`` serves it; the job's ids are in the ``X-Tierq-*`` headers (``Job-Id``, "
    "``Queue-Id``, ``Tier``, ``Events-Url``, ``Events-Token``: a dropped stream resumes there "
    "with ``Last-Event-ID``). Nothing is emitted before the client listens, and the "
    "separate stream request (its connection, its authentication, its replay) is saved. A "
    "submit refused answers the same JSON error as without the header."
)


@router.post(
    "/api/jobs",
    status_code=202,
    responses={200: {"description": STREAMED, "content": {"text/event-stream": {}}}},
)
async def submit_job(job: JobRequest, request: Request) -> Response:
    """Admit a job: ``202`` with its ids, or, asked with ``Accept: text/event-stream``, its
    events over SSE in this response (see :data:`STREAMED`)."""
    rt = runtime(request)
    user = authenticate_user(request, rt.settings)
    if not streamed(request):
        reply = await submit(rt, user, job, request.headers)
        return JSONResponse(
            reply.model_dump(by_alias=True, mode="json"),
            status_code=202,
            headers=reply.rate_headers,
        )
    rt.streams.take_user(user.id)  # 429 over the cap, before anything is submitted
    try:
        reply = await submit(rt, user, job, request.headers)
    except BaseException:
        rt.streams.give_user(user.id)
        raise
    rt.streams.add_job(reply.job_id)
    headers = {
        "x-tierq-job-id": reply.job_id,
        "x-tierq-queue-id": reply.queue_id.value,
        "x-tierq-tier": reply.tier,
        "x-tierq-events-url": reply.events_url,
        "x-tierq-events-token": reply.events_token,
        **reply.rate_headers,
    }
    return _events_response(rt, reply.job_id, None, user.id, headers)


def streamed(request: Request) -> bool:
    """Whether the client asks for the job's events in the submit's response."""
    return "text/event-stream" in request.headers.get("accept", "")


@router.get("/api/jobs/{job_id}")
async def get_job(job_id: str, request: Request) -> dict[str, Any]:
    rt = runtime(request)
    user = authenticate_user(request, rt.settings)
    return job_view(job_id, await _owned_state(rt, user, job_id))


async def cancel(rt: Runtime, job_id: str, state: JobState) -> dict[str, Any]:
    """Cancel a job (owner or admin): a queued one now, a running one through its worker.
    ``state`` is the job's record as the caller read it (to find its queue and message)."""
    now_ms = int(time.time() * 1000)
    event = Cancelled(jobId=job_id, ts=now_ms)
    result = await rt.jobs.request_cancel(event, rt.keys.cancel_channel, now_ms)
    if result == "cancelled":
        queue, user, model = state.queue_id or "", state.user_id or "", state.model_id or ""
        rt.metrics.cancelled.labels(queue).inc()
        track_job(
            "cancelled", job_id=job_id, queue=queue, tier=state.tier, model=state.model_id,
            user=state.user_id, service=state.service, experience=state.experience,
            total_ms=max(0, now_ms - (state.created_at or now_ms)),
        )  # fmt: skip
        await rt.dispatcher.release_job(
            job_id, queue, user, model, state.tier or "",
            also=[(rt.keys.admission(queue), job_id), (rt.keys.user_pending(queue, user), job_id)],
            before=lambda pipe: rt.ledger.queue_record(pipe, user, model, now_ms, jobs=1),
        )  # fmt: skip
        rt.metrics.usage_jobs.labels(model, state.tier or "", "cancelled").inc()
        if state.message_id:
            # Already delivered or gone is fine: the worker sees the job cancelled and skips it.
            with contextlib.suppress(UpstreamError):
                await rt.gateway.cancel(state.message_id)
    status = {"requested": "cancelling", "missing": "gone"}.get(result, result)
    return {"jobId": job_id, "status": status}


@router.delete("/api/jobs/{job_id}")
async def cancel_job(job_id: str, request: Request) -> dict[str, Any]:
    """A queued job is cancelled at once; a running one stops within the worker's cancel latency."""
    rt = runtime(request)
    user = authenticate_user(request, rt.settings)
    return await cancel(rt, job_id, await _owned_state(rt, user, job_id))


@router.get("/api/jobs/{job_id}/events")
async def job_events(job_id: str, request: Request) -> JobEventsResponse:
    """SSE. Readable with the job's ``eventsToken`` (``?token=``) or its owner's API key.
    (Served by :class:`~tierq.fastpath.FastRoutes` ahead of routing; this route documents it
    and serves it where that middleware is not installed.)"""
    return await open_job_events(runtime(request), request, job_id)


async def open_job_events(rt: Runtime, request: Request, job_id: str) -> JobEventsResponse:
    """Check who asks (raising the client error to answer), then the SSE response."""
    token = request.query_params.get("token")
    if token:
        if not events_token_valid(rt.settings.events_secret or "", job_id, token):
            raise Unauthorized("invalid events token")
        state = await rt.jobs.state(job_id)
        if state is None:
            raise NotFound(f"job {job_id} not found", code="job_not_found")
    else:
        user = authenticate_user(request, rt.settings) if bearer(request) else None
        if user is None:
            raise Unauthorized("send ?token=<eventsToken> or Authorization: Bearer <key>")
        state = await _owned_state(rt, user, job_id)
    last_id = request.headers.get("last-event-id") or request.query_params.get("lastEventId")
    if last_id and not _STREAM_ID.fullmatch(last_id):
        raise ClientError(
            "Last-Event-ID must be an event id this stream sent", code="invalid_last_event_id"
        )
    owner = state.user_id or ""
    rt.streams.take(job_id, owner)  # 429 over the caps; given back when the stream closes
    return _events_response(rt, job_id, last_id, owner)


def _events_response(
    rt: Runtime,
    job_id: str,
    after: str | None,
    owner: str,
    headers: dict[str, str] | None = None,
) -> JobEventsResponse:
    """``job_id``'s events after ``after`` as SSE, for a stream counted in ``rt.streams``."""
    follower = JobFollower(rt.jobs, rt.hub, job_id, after, rt.settings.sse_ping_s)
    return JobEventsResponse(
        follower,
        send_timeout_s=rt.settings.sse_send_timeout_s,
        on_open=lambda: _sse_opened(rt),
        on_close=lambda f: _sse_closed(rt, f, owner),
        headers=headers,
    )


def _sse_opened(rt: Runtime) -> None:
    rt.metrics.sse_total.inc()
    rt.metrics.sse_open.inc()


def _sse_closed(rt: Runtime, follower: JobFollower, owner: str) -> None:
    rt.streams.give(follower.job_id, owner)
    rt.metrics.sse_open.dec()
    if follower.dropped:
        rt.metrics.sse_dropped.inc()
