"""Pure helpers of the token path: event JSON without pydantic, log entry ids, SSE frames.

Everything here runs once per token or per log entry, so it avoids pydantic and builds bytes
directly; the shapes are the same as :mod:`tierq.contracts` produces (tested against it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from tierq.contracts import ends_job

PING = b": ping\n\n"
"""An SSE comment: keeps proxies and the browser from timing the connection out."""


def delta_data(job_id: str, ts: int, text: str) -> dict[str, Any]:
    """A ``delta`` event's fields, but its ``seq`` (the append script gives it)."""
    return {"jobId": job_id, "ts": ts, "type": "delta", "text": text}


def prefix_of(data: dict[str, Any]) -> bytes:
    """An event as the append scripts take it: JSON without ``seq`` and without its closing
    brace (the script adds both)."""
    return orjson.dumps(data)[:-1]


def delta_prefix(job_id: str, ts: int, text: str) -> bytes:
    """A ``delta`` event as the append scripts take it (see :func:`prefix_of`)."""
    return prefix_of(delta_data(job_id, ts, text))


@dataclass(frozen=True, slots=True)
class Entry:
    """One entry of a job's event log, parsed once (``data``, and its id as ``pos``) for
    every follower of it."""

    id: str
    raw: str
    data: dict[str, Any]
    pos: tuple[int, int]  # stream_id(id): comparable

    @property
    def type(self) -> str:
        return str(self.data.get("type", ""))

    @property
    def seq(self) -> int:
        return int(self.data.get("seq", 0))

    @property
    def terminal(self) -> bool:
        """The job ends here (unless a DLQ retry revives it later)."""
        return ends_job(self.type, self.data.get("retryable"))


def entry(entry_id: str, raw: str) -> Entry:
    return Entry(entry_id, raw, orjson.loads(raw), stream_id(entry_id))


def delta_entry(entry_id: str, prefix: bytes, seq: int, data: dict[str, Any]) -> Entry:
    """The entry of a ``delta`` this process just wrote (``prefix``: what
    :func:`delta_prefix` made of ``data``), without parsing the JSON it built itself."""
    data["seq"] = seq
    return Entry(entry_id, f'{prefix.decode()},"seq":{seq}}}', data, stream_id(entry_id))


def delta_of(item: Entry) -> tuple[str, str]:
    """The job id and the text of a ``delta`` entry (read without pydantic)."""
    return str(item.data["jobId"]), str(item.data["text"])


def stream_id(value: str) -> tuple[int, int]:
    """A Redis stream entry id (``"1700000000000-3"``) as a comparable pair."""
    ms, _, seq = value.partition("-")
    return int(ms), int(seq or 0)


def sse_frame(item: Entry) -> bytes:
    """One SSE message: ``id`` is the log entry id (what ``Last-Event-ID`` resumes from),
    ``event`` the event type, ``data`` the event JSON (one line: JSON escapes newlines)."""
    return b"id: %s\nevent: %s\ndata: %s\n\n" % (
        item.id.encode(),
        item.type.encode(),
        item.raw.encode(),
    )
