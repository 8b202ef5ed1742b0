"""Jobs on a real OpenAI-compatible model: the whole system (broker, app, Redis) in front of
FakeOpenAI, driven over HTTP: streamed, batch and vision jobs, upstream 429 retried by QStash,
upstream 400 dead-lettered, and a cancel that closes the upstream stream."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from helpers import wait_until
from openai_upstream import (
    UPSTREAM_KEY,
    FakeOpenAI,
    UpstreamRequest,
    fake_prompt_tokens,
    fake_tokens,
)
from system import PAID, SseEvent, System

DISCONNECT_WITHIN_S = 1.0
IMAGES = ["https://example.com/cat.png", "data:image/png;base64,iVBORw0KGgo="]


def submit(system: System, prompt: str, **job: Any) -> dict[str, Any]:
    job_input = {"prompt": prompt, **job.pop("input", {})}
    res = system.submit(PAID, model="gpt", input=job_input, **job)
    assert res.status_code == 202, res.text
    reply: dict[str, Any] = res.json()
    return reply


def events(system: System, reply: dict[str, Any]) -> list[SseEvent]:
    return system.events(reply["jobId"], reply["eventsToken"])


def kinds(seen: list[SseEvent]) -> list[str]:
    """Event types, a run of deltas as one ``delta`` (chunks arriving together coalesce)."""
    out: list[str] = []
    for e in seen:
        if not (e.event == "delta" and out and out[-1] == "delta"):
            out.append(e.event)
    return out


def usage_of(prompt: str, tokens: int) -> dict[str, int]:
    prompt_tokens = fake_prompt_tokens([{"role": "user", "content": prompt}])
    return {"prompt_tokens": prompt_tokens, "completion_tokens": tokens}


def test_stream_job_deltas_are_the_upstream_chunks(
    fake: FakeOpenAI, openai_system: Callable[..., System]
) -> None:
    system = openai_system()
    prompt = "hello upstream [[tokens:4]]"
    seen = events(system, submit(system, prompt))
    assert kinds(seen) == ["queued", "started", "delta", "completed"]
    assert "".join(e.data["text"] for e in seen if e.event == "delta") == "".join(fake_tokens(4))
    completed = seen[-1].data
    assert completed["result"] == "".join(fake_tokens(4))
    assert completed["usage"] == usage_of(prompt, 4)
    [sent] = fake.chat_requests(prompt)
    assert sent.model == "fake-model"
    assert sent.stream
    assert sent.authorization == f"Bearer {UPSTREAM_KEY}"
    assert fake.open_streams == 0


def test_batch_and_vision_jobs_complete_with_one_result(
    fake: FakeOpenAI, openai_system: Callable[..., System]
) -> None:
    system = openai_system()
    batch = events(system, submit(system, "batch me [[tokens:2]]", experience="batch"))
    assert kinds(batch) == ["queued", "started", "completed"]
    assert batch[-1].data["result"] == "w0 w1"
    assert batch[-1].data["usage"] == usage_of("batch me [[tokens:2]]", 2)
    reply = submit(system, "what is this?", experience="vision", service="describe",
                   input={"images": IMAGES})  # fmt: skip
    vision = events(system, reply)
    assert kinds(vision) == ["queued", "started", "completed"]
    assert vision[-1].data["result"].startswith("[2 images] w0")
    [sent] = fake.chat_requests("what is this?")
    assert not sent.stream
    assert sent.image_urls == IMAGES


def test_upstream_429_once_is_retried_by_qstash_and_completes(
    fake: FakeOpenAI, openai_system: Callable[..., System]
) -> None:
    system = openai_system(qstash_retries=2)
    prompt = "busy upstream [[status:429:once]] [[tokens:3]]"
    seen = events(system, submit(system, prompt))
    assert kinds(seen) == [
        "queued", "started", "failed", "started", "delta", "completed",
    ]  # fmt: skip
    failed = seen[2].data
    assert (failed["code"], failed["retryable"]) == ("upstream_429", True)
    assert "answered 429" in failed["message"]
    assert seen[3].data["attempt"] == 1
    assert seen[-1].data["result"] == "w0 w1 w2"
    assert [r.status for r in fake.chat_requests(prompt)] == [429, 200]


def test_upstream_400_fails_the_job_for_good_into_the_dlq(
    fake: FakeOpenAI, openai_system: Callable[..., System]
) -> None:
    system = openai_system(qstash_retries=2)
    reply = submit(system, "bad request [[status:400]]")
    seen = events(system, reply)
    assert kinds(seen) == ["queued", "started", "failed"]
    failed = seen[-1].data
    assert (failed["code"], failed["retryable"]) == ("upstream_4xx", False)
    assert "answered 400" in failed["message"]
    assert UPSTREAM_KEY not in failed["message"]
    assert system.job(reply["jobId"])["status"] == "failed"
    entry = wait_until(lambda: dlq_entry(system, reply["jobId"]))
    assert "upstream_4xx" in entry["responseBody"]
    assert len(fake.chat_requests("bad request")) == 1  # not retried


def dlq_entry(system: System, job_id: str) -> dict[str, Any] | None:
    headers = {"Authorization": f"Bearer {system.settings.admin_token}"}
    res = system.http.get("/api/admin/dlq", headers=headers)
    assert res.status_code == 200, res.text
    found = [m for m in res.json()["messages"] if m["jobId"] == job_id]
    return found[0] if found else None


def test_cancel_of_a_hanging_stream_job_closes_the_upstream_stream(
    fake: FakeOpenAI, openai_system: Callable[..., System]
) -> None:
    system = openai_system()
    prompt = "never ends [[tokens:1]] [[hang]]"
    reply = submit(system, prompt)
    seen: list[str] = []
    deadline = time.monotonic() + 20
    for event in system.iter_events(reply["jobId"], reply["eventsToken"]):
        assert time.monotonic() < deadline, "the job did not end within the deadline"
        seen.append(event.event)
        if event.event == "delta":  # the upstream is streaming and now hangs
            sent = upstream_request(fake, prompt)
            assert not sent.disconnected.is_set()
            assert fake.open_streams == 1
            cancel(system, reply["jobId"])
            assert sent.disconnected.wait(DISCONNECT_WITHIN_S), "upstream stream left open"
    assert seen == ["queued", "started", "delta", "cancelled"]
    assert system.job(reply["jobId"])["status"] == "cancelled"
    wait_until(lambda: fake.open_streams == 0, timeout=DISCONNECT_WITHIN_S)


def upstream_request(fake: FakeOpenAI, prompt: str) -> UpstreamRequest:
    return fake.wait_for_request(lambda r: r.prompt == prompt, timeout=5)


def cancel(system: System, job_id: str) -> None:
    res = system.http.delete(f"/api/jobs/{job_id}", headers={"Authorization": f"Bearer {PAID}"})
    assert res.status_code == 200, res.text
