"""What every broker route needs: the store, the dispatcher, accounts and the clock."""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tierq.broker.server.credentials import Account
from tierq.broker.server.dispatcher import Dispatcher
from tierq.broker.server.keyring import KeyRing
from tierq.broker.server.store import BrokerStore
from tierq.config import BrokerSettings
from tierq.errors import ClientError, Unauthorized


@dataclass
class BrokerContext:
    settings: BrokerSettings
    store: BrokerStore
    dispatcher: Dispatcher
    keyring: KeyRing
    accounts: dict[str, Account]


def now_ms() -> int:
    return int(time.time() * 1000)


def ctx(request: Request) -> BrokerContext:
    context: BrokerContext = request.app.state.broker
    return context


def authenticate(request: Request) -> tuple[BrokerContext, Account]:
    """The caller's account, from ``Authorization: Bearer`` or ``?qstash_token=``."""
    context = ctx(request)
    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header[:7].lower() == "bearer " else ""
    token = token or request.query_params.get("qstash_token", "")
    if not token:
        raise Unauthorized("missing token: send Authorization: Bearer <QSTASH_TOKEN>")
    account = context.accounts.get(token)
    if account is None:
        raise Unauthorized("invalid token")
    return context, account


def ok(payload: Any, status: int = 200) -> Response:
    return JSONResponse(payload, status_code=status)


def error(message: str, status: int) -> Response:
    return JSONResponse({"error": message}, status_code=status)


async def json_body(request: Request) -> Any:
    """The request's JSON, ``None`` when empty; 400 when it is not JSON."""
    raw = await request.body()
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except ValueError:
        raise ClientError("request body is not valid JSON") from None


def query_list(request: Request, name: str) -> list[str]:
    """A multi-valued query parameter, repeated (``a=1&a=2``) or comma-separated."""
    return [v for raw in request.query_params.getlist(name) for v in raw.split(",") if v]


def encode_cursor(value: str) -> str:
    return base64.urlsafe_b64encode(value.encode()).decode().rstrip("=")


def decode_cursor(value: str | None) -> str | None:
    if not value:
        return None
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        raise ClientError("invalid cursor") from None


def count_param(request: Request, default: int, maximum: int) -> int:
    raw = request.query_params.get("count")
    if raw is None:
        return default
    try:
        count = int(raw)
    except ValueError:
        raise ClientError("count must be an integer") from None
    if count < 1:
        raise ClientError("count must be at least 1")
    return min(count, maximum)
