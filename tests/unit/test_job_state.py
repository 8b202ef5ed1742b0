"""The job state record, parsed once at the store: what each field becomes."""

from __future__ import annotations

from typing import Any

import pytest

from tierq.events.state import FIELDS, JobState

FULL = {
    "status": "failed", "userId": "u1", "tier": "paid", "queueId": "q_paid_stream",
    "modelId": "sim", "service": "chat", "experience": "stream", "createdAt": "1000",
    "startedAt": "1100", "finishedAt": "1500", "attempts": "2", "seq": "9", "terminalSeq": "9",
    "result": "hi", "usage": '{"inputTokens":1}', "error": '{"code":"x"}', "messageId": "m2",
    "failedMessageId": "m2", "cancelRequested": "1", "beatAt": "1400", "localRun": "m2",
}  # fmt: skip


def test_every_field_of_the_record_is_typed() -> None:
    assert set(FULL) == set(FIELDS)
    raw = {k.encode(): v.encode() for k, v in FULL.items()}  # as HGETALL answers
    assert JobState.parse(raw) == JobState(
        status="failed", user_id="u1", tier="paid", queue_id="q_paid_stream", model_id="sim",
        service="chat", experience="stream", created_at=1000, started_at=1100,
        finished_at=1500, attempts=2, seq=9, terminal_seq=9, result="hi",
        usage='{"inputTokens":1}', error='{"code":"x"}', message_id="m2",
        failed_message_id="m2", cancel_requested=True, beat_at=1400, local_run="m2",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({}, None),  # gone
        ({"status": None, "userId": None}, None),  # HMGET of a gone record
        ({"status": "queued", "seq": "1"}, JobState(status="queued", seq=1)),
        ({b"status": b"queued", b"cancelRequested": b"0"}, JobState(status="queued")),
        ({"status": "queued", "messageId": None}, JobState(status="queued")),
        ({"status": "running", "attempts": "x"}, JobState(status="running")),  # never written
        ({"beatAt": "5"}, JobState(beat_at=5)),  # a record without a status
        ({"status": "running", "localRun": ""}, JobState(status="running")),  # a delivery's run
    ],
)
def test_parse(raw: dict[Any, Any], expected: JobState | None) -> None:
    assert JobState.parse(raw) == expected


@pytest.mark.parametrize(
    ("fields", "seq", "terminal", "final"),
    [
        ({"status": "completed", "terminalSeq": "4"}, 4, True, True),
        ({"status": "completed", "terminalSeq": "4"}, 3, True, False),
        ({"status": "cancelled", "terminalSeq": "2"}, 2, True, True),
        ({"status": "failed", "terminalSeq": "5"}, 5, True, True),
        ({"status": "queued", "terminalSeq": "5"}, 5, False, False),  # revived: not final
        ({"status": "running"}, 1, False, False),
    ],
)
def test_terminal_and_final(fields: dict[str, str], seq: int, terminal: bool, final: bool) -> None:
    state = JobState.parse(fields)
    assert state is not None
    assert state.terminal is terminal
    assert state.is_final(seq) is final
