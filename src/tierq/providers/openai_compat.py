"""The OpenAI-compatible provider: chat completions over HTTP with the official ``openai`` SDK.

Works with anything that speaks the chat-completions protocol (OpenAI, vLLM, Ollama, LM Studio,
LiteLLM). ``stream`` jobs are streamed completions, each content delta a :class:`Chunk`, usage
from the final chunk (``stream_options.include_usage``); ``batch`` is one non-streamed
completion; ``vision`` too, with the prompt and each image (URL or data URI) as content parts.

Retries are QStash's job, so the SDK never retries (``max_retries=0``); every SDK failure
becomes a :class:`ProviderError` (see :func:`provider_error`). ``timeout_s`` bounds connecting,
each read and each write; the worker bounds the whole attempt. The API key is read from the
environment variable named by ``api_key_env`` when the client is built; it is never logged and
is scrubbed from error messages. A cancelled ``run`` closes the upstream response at once.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncGenerator, Mapping

import openai
from openai.types import CompletionUsage
from openai.types.chat import (
    ChatCompletionChunk,
    ChatCompletionContentPartParam,
    ChatCompletionMessageParam,
)

from tierq.config import ModelSettings
from tierq.contracts import Usage
from tierq.providers.base import Chunk, Finish, ProviderError, ProviderRequest

NO_KEY = "not-needed"
"""The API key sent to upstreams without auth (vLLM, Ollama): the SDK insists on one."""
RETRYABLE_4XX = frozenset({408, 409, 429})
"""Client-side statuses worth another attempt (the SDK's own retry set)."""
MESSAGE_MAX_CHARS = 500


class OpenAIProvider:
    """A :class:`~tierq.providers.base.Provider` for one model of an OpenAI-compatible server.

    One SDK client per provider, built on first use and reused; :meth:`aclose` releases it.
    """

    def __init__(self, model_id: str, settings: ModelSettings) -> None:
        self.model_id = model_id
        self.settings = settings
        self._client: openai.AsyncOpenAI | None = None
        self._key: str | None = None

    def client(self) -> openai.AsyncOpenAI:
        """The SDK client (built now if needed); ProviderError when the key is missing."""
        if self._client is None:
            self._key = self._api_key()
            self._client = openai.AsyncOpenAI(
                base_url=self.settings.base_url or None,
                api_key=self._key,
                timeout=self.settings.timeout_s,
                max_retries=0,
                default_headers=self.settings.extra_headers or None,
            )
        return self._client

    async def aclose(self) -> None:
        """Close the SDK client and its connections (a later ``run`` builds a new one)."""
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def run(self, request: ProviderRequest) -> AsyncGenerator[Chunk | Finish, None]:
        """Chunks (stream jobs only) then the Finish; or ProviderError."""
        try:
            if request.experience == "stream":
                async for item in self._stream(request):
                    yield item
            else:
                yield await self._complete(request)
        except (openai.OpenAIError, json.JSONDecodeError) as exc:
            raise self._error(exc) from exc

    async def _stream(self, request: ProviderRequest) -> AsyncGenerator[Chunk | Finish, None]:
        raw = await self.client().chat.completions.with_raw_response.create(
            model=request.upstream_model,
            messages=chat_messages(request),
            stream=True,
            stream_options={"include_usage": True},
            max_tokens=self._max_tokens(),
        )
        low = self._low_on_quota(raw.headers)
        stream = raw.parse()
        parts: list[str] = []
        usage = Usage()
        finished = False
        async with stream:  # closes the response on cancel, error or early exit
            async for chunk in stream:
                usage = _usage(chunk.usage) if chunk.usage is not None else usage
                finished = finished or _finished(chunk)
                for text in _texts(chunk):
                    parts.append(text)
                    yield Chunk(text)
        if not finished:
            raise ProviderError(
                f"model {self.model_id!r}: the upstream stream ended before the model finished",
                code="upstream_incomplete",
                retryable=True,
            )
        yield Finish(text="".join(parts), usage=usage, low_on_quota=low)

    async def _complete(self, request: ProviderRequest) -> Finish:
        raw = await self.client().chat.completions.with_raw_response.create(
            model=request.upstream_model,
            messages=chat_messages(request),
            stream=False,
            max_tokens=self._max_tokens(),
        )
        completion = raw.parse()
        text = (completion.choices[0].message.content or "") if completion.choices else ""
        usage = _usage(completion.usage) if completion.usage is not None else Usage()
        return Finish(text=text, usage=usage, low_on_quota=self._low_on_quota(raw.headers))

    def _low_on_quota(self, headers: Mapping[str, str]) -> bool:
        """Whether the upstream's ``x-ratelimit-remaining-{requests,tokens}`` fell under
        ``adaptive.low_remaining`` of its ``x-ratelimit-limit-*``."""
        share = self.settings.adaptive.low_remaining
        for kind in ("requests", "tokens"):
            try:
                limit = float(headers.get(f"x-ratelimit-limit-{kind}", ""))
                left = float(headers.get(f"x-ratelimit-remaining-{kind}", ""))
            except ValueError:
                continue
            if limit > 0 and left / limit < share:
                return True
        return False

    def _max_tokens(self) -> int | openai.Omit:
        limit = self.settings.max_tokens
        return openai.omit if limit is None else limit

    def _api_key(self) -> str:
        name = self.settings.api_key_env
        if not name:
            return NO_KEY
        key = os.environ.get(name)
        if not key:
            raise ProviderError(
                f"model {self.model_id!r}: environment variable {name} (its API key) is not set",
                code="upstream_key_missing",
                retryable=False,
            )
        return key

    def _error(self, exc: Exception) -> ProviderError:
        secret = self._key if self._key != NO_KEY else None
        return provider_error(exc, self.model_id, secret)


def chat_messages(request: ProviderRequest) -> list[ChatCompletionMessageParam]:
    """The one user message of a job: plain text, or text and image parts for vision."""
    job = request.input
    if request.experience != "vision":
        return [{"role": "user", "content": job.prompt}]
    parts: list[ChatCompletionContentPartParam] = [{"type": "text", "text": job.prompt}]
    parts.extend({"type": "image_url", "image_url": {"url": url}} for url in job.images)
    return [{"role": "user", "content": parts}]


def provider_error(exc: Exception, model_id: str, secret: str | None = None) -> ProviderError:
    """The ProviderError for an SDK failure (or an undecodable upstream answer).

    Timeouts, unreachable upstreams, 5xx, 408/409/429 and broken answers are retryable; other
    4xx are permanent. ``code`` is ``upstream_timeout``, ``upstream_unreachable``,
    ``upstream_429``, ``upstream_5xx``, ``upstream_4xx``, ``upstream_bad_response`` or
    ``upstream_error`` (an error event inside a stream, or an SDK failure of its own). The
    message names the model, never contains ``secret`` and is at most ``MESSAGE_MAX_CHARS``.
    """
    message, code, retryable = _classify(exc)
    if secret:
        message = message.replace(secret, "[redacted]")
    return ProviderError(_clip(f"model {model_id!r}: {message}"), code=code, retryable=retryable)


def _classify(exc: Exception) -> tuple[str, str, bool]:
    if isinstance(exc, openai.APITimeoutError):
        return "the upstream timed out", "upstream_timeout", True
    if isinstance(exc, openai.APIConnectionError):
        cause = f" ({type(exc.__cause__).__name__})" if exc.__cause__ else ""
        return f"the upstream is unreachable{cause}", "upstream_unreachable", True
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        message = f"the upstream answered {status}: {_upstream_message(exc)}"
        return message, _status_code(status), status >= 500 or status in RETRYABLE_4XX
    if isinstance(exc, openai.APIResponseValidationError | json.JSONDecodeError):
        return "the upstream sent an answer that cannot be read", "upstream_bad_response", True
    if isinstance(exc, openai.APIError):
        return f"upstream error: {exc.message}", "upstream_error", True
    return f"{type(exc).__name__}: {exc}", "upstream_error", False


def _status_code(status: int) -> str:
    if status == 429:
        return "upstream_429"
    return "upstream_4xx" if 400 <= status < 500 else "upstream_5xx"


def _upstream_message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return str(body["message"])
    return exc.message


def _clip(message: str) -> str:
    return message if len(message) <= MESSAGE_MAX_CHARS else message[: MESSAGE_MAX_CHARS - 1] + "…"


def _usage(usage: CompletionUsage) -> Usage:
    return Usage(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens)


def _finished(chunk: ChatCompletionChunk) -> bool:
    return any(choice.finish_reason is not None for choice in chunk.choices)


def _texts(chunk: ChatCompletionChunk) -> list[str]:
    return [c.delta.content for c in chunk.choices if c.delta is not None and c.delta.content]
