"""The token path's pure helpers against the pydantic contracts they stand in for."""

from __future__ import annotations

import json

import pytest

from tierq.contracts import Delta, is_terminal, parse_event
from tierq.events.codec import delta_of, delta_prefix, entry, sse_frame, stream_id
from tierq.events.log import event_prefix


@pytest.mark.parametrize("text", ["hello", ' quote " and \\ back', "", "line\nbreak", "é ünï 🙂"])
def test_delta_prefix_is_the_contract_event(text: str) -> None:
    ours = json.loads(delta_prefix("job_1", 123, text).decode() + ',"seq":4}')
    theirs = json.loads(event_prefix(Delta(jobId="job_1", ts=123, text=text)) + ',"seq":4}')
    assert ours == theirs
    assert parse_event(json.dumps(ours)) == Delta(jobId="job_1", ts=123, text=text, seq=4)


@pytest.mark.parametrize(
    ("event", "terminal"),
    [
        ({"type": "queued", "queueId": "q_paid_stream", "tier": "paid"}, False),
        ({"type": "delta", "text": "x"}, False),
        ({"type": "completed", "result": "x"}, True),
        ({"type": "cancelled"}, True),
        ({"type": "failed", "code": "c", "message": "m", "retryable": True}, False),
        ({"type": "failed", "code": "c", "message": "m", "retryable": False}, True),
    ],
)
def test_entry_knows_what_ends_a_job_as_the_contract_does(
    event: dict[str, object], terminal: bool
) -> None:
    raw = json.dumps({"jobId": "j", "ts": 1, "seq": 7, **event})
    item = entry("1-0", raw)
    assert (item.type, item.seq, item.terminal) == (event["type"], 7, terminal)
    assert is_terminal(parse_event(raw)) == terminal


def test_stream_ids_compare_as_numbers() -> None:
    ids = ["9-0", "10-0", "10-2", "10-10", "100-1"]
    assert sorted(ids, key=stream_id) == ids
    assert stream_id("0-0") < stream_id("1-0")


def test_an_sse_frame_carries_id_event_and_one_data_line() -> None:
    raw = json.dumps({"jobId": "j", "type": "delta", "text": "a\nb", "seq": 2})
    frame = sse_frame(entry("5-1", raw))
    assert frame == f"id: 5-1\nevent: delta\ndata: {raw}\n\n".encode()
    assert frame.count(b"\n") == 4  # JSON escapes the newline in the text


def test_delta_of_reads_job_and_text() -> None:
    raw = delta_prefix("job_9", 5, "some text").decode() + ',"seq":3}'
    assert delta_of(entry("1-0", raw)) == ("job_9", "some text")
