"""The dead-letter queue and the event log (``/v2/events``, alias ``/v2/logs``)."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tierq.broker.server.context import (
    BrokerContext,
    authenticate,
    count_param,
    decode_cursor,
    encode_cursor,
    json_body,
    now_ms,
    ok,
    query_list,
)
from tierq.broker.server.credentials import Account
from tierq.broker.server.model import dlq_wire
from tierq.broker.server.requests import build_message, check_allowed, split_headers
from tierq.broker.server.routes_messages import incoming_of
from tierq.broker.server.signing import random_id
from tierq.broker.server.store import DlqEntry
from tierq.errors import ClientError, NotFound

DLQ_PAGE_MAX = 100
EVENTS_PAGE_MAX = 1000
EVENTS_SCAN_MAX = 100_000
_SCAN_CHUNK = 500


def _int_param(request: Request, name: str) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ClientError(f"{name} must be an integer") from None


def _dlq_matches(entry: DlqEntry, request: Request) -> bool:
    q = request.query_params
    msg = entry.msg
    checks: list[tuple[str | None, Any]] = [
        (q.get("messageId"), msg.id),
        (q.get("url"), msg.url),
        (q.get("queueName"), msg.queue),
        (q.get("callerIp"), msg.caller_ip),
    ]
    if any(wanted is not None and wanted != actual for wanted, actual in checks):
        return False
    if q.get("topicName") or q.get("scheduleId"):
        return False  # the broker has no URL groups or schedules yet, so nothing matches
    labels = query_list(request, "label")
    if labels and not set(labels) & set(msg.labels):
        return False
    ids = query_list(request, "dlqIds")
    if ids and entry.dlq_id not in ids:
        return False
    status = _int_param(request, "responseStatus")
    from_ms, to_ms = _int_param(request, "fromDate"), _int_param(request, "toDate")
    return not (
        (status is not None and entry.response.status != status)
        or (from_ms is not None and entry.time_ms < from_ms)
        or (to_ms is not None and entry.time_ms > to_ms)
    )


async def _dlq_page(
    context: BrokerContext, account: Account, request: Request
) -> tuple[list[DlqEntry], str | None]:
    """One page of matching DLQ entries and the cursor of the next (``None`` on the last)."""
    ids = await context.store.dlq_ids(account.user)
    if request.query_params.get("order") == "latestFirst":
        ids.reverse()
    after = decode_cursor(request.query_params.get("cursor"))
    if after is not None:
        position = next((i for i, (d, _) in enumerate(ids) if d == after), None)
        ids = ids[position + 1 :] if position is not None else []
    count = count_param(request, DLQ_PAGE_MAX, DLQ_PAGE_MAX)
    entries = [
        e for e in await context.store.dlq_entries(account.user, ids) if _dlq_matches(e, request)
    ]
    page = entries[:count]
    cursor = encode_cursor(page[-1].dlq_id) if len(entries) > count else None
    return page, cursor


async def list_dlq(request: Request) -> Response:
    context, account = authenticate(request)
    page, cursor = await _dlq_page(context, account, request)
    reply: dict[str, Any] = {
        "messages": [dlq_wire(e.msg, e.body, e.response, e.dlq_id) for e in page]
    }
    if cursor:
        reply["cursor"] = cursor
    return ok(reply)


async def get_dlq(request: Request) -> Response:
    context, account = authenticate(request)
    entry = await context.store.dlq_get(account.user, request.path_params["id"])
    return ok(dlq_wire(entry.msg, entry.body, entry.response, entry.dlq_id))


async def delete_dlq(request: Request) -> Response:
    context, account = authenticate(request)
    if not await context.store.dlq_delete(account.user, [request.path_params["id"]]):
        raise NotFound(f"dlq message {request.path_params['id']} not found")
    return ok({})


async def _selected_ids(
    context: BrokerContext, account: Account, request: Request, body_key: str | None
) -> tuple[list[str], str | None]:
    """DLQ ids named by the JSON body (Python SDK), by ``dlqIds``, or by filters."""
    body = await json_body(request) if body_key else None
    if isinstance(body, dict) and body_key in body:
        # An explicit list selects exactly those entries; an empty one selects none.
        return [str(i) for i in body[body_key] or []], None
    named = query_list(request, "dlqIds")
    if named and not any(k != "dlqIds" for k in request.query_params):
        return named, None
    page, cursor = await _dlq_page(context, account, request)
    return [e.dlq_id for e in page], cursor


async def delete_many_dlq(request: Request) -> Response:
    context, account = authenticate(request)
    ids, cursor = await _selected_ids(context, account, request, "dlqIds")
    reply: dict[str, Any] = {"deleted": await context.store.dlq_delete(account.user, ids)}
    if cursor:
        reply["cursor"] = cursor
    return ok(reply)


async def _retry(
    context: BrokerContext, account: Account, request: Request, dlq_ids: list[str]
) -> list[str | None]:
    """Re-publish DLQ entries as new messages, each consuming its entry atomically."""
    overrides = split_headers(request.headers.items(), request.query_params.multi_items())
    now = now_ms()
    entries = {
        e.dlq_id: e
        for e in await context.store.dlq_entries(account.user, [(d, 0) for d in dlq_ids])
    }
    items, consumed = [], []
    for dlq_id in dlq_ids:
        entry = entries.get(dlq_id)
        if entry is None:
            continue
        msg, _ = build_message(
            message_id=random_id("msg_"),
            user=account.user,
            dest=entry.msg.url,
            body=entry.body,
            incoming=incoming_of(entry.msg, overrides),
            queue=entry.msg.queue,
            now_ms=now,
            caller_ip=entry.msg.caller_ip,
            limits=context.settings,
        )
        check_allowed(msg, context.allow)
        items.append((msg, entry.body, now))
        consumed.append(dlq_id)
    if not items:
        return []
    results = await context.store.accept_many(items, now, consume_dlq=consumed)
    context.dispatcher.wake()
    return [message_id if code == 1 else None for code, message_id in results]


async def retry_dlq(request: Request) -> Response:
    context, account = authenticate(request)
    dlq_id = request.path_params["id"]
    results = await _retry(context, account, request, [dlq_id])
    if not results or results[0] is None:
        raise NotFound(f"dlq message {dlq_id} not found")
    return ok({"messageId": results[0]}, 201)


async def retry_many_dlq(request: Request) -> Response:
    context, account = authenticate(request)
    ids, cursor = await _selected_ids(context, account, request, "dlqIds")
    results = await _retry(context, account, request, ids)
    reply: dict[str, Any] = {"responses": [{"messageId": m} for m in results if m]}
    if cursor:
        reply["cursor"] = cursor
    return ok(reply, 201)


_STATE_GROUPS = {"IN_PROGRESS": {"ACTIVE", "RETRY", "ERROR"}}


def _event_filter(request: Request, user: str) -> Any:
    q = request.query_params
    ids = set(query_list(request, "messageIds")) | set(query_list(request, "messageId"))
    states: set[str] = set()
    for state in query_list(request, "state"):
        states |= _STATE_GROUPS.get(state.upper(), {state.upper()})
    labels = set(query_list(request, "label"))
    exact = {k: q.get(k) for k in ("url", "queueName") if q.get(k)}
    from_ms, to_ms = _int_param(request, "fromDate"), _int_param(request, "toDate")
    impossible = bool(q.get("topicName") or q.get("scheduleId"))

    def keep(event: dict[str, Any]) -> bool:
        return not (
            impossible
            or event.get("_u") != user
            or (ids and event["messageId"] not in ids)
            or (states and event["state"] not in states)
            or (labels and not labels & set(event.get("labels", [])))
            or any(event.get(k) != v for k, v in exact.items())
            or (from_ms is not None and event["time"] < from_ms)
            or (to_ms is not None and event["time"] > to_ms)
        )

    return keep


async def list_events(request: Request) -> Response:
    """Newest first; the cursor is where the scan stopped, absent once the log is exhausted."""
    context, account = authenticate(request)
    count = count_param(request, 100, EVENTS_PAGE_MAX)
    keep = _event_filter(request, account.user)
    cursor = decode_cursor(request.query_params.get("cursor"))
    start = f"({cursor}" if cursor else "+"
    found: list[dict[str, Any]] = []
    scanned, last_id, exhausted = 0, None, False
    while len(found) < count and scanned < EVENTS_SCAN_MAX:
        rows = await context.store.events_page(start, _SCAN_CHUNK)
        stopped_early = False
        for index, (row_id, event) in enumerate(rows):
            last_id = row_id
            if keep(event):
                found.append({k: v for k, v in event.items() if k != "_u"})
            if len(found) == count:
                stopped_early = index < len(rows) - 1
                break
        scanned += len(rows)
        if len(rows) < _SCAN_CHUNK and not stopped_early:
            exhausted = True
            break
        start = f"({last_id}"
    reply: dict[str, Any] = {"events": found}
    if request.url.path.endswith("/logs"):
        reply["logs"] = found
    if not exhausted and last_id is not None:
        reply["cursor"] = encode_cursor(last_id)
    return ok(reply)


ROUTES = [
    Route("/v2/dlq", list_dlq, methods=["GET"]),
    Route("/v2/dlq", delete_many_dlq, methods=["DELETE"]),
    Route("/v2/dlq/retry", retry_many_dlq, methods=["POST"]),
    Route("/v2/dlq/retry/{id}", retry_dlq, methods=["POST"]),
    Route("/v2/dlq/{id}", get_dlq, methods=["GET"]),
    Route("/v2/dlq/{id}", delete_dlq, methods=["DELETE"]),
    Route("/v2/events", list_events, methods=["GET"]),
    Route("/v2/logs", list_events, methods=["GET"]),
]
