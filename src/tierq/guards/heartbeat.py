"""Keep a running job's leases alive: a sibling task of the job, cancelled at cleanup."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from tierq.aio import raise_if_cancelled, ticks
from tierq.errors import UpstreamError
from tierq.guards.leases import Leases

log = structlog.get_logger("tierq.guards")

Held = list[tuple[str, str]]


async def heartbeat(
    leases: Leases,
    held: Held,
    ttl_s: float,
    every_s: float,
    on_lost: Callable[[str], None] | None = None,
    first_s: float | None = None,
) -> None:
    """Renew every ``(key, holder)`` lease in ``held`` to ``ttl_s`` every ``every_s`` seconds
    (the first renewal comes after ``first_s``, by default one interval) until cancelled.

    When a renewal reports a lease lost, ``on_lost(key)`` is called once for it (in this task;
    it must not raise) and that lease is no longer renewed; once every lease is lost the
    coroutine returns. A Redis failure is logged and retried at the next beat, which the TTL
    leaves room for. ``ValueError`` unless ``0 < every_s < ttl_s``. ``held`` is not modified.
    """
    if not 0 < every_s < ttl_s:
        raise ValueError(f"heartbeat needs 0 < every_s < ttl_s, got {every_s!r}, {ttl_s!r}")
    live = list(held)
    if not live:
        return
    async for _ in ticks(every_s, first_s):
        live = await _beat(leases, live, ttl_s, on_lost)
        raise_if_cancelled()  # cancelled at cleanup, even through redis-py
        if not live:
            return


async def _beat(
    leases: Leases, live: Held, ttl_s: float, on_lost: Callable[[str], None] | None
) -> Held:
    """Renew all ``live`` leases concurrently; the ones still held."""
    results = await asyncio.gather(*(_renew(leases, key, h, ttl_s) for key, h in live))
    kept: Held = []
    for lease, alive in zip(live, results, strict=True):
        if alive:
            kept.append(lease)
        elif on_lost is not None:
            on_lost(lease[0])
    return kept


async def _renew(leases: Leases, key: str, holder: str, ttl_s: float) -> bool:
    """``False`` only when Redis says the lease is lost; a failed call counts as still held."""
    try:
        return await leases.renew(key, holder, ttl_s)
    except UpstreamError as exc:
        log.warning("heartbeat.renew_failed", key=key, holder=holder, error=str(exc))
        return True
