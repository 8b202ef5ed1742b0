"""The pure worker steps: validate and the route decision, as input → output tables."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tierq.events.state import JobState
from tierq.worker.result import Err, Ok
from tierq.worker.steps.route import Decision, decide
from tierq.worker.steps.validate import validate


def body(**changes: Any) -> bytes:
    data: dict[str, Any] = {
        "v": 1,
        "jobId": "job_1",
        "userId": "u",
        "plan": "paid",
        "tier": "paid",
        "queueId": "q_paid_stream",
        "modelId": "sim",
        "service": "chat",
        "experience": "stream",
        "input": {"prompt": "hi"},
        "submittedAt": 1,
        "maxRetries": 3,
    }
    data.update(changes)
    return json.dumps(data).encode()


@pytest.mark.parametrize(
    ("raw", "route", "service", "code"),
    [
        (body(), "stream", "chat", None),
        (body(experience="batch", queueId="q_paid_batch"), "batch", "chat", None),
        (body(experience="vision", queueId="q_paid_vision"), "batch", "chat", None),
        (b"not json", "stream", "chat", "invalid_body"),
        (body(extra="x"), "stream", "chat", "invalid_body"),
        (body(), "batch", "chat", "wrong_route"),
        (body(experience="vision", queueId="q_paid_vision"), "stream", "chat", "wrong_route"),
        (body(), "stream", "describe", "wrong_service"),
        (body(queueId="q_free_stream"), "stream", "chat", "wrong_queue"),
        (body(tier="gold"), "stream", "chat", "invalid_body"),
    ],
)
def test_validate(raw: bytes, route: str, service: str, code: str | None) -> None:
    result = validate(raw, route, service)  # type: ignore[arg-type]
    if code is None:
        assert isinstance(result, Ok)
        assert result.value.job_id == "job_1"
    else:
        assert isinstance(result, Err)
        assert result.error.status == 489
        assert result.error.headers["Upstash-NonRetryable-Error"] == "true"
        assert result.error.body["error"]["code"] == code


UPSTREAM_4XX = '{"code": "upstream_4xx", "message": "no", "retryable": false}'


def record(**fields: str) -> JobState | None:
    """The state as the store parses it from a record holding ``fields``."""
    return JobState.parse(fields)


@pytest.mark.parametrize(
    ("state", "message_id", "alive", "expected"),
    [
        (None, "m1", False, ("done", "gone")),
        (record(status="queued"), "m1", False, Decision("run")),
        (record(status="waiting"), "m1", False, Decision("run")),
        (record(status="running"), "m1", False, Decision("run")),  # its runner died: take over
        (record(status="running"), "m1", True, ("busy", 429)),
        (record(status="completed"), "m1", False, ("done", "completed")),
        (record(status="cancelled"), "m1", False, ("done", "cancelled")),
        (
            record(status="failed", failedMessageId="m1", error=UPSTREAM_4XX),
            "m1",
            False,
            ("dlq", "upstream_4xx"),
        ),
        (record(status="failed", failedMessageId="m1"), "m1", False, ("dlq", "failed")),
        (
            record(status="failed", failedMessageId="m1", error="[1]"),
            "m1",
            False,
            ("dlq", "failed"),
        ),
        (record(status="failed", failedMessageId="m1"), "m2", False, Decision("run", revive=True)),
        (record(status="failed"), "m1", False, Decision("run", revive=True)),  # no failing id
        (record(status="queued", cancelRequested="1"), "m1", False, Decision("cancel")),
        (record(status="running", cancelRequested="1"), "m1", True, Decision("cancel")),
        (record(status="queued", cancelRequested="0"), "m1", False, Decision("run")),
        (record(status="completed", cancelRequested="1"), "m1", False, ("done", "completed")),
    ],
)
def test_decide(state: JobState | None, message_id: str, alive: bool, expected: Any) -> None:
    result = decide(state, message_id, alive, retry_after_s=7)
    if isinstance(expected, Decision):
        assert result == Ok(expected)
        return
    assert isinstance(result, Err)
    kind, value = expected
    if kind == "busy":
        assert result.error.status == 429
        assert result.error.headers["Retry-After"] == "7"
    elif kind == "dlq":
        assert result.error.status == 489
        assert result.error.headers["Upstash-NonRetryable-Error"] == "true"
        assert result.error.body["error"]["code"] == value
    else:
        assert result.error.status == 200
        assert result.error.body["status"] == value
