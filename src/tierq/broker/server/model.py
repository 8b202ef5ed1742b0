"""What the broker stores per message, and how it is shown on the wire (QStash's JSON keys)."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, Field

MessageKind = Literal["message", "callback", "failure_callback"]


class FollowUp(BaseModel):
    """A callback or failure-callback target and the settings of the messages sent to it."""

    url: str
    method: str = "POST"
    headers: dict[str, list[str]] = Field(default_factory=dict)
    retries: int | None = None
    timeout_s: float | None = None
    retry_delay: str | None = None
    delay_s: float | None = None


class StoredMessage(BaseModel):
    id: str
    user: str
    url: str
    method: str = "POST"
    headers: dict[str, list[str]] = Field(default_factory=dict)
    content_type: str | None = None
    max_retries: int = 3
    retry_delay: str | None = None
    timeout_s: float | None = None
    not_before_ms: int = 0
    created_at_ms: int = 0
    callback: FollowUp | None = None
    failure_callback: FollowUp | None = None
    queue: str | None = None
    labels: list[str] = Field(default_factory=list)
    dedup_id: str | None = None
    caller_ip: str | None = None
    redact: list[str] = Field(default_factory=list)
    kind: MessageKind = "message"
    source_message_id: str | None = None
    # The Upstash-* settings as received (lower-case names), so a DLQ retry can override some.
    config: dict[str, str] = Field(default_factory=dict)


class AttemptResponse(BaseModel):
    """The destination's answer to one attempt (status 0 when there was none)."""

    status: int
    headers: dict[str, list[str]] = Field(default_factory=dict)
    body: bytes = b""
    error: str | None = None
    # The answer came from a non-global address (or one that could not be told); not stored.
    private_peer: bool = Field(default=False, exclude=True)

    def without_content(self) -> AttemptResponse:
        """The status only: what a callback may learn of a private destination's answer."""
        return AttemptResponse(status=self.status, error=self.error)


def _redacted(value: bytes) -> str:
    return "REDACTED:" + hashlib.sha256(value).hexdigest()


def body_fields(body: bytes, prefix: str = "body") -> dict[str, str]:
    """``body`` when it is UTF-8 text, else ``bodyBase64`` (QStash's two spellings)."""
    try:
        return {prefix: body.decode()}
    except UnicodeDecodeError:
        return {prefix + "Base64": base64.b64encode(body).decode()}


def _shown_headers(msg: StoredMessage) -> dict[str, list[str]]:
    if "header" in msg.redact:
        return {k: [_redacted(v.encode()) for v in vs] for k, vs in msg.headers.items()}
    hidden = {r[7:-1].lower() for r in msg.redact if r.startswith("header[")}
    return {
        k: ([_redacted(v.encode()) for v in vs] if k.lower() in hidden else vs)
        for k, vs in msg.headers.items()
    }


def message_wire(msg: StoredMessage, body: bytes) -> dict[str, Any]:
    """The Message object of ``GET /v2/messages/{id}`` (and the base of DLQ entries)."""
    out: dict[str, Any] = {
        "messageId": msg.id,
        "url": msg.url,
        "method": msg.method,
        "header": _shown_headers(msg),
        "maxRetries": msg.max_retries,
        "notBefore": msg.not_before_ms,
        "createdAt": msg.created_at_ms,
        "callerIP": msg.caller_ip or "",
    }
    if "body" in msg.redact:
        out["body"] = _redacted(body)
    else:
        out.update(body_fields(body))
    optional: dict[str, Any] = {
        "queueName": msg.queue,
        "retryDelayExpression": msg.retry_delay,
        "callback": msg.callback.url if msg.callback else None,
        "failureCallback": msg.failure_callback.url if msg.failure_callback else None,
        "callbackHeader": msg.callback.headers if msg.callback else None,
        "failureCallbackHeader": msg.failure_callback.headers if msg.failure_callback else None,
        "label": msg.labels[0] if msg.labels else None,
        "labels": msg.labels or None,
    }
    out.update({k: v for k, v in optional.items() if v is not None})
    return out


def dlq_wire(
    msg: StoredMessage, body: bytes, response: AttemptResponse, dlq_id: str
) -> dict[str, Any]:
    out = message_wire(msg, body)
    out["dlqId"] = dlq_id
    out["responseStatus"] = response.status
    out["responseHeader"] = response.headers
    out.update(body_fields(response.body, "responseBody"))
    if response.error:
        out["error"] = response.error
    return out


def event_fields(msg: StoredMessage) -> dict[str, Any]:
    """The part of a log event that is the same for every state of a message.

    ``_u`` (the owner) is stripped before events are shown.
    """
    fields: dict[str, Any] = {
        "_u": msg.user,
        "messageId": msg.id,
        "url": msg.url,
        "method": msg.method,
        "maxRetries": msg.max_retries,
    }
    if msg.queue:
        fields["queueName"] = msg.queue
    if msg.labels:
        fields["label"] = msg.labels[0]
        fields["labels"] = msg.labels
    if msg.retry_delay:
        fields["retryDelayExpr"] = fields["retryDelayExpression"] = msg.retry_delay
    return fields


def event_base_json(msg: StoredMessage) -> str:
    """``event_fields`` as JSON without its closing brace: Lua appends time and state."""
    return json.dumps(event_fields(msg), separators=(",", ":"))[:-1]


def log_event(
    msg: StoredMessage,
    state: str,
    now_ms: int,
    *,
    response: AttemptResponse | None = None,
    next_delivery_ms: int | None = None,
) -> str:
    """One entry of ``GET /v2/events``, as stored (JSON)."""
    event = event_fields(msg)
    event["time"] = now_ms
    event["state"] = state
    if response is not None:
        event["responseStatus"] = response.status
        event["responseHeader"] = event["responseHeaders"] = response.headers
        event.update(body_fields(response.body, "responseBody"))
        if response.error:
            event["error"] = response.error
    if next_delivery_ms is not None:
        event["nextDeliveryTime"] = next_delivery_ms
    return json.dumps(event, separators=(",", ":"))
