"""The two pages: /ui/sse (SSE test page) and /ui/dashboard (operators).

Plain HTML, CSS and vanilla JS shipped as package data under ``tierq/web/static`` — no build
step, nothing fetched from a CDN. ``/ui/config.json`` tells the pages what they need: the
service/model registry and, only in dev mode, the dev API keys and admin token to prefill.
Who may load them (open under ``tierq dev``; off, or behind the admin token, under ``tierq
serve``) is decided by :mod:`tierq.web.access`, not here.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from tierq.config import DEV_FREE_KEY, DEV_PAID_KEY, Settings
from tierq.errors import NotFound

router = APIRouter()

# Only these files are served; anything else under /ui/static is a 404.
_STATIC_TYPES = {
    "sse.html": "text/html; charset=utf-8",
    "dashboard.html": "text/html; charset=utf-8",
    "tierq.css": "text/css; charset=utf-8",
    "common.js": "text/javascript; charset=utf-8",
    "sse.js": "text/javascript; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
}
# Everything the pages load comes from this origin; no inline script, no third parties.
_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": _CSP,
    "X-Content-Type-Options": "nosniff",
}


def _static(name: str) -> Response:
    media_type = _STATIC_TYPES.get(name)
    if media_type is None:
        raise NotFound(f"no static file {name!r}", code="not_found")
    body = resources.files("tierq.web").joinpath("static", name).read_bytes()
    return Response(body, media_type=media_type, headers=_HEADERS)


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.runtime.settings
    return settings


def page_config(settings: Settings) -> dict[str, Any]:
    """What the pages may know: the registry always, dev credentials only in dev mode."""
    dev = settings.dev_mode
    return {
        "devMode": dev,
        "devKeys": {"paid": DEV_PAID_KEY, "free": DEV_FREE_KEY} if dev else None,
        "adminToken": settings.admin_token if dev else None,
        "services": {
            name: {"experiences": list(s.experiences), "models": list(s.models)}
            for name, s in settings.services.items()
        },
        "models": {
            name: {"experiences": list(m.experiences)} for name, m in settings.models.items()
        },
        "queues": [q.value for q in settings.queues],
    }


@router.get("/ui", include_in_schema=False)
async def ui_index() -> RedirectResponse:
    return RedirectResponse("/ui/sse")


@router.get("/ui/sse", include_in_schema=False)
async def sse_page() -> Response:
    return _static("sse.html")


@router.get("/ui/dashboard", include_in_schema=False)
async def dashboard_page() -> Response:
    return _static("dashboard.html")


@router.get("/ui/static/{name}", include_in_schema=False)
async def static_file(name: str) -> Response:
    return _static(name)


@router.get("/ui/config.json", include_in_schema=False)
async def ui_config(request: Request) -> Response:
    return JSONResponse(page_config(_settings(request)), headers={"Cache-Control": "no-store"})
