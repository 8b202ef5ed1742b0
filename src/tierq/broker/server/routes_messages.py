"""Publish, enqueue, batch; get and cancel messages."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tierq.broker.server.context import (
    BrokerContext,
    authenticate,
    error,
    json_body,
    now_ms,
    ok,
    query_list,
    read_body,
)
from tierq.broker.server.credentials import Account
from tierq.broker.server.model import StoredMessage, message_wire
from tierq.broker.server.requests import (
    Incoming,
    build_message,
    check_allowed,
    destination_from_raw,
    split_headers,
)
from tierq.broker.server.signing import random_id
from tierq.errors import ClientError, LimitExceeded, NotFound


def _raw_rest(request: Request, prefix: str) -> str:
    raw = request.scope.get("raw_path") or request.url.path.encode()
    path = raw.decode("latin-1").split("?", 1)[0]
    return path[len(prefix) :] if path.startswith(prefix) else ""


def _caller_ip(request: Request) -> str | None:
    return request.client.host if request.client else None


def accepted_reply(code: int, message_id: str, url: str) -> dict[str, Any]:
    if code == -2:
        raise LimitExceeded("queue limit reached")
    reply: dict[str, Any] = {"messageId": message_id, "url": url}
    if code == 0:
        reply["deduplicated"] = True
    return reply


async def _accept_one(
    context: BrokerContext, msg: StoredMessage, body: bytes, now: int
) -> Response:
    [(code, message_id)] = await context.store.accept_many([(msg, body, msg.not_before_ms)], now)
    context.dispatcher.wake()
    return ok(accepted_reply(code, message_id, msg.url), 202 if code == 0 else 200)


async def _publish(request: Request, queue: str | None, rest: str) -> Response:
    context, account = authenticate(request)
    dest = destination_from_raw(rest, request.scope.get("query_string", b"").decode("latin-1"))
    body = await read_body(request, context.settings.max_body_bytes)
    now = now_ms()
    incoming = split_headers(request.headers.items(), request.query_params.multi_items())
    msg, _ = build_message(
        message_id=random_id("msg_"),
        user=account.user,
        dest=dest,
        body=body,
        incoming=incoming,
        queue=queue,
        now_ms=now,
        caller_ip=_caller_ip(request),
        limits=context.settings,
    )
    check_allowed(msg, context.allow)
    return await _accept_one(context, msg, body, now)


async def publish(request: Request) -> Response:
    return await _publish(request, None, _raw_rest(request, "/v2/publish/"))


async def enqueue(request: Request) -> Response:
    rest = _raw_rest(request, "/v2/enqueue/")
    queue, _, dest = rest.partition("/")
    return await _publish(request, queue, dest)


def _batch_item(
    context: BrokerContext, account: Account, item: Any, now: int, ip: str | None
) -> tuple[StoredMessage, bytes]:
    if not isinstance(item, dict) or not isinstance(item.get("destination"), str):
        raise ClientError("each batch item needs a string 'destination'")
    headers = item.get("headers") or {}
    body = item.get("body")
    queue = item.get("queue")
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        raise ClientError("batch item 'headers' must map names to strings")
    if body is not None and not isinstance(body, str):
        raise ClientError("batch item 'body' must be a string or null")
    if queue is not None and not isinstance(queue, str):
        raise ClientError("batch item 'queue' must be a string or null")
    raw_body = (body or "").encode()
    dest, _, query = item["destination"].partition("?")
    msg, _ = build_message(
        message_id=random_id("msg_"),
        user=account.user,
        dest=destination_from_raw(dest, query),
        body=raw_body,
        incoming=split_headers(headers.items()),
        queue=queue,
        now_ms=now,
        caller_ip=ip,
        limits=context.settings,
    )
    check_allowed(msg, context.allow)
    return msg, raw_body


async def batch(request: Request) -> Response:
    context, account = authenticate(request)
    items = await json_body(request, context.settings.max_request_bytes)
    if not isinstance(items, list) or not items:
        raise ClientError("batch body must be a non-empty JSON array of messages")
    if len(items) > context.settings.max_batch_messages:
        raise ClientError(f"a batch holds at most {context.settings.max_batch_messages} messages")
    now, ip = now_ms(), _caller_ip(request)
    built: list[tuple[StoredMessage, bytes] | ClientError] = []
    for item in items:
        try:
            built.append(_batch_item(context, account, item, now, ip))
        except ClientError as exc:
            built.append(exc)
    good = [b for b in built if not isinstance(b, ClientError)]
    if not good:
        first = next(b for b in built if isinstance(b, ClientError))
        return error(first.message, first.status)
    results = iter(await context.store.accept_many([(m, b, m.not_before_ms) for m, b in good], now))
    context.dispatcher.wake()
    reply: list[dict[str, Any]] = []
    for b in built:
        if isinstance(b, ClientError):
            reply.append({"error": b.message})
            continue
        code, message_id = next(results)
        try:
            reply.append(accepted_reply(code, message_id, b[0].url))
        except ClientError as exc:
            reply.append({"error": exc.message})
    return ok(reply)


async def get_message(request: Request) -> Response:
    context, account = authenticate(request)
    msg, body = await context.store.get_message(account.user, request.path_params["id"])
    return ok(message_wire(msg, body))


async def cancel_message(request: Request) -> Response:
    context, account = authenticate(request)
    result = await context.store.cancel(account.user, request.path_params["id"], now_ms())
    if result == 0:
        raise NotFound(f"message {request.path_params['id']} not found")
    context.dispatcher.wake()
    return ok({"cancelled": 1})


_MESSAGE_FILTERS = {"queueName": "queue", "url": "url", "label": "labels"}


def _matches(msg: StoredMessage, filters: dict[str, list[str]]) -> bool:
    for name, wanted in filters.items():
        if name == "label" and not set(wanted) & set(msg.labels):
            return False
        if name == "queueName" and msg.queue not in wanted:
            return False
        if name == "url" and msg.url not in wanted:
            return False
    return True


async def cancel_many(request: Request) -> Response:
    """Bulk cancel: ids or filters in the JSON body (Python SDK) or the query (TS SDK, docs);
    nothing given cancels every message of the caller."""
    context, account = authenticate(request)
    body = await json_body(request) or {}
    if not isinstance(body, dict):
        raise ClientError("body must be a JSON object")
    ids = [str(i) for i in body.get("messageIds") or []] or query_list(request, "messageIds")
    filters = {name: query_list(request, name) for name in _MESSAGE_FILTERS}
    for name in _MESSAGE_FILTERS:
        if isinstance(body.get(name), str):
            filters[name] = [body[name]]
    filters = {k: v for k, v in filters.items() if v}
    candidates = ids or await context.store.user_message_ids(account.user)
    cancelled = 0
    now = now_ms()
    for message_id in candidates:
        if filters:
            try:
                msg, _ = await context.store.get_message(account.user, message_id)
            except NotFound:
                continue
            if not _matches(msg, filters):
                continue
        cancelled += int(await context.store.cancel(account.user, message_id, now) > 0)
    context.dispatcher.wake()
    return ok({"cancelled": cancelled})


def incoming_of(msg: StoredMessage, overrides: Incoming) -> Incoming:
    """A DLQ retry's settings: the original ones, overridden by the retry request's."""
    # Only Upstash-* settings override: a client's own Content-Type on the retry request
    # must not replace the message's.
    upstash = {k: v for k, v in overrides.settings.items() if k.startswith("upstash-")}
    settings = {
        k: v
        for k, v in {**msg.config, **upstash}.items()
        if k not in {"upstash-deduplication-id", "upstash-content-based-deduplication"}
    }
    return Incoming(settings, {**msg.headers, **overrides.forwarded})


ROUTES = [
    Route("/v2/publish/{destination:path}", publish, methods=["POST"]),
    Route("/v2/enqueue/{queue}/{destination:path}", enqueue, methods=["POST"]),
    Route("/v2/batch", batch, methods=["POST"]),
    Route("/v2/messages/{id}", get_message, methods=["GET"]),
    Route("/v2/messages/{id}", cancel_message, methods=["DELETE"]),
    Route("/v2/messages", cancel_many, methods=["DELETE"]),
]
