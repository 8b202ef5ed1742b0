"""A lean SSE response (pure ASGI) for a job's events.

Two tasks per connection, nothing else: the request's own, which writes, and one that waits for
the client's disconnect and closes the follower (its next wait returns at once; after a
disconnect the server's ``send`` is a no-op, so the writer is never stuck on a gone client).
Entries that arrived together go out in one write. Keep-alive pings are sent only when idle.
Each write is bounded by ``send_timeout_s`` (one lazy timer per connection, not one per write);
a client whose backlog in the tail hub outgrows its bound is cut off at once, even in the middle
of a write that cannot complete (it resumes with ``Last-Event-ID``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

import structlog
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from tierq.aio import LazyDeadline
from tierq.events.codec import PING, sse_frame
from tierq.events.sse import JobFollower

log = structlog.get_logger("tierq.events")
HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"x-accel-buffering", b"no"),  # proxies (nginx) must not buffer the stream
]


class JobEventsResponse(Response):
    """Serve ``follower``'s entries as SSE until its stream ends or the client leaves."""

    def __init__(
        self,
        follower: JobFollower,
        *,
        send_timeout_s: float,
        on_open: Callable[[], None] | None = None,
        on_close: Callable[[JobFollower], None] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        # Not Response.__init__: it builds headers and a body this class never uses (and every
        # idle connection would hold them); FastAPI looks at ``background`` only.
        self.background = None
        self.status_code = 200
        self.follower = follower
        self.send_timeout_s = send_timeout_s
        self.on_open = on_open
        self.on_close = on_close
        self.head = (
            HEADERS + [(k.lower().encode(), v.encode()) for k, v in headers.items()]
            if headers
            else HEADERS
        )
        self._task: asyncio.Task[Any] | None = None  # the one writing
        self._writing = False  # a write is in progress
        self._send_deadline = LazyDeadline(self._abort_write)  # bounds the write in progress
        self._cut_off = False
        follower.on_drop = self._abort_write

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._task = asyncio.current_task()
        watcher = asyncio.create_task(self._watch(receive))
        if self.on_open is not None:
            self.on_open()
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.head})
            if await self._write(send):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()
            self.follower.close()
            if self.on_close is not None:
                self.on_close(self.follower)

    async def _write(self, send: Send) -> bool:
        """``False`` when a write was cut off (the connection is then closed, unfinished)."""
        batches = self.follower.batches()
        loop = asyncio.get_running_loop()
        try:
            async for batch in batches:
                body = b"".join(sse_frame(item) for item in batch) if batch else PING
                # A lazy deadline, not a timer per write: this runs once per event sent.
                self._writing = True
                self._send_deadline.arm(loop, loop.time() + self.send_timeout_s)
                try:
                    await send({"type": "http.response.body", "body": body, "more_body": True})
                except asyncio.CancelledError:
                    if not self._cut_off or self._task is None or self._task.uncancel():
                        raise  # cancelled from outside, too: that one is not ours to swallow
                    if not self.follower.dropped:
                        log.info("sse.send_timeout", job_id=self.follower.job_id)
                    return False
                finally:
                    self._writing = False
                    self._send_deadline.disarm()
        finally:
            self._send_deadline.cancel()
            await batches.aclose()
        return True

    def _abort_write(self) -> None:
        """End the write in progress now: it timed out, or the client is too slow for its
        backlog (the tail hub dropped it)."""
        if self._writing and self._task is not None and not self._cut_off:
            self._cut_off = True
            self._task.cancel()

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.follower.close()
