"""Who is calling: API keys (Bearer) for clients, per-job events tokens for EventSource."""

from __future__ import annotations

import base64
import hashlib
import hmac

from starlette.requests import Request

from tierq.config import Settings, UserSettings
from tierq.errors import Unauthorized


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def user_for_key(settings: Settings, key: str | None) -> UserSettings:
    if not key:
        raise Unauthorized("missing API key: send Authorization: Bearer <key>")
    user = settings.api_keys.get(key)
    if user is None:
        raise Unauthorized("invalid API key")
    return user


def authenticate_user(request: Request, settings: Settings) -> UserSettings:
    return user_for_key(settings, bearer(request))


def events_token(secret: str, job_id: str) -> str:
    """A token that lets its holder read one job's events (and nothing else)."""
    mac = hmac.new(secret.encode(), f"events:{job_id}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac[:24]).decode().rstrip("=")


def events_token_valid(secret: str, job_id: str, token: str) -> bool:
    return hmac.compare_digest(events_token(secret, job_id), token)
