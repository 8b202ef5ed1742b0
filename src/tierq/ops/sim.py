"""``tierq sim``: drive the worker pipeline in-process with synthetic jobs, then look for leaks.

No HTTP, no broker, no QStash: each job gets its state record and admission lease the way
``producer.submit`` makes them (without publishing), and its ``WorkerBody`` JSON goes straight
to :func:`tierq.worker.pipeline.run_delivery`. The driver plays QStash's part:

- at most ``concurrency`` deliveries run at once, across all queues;
- each queue runs at most ``settings.queues[q].parallelism`` messages at once, and a message
  keeps its queue slot through its retries (QStash queues are FIFO: the next message waits
  through the current one's backoff);
- a non-2xx reply is retried while ``retried < maxRetries`` (with ``Upstash-Retried`` counting
  up), after its ``Retry-After`` capped to :data:`RETRY_AFTER_CAP_S`, or :data:`RETRY_DELAY_S`
  without one; a 489 with ``Upstash-NonRetryable-Error`` or a failure with no retries left is
  "dead-lettered" and ends the message;
- a producer whose queue is full (admission lease refused) backs off until a job of that queue
  ends, as a client honouring the ``429`` would; if nothing of that queue is in flight any more
  the job is given up and counted as ``not_admitted``. Paused queues are not honoured.

Jobs go round-robin over the six queues (paid/free x stream/batch/vision), in a shuffled order,
from users ``sim-user-0..N-1`` (even ids on the paid plan, odd ids on the free plan). The
services and models come from the settings: each experience needs a service offering it on a
``simulated`` model (the dev defaults have ``chat``/``describe`` on ``sim``). ``fail_rate`` of the
jobs fail their first attempt with a retryable error and succeed on the retry.

Afterwards every lease key the run could have touched (admission and running per queue, model
per tier, user per sim user) must hold no live lease, and every admitted job must be in a
terminal state; anything else is reported as a leak. Each run uses its own key prefix and, unless
``keep_keys``, deletes its keys at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import math
import random
import secrets
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from tierq.config import Settings, UserSettings
from tierq.contracts import (
    TERMINAL_STATUSES,
    JobInput,
    JobRequest,
    Queued,
    Simulate,
    WorkerBody,
)
from tierq.errors import ClientError, UpstreamError
from tierq.observability.metrics import Metrics
from tierq.producer.submit import check_registry, job_records, new_job_id, resolve_tier
from tierq.queues import (
    EXPERIENCES,
    TIERS,
    Experience,
    Mode,
    QueueId,
    WorkerKind,
    queue_for,
    worker_kind,
)
from tierq.runtime import Runtime, build_runtime
from tierq.worker.pipeline import run_delivery
from tierq.worker.result import Reply, error_reply

log = structlog.get_logger("tierq.sim")

RETRY_DELAY_S = 0.05
"""Delay before retrying a failed delivery that gave no ``Retry-After`` (sim time)."""
RETRY_AFTER_CAP_S = 0.2
"""A ``Retry-After`` is honoured up to this many seconds (sim time; QStash would wait it all)."""
ADMISSION_POLL_S = 1.0
"""A producer refused admission tries again when a job of its queue ends, or after this."""
SIM_USER_PREFIX = "sim-user-"
MAX_STUCK_IDS = 20
TINY_PNG = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9Q"
    "DwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
"""A 1x1 PNG as a data URI: the image every synthetic vision job carries."""


class SimExit(enum.IntEnum):
    """Exit code of ``tierq sim`` beyond the CLI's common ones (0-5 are taken)."""

    LEAKS = 6


class SimError(ValueError):
    """The run cannot start: bad arguments or a configuration the sim cannot drive."""


# -- the report -----------------------------------------------------------------------------


@dataclass
class Percentiles:
    p50_ms: float | None = None
    p99_ms: float | None = None


@dataclass
class QueueStats:
    jobs: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0


