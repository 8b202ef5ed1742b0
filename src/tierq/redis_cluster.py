"""tierq's Redis Cluster client: redis-py's asyncio ``RedisCluster`` with two adjustments.

- **Scripts in pipelines.** redis-py refuses ``evalsha`` in a cluster pipeline (a blanket
  rule from before it routed scripts by their keys). tierq's scripts declare their keys, all in
  one hash slot, so a queued script call is routed like any keyed command (by its first key's
  slot). A ``NOSCRIPT`` reply is the caller's to handle, as on a single node: ``SCRIPT LOAD``
  on a cluster client reaches every primary.
- **Callers wait for a connection.** redis-py's cluster client has no blocking pool: past
  ``max_connections`` on a node it raises at once. With ``permits``, at most that many
  commands and pipelines run at a time (a nested call, e.g. a pipeline's redirected command,
  rides on its caller's permit) and the others wait up to ``wait_s`` for one, as the
  single-node pool does; each node gets a few connections more than the permits, so the
  bound is the permits, never redis-py's error.
"""

from __future__ import annotations

import asyncio
from contextvars import ContextVar, Token
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterPipeline, RedisCluster
from redis.exceptions import MaxConnectionsError, RedisClusterException

_HOLDING: ContextVar[bool] = ContextVar("tierq_cluster_permit", default=False)
SPARE_CONNECTIONS = 8
"""Connections per node beyond the permits (a pipeline's redirected commands, topology)."""


class _Gate:
    __slots__ = ("_sem", "wait_s")

    def __init__(self, permits: int, wait_s: float) -> None:
        self._sem = asyncio.Semaphore(permits)
        self.wait_s = wait_s

    async def enter(self) -> Token[bool] | None:
        if _HOLDING.get():
            return None  # the caller's permit covers it
        if self._sem.locked():
            try:
                async with asyncio.timeout(self.wait_s):
                    await self._sem.acquire()
            except TimeoutError:
                raise MaxConnectionsError(
                    f"no free Redis connection within {self.wait_s:g}s"
                ) from None
        else:
            await self._sem.acquire()
        return _HOLDING.set(True)

    def leave(self, token: Token[bool] | None) -> None:
        if token is not None:
            _HOLDING.reset(token)
            self._sem.release()


class TierqCluster(RedisCluster):
    """See the module doc."""

    gate: _Gate | None = None

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        gate = self.gate
        if gate is None:
            return await super().execute_command(*args, **kwargs)
        token = await gate.enter()
        try:
            return await super().execute_command(*args, **kwargs)
        finally:
            gate.leave(token)

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> Any:
        if shard_hint:
            raise RedisClusterException("shard_hint is deprecated in cluster mode")
        return TierqClusterPipeline(self, transaction)  # type: ignore[abstract] # as redis-py does


class TierqClusterPipeline(ClusterPipeline):
    """See the module doc."""

    cluster_client: TierqCluster

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        return self.execute_command("EVALSHA", sha, numkeys, *keys_and_args)

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> Any:
        gate = self.cluster_client.gate
        token = await gate.enter() if gate is not None else None
        try:
            return await super().execute(raise_on_error, allow_redirections)
        finally:
            if gate is not None:
                gate.leave(token)


def cluster_client(
    url: str, *, permits: int | None = None, wait_s: float = 10.0, **options: Any
) -> aioredis.Redis:
    """A :class:`TierqCluster` from ``url`` (any node; the others are discovered), typed as
    ``Redis`` for the code that uses it (the commands tierq sends work on both). ``permits``:
    see the module doc (``None``: no bound but redis-py's ``max_connections`` per node)."""
    if permits is not None:
        options["max_connections"] = permits + SPARE_CONNECTIONS
    client = cast(TierqCluster, TierqCluster.from_url(url, **options))
    if permits is not None:
        client.gate = _Gate(permits, wait_s)
    return cast(aioredis.Redis, client)
