"""SSE over real HTTP: wire format, replay, exact resume, keep-alive, end, disconnect, auth."""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx

from helpers import wait_until
from system import FREE, PAID, System

ENTRY_ID = re.compile(r"^\d+-\d+$")
TERMINAL = {"completed", "failed", "cancelled"}
HANG = {"fail": "hang"}
SLOW = {"tokens": 20, "token_latency_ms": 50}


@dataclass
class RawStream:
    """What one SSE connection carried: its messages (field → value), comment lines, and
    whether the server completed the response (``False`` when the client stopped reading)."""

    messages: list[dict[str, str]]
    comments: list[str]
    ended: bool


def read_sse(
    system: System,
    job_id: str,
    *,
    token: str | None = None,
    key: str | None = None,
    last_event_id: str | None = None,
    limit: int | None = None,
    within_s: float = 20.0,
) -> RawStream:
    """Read the job's SSE stream line by line until it ends (or ``limit`` messages arrived),
    failing if that takes longer than ``within_s``."""
    params = {"token": token} if token else {}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if last_event_id:
        headers["Last-Event-ID"] = last_event_id
    deadline = time.monotonic() + within_s
    messages: list[dict[str, str]] = []
    comments: list[str] = []
    current: dict[str, str] = {}
    with (
        httpx.Client(base_url=system.app.url, timeout=10) as client,
        client.stream("GET", f"/api/jobs/{job_id}/events", params=params, headers=headers) as res,
    ):
        assert res.status_code == 200, res.read()
        assert res.headers["content-type"].startswith("text/event-stream")
        for line in res.iter_lines():
            assert time.monotonic() < deadline, "the SSE stream did not end in time"
            if line.startswith(":"):
                comments.append(line)
                continue
            if not line:
                if current:
                    messages.append(current)
                    current = {}
                    if limit is not None and len(messages) >= limit:
                        return RawStream(messages, comments, ended=False)
                continue
            name, _, value = line.partition(":")
            assert name not in current, f"field {name!r} twice in one message"
            current[name] = value.removeprefix(" ")
    assert not current, "the stream ended inside a message"
    return RawStream(messages, comments, ended=True)


def submit_ok(system: System, key: str = PAID, **job: Any) -> dict[str, Any]:
    res = system.submit(key, **job)
    assert res.status_code == 202, res.text
    reply: dict[str, Any] = res.json()
    return reply


def log_ids(system: System, job_id: str) -> list[str]:
    return [i.decode() for i, _ in system.redis.xrange(system.keys.job_events(job_id))]


def datas(stream: RawStream) -> list[dict[str, Any]]:
    return [json.loads(m["data"]) for m in stream.messages]


def cancel(system: System, job_id: str) -> None:
    res = system.http.delete(f"/api/jobs/{job_id}", headers={"Authorization": f"Bearer {PAID}"})
    assert res.status_code == 200, res.text


def assert_error(res: httpx.Response, status: int) -> dict[str, Any]:
    assert res.status_code == status, res.text
    assert res.headers["content-type"].startswith("application/json")
    error: dict[str, Any] = res.json()["error"]
    assert isinstance(error["code"], str)
    assert error["code"]
    assert isinstance(error["message"], str)
    assert error["message"]
    return error


# -- wire format, replay, end -------------------------------------------------------------


def test_each_message_carries_type_job_seq_ts_and_the_log_entry_id(system: System) -> None:
    reply = submit_ok(system, input={"prompt": "x", "simulate": {"tokens": 5}})
    job_id = reply["jobId"]
    stream = read_sse(system, job_id, token=reply["eventsToken"])
    assert stream.ended
    assert stream.messages
    for message in stream.messages:
        assert set(message) == {"id", "event", "data"}, message
        assert ENTRY_ID.match(message["id"]), message["id"]
        data = json.loads(message["data"])
        assert data["type"] == message["event"]
        assert data["jobId"] == job_id
        assert isinstance(data["ts"], int)
        assert data["ts"] > 0
    events = datas(stream)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert [m["id"] for m in stream.messages] == log_ids(system, job_id)
    kinds = [m["event"] for m in stream.messages]
    assert kinds[0] == "queued"
    assert kinds[-1] == "completed"
    deltas = [e["text"] for e in events if e["type"] == "delta"]
    assert 1 <= len(deltas) <= 5  # coalesced per flush tick
    assert "".join(deltas) == events[-1]["result"]


