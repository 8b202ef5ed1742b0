"""Leases: bounded, expiring slots keyed by job id, in Redis.

Every guard (admission per queue, model+tier, user) is one sorted set: member = holder (job id),
score = expiry in ms on the Redis server's clock. Each operation is one Lua script on one key,
so it is atomic and works on Redis Cluster. Acquire is idempotent per holder; a crashed holder's
lease simply expires; every guard key carries a TTL, so nothing lingers.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from tierq.errors import UpstreamError


@dataclass(frozen=True)
class Acquired:
    acquired: bool
    count: int


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Leases:
    def __init__(self, client: aioredis.Redis) -> None:
        self.r = client
        lua = resources.files("tierq.guards") / "lua"
        self._scripts: dict[str, AsyncScript] = {
            name: client.register_script((lua / f"{name}.lua").read_text())
            for name in ("acquire", "renew", "count")
        }

    async def acquire(self, key: str, holder: str, limit: int, ttl_s: float) -> Acquired:
        """Take a slot (or refresh the one ``holder`` has) if fewer than ``limit`` are live."""
        try:
            acquired, count = await self._scripts["acquire"](
                keys=[key], args=[holder, limit, _ms(ttl_s)]
            )
        except RedisError as exc:
            raise UpstreamError(f"redis: {exc}") from exc
        return Acquired(bool(acquired), int(count))

    async def renew(self, key: str, holder: str, ttl_s: float) -> bool:
        """Extend a live lease; ``False`` means it was lost (expired or released)."""
        try:
            return bool(await self._scripts["renew"](keys=[key], args=[holder, _ms(ttl_s)]))
        except RedisError as exc:
            raise UpstreamError(f"redis: {exc}") from exc

    async def release(self, key: str, holder: str) -> bool:
        try:
            return bool(await self.r.zrem(key, holder))
        except RedisError as exc:
            raise UpstreamError(f"redis: {exc}") from exc

    async def release_all(self, held: list[tuple[str, str]]) -> None:
        """Release several leases in one round trip (each ZREM touches one key)."""
        if not held:
            return
        try:
            pipe = self.r.pipeline(transaction=False)
            for key, holder in held:
                pipe.zrem(key, holder)
            await pipe.execute()
        except RedisError as exc:
            raise UpstreamError(f"redis: {exc}") from exc

    async def count(self, key: str) -> int:
        try:
            return int(await self._scripts["count"](keys=[key], args=[]))
        except RedisError as exc:
            raise UpstreamError(f"redis: {exc}") from exc

    async def holders(self, key: str) -> list[str]:
        """Live holders (the Redis clock decides what has expired)."""
        try:
            pipe = self.r.pipeline(transaction=False)
            pipe.time()
            pipe.zrange(key, 0, -1, withscores=True)
            (sec, usec), rows = await pipe.execute()
        except RedisError as exc:
            raise UpstreamError(f"redis: {exc}") from exc
        now = int(sec) * 1000 + int(usec) // 1000
        return [_s(member) for member, score in rows if score > now]
