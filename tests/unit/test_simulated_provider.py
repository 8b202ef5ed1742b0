"""The simulated provider: deterministic output, usage, experiences, latency and failures."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tierq.config import ModelSettings
from tierq.contracts import JobInput, Simulate, Usage
from tierq.errors import NotFound, UpstreamError
from tierq.providers import (
    Chunk,
    Finish,
    ProviderError,
    ProviderRegistry,
    ProviderRequest,
    SimulatedProvider,
    build_provider,
)
from tierq.providers.openai_compat import OpenAIProvider
from tierq.queues import Experience

FAST = ModelSettings(token_latency_ms=0, tokens=12)


def request(
    prompt: str = "tell me a story",
    *,
    experience: Experience = "stream",
    images: list[str] | None = None,
    attempt: int = 0,
    **simulate: Any,
) -> ProviderRequest:
    job = JobInput(
        prompt=prompt,
        images=images or [],
        simulate=Simulate(**simulate) if simulate else None,
    )
    return ProviderRequest(
        job_id="j1",
        model_id="sim",
        upstream_model="",
        experience=experience,
        input=job,
        attempt=attempt,
    )


async def collect(req: ProviderRequest, settings: ModelSettings = FAST) -> list[Chunk | Finish]:
    return [item async for item in SimulatedProvider(settings).run(req)]


async def collect_until_error(
    req: ProviderRequest, settings: ModelSettings = FAST
) -> tuple[list[Chunk | Finish], Exception]:
    items: list[Chunk | Finish] = []
    try:
        async for item in SimulatedProvider(settings).run(req):
            items.append(item)
    except Exception as error:  # the caller checks the type
        return items, error
    pytest.fail(f"no error raised; got {items!r}")


def split(items: list[Chunk | Finish]) -> tuple[list[Chunk], Finish]:
    *chunks, finish = items
    assert isinstance(finish, Finish)
    assert all(isinstance(c, Chunk) for c in chunks)
    return [c for c in chunks if isinstance(c, Chunk)], finish


# -- output ---------------------------------------------------------------------------------


@pytest.mark.parametrize("experience", ["stream", "batch", "vision"])
async def test_same_input_gives_same_output(experience: Experience) -> None:
    first = await collect(request(experience=experience, images=["https://x/a.png"]))
    second = await collect(request(experience=experience, images=["https://x/a.png"]))
    assert first == second


@pytest.mark.parametrize(("a", "b"), [("hello", "hello world"), ("cats", "dogs"), ("a b", "b a")])
async def test_different_prompts_give_different_text(a: str, b: str) -> None:
    _, fa = split(await collect(request(a)))
    _, fb = split(await collect(request(b)))
    assert fa.text != fb.text


@pytest.mark.parametrize(
    ("settings_tokens", "simulate_tokens", "expected"),
    [(12, None, 12), (12, 3, 3), (5, 0, 0), (1, None, 1), (12, 200, 200)],
)
async def test_token_count_and_usage(
    settings_tokens: int, simulate_tokens: int | None, expected: int
) -> None:
    settings = ModelSettings(token_latency_ms=0, tokens=settings_tokens)
    sim: dict[str, Any] = {} if simulate_tokens is None else {"tokens": simulate_tokens}
    chunks, finish = split(await collect(request("one two  three\nfour", **sim), settings))
    assert len(chunks) == expected
    assert len(finish.text.split()) == expected
    assert finish.usage == Usage(prompt_tokens=4, completion_tokens=expected)


async def test_stream_yields_chunks_then_finish_that_join_to_the_text() -> None:
    chunks, finish = split(await collect(request(tokens=7)))
    assert len(chunks) == 7
    assert "".join(c.text for c in chunks) == finish.text
    assert chunks[0].text == finish.text.split()[0]


@pytest.mark.parametrize("experience", ["batch", "vision"])
async def test_batch_and_vision_yield_only_finish(experience: Experience) -> None:
    items = await collect(request(experience=experience, tokens=5))
    assert len(items) == 1
    assert isinstance(items[0], Finish)


async def test_batch_text_equals_stream_text() -> None:
    _, streamed = split(await collect(request(experience="stream")))
    _, batched = split(await collect(request(experience="batch")))
    assert streamed == batched


@pytest.mark.parametrize(
    ("images", "label", "prompt_tokens"),
    [
        ([], "[0 images]", 2),
        (["https://example.com/cat.png"], "[1 image]", 2 + 85),
        (["https://example.com/a.png", "data:image/png;base64,AAAA"], "[2 images]", 2 + 170),
    ],
)
async def test_vision_counts_images(images: list[str], label: str, prompt_tokens: int) -> None:
    _, finish = split(await collect(request("describe this", experience="vision", images=images)))
    assert finish.text.startswith(label + " ")
    assert finish.usage == Usage(prompt_tokens=prompt_tokens, completion_tokens=12)


async def test_images_count_only_for_vision() -> None:
    _, finish = split(await collect(request("describe this", images=["https://x/a.png"])))
    assert finish.usage.prompt_tokens == 2
    assert not finish.text.startswith("[")


# -- failures -------------------------------------------------------------------------------


@pytest.mark.parametrize(("tokens", "emitted"), [(12, 6), (7, 3), (1, 0), (0, 0)])
async def test_error_is_retryable_after_half_the_tokens(tokens: int, emitted: int) -> None:
    items, error = await collect_until_error(request(fail="error", tokens=tokens))
    assert isinstance(error, ProviderError)
    assert isinstance(error, UpstreamError)
    assert (error.code, error.retryable) == ("simulated_error", True)
    assert len(items) == emitted
    assert all(isinstance(i, Chunk) for i in items)


@pytest.mark.parametrize("experience", ["stream", "batch", "vision"])
async def test_fatal_is_permanent_and_emits_nothing(experience: Experience) -> None:
    items, error = await collect_until_error(request(fail="fatal", experience=experience))
    assert isinstance(error, ProviderError)
    assert (error.code, error.retryable) == ("simulated_fatal", False)
    assert items == []


@pytest.mark.parametrize("experience", ["batch", "vision"])
async def test_error_in_batch_emits_nothing(experience: Experience) -> None:
    items, error = await collect_until_error(request(fail="error", experience=experience))
    assert isinstance(error, ProviderError)
    assert items == []


async def test_exception_is_a_plain_runtime_error() -> None:
    items, error = await collect_until_error(request(fail="exception"))
    assert type(error) is RuntimeError
    assert items == []


@pytest.mark.parametrize("experience", ["stream", "batch"])
async def test_hang_is_cancelled_promptly(experience: Experience) -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(collect(request(fail="hang", experience=experience)), 0.02)
    assert time.monotonic() - started < 0.1


@pytest.mark.parametrize(
    ("fail", "error_type"),
    [("error", ProviderError), ("fatal", ProviderError), ("exception", RuntimeError)],
)
@pytest.mark.parametrize(("attempt", "fails"), [(0, True), (1, True), (2, False), (5, False)])
async def test_fail_attempts_limits_failures(
    fail: str, error_type: type[Exception], attempt: int, fails: bool
) -> None:
    req = request(fail=fail, fail_attempts=2, attempt=attempt)
    if fails:
        _, error = await collect_until_error(req)
        assert isinstance(error, error_type)
    else:
        _, finish = split(await collect(req))
        assert finish.usage.completion_tokens == 12


async def test_hang_with_fail_attempts_succeeds_on_later_attempt() -> None:
    items = await asyncio.wait_for(collect(request(fail="hang", fail_attempts=1, attempt=1)), 1)
    assert isinstance(items[-1], Finish)


async def test_fail_without_fail_attempts_fails_every_attempt() -> None:
    _, error = await collect_until_error(request(fail="fatal", attempt=9))
    assert isinstance(error, ProviderError)


# -- latency --------------------------------------------------------------------------------


@pytest.mark.parametrize("experience", ["stream", "batch"])
async def test_latency_is_respected(experience: Experience) -> None:
    started = time.monotonic()
    await collect(request(experience=experience, tokens=5, token_latency_ms=20))
    assert time.monotonic() - started >= 0.09


async def test_settings_latency_applies_without_override() -> None:
    started = time.monotonic()
    await collect(request(tokens=5), ModelSettings(token_latency_ms=20))
    assert time.monotonic() - started >= 0.09


async def test_the_model_keeps_its_own_pace_for_a_reader_that_falls_behind() -> None:
    """Tokens leave the model on its clock, not when the reader asks: a reader that pauses
    gets what came out meanwhile in one chunk (one token a chunk when the model paced itself
    after each token the reader took)."""
    chunks: list[str] = []
    provider = SimulatedProvider(FAST)
    async for item in provider.run(request(tokens=10, token_latency_ms=20)):
        if isinstance(item, Chunk):
            chunks.append(item.text)
            if len(chunks) == 1:
                await asyncio.sleep(0.12)  # a busy reader: 6 more tokens come out meanwhile
        else:
            finish = item
    assert "".join(chunks) == finish.text
    assert len(finish.text.split()) == 10
    assert len(chunks[1].split()) >= 5  # what came out during the pause, at once
    assert len(chunks) < 10


async def test_zero_latency_is_fast_and_yields_control() -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    started = time.monotonic()
    items = await collect(request(tokens=2000, token_latency_ms=0), ModelSettings(tokens=1))
    elapsed = time.monotonic() - started
    task.cancel()
    assert len(items) == 2001
    assert ticks > 1
    assert elapsed < 5


# -- registry -------------------------------------------------------------------------------


def test_build_provider_simulated() -> None:
    assert isinstance(build_provider(ModelSettings()), SimulatedProvider)


def test_build_provider_openai_builds_the_openai_provider() -> None:
    assert isinstance(build_provider(ModelSettings(provider="openai"), "oa"), OpenAIProvider)


def test_registry_caches_one_provider_per_model() -> None:
    registry = ProviderRegistry({"a": ModelSettings(), "b": ModelSettings(tokens=3)})
    assert registry.get("a") is registry.get("a")
    assert registry.get("a") is not registry.get("b")


def test_registry_errors() -> None:
    registry = ProviderRegistry({"oa": ModelSettings(provider="openai")})
    with pytest.raises(NotFound):
        registry.get("missing")
    assert isinstance(registry.get("oa"), OpenAIProvider)
