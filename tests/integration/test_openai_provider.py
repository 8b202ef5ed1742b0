"""The OpenAI-compatible provider against a real OpenAI-compatible HTTP server (FakeOpenAI)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from typing import Any

import pytest

from openai_upstream import FakeOpenAI, UpstreamRequest, fake_prompt_tokens, fake_tokens
from tierq.config import ModelSettings
from tierq.contracts import JobInput, Usage
from tierq.embedded_redis import free_port
from tierq.providers.base import Chunk, Finish, ProviderError, ProviderRequest
from tierq.providers.openai_compat import OpenAIProvider
from tierq.providers.registry import ProviderRegistry
from tierq.queues import Experience

KEY_ENV = "TIERQ_TEST_UPSTREAM_KEY"
SECRET = "sk-test-abcdefghijklmnop0123456789"
PNG = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGBgAAAABQ"
    "ABh6FO1AAAAABJRU5ErkJggg=="
)
DISCONNECT_WITHIN_S = 1.0


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as upstream:
        yield upstream


def model(fake: FakeOpenAI, **overrides: Any) -> ModelSettings:
    settings = {"provider": "openai", "base_url": fake.url, "upstream": "fake-model",
                "timeout_s": 5.0, **overrides}  # fmt: skip
    return ModelSettings.model_validate(settings)


@pytest.fixture
async def provider(fake: FakeOpenAI) -> AsyncIterator[OpenAIProvider]:
    built = OpenAIProvider("gpt", model(fake))
    yield built
    await built.aclose()


@pytest.fixture
async def make_provider(fake: FakeOpenAI) -> AsyncIterator[Any]:
    """Providers with settings overrides, closed after the test."""
    built: list[OpenAIProvider] = []

    def make(**overrides: Any) -> OpenAIProvider:
        built.append(OpenAIProvider("gpt", model(fake, **overrides)))
        return built[-1]

    yield make
    for one in built:
        await one.aclose()


def job(prompt: str, experience: Experience = "stream", images: tuple[str, ...] = ()) -> Any:
    return ProviderRequest(
        job_id="job_1",
        model_id="gpt",
        upstream_model="fake-model",
        experience=experience,
        input=JobInput(prompt=prompt, images=list(images)),
    )


async def collect(provider: OpenAIProvider, request: ProviderRequest) -> list[Chunk | Finish]:
    async with aclosing(provider.run(request)) as items:
        return [item async for item in items]


async def failure(provider: OpenAIProvider, request: ProviderRequest) -> ProviderError:
    with pytest.raises(ProviderError) as caught:
        await collect(provider, request)
    return caught.value


async def disconnected(request: UpstreamRequest) -> bool:
    """Whether the upstream saw its client leave, waiting at most ``DISCONNECT_WITHIN_S``."""
    return await asyncio.to_thread(request.disconnected.wait, DISCONNECT_WITHIN_S)


# -- answers -------------------------------------------------------------------------------


async def test_stream_yields_each_upstream_chunk_then_the_finish(
    fake: FakeOpenAI, provider: OpenAIProvider
) -> None:
    prompt = "tell me a story [[tokens:4]]"
    items = await collect(provider, job(prompt))
    assert items[:-1] == [Chunk(text) for text in fake_tokens(4)]
    messages = [{"role": "user", "content": prompt}]
    usage = Usage(prompt_tokens=fake_prompt_tokens(messages), completion_tokens=4)
    assert items[-1] == Finish(text="".join(fake_tokens(4)), usage=usage)
    [sent] = fake.requests
    assert sent.model == "fake-model"
    assert sent.messages == messages
    assert sent.stream
    assert sent.body["stream_options"] == {"include_usage": True}
    assert "max_tokens" not in sent.body
    assert fake.open_streams == 0
    assert fake.disconnects == []


async def test_stream_without_usage_chunk_reports_zero_usage(
    fake: FakeOpenAI, make_provider: Any
) -> None:
    # an upstream that ignores stream_options (the header directive drops the usage chunk)
    provider = make_provider(extra_headers={"X-Fake-Directives": "[[tokens:2]] [[no_usage]]"})
    items = await collect(provider, job("hi"))
    assert items[-1] == Finish(text="w0 w1", usage=Usage())


async def test_batch_is_one_finish_from_a_non_streamed_call(
    fake: FakeOpenAI, provider: OpenAIProvider
) -> None:
    items = await collect(provider, job("summarise this [[tokens:3]]", "batch"))
    assert items == [Finish(text="w0 w1 w2", usage=Usage(prompt_tokens=3, completion_tokens=3))]
    [sent] = fake.requests
    assert not sent.stream
    assert "stream_options" not in sent.body


@pytest.mark.parametrize(
    "images",
    [
        pytest.param(("https://example.com/cat.png",), id="url"),
        pytest.param((PNG,), id="data-uri"),
        pytest.param(("https://example.com/a.jpg", PNG), id="both"),
    ],
)
async def test_vision_sends_text_and_image_url_parts(
    fake: FakeOpenAI, provider: OpenAIProvider, images: tuple[str, ...]
) -> None:
    [finish] = await collect(provider, job("what is this?", "vision", images))
    assert isinstance(finish, Finish)
    assert finish.text.startswith(f"[{len(images)} images] w0")
    [sent] = fake.requests
    assert not sent.stream
    assert sent.messages == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is this?"},
                *({"type": "image_url", "image_url": {"url": url}} for url in images),
            ],
        }
    ]
    assert sent.image_urls == list(images)


async def test_model_options_reach_the_upstream(fake: FakeOpenAI, make_provider: Any) -> None:
    provider = make_provider(max_tokens=7, extra_headers={"X-Fake-Directives": "[[tokens:2]]"})
    items = await collect(provider, job("hi"))
    assert items[:-1] == [Chunk("w0"), Chunk(" w1")]
    [sent] = fake.requests
    assert sent.body["max_tokens"] == 7


async def test_one_client_per_provider_reused(fake: FakeOpenAI, provider: OpenAIProvider) -> None:
    await collect(provider, job("one", "batch"))
    client = provider.client()
    await collect(provider, job("two"))
    assert provider.client() is client
    assert len(fake.requests) == 2


async def test_registry_builds_and_closes_openai_providers(fake: FakeOpenAI) -> None:
    registry = ProviderRegistry({"gpt": model(fake)})
    provider = registry.get("gpt")
    assert isinstance(provider, OpenAIProvider)
    assert registry.get("gpt") is provider
    assert (await collect(provider, job("hi", "batch")))[-1] == Finish(
        text="w0 w1 w2 w3 w4", usage=Usage(prompt_tokens=1, completion_tokens=5)
    )
    await registry.aclose()
    assert provider._client is None


# -- failures ------------------------------------------------------------------------------


@pytest.mark.parametrize("experience", ["stream", "batch"])
@pytest.mark.parametrize(
    ("status", "code"),
    [(429, "upstream_429"), (500, "upstream_5xx"), (503, "upstream_5xx"), (408, "upstream_4xx")],
)
async def test_transient_statuses_are_retryable(
    provider: OpenAIProvider, experience: Experience, status: int, code: str
) -> None:
    error = await failure(provider, job(f"x [[status:{status}]]", experience))
    assert (error.code, error.retryable) == (code, True)
    assert f"the upstream answered {status}: fake upstream answered {status}" in error.message
    assert error.message.startswith("model 'gpt': ")


@pytest.mark.parametrize("experience", ["stream", "batch", "vision"])
@pytest.mark.parametrize("status", [400, 401, 404, 422])
async def test_other_4xx_are_permanent(
    provider: OpenAIProvider, experience: Experience, status: int
) -> None:
    error = await failure(provider, job(f"x [[status:{status}]]", experience, ("http://i/x",)))
    assert (error.code, error.retryable) == ("upstream_4xx", False)
    assert f"answered {status}: fake upstream answered {status} as asked" in error.message


async def test_error_event_mid_stream_is_retryable(
    fake: FakeOpenAI, provider: OpenAIProvider
) -> None:
    seen: list[Chunk | Finish] = []
    with pytest.raises(ProviderError) as caught:
        async with aclosing(provider.run(job("x [[error_after:2]]"))) as items:
            seen.extend([item async for item in items])
    assert (caught.value.code, caught.value.retryable) == ("upstream_error", True)
    assert "fake mid-stream failure" in caught.value.message
    assert fake.open_streams == 0


async def test_stream_cut_short_is_retryable(provider: OpenAIProvider) -> None:
    error = await failure(provider, job("x [[cut_after:2]]"))
    assert (error.code, error.retryable) == ("upstream_incomplete", True)


async def test_unreachable_upstream_is_retryable() -> None:
    nowhere = ModelSettings(provider="openai", base_url=f"http://127.0.0.1:{free_port()}/v1")
    provider = OpenAIProvider("gpt", nowhere)
    try:
        error = await failure(provider, job("hi"))
    finally:
        await provider.aclose()
    assert (error.code, error.retryable) == ("upstream_unreachable", True)


@pytest.mark.parametrize(
    ("experience", "prompt"),
    [("stream", "x [[tokens:3]] [[slow:2000]]"), ("batch", "x [[delay:2000]]")],
)
async def test_slow_upstream_past_timeout_is_a_retryable_timeout(
    fake: FakeOpenAI, make_provider: Any, experience: Experience, prompt: str
) -> None:
    provider = make_provider(timeout_s=0.3)
    error = await failure(provider, job(prompt, experience))
    assert (error.code, error.retryable) == ("upstream_timeout", True)
    [sent] = fake.requests
    assert await disconnected(sent)


# -- cancellation --------------------------------------------------------------------------


async def test_cancel_mid_stream_closes_the_upstream_stream(
    fake: FakeOpenAI, provider: OpenAIProvider
) -> None:
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in provider.run(job("x [[tokens:2]] [[hang]]")):
            first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), timeout=5)
    [sent] = fake.requests
    assert fake.open_streams == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await disconnected(sent)
    assert fake.open_streams == 0
    assert fake.disconnects == [sent]


async def test_cancel_while_waiting_for_a_batch_answer_closes_the_request(
    fake: FakeOpenAI, provider: OpenAIProvider
) -> None:
    task = asyncio.create_task(collect(provider, job("x [[hang]]", "batch")))
    sent = await asyncio.to_thread(fake.wait_for_request, timeout=5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await disconnected(sent)


async def test_consumer_leaving_early_closes_the_upstream_stream(
    fake: FakeOpenAI, provider: OpenAIProvider
) -> None:
    async with aclosing(provider.run(job("x [[tokens:3]] [[hang]]"))) as items:
        async for item in items:
            assert item == Chunk("w0")
            break
    [sent] = fake.requests
    assert await disconnected(sent)


# -- the API key ---------------------------------------------------------------------------


async def test_api_key_from_env_is_sent_as_bearer_and_never_repeated(
    fake: FakeOpenAI,
    make_provider: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    provider = make_provider(api_key_env=KEY_ENV)
    caplog.set_level(logging.DEBUG)
    await collect(provider, job("hi"))
    assert fake.requests[-1].authorization == f"Bearer {SECRET}"
    # the upstream quotes the key back in its error message; tierq must not pass it on
    for experience in ("stream", "batch"):
        error = await failure(provider, job("x [[status:401]] [[echo_auth]]", experience))
        assert fake.requests[-1].authorization == f"Bearer {SECRET}"
        assert SECRET not in error.message
        assert SECRET not in repr(error)
        assert "[redacted]" in error.message
        assert (error.code, error.retryable) == ("upstream_4xx", False)
    assert SECRET not in caplog.text


async def test_no_key_env_sends_a_placeholder_key(
    fake: FakeOpenAI, provider: OpenAIProvider
) -> None:
    await collect(provider, job("hi", "batch"))
    assert fake.requests[-1].authorization == "Bearer not-needed"


async def test_missing_key_env_fails_for_good_without_calling_upstream(
    fake: FakeOpenAI, make_provider: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    provider = make_provider(api_key_env=KEY_ENV)
    error = await failure(provider, job("hi"))
    assert (error.code, error.retryable) == ("upstream_key_missing", False)
    assert KEY_ENV in error.message
    assert fake.requests == []
