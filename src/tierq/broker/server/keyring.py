"""Each account's signing-key pair: fixed defaults, rotations persisted in Redis."""

from __future__ import annotations

from tierq.broker.server.credentials import Account
from tierq.broker.server.signing import new_signing_key
from tierq.broker.server.store import BrokerStore


class KeyRing:
    """In-memory view of the key pairs; rotation writes through to Redis.

    One broker process owns a key prefix, so the cache cannot go stale behind its back.
    """

    def __init__(self, store: BrokerStore, accounts: dict[str, Account]) -> None:
        self._store = store
        self._pairs = {a.user: (a.current_key, a.next_key) for a in accounts.values()}

    async def load(self) -> None:
        saved = await self._store.signing_keys()
        self._pairs.update({user: pair for user, pair in saved.items() if user in self._pairs})

    def pair(self, user: str) -> tuple[str, str]:
        return self._pairs[user]

    def current(self, user: str) -> str:
        return self._pairs[user][0]

    async def rotate(self, user: str) -> tuple[str, str]:
        """Next becomes current, a fresh next is made (what QStash's rotate does)."""
        pair = (self._pairs[user][1], new_signing_key())
        await self._store.save_signing_keys(user, *pair)
        self._pairs[user] = pair
        return pair
