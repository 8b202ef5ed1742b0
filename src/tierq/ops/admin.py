"""The admin API under /api/admin (see docs/admin-api.md).

Every route needs the admin token. Queue and DLQ routes go through the runtime's QStash gateway
(:class:`tierq.broker.client.QStashGateway`), so they behave the same against Upstash and the
embedded broker; in-flight, admission and guard numbers come from tierq's Redis leases.
The queue lists (``GET /queues``, ``/overview``: what the dashboard and ``tierq queues list``
poll) take QStash's side from the shared snapshot (:mod:`tierq.ops.queue_metrics`), never from
QStash per request; one queue's view asks QStash at once. Every route that changes something
writes one audit record, whatever its outcome, then refreshes the snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from collections.abc import Iterator
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from redis.exceptions import RedisError

from tierq.broker.client import QStashGateway, QueueStatus
from tierq.broker.qstash_api import CURSOR_PATTERN, DLQ_ID_PATTERN, DLQ_PAGE_MAX, not_synced
from tierq.errors import Forbidden, NotFound, Unauthorized, UpstreamError
from tierq.events.state import JobState
from tierq.observability.logging import audit
from tierq.ops.qstash_admin import dlq_entry
from tierq.ops.queue_metrics import QueueCollector, QueueFacts, Snapshot
from tierq.ops.queue_state import force_configuration
from tierq.producer.api import cancel, job_view, runtime
from tierq.producer.auth import bearer, events_token
from tierq.queues import TIERS, QueueId, parse_queue
from tierq.runtime import Runtime

log = structlog.get_logger("tierq.admin")

_RETRY_CONCURRENCY = 8


async def require_admin(request: Request) -> None:
    """401 without a token, 403 with a wrong one (or when no admin token is configured)."""
    expected = runtime(request).settings.admin_token
    token = bearer(request)
    if token is None:
        audit("admin.denied", path=request.url.path, reason="missing_token")
        raise Unauthorized("missing admin token: send Authorization: Bearer <admin token>")
    if not expected or not hmac.compare_digest(token.encode(), expected.encode()):
        audit("admin.denied", path=request.url.path, reason="invalid_token")
        raise Forbidden("invalid admin token")


router = APIRouter(prefix="/api/admin", dependencies=[Depends(require_admin)])


def qstash_gateway(request: Request) -> QStashGateway:
    """The runtime's QStash gateway (queues and the DLQ)."""
    return runtime(request).gateway


Gateway = Annotated[QStashGateway, Depends(qstash_gateway)]


def queue_collector(request: Request) -> QueueCollector:
    """The process's shared queue snapshot (started by the app's lifespan)."""
    found: QueueCollector = request.app.state.queue_metrics
    return found


Collector = Annotated[QueueCollector, Depends(queue_collector)]


async def refreshed(collector: QueueCollector) -> Snapshot | None:
    """A fresh snapshot after a change, so that the next list shows it; ``None`` when it
    could not be taken (the change stands; the next tick tries again)."""
    try:
        return await collector.refresh()
    except UpstreamError as exc:
        log.warning("admin.snapshot_failed", error=str(exc))
        return None


@contextlib.contextmanager
def audited(action: str, **fields: Any) -> Iterator[dict[str, Any]]:
    """Audit ``action`` once the block ends: ``outcome`` ok or error, plus whatever the block
    put in the yielded dict. Never give it the token."""
    result: dict[str, Any] = {}
    try:
        yield result
    except BaseException as exc:
        audit(action, outcome="error", error=type(exc).__name__, **fields, **result)
        raise
    audit(action, outcome="ok", **fields, **result)


def queue_or_404(queue_id: str) -> QueueId:
    try:
        return QueueId(queue_id)
    except ValueError:
        raise NotFound(
            f"{queue_id!r} is not one of the six queues", code="queue_not_found"
        ) from None


# -- queues ---------------------------------------------------------------------------------


async def _qstash_queue(rt: Runtime, queue: QueueId) -> QueueStatus | None:
    """QStash's record of the queue; ``None`` when QStash does not have it (never synced)."""
    return await rt.gateway.find_queue(queue.value)


async def tierq_side(rt: Runtime, queue: QueueId) -> dict[str, Any]:
    """What tierq's Redis says of ``queue`` now (cheap: no QStash call)."""
    in_flight, admitted, dispatch = await asyncio.gather(
        rt.leases.count(rt.keys.queue_slots(queue.value)),
        rt.leases.count(rt.keys.admission(queue.value)),
        rt.dispatcher.queue_stats(queue.value),
    )
    return {"inFlight": in_flight, "admitted": admitted, "dispatch": dispatch}


