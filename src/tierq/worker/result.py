"""``Result[T, E]``: each pipeline step returns ``Ok(value)`` or ``Err(reply)``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")
E = TypeVar("E")


@dataclass(frozen=True)
class Ok(Generic[T]):
    value: T


@dataclass(frozen=True)
class Err(Generic[E]):
    error: E


Result = Ok[T] | Err[E]


@dataclass(frozen=True)
class Reply:
    """The answer a delivery gets; QStash acts on the status (2xx done, 429/5xx retry,
    489 + ``Upstash-NonRetryable-Error`` straight to the DLQ)."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    ran: bool = False
    """The delivery ran the job (or ended it): its answer is the job's, not a refusal."""


def done(status: str, **extra: Any) -> Reply:
    return Reply(200, {"status": status, **extra})


def error_reply(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> Reply:
    return Reply(status, {"error": {"code": code, "message": message}}, headers or {})


def non_retryable(code: str, message: str) -> Reply:
    return error_reply(489, code, message, {"Upstash-NonRetryable-Error": "true"})
