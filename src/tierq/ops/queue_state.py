"""Which state a queue has: configuration seeds it, an operator's change stays.

A queue has two settings an operator may change while tierq runs, ``paused`` and
``parallelism``, and two places that apply them: QStash (what it delivers) and tierq's
dispatcher (what it publishes; an operator's change is recorded in ``AppKeys.queue_state``
and wins over the configuration there). The rule, field by field:

1. an operator's record (written by pause, resume, set-parallelism) wins;
2. else what QStash holds, when it has the queue (set in the Upstash console, or a
   configuration that changed after the queue was created);
3. else the configuration.

At start-up every app process brings both places to that state (:func:`seed`, the processes
take turns under a Redis lock): QStash is upserted where it lacks the queue or holds something
else; a value kept from QStash that differs from the configuration is recorded for the
dispatcher, as if an operator had set it, so both apply the same. A restart or a rolling
deploy therefore changes nothing an operator set. Only ``tierq queues sync``
(:func:`force_configuration`) writes the configuration over everything and forgets the
records. Every change is audited.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import structlog
from redis.exceptions import LockError, RedisError

from tierq.broker.client import QueueStatus
from tierq.errors import UpstreamError
from tierq.keys import AppKeys
from tierq.observability.logging import audit
from tierq.queues import QueueId
from tierq.runtime import Runtime

log = structlog.get_logger("tierq.ops.queues")

Source = Literal["operator", "qstash", "configuration"]
_FIELDS = ("parallelism", "paused")


def seed_lock_key(keys: AppKeys) -> str:
    """The lock start-up seeding runs under (belongs in ``AppKeys``; kept here until then)."""
    return f"{keys.prefix}:queueseed:lock"


@dataclass(frozen=True)
class QueueConf:
    """What a queue applies: at most ``parallelism`` deliveries at once, or none when
    ``paused``."""

    parallelism: int
    paused: bool

    @classmethod
    def of(cls, status: QueueStatus) -> QueueConf:
        return cls(status.parallelism, status.paused)

    def as_dict(self) -> dict[str, int | bool]:
        return {"parallelism": self.parallelism, "paused": self.paused}

    def as_record(self) -> dict[str, str]:
        """The fields as the dispatcher's record spells them."""
        return {"parallelism": str(self.parallelism), "paused": "1" if self.paused else "0"}


def recorded(record: Mapping[str, str]) -> dict[str, int | bool]:
    """An operator's record (``queue_state`` hash) as values; a field it lacks, or holds
    unreadable, is absent (as ``dispatch/lua/_lib.lua`` reads it)."""
    out: dict[str, int | bool] = {}
    par = record.get("parallelism", "")
    if par.isdigit() and int(par) >= 1:
        out["parallelism"] = int(par)
    if "paused" in record:
        out["paused"] = record["paused"] == "1"
    return out


def applied(configured: QueueConf, record: Mapping[str, str]) -> QueueConf:
    """What tierq's dispatcher applies: the record's fields over the configuration."""
    have = recorded(record)
    return QueueConf(
        int(have.get("parallelism", configured.parallelism)),
        bool(have.get("paused", configured.paused)),
    )


@dataclass(frozen=True)
class Settled:
    """What :func:`settle` decided for one queue."""

    state: QueueConf
    source: dict[str, Source]
    push: bool
    """QStash must be upserted to ``state`` (it lacks the queue or holds something else)."""
    adopt: dict[str, str]
    """Fields to record for the dispatcher: kept from QStash and unlike the configuration."""


def settle(configured: QueueConf, qstash: QueueConf | None, record: Mapping[str, str]) -> Settled:
    """The rule of this module for one queue (pure)."""
    have = recorded(record)
    values: dict[str, int | bool] = {}
    source: dict[str, Source] = {}
    for field in _FIELDS:
        if field in have:
            values[field], source[field] = have[field], "operator"
        elif qstash is not None:
            values[field], source[field] = getattr(qstash, field), "qstash"
        else:
            values[field], source[field] = getattr(configured, field), "configuration"
    state = QueueConf(int(values["parallelism"]), bool(values["paused"]))
    wanted = state.as_record()
    adopt = {
        f: wanted[f]
        for f in _FIELDS
        if source[f] == "qstash" and getattr(state, f) != getattr(configured, f)
    }
    return Settled(state, source, qstash != state, adopt)


