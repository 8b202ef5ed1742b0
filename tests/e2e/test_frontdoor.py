"""The OpenAI-compatible front door end to end, driven by the official ``openai`` client.

The whole system (broker + app on real HTTP, one real Redis); first on the simulated model
(``sim``), then on FakeOpenAI, a real OpenAI-compatible upstream: streamed and non-streamed
chat, models, errors in OpenAI's shape, tier routing by key, queue-full and guard 429s, vision,
cancel on disconnect (queued, mid-stream, non-streamed), upstream 429 retried, 400/5xx mapped.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionChunk
from qstash import QStash

from helpers import wait_until
from openai_upstream import (
    UPSTREAM_KEY,
    FakeOpenAI,
    UpstreamRequest,
    fake_prompt_tokens,
    fake_tokens,
)
from system import DEV, FREE, PAID, System
from tierq.config import ModelSettings, QueueSettings, ServiceSettings
from tierq.providers.simulated import simulated_word
from tierq.queues import QueueId

DISCONNECT_WITHIN_S = 2.0
IMAGES = ["https://example.com/cat.png", "data:image/png;base64,iVBORw0KGgo="]
SIM_TOKENS = 12  # ModelSettings.tokens, the simulated model's default


def client_for(system: System, key: str = PAID, **options: Any) -> openai.OpenAI:
    options.setdefault("max_retries", 0)
    options.setdefault("timeout", 30)
    return openai.OpenAI(base_url=f"{system.app.url}/v1", api_key=key, **options)


@pytest.fixture
def paid(system: System) -> Iterator[openai.OpenAI]:
    with client_for(system) as client:
        yield client


def sim_text(prompt: str, tokens: int = SIM_TOKENS) -> str:
    return " ".join(simulated_word(prompt, i) for i in range(tokens))


def user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


def job_of(completion_id: str) -> str:
    assert completion_id.startswith("chatcmpl-job_"), completion_id
    return completion_id.removeprefix("chatcmpl-")


def queue_of(system: System, job_id: str) -> str:
    raw = system.redis.hget(system.keys.job(job_id), "queueId")
    assert isinstance(raw, bytes), f"no job record for {job_id}"
    return raw.decode()


def read_stream(stream: openai.Stream[ChatCompletionChunk]) -> list[ChatCompletionChunk]:
    with stream:
        return list(stream)


def content_of(chunks: list[ChatCompletionChunk]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def error_of(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    error: dict[str, Any] = body["error"]
    return error


# -- on the simulated model -------------------------------------------------------------------


def test_non_streamed_chat_is_one_completion_from_a_batch_job(
    system: System, paid: openai.OpenAI
) -> None:
    reply = paid.chat.completions.create(model="sim", messages=user("hello there"))
    assert reply.object == "chat.completion"
    assert reply.model == "sim"
    [choice] = reply.choices
    assert (choice.index, choice.finish_reason, choice.message.role) == (0, "stop", "assistant")
    assert choice.message.content == sim_text("hello there")
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (2, SIM_TOKENS)
    assert reply.usage.total_tokens == 2 + SIM_TOKENS
    job = system.job(job_of(reply.id))
    assert (job["status"], job["queueId"], job["experience"]) == (
        "completed", "q_paid_batch", "batch",
    )  # fmt: skip
    assert job["result"] == choice.message.content


def test_streamed_chat_is_openai_chunks_then_usage_then_done(
    system: System, paid: openai.OpenAI
) -> None:
    stream = paid.chat.completions.create(
        model="sim", messages=user("stream me"), stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = read_stream(stream)
    assert len({c.id for c in chunks}) == 1
    assert {(c.object, c.model) for c in chunks} == {("chat.completion.chunk", "sim")}
    first, *body, stop, usage = chunks
    assert first.choices[0].delta.role == "assistant"
    assert first.choices[0].delta.content == ""
    words = sim_text("stream me").split(" ")
    contents = [c.choices[0].delta.content for c in body]
    assert contents[0] == words[0]  # the first token alone: it is not held for a flush tick
    assert "".join(contents) == sim_text("stream me")
    job_id = job_of(first.id)
    deltas = [e["text"] for e in system.log_events(job_id) if e["type"] == "delta"]
    assert contents == deltas  # one chunk per tierq delta (coalesced tokens)
    assert stop.choices[0].finish_reason == "stop"
    assert not stop.choices[0].delta.content
    assert usage.choices == []
    assert usage.usage is not None
    assert (usage.usage.prompt_tokens, usage.usage.completion_tokens) == (2, SIM_TOKENS)
    assert all(c.usage is None for c in chunks[:-1])
    job = system.job(job_of(first.id))
    assert (job["status"], job["queueId"]) == ("completed", "q_paid_stream")


def test_raw_stream_ends_with_done_and_carries_job_headers(system: System) -> None:
    body = {"model": "sim", "messages": user("raw"), "stream": True}
    headers = {"Authorization": f"Bearer {PAID}"}
    with system.http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as res:
        assert res.status_code == 200
        assert res.headers["content-type"].startswith("text/event-stream")
        job_id = res.headers["x-tierq-job-id"]
        assert res.headers["x-tierq-queue-id"] == "q_paid_stream"
        data = [line for line in res.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in data[:-1]]
    assert {c["id"] for c in chunks} == {f"chatcmpl-{job_id}"}
    assert all("usage" not in c for c in chunks)  # include_usage not asked
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_models_lists_the_registry_models_the_key_may_use(
    make_system: Callable[..., System],
) -> None:
    models = {"sim": ModelSettings(), "sim-b": ModelSettings(), "unused": ModelSettings()}
    services = {
        "chat": ServiceSettings(experiences=["stream", "batch"], models=["sim", "sim-b"]),
        "describe": ServiceSettings(experiences=["vision"], models=["sim"]),
    }
    system = make_system(models=models, services=services)
    with client_for(system, FREE) as client:
        listed = client.models.list()
        assert [(m.id, m.object, m.owned_by) for m in listed.data] == [
            ("sim", "model", "tierq"), ("sim-b", "model", "tierq"),
        ]  # fmt: skip
        assert client.models.retrieve("sim-b").id == "sim-b"
        with pytest.raises(openai.NotFoundError) as missing:
            client.models.retrieve("unused")  # in the registry, but no service offers it
        assert missing.value.code == "model_not_found"
    res = system.http.get("/v1/models", headers={"Authorization": "Bearer nope"})
    assert res.status_code == 401


def test_bad_key_and_missing_key_are_openai_401s(system: System) -> None:
    with client_for(system, "tq_not_a_key") as client:
        with pytest.raises(openai.AuthenticationError) as bad:
            client.chat.completions.create(model="sim", messages=user("hi"))
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
    error = error_of(bad.value)
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_api_key")
    assert "tq_not_a_key" not in error["message"]
    res = system.http.post("/v1/chat/completions", json={"model": "sim", "messages": user("x")})
    assert res.status_code == 401
    assert res.json()["error"]["code"] == "invalid_api_key"


def test_unknown_model_is_not_found_and_nothing_is_admitted(
    system: System, paid: openai.OpenAI
) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        paid.chat.completions.create(model="gpt-9", messages=user("hi"), stream=True)
    error = error_of(missing.value)
    assert (error["code"], error["param"], error["type"]) == (
        "model_not_found", "model", "invalid_request_error",
    )  # fmt: skip
    assert "gpt-9" in error["message"]
    assert all(system.slot_count(system.keys.admission(q.value)) == 0 for q in QueueId)


def test_bad_requests_are_openai_400s(make_system: Callable[..., System]) -> None:
    text_only = {"chat": ServiceSettings(experiences=["stream", "batch"], models=["sim"])}
    system = make_system(services=text_only)
    headers = {"Authorization": f"Bearer {PAID}", "Content-Type": "application/json"}
    res = system.http.post("/v1/chat/completions", content=b"{not json", headers=headers)
    assert res.status_code == 400
    assert res.json()["error"]["type"] == "invalid_request_error"
    image = {"type": "image_url", "image_url": {"url": IMAGES[0]}}
    cases: list[tuple[dict[str, Any], str | None]] = [
        ({"messages": []}, "messages"),
        ({"messages": user("hi"), "n": 2}, "n"),
        ({"messages": user("hi"), "tools": [{"type": "function", "function": {"name": "f"}}]},
         "tools"),
        ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]},
         "messages[0].role"),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
         "messages[0].content[0].type"),
        ({"messages": [{"role": "user", "content": [image]}]}, "messages"),  # no text at all
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "what?"}, image]}]},
         "messages"),  # vision, but no service offers it with sim here
    ]  # fmt: skip
    with client_for(system) as client:
        for extra, param in cases:
            with pytest.raises(openai.BadRequestError) as bad:
                client.chat.completions.create(model="sim", **extra)
            error = error_of(bad.value)
            assert (error["type"], error["param"]) == ("invalid_request_error", param), extra
    assert all(system.slot_count(system.keys.admission(q.value)) == 0 for q in QueueId)
    res = system.http.get("/v1/embeddings", headers=headers)
    assert res.status_code == 404
    assert res.json()["error"]["message"] == "Invalid URL (GET /v1/embeddings)"


def test_hostile_bodies_are_openai_4xx_never_500(system: System) -> None:
    """Deep nesting made the JSON parser raise RecursionError (a 500); a lone surrogate in the
    text made the job's validation raise outside the request's checks (a 500); a body larger
    than a QStash message was admitted, then failed to publish (a 503)."""
    headers = {"Authorization": f"Bearer {PAID}", "Content-Type": "application/json"}
    deep = '{"model": "sim", "messages": [{"role": "user", "content": %s}]}'
    for depth in (990, 100_000):
        body = deep % ("[" * depth + "]" * depth)
        res = system.http.post("/v1/chat/completions", content=body, headers=headers)
        assert res.status_code == 400, res.text[:200]
        assert res.json()["error"]["code"] == "json_too_deep"
    surrogate = b'{"model": "sim", "messages": [{"role": "user", "content": "\\udfff"}]}'
    res = system.http.post("/v1/chat/completions", content=surrogate, headers=headers)
    assert res.status_code == 400, res.text[:200]
    assert res.json()["error"]["param"] == "messages"
    metadata: dict[str, Any] = {}
    for _ in range(100):
        metadata = {"a": metadata}
    with client_for(system) as client:
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(
                model="sim", messages=user("hi"), extra_body={"metadata": metadata}
            )
        assert error_of(bad.value)["code"] == "json_too_deep"
        with pytest.raises(openai.APIStatusError) as large:
            client.chat.completions.create(model="sim", messages=user("x" * 2_000_000))
        assert large.value.status_code == 413
        assert error_of(large.value)["code"] == "body_too_large"
    assert all(system.slot_count(system.keys.admission(q.value)) == 0 for q in QueueId)


def test_tier_routing_follows_the_key(system: System) -> None:
    for key, queue in ((PAID, "q_paid_stream"), (FREE, "q_free_stream")):
        with client_for(system, key) as client:
            stream = client.chat.completions.create(model="sim", messages=user(key), stream=True)
            chunks = read_stream(stream)
        job_id = job_of(chunks[0].id)
        assert queue_of(system, job_id) == queue
        assert system.job(job_id, key)["tier"] == queue.split("_")[1]
        assert content_of(chunks) == sim_text(key)
    with client_for(system, FREE) as client:
        reply = client.chat.completions.create(model="sim", messages=user("free batch"))
    assert queue_of(system, job_of(reply.id)) == "q_free_batch"


def test_queue_full_is_an_openai_rate_limit_with_retry_after(
    make_system: Callable[..., System],
) -> None:
    queues = {q: QueueSettings(parallelism=1, admission_depth=1) for q in QueueId}
    system = make_system(queues=queues, admission_retry_after_s=3, local_start=False)
    qstash = QStash(DEV.token, base_url=system.broker.url)
    try:
        qstash.queue.pause("q_paid_stream")
    finally:
        qstash.http._client.close()  # type: ignore[attr-defined]
    held = system.submit(PAID)  # admitted, then held by the paused queue: the queue is full
    assert held.status_code == 202, held.text
    with client_for(system) as client, pytest.raises(openai.RateLimitError) as busy:
        client.chat.completions.create(model="sim", messages=user("one more"), stream=True)
    error = error_of(busy.value)
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
    assert "q_paid_stream" in error["message"]
    assert busy.value.response.headers["retry-after"] == "3"
    assert system.slot_count(system.keys.admission("q_paid_stream")) == 1  # nothing more


def test_a_full_model_makes_the_stream_wait_not_fail(make_system: Callable[..., System]) -> None:
    sim = ModelSettings(limits={"paid": 1, "free": 1})
    system = make_system(models={"sim": sim}, qstash_retries=0)
    hog = system.submit(PAID, input={"prompt": "hog", "simulate": {"fail": "hang"}})
    assert hog.status_code == 202, hog.text
    hog_id = hog.json()["jobId"]
    wait_until(lambda: system.job(hog_id)["status"] == "running")
    parked = system.keys.parked("q_paid_stream", "dev-paid")
    with client_for(system) as client, ThreadPoolExecutor(1) as pool:

        def chat() -> str:
            stream = client.chat.completions.create(
                model="sim", messages=user("me too"), stream=True
            )
            return "".join(chunk.choices[0].delta.content or "" for chunk in stream)

        answer = pool.submit(chat)
        [job_id] = wait_until(lambda: system.redis.lrange(parked, 0, -1))  # parked: model full

        def waiting() -> list[str]:  # written just after parking
            return [
                e["guard"] for e in system.log_events(job_id.decode()) if e["type"] == "waiting"
            ]

        assert wait_until(waiting) == ["model"]
        cancel = system.http.delete(
            f"/api/jobs/{hog_id}", headers={"Authorization": f"Bearer {PAID}"}
        )
        assert cancel.status_code == 200
        assert answer.result(timeout=20)  # the model freed: the stream's job ran


def raw_request(system: System, body: dict[str, Any], key: str = PAID) -> socket.socket:
    """Send a chat request over a bare socket (so the test can hang up whenever it likes)."""
    data = json.dumps(body).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{system.app.port}\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    sock = socket.create_connection(("127.0.0.1", system.app.port), timeout=10)
    sock.sendall(head.encode() + data)
    return sock


def only_admitted(system: System, queue: str) -> str:
    """The one job admitted to ``queue`` (waiting for it to be admitted)."""
    members = wait_until(lambda: system.redis.zrange(system.keys.admission(queue), 0, -1))
    assert len(members) == 1
    return str(members[0].decode())


def test_client_leaving_while_its_job_is_queued_cancels_the_job(held_system: System) -> None:
    system = held_system
    qstash = QStash(DEV.token, base_url=system.broker.url)
    try:
        qstash.queue.pause("q_paid_stream")
    finally:
        qstash.http._client.close()  # type: ignore[attr-defined]
    sock = raw_request(system, {"model": "sim", "messages": user("wait"), "stream": True})
    job_id = only_admitted(system, "q_paid_stream")
    assert system.job(job_id)["status"] == "queued"
    sock.close()
    wait_until(lambda: system.job(job_id)["status"] == "cancelled", timeout=DISCONNECT_WITHIN_S)
    wait_until(lambda: system.slot_count(system.keys.admission("q_paid_stream")) == 0,
               timeout=DISCONNECT_WITHIN_S)  # fmt: skip


# -- on a real OpenAI-compatible upstream -------------------------------------------------------


def upstream_request(fake: FakeOpenAI, prompt_contains: str) -> UpstreamRequest:
    return fake.wait_for_request(lambda r: prompt_contains in r.prompt, timeout=10)


def test_streamed_chat_relays_the_upstream_chunks(
    fake: FakeOpenAI, openai_system: Callable[..., System]
) -> None:
    system = openai_system()
    prompt = "relay me [[tokens:4]]"
    with client_for(system) as client:
        stream = client.chat.completions.create(
            model="gpt", messages=user(prompt), stream=True,
            stream_options={"include_usage": True}, temperature=0.2, max_tokens=50,
        )  # fmt: skip
        chunks = read_stream(stream)
    first, *body, stop, usage = chunks
    assert first.choices[0].delta.role == "assistant"
    contents = [c.choices[0].delta.content for c in body]
    assert "".join(contents) == "".join(fake_tokens(4))  # chunks arriving together coalesce
    deltas = system.log_events(job_of(first.id))
    assert contents == [e["text"] for e in deltas if e["type"] == "delta"]
    assert stop.choices[0].finish_reason == "stop"
    assert usage.usage is not None
    assert usage.usage.prompt_tokens == fake_prompt_tokens(user(prompt))
    assert usage.usage.completion_tokens == 4
    assert {c.model for c in chunks} == {"gpt"}  # the model the client asked for
    [sent] = fake.chat_requests("relay me")
    assert (sent.model, sent.stream, sent.prompt) == ("fake-model", True, prompt)
    assert sent.authorization == f"Bearer {UPSTREAM_KEY}"
    assert queue_of(system, job_of(first.id)) == "q_paid_stream"
    assert fake.open_streams == 0


def test_a_conversation_is_flattened_into_one_labelled_prompt(
    fake: FakeOpenAI, openai_system: Callable[..., System]
) -> None:
    system = openai_system()
    messages: list[Any] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": [{"type": "text", "text": "Another [[tokens:2]]"}]},
    ]
    with client_for(system) as client:
        reply = client.chat.completions.create(model="gpt", messages=messages)
    assert reply.choices[0].message.content == "w0 w1"
    [sent] = fake.chat_requests("Another")
    assert sent.prompt == (
        "System: Be brief.\n\nUser: Name a colour.\n\nAssistant: Red.\n\nUser: Another [[tokens:2]]"
    )
    assert not sent.stream
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 2
    assert queue_of(system, job_of(reply.id)) == "q_paid_batch"


def test_image_parts_make_a_vision_job_that_reaches_upstream_as_images(
    fake: FakeOpenAI, openai_system: Callable[..., System]
) -> None:
    system = openai_system()
    content: list[Any] = [
        {"type": "text", "text": "what is this? [[tokens:2]]"},
        *({"type": "image_url", "image_url": {"url": url}} for url in IMAGES),
    ]
    with client_for(system, FREE) as client:
        reply = client.chat.completions.create(
            model="gpt", messages=[{"role": "user", "content": content}]
        )
        stream = client.chat.completions.create(
            model="gpt", messages=[{"role": "user", "content": content}], stream=True
        )
        chunks = read_stream(stream)
    assert reply.choices[0].message.content == "[2 images] w0 w1"
    assert content_of(chunks) == "[2 images] w0 w1"  # streamed to the client in one piece
    assert queue_of(system, job_of(reply.id)) == "q_free_vision"
    assert queue_of(system, job_of(chunks[0].id)) == "q_free_vision"
    sent = fake.chat_requests("what is this?")
    assert len(sent) == 2
    assert all(r.image_urls == IMAGES and r.prompt == "what is this? [[tokens:2]]" for r in sent)
    assert not any(r.stream for r in sent)  # vision jobs are one completion upstream


def test_closing_the_stream_mid_answer_cancels_the_job_and_the_upstream_stream(
    fake: FakeOpenAI, openai_system: Callable[..., System]
) -> None:
    system = openai_system()
    prompt = "never ends [[tokens:2]] [[hang]]"
    with client_for(system) as client:
        stream = client.chat.completions.create(model="gpt", messages=user(prompt), stream=True)
        with stream:
            seen = [next(stream), next(stream)]  # the role chunk, then the first content chunk
            assert seen[1].choices[0].delta.content in ("w0", "w0 w1")  # maybe coalesced
            sent = upstream_request(fake, "never ends")
            assert not sent.disconnected.is_set()
        closed_at = time.monotonic()
    assert sent.disconnected.wait(DISCONNECT_WITHIN_S), "the upstream stream was left open"
    job_id = job_of(seen[0].id)
    wait_until(lambda: system.job(job_id)["status"] == "cancelled", timeout=DISCONNECT_WITHIN_S)
    assert time.monotonic() - closed_at < DISCONNECT_WITHIN_S + 1
    wait_until(lambda: fake.open_streams == 0, timeout=DISCONNECT_WITHIN_S)
    wait_until(lambda: system.slot_count(system.keys.admission("q_paid_stream")) == 0,
               timeout=DISCONNECT_WITHIN_S)  # fmt: skip


def test_leaving_a_non_streamed_request_cancels_the_upstream_call(
    fake: FakeOpenAI, openai_system: Callable[..., System]
) -> None:
    system = openai_system()
    sock = raw_request(system, {"model": "gpt", "messages": user("slow answer [[hang]]")})
    sent = upstream_request(fake, "slow answer")
    job_id = only_admitted(system, "q_paid_batch")
    assert system.job(job_id)["status"] == "running"
    sock.close()
    assert sent.disconnected.wait(DISCONNECT_WITHIN_S), "the upstream call was left open"
    wait_until(lambda: system.job(job_id)["status"] == "cancelled", timeout=DISCONNECT_WITHIN_S)


def test_upstream_429_once_is_retried_and_the_client_sees_only_the_answer(
    fake: FakeOpenAI, openai_system: Callable[..., System]
) -> None:
    system = openai_system(qstash_retries=2)
    prompt = "busy upstream [[status:429:once]] [[tokens:3]]"
    with client_for(system) as client:
        chunks = read_stream(
            client.chat.completions.create(model="gpt", messages=user(prompt), stream=True)
        )
        reply = client.chat.completions.create(
            model="gpt", messages=user("busy batch [[status:429:once]] [[tokens:2]]")
        )
    assert content_of(chunks) == "w0 w1 w2"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert [r.status for r in fake.chat_requests("busy upstream")] == [429, 200]
    assert reply.choices[0].message.content == "w0 w1"
    assert [r.status for r in fake.chat_requests("busy batch")] == [429, 200]
    assert system.job(job_of(chunks[0].id))["attempts"] == 2


def test_upstream_400_is_a_bad_request_error(
    fake: FakeOpenAI, openai_system: Callable[..., System]
) -> None:
    system = openai_system(qstash_retries=2)
    with client_for(system, max_retries=2) as client:
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as bad:
                client.chat.completions.create(
                    model="gpt", messages=user(f"bad {stream} [[status:400]]"), stream=stream
                )
            error = error_of(bad.value)
            assert (error["type"], error["code"]) == ("invalid_request_error", "upstream_4xx")
            assert "answered 400" in error["message"]
            assert UPSTREAM_KEY not in error["message"]
            job_id = bad.value.response.headers["x-tierq-job-id"]
            assert system.job(job_id)["status"] == "failed"
            assert len(fake.chat_requests(f"bad {stream}")) == 1  # permanent: not retried


def test_upstream_5xx_after_tierqs_retries_is_a_502_the_sdk_does_not_retry(
    fake: FakeOpenAI, openai_system: Callable[..., System]
) -> None:
    system = openai_system(qstash_retries=1)
    messages = user("down [[status:500]]")
    with (
        client_for(system, max_retries=2) as client,
        pytest.raises(openai.InternalServerError) as failed,
    ):
        client.chat.completions.create(model="gpt", messages=messages, stream=True)
    assert failed.value.status_code == 502
    assert failed.value.response.headers["x-should-retry"] == "false"
    error = error_of(failed.value)
    assert (error["type"], error["code"]) == ("server_error", "upstream_5xx")
    assert [r.status for r in fake.chat_requests("down")] == [500, 500]  # one job, two attempts


def test_a_job_cancelled_elsewhere_ends_the_request_with_a_conflict(
    fake: FakeOpenAI, openai_system: Callable[..., System]
) -> None:
    system = openai_system()
    with client_for(system) as client:
        stream = client.chat.completions.create(
            model="gpt", messages=user("cut short [[tokens:1]] [[hang]]"), stream=True
        )
        with stream:
            first = next(stream)
            job_id = job_of(first.id)
            res = system.http.delete(f"/api/jobs/{job_id}",
                                     headers={"Authorization": f"Bearer {PAID}"})  # fmt: skip
            assert res.status_code == 200
            with pytest.raises(openai.APIError) as ended:
                list(stream)
    assert ended.value.code == "job_cancelled"
    assert upstream_request(fake, "cut short").disconnected.wait(DISCONNECT_WITHIN_S)
    wait_until(lambda: system.job(job_id)["status"] == "cancelled")


def test_a_failure_after_output_ends_the_stream_and_cancels_the_retry(
    fake: FakeOpenAI, openai_system: Callable[..., System]
) -> None:
    system = openai_system(qstash_retries=2)
    prompt = "breaks midway [[tokens:4]] [[error_after:2]]"
    with client_for(system) as client:
        stream = client.chat.completions.create(model="gpt", messages=user(prompt), stream=True)
        seen: list[ChatCompletionChunk] = []
        with stream, pytest.raises(openai.APIError) as broke:
            seen.extend(stream)
    assert content_of(seen) == "w0 w1"  # what the client got before the failure
    assert broke.value.code == "upstream_error"
    assert "mid-answer" in broke.value.message
    job_id = job_of(seen[0].id)
    wait_until(lambda: system.job(job_id)["status"] == "cancelled")  # no retry runs for nobody
    wait_until(lambda: system.slot_count(system.keys.admission("q_paid_stream")) == 0)


def test_front_door_requests_never_leak_the_upstream_key(
    fake: FakeOpenAI, openai_system: Callable[..., System]
) -> None:
    system = openai_system()
    with httpx.Client(base_url=system.app.url, timeout=30) as http:
        res = http.post(
            "/v1/chat/completions",
            json={"model": "gpt", "messages": user("leak? [[status:400]] [[echo_auth]]")},
            headers={"Authorization": f"Bearer {PAID}"},
        )
    assert res.status_code == 400
    assert UPSTREAM_KEY not in res.text
