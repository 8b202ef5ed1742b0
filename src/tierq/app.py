"""The tierq app: producer API, worker routes, health. Built by ``create_app(settings)``."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from redis.exceptions import RedisClusterException, RedisError
from starlette.exceptions import HTTPException

from tierq.config import Settings
from tierq.contracts import error_body
from tierq.errors import Busy, ClientError, UpstreamError
from tierq.fastpath import FastRoutes
from tierq.frontdoor import router as frontdoor_router
from tierq.frontdoor.errors import OpenAIError
from tierq.observability.metrics import Metrics
from tierq.observability.tracing import setup_tracing
from tierq.ops import queue_state
from tierq.ops.admin import require_admin
from tierq.ops.admin import router as admin_router
from tierq.ops.queue_metrics import QueueCollector
from tierq.producer.api import router as producer_router
from tierq.producer.usage import admin_router as usage_admin_router
from tierq.producer.usage import router as usage_router
from tierq.redis_pool import LeanRedis
from tierq.runtime import Runtime, build_runtime, redis_clients
from tierq.web.access import SurfaceGuard, Surfaces, gates, surfaces
from tierq.web.bodies import BodyGuard
from tierq.web.pages import router as pages_router
from tierq.worker.legacy import legacy_router
from tierq.worker.pipeline import enable_local_start
from tierq.worker.routes import router as worker_router

log = structlog.get_logger("tierq.app")


def _json_error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> Response:
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


async def _client_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ClientError)
    headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, Busy) else None
    return _json_error(exc.status, exc.code, exc.message, headers)


def _field(loc: tuple[object, ...]) -> str:
    """``("body", "input", "prompt")`` → ``input.prompt``; the body itself is ``body``."""
    return ".".join(str(x) for x in loc if x != "body") or "body"


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    parts = [f"{_field(err.get('loc', ()))}: {err.get('msg')}" for err in exc.errors()]
    return _json_error(422, "invalid_request", "; ".join(parts) or "invalid request")


def _body_refused(path: str, status: int, code: str, message: str) -> Response:
    """A request refused before a route ran (a bad body, a method not allowed): in OpenAI's
    shape on the front door, else in tierq's."""
    if path.startswith("/v1/"):
        return OpenAIError(status, message, code=code).response()
    return _json_error(status, code, message)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return _body_refused(request.url.path, exc.status_code, code, str(exc.detail))


async def _upstream_error(request: Request, exc: Exception) -> Response:
    log.warning("app.upstream_error", error=str(exc))
    return _json_error(
        503, "unavailable", "a dependency is unavailable; retry shortly", {"Retry-After": "2"}
    )


async def _start(rt: Runtime, seed_queues: bool) -> None:
    await rt.cancels.start()
    if isinstance(rt.redis, LeanRedis):
        try:  # see LeanRedis.load_scripts; on failure they load when first refused
            await rt.redis.load_scripts()
        except RedisError as exc:
            log.warning("app.script_load_failed", error=str(exc))
    if seed_queues:  # configuration seeds; operators' changes stay (ops/queue_state.py)
        try:
            await queue_state.seed(rt)
        except UpstreamError as exc:
            log.warning("app.queue_seed_failed", error=str(exc))
    rt.dispatcher.start()


def _mount_routes(app: FastAPI, settings: Settings, served: Surfaces, metrics: Metrics) -> None:
    """Every router, and /metrics; the pages and /metrics only when they are not off."""
    app.include_router(producer_router)
    app.include_router(frontdoor_router)
    app.include_router(admin_router)
    app.include_router(usage_router)
    app.include_router(usage_admin_router(require_admin))
    if served.pages != "off":
        app.include_router(pages_router)
    app.include_router(worker_router)
    app.include_router(legacy_router(settings.legacy_routes))
    if served.metrics != "off":

        @app.get("/metrics")
        async def metrics_endpoint() -> Response:
            return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)


def create_app(
    settings: Settings, *, sync_queues: bool = True, metrics: Metrics | None = None
) -> FastAPI:
    shared_metrics = metrics or Metrics()
    setup_tracing(settings.otel_endpoint, settings.otel_service_name)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        clients = redis_clients(settings)
        rt = build_runtime(
            settings, clients.commands, shared_metrics, clients.tails, clients.pubsub
        )
        enable_local_start(rt)
        app.state.runtime = rt
        shared_metrics.sse_tail_streams.set_function(lambda: rt.hub.followed)
        app.state.queue_metrics = queues = QueueCollector(rt)
        await _start(rt, sync_queues)
        queues.start()
        try:
            yield
        finally:
            await queues.stop()
            await rt.aclose_streams()
            await rt.cancels.stop()
            await rt.providers.aclose()
            await rt.gateway.aclose()
            await clients.aclose()

    served = surfaces(settings)
    docs = served.docs != "off"
    app = FastAPI(
        title="tierq",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.add_exception_handler(ClientError, _client_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(UpstreamError, _upstream_error)
    app.add_exception_handler(RedisError, _upstream_error)
    app.add_exception_handler(RedisClusterException, _upstream_error)  # Cluster topology
    app.add_middleware(FastRoutes)
    app.add_middleware(
        BodyGuard,
        max_bytes=settings.max_body_bytes,
        max_depth=settings.max_json_depth,
        reject=_body_refused,
        size_exempt=("/api/worker/",),
    )
    app.add_middleware(SurfaceGuard, gates=gates(settings, served))
    _mount_routes(app, settings, served, shared_metrics)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "pid": os.getpid()}  # which process answered

    @app.get("/readyz")
    async def readyz(request: Request) -> Response:
        rt: Runtime = request.app.state.runtime
        checks: dict[str, str] = {}
        try:
            await rt.redis.ping()
            checks["redis"] = "ok"
        except RedisError as exc:
            checks["redis"] = f"error: {exc}"
        try:
            await rt.gateway.queue_status(next(iter(settings.queues)).value)
            checks["qstash"] = "ok"
        except UpstreamError as exc:
            checks["qstash"] = f"error: {exc}"
        ready = all(v == "ok" for v in checks.values())
        return JSONResponse(
            {"ready": ready, "checks": checks, "pid": os.getpid()},
            status_code=200 if ready else 503,
        )

    return app
