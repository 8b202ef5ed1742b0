"""Who may read the app's own surfaces: ``/metrics``, the API docs and the two pages.

Each surface is ``open``, behind a ``token``, or ``off`` (not served at all). A setting of
``auto`` (the default) means ``open`` under ``tierq dev``; under ``tierq serve`` /metrics and
the docs need a token and the pages are off. /metrics takes ``metrics_token`` (a scraper's own
credential) or the admin token; the docs and the pages take the admin token.

A token is sent as ``Authorization: Bearer <token>`` or as the password of HTTP Basic (any user
name). Browsers cannot put a Bearer header on a page they navigate to, but they ask for Basic
credentials when an answer says ``WWW-Authenticate: Basic`` and then send them with the page's
own requests (the docs' fetch of /openapi.json, the pages' /ui/config.json).
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from starlette.datastructures import Headers
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from tierq.config import Settings
from tierq.contracts import error_body

Access = Literal["open", "token", "off"]
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
PAGES_PREFIX = "/ui"


@dataclass(frozen=True)
class Surfaces:
    """How each surface is served, with ``auto`` resolved."""

    metrics: Access
    docs: Access
    pages: Access


def surfaces(settings: Settings) -> Surfaces:
    def resolve(value: str, under_serve: Access) -> Access:
        if value == "auto":
            return "open" if settings.dev_mode else under_serve
        return "open" if value == "open" else "token" if value == "token" else "off"

    return Surfaces(
        metrics=resolve(settings.metrics_access, "token"),
        docs=resolve(settings.docs_access, "token"),
        pages=resolve(settings.pages_access, "off"),
    )


def presented_token(headers: Mapping[str, str]) -> str | None:
    """The Bearer token, or the password of HTTP Basic; ``None`` when neither was sent."""
    scheme, _, value = headers.get("authorization", "").partition(" ")
    value = value.strip()
    if not value:
        return None
    if scheme.lower() == "bearer":
        return value
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    return decoded.partition(":")[2] or None


def token_accepted(token: str, accepted: Sequence[str]) -> bool:
    """Whether ``token`` is one of ``accepted`` (each compared in constant time)."""
    found = False
    for candidate in accepted:
        found |= hmac.compare_digest(token.encode(), candidate.encode())
    return found


@dataclass(frozen=True)
class Gate:
    """One surface behind a token: its paths, the tokens it takes, how it asks for one."""

    name: str
    paths: frozenset[str]
    prefix: str | None
    tokens: tuple[str, ...]
    challenge: str

    def covers(self, path: str) -> bool:
        if path in self.paths:
            return True
        return self.prefix is not None and (
            path == self.prefix or path.startswith(self.prefix + "/")
        )

    def refusal(self, headers: Headers) -> Response | None:
        """``None`` when the request may pass; else the 401 (no token) or 403 (wrong one)."""
        token = presented_token(headers)
        if token is None:
            message = f"the {self.name} need a token: send Authorization: Bearer <token>"
            return JSONResponse(
                error_body("unauthorized", message),
                status_code=401,
                headers={"WWW-Authenticate": self.challenge},
            )
        if not token_accepted(token, self.tokens):
            return JSONResponse(error_body("forbidden", f"invalid token for the {self.name}"), 403)
        return None


def gates(settings: Settings, served: Surfaces) -> list[Gate]:
    """The gates of the surfaces served behind a token."""
    admin = (settings.admin_token,) if settings.admin_token else ()
    metrics = (settings.metrics_token,) if settings.metrics_token else ()
    basic = 'Basic realm="tierq", charset="UTF-8"'
    out = []
    if served.metrics == "token":
        out.append(Gate("metrics", frozenset({"/metrics"}), None, metrics + admin, "Bearer"))
    if served.docs == "token":
        out.append(Gate("API docs", DOCS_PATHS, None, admin, basic))
    if served.pages == "token":
        out.append(Gate("pages", frozenset(), PAGES_PREFIX, admin, basic))
    return out


class SurfaceGuard:
    """Pure ASGI: a request for a gated surface passes only with one of its tokens."""

    def __init__(self, app: ASGIApp, gates: Sequence[Gate]) -> None:
        self.app = app
        self.gates = tuple(gates)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for gate in self.gates:
                if gate.covers(scope["path"]):
                    refusal = gate.refusal(Headers(scope=scope))
                    if refusal is not None:
                        await refusal(scope, receive, send)
                        return
                    break
        await self.app(scope, receive, send)
