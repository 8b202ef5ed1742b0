"""Leases: bounded, expiring slots keyed by job id, in Redis.

Every guard (admission per queue, model+tier, user) is one sorted set: member = holder (job id),
score = lease expiry in ms on the Redis server's clock (``TIME`` inside the scripts, so all
replicas of tierq share one clock). Each operation touches exactly one key, so it is atomic and
works on Redis Cluster. Acquire is idempotent per holder; a crashed holder's lease expires by
itself; every write gives the guard key a TTL that outlives its longest lease by
``KEY_GRACE_MS``, so an idle guard disappears instead of lingering.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from tierq.errors import UpstreamError

KEY_GRACE_MS = 1000
"""How long a guard key outlives its longest lease (a safety margin, not a lease extension)."""

_SCRIPTS = ("acquire", "renew", "count", "holders")


@dataclass(frozen=True)
class Acquired:
    """Outcome of :meth:`Leases.acquire`: whether the holder now has a lease, and how many
    live leases the guard has after the call (the holder's included when acquired)."""

    acquired: bool
    count: int


def ttl_ms(ttl_s: float) -> int:
    """A lease TTL in whole milliseconds (at least 1); ``ValueError`` unless ``ttl_s > 0``."""
    if not ttl_s > 0:
        raise ValueError(f"lease ttl must be positive, got {ttl_s!r}")
    return max(1, round(ttl_s * 1000))


def _s(value: Any) -> str:
    """Replies are bytes or str depending on the client's ``decode_responses``."""
    return value.decode() if isinstance(value, bytes) else str(value)


@contextmanager
def _upstream() -> Iterator[None]:
    """Convert Redis failures into :class:`UpstreamError` at this boundary."""
    try:
        yield
    except RedisError as exc:
        raise UpstreamError(f"redis: {exc}") from exc


def _load_scripts(client: aioredis.Redis) -> dict[str, AsyncScript]:
    lua = resources.files("tierq.guards") / "lua"
    prelude = (lua / "_clock.lua").read_text()
    return {
        name: client.register_script(prelude + (lua / f"{name}.lua").read_text())
        for name in _SCRIPTS
    }


class Leases:
    """Leases on guard keys. Every method is one Redis round trip and raises
    :class:`UpstreamError` (never a ``redis`` exception) when Redis fails. The client may
    decode responses or not."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.r = client
        self._scripts = _load_scripts(client)

    async def acquire(self, key: str, holder: str, limit: int, ttl_s: float) -> Acquired:
        """Take a lease for ``ttl_s`` if fewer than ``limit`` are live. A holder that already
        has a live lease keeps its one slot and gets a fresh expiry (always acquired)."""
        with _upstream():
            acquired, count = await self._scripts["acquire"](
                keys=[key], args=[holder, limit, ttl_ms(ttl_s), KEY_GRACE_MS]
            )
        return Acquired(bool(acquired), int(count))

    async def renew(self, key: str, holder: str, ttl_s: float) -> bool:
        """Set a live lease to expire ``ttl_s`` from now. ``False``: the lease was lost (expired
        or released); it is not brought back."""
        with _upstream():
            renewed = await self._scripts["renew"](
                keys=[key], args=[holder, ttl_ms(ttl_s), KEY_GRACE_MS]
            )
        return bool(renewed)

    async def release(self, key: str, holder: str) -> bool:
        """Give the lease back; ``False`` when there was none. Idempotent."""
        with _upstream():
            removed = await self.r.zrem(key, holder)
        return bool(removed)

    async def release_all(self, keys_and_holder: list[tuple[str, str]]) -> list[bool]:
        """Release several ``(key, holder)`` leases in one pipelined round trip (not a
        transaction: the keys may live on different Cluster nodes). One flag per pair, in
        order, as :meth:`release` would return it."""
        if not keys_and_holder:
            return []
        with _upstream():
            pipe = self.r.pipeline(transaction=False)
            for key, holder in keys_and_holder:
                pipe.zrem(key, holder)
            removed = await pipe.execute()
        return [bool(n) for n in removed]

    async def count(self, key: str) -> int:
        """Live leases on ``key`` (read-only: expired ones are not counted, nor removed)."""
        with _upstream():
            live = await self._scripts["count"](keys=[key], args=[])
        return int(live)

    async def holders(self, key: str) -> list[str]:
        """Holders with a live lease on ``key``, soonest expiry first (read-only)."""
        with _upstream():
            rows = await self._scripts["holders"](keys=[key], args=[])
        return [_s(member) for member in rows]
