"""A real OpenAI-compatible upstream for tests: chat completions (streamed or not), models.

``FakeOpenAI`` serves a small ASGI app with uvicorn in a thread of its own (``ServerThread``)
and records every request. Point any OpenAI client at ``fake.url`` (it ends in ``/v1``).

Behaviour on demand, as directives in the text of the last user message or in the
``X-Fake-Directives`` header (same syntax; header directives win):

- ``[[status:429]]``, ``[[status:500]]``, ``[[status:400]]`` … answer that status with an
  OpenAI error body ``{"error": {"message", "type", "param", "code"}}``;
- ``[[status:429:once]]`` / ``[[status:500:2]]``: fail only the first 1 / 2 requests with that
  prompt, then succeed;
- ``[[tokens:N]]``: N content chunks (default 5); ``[[slow:MS]]``: MS milliseconds before each;
- ``[[delay:MS]]``: MS milliseconds before the response starts (headers included);
- ``[[hang]]``: stream the N chunks, then hang until the client goes away (a non-stream
  request hangs before answering);
- ``[[error_after:N]]``: after N chunks, an in-stream error event (``data: {"error": …}``);
- ``[[cut_after:N]]``: after N chunks, end the response (no finish chunk, no ``[DONE]``);
- ``[[no_usage]]``: no usage chunk even when ``stream_options.include_usage`` asks for one;
- ``[[echo_auth]]``: with a status directive, the error message quotes the Authorization
  header (to prove a client never repeats the key it sent);
- ``[[ratelimit:R/L]]``: answer with OpenAI's ``x-ratelimit-limit-requests: L`` and
  ``x-ratelimit-remaining-requests: R`` (the same for tokens, times 1000).

Content is deterministic: ``fake_tokens(n)`` (``"w0"``, ``" w1"``, …), prefixed by
``image_prefix(k)`` when the request carried k ``image_url`` parts. Usage is
``prompt_tokens = fake_prompt_tokens(messages)`` and ``completion_tokens = n``.

Every request is an :class:`UpstreamRequest`; its ``disconnected`` event is set when the client
closed the connection before the response was complete (a cancelled stream).
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from helpers import ServerThread

DIRECTIVE = re.compile(r"\[\[([a-z_]+)(?::([^\]]*))?\]\]")
DIRECTIVE_HEADER = "x-fake-directives"
DEFAULT_TOKENS = 5
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               429: "rate_limit_error"}  # fmt: skip
ERROR_CODES = {400: "invalid_value", 401: "invalid_api_key", 404: "model_not_found",
               429: "rate_limit_exceeded"}  # fmt: skip


def fake_tokens(n: int = DEFAULT_TOKENS) -> list[str]:
    """The content chunks of an answer with ``n`` tokens."""
    return [f"w{i}" if i == 0 else f" w{i}" for i in range(n)]


def image_prefix(count: int) -> str:
    """What an answer starts with when the request carried ``count`` images (none: empty)."""
    return f"[{count} images] " if count else ""


def fake_prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """Prompt tokens the fake charges: whitespace words of every text part."""
    return sum(len(text.split()) for text in _texts(messages))


def _texts(messages: list[dict[str, Any]]) -> list[str]:
    texts: list[str] = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(p.get("text", "") for p in content if p.get("type") == "text")
    return texts


def _image_urls(messages: list[dict[str, Any]]) -> list[str]:
    return [
        part["image_url"]["url"]
        for message in messages
        if isinstance(message.get("content"), list)
        for part in message["content"]
        if part.get("type") == "image_url"
    ]


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return " ".join(_texts([message]))
    return ""


def parse_directives(*sources: str) -> dict[str, str]:
    """``{"status": "429:once", "hang": "", …}`` from each source in turn (later ones win)."""
    found: dict[str, str] = {}
    for source in sources:
        found.update((m.group(1), m.group(2) or "") for m in DIRECTIVE.finditer(source))
    return found


@dataclass
class UpstreamRequest:
    """One request as the upstream saw it."""

    seq: int
    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    at: float
    disconnected: threading.Event = field(default_factory=threading.Event)
    """Set when the client went away before the response was complete."""
    finished: threading.Event = field(default_factory=threading.Event)
    """Set when the response was sent in full (or the client went away)."""
    streaming: threading.Event = field(default_factory=threading.Event)
    """Set once the first stream chunk was sent."""
    status: int = 0
    gone: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    """``disconnected`` for the server's own loop."""

    @property
    def model(self) -> str | None:
        model = self.body.get("model")
        return model if isinstance(model, str) else None

    @property
    def messages(self) -> list[dict[str, Any]]:
        messages = self.body.get("messages")
        return messages if isinstance(messages, list) else []

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))

    @property
    def prompt(self) -> str:
        """The text of the last user message."""
        return _last_user_text(self.messages)

    @property
    def image_urls(self) -> list[str]:
        return _image_urls(self.messages)

    @property
    def has_images(self) -> bool:
        return bool(self.image_urls)

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")