# -- Redis and QStash ----------------------------------------------------------------------


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def records(rt: Runtime) -> dict[QueueId, dict[str, str]]:
    """The operators' records of the six queues (empty: none), in one round trip."""
    try:
        pipe = rt.redis.pipeline(transaction=False)
        for queue in QueueId:
            pipe.hgetall(rt.keys.queue_state(queue.value))
        rows = await pipe.execute()
    except RedisError as exc:
        raise UpstreamError(f"redis: {exc}") from exc
    return {
        queue: {_text(k): _text(v) for k, v in row.items()}
        for queue, row in zip(QueueId, rows, strict=True)
    }


def configured(rt: Runtime, queue: QueueId) -> QueueConf:
    conf = rt.settings.queues[queue]
    return QueueConf(conf.parallelism, conf.paused)


async def _adopt(rt: Runtime, queue: QueueId, fields: dict[str, str]) -> None:
    """Record ``fields`` unless an operator recorded them meanwhile (``HSETNX``: a change
    made while this process started is never overwritten)."""
    key = rt.keys.queue_state(queue.value)
    try:
        pipe = rt.redis.pipeline(transaction=False)
        for field, value in fields.items():
            pipe.hsetnx(key, field, value)
        await pipe.execute()
    except RedisError as exc:
        raise UpstreamError(f"redis: {exc}") from exc


async def _seed_one(
    rt: Runtime, queue: QueueId, found: QueueStatus | None, record: dict[str, str]
) -> dict[str, Any] | None:
    qstash = QueueConf.of(found) if found is not None else None
    settled = settle(configured(rt, queue), qstash, record)
    if not settled.push and not settled.adopt:
        return None
    if settled.push:
        await rt.gateway.upsert_queue(
            queue.value, parallelism=settled.state.parallelism, paused=settled.state.paused
        )
    if settled.adopt:
        await _adopt(rt, queue, settled.adopt)
    return {
        "queue": queue.value,
        "parallelism": settled.state.parallelism,
        "paused": settled.state.paused,
        "source": settled.source,
        "previous": None if qstash is None else qstash.as_dict(),
        "recorded": sorted(settled.adopt),
    }


async def seed(rt: Runtime) -> list[dict[str, Any]]:
    """Bring QStash and the dispatcher's records to the rule's state for the six queues; what
    changed, one audit record (``queue.seed``) per queue. Processes starting together take
    turns (a Redis lock); one that cannot get it within the time a pass may take skips."""
    budget_s = 2 * len(QueueId) * rt.settings.qstash_timeout_s + 5
    lock = rt.redis.lock(seed_lock_key(rt.keys), timeout=budget_s, blocking_timeout=budget_s)
    try:
        if not await lock.acquire():
            log.warning("queues.seed_skipped", reason="another process holds the seed lock")
            return []
    except (LockError, RedisError) as exc:
        raise UpstreamError(f"redis: {exc}") from exc
    try:
        found, held = await rt.gateway.list_queues(), await records(rt)
        changes = []
        for queue in rt.settings.queues:
            change = await _seed_one(rt, queue, found.get(queue.value), held[queue])
            if change is not None:
                audit("queue.seed", outcome="ok", **change)
                changes.append(change)
        return changes
    finally:
        try:
            await lock.release()
        except (LockError, RedisError) as exc:  # it expires by itself
            log.warning("queues.seed_unlock_failed", error=str(exc))


async def force_configuration(rt: Runtime) -> dict[str, dict[str, int | bool] | None]:
    """``tierq queues sync``: the configuration, written over QStash and the dispatcher's
    records for the six queues. Returns what QStash held before (``None``: no queue)."""
    before = await rt.gateway.list_queues()
    await rt.gateway.sync_queues()
    await rt.dispatcher.clear_queue_overrides()
    return {
        q.value: QueueConf.of(before[q.value]).as_dict() if q.value in before else None
        for q in rt.settings.queues
    }
