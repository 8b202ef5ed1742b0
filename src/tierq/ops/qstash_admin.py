"""The admin API's view of a QStash DLQ message (pure; the DLQ calls are
:class:`tierq.broker.client.QStashGateway`'s)."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any


def _text(raw: dict[str, Any], name: str) -> str | None:
    """A body field as text, whether QStash sent it plain or base64-encoded."""
    if isinstance(raw.get(name), str):
        return str(raw[name])
    encoded = raw.get(f"{name}Base64")
    if not isinstance(encoded, str):
        return None
    try:
        return base64.b64decode(encoded).decode("utf-8", errors="replace")
    except (binascii.Error, ValueError):
        return None


def _job_fields(body: str | None) -> dict[str, Any]:
    try:
        parsed = json.loads(body) if body else None
    except ValueError:
        parsed = None
    return parsed if isinstance(parsed, dict) else {}


def dlq_entry(raw: dict[str, Any]) -> dict[str, Any]:
    """The admin API's ``DlqEntry`` for one QStash DLQ message; ``jobId``/``userId`` are
    ``None`` when the message is not a tierq job."""
    job = _job_fields(_text(raw, "body"))
    return {
        "dlqId": raw.get("dlqId"),
        "messageId": raw.get("messageId"),
        "queueId": raw.get("queueName") or job.get("queueId"),
        "jobId": job.get("jobId"),
        "userId": job.get("userId"),
        "url": raw.get("url"),
        "responseStatus": raw.get("responseStatus"),
        "responseBody": _text(raw, "responseBody"),
        "createdAt": raw.get("createdAt"),
    }
