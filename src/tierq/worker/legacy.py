"""Thin adapters for the six old per-tier routes ``/api/worker/{tier}/{experience}/{service}``.

``forward``: verify the signature, then hand the request to the same handler as the unified
routes. ``redirect``: verify, then answer 308 to the unified route (a caller that follows it
sends the same signed request there, and the unified route accepts a signature made for the
legacy route of the same kind and service). ``hint``: verify, then answer 410 naming the
unified route. ``off``: not mounted.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from tierq.queues import EXPERIENCES, TIERS, Experience, worker_kind, worker_path
from tierq.worker.result import error_reply
from tierq.worker.routes import handle, runtime, to_response, verified_body


def _adapter(experience: Experience, mode: str):  # type: ignore[no-untyped-def]
    async def adapter(service: str, request: Request) -> Response:
        if mode == "forward":
            return await handle(request, worker_kind(experience), service, legacy=True)
        await verified_body(runtime(request), request)
        unified = worker_path(experience, service)
        if mode == "redirect":
            location = unified + (f"?{request.url.query}" if request.url.query else "")
            moved = f"this route moved to {unified}"
            return to_response(error_reply(308, "route_moved", moved, {"Location": location}))
        return to_response(error_reply(410, "route_moved", f"this route is gone: use {unified}"))

    return adapter


def legacy_router(mode: str) -> APIRouter:
    router = APIRouter()
    if mode == "off":
        return router
    for tier in TIERS:
        for experience in EXPERIENCES:
            router.add_api_route(
                f"/api/worker/{tier}/{experience}/{{service}}",
                _adapter(experience, mode),
                methods=["POST"],
            )
    return router