def test_replay_after_the_job_finished_returns_the_whole_log_and_ends(system: System) -> None:
    reply = submit_ok(system)
    job_id = reply["jobId"]
    wait_until(lambda: system.job(job_id)["status"] == "completed")
    first = read_sse(system, job_id, token=reply["eventsToken"])
    again = read_sse(system, job_id, key=PAID)
    assert first.ended
    assert again.ended
    assert [m["id"] for m in first.messages] == log_ids(system, job_id)
    assert first.messages == again.messages
    assert first.messages[-1]["event"] == "completed"


def test_stream_of_a_running_job_ends_right_after_the_terminal_event(system: System) -> None:
    reply = submit_ok(system, input={"prompt": "x", "simulate": SLOW})
    job_id = reply["jobId"]
    stream = read_sse(system, job_id, token=reply["eventsToken"], within_s=15)
    assert stream.ended  # the server completed the HTTP response by itself
    kinds = [m["event"] for m in stream.messages]
    assert kinds[-1] == "completed"
    assert not TERMINAL & set(kinds[:-1])
    # every token once (how many deltas carry them depends on the coalescing: one per token
    # while the run keeps pace, several in one when its loop lagged)
    text = "".join(json.loads(m["data"])["text"] for m in stream.messages if m["event"] == "delta")
    assert len(text.split()) == 20
    assert [m["id"] for m in stream.messages] == log_ids(system, job_id)


def test_last_event_id_resumes_exactly(system: System) -> None:
    reply = submit_ok(system, input={"prompt": "x", "simulate": {**SLOW, "tokens": 40}})
    job_id, token = reply["jobId"], reply["eventsToken"]
    with ThreadPoolExecutor(max_workers=1) as pool:
        uninterrupted = pool.submit(read_sse, system, job_id, token=token)
        head = read_sse(system, job_id, token=token, limit=6)
        assert not head.ended
        assert system.job(job_id)["status"] == "running"  # disconnected in the middle of the job
        tail = read_sse(system, job_id, token=token, last_event_id=head.messages[-1]["id"])
        full = uninterrupted.result(timeout=30)
    assert tail.ended
    assert full.ended
    assert tail.messages
    assert tail.messages[0]["event"] == "delta"
    assert head.messages + tail.messages == full.messages
    events = datas(full)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["type"] == "completed"
    assert [m["id"] for m in full.messages] == log_ids(system, job_id)
    resumed_at_end = read_sse(system, job_id, token=token, last_event_id=full.messages[-2]["id"])
    assert resumed_at_end.messages == full.messages[-1:]


def test_a_retryable_failure_does_not_end_the_stream(make_system: Callable[..., System]) -> None:
    system = make_system(qstash_retries=2)
    simulate = {"tokens": 3, "fail": "error", "fail_attempts": 1}
    reply = submit_ok(system, input={"prompt": "x", "simulate": simulate})
    stream = read_sse(system, reply["jobId"], token=reply["eventsToken"])
    assert stream.ended
    events = datas(stream)
    kinds = [e["type"] for e in events]
    failed = kinds.index("failed")  # the simulated error strikes halfway through the tokens
    assert kinds[:2] == ["queued", "started"]
    assert events[failed]["retryable"] is True
    assert kinds[failed + 1] == "started"
    assert kinds[-1] == "completed"
    assert kinds.count("started") == 2
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))


def test_resuming_after_the_terminal_event_ends_at_once(system: System) -> None:
    """What EventSource does when the server closes the stream: it reconnects with the last id.
    The job is over and the client has every event, so the answer must end at once (an empty
    stream, or 204 which also tells EventSource to stop reconnecting) - not tail for ever."""
    reply = submit_ok(system)
    job_id = reply["jobId"]
    full = read_sse(system, job_id, token=reply["eventsToken"])
    assert full.messages[-1]["event"] == "completed"
    deadline = time.monotonic() + 5
    with (
        httpx.Client(base_url=system.app.url, timeout=5) as client,
        client.stream(
            "GET",
            f"/api/jobs/{job_id}/events",
            params={"token": reply["eventsToken"]},
            headers={"Last-Event-ID": full.messages[-1]["id"]},
        ) as res,
    ):
        assert res.status_code in (200, 204)
        lines = []
        for line in res.iter_lines():
            lines.append(line)
            assert time.monotonic() < deadline, f"still open after the terminal event: {lines}"
    assert not [line for line in lines if line and not line.startswith(":")]


