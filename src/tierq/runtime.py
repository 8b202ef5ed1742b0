"""The long-lived parts one app process shares, built once at start-up (no import-time state)."""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis
from qstash import Receiver

from tierq.broker.client import QStashGateway
from tierq.config import Settings
from tierq.events.deltas import DeltaWriter
from tierq.events.hub import TailHub
from tierq.events.log import JobStore
from tierq.guards.leases import Leases
from tierq.keys import AppKeys
from tierq.ops.metrics import Metrics
from tierq.providers.registry import ProviderRegistry
from tierq.worker.cancel import CancelHub


@dataclass
class Runtime:
    settings: Settings
    redis: aioredis.Redis
    keys: AppKeys
    jobs: JobStore
    leases: Leases
    gateway: QStashGateway
    receiver: Receiver
    providers: ProviderRegistry
    cancels: CancelHub
    metrics: Metrics
    deltas: DeltaWriter
    hub: TailHub

    async def aclose_streams(self) -> None:
        """Write pending deltas and stop following logs (at shutdown)."""
        await self.deltas.stop()
        await self.hub.stop()
