"""Server-Sent Events for one job: replay its log, then tail it live, end after the last event.

The SSE ``id`` of each message is the log entry id, so a reconnect with ``Last-Event-ID`` resumes
exactly after the last event the client saw. Shutdown paths: the terminal event ends the
stream; a resume at or after the terminal event ends it at once; the job's log expiring ends
it; a client disconnect makes sse-starlette cancel this generator, which cancels the pending
``XREAD`` at once (the Redis tail stops with the client).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from sse_starlette import ServerSentEvent

from tierq.contracts import TERMINAL_STATUSES, is_terminal, parse_event
from tierq.events.log import JobStore, is_final


async def _after_the_end(store: JobStore, job_id: str, after: str) -> list[tuple[str, str]] | None:
    """Entries after ``after`` when the job has ended or is gone: ``None`` means nothing more
    will ever come; a list holds what landed since (the terminal event, at most a few)."""
    state = await store.state(job_id)
    if state is None:
        return None  # the job's records expired (or never existed)
    if state.get("status") not in TERMINAL_STATUSES:
        return []
    return await store.read(job_id, after) or None


async def job_event_stream(
    store: JobStore, job_id: str, last_event_id: str | None, block_ms: int
) -> AsyncIterator[ServerSentEvent]:
    after = last_event_id or "0-0"
    if last_event_id:  # a resume may already be past the end: do not block waiting for it
        rows: list[tuple[str, str]] | None = await store.read(job_id, after)
        rows = rows or await _after_the_end(store, job_id, after)
    else:
        rows = []
    while rows is not None:
        if not rows:
            # One XREAD per wake-up; it returns at once when entries are already there.
            rows = await store.tail(job_id, after, block_ms) or await _after_the_end(
                store, job_id, after
            )
            continue
        for entry_id, raw in rows:
            after = entry_id
            event = parse_event(raw)
            yield ServerSentEvent(data=raw, event=event.type, id=entry_id)
            if is_terminal(event) and is_final(await store.state(job_id), event.seq):
                return
        rows = []