def _queue(
    rt: Runtime, queue: QueueId, qstash: dict[str, Any], ours: dict[str, Any]
) -> dict[str, Any]:
    """The ``Queue`` view: ``qstash`` has parallelism, paused, lag and dlq."""
    tier, experience = parse_queue(queue)
    conf = rt.settings.queues.get(queue)
    return {
        "queueId": queue.value,
        "tier": tier,
        "experience": experience,
        "parallelism": qstash["parallelism"],
        "paused": qstash["paused"],
        "lag": qstash["lag"],
        "inFlight": ours["inFlight"],
        "admitted": ours["admitted"],
        "admissionDepth": conf.admission_depth if conf else None,
        "dlq": qstash["dlq"],
        **ours["dispatch"],
    }


async def queue_view(rt: Runtime, queue: QueueId, dlq_size: int) -> dict[str, Any]:
    """One queue, QStash and Redis asked now."""
    q, ours = await asyncio.gather(_qstash_queue(rt, queue), tierq_side(rt, queue))
    qstash = {
        "parallelism": q.parallelism if q else None,
        "paused": q.paused if q else None,
        "lag": q.lag if q else 0,
        "dlq": dlq_size,
    }
    return _queue(rt, queue, qstash, ours)


def _from_snapshot(facts: QueueFacts | None) -> dict[str, Any]:
    if facts is None:
        return {"parallelism": None, "paused": None, "lag": 0, "dlq": 0}
    return {
        "parallelism": facts.parallelism,
        "paused": facts.paused,
        "lag": facts.lag,
        "dlq": facts.dlq,
    }


async def listed_views(rt: Runtime, snap: Snapshot) -> list[dict[str, Any]]:
    """The six queues in routing-table order: QStash's side from ``snap``, tierq's now."""
    ours = await asyncio.gather(*(tierq_side(rt, q) for q in QueueId))
    return [
        _queue(rt, q, _from_snapshot(snap.queues.get(q.value)), mine)
        for q, mine in zip(QueueId, ours, strict=True)
    ]


async def one_queue_view(rt: Runtime, gateway: QStashGateway, queue: QueueId) -> dict[str, Any]:
    return await queue_view(rt, queue, len(await gateway.dlq_all(queue=queue.value)))


async def _listing(rt: Runtime, snap: Snapshot) -> dict[str, Any]:
    return {"queues": await listed_views(rt, snap), "asOf": snap.at_ms}


@router.get("/queues")
async def list_queues(request: Request, collector: Collector) -> dict[str, Any]:
    return await _listing(runtime(request), await collector.snapshot())


@router.post("/queues/sync")
async def sync_queues(request: Request, collector: Collector) -> dict[str, Any]:
    """Upsert all six from configuration (parallelism and paused), forgetting operators'
    changes."""
    rt = runtime(request)
    with audited("queue.sync", queues=[q.value for q in rt.settings.queues]) as out:
        out["previous"] = await force_configuration(rt)
    snap = await refreshed(collector) or await collector.snapshot()
    return await _listing(rt, snap)


@router.get("/queues/{queue_id}")
async def get_queue(queue_id: str, request: Request, gateway: Gateway) -> dict[str, Any]:
    return await one_queue_view(runtime(request), gateway, queue_or_404(queue_id))


async def _set_paused(
    request: Request, gateway: Gateway, collector: QueueCollector, queue_id: str, paused: bool
) -> dict[str, Any]:
    rt = runtime(request)
    queue = queue_or_404(queue_id)
    action = "queue.pause" if paused else "queue.resume"
    with audited(action, queue=queue.value):
        await rt.gateway.set_paused(queue.value, paused, what=f"{action} {queue.value}")
        await rt.dispatcher.set_queue(queue.value, paused=paused)
    await refreshed(collector)
    return await one_queue_view(rt, gateway, queue)


@router.post("/queues/{queue_id}/pause")
async def pause_queue(
    queue_id: str, request: Request, gateway: Gateway, collector: Collector
) -> dict[str, Any]:
    return await _set_paused(request, gateway, collector, queue_id, True)


