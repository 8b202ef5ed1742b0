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
from tierq.broker.server.destinations import AllowList
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
    allow: AllowList


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


async def read_body(request: Request, limit: int) -> bytes:
    """The request body; 413 as soon as it is known to be larger than ``limit`` bytes (it is
    never read whole first)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ClientError(f"request body is larger than {limit} bytes", status=413)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ClientError(f"request body is larger than {limit} bytes", status=413)
        chunks.append(chunk)
    return b"".join(chunks)


def json_depth(value: Any) -> int:
    """How deeply arrays and objects nest in a parsed JSON value (iterative: no recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in item)
    return deepest


def parse_json(raw: bytes, max_depth: int) -> Any:
    """JSON bytes → value, ``None`` when empty; 400 when not JSON or nested too deeply."""
    if not raw.strip():
        return None
    too_deep = ClientError(f"request body nests JSON deeper than {max_depth} levels")
    try:
        value = json.loads(raw)
    except RecursionError:  # deeper than the interpreter's own limit
        raise too_deep from None
    except ValueError:
        raise ClientError("request body is not valid JSON") from None
    if json_depth(value) > max_depth:
        raise too_deep
    return value


async def json_body(request: Request, limit: int | None = None) -> Any:
    """The request's JSON, ``None`` when empty; 400 when it is not JSON or nests too deeply,
    413 when larger than ``limit`` (default: ``max_body_bytes``)."""
    settings = ctx(request).settings
    raw = await read_body(request, settings.max_body_bytes if limit is None else limit)
    return parse_json(raw, settings.max_json_depth)


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
