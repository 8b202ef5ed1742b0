"""Streamed jobs end to end over real HTTP: coalesced deltas, resume across them, cancel inside a
flush window, many SSE connections on the process's one tail reader."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from helpers import wait_until
from system import PAID, SseEvent, System

SLOW = {"tokens": 60, "token_latency_ms": 5}


def submit(system: System, simulate: dict[str, Any]) -> dict[str, Any]:
    res = system.submit(PAID, input={"prompt": "stream", "simulate": simulate})
    assert res.status_code == 202, res.text
    reply: dict[str, Any] = res.json()
    return reply


def deltas(events: list[SseEvent]) -> list[str]:
    return [e.data["text"] for e in events if e.event == "delta"]


def assert_whole(events: list[SseEvent], system: System, job_id: str) -> None:
    """Each log entry once, in order, seq dense, the deltas joined equal the result."""
    assert [e.data for e in events] == system.log_events(job_id)
    assert [e.data["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1].event == "completed"
    assert "".join(deltas(events)) == events[-1].data["result"]


def test_streamed_text_is_coalesced_and_identical(make_system: Callable[..., System]) -> None:
    system = make_system(delta_flush_ms=40)
    reply = submit(system, SLOW)
    events = system.events(reply["jobId"], reply["eventsToken"])
    assert_whole(events, system, reply["jobId"])
    text = deltas(events)
    assert len(text[0].split()) == 1  # the first token is sent alone, without waiting a tick
    assert 2 <= len(text) < 30  # 60 tokens over ~300 ms in 40 ms ticks, not 60 events


def test_resume_across_coalesced_events_is_exact(make_system: Callable[..., System]) -> None:
    system = make_system(delta_flush_ms=30)
    reply = submit(system, SLOW)
    job_id, token = reply["jobId"], reply["eventsToken"]
    seen: list[SseEvent] = []
    while not seen or seen[-1].event != "completed":  # reconnect after every 3 events
        last = seen[-1].id if seen else None
        seen += system.events(job_id, token, last_event_id=last, limit=3)
    assert_whole(seen, system, job_id)
    assert len(deltas(seen)) >= 2


def test_cancel_inside_a_flush_window_stops_at_once(make_system: Callable[..., System]) -> None:
    # A 1 s tick: the cancel must not wait for it, and the text buffered so far is kept
    system = make_system(delta_flush_ms=1000)
    reply = submit(system, {"tokens": 1000, "token_latency_ms": 5})
    job_id = reply["jobId"]
    wait_until(lambda: any(e["type"] == "delta" for e in system.log_events(job_id)))
    asked_ms = time.time() * 1000
    res = system.http.delete(f"/api/jobs/{job_id}", headers={"Authorization": f"Bearer {PAID}"})
    assert res.status_code == 200
    events = system.events(job_id, reply["eventsToken"])
    assert events[-1].event == "cancelled"
    assert events[-1].data["ts"] - asked_ms < 100  # same machine, same clock
    assert [e.data["seq"] for e in events] == list(range(1, len(events) + 1))
    text = deltas(events)
    assert len(text) <= 2  # the first token at once, what was buffered flushed by the cancel
    assert len(text[0].split()) == 1
    assert system.job(job_id)["status"] == "cancelled"


def test_many_connections_share_one_tail_reader(make_system: Callable[..., System]) -> None:
    system = make_system(delta_flush_ms=25)
    baseline = system.xread_clients()
    replies = [submit(system, {"tokens": 30, "token_latency_ms": 10}) for _ in range(10)]
    readers: list[int] = []

    def follow(reply: dict[str, Any]) -> list[SseEvent]:
        events = []
        for event in system.iter_events(reply["jobId"], reply["eventsToken"]):
            events.append(event)
            readers.append(len(system.xread_clients() - baseline))
        return events

    with ThreadPoolExecutor(max_workers=30) as pool:
        results = list(pool.map(follow, [r for r in replies for _ in range(3)]))
    for index, events in enumerate(results):
        assert_whole(events, system, replies[index // 3]["jobId"])
    assert max(readers) <= 1  # 30 connections, at most one blocked XREAD at any time
    wait_until(lambda: system.metric("tierq_sse_tail_streams") == 0)
