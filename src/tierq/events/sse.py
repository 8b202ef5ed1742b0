"""Following one job's events: replay its log, then take live entries from the tail hub, end
after the last event.

The SSE ``id`` of each message is the log entry id, so a reconnect with ``Last-Event-ID`` resumes
exactly after the last event the client saw. Shutdown paths: the terminal event ends the
stream; a resume at or after the terminal event ends it at once; the job's log expiring ends it
(noticed when idle); :meth:`JobFollower.close` (the client went away) ends it at its next wait;
a client too slow for its bounded backlog is dropped by the hub and the stream ends (the client
resumes with ``Last-Event-ID``).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable

import structlog

from tierq.contracts import TERMINAL_STATUSES
from tierq.events.codec import Entry, entry, stream_id
from tierq.events.hub import Rows, Subscription, TailHub
from tierq.events.log import JobStore, is_final

log = structlog.get_logger("tierq.events")
PAGE = 500
"""Entries per replay read: a long log is replayed a page at a time, paced by the client."""


class JobFollower:
    """One reader of one job's log (see :meth:`batches`)."""

    def __init__(
        self, store: JobStore, hub: TailHub, job_id: str, after: str | None, idle_s: float
    ) -> None:
        self.store, self.hub, self.job_id, self.idle_s = store, hub, job_id, idle_s
        self.after = after or "0-0"
        self._last = stream_id(self.after)
        self._sub: Subscription | None = None
        self.closed = False
        self.dropped = False  # ended because the client could not keep up
        self.on_drop: Callable[[], None] | None = None  # e.g. abort the client's blocked write

    def _overflowed(self) -> None:
        self.dropped = True
        log.info("sse.dropped_slow_client", job_id=self.job_id, after=self.after)
        if self.on_drop is not None:
            self.on_drop()

    def close(self) -> None:
        self.closed = True
        if self._sub is not None:
            self._sub.close()

    def _fresh(self, rows: Rows) -> list[Entry]:
        out = []
        for entry_id, raw in rows:
            position = stream_id(entry_id)
            if position > self._last:
                self._last, self.after = position, entry_id
                out.append(entry(entry_id, raw))
        return out

    async def _upto_final(self, items: list[Entry]) -> tuple[list[Entry], bool]:
        """``items`` up to the job's final event, and whether it is among them."""
        for index, item in enumerate(items):
            if item.terminal and is_final(await self.store.state(self.job_id), item.seq):
                return items[: index + 1], True
        return items, False

    async def batches(self) -> AsyncGenerator[list[Entry], None]:
        """Entries in order, each once, in the groups they arrived in; ``[]`` whenever
        ``idle_s`` passed without any (the caller may send a keep-alive)."""
        async for batch in self._batches():
            items, final = await self._upto_final(batch)
            if items or not batch:
                yield items
            if final:
                return

    async def entries(self) -> AsyncGenerator[Entry, None]:
        """The entries one by one (no keep-alive markers)."""
        async for batch in self.batches():
            for item in batch:
                yield item

    async def _batches(self) -> AsyncIterator[list[Entry]]:
        replayed = False
        async for items in self._read(until=None):
            replayed = True
            yield items
        if self.closed or (not replayed and await self._ended() is not None):
            return  # closed, or a resume at or past the end (or of a gone job): nothing to wait for
        key = self.store.keys.job_events(self.job_id)
        self._sub = sub = self.hub.subscribe(key, self.after, self._overflowed)
        try:
            if sub.backfill_to is not None:
                async for items in self._read(until=sub.backfill_to):
                    yield items
            async for items in self._live(sub):
                yield items
        finally:
            self.hub.unsubscribe(sub)

    async def _read(self, until: str | None) -> AsyncIterator[list[Entry]]:
        """The log after our position (up to ``until``, inclusive), a page at a time."""
        while not self.closed:
            rows = await self.store.read(self.job_id, self.after, PAGE, until=until)
            items = self._fresh(rows)
            if items:
                yield items
            if len(rows) < PAGE:
                return

    async def _live(self, sub: Subscription) -> AsyncIterator[list[Entry]]:
        while not self.closed:
            rows = await sub.next(self.idle_s)
            if sub.overflowed:
                return
            if rows is None:
                yield []
                ended = await self._ended()
                if ended is not None:  # gone, or over: read what is left ourselves, and stop
                    if ended:
                        async for items in self._read(until=None):
                            yield items
                    return
                continue
            items = self._fresh(rows)
            if items:
                yield items

    async def _ended(self) -> bool | None:
        """``None`` while the job may still log events; ``True`` once it ended; ``False`` when
        its records are gone (expired, or never existed)."""
        state = await self.store.state(self.job_id)
        if state is None:
            return False
        return True if state.get("status") in TERMINAL_STATUSES else None
