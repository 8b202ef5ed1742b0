"""``POST /v1/chat/completions`` and ``GET /v1/models``: tierq behind the OpenAI protocol.

A chat request becomes a tierq job through the same :func:`~tierq.producer.submit.submit` as
``POST /api/jobs`` (registry check, tier from the key's plan, admission, named queue), then the
answer follows the job's event log (replay + live tail, as the SSE endpoint does) to its end:

- ``stream: false``: wait for the terminal event, answer one ``chat.completion``;
- ``stream: true``: the status line is held back until the job's first ``delta`` (or its end),
  so a job refused by a guard, or failed by the upstream before any output, still answers with
  a real HTTP error status (429, 400, 502 …) that the ``openai`` SDK raises as it should. From
  then on: one ``chat.completion.chunk`` per ``delta`` (the first chunk carries
  ``role: assistant``), a ``finish_reason: "stop"`` chunk, the usage chunk when
  ``stream_options.include_usage``, then ``data: [DONE]``. A failure after output has started
  is an in-stream ``data: {"error": …}`` (what OpenAI sends; the SDK raises ``APIError``); a
  retryable failure after output ends the stream the same way and cancels the job (a retried
  attempt would repeat text the client already has).

A client that goes away — while its job waits in a queue, while a non-streamed answer is
being computed or mid-stream — cancels the job (``producer.api.cancel``): a queued job ends at
once, a running one is stopped by its worker, which closes the upstream connection.

Responses carry ``x-tierq-job-id`` and ``x-tierq-queue-id``; the completion id is
``chatcmpl-<jobId>``, so ``GET /api/jobs/{jobId}`` and the job's SSE events stay available.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import structlog
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from redis.exceptions import RedisError
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask

from tierq.config import UserSettings
from tierq.contracts import (
    TERMINAL_EVENTS,
    Cancelled,
    Completed,
    Delta,
    Failed,
    WorkerEvent,
    is_terminal,
    parse_event,
)
from tierq.errors import ClientError, UpstreamError
from tierq.events.codec import Entry, delta_of
from tierq.events.sse import JobFollower
from tierq.frontdoor import errors
from tierq.frontdoor.errors import OpenAIError
from tierq.frontdoor.shapes import DONE, Chunks, completion, sse
from tierq.frontdoor.translate import job_request, parse_request, served_models
from tierq.producer.api import cancel, runtime
from tierq.producer.auth import bearer
from tierq.producer.submit import submit
from tierq.runtime import Runtime

log = structlog.get_logger("tierq.frontdoor")
router = APIRouter(prefix="/v1", tags=["openai"])
T = TypeVar("T")
CLEANUP_S = 5.0
"""How long closing the event tail and cancelling an abandoned job may take."""
CLIENT_CLOSED = 499
"""The status logged for a request whose client left (nobody reads it)."""
_DEPENDENCY_ERRORS = (UpstreamError, RedisError)


class _Gone:
    """The client went away."""


GONE = _Gone()
Events = AsyncIterator[Entry]


@dataclass(frozen=True)
class Answer:
    """One chat request turned job: what every response about it needs."""

    rt: Runtime
    job_id: str
    queue_id: str
    model: str
    created: int
    include_usage: bool
    rate_headers: dict[str, str]

    @property
    def headers(self) -> dict[str, str]:
        """Which job answers, and OpenAI's ``x-ratelimit-*`` for the caller's quotas."""
        return {"x-tierq-job-id": self.job_id, "x-tierq-queue-id": self.queue_id,
                **self.rate_headers}  # fmt: skip

    def error(self, exc: OpenAIError) -> Response:
        exc.headers.update(self.headers)
        return exc.response()

    def failure(self, event: WorkerEvent | None) -> OpenAIError:
        """The error for a job that ended without a result (or whose log ended)."""
        if isinstance(event, Failed):
            return errors.from_failed(event, self.rt.settings.guard_retry_after_s)
        if isinstance(event, Cancelled):
            return errors.cancelled(self.job_id)
        return errors.gone(self.job_id)


# -- auth and models --------------------------------------------------------------------------


def _user(request: Request, rt: Runtime) -> UserSettings:
    key = bearer(request)
    user = rt.settings.api_keys.get(key) if key else None
    if user is None:
        raise errors.invalid_api_key(key)
    return user


def _model(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "tierq"}


@router.get("/models")
async def list_models(request: Request) -> Response:
    """The registry models this key may call (every model some service offers)."""
    rt = runtime(request)
    try:
        _user(request, rt)
    except OpenAIError as exc:
        return exc.response()
    data = [_model(m) for m in served_models(rt.settings)]
    return JSONResponse({"object": "list", "data": data})


@router.get("/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> Response:
    rt = runtime(request)
    try:
        _user(request, rt)
        if model_id not in served_models(rt.settings):
            raise errors.model_not_found(model_id)
    except OpenAIError as exc:
        return exc.response()
    return JSONResponse(_model(model_id))


# -- chat completions -------------------------------------------------------------------------


@router.post("/chat/completions")
async def chat_completions(request: Request) -> Response:
    try:
        return await _chat(request)
    except OpenAIError as exc:
        return exc.response()


async def _json_body(request: Request) -> object:
    raw = await request.body()
    try:
        return json.loads(raw)
    except ValueError:
        raise errors.invalid_request(
            "We could not parse the JSON body of your request. The body must be a JSON object "
            "(Content-Type: application/json)."
        ) from None


async def _chat(request: Request) -> Response:
    rt = runtime(request)
    user = _user(request, rt)
    req = parse_request(await _json_body(request))
    job = job_request(rt.settings, req)
    created = int(time.time())
    try:
        reply = await submit(rt, user, job, request.headers)
    except ClientError as exc:
        raise errors.from_client_error(exc) from None
    except _DEPENDENCY_ERRORS as exc:
        log.warning("frontdoor.submit_failed", error=str(exc))
        raise errors.unavailable() from None
    answer = Answer(
        rt, reply.job_id, reply.queue_id.value, req.model, created, req.include_usage,
        reply.rate_headers,
    )  # fmt: skip
    follower = JobFollower(rt.jobs, rt.hub, reply.job_id, None, rt.settings.sse_ping_s)
    events = follower.entries()
    handed_over = False
    try:
        decisive = _decisive(events, until_delta=bool(req.stream))
        first = await _unless_disconnected(request, decisive, on_gone=follower.close)
        if isinstance(first, _Gone):
            await _cancel_job(rt, answer.job_id, "client went away before the answer")
            return Response(status_code=CLIENT_CLOSED)
        if isinstance(first, Delta | Completed) and req.stream:
            handed_over = True
            relay = _Relay(answer, events, first)
            return EventSourceResponse(
                relay.body(),
                background=BackgroundTask(relay.cleanup),
                headers=answer.headers,
                ping=rt.settings.sse_ping_s,
                sep="\n",
                send_timeout=30,
            )
        if isinstance(first, Completed):
            body = completion(answer.job_id, req.model, created, first.result, first.usage)
            return JSONResponse(body, headers=answer.headers)
        return answer.error(answer.failure(first))
    except _DEPENDENCY_ERRORS as exc:
        log.warning("frontdoor.follow_failed", job_id=answer.job_id, error=str(exc))
        await _cancel_job(rt, answer.job_id, "tierq lost its event log")
        return answer.error(errors.unavailable())
    finally:
        if not handed_over:
            await _close(events)


# -- following the job ------------------------------------------------------------------------


async def _next_event(events: Events) -> WorkerEvent | None:
    """The next event that matters to an OpenAI answer (``delta`` or terminal, or a retryable
    ``failed``); ``None`` when the log ended (the job's records expired)."""
    async for item in events:
        if item.type == "delta":  # the token path: no validation round trip per delta
            job_id, text = delta_of(item)
            return Delta.model_construct(job_id=job_id, seq=item.seq, text=text)
        if item.type in TERMINAL_EVENTS:  # ``failed`` too when retryable: the caller decides
            return parse_event(item.raw)
    return None


async def _decisive(events: Events, *, until_delta: bool) -> WorkerEvent | None:
    """Wait for what decides the status line: the terminal event, or (streams) the first delta.
    Retryable failures before any output are skipped: the job is tried again."""
    while True:
        event = await _next_event(events)
        if event is None or is_terminal(event) or (until_delta and isinstance(event, Delta)):
            return event


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the request body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(
    request: Request, work: Coroutine[Any, Any, T], on_gone: Callable[[], None]
) -> T | _Gone:
    """``work``'s result, or ``GONE`` if the client disconnects first: ``work`` is cancelled,
    and ``on_gone`` ends it too — on Python 3.11 a cancel that lands as a Redis command
    completes can be lost inside redis-py (its ``asyncio.wait_for``), so it must not be the
    only way out."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone = watcher.done() and not watcher.cancelled()
        if gone:
            on_gone()
        for pending in (task, watcher):
            pending.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    if gone or task.cancelled():
        return GONE
    return task.result()


class _Relay:
    """The OpenAI SSE body of one job, from its first delta (or its result) to ``[DONE]``.

    Cleanup — close the event tail; cancel the job unless it reached its end — runs once, from
    the body's ``finally`` (the client left mid-stream: the body is cancelled) or from the
    response's background task (the client left before the body even started).
    """

    def __init__(self, answer: Answer, events: Events, first: Delta | Completed) -> None:
        self.answer = answer
        self.events = events
        self.first = first
        self.finished = False  # the job reached its end: nothing to cancel
        self._cleaned = False

    async def body(self) -> AsyncIterator[bytes]:
        answer = self.answer
        chunks = Chunks(answer.job_id, answer.model, answer.created, answer.include_usage)
        streamed = False
        event: WorkerEvent | None = self.first
        try:
            yield chunks.role()
            while True:
                if isinstance(event, Delta):
                    streamed = True
                    yield chunks.content(event.text)
                elif isinstance(event, Completed):
                    self.finished = True
                    if event.result and not streamed:
                        yield chunks.content(event.result)
                    yield chunks.stop()
                    if answer.include_usage:
                        yield chunks.usage(event.usage)
                    yield DONE
                    return
                elif isinstance(event, Failed) and not is_terminal(event):
                    # QStash retries the job, but the client already has part of this
                    # attempt's text: end here (cleanup cancels the retry).
                    message = (
                        f"the model failed mid-answer ({event.code}: {event.message}); a "
                        "partial answer is not resumed, retry the request"
                    )
                    failure = OpenAIError(502, message, type_=errors.SERVER_ERROR, code=event.code)
                    yield sse(failure.body())
                    return
                else:
                    self.finished = True
                    yield sse(answer.failure(event).body())
                    return
                event = await _next_event(self.events)
        except _DEPENDENCY_ERRORS as exc:
            log.warning("frontdoor.stream_failed", job_id=answer.job_id, error=str(exc))
            yield sse(errors.unavailable().body())
        finally:
            await self.cleanup()

    async def cleanup(self) -> None:
        if self._cleaned:
            return
        self._cleaned = True
        with anyio.move_on_after(CLEANUP_S, shield=True):
            await _close(self.events)
            if not self.finished:
                await _cancel_job(self.answer.rt, self.answer.job_id, "the stream ended early")


async def _close(events: Events) -> None:
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(*_DEPENDENCY_ERRORS):
            await aclose()


async def _cancel_job(rt: Runtime, job_id: str, reason: str) -> None:
    """Cancel a job nobody will read (best effort: a finished job is left alone)."""
    try:
        state = await rt.jobs.state(job_id)
        if state is None or state.terminal:
            return
        result = await cancel(rt, job_id, state)
    except _DEPENDENCY_ERRORS as exc:
        log.warning("frontdoor.cancel_failed", job_id=job_id, reason=reason, error=str(exc))
        return
    log.info("frontdoor.cancelled", job_id=job_id, reason=reason, status=result["status"])


# Unknown paths under /v1 answer as OpenAI does (after the routes above).
# Not in the OpenAPI schema: nothing to document, and one route of five methods would give
# FastAPI five operations with the same id (a warning on every /openapi.json).
@router.api_route(
    "/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False
)
async def unknown(path: str, request: Request) -> Response:
    message = f"Invalid URL ({request.method} /v1/{path})"
    return OpenAIError(404, message, code="unknown_url").response()