@dataclass
class Leaks:
    """What a finished run left behind: live leases per key, and jobs not in a terminal state."""

    leases: dict[str, int] = field(default_factory=dict)
    stuck_jobs: int = 0
    stuck_job_ids: list[str] = field(default_factory=list)
    keys_checked: int = 0

    @property
    def total(self) -> int:
        return sum(self.leases.values()) + self.stuck_jobs


@dataclass
class SimReport:
    jobs: int
    completed: int
    failed: int
    cancelled: int
    dead_lettered: int
    """Messages QStash would have moved to the DLQ (489, or retries used up)."""
    not_admitted: int
    wall_s: float
    throughput_jobs_s: float
    """Completed jobs per wall-clock second."""
    deliveries: int
    retries: int
    replies: dict[str, int]
    """Delivery replies by HTTP status."""
    rejections_429: int
    guard_waits: int
    guard_waits_by_guard: dict[str, int]
    guard_rejections: dict[str, int]
    attempt_failures: int
    admission_rejections: int
    delivery_errors: int
    """Deliveries that raised instead of answering (answered 500/503 here, as the app would)."""
    per_queue: dict[str, QueueStats]
    run_ms: Percentiles
    """Start of the last run to the terminal event, completed jobs."""
    latency_ms: Percentiles
    """Admission to the terminal event, completed jobs."""
    leaks: Leaks
    seed: int
    users: int
    concurrency: int
    key_prefix: str

    @property
    def completed_per_queue(self) -> dict[str, int]:
        return {q: s.completed for q, s in self.per_queue.items()}

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["leaks"]["total"] = self.leaks.total
        data["completed_per_queue"] = self.completed_per_queue
        return data

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def format_report(r: SimReport) -> str:
    """The report for people (``--json`` prints :meth:`SimReport.to_json`)."""
    replies = "  ".join(f"{k}: {v}" for k, v in sorted(r.replies.items()))
    by_guard = ", ".join(f"{k} {v}" for k, v in sorted(r.guard_waits_by_guard.items()))
    rejected = ", ".join(f"{k} {v}" for k, v in sorted(r.guard_rejections.items()))
    lines = [
        f"sim: {r.jobs} jobs in {r.wall_s:.2f} s ({r.throughput_jobs_s:.1f} jobs/s), "
        f"{r.deliveries} deliveries ({r.retries} retries)",
        f"  completed {r.completed}  failed {r.failed}  cancelled {r.cancelled}  "
        f"dead-lettered {r.dead_lettered}  not admitted {r.not_admitted}",
        f"  replies    {replies}",
        f"  guards     waits {r.guard_waits} ({by_guard}); 429s ({rejected})",
        f"  attempts   {r.attempt_failures} failed and retried; {r.delivery_errors} raised",
        f"  admission  {r.admission_rejections} refused (queue full)",
        f"  run time   p50 {_ms(r.run_ms.p50_ms)}  p99 {_ms(r.run_ms.p99_ms)}",
        f"  latency    p50 {_ms(r.latency_ms.p50_ms)}  p99 {_ms(r.latency_ms.p99_ms)}",
        f"  {'queue':<15} {'jobs':>6} {'completed':>10} {'failed':>7} {'cancelled':>10}",
    ]
    for queue, s in r.per_queue.items():
        lines.append(f"  {queue:<15} {s.jobs:>6} {s.completed:>10} {s.failed:>7} {s.cancelled:>10}")
    if r.leaks.total:
        held = sum(r.leaks.leases.values())
        lines.append(f"  LEAKS      {held} live lease(s), {r.leaks.stuck_jobs} job(s) not terminal")
        lines += [f"    {key}: {n} live lease(s)" for key, n in r.leaks.leases.items()]
        if r.leaks.stuck_jobs:
            shown = ", ".join(r.leaks.stuck_job_ids)
            lines.append(f"    not terminal: {shown}")
    else:
        lines.append(f"  leaks      none ({r.leaks.keys_checked} lease keys checked)")
    lines.append(f"  key prefix {r.key_prefix}  seed {r.seed}")
    return "\n".join(lines)


