"""The hot routes as pure ASGI, ahead of FastAPI's routing: job submits, job events (SSE)
and QStash deliveries.

They are most of an app's requests under load, and FastAPI's routing layers (exception
middleware, exit stacks, per-request route bookkeeping) cost more than the rest of a delivery's
HTTP handling; an SSE connection also held ~12 KiB more through them for its whole life
(measured: bench/streaming.py). Here each request is handled by the same function as its
FastAPI route, which stays declared (documentation, and the fallback where this middleware is
not installed), and errors are answered by the app's own exception handlers.

A submit is parsed here only when it is what FastAPI would accept: a body declared JSON (FastAPI
refuses one without a content type) that is an object and validates as a ``JobRequest``, the
same Python-mode validation FastAPI runs. Anything else goes to the FastAPI route untouched, so
bad input gets FastAPI's exact error (its ``body.…`` locations and messages) at no cost to the
common case.
Measured: the FastAPI route cost ~10 % of an app's CPU under no-op jobs (``bench/jobs.py``,
py-spy).
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from tierq.contracts import JobRequest
from tierq.producer.api import open_job_events, submit_job
from tierq.queues import WorkerKind
from tierq.web.bodies import BODY
from tierq.worker.routes import handle

Handler = Callable[[Request, Exception], Awaitable[Response]]
Route = Callable[[Request, re.Match[str]], Awaitable[Response | None]]
"""A route answers, or returns ``None`` to leave the request to the app (FastAPI)."""


async def _events(request: Request, match: re.Match[str]) -> Response:
    return await open_job_events(request.app.state.runtime, request, match["job_id"])


async def _delivery(request: Request, match: re.Match[str]) -> Response:
    kind: WorkerKind = "stream" if match["kind"] == "stream" else "batch"
    return await handle(request, kind, match["service"])


async def _submit(request: Request, match: re.Match[str]) -> Response | None:
    job = _job_request(request)
    return None if job is None else await submit_job(job, request)


def _job_request(request: Request) -> JobRequest | None:
    """The body as FastAPI would parse it for ``submit_job``, or ``None`` when it would not
    (FastAPI then answers with its own error)."""
    raw = request.scope.get(BODY)
    kind = request.headers.get("content-type")
    if raw is None or not kind or not _json_type(kind):
        return None
    try:
        data = json.loads(raw)
    except ValueError:  # includes UnicodeDecodeError
        return None
    if not isinstance(data, dict):
        return None
    try:
        return JobRequest.model_validate(data)
    except ValidationError:
        return None


def _json_type(content_type: str) -> bool:
    """Whether FastAPI reads a body of this type as JSON (``application/json``, ``…+json``)."""
    main = content_type.split(";", 1)[0].strip().lower()
    kind, _, subtype = main.partition("/")
    return kind == "application" and (subtype == "json" or subtype.endswith("+json"))


ROUTES: tuple[tuple[str, re.Pattern[str], Route], ...] = (
    ("POST", re.compile(r"/api/jobs"), _submit),
    ("GET", re.compile(r"/api/jobs/(?P<job_id>[^/]+)/events"), _events),
    ("POST", re.compile(r"/api/worker/(?P<kind>stream|batch)/(?P<service>[^/]+)"), _delivery),
)


class FastRoutes:
    """Serve :data:`ROUTES`; pass every other request on."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for method, pattern, route in ROUTES:
                if scope["method"] == method and (match := pattern.fullmatch(scope["path"])):
                    # In its own call, so nothing of the request stays referenced while an SSE
                    # response runs.
                    response = await _answer(scope, receive, route, match)
                    if response is None:
                        break
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)


async def _answer(
    scope: Scope, receive: Receive, route: Route, match: re.Match[str]
) -> Response | None:
    request = Request(scope, receive)
    try:
        return await route(request, match)
    except Exception as exc:
        handler = _handler(request.app.exception_handlers, exc)
        if handler is None:
            raise
        return await handler(request, exc)


def _handler(handlers: Mapping[Any, Handler], exc: Exception) -> Handler | None:
    for cls in type(exc).__mro__:
        if cls in handlers:
            return handlers[cls]
    return None
