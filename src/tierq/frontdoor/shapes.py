"""OpenAI's response objects, built from tierq events: ``chat.completion`` and
``chat.completion.chunk`` (streamed as SSE ``data:`` lines, ended by ``data: [DONE]``)."""

from __future__ import annotations

import json
from typing import Any

from tierq.contracts import Usage

DONE = b"data: [DONE]\n\n"


def completion_id(job_id: str) -> str:
    return f"chatcmpl-{job_id}"


def job_id_of(completion: str) -> str | None:
    """The tierq job id inside a completion id (``None`` if it is not one of ours)."""
    prefix = "chatcmpl-"
    return completion[len(prefix) :] if completion.startswith(prefix) else None


def usage_body(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


def completion(job_id: str, model: str, created: int, text: str, usage: Usage) -> dict[str, Any]:
    return {
        "id": completion_id(job_id),
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": usage_body(usage),
        "system_fingerprint": None,
    }


class Chunks:
    """The chunks of one streamed answer (all share id, created and model)."""

    def __init__(self, job_id: str, model: str, created: int, include_usage: bool) -> None:
        self.id = completion_id(job_id)
        self.model = model
        self.created = created
        self.include_usage = include_usage

    def _chunk(self, choices: list[dict[str, Any]], usage: Usage | None = None) -> bytes:
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
        }
        if self.include_usage:
            body["usage"] = usage_body(usage) if usage is not None else None
        return sse(body)

    def delta(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return self._chunk([choice])

    def role(self) -> bytes:
        """The first chunk: it names the speaker, as OpenAI's does."""
        return self.delta({"role": "assistant", "content": ""})

    def content(self, text: str) -> bytes:
        return self.delta({"content": text})

    def stop(self) -> bytes:
        return self.delta({}, finish_reason="stop")

    def usage(self, usage: Usage) -> bytes:
        """The usage chunk (``stream_options.include_usage``): no choices, the usage."""
        return self._chunk([], usage)


def sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"