@dataclass
class _Answer:
    """What one chat request will get, resolved from its directives."""

    status: int = 200
    tokens: int = DEFAULT_TOKENS
    slow_s: float = 0.0
    delay_s: float = 0.0
    hang: bool = False
    error_after: int | None = None
    cut_after: int | None = None
    usage: bool = True
    echo_auth: bool = False
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


class FakeOpenAI:
    """A real OpenAI-compatible HTTP server on a free loopback port (see module doc)."""

    def __init__(self, models: tuple[str, ...] = ("fake-model",)) -> None:
        self.models = models
        self._lock = threading.Condition()
        self._requests: list[UpstreamRequest] = []
        self._failures: dict[str, int] = {}
        self._stopping: asyncio.Event | None = None
        self.thread = ServerThread(self.app)

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The base URL for OpenAI clients (ends in ``/v1``)."""
        return f"{self.thread.url}/v1"

    def start(self) -> FakeOpenAI:
        self.thread.start()
        return self

    def stop(self) -> None:
        """Release every hanging response, then stop the server."""
        loop, stopping = self.thread.loop, self._stopping
        if loop is not None and stopping is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stopping.set)
        self.thread.stop()

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what the tests look at -------------------------------------------------------------

    @property
    def requests(self) -> list[UpstreamRequest]:
        """Every request so far, oldest first (a copy)."""
        with self._lock:
            return list(self._requests)

    @property
    def open_streams(self) -> int:
        """Streamed responses started and neither complete nor abandoned by the client.

        A response is marked complete just before its last bytes are sent, so a client that has
        read a whole answer never sees it counted here."""
        return sum(1 for r in self.requests if r.streaming.is_set() and not r.finished.is_set())

    @property
    def disconnects(self) -> list[UpstreamRequest]:
        """Requests whose client went away before the response was complete."""
        return [r for r in self.requests if r.disconnected.is_set()]

    def chat_requests(self, prompt_contains: str = "") -> list[UpstreamRequest]:
        """Chat-completion requests whose last user message contains ``prompt_contains``."""
        return [
            r
            for r in self.requests
            if r.path == "/v1/chat/completions" and prompt_contains in r.prompt
        ]

    def wait_for_request(
        self, predicate: Callable[[UpstreamRequest], bool] = lambda r: True, timeout: float = 10.0
    ) -> UpstreamRequest:
        """The first request matching ``predicate``, waiting up to ``timeout`` seconds for it."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                found = [r for r in self._requests if predicate(r)]
                if found:
                    return found[0]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no matching upstream request within {timeout}s")
                self._lock.wait(left)

    def reset(self) -> None:
        """Forget recorded requests and ``:once`` failure counts."""
        with self._lock:
            self._requests.clear()
            self._failures.clear()

    # -- the ASGI app -----------------------------------------------------------------------

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = self._record(scope, raw)
        watcher = asyncio.create_task(self._watch_disconnect(receive, request))
        try:
            await self._route(request, send)
        finally:
            request.finished.set()
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._stopping = asyncio.Event()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _record(self, scope: dict[str, Any], raw: bytes) -> UpstreamRequest:
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = {}
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        with self._lock:
            request = UpstreamRequest(
                seq=len(self._requests), method=scope["method"], path=scope["path"],
                headers=headers, body=body if isinstance(body, dict) else {}, at=time.monotonic(),
            )  # fmt: skip
            self._requests.append(request)
            self._lock.notify_all()
        return request

    @staticmethod
    async def _watch_disconnect(receive: Any, request: UpstreamRequest) -> None:
        message = await receive()
        if message["type"] == "http.disconnect" and not request.finished.is_set():
            request.finished.set()  # first: whoever sees ``disconnected`` sees it finished
            request.disconnected.set()
            request.gone.set()

    async def _route(self, request: UpstreamRequest, send: Any) -> None:
        if request.method == "GET" and request.path == "/v1/models":
            data = [{"id": m, "object": "model", "created": 0, "owned_by": "fake"}
                    for m in self.models]  # fmt: skip
            await _send_json(request, send, 200, {"object": "list", "data": data})
        elif request.method == "POST" and request.path == "/v1/chat/completions":
            await self._chat(request, send)
        else:
            await _send_json(request, send, 404, _error_body(404, "no such route"))

    def _answer(self, request: UpstreamRequest) -> _Answer:
        found = parse_directives(request.prompt, request.headers.get(DIRECTIVE_HEADER, ""))
        answer = _Answer(
            tokens=int(found.get("tokens", DEFAULT_TOKENS)),
            slow_s=float(found.get("slow", 0)) / 1000,
            delay_s=float(found.get("delay", 0)) / 1000,
            hang="hang" in found,
            error_after=int(found["error_after"]) if "error_after" in found else None,
            cut_after=int(found["cut_after"]) if "cut_after" in found else None,
            usage="no_usage" not in found,
            echo_auth="echo_auth" in found,
        )
        if "ratelimit" in found:
            left, _, limit = found["ratelimit"].partition("/")
            for kind, scale in (("requests", 1), ("tokens", 1000)):
                answer.headers += [
                    (f"x-ratelimit-limit-{kind}".encode(), str(int(limit) * scale).encode()),
                    (f"x-ratelimit-remaining-{kind}".encode(), str(int(left) * scale).encode()),
                ]
        if "status" in found:
            status, _, times = found["status"].partition(":")
            answer.status = int(status) if self._should_fail(request, times) else 200
        return answer

    def _should_fail(self, request: UpstreamRequest, times: str) -> bool:
        if not times:
            return True
        limit = 1 if times == "once" else int(times)
        with self._lock:
            done = self._failures.get(request.prompt, 0)
            self._failures[request.prompt] = done + 1
        return done < limit

    async def _chat(self, request: UpstreamRequest, send: Any) -> None:
        answer = self._answer(request)
        if answer.delay_s and await self._stopped_or_gone(request, answer.delay_s):
            await _send_json(request, send, 503, _error_body(503, "fake upstream stopping"))
            return
        if answer.status != 200:
            message = f"fake upstream answered {answer.status} as asked"
            if answer.echo_auth:
                message += f" (you sent {request.authorization!r})"
            await _send_json(request, send, answer.status, _error_body(answer.status, message))
        elif not request.body.get("model") or not request.messages:
            await _send_json(request, send, 400, _error_body(400, "model and messages required"))
        elif request.stream:
            await self._stream(request, send, answer)
        elif answer.hang:
            await self._stopped_or_gone(request, None)
            await _send_json(request, send, 503, _error_body(503, "fake upstream stopping"))
        else:
            await _send_json(
                request, send, 200, _completion(request, answer.tokens), answer.headers
            )

    async def _stream(self, request: UpstreamRequest, send: Any, answer: _Answer) -> None:
        request.status = 200
        headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
                   *answer.headers]  # fmt: skip
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await self._stream_body(request, send, answer)

    async def _stream_body(self, request: UpstreamRequest, send: Any, answer: _Answer) -> None:
        chunk = _chunker(request)
        await _sse(send, chunk({"role": "assistant", "content": ""}))
        request.streaming.set()
        for index, text in enumerate(_content(request, answer.tokens)):
            if answer.error_after == index:
                error = {"error": {"message": "fake mid-stream failure", "type": "server_error",
                                   "param": None, "code": "internal_error"}}  # fmt: skip
                await _end(request, send, _sse_bytes(error))
                return
            if answer.cut_after == index:
                await _end(request, send, b"")
                return
            if answer.slow_s and await self._stopped_or_gone(request, answer.slow_s):
                await _end(request, send, b"")
                return
            await _sse(send, chunk({"content": text}))
        if answer.hang:
            await self._stopped_or_gone(request, None)
            await _end(request, send, b"")
            return
        await _sse(send, chunk({}, finish_reason="stop"))
        if answer.usage and (request.body.get("stream_options") or {}).get("include_usage"):
            await _sse(send, chunk(None, usage=_usage(request, answer.tokens)))
        await _end(request, send, b"data: [DONE]\n\n")

    async def _stopped_or_gone(self, request: UpstreamRequest, seconds: float | None) -> bool:
        """Wait ``seconds`` (None: for ever); True when the client left or the server stops."""
        assert self._stopping is not None
        waits = {asyncio.ensure_future(request.gone.wait()),
                 asyncio.ensure_future(self._stopping.wait())}  # fmt: skip
        try:
            done, _ = await asyncio.wait(waits, timeout=seconds, return_when="FIRST_COMPLETED")
        finally:
            for waiter in waits:
                waiter.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
        return bool(done)


