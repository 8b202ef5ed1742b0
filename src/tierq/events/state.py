"""A job's state record, typed: the Redis hash the ``events/lua`` scripts and the pipeline write,
parsed once where it is read (:meth:`tierq.events.log.JobStore.state`, the dispatcher's claim).

Who writes what: ``create.lua`` (status, seq and the submit's userId, tier, queueId, modelId,
service, experience, createdAt), ``append.lua`` (status, seq, terminalSeq and the fields of the
event: startedAt and attempts at a start, result, usage, error, finishedAt and failedMessageId at
the end), ``cancel.lua`` (cancelRequested, or status, terminalSeq and finishedAt), the dispatcher
(messageId once published) and a run's heartbeat (beatAt); a run started at dispatch
(``tierq.dispatch.local``) writes its message id as localRun with its start (``pending``
while its publish has not answered; empty otherwise).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tierq.contracts import TERMINAL_STATUSES

FIELDS = (
    "status", "userId", "tier", "queueId", "modelId", "service", "experience", "createdAt",
    "startedAt", "finishedAt", "attempts", "seq", "terminalSeq", "result", "usage", "error",
    "messageId", "failedMessageId", "cancelRequested", "beatAt", "localRun",
)  # fmt: skip
"""Every field of the record, as the scripts spell them."""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None  # never written so; read as absent rather than failing every reader


@dataclass(frozen=True)
class JobState:
    """One job's record. A field the record does not hold (yet) is ``None``; ``usage`` and
    ``error`` are the JSON texts the record keeps (the API parses them for its views)."""

    status: str | None = None
    user_id: str | None = None
    tier: str | None = None
    queue_id: str | None = None
    model_id: str | None = None
    service: str | None = None
    experience: str | None = None
    created_at: int | None = None
    started_at: int | None = None
    finished_at: int | None = None
    attempts: int | None = None
    seq: int | None = None
    terminal_seq: int | None = None
    result: str | None = None
    usage: str | None = None
    error: str | None = None
    message_id: str | None = None
    failed_message_id: str | None = None
    cancel_requested: bool = False
    beat_at: int | None = None
    local_run: str | None = None  # the message id of the run, when a local start runs it

    @classmethod
    def parse(cls, raw: Mapping[Any, Any]) -> JobState | None:
        """The record from Redis's reply (``HGETALL``, or field → value with ``None`` for a
        field not held); ``None`` when it holds nothing (the job is gone or never was)."""
        got = {_text(k): _text(v) for k, v in raw.items() if v is not None}
        if not got:
            return None
        return cls(
            status=got.get("status"),
            user_id=got.get("userId"),
            tier=got.get("tier"),
            queue_id=got.get("queueId"),
            model_id=got.get("modelId"),
            service=got.get("service"),
            experience=got.get("experience"),
            created_at=_int(got.get("createdAt")),
            started_at=_int(got.get("startedAt")),
            finished_at=_int(got.get("finishedAt")),
            attempts=_int(got.get("attempts")),
            seq=_int(got.get("seq")),
            terminal_seq=_int(got.get("terminalSeq")),
            result=got.get("result"),
            usage=got.get("usage"),
            error=got.get("error"),
            message_id=got.get("messageId"),
            failed_message_id=got.get("failedMessageId"),
            cancel_requested=got.get("cancelRequested") == "1",
            beat_at=_int(got.get("beatAt")),
            local_run=got.get("localRun") or None,
        )

    @property
    def terminal(self) -> bool:
        """Whether the job ended (completed, failed or cancelled)."""
        return self.status in TERMINAL_STATUSES

    def is_final(self, seq: int) -> bool:
        """Whether the event with ``seq`` is the job's last: its terminal event."""
        return self.terminal and self.terminal_seq == seq
