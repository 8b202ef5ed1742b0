from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import structlog

from brokers import Broker
from openai_upstream import UPSTREAM_KEY, UPSTREAM_KEY_ENV, FakeOpenAI
from system import System, start_system
from tierq.config import ModelSettings, ServiceSettings
from tierq.observability.logging import configure_logging


@pytest.fixture
def make_system(redis_url: str) -> Iterator[Callable[..., System]]:
    """Start a whole system (broker + app) with settings overrides; stopped after the test."""
    started: list[System] = []

    def make(**overrides: Any) -> System:
        system = start_system(redis_url, **overrides)
        started.append(system)
        return system

    yield make
    for system in started:
        system.close()


@pytest.fixture
def system(make_system: Callable[..., System]) -> System:
    return make_system()


@pytest.fixture
def held_system(make_system: Callable[..., System]) -> System:
    """A system whose jobs run only when QStash delivers them (no local start): a QStash queue
    paused behind tierq's back holds them, as a test that needs a job held (queued, or its
    message to deliver by hand) wants."""
    return make_system(local_start=False)


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    """An OpenAI-compatible upstream served by the suite."""
    with FakeOpenAI() as upstream:
        yield upstream


@pytest.fixture
def openai_system(
    fake: FakeOpenAI, make_system: Callable[..., System], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., System]:
    """Whole systems whose one model, ``gpt``, is the fake upstream (the openai provider)."""
    monkeypatch.setenv(UPSTREAM_KEY_ENV, UPSTREAM_KEY)

    def make(**overrides: Any) -> System:
        gpt = ModelSettings(
            provider="openai", base_url=fake.url, upstream="fake-model",
            api_key_env=UPSTREAM_KEY_ENV, timeout_s=5,
        )  # fmt: skip
        services = {
            "chat": ServiceSettings(experiences=["stream", "batch"], models=["gpt"]),
            "describe": ServiceSettings(experiences=["vision"], models=["gpt"]),
        }
        return make_system(models={"gpt": gpt}, services=services, **overrides)

    return make


@pytest.fixture
def broker_url(broker: Broker) -> str:
    """One embedded broker (in a thread) on the test's Redis, for ``tierq serve`` processes."""
    return broker.url


@pytest.fixture
def audit_log() -> Iterator[io.StringIO]:
    """The audit stream (JSON lines) of whatever logs during the test; logging reset after."""
    main, audit_out = io.StringIO(), io.StringIO()
    configure_logging(json_output=True, stream=main, audit_stream=audit_out)
    yield audit_out
    structlog.reset_defaults()
