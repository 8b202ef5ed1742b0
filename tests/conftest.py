"""Fixtures: a real embedded Redis for the session, a real broker and destination per test."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
from qstash import AsyncQStash, QStash

from brokers import Broker, start_broker
from helpers import Destination
from tierq.embedded_redis import EmbeddedRedis

_paths = itertools.count()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with EmbeddedRedis(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def destination() -> Iterator[Destination]:
    dest = Destination()
    dest.thread.start()
    yield dest
    dest.thread.stop()


@pytest.fixture
def path(request: pytest.FixtureRequest) -> str:
    """A destination path unique to this test."""
    return f"/{request.node.name}-{next(_paths)}"


@pytest.fixture
def broker(redis_url: str) -> Iterator[Broker]:
    b = start_broker(redis_url)
    yield b
    b.close_clients()
    b.thread.stop()


@pytest.fixture
def qstash(broker: Broker) -> QStash:
    return broker.client()


@pytest.fixture
async def aqstash(broker: Broker) -> AsyncIterator[AsyncQStash]:
    client = broker.async_client()
    yield client
    await client.http._client.aclose()  # type: ignore[attr-defined]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path
