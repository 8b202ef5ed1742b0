"""The simulated model: deterministic tokens, configurable latency and failure, no network.

Output depends only on the prompt, the token count and (for vision) the number of images,
so the same request always produces the same text. ``JobInput.simulate`` overrides the
model settings per job and can inject failures:

- ``"error"``: a retryable ``simulated_error`` after half the tokens (an upstream 5xx
  mid-stream);
- ``"fatal"``: a permanent ``simulated_fatal`` before any token;
- ``"exception"``: a plain :class:`RuntimeError` (a bug in provider code);
- ``"hang"``: never finishes, until cancelled.

With ``fail_attempts=N`` the failure applies only to attempts ``< N``; later ones succeed.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from tierq.aio import PerLoop
from tierq.config import ModelSettings
from tierq.contracts import JobInput, Usage
from tierq.providers.base import Chunk, Finish, ProviderError, ProviderRequest

WORDS: tuple[str, ...] = (
    "alpha", "amber", "anchor", "apple", "arrow", "autumn", "basil", "beacon",
    "birch", "bloom", "breeze", "brook", "canyon", "cedar", "cipher", "clover",
    "comet", "coral", "crystal", "delta", "dune", "echo", "ember", "falcon",
    "fern", "field", "flint", "forest", "galaxy", "garnet", "glacier", "harbor",
    "hazel", "horizon", "indigo", "island", "jade", "juniper", "lagoon", "lantern",
    "lemon", "lotus", "maple", "meadow", "meteor", "mist", "nebula", "oasis",
    "ocean", "onyx", "orbit", "pebble", "pine", "prairie", "quartz", "raven",
    "river", "saffron", "summit", "thistle", "tide", "valley", "willow", "zephyr",
)  # fmt: skip
IMAGE_PROMPT_TOKENS = 85
"""Prompt tokens charged per image of a vision job."""
YIELD_EVERY = 64
"""With zero latency, hand control back to the event loop every this many tokens."""


def simulated_word(prompt: str, index: int) -> str:
    """The deterministic word at ``index`` for ``prompt``."""
    digest = hashlib.blake2b(f"{index}\x00{prompt}".encode(), digest_size=8).digest()
    return WORDS[int.from_bytes(digest, "big") % len(WORDS)]


def image_label(count: int) -> str:
    """The marker a vision result starts with, e.g. ``[2 images]``."""
    return f"[{count} image{'' if count == 1 else 's'}]"


def prompt_usage(job: JobInput, *, vision: bool) -> int:
    """Whitespace words of the prompt, plus ``IMAGE_PROMPT_TOKENS`` per image for vision."""
    images = len(job.images) if vision else 0
    return len(job.prompt.split()) + IMAGE_PROMPT_TOKENS * images


@dataclass(frozen=True)
class _Plan:
    """What one attempt will do, resolved from model settings and ``input.simulate``."""

    tokens: int
    latency_s: float
    fail: str | None


class SimulatedProvider:
    """A :class:`~tierq.providers.base.Provider` that needs no network (see module doc)."""

    def __init__(self, settings: ModelSettings) -> None:
        self.settings = settings

    def _plan(self, request: ProviderRequest) -> _Plan:
        sim = request.input.simulate
        tokens = self.settings.tokens
        latency_ms = self.settings.token_latency_ms
        fail: str | None = None
        if sim is not None:
            tokens = sim.tokens if sim.tokens is not None else tokens
            latency_ms = sim.token_latency_ms if sim.token_latency_ms is not None else latency_ms
            limit = sim.fail_attempts
            fail = sim.fail if limit is None or request.attempt < limit else None
        return _Plan(tokens=max(tokens, 0), latency_s=latency_ms / 1000, fail=fail)

    async def run(self, request: ProviderRequest) -> AsyncGenerator[Chunk | Finish, None]:
        """Yield the tokens as Chunks (stream only; one per token, or those already out when
        the consumer fell behind), then the Finish; or fail as asked."""
        plan = self._plan(request)
        await _fail_early(plan.fail)
        stream = request.experience == "stream"
        vision = request.experience == "vision"
        parts = [image_label(len(request.input.images))] if vision else []
        fail_at = plan.tokens // 2 if plan.fail == "error" else None
        end = plan.tokens if fail_at is None else fail_at
        clock = _Clock(plan.latency_s)
        index = 0
        while index < end:
            due = min(await clock.due(index), end)  # tokens [index, due) are out by now
            words = [simulated_word(request.input.prompt, i) for i in range(index, due)]
            if stream:
                text = " ".join(words)
                yield Chunk(text if not parts else " " + text)
            parts.extend(words)
            index = due
        if fail_at is not None:  # after half the tokens (with none, at once)
            _raise_simulated_error(fail_at, plan.tokens)
        usage = Usage(
            prompt_tokens=prompt_usage(request.input, vision=vision),
            completion_tokens=plan.tokens,
        )
        yield Finish(text=" ".join(parts), usage=usage)


async def _fail_early(fail: str | None) -> None:
    """Failures that happen before the first token: fatal, exception and hang."""
    if fail == "fatal":
        raise ProviderError(
            "simulated permanent upstream failure", code="simulated_fatal", retryable=False
        )
    if fail == "exception":
        raise RuntimeError("simulated bug in provider code")
    if fail == "hang":
        await asyncio.Event().wait()  # never set: returns only by cancellation


def _raise_simulated_error(emitted: int, total: int) -> None:
    raise ProviderError(
        f"simulated upstream error after {emitted} of {total} tokens",
        code="simulated_error",
        retryable=True,
    )


class _Clock:
    """The model's own pace: token ``i`` is out ``(i + 1) * latency`` after the start, whatever
    the consumer does (a real upstream does not slow down for a busy reader). A consumer that
    fell behind gets every token already out in one chunk, as a network stream hands over what
    arrived meanwhile; with zero latency, one token at a time, yielding control now and then."""

    __slots__ = ("latency_s", "loop", "metronome", "start")

    def __init__(self, latency_s: float) -> None:
        self.latency_s = latency_s
        self.loop = asyncio.get_running_loop()  # once, not per token
        self.metronome = _metronome()
        self.start = self.loop.time()

    async def due(self, index: int) -> int:
        """Wait until token ``index`` is out; how many tokens are out then (> ``index``)."""
        if self.latency_s <= 0:
            if index % YIELD_EVERY == 0:
                await asyncio.sleep(0)
            return index + 1
        when = self.start + (index + 1) * self.latency_s
        if when > self.loop.time():
            await self.metronome.wait(when)
        return max(index + 1, int((self.loop.time() - self.start) / self.latency_s))


class _Metronome:
    """The simulated jobs' shared timers: one per millisecond in which any job has a token
    due, not one per job and token (at 500 streams that is 25,000 ``asyncio.sleep`` timers a
    second; ~40 % of the model's own CPU in a micro-benchmark). A wait ends at the first
    millisecond boundary at or after its time, never before it."""

    __slots__ = ("slots",)

    def __init__(self) -> None:
        self.slots: dict[int, list[asyncio.Future[None]]] = {}

    def wait(self, when: float) -> asyncio.Future[None]:
        """A future of its own for each waiter: cancelling one wait leaves the others."""
        loop = asyncio.get_running_loop()
        slot = math.ceil(when * 1000)
        waiters = self.slots.get(slot)
        if waiters is None:
            self.slots[slot] = waiters = []
            loop.call_at(slot / 1000, self._ring, slot)
        waiter: asyncio.Future[None] = loop.create_future()
        waiters.append(waiter)
        return waiter

    def _ring(self, slot: int) -> None:
        for waiter in self.slots.pop(slot, ()):
            if not waiter.done():
                waiter.set_result(None)


_metronome = PerLoop(_Metronome)
