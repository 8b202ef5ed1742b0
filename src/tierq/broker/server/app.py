"""The broker as an ASGI app, and a runner that serves it with uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import cast

import structlog
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from tierq.broker.server import routes_dlq, routes_messages, routes_queues
from tierq.broker.server.context import BrokerContext, error, ok
from tierq.broker.server.credentials import Account
from tierq.broker.server.delivery_http import DeliveryClient
from tierq.broker.server.destinations import AllowList
from tierq.broker.server.dispatcher import Dispatcher
from tierq.broker.server.keyring import KeyRing
from tierq.broker.server.store import BrokerStore
from tierq.config import BrokerSettings
from tierq.errors import ClientError
from tierq.observability.metrics import Metrics
from tierq.redis_pool import LeanPool, LeanRedis
from tierq.web.http11 import server_config

log = structlog.get_logger("tierq.broker")


async def _client_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ClientError)
    return error(exc.message, exc.status)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error(exc.detail or "error", exc.status_code)


async def _redis_error(request: Request, exc: Exception) -> Response:
    log.warning("broker.storage_error", path=request.url.path, error=f"{type(exc).__name__}: {exc}")
    return error("broker storage (Redis) is unavailable, try again", 503)


async def _healthz(request: Request) -> Response:
    return ok({"status": "ok"})


def create_broker_app(
    settings: BrokerSettings,
    redis_url: str,
    accounts: dict[str, Account],
    metrics: Metrics | None = None,
) -> Starlette:
    shared_metrics = metrics or Metrics()
    allow = AllowList(settings.allowed_destinations)  # a bad entry fails here, at start-up

    async def metrics_endpoint(request: Request) -> Response:
        return Response(shared_metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Bounded pool; callers wait for a free connection instead of failing under load.
        pool = LeanPool.from_url(
            redis_url,
            max_connections=settings.redis_max_connections,
            timeout=settings.redis_pool_timeout_s,
            # A Redis that stops answering (not only refusing) must fail calls, not hang them.
            socket_timeout=settings.redis_socket_timeout_s,
            socket_connect_timeout=settings.redis_socket_timeout_s,
            # A pooled connection left over from before a Redis restart fails its first use:
            # reconnect and send once more (every script is safe to repeat; accept.lua notes how).
            retry=Retry(NoBackoff(), 1),
        )
        client = cast(LeanRedis, LeanRedis.from_pool(pool))  # owns (and closes) the pool
        store = BrokerStore(client, settings)
        await client.load_scripts()  # see LeanRedis.load_scripts
        keyring = KeyRing(store, accounts)
        await keyring.load()
        http = DeliveryClient(settings.max_in_flight)
        dispatcher = Dispatcher(
            store,
            keyring,
            settings,
            http,
            on_attempt=lambda m, o: shared_metrics.broker_attempt(o, m.queue),
        )
        app.state.broker = BrokerContext(settings, store, dispatcher, keyring, accounts, allow)
        task = asyncio.create_task(dispatcher.run(), name="tierq-broker-dispatcher")
        try:
            yield
        finally:
            await dispatcher.stop()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await http.close()
            await client.aclose()

    from starlette.routing import Route  # noqa: PLC0415 - keeps the route tables together

    return Starlette(
        routes=[
            Route("/healthz", _healthz, methods=["GET"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
            *routes_messages.ROUTES,
            *routes_queues.ROUTES,
            *routes_dlq.ROUTES,
        ],
        exception_handlers={
            ClientError: _client_error,
            HTTPException: _http_error,
            RedisError: _redis_error,
        },
        lifespan=lifespan,
    )


async def serve(
    app: Starlette,
    host: str,
    port: int,
    *,
    on_started: Callable[[], None] | None = None,
    log_level: str = "warning",
) -> None:
    """Serve until cancelled or signalled; ``on_started`` runs once the socket listens."""
    server = uvicorn.Server(server_config(app, host, port, log_level=log_level))
    task = asyncio.create_task(server.serve())
    while not server.started and not task.done():  # noqa: ASYNC110 - uvicorn offers a flag only
        await asyncio.sleep(0.02)
    if server.started and on_started is not None:
        on_started()
    await task