def test_a_malformed_last_event_id_is_a_client_error(system: System) -> None:
    reply = submit_ok(system)
    job_id = reply["jobId"]
    wait_until(lambda: system.job(job_id)["status"] == "completed")
    res = system.http.get(
        f"/api/jobs/{job_id}/events",
        params={"token": reply["eventsToken"]},
        headers={"Last-Event-ID": "not-an-id"},
    )
    assert 400 <= res.status_code < 500, res.status_code
    assert_error(res, res.status_code)


# -- keep-alive and disconnect -------------------------------------------------------------


def test_keep_alive_pings_while_a_job_hangs(make_system: Callable[..., System]) -> None:
    system = make_system(sse_ping_s=1)
    reply = submit_ok(system, input={"prompt": "x", "simulate": HANG})
    job_id = reply["jobId"]
    wait_until(lambda: system.job(job_id)["status"] == "running")
    pings: list[str] = []
    kinds: list[str] = []
    deadline = time.monotonic() + 15
    with (
        httpx.Client(base_url=system.app.url, timeout=5) as client,
        client.stream("GET", f"/api/jobs/{job_id}/events?token={reply['eventsToken']}") as res,
    ):
        assert res.status_code == 200
        for line in res.iter_lines():
            assert time.monotonic() < deadline, "no pings / no end within the deadline"
            if line.startswith(":"):
                pings.append(line)
                if len(pings) == 2:
                    cancel(system, job_id)
            elif line.startswith("event:"):
                kinds.append(line.partition(":")[2].strip())
    assert len(pings) >= 2
    assert all(p.startswith(": ping") for p in pings), pings
    assert kinds == ["queued", "started", "cancelled"]


def test_client_disconnect_stops_following_the_log(make_system: Callable[..., System]) -> None:
    # A long idle interval: a follower left behind after the disconnect would linger far
    # longer than the deadline below.
    system = make_system(sse_ping_s=30)
    baseline = system.xread_clients()
    reply = submit_ok(system, input={"prompt": "x", "simulate": HANG})
    job_id = reply["jobId"]
    wait_until(lambda: system.job(job_id)["status"] == "running")
    try:
        with (
            httpx.Client(base_url=system.app.url, timeout=5) as client,
            client.stream("GET", f"/api/jobs/{job_id}/events?token={reply['eventsToken']}") as res,
        ):
            assert res.status_code == 200
            lines = res.iter_lines()
            seen: list[str] = []
            while "event: started" not in seen:
                seen.append(next(lines))
            # followed by the process's one tail hub: at most one connection blocked in XREAD
            assert system.metric("tierq_sse_tail_streams") == 1
            assert system.metric("tierq_sse_connections") == 1
            assert len(system.xread_clients() - baseline) <= 1
        # the client is gone: the log is no longer followed at once, not after 30 s
        wait_until(lambda: system.metric("tierq_sse_tail_streams") == 0, timeout=3)
        assert system.metric("tierq_sse_connections") == 0
    finally:
        cancel(system, job_id)
    wait_until(lambda: system.job(job_id)["status"] == "cancelled")
    assert len(system.xread_clients() - baseline) <= 1


# -- auth -----------------------------------------------------------------------------------


