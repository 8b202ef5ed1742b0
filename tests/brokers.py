"""A broker served on real HTTP for tests, with its own Redis key prefix."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from qstash import AsyncQStash, QStash, Receiver

from helpers import ServerThread
from tierq.broker.server.app import create_broker_app
from tierq.broker.server.credentials import DEV_ACCOUNTS, build_accounts
from tierq.config import BrokerSettings

DEV = DEV_ACCOUNTS[0]
_prefixes = itertools.count()


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