@router.post("/queues/{queue_id}/resume")
async def resume_queue(
    queue_id: str, request: Request, gateway: Gateway, collector: Collector
) -> dict[str, Any]:
    return await _set_paused(request, gateway, collector, queue_id, False)


class ParallelismBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    parallelism: int = Field(ge=1, strict=True)


@router.put("/queues/{queue_id}/parallelism")
async def set_parallelism(
    queue_id: str, body: ParallelismBody, request: Request, gateway: Gateway, collector: Collector
) -> dict[str, Any]:
    """Until changed again or the next sync (restarts keep it)."""
    rt = runtime(request)
    queue = queue_or_404(queue_id)
    with audited("queue.parallelism", queue=queue.value, parallelism=body.parallelism) as out:
        current = await _qstash_queue(rt, queue)
        if current is None:
            raise not_synced(f"queue.parallelism {queue.value}")
        out["previous"] = current.parallelism
        # QStash's upsert sets both fields, so the queue's paused state is carried over.
        await rt.gateway.set_parallelism(
            queue.value,
            body.parallelism,
            paused=current.paused,
            what=f"queue.parallelism {queue.value}",
        )
        await rt.dispatcher.set_queue(queue.value, parallelism=body.parallelism)
    await refreshed(collector)
    return await one_queue_view(rt, gateway, queue)


# -- dead-letter queue ----------------------------------------------------------------------


# DLQ ids are checked where they arrive (422), because they end up in QStash URL paths.
DlqId = Annotated[str, Field(pattern=DLQ_ID_PATTERN)]
DlqIdPath = Annotated[str, Path(pattern=DLQ_ID_PATTERN)]