def _chunker(request: UpstreamRequest) -> Callable[..., dict[str, Any]]:
    created = int(time.time())
    chunk_id = f"chatcmpl-fake-{request.seq}"

    def chunk(
        delta: dict[str, Any] | None,
        finish_reason: str | None = None,
        usage: dict[str, int] | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": chunk_id, "object": "chat.completion.chunk", "created": created,
            "model": request.model,
            "choices": [] if delta is None
            else [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }  # fmt: skip
        if usage is not None:
            body["usage"] = usage
        return body

    return chunk


def _content(request: UpstreamRequest, tokens: int) -> list[str]:
    parts = fake_tokens(tokens)
    prefix = image_prefix(len(request.image_urls))
    if prefix and parts:
        parts[0] = prefix + parts[0]
    elif prefix:
        parts = [prefix]
    return parts


def _usage(request: UpstreamRequest, tokens: int) -> dict[str, int]:
    prompt = fake_prompt_tokens(request.messages)
    return {"prompt_tokens": prompt, "completion_tokens": tokens, "total_tokens": prompt + tokens}


def _completion(request: UpstreamRequest, tokens: int) -> dict[str, Any]:
    message = {"role": "assistant", "content": "".join(_content(request, tokens))}
    return {
        "id": f"chatcmpl-fake-{request.seq}", "object": "chat.completion",
        "created": int(time.time()), "model": request.model,
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "usage": _usage(request, tokens),
    }  # fmt: skip


def _error_body(status: int, message: str) -> dict[str, Any]:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    code = ERROR_CODES.get(status, "server_error" if status >= 500 else "bad_request")
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


async def _send_json(
    request: UpstreamRequest,
    send: Any,
    status: int,
    body: Any,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    request.status = status
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
               *(extra or [])]  # fmt: skip
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await _end(request, send, data)


def _sse_bytes(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()


async def _sse(send: Any, data: dict[str, Any]) -> None:
    await send({"type": "http.response.body", "body": _sse_bytes(data), "more_body": True})


async def _end(request: UpstreamRequest, send: Any, body: bytes) -> None:
    """The last piece of a response (marking it finished first: the client may leave now)."""
    request.finished.set()
    await send({"type": "http.response.body", "body": body, "more_body": False})


# The key the e2e systems send to the fake upstream (a fake; it must never show up anywhere).
UPSTREAM_KEY_ENV = "TIERQ_TEST_UPSTREAM_KEY"
UPSTREAM_KEY = "sk-e2e-upstream-key-0123456789"
