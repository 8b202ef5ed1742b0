"""The provider interface: one job attempt in, a stream of output chunks and a finish out.

A provider never publishes events itself. The worker turns each :class:`Chunk` into a
``delta`` event and the single :class:`Finish` into ``completed``; a :class:`ProviderError`
becomes ``failed`` (retried by QStash when ``retryable``). Any other exception escaping a
provider is a bug in provider code, and the worker must survive it.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Protocol

from tierq.contracts import JobInput, Usage
from tierq.errors import UpstreamError
from tierq.queues import Experience


@dataclass(frozen=True)
class Chunk:
    """A piece of output text; becomes a ``delta`` event."""

    text: str


@dataclass(frozen=True)
class Finish:
    """The full result text and the token usage; becomes ``completed``. Always last."""

    text: str
    usage: Usage
    low_on_quota: bool = False
    """The upstream's rate-limit headers said little of its quota is left (adaptive limits)."""


@dataclass(frozen=True)
class ProviderRequest:
    """Everything a provider needs for one attempt of one job."""

    job_id: str
    model_id: str
    upstream_model: str
    experience: Experience
    input: JobInput
    attempt: int = 0
    """0 for the first delivery; equals the ``Upstash-Retried`` header after that."""


class Provider(Protocol):
    """Runs one job attempt.

    ``run`` yields zero or more :class:`Chunk` (stream jobs; batch and vision may yield none)
    followed by exactly one :class:`Finish`, or raises :class:`ProviderError`. It must be
    cancellable at any ``await`` (job timeout, user cancel).
    """

    def run(self, request: ProviderRequest) -> AsyncGenerator[Chunk | Finish, None]: ...


class ProviderError(UpstreamError):
    """The model upstream failed this attempt.

    ``retryable`` is True for transient failures (upstream 429/5xx, timeouts, dropped
    connections) and False for permanent ones (upstream 4xx, bad input); ``code`` is the
    stable machine-readable reason carried into the ``failed`` event.
    """

    def __init__(self, message: str, *, code: str, retryable: bool) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.retryable = retryable

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.message!r}, code={self.code!r}, "
            f"retryable={self.retryable!r})"
        )
