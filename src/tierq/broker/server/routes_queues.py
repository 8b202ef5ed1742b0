"""Queues, signing keys, and the endpoints that answer 501 until they exist."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tierq.broker.server.context import authenticate, error, json_body, now_ms, ok
from tierq.broker.server.requests import check_queue_name
from tierq.errors import ClientError, LimitExceeded


async def upsert_queue(request: Request) -> Response:
    context, account = authenticate(request)
    body = await json_body(request)
    if not isinstance(body, dict) or not isinstance(body.get("queueName"), str):
        raise ClientError("body must be a JSON object with a string 'queueName'")
    name = body["queueName"]
    check_queue_name(name)
    parallelism = body.get("parallelism")
    if parallelism is not None:
        if isinstance(parallelism, bool) or not isinstance(parallelism, int) or parallelism < 1:
            raise ClientError("parallelism must be an integer of at least 1")
        if parallelism > context.settings.max_parallelism:
            raise LimitExceeded(f"parallelism is limited to {context.settings.max_parallelism}")
    paused = body.get("paused")
    if paused is not None and not isinstance(paused, bool):
        raise ClientError("paused must be true or false")
    await context.store.update_queue(
        account.user, name, now_ms=now_ms(), parallelism=parallelism, paused=paused, create=True
    )
    context.dispatcher.wake()
    return ok({})


async def list_queues(request: Request) -> Response:
    context, account = authenticate(request)
    return ok([q.wire() for q in await context.store.list_queues(account.user)])


async def get_queue(request: Request) -> Response:
    context, account = authenticate(request)
    return ok((await context.store.get_queue(account.user, request.path_params["queue"])).wire())


async def delete_queue(request: Request) -> Response:
    context, account = authenticate(request)
    await context.store.delete_queue(account.user, request.path_params["queue"], now_ms())
    return ok({})


async def _set_paused(request: Request, paused: bool) -> Response:
    context, account = authenticate(request)
    name = request.path_params["queue"]
    await context.store.update_queue(
        account.user, name, now_ms=now_ms(), paused=paused, create=False
    )
    context.dispatcher.wake()
    return ok({})


async def pause_queue(request: Request) -> Response:
    return await _set_paused(request, True)


async def resume_queue(request: Request) -> Response:
    return await _set_paused(request, False)


async def get_keys(request: Request) -> Response:
    context, account = authenticate(request)
    current, nxt = context.keyring.pair(account.user)
    return ok({"current": current, "next": nxt})


async def rotate_keys(request: Request) -> Response:
    context, account = authenticate(request)
    current, nxt = await context.keyring.rotate(account.user)
    return ok({"current": current, "next": nxt})


def _not_supported(feature: str):  # type: ignore[no-untyped-def]
    async def handler(request: Request) -> Response:
        authenticate(request)
        return error(f"{feature} are not supported by the tierq broker yet", 501)

    return handler


_ALL = ["GET", "POST", "PUT", "PATCH", "DELETE"]

ROUTES = [
    Route("/v2/queues", upsert_queue, methods=["POST"]),
    Route("/v2/queues", list_queues, methods=["GET"]),
    Route("/v2/queues/{queue}", get_queue, methods=["GET"]),
    Route("/v2/queues/{queue}", delete_queue, methods=["DELETE"]),
    Route("/v2/queues/{queue}/pause", pause_queue, methods=["POST"]),
    Route("/v2/queues/{queue}/resume", resume_queue, methods=["POST"]),
    Route("/v2/keys", get_keys, methods=["GET"]),
    Route("/v2/keys/rotate", rotate_keys, methods=["POST"]),
    Route("/v2/schedules{rest:path}", _not_supported("schedules"), methods=_ALL),
    Route("/v2/topics{rest:path}", _not_supported("URL groups (topics)"), methods=_ALL),
    Route("/v2/flowControl{rest:path}", _not_supported("flow control keys"), methods=_ALL),
    Route("/v2/globalParallelism", _not_supported("flow control keys"), methods=_ALL),
    Route("/llm{rest:path}", _not_supported("LLM endpoints"), methods=_ALL),
]
