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
from collections.abc import Callable
from typing import Any

import structlog
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from tierq.events.codec import PING, sse_frame
from tierq.events.hub import TIMER_SLACK_S
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
    ) -> None:
        # Not Response.__init__: it builds headers and a body this class never uses (and every
        # idle connection would hold them); FastAPI looks at ``background`` only.
        self.background = None
        self.status_code = 200
        self.follower = follower
        self.send_timeout_s = send_timeout_s
        self.on_open = on_open
        self.on_close = on_close
        self._task: asyncio.Task[Any] | None = None  # the one writing
        self._writing: float | None = None  # when the write in progress began (loop time)
        self._timer: asyncio.TimerHandle | None = None  # the lazy send timer (see _write)
        self._cut_off = False
        follower.on_drop = self._abort_write

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._task = asyncio.current_task()
        watcher = asyncio.create_task(self._watch(receive))
        if self.on_open is not None:
            self.on_open()
        try:
            await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
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
                # One lazy timer, not one per write (this runs once per event sent): it fires
                # at most once per send_timeout_s and re-arms for the write then in progress.
                self._writing = loop.time()
                if self._timer is None:
                    self._timer = loop.call_at(self._writing + self.send_timeout_s, self._check)
                try:
                    await send({"type": "http.response.body", "body": body, "more_body": True})
                except asyncio.CancelledError:
                    if not self._cut_off or self._task is None or self._task.uncancel():
                        raise  # cancelled from outside, too: that one is not ours to swallow
                    if not self.follower.dropped:
                        log.info("sse.send_timeout", job_id=self.follower.job_id)
                    return False
                finally:
                    self._writing = None
        finally:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            await batches.aclose()
        return True

    def _check(self) -> None:
        """The lazy send timer: cut off a write that has lasted ``send_timeout_s``."""
        self._timer = None
        if self._writing is None:
            return  # not writing now: the next write arms a timer again
        loop = asyncio.get_running_loop()
        deadline = self._writing + self.send_timeout_s
        if loop.time() + TIMER_SLACK_S >= deadline:
            self._abort_write()
        else:
            self._timer = loop.call_at(deadline, self._check)

    def _abort_write(self) -> None:
        """End the write in progress now: it timed out, or the client is too slow for its
        backlog (the tail hub dropped it)."""
        if self._writing is not None and self._task is not None and not self._cut_off:
            self._cut_off = True
            self._task.cancel()

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.follower.close()
