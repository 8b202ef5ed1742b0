"""Bounds on a request body — its size and how deep it nests — checked before anything parses it.

Python's JSON parser recurses once per level of nesting: a body of 100,000 ``[`` made it raise
``RecursionError`` (a 500 on ``/v1/chat/completions``), and a body just under the interpreter's
limit parsed, only to break whatever walked it next. A body larger than a QStash message could
be admitted, then fail to publish (a 503 for the client's mistake). :class:`BodyGuard` reads
each request body once, ahead of every route (FastAPI and the front door parse bodies
themselves), and has one that is too large (413) or nested too deep (400) refused before any
route sees it. QStash deliveries are exempt from the size bound (QStash bounds them, and a job's
delivery is a little larger than its request).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

BODY = "tierq.body"
"""The scope key under which :class:`BodyGuard` leaves the whole body (bytes) for routes that
parse it themselves (``tierq.fastpath``); the app still receives the same body too."""
Reject = Callable[[str, int, str, str], Response]
"""``(path, status, code, message) -> response``: the refusal in the error shape of the surface
that ``path`` belongs to."""

_NOT_BRACKETS = bytes(  # every byte but the four brackets, for bytes.translate to delete
    b for b in range(256) if b not in b"[]{}"
)
# Each bracket as a signed step: an opening one +1, a closing one -1 (0xff as a signed byte).
_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NO_BODY = frozenset({"GET", "HEAD", "OPTIONS"})


def json_depth(raw: bytes) -> int:
    """How deep ``raw`` nests arrays and objects (0 for a scalar), counted without parsing it:
    brackets inside strings do not count. For text that is not JSON the number is only an
    estimate, and the parser refuses such text anyway."""
    # Escaped backslashes go first, then escaped quotes (JSON pairs escapes left to right, as
    # replace does), so every quote left opens or closes a string: the text between an odd and
    # the next even quote is a string's. Bytes methods only: linear time on any input.
    encoding = json.detect_encoding(raw)
    if encoding != "utf-8":  # json.loads reads UTF-16 and UTF-32 too: count what it would see
        raw = raw.decode(encoding, errors="replace").encode()
    unescaped = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    outside = b"".join(unescaped.split(b'"')[::2])
    brackets = outside.translate(None, _NOT_BRACKETS)
    steps = memoryview(brackets.translate(_STEPS)).cast("b")
    return max(itertools.accumulate(steps), default=0)


def too_deep(raw: bytes, limit: int) -> bool:
    # Counting opening brackets is a cheap bound that spares the scan for almost every body.
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    return json_depth(raw) > limit


class BodyGuard:
    """Pure ASGI: buffer a request's body; refuse it when it is larger than ``max_bytes``
    (except under ``size_exempt`` path prefixes) or nests deeper than ``max_depth``; else hand
    the app the same body (and, after it, the client's own messages, so that a route still
    hears the client disconnect)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_bytes: int,
        max_depth: int,
        reject: Reject,
        size_exempt: tuple[str, ...] = (),
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_depth = max_depth
        self.reject = reject
        self.size_exempt = size_exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in _NO_BODY:
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        limit = None if path.startswith(self.size_exempt) else self.max_bytes
        first = await _whole_body(receive, limit)
        if first is None:
            message = f"the request body is larger than {self.max_bytes} bytes"
            await self.reject(path, 413, "body_too_large", message)(scope, receive, send)
            return
        if too_deep(first.get("body", b""), self.max_depth):
            message = f"the request body nests deeper than {self.max_depth} levels"
            await self.reject(path, 400, "json_too_deep", message)(scope, receive, send)
            return
        pending = [first]
        scope[BODY] = first.get("body", b"")

        async def replay() -> Message:
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)


async def _whole_body(receive: Receive, limit: int | None) -> Message | None:
    """The request's body as one ``http.request`` message (or the disconnect that came
    first); ``None`` as soon as it grows past ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return message
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if limit is not None and size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