def test_events_need_a_token_or_the_owners_key(system: System) -> None:
    mine = submit_ok(system)
    other = submit_ok(system)
    job_id = mine["jobId"]
    url = f"/api/jobs/{job_id}/events"
    wait_until(lambda: system.job(job_id)["status"] == "completed")

    assert_error(system.http.get(url), 401)
    assert_error(system.http.get(url, params={"token": other["eventsToken"]}), 401)
    assert_error(system.http.get(url, params={"token": "not-a-token"}), 401)
    assert_error(system.http.get(url, headers={"Authorization": "Bearer tq_nobody"}), 401)
    assert_error(system.http.get(url, headers={"Authorization": f"Bearer {FREE}"}), 404)
    # the token of another job does not open this one even alongside the owner's key
    res = system.http.get(
        url, params={"token": other["eventsToken"]}, headers={"Authorization": f"Bearer {PAID}"}
    )
    assert_error(res, 401)

    by_key = read_sse(system, job_id, key=PAID)
    by_token = read_sse(system, job_id, token=mine["eventsToken"])
    assert by_key.ended
    assert by_key.messages == by_token.messages
    assert by_key.messages[-1]["event"] == "completed"


def test_job_status_is_only_visible_to_its_owner(system: System) -> None:
    reply = submit_ok(system)
    job_id = reply["jobId"]
    assert system.job(job_id)["jobId"] == job_id
    res = system.http.get(f"/api/jobs/{job_id}", headers={"Authorization": f"Bearer {FREE}"})
    assert assert_error(res, 404)["code"] == "job_not_found"
    assert_error(system.http.get(f"/api/jobs/{job_id}"), 401)
    missing = system.http.get(
        "/api/jobs/job_does_not_exist/events", headers={"Authorization": f"Bearer {PAID}"}
    )
    assert_error(missing, 404)


def test_event_streams_are_capped_per_job_and_per_user(make_system: Callable[..., System]) -> None:
    system = make_system(sse_max_per_job=2, sse_max_per_user=3)
    hang = {"prompt": "x", "simulate": {"fail": "hang"}}
    jobs = [system.submit(PAID, input=hang).json() for _ in range(2)]
    auth = {"Authorization": f"Bearer {PAID}"}

    def url(job: dict[str, Any]) -> str:
        return f"/api/jobs/{job['jobId']}/events?token={job['eventsToken']}"

    readers: list[Iterator[str]] = []  # kept: a dropped line iterator closes its response
    with contextlib.ExitStack() as streams:

        def open_stream(job: dict[str, Any]) -> httpx.Response:
            res = streams.enter_context(system.http.stream("GET", url(job)))
            if res.status_code == 200:
                readers.append(res.iter_lines())
                next(readers[-1])  # the stream is being served
            return res

        first = [open_stream(jobs[0]) for _ in range(2)]
        assert [r.status_code for r in first] == [200, 200]
        over_job = system.http.get(url(jobs[0]))
        assert over_job.status_code == 429
        assert over_job.json()["error"]["code"] == "too_many_streams"
        assert open_stream(jobs[1]).status_code == 200  # the owner's third
        over_user = system.http.get(f"/api/jobs/{jobs[1]['jobId']}/events", headers=auth)
        assert over_user.status_code == 429
        first[0].close()
        wait_until(lambda: system.metric("tierq_sse_connections") == 2)
        assert open_stream(jobs[0]).status_code == 200  # a closed stream gave its place back
    for job in jobs:
        system.http.delete(f"/api/jobs/{job['jobId']}", headers=auth)


def test_event_streams_hold_no_redis_connection(make_system: Callable[..., System]) -> None:
    system = make_system(redis_max_connections=8)
    job = system.submit(PAID, input={"prompt": "x", "simulate": {"fail": "hang"}}).json()
    url = f"/api/jobs/{job['jobId']}/events?token={job['eventsToken']}"

    def app_connections() -> int:
        name = system.settings.redis_client_name
        return sum(c.get("name") == name for c in system.redis.client_list())

    readers: list[Iterator[str]] = []
    with contextlib.ExitStack() as streams:
        for _ in range(12):  # the per-job cap (16) allows them
            res = streams.enter_context(system.http.stream("GET", url))
            assert res.status_code == 200
            readers.append(res.iter_lines())
            next(readers[-1])
        # 12 streams open at once, served by one tail hub: the pool's 8, plus the hub's and
        # the cancel subscription's connections, at most
        assert app_connections() <= 8 + 3
    wait_until(lambda: system.metric("tierq_sse_connections") == 0)
    assert app_connections() <= 8 + 3
    system.http.delete(f"/api/jobs/{job['jobId']}", headers={"Authorization": f"Bearer {PAID}"})
