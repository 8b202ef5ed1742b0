"""Following one job's events: replay its log, then take live entries from the tail hub, end
after the last event.

The SSE ``id`` of each message is the log entry id, so a reconnect with ``Last-Event-ID`` resumes
exactly after the last event the client saw. Live entries are checked against the job's dense
``seq``: the hub hands over this process's own deltas without reading them back, so an entry
written meanwhile by someone else may reach the follower after a later one, or not at all; a
gap (or a live batch with nothing sent before it to compare with) makes the follower read that
stretch of the log itself, so every entry still goes out once, in order.

Shutdown paths: the terminal event ends the stream; a resume at or after the terminal event
ends it at once; the job's log expiring ends it (noticed when idle); :meth:`JobFollower.close`
(the client went away) ends it at its next wait; a client too slow for its bounded backlog is
dropped by the hub and the stream ends (the client resumes with ``Last-Event-ID``).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable

import structlog

from tierq.events.codec import Entry, entry, stream_id
from tierq.events.hub import Rows, Subscription, TailHub
from tierq.events.log import JobStore

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
        self._phase = "replay"  # replay → backfill → live ⇄ check → drain → end
        self._until: str | None = None  # inclusive end of the read in progress
        self._replayed = False
        self._seq: int | None = None  # seq of the last entry sent
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
        """The entries of ``rows`` (in stream order) after this follower's position."""
        if not rows:
            return []
        if rows[0].pos <= self._last:  # rare: skip what this follower already has
            rows = [row for row in rows if row.pos > self._last]
            if not rows:
                return []
        last = rows[-1]
        self._last, self.after = last.pos, last.id
        return rows

    async def _upto_final(self, items: list[Entry]) -> tuple[list[Entry], bool]:
        """``items`` up to the job's final event, and whether it is among them."""
        for index, item in enumerate(items):
            if not item.terminal:
                continue
            state = await self.store.state(self.job_id)
            if state is not None and state.is_final(item.seq):
                return items[: index + 1], True
        return items, False

    async def batches(self) -> AsyncGenerator[list[Entry], None]:
        """Entries in order, each once, in the groups they arrived in; ``[]`` whenever
        ``idle_s`` passed without any (the caller may send a keep-alive).

        One generator over a small state machine (:meth:`_next`): an idle connection holds one
        suspended frame, not a stack of nested generators."""
        try:
            while (batch := await self._next()) is not None:
                items, final = batch, False
                if any(item.terminal for item in batch):
                    items, final = await self._upto_final(batch)
                if items:
                    self._seq = items[-1].seq
                if items or not batch:
                    yield items
                if final:
                    return
        finally:
            if self._sub is not None:
                self.hub.unsubscribe(self._sub)

    async def entries(self) -> AsyncGenerator[Entry, None]:
        """The entries one by one (no keep-alive markers)."""
        async for batch in self.batches():
            for item in batch:
                yield item

    async def _next(self) -> list[Entry] | None:
        """The next group of entries, ``[]`` after an idle interval, ``None`` at the end.
        Phases: replay the log → (backfill what the hub read before we joined) → live from
        the hub, checking the job when idle → drain what is left once it ended."""
        while not self.closed:
            if self._phase == "live":
                return await self._next_live()
            if self._phase == "check":
                ended = await self._ended()
                self._phase = "live" if ended is None else "drain" if ended else "end"
                continue
            if self._phase == "end":
                return None
            rows = await self._read(self.after, self._until)
            items = self._fresh(rows)
            if len(rows) < PAGE:
                await self._after_reading(replayed=bool(rows))
            if items:
                return items
        return None

    async def _after_reading(self, *, replayed: bool) -> None:
        """A read reached the end of what it was after: move to the next phase."""
        if self._phase == "replay":
            self._replayed = self._replayed or replayed
            if not self._replayed and await self._ended() is not None:
                self._phase = "end"  # a resume at or past the end, or a gone job
                return
            key = self.store.keys.job_events(self.job_id)
            self._sub = self.hub.subscribe(key, self.after, self._overflowed)
            self._until = self._sub.backfill_to
            self._phase = "backfill" if self._until is not None else "live"
        elif self._phase == "backfill":
            self._until, self._phase = None, "live"
        else:  # drained after the end
            self._phase = "end"

    async def _next_live(self) -> list[Entry] | None:
        assert self._sub is not None
        rows = await self._sub.next(self.idle_s)
        if self._sub.overflowed:
            return None
        if rows is None:  # idle: see whether the job ended (or expired) on the next turn
            self._phase = "check"
            return []
        last, after = self._last, self.after
        items = self._fresh(rows)
        if items and not self._dense(items):  # read what the hub did not bring, in order
            self._last, self.after = last, after
            return self._fresh(await self._read_through(items[-1].id))
        return items

    def _dense(self, items: list[Entry]) -> bool:
        """Whether ``items`` follow what was sent with no ``seq`` missing."""
        seq = self._seq
        if seq is None:
            return False  # nothing to compare with (a resume at the end): read to be sure
        for item in items:
            seq += 1
            if item.seq != seq:
                return False
        return True

    async def _read_through(self, until: str) -> Rows:
        """The log after this follower's position, up to ``until`` (inclusive)."""
        rows: Rows = []
        after = self.after
        while True:
            page = await self._read(after, until)
            rows.extend(page)
            if len(page) < PAGE:
                return rows
            after = page[-1].id

    async def _read(self, after: str, until: str | None) -> Rows:
        """A page of the log after ``after`` (up to ``until``), parsed."""
        rows = await self.store.read(self.job_id, after, PAGE, until=until)
        return [entry(entry_id, raw) for entry_id, raw in rows]

    async def _ended(self) -> bool | None:
        """``None`` while the job may still log events; ``True`` once it ended; ``False`` when
        its records are gone (expired, or never existed)."""
        state = await self.store.state(self.job_id)
        if state is None:
            return False
        return True if state.terminal else None
