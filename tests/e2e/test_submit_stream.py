"""Submit and follow in one request: ``POST /api/jobs`` with ``Accept: text/event-stream``
answers with the job's event stream (real HTTP, real Redis, real broker)."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator

import httpx
from test_sse import RawStream, assert_error, datas, log_ids, read_sse

from helpers import wait_until
from system import PAID, System
from system import job_body as body

SSE = {"Authorization": f"Bearer {PAID}", "Accept": "text/event-stream"}
SLOW = {"tokens": 20, "token_latency_ms": 30}


def lines_of(res: httpx.Response, deadline: float) -> RawStream:
    messages: list[dict[str, str]] = []
    comments: list[str] = []
    current: dict[str, str] = {}
    for line in res.iter_lines():
        assert time.monotonic() < deadline, "the stream did not end in time"
        if line.startswith(":"):
            comments.append(line)
        elif not line:
            if current:
                messages.append(current)
                current = {}
        else:
            name, _, value = line.partition(":")
            current[name] = value.removeprefix(" ")
    return RawStream(messages, comments, ended=not current)


def job_records(system: System) -> int:
    return sum(1 for _ in system.redis.scan_iter(match=system.keys.job("*"), count=1000))


def test_a_streamed_submit_answers_with_the_whole_event_log(system: System) -> None:
    deadline = time.monotonic() + 20
    with system.http.stream(
        "POST", "/api/jobs", json=body(input={"prompt": "x", "simulate": SLOW}), headers=SSE
    ) as res:
        assert res.status_code == 200, res.read()
        assert res.headers["content-type"].startswith("text/event-stream")
        job_id = res.headers["x-tierq-job-id"]
        assert res.headers["x-tierq-queue-id"] == "q_paid_stream"
        assert res.headers["x-tierq-tier"] == "paid"
        assert res.headers["x-tierq-events-url"] == f"/api/jobs/{job_id}/events"
        token = res.headers["x-tierq-events-token"]
        stream = lines_of(res, deadline)
    assert stream.ended
    events = datas(stream)
    assert events[0]["type"] == "queued"  # from the first event: nothing came before it
    assert events[-1]["type"] == "completed"
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert [m["id"] for m in stream.messages] == log_ids(system, job_id)
    text = "".join(e["text"] for e in events if e["type"] == "delta")
    assert text == events[-1]["result"]
    assert len(text.split()) == 20
    # the headers' url and token resume the stream exactly, like a 202's
    middle = stream.messages[len(stream.messages) // 2]["id"]
    tail = read_sse(system, job_id, token=token, last_event_id=middle)
    index = [m["id"] for m in stream.messages].index(middle)
    assert tail.messages == stream.messages[index + 1 :]
    assert system.metric("tierq_sse_connections") == 0


def test_a_refused_streamed_submit_is_the_usual_json_error(system: System) -> None:
    before = job_records(system)
    res = system.http.post("/api/jobs", json=body(model="no-such-model"), headers=SSE)
    assert assert_error(res, 404)["code"] == "unknown_model"
    res = system.http.post(
        "/api/jobs", json=body(), headers={**SSE, "Authorization": "Bearer tq_nobody"}
    )
    assert_error(res, 401)
    assert job_records(system) == before


def test_a_streamed_submit_counts_against_the_users_stream_cap(
    make_system: Callable[..., System],
) -> None:
    system = make_system(sse_max_per_user=1)
    hang = body(input={"prompt": "x", "simulate": {"fail": "hang"}})
    readers: list[Iterator[str]] = []
    with contextlib.ExitStack() as streams:
        first = streams.enter_context(
            system.http.stream("POST", "/api/jobs", json=hang, headers=SSE)
        )
        assert first.status_code == 200
        readers.append(first.iter_lines())
        next(readers[-1])  # served
        job_id = first.headers["x-tierq-job-id"]
        before = job_records(system)
        over = system.http.post("/api/jobs", json=body(), headers=SSE)
        assert assert_error(over, 429)["code"] == "too_many_streams"
        assert job_records(system) == before  # refused before anything was submitted
        # without the header the submit is not a stream: the cap does not apply
        plain = {"Authorization": SSE["Authorization"]}
        assert system.http.post("/api/jobs", json=body(), headers=plain).status_code == 202
        first.close()
    wait_until(lambda: system.metric("tierq_sse_connections") == 0)
    again = system.http.post("/api/jobs", json=body(), headers=SSE)  # the place was given back
    assert again.status_code == 200
    assert (
        json.loads([line for line in again.text.splitlines() if line.startswith("data:")][-1][5:])[
            "type"
        ]
        == "completed"
    )
    system.http.delete(f"/api/jobs/{job_id}", headers={"Authorization": SSE["Authorization"]})
    wait_until(lambda: system.job(job_id)["status"] == "cancelled")