def percentiles(values: list[float]) -> Percentiles:
    """Nearest-rank p50 and p99 (``None`` without values)."""
    if not values:
        return Percentiles()
    ordered = sorted(values)

    def rank(p: float) -> float:
        return ordered[max(0, math.ceil(p * len(ordered)) - 1)]

    return Percentiles(p50_ms=rank(0.50), p99_ms=rank(0.99))


# -- planning -------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobSpec:
    user: UserSettings
    request: JobRequest


def sim_users(count: int) -> list[UserSettings]:
    return [
        UserSettings(id=f"{SIM_USER_PREFIX}{i}", plan="paid" if i % 2 == 0 else "free")
        for i in range(count)
    ]


def _routes(settings: Settings) -> dict[Experience, tuple[str, str]]:
    """(service, model) per experience: the first service offering it on a simulated model."""
    routes: dict[Experience, tuple[str, str]] = {}
    for experience in EXPERIENCES:
        for service, offer in settings.services.items():
            model = next(
                (
                    m
                    for m in offer.models
                    if m in settings.models
                    and settings.models[m].provider == "simulated"
                    and experience in offer.experiences
                    and experience in settings.models[m].experiences
                ),
                None,
            )
            if model is not None:
                routes[experience] = (service, model)
                break
        else:
            raise SimError(
                f"no service offers {experience!r} jobs on a simulated model; the sim needs one "
                "per experience (stream, batch, vision)"
            )
    return routes


