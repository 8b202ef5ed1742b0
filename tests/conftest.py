"""Fixtures: a real embedded Redis for the session, a real broker and destination per test."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from qstash import AsyncQStash, QStash, Receiver

from helpers import Destination, ServerThread
from tierq.broker.server.app import create_broker_app
from tierq.broker.server.credentials import DEV_ACCOUNTS, build_accounts
from tierq.config import BrokerSettings
from tierq.embedded_redis import EmbeddedRedis

DEV = DEV_ACCOUNTS[0]
_prefixes = itertools.count()


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
    return f"/{request.node.name}-{next(_prefixes)}"


@dataclass
class Broker:
    url: str
    settings: BrokerSettings
    thread: ServerThread
    token: str = DEV.token
    clients: list[QStash] = field(default_factory=list)
    async_clients: list[AsyncQStash] = field(default_factory=list)

    def client(self) -> QStash:
        client = QStash(self.token, base_url=self.url)
        self.clients.append(client)
        return client

    def async_client(self) -> AsyncQStash:
        client = AsyncQStash(self.token, base_url=self.url)
        self.async_clients.append(client)
        return client

    def close_clients(self) -> None:
        # The SDK clients never close their httpx clients themselves.
        for client in self.clients:
            client.http._client.close()  # type: ignore[attr-defined]

    def receiver(self) -> Receiver:
        return Receiver(current_signing_key=DEV.current_key, next_signing_key=DEV.next_key)


def start_broker(redis_url: str, **overrides: object) -> Broker:
    settings = BrokerSettings(key_prefix=f"t{next(_prefixes)}", poll_interval_s=0.2, **overrides)  # type: ignore[arg-type]
    accounts = build_accounts(dev_accounts=True, token=None, current_key=None, next_key=None)
    thread = ServerThread(create_broker_app(settings, redis_url, accounts)).start()
    return Broker(thread.url, settings, thread)


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
