"""Keep a running job's leases alive; runs beside the job and is cancelled at cleanup."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from tierq.errors import UpstreamError
from tierq.guards.leases import Leases

log = structlog.get_logger("tierq.guards")


async def heartbeat(
    leases: Leases,
    held: list[tuple[str, str]],
    ttl_s: float,
    every_s: float,
    on_lost: Callable[[str], None] | None,
) -> None:
    """Renew every held lease every ``every_s`` until cancelled; ``on_lost(key)`` when one is
    gone. A Redis hiccup is logged and retried at the next beat (the TTL leaves room for it)."""
    while True:
        await asyncio.sleep(every_s)
        for key, holder in held:
            try:
                alive = await leases.renew(key, holder, ttl_s)
            except UpstreamError as exc:
                log.warning("heartbeat.renew_failed", key=key, error=str(exc))
                continue
            if not alive and on_lost is not None:
                on_lost(key)
