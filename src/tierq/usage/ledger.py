"""The usage ledger: per user and per model, per UTC day (months are sums of days), how many
jobs ended, their prompt and completion tokens, run seconds and failures. Durable in Redis for
``usage_retention_days``; written in the round trip that ends each attempt (one script call on
the day's hash), read by ``GET /api/usage``, ``/api/admin/usage`` and ``tierq usage``.

One hash per day, ``<prefix>:usage:{<YYYYMMDD>}``: field ``<user>\\t<model>``, value
``"jobs prompt completion run_ms failures"``. A job counts once, when it ends (completed,
failed for good, or cancelled); tokens and run time count for every attempt.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from tierq.errors import UpstreamError
from tierq.keys import AppKeys

EXPIRY_RESEND_S = 60.0
"""How often a process sends a day's ledger expiry again (it is the same for every row)."""

By = Literal["day", "month"]
MAX_DAYS = 400
"""Days one read may cover."""


@dataclass
class Usage:
    jobs: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    run_ms: int = 0
    failures: int = 0

    def add(self, other: Usage) -> None:
        self.jobs += other.jobs
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.run_ms += other.run_ms
        self.failures += other.failures

    def view(self) -> dict[str, Any]:
        return {
            "jobs": self.jobs,
            "promptTokens": self.prompt_tokens,
            "completionTokens": self.completion_tokens,
            "runSeconds": round(self.run_ms / 1000, 3),
            "failures": self.failures,
        }


@dataclass
class Row:
    period: str
    user_id: str
    model_id: str
    usage: Usage = field(default_factory=Usage)

    def view(self) -> dict[str, Any]:
        return {"period": self.period, "userId": self.user_id, "modelId": self.model_id,
                **self.usage.view()}  # fmt: skip


def day_of(ms: int) -> dt.date:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).date()


def days_between(start: dt.date, end: dt.date) -> list[dt.date]:
    count = (end - start).days + 1
    return [start + dt.timedelta(days=i) for i in range(max(0, count))]


class Ledger:
    def __init__(
        self, client: aioredis.Redis, keys: AppKeys, retention_days: int, enabled: bool = True
    ) -> None:
        self.r = client
        self.keys = keys
        self.enabled = enabled
        self.retention_ms = retention_days * 86_400_000
        lua = resources.files("tierq.usage") / "lua"
        self.script = client.register_script((lua / "record.lua").read_text())
        self._expiry_sent: tuple[str, float] = ("", 0.0)  # day key, when its expiry went

    def _key(self, day: dt.date) -> str:
        return f"{self.keys.prefix}:usage:{{{day:%Y%m%d}}}"

    def queue_record(
        self,
        pipe: Any,
        user_id: str,
        model_id: str,
        at_ms: int,
        *,
        jobs: int = 0,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        run_ms: int = 0,
        failures: int = 0,
    ) -> None:
        """Add to the (user, model) row of the day of ``at_ms`` (UTC), on ``pipe`` (by sha:
        the pipeline's runner loads scripts Redis forgot); nothing when the ledger is off."""
        if not self.enabled:
            return
        day = day_of(at_ms)
        start = dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)
        forget_at = int(start.timestamp() * 1000) + 86_400_000 + self.retention_ms
        key = self._key(day)
        # the day's expiry is the same for every row: sent at most once a minute per process
        # (one command less per job; a write whose pipeline failed is made good within that)
        now = time.monotonic()
        sent_key, sent_at = self._expiry_sent
        if key == sent_key and now - sent_at < EXPIRY_RESEND_S:
            forget_at = 0
        else:
            self._expiry_sent = (key, now)
        pipe.evalsha(
            self.script.sha, 1, key, f"{user_id}\t{model_id}",
            jobs, prompt_tokens, completion_tokens, run_ms, failures, forget_at,
        )  # fmt: skip

    async def rows(
        self,
        start: dt.date,
        end: dt.date,
        *,
        by: By = "day",
        users: Iterable[str] | None = None,
        models: Iterable[str] | None = None,
    ) -> list[Row]:
        """The ledger from ``start`` to ``end`` (UTC days, both included), one row per period
        (day, or month) and (user, model), filtered to ``users`` and ``models`` when given."""
        days = days_between(start, end)[:MAX_DAYS]
        want_users = set(users) if users is not None else None
        want_models = set(models) if models is not None else None
        try:
            pipe = self.r.pipeline(transaction=False)
            for day in days:
                pipe.hgetall(self._key(day))
            hashes: Sequence[dict[Any, Any]] = await pipe.execute()
        except RedisError as exc:
            raise UpstreamError(f"redis: {exc}") from exc
        out: dict[tuple[str, str, str], Row] = {}
        for day, found in zip(days, hashes, strict=True):
            period = f"{day:%Y-%m}" if by == "month" else day.isoformat()
            for raw_field, raw_value in found.items():
                user, _, model = _s(raw_field).partition("\t")
                if want_users is not None and user not in want_users:
                    continue
                if want_models is not None and model not in want_models:
                    continue
                numbers = [int(n) for n in _s(raw_value).split()] + [0] * 5
                row = out.setdefault((period, user, model), Row(period, user, model))
                row.usage.add(Usage(*numbers[:5]))
        return sorted(out.values(), key=lambda r: (r.period, r.user_id, r.model_id))


def totals(rows: Iterable[Row]) -> Usage:
    total = Usage()
    for row in rows:
        total.add(row.usage)
    return total


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
