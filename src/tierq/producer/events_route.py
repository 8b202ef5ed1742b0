"""``GET /api/jobs/{id}/events`` as pure ASGI, ahead of FastAPI's routing.

An SSE connection lives for minutes and writes once per event: through the routing layers
(exception middleware, exit stacks, request handlers) each connection held ~12 KiB more and
each write passed half a dozen wrappers (measured: bench/streaming.py). Here the request is
checked by the same :func:`~tierq.producer.api.open_job_events` as the route, errors are
answered by the app's own exception handlers, and the response talks to the server directly.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from tierq.producer.api import open_job_events

_PATH = re.compile(r"/api/jobs/(?P<job_id>[^/]+)/events")


class JobEventsFastPath:
    """Serve job events; pass every other request on."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = None
        if scope["type"] == "http" and scope["method"] == "GET":
            match = _PATH.fullmatch(scope["path"])
        if match is None:
            await self.app(scope, receive, send)
            return
        # In its own call, so nothing of the request stays referenced while the stream runs.
        response = await self._open(scope, receive, match["job_id"])
        await response(scope, receive, send)

    async def _open(self, scope: Scope, receive: Receive, job_id: str) -> Response:
        request = Request(scope, receive)
        try:
            return await open_job_events(request.app.state.runtime, request, job_id)
        except Exception as exc:
            handler = _handler(request.app.exception_handlers, exc)
            if handler is None:
                raise
            answer: Response = await handler(request, exc)
            return answer


Handler = Callable[[Request, Exception], Awaitable[Response]]


def _handler(handlers: Mapping[Any, Handler], exc: Exception) -> Handler | None:
    for cls in type(exc).__mro__:
        if cls in handlers:
            return handlers[cls]
    return None
