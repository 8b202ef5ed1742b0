"""The six named queues and the routing table: tier x experience → queue → worker route."""

from __future__ import annotations

import enum
import zlib
from typing import Literal

Tier = Literal["paid", "free"]
Experience = Literal["stream", "batch", "vision"]
Mode = Literal["auto", "paid", "free"]
WorkerKind = Literal["stream", "batch"]
Plan = Literal["paid", "free"]

TIERS: tuple[Tier, ...] = ("paid", "free")
EXPERIENCES: tuple[Experience, ...] = ("stream", "batch", "vision")


class QueueId(enum.StrEnum):
    PAID_STREAM = "q_paid_stream"
    FREE_STREAM = "q_free_stream"
    PAID_BATCH = "q_paid_batch"
    FREE_BATCH = "q_free_batch"
    PAID_VISION = "q_paid_vision"
    FREE_VISION = "q_free_vision"


def queue_for(tier: Tier, experience: Experience) -> QueueId:
    return QueueId(f"q_{tier}_{experience}")


def worker_kind(experience: Experience) -> WorkerKind:
    """Stream jobs go to the stream worker; batch and vision share the batch worker."""
    return "stream" if experience == "stream" else "batch"


def worker_path(experience: Experience, service: str) -> str:
    return f"/api/worker/{worker_kind(experience)}/{service}"


def legacy_path(tier: Tier, experience: Experience, service: str) -> str:
    return f"/api/worker/{tier}/{experience}/{service}"


def unified_bucket(job_id: str) -> int:
    """The job's rollout bucket, 0-99: the same for a job wherever and whenever it is asked."""
    return zlib.crc32(job_id.encode()) % 100


def delivery_path(
    job_id: str, tier: Tier, experience: Experience, service: str, unified_share: int
) -> str:
    """Where the job's deliveries go: the unified route of its experience for a job whose
    bucket is under ``unified_share`` (percent), else the legacy route of its tier."""
    if unified_bucket(job_id) < unified_share:
        return worker_path(experience, service)
    return legacy_path(tier, experience, service)


def parse_queue(queue_id: QueueId) -> tuple[Tier, Experience]:
    _, tier, experience = queue_id.value.split("_")
    return tier, experience  # type: ignore[return-value]