class DlqIdsBody(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    dlq_ids: list[DlqId] = Field(alias="dlqIds", min_length=1, max_length=DLQ_PAGE_MAX)


@router.get("/dlq")
async def list_dlq(
    gateway: Gateway,
    queue_id: Annotated[str | None, Query(alias="queueId")] = None,
    cursor: Annotated[str | None, Query(pattern=CURSOR_PATTERN)] = None,
    count: Annotated[int, Query(ge=1, le=DLQ_PAGE_MAX)] = DLQ_PAGE_MAX,
    response_status: Annotated[int | None, Query(alias="responseStatus", ge=100, le=599)] = None,
) -> dict[str, Any]:
    queue = queue_or_404(queue_id).value if queue_id else None
    page = await gateway.dlq_page(
        cursor=cursor or None, count=count, queue=queue, response_status=response_status
    )
    reply: dict[str, Any] = {"messages": [dlq_entry(m) for m in page.messages]}
    if page.cursor:
        reply["cursor"] = page.cursor
    return reply


@router.post("/dlq/retry")
async def retry_dlq(body: DlqIdsBody, gateway: Gateway, collector: Collector) -> dict[str, Any]:
    """Each entry becomes a new message in its queue; entries already gone are ``missing``."""
    limit = asyncio.Semaphore(_RETRY_CONCURRENCY)

    async def one(dlq_id: str) -> str | None:
        async with limit:
            return await gateway.dlq_retry(dlq_id)

    with audited("dlq.retry", dlq_ids=body.dlq_ids) as out:
        message_ids = await asyncio.gather(*(one(d) for d in body.dlq_ids))
        retried = [
            {"dlqId": d, "messageId": m}
            for d, m in zip(body.dlq_ids, message_ids, strict=True)
            if m
        ]
        missing = [d for d, m in zip(body.dlq_ids, message_ids, strict=True) if m is None]
        out.update(retried=retried, missing=missing)
    await refreshed(collector)
    return {"retried": retried, "missing": missing}


@router.delete("/dlq")
async def delete_many_dlq(
    body: DlqIdsBody, gateway: Gateway, collector: Collector
) -> dict[str, Any]:
    with audited("dlq.delete", dlq_ids=body.dlq_ids) as out:
        out["deleted"] = deleted = await gateway.dlq_delete_many(body.dlq_ids)
    await refreshed(collector)
    return {"deleted": deleted}


@router.get("/dlq/{dlq_id}")
async def get_dlq(dlq_id: DlqIdPath, gateway: Gateway) -> dict[str, Any]:
    raw = await gateway.dlq_get(dlq_id)
    if raw is None:
        raise NotFound(f"dlq entry {dlq_id} not found", code="dlq_not_found")
    return dlq_entry(raw)


@router.delete("/dlq/{dlq_id}")
async def delete_dlq(dlq_id: DlqIdPath, gateway: Gateway, collector: Collector) -> dict[str, Any]:
    with audited("dlq.delete", dlq_ids=[dlq_id]) as out:
        out["deleted"] = int(await gateway.dlq_delete(dlq_id))
        if not out["deleted"]:
            raise NotFound(f"dlq entry {dlq_id} not found", code="dlq_not_found")
    await refreshed(collector)
    return {"deleted": 1}


# -- jobs -----------------------------------------------------------------------------------


async def _job_state(rt: Runtime, job_id: str) -> JobState:
    state = await rt.jobs.state(job_id)
    if state is None:
        raise NotFound(f"job {job_id} not found", code="job_not_found")
    return state


@router.get("/jobs/{job_id}")
async def get_job(job_id: str, request: Request) -> dict[str, Any]:
    rt = runtime(request)
    state = await _job_state(rt, job_id)
    view = job_view(job_id, state)
    view.update(
        userId=state.user_id,
        messageId=state.message_id,
        eventsToken=events_token(rt.settings.events_secret or "", job_id),
    )
    return view


@router.delete("/jobs/{job_id}")
async def cancel_admin_job(job_id: str, request: Request) -> dict[str, Any]:
    rt = runtime(request)
    with audited("job.cancel", job_id=job_id) as out:
        state = await _job_state(rt, job_id)
        reply = await cancel(rt, job_id, state)
        out["status"] = reply["status"]
    return reply


# -- guards and overview --------------------------------------------------------------------


async def model_guards(rt: Runtime) -> list[dict[str, Any]]:
    rows = [
        (m, t, conf.limits.for_tier(t)) for m, conf in rt.settings.models.items() for t in TIERS
    ]
    holders = await asyncio.gather(
        *(rt.leases.holders(rt.keys.model_guard(m, t)) for m, t, _ in rows)
    )
    moved = await rt.dispatcher.model_limits()  # adaptive limits under the configured ones

    def effective(model: str, tier: str, limit: int) -> int:
        now = moved.get(rt.keys.model_guard(model, tier))
        return limit if now is None else max(1, min(limit, int(now)))

    return [
        {"modelId": m, "tier": t, "running": len(jobs), "limit": limit,
         "effectiveLimit": effective(m, t, limit), "jobs": jobs}
        for (m, t, limit), jobs in zip(rows, holders, strict=True)
    ]  # fmt: skip


async def _user_guard_keys(rt: Runtime) -> list[str]:
    try:
        found = [k async for k in rt.redis.scan_iter(match=rt.keys.user_guard_pattern, count=500)]
    except RedisError as exc:
        raise UpstreamError(f"redis: {exc}") from exc
    return sorted({k.decode() if isinstance(k, bytes) else str(k) for k in found})


async def user_guards(rt: Runtime) -> list[dict[str, Any]]:
    """Users with a live lease; ``limit`` is ``None`` for a user no configured key belongs to."""
    prefix = rt.keys.user_guard("")
    keys = await _user_guard_keys(rt)
    holders = await asyncio.gather(*(rt.leases.holders(k) for k in keys))
    plans = {u.id: u.plan for u in rt.settings.api_keys.values()}
    out = []
    for key, jobs in zip(keys, holders, strict=True):
        user = key.removeprefix(prefix)
        if jobs:
            plan = plans.get(user)
            limit = rt.settings.user_limits.for_tier(plan) if plan else None
            out.append({"userId": user, "running": len(jobs), "limit": limit, "jobs": jobs})
    return out


async def guards(rt: Runtime) -> dict[str, Any]:
    models, users = await asyncio.gather(model_guards(rt), user_guards(rt))
    return {"models": models, "users": users}


@router.get("/guards")
async def get_guards(request: Request) -> dict[str, Any]:
    return await guards(runtime(request))


@router.get("/overview")
async def overview(request: Request, collector: Collector) -> dict[str, Any]:
    """What the dashboard polls: queues, guards, DLQ size and the job counters (QStash's side
    from the shared snapshot: no QStash call per viewer)."""
    rt = runtime(request)
    snap = await collector.snapshot()
    queues, guard_view = await asyncio.gather(listed_views(rt, snap), guards(rt))
    return {
        "queues": queues,
        "guards": guard_view,
        "dlqSize": snap.dlq_size,
        "asOf": snap.at_ms,
        "counters": rt.metrics.counters([q.value for q in QueueId]),
    }
