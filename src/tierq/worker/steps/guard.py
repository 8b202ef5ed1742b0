"""Step 3: hold the job's leases — its queue slot, its user's and its model+tier's.

The dispatcher took them when it published the job, so a delivery normally finds them held by
its job id. One that arrives without them (a retry after a failed attempt, a DLQ retry, a lease
that expired while QStash held the message) takes them now, all or none. When one is full the
job goes back to the front of its user's line, parked, with a ``waiting`` event, and the
delivery ends (``200 parked``): the dispatcher publishes it again the moment a release makes
room. Nothing waits inside a delivery, polls, or spends a QStash retry on a full guard.
"""

from __future__ import annotations

import secrets

from tierq.contracts import WorkerBody
from tierq.dispatch.dispatcher import Parked
from tierq.observability.logging import log_job_event
from tierq.runtime import Runtime
from tierq.worker.result import Err, Ok, Reply, Result, done


async def guard(
    rt: Runtime,
    body: WorkerBody,
    raw: bytes,
    message_id: str,
    full: str | None = None,
    *,
    early: bool = False,
) -> Result[list[tuple[str, str]], Reply]:
    """``Ok(leases held)`` or ``Err(reply)`` once the job is parked again; ``full`` is what the
    delivery's claim answered (:meth:`Dispatcher.claim_with_state`), else it claims now. A
    local run that started as its publish went out (``early``: no ``message_id`` yet) parks
    under its message's id once the publish answered (one of its own if it failed)."""
    if full is None:
        full = await rt.dispatcher.claim(body)
    if full == "ok":
        return Ok(rt.dispatcher.leases(body))
    if early:
        message_id = await rt.local.message_of(body.job_id)
    rt.metrics.guard_waits.labels(full).inc()
    parked = await park_again(rt, body, raw, message_id)
    log_job_event("waiting", rt.settings.log_sample_rates, guard=full, parked=parked.reason)
    if not parked.dispatched:
        await rt.jobs.append(parked.event(body.job_id), if_queued=True)
    return Err(done("parked", guard=full))


async def park_again(rt: Runtime, body: WorkerBody, raw: bytes, message_id: str) -> Parked:
    """Put the job back at the front of its user's line, deduplicated by this message (two
    deliveries of one message park it once); a run with no message (a local run whose publish
    failed) parks under an id of its own."""
    suffix = message_id or f"unpublished-{secrets.token_hex(6)}"
    return await rt.dispatcher.park(body, raw, dedup_id=f"{body.job_id}.{suffix}", front=True)