def plan_jobs(
    settings: Settings,
    *,
    jobs: int,
    users: int,
    tokens: int,
    token_latency_ms: float,
    fail_rate: float,
    seed: int,
) -> list[JobSpec]:
    """The synthetic jobs, deterministic for a seed: round-robin over the six queues, shuffled."""
    routes = _routes(settings)
    people = sim_users(users)
    paid = [u for u in people if u.plan == "paid"]
    free = [u for u in people if u.plan == "free"]
    rng = random.Random(seed)
    failing = set(rng.sample(range(jobs), round(jobs * fail_rate)))
    specs: list[JobSpec] = []
    for k in range(jobs):
        tier = TIERS[k % len(TIERS)]
        experience = EXPERIENCES[(k // len(TIERS)) % len(EXPERIENCES)]
        mode: Mode = "auto"
        if tier == "paid":
            user = rng.choice(paid)
        elif free:
            user = rng.choice(free)
        else:  # only paid users: they may ask for the free tier
            user, mode = rng.choice(paid), "free"
        service, model = routes[experience]
        simulate = Simulate(tokens=tokens, token_latency_ms=token_latency_ms)
        if k in failing:
            simulate = simulate.model_copy(update={"fail": "error", "fail_attempts": 1})
        request = JobRequest(
            service=service,
            experience=experience,
            mode=mode,
            model=model,
            input=JobInput(
                prompt=f"sim job {k} for {user.id}",
                images=[TINY_PNG] if experience == "vision" else [],
                simulate=simulate,
            ),
        )
        try:
            check_registry(settings, request)
        except ClientError as exc:
            raise SimError(f"the sim's {experience} job is not admissible: {exc.message}") from exc
        specs.append(JobSpec(user=user, request=request))
    rng.shuffle(specs)
    return specs


def _check_args(
    jobs: int, users: int, concurrency: int, tokens: int, token_latency_ms: float, fail_rate: float
) -> None:
    problems = [
        ("jobs must be at least 1", jobs < 1),
        ("users must be at least 1", users < 1),
        ("concurrency must be at least 1", concurrency < 1),
        ("tokens must be between 0 and 10000", not 0 <= tokens <= 10_000),
        ("token latency must be between 0 and 60000 ms", not 0 <= token_latency_ms <= 60_000),
        ("fail rate must be between 0 and 1", not 0 <= fail_rate <= 1),
    ]
    bad = [message for message, failed in problems if failed]
    if bad:
        raise SimError("; ".join(bad))


# -- the driver -----------------------------------------------------------------------------


@dataclass
class _Admitted:
    body: WorkerBody
    message_id: str


class _Driver:
    """Plays producer and QStash for one run; counts what happened."""

    def __init__(self, rt: Runtime, concurrency: int) -> None:
        self.rt = rt
        settings = rt.settings
        self.slots = asyncio.Semaphore(concurrency)
        self.queue_slots = {q: asyncio.Semaphore(s.parallelism) for q, s in settings.queues.items()}
        self.admission = {q: asyncio.Condition() for q in QueueId}
        self.active: Counter[QueueId] = Counter()
        self.job_ids: list[str] = []
        self.replies: Counter[int] = Counter()
        self.deliveries = 0
        self.dead_lettered = 0
        self.not_admitted = 0
        self.admission_rejections = 0
        self.delivery_errors = 0

    async def run_job(self, spec: JobSpec) -> None:
        admitted = await self._admit(spec)
        if admitted is None:
            self.not_admitted += 1
            return
        queue = admitted.body.queue_id
        try:
            async with self.queue_slots[queue]:
                await self._deliver_until_done(admitted)
        finally:
            self.active[queue] -= 1
            async with self.admission[queue]:
                self.admission[queue].notify()

    async def _admit(self, spec: JobSpec) -> _Admitted | None:
        """Like ``producer.submit``, without publishing: admission lease, then the job record."""
        rt, settings, req = self.rt, self.rt.settings, spec.request
        tier = resolve_tier(req.mode, spec.user.plan)
        queue = queue_for(tier, req.experience)
        job_id = new_job_id()
        admission_key = rt.keys.admission(queue.value)
        depth = settings.queues[queue].admission_depth
        ready = self.admission[queue]
        async with ready:
            while True:
                got = await rt.leases.acquire(
                    admission_key, job_id, depth, settings.admission_ttl_s
                )
                if got.acquired:
                    self.active[queue] += 1  # counted at once: it will free its slot
                    break
                rt.metrics.admission_rejections.labels(queue.value).inc()
                self.admission_rejections += 1
                if self.active[queue] == 0:  # nothing left that could free a slot
                    return None
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(ADMISSION_POLL_S):
                        await ready.wait()
        now_ms = int(time.time() * 1000)
        message_id = "msg_sim_" + secrets.token_hex(12)
        body, fields = job_records(job_id, spec.user, tier, req, now_ms, settings.qstash_retries)
        fields["messageId"] = message_id
        try:
            await rt.jobs.create(
                job_id, fields, Queued(jobId=job_id, ts=now_ms, queueId=queue, tier=tier)
            )
        except BaseException:
            self.active[queue] -= 1
            await rt.leases.release(admission_key, job_id)
            raise
        rt.metrics.submitted.labels(queue.value).inc()
        self.job_ids.append(job_id)
        return _Admitted(body, message_id)

    async def _deliver_until_done(self, admitted: _Admitted) -> None:
        body = admitted.body
        raw = body.model_dump_json(by_alias=True).encode()
        route = worker_kind(body.experience)
        retried = 0
        while True:
            async with self.slots:
                reply = await self._deliver(raw, route, body.service, admitted.message_id, retried)
            self.deliveries += 1
            self.replies[reply.status] += 1
            if 200 <= reply.status < 300:
                return
            non_retryable = (
                reply.status == 489
                and reply.headers.get("Upstash-NonRetryable-Error", "").lower() == "true"
            )
            if non_retryable or retried >= body.max_retries:
                self.dead_lettered += 1
                log.info(
                    "sim.dead_lettered", job_id=body.job_id, status=reply.status, retried=retried
                )
                return
            retried += 1
            await asyncio.sleep(retry_delay(reply))

    async def _deliver(
        self, raw: bytes, route: WorkerKind, service: str, message_id: str, retried: int
    ) -> Reply:
        """One delivery; an exception is answered the way the app's handlers would."""
        try:
            return await run_delivery(self.rt, raw, route, service, message_id, retried)
        except (RedisError, UpstreamError) as exc:
            self.delivery_errors += 1
            log.warning("sim.delivery_error", error=str(exc))
            return error_reply(503, "unavailable", "a dependency is unavailable")
        except Exception as exc:
            self.delivery_errors += 1
            log.exception("sim.delivery_exception", error=str(exc))
            return error_reply(500, "internal_error", f"{type(exc).__name__}: {exc}")


def retry_delay(reply: Reply) -> float:
    """Seconds before the next attempt: ``Retry-After`` capped, else :data:`RETRY_DELAY_S`."""
    value = reply.headers.get("Retry-After")
    if value is None:
        return RETRY_DELAY_S
    try:
        seconds = float(value)
    except ValueError:
        return RETRY_DELAY_S
    return min(max(seconds, 0.0), RETRY_AFTER_CAP_S)


# -- leaks ----------------------------------------------------------------------------------


def lease_keys(rt: Runtime, users: list[UserSettings], models: set[str]) -> list[str]:
    """Every lease key a run with these users and models can touch."""
    keys = [rt.keys.admission(q.value) for q in QueueId]
    keys += [rt.keys.running(q.value) for q in QueueId]
    keys += [rt.keys.model_guard(m, t) for m in sorted(models) for t in TIERS]
    keys += [rt.keys.user_guard(u.id) for u in users]
    return keys


async def job_states(rt: Runtime, job_ids: list[str]) -> dict[str, dict[str, str]]:
    """State records of ``job_ids`` (pipelined; a missing job maps to ``{}``)."""
    states: dict[str, dict[str, str]] = {}
    batch = 500
    for start in range(0, len(job_ids), batch):
        chunk = job_ids[start : start + batch]
        pipe = rt.redis.pipeline(transaction=False)
        for job_id in chunk:
            pipe.hgetall(rt.keys.job(job_id))
        rows = await pipe.execute()
        for job_id, row in zip(chunk, rows, strict=True):
            states[job_id] = {_s(k): _s(v) for k, v in row.items()}
    return states


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def find_leaks(rt: Runtime, keys: list[str], states: dict[str, dict[str, str]]) -> Leaks:
    """Live leases on ``keys`` and jobs (of ``states``) not in a terminal state."""
    leaks = Leaks(keys_checked=len(keys))
    for key in keys:
        live = await rt.leases.count(key)
        if live:
            leaks.leases[key] = live
    stuck = sorted(j for j, s in states.items() if s.get("status") not in TERMINAL_STATUSES)
    leaks.stuck_jobs = len(stuck)
    leaks.stuck_job_ids = [f"{j} ({states[j].get('status') or 'missing'})" for j in stuck][
        :MAX_STUCK_IDS
    ]
    return leaks


def _counter_value(metrics: Metrics, name: str, labels: dict[str, str]) -> int:
    return int(metrics.registry.get_sample_value(f"{name}_total", labels) or 0)


async def _report(
    rt: Runtime,
    driver: _Driver,
    wall_s: float,
    *,
    jobs: int,
    users: list[UserSettings],
    models: set[str],
    concurrency: int,
    seed: int,
) -> SimReport:
    states = await job_states(rt, driver.job_ids)
    per_queue = {q.value: QueueStats() for q in QueueId}
    run: list[float] = []
    latency: list[float] = []
    statuses: Counter[str] = Counter()
    for state in states.values():
        status = state.get("status", "missing")
        statuses[status] += 1
        stats = per_queue.setdefault(state.get("queueId", "?"), QueueStats())
        stats.jobs += 1
        if status in ("completed", "failed", "cancelled"):
            setattr(stats, status, getattr(stats, status) + 1)
        if status == "completed" and "finishedAt" in state:
            finished = int(state["finishedAt"])
            if "startedAt" in state:
                run.append(finished - int(state["startedAt"]))
            if "createdAt" in state:
                latency.append(finished - int(state["createdAt"]))
    leaks = await find_leaks(rt, lease_keys(rt, users, models), states)
    m = rt.metrics
    waits = {g: _counter_value(m, "tierq_guard_waits", {"guard": g}) for g in ("user", "model")}
    rejections = {
        g: _counter_value(m, "tierq_guard_rejections", {"guard": g}) for g in ("user", "model")
    }
    attempt_failures = sum(
        _counter_value(m, "tierq_job_attempt_failures", {"queue": q.value}) for q in QueueId
    )
    completed = statuses["completed"]
    admitted = len(driver.job_ids)
    return SimReport(
        jobs=jobs,
        completed=completed,
        failed=statuses["failed"],
        cancelled=statuses["cancelled"],
        dead_lettered=driver.dead_lettered,
        not_admitted=driver.not_admitted,
        wall_s=round(wall_s, 3),
        throughput_jobs_s=round(completed / wall_s, 1) if wall_s > 0 else 0.0,
        deliveries=driver.deliveries,
        retries=driver.deliveries - admitted,
        replies={str(k): v for k, v in sorted(driver.replies.items())},
        rejections_429=driver.replies[429],
        guard_waits=sum(waits.values()),
        guard_waits_by_guard=waits,
        guard_rejections=rejections,
        attempt_failures=attempt_failures,
        admission_rejections=driver.admission_rejections,
        delivery_errors=driver.delivery_errors,
        per_queue=per_queue,
        run_ms=percentiles(run),
        latency_ms=percentiles(latency),
        leaks=leaks,
        seed=seed,
        users=len(users),
        concurrency=concurrency,
        key_prefix=rt.settings.key_prefix,
    )


async def _drop_keys(client: aioredis.Redis, prefix: str) -> None:
    pattern = "".join("\\" + c if c in "*?[]\\" else c for c in prefix) + ":*"
    batch: list[Any] = []
    async for key in client.scan_iter(match=pattern, count=1000):
        batch.append(key)
        if len(batch) >= 500:
            await client.unlink(*batch)
            batch = []
    if batch:
        await client.unlink(*batch)


# -- entry point ----------------------------------------------------------------------------


def sim_settings(settings: Settings, redis_url: str) -> Settings:
    """The run's settings: dev defaults, this Redis, a key prefix of its own."""
    prefix = f"{settings.key_prefix}-sim-{secrets.token_hex(4)}"
    return settings.with_dev_defaults().model_copy(
        update={"redis_url": redis_url, "key_prefix": prefix}
    )


async def simulate(
    settings: Settings,
    redis_url: str,
    *,
    jobs: int,
    users: int,
    concurrency: int,
    token_latency_ms: float,
    tokens: int,
    fail_rate: float,
    seed: int,
    metrics: Metrics | None = None,
    keep_keys: bool = False,
) -> SimReport:
    """Run ``jobs`` synthetic jobs through the worker pipeline against ``redis_url``.

    Raises :class:`SimError` for bad arguments or settings, :class:`UpstreamError` when Redis
    cannot be reached. Limits, queues, models and services come from ``settings``.
    """
    _check_args(jobs, users, concurrency, tokens, token_latency_ms, fail_rate)
    cfg = sim_settings(settings, redis_url)
    missing = [q.value for q in QueueId if q not in cfg.queues]
    if missing:
        raise SimError(f"settings have no queue {', '.join(missing)}")
    specs = plan_jobs(
        cfg,
        jobs=jobs,
        users=users,
        tokens=tokens,
        token_latency_ms=token_latency_ms,
        fail_rate=fail_rate,
        seed=seed,
    )
    people = sim_users(users)
    models = {spec.request.model for spec in specs}
    client = aioredis.Redis.from_url(redis_url)
    rt = build_runtime(cfg, client, metrics or Metrics())
    try:
        try:
            await client.ping()
        except (RedisError, OSError) as exc:
            raise UpstreamError(f"redis at {redis_url} is unreachable: {exc}") from exc
        await rt.cancels.start()
        try:
            driver = _Driver(rt, concurrency)
            started = time.monotonic()
            async with asyncio.TaskGroup() as group:
                for spec in specs:
                    group.create_task(driver.run_job(spec))
            wall_s = time.monotonic() - started
            return await _report(
                rt, driver, wall_s, jobs=jobs, users=people, models=models,
                concurrency=concurrency, seed=seed,
            )  # fmt: skip
        finally:
            await rt.aclose_streams()
            await rt.cancels.stop()
            if not keep_keys:
                await _drop_keys(client, cfg.key_prefix)
    finally:
        await rt.gateway.qstash.http._client.aclose()
        await client.aclose()
