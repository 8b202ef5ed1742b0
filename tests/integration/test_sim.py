"""``tierq sim``, the smoke load test CI runs: synthetic jobs submitted through the real producer,
dispatched by the real fair dispatcher and run by the real worker pipeline on real Redis, with
QStash's queues played in memory; across the six queues, with guards under pressure, retries,
and nothing leaked."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, cast

import pytest
import redis.asyncio as aioredis
import structlog
from typer.testing import CliRunner

from tierq.cli import app
from tierq.config import ModelSettings, QueueSettings, ServiceSettings, Settings, TierLimits
from tierq.contracts import JobInput, Queued, WorkerBody
from tierq.keys import AppKeys
from tierq.ops import sim as sim_module
from tierq.ops.sim import (
    SimError,
    SimExit,
    SimGateway,
    SimReport,
    find_leaks,
    job_states,
    plan_jobs,
    retry_delay,
    sim_settings,
    simulate,
)
from tierq.producer.submit import resolve_tier
from tierq.queues import QueueId, WorkerKind, queue_for
from tierq.runtime import Runtime, build_runtime
from tierq.worker.result import Reply, done, error_reply, non_retryable

ALL_QUEUES = {q.value for q in QueueId}


def tight() -> Settings:
    """Low limits: most jobs are parked at submit, and retries find the guards full."""
    return Settings(
        models={"sim": ModelSettings(limits=TierLimits(paid=2, free=1))},
        user_limits=TierLimits(paid=2, free=1),
        qstash_retries=20,
    )


async def run(settings: Settings, redis_url: str, **overrides: Any) -> SimReport:
    args: dict[str, Any] = {
        "jobs": 200, "users": 20, "concurrency": 64, "token_latency_ms": 0.0, "tokens": 8,
        "fail_rate": 0.0, "seed": 1,
    }  # fmt: skip
    return await simulate(settings, redis_url, **(args | overrides))


def assert_clean(report: SimReport, jobs: int) -> None:
    assert report.completed == jobs, report.to_json()
    assert report.failed == report.cancelled == report.dead_lettered == 0
    assert report.not_admitted == report.delivery_errors == 0
    assert report.leaks.total == 0, report.leaks
    # admission and dispatch slots per queue, each user's share of each queue, model per tier,
    # user
    assert report.leaks.keys_checked == 6 * 2 + 6 * report.users + 2 + report.users
    # a failed attempt is answered 500 and retried once by QStash; everything else is a 200
    assert report.replies.get("500", 0) == report.retries == report.attempt_failures
    assert report.replies.get("200", 0) + report.retries == report.deliveries
    assert report.rejections_429 == 0  # full guards park jobs: nothing answers 429 any more
    # every delivery is of a message the dispatcher published, or a QStash retry of one
    assert report.deliveries == report.dispatched - report.deduplicated + report.retries
    # each job was published once, and once more each time a delivery parked it again
    assert report.dispatched == jobs + report.guard_waits
    assert report.guard_waits == sum(report.guard_waits_by_guard.values())
    assert report.parked == sum(report.parked_by_reason.values())
    assert set(report.per_queue) == ALL_QUEUES
    assert all(s.completed > 0 for s in report.per_queue.values())
    assert sum(report.completed_per_queue.values()) == jobs
    assert report.throughput_jobs_s > 0
    assert report.run_ms.p50_ms is not None
    assert report.run_ms.p99_ms is not None
    assert report.run_ms.p50_ms <= report.run_ms.p99_ms


async def test_tight_limits_park_retry_and_complete_every_job_without_leaks(
    redis_url: str,
) -> None:
    report = await run(tight(), redis_url, jobs=200, token_latency_ms=2.0, fail_rate=0.2)
    assert_clean(report, 200)
    assert report.parked > 0  # held at submit by a full guard
    assert report.guard_waits > 0  # QStash retries that found their guards taken: parked again
    assert report.attempt_failures == report.retries == report.replies["500"] == 40
    client = aioredis.Redis.from_url(redis_url)
    try:  # the run deleted its own keys
        assert [k async for k in client.scan_iter(match=report.key_prefix + ":*")] == []
    finally:
        await client.aclose()


async def test_jobs_pass_through_the_dispatcher_which_holds_the_model_to_its_limit(
    redis_url: str,
) -> None:
    """One run at a time per tier of the one model: the rest are parked and dispatched as runs
    end; nothing is left parked, every job completes, and runs of a tier never overlap."""
    settings = Settings(models={"sim": ModelSettings(limits=TierLimits(paid=1, free=1))})
    report = await run(settings, redis_url, jobs=36, users=4, token_latency_ms=1.0,
                       keep_keys=True)  # fmt: skip
    assert_clean(report, 36)
    assert report.parked_by_reason.get("model", 0) > 0, report.parked_by_reason
    assert report.leaks.parked == {}
    assert report.leaks.dispatching == 0
    keys = AppKeys(report.key_prefix)
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        found = [k async for k in client.scan_iter(match=report.key_prefix + ":job:*")]
        records = [await client.hgetall(k) for k in found if not k.endswith(":events")]
        assert len(records) == 36
        for tier in ("paid", "free"):
            runs = sorted(
                (int(r["startedAt"]), int(r["finishedAt"])) for r in records if r["tier"] == tier
            )
            assert runs
            for (_, finished), (started, _) in itertools.pairwise(runs):
                assert started >= finished, f"{tier}: two runs of a limit-1 model overlapped"
        assert set((await client.hgetall(keys.parked_counts)).values()) <= {"0"}
        await client.unlink(*[k async for k in client.scan_iter(match=report.key_prefix + ":*")])
    finally:
        await client.aclose()


async def test_a_full_queue_or_user_share_is_retried_until_every_job_is_admitted(
    redis_url: str,
) -> None:
    queues = {q: QueueSettings(parallelism=2, admission_depth=3) for q in QueueId}
    settings = Settings(queues=queues, user_queue_limits=TierLimits(paid=1, free=1))
    report = await run(settings, redis_url, jobs=60, users=4, token_latency_ms=1.0)
    assert_clean(report, 60)
    assert report.admission_rejections > 0


def pin_sim_settings(monkeypatch: pytest.MonkeyPatch) -> Callable[[Settings, str], Settings]:
    """Make every sim run use the settings of the first one (so a test can prepare its keys
    before the run); returns the pinned ``sim_settings``."""
    real = sim_module.sim_settings
    chosen: list[Settings] = []

    def fixed(settings: Settings, url: str) -> Settings:
        if not chosen:
            chosen.append(real(settings, url))
        return chosen[0]

    monkeypatch.setattr(sim_module, "sim_settings", fixed)
    return fixed


async def test_jobs_whose_share_is_held_for_good_are_given_up_and_the_lease_reported(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lease no job of the run holds fills q_free_vision: its jobs are not admitted (nothing
    could free the share), the others complete, and the lease is reported."""
    fixed = pin_sim_settings(monkeypatch)
    queues = {q: QueueSettings(parallelism=2, admission_depth=1) for q in QueueId}
    cfg = fixed(Settings(queues=queues), redis_url)
    client = aioredis.Redis.from_url(redis_url)
    ghost = AppKeys(cfg.key_prefix).admission(QueueId.FREE_VISION.value)
    rt = build_runtime(cfg, client)
    try:
        await rt.leases.acquire(ghost, "job_ghost", 1, 3600)
        report = await run(Settings(queues=queues), redis_url, jobs=12, users=2)
    finally:
        await rt.gateway.aclose()
        await client.aclose()
    assert report.not_admitted == 2  # the two q_free_vision jobs
    assert report.completed == 10
    assert report.per_queue[QueueId.FREE_VISION.value].jobs == 0
    assert report.leaks.leases == {ghost: 1}
    assert report.leaks.total == 1


async def test_jobs_stuck_parked_are_reported_once_nothing_moves(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model guard filled by a lease no job of the run holds: the free tier's jobs stay
    parked (and, one job admitted per queue, the next ones wait for admission); the run stops
    waiting after its settle timeout, and reports them."""
    fixed = pin_sim_settings(monkeypatch)
    settings = Settings(
        models={"sim": ModelSettings(limits=TierLimits(paid=4, free=1))},
        queues={q: QueueSettings(parallelism=2, admission_depth=1) for q in QueueId},
    )
    cfg = fixed(settings, redis_url)
    client = aioredis.Redis.from_url(redis_url)
    ghost = AppKeys(cfg.key_prefix).model_guard("sim", "free")
    rt = build_runtime(cfg, client)
    try:
        await rt.leases.acquire(ghost, "job_ghost", 1, 3600)
        report = await run(settings, redis_url, jobs=24, users=2, settle_timeout_s=0.5)
    finally:
        await rt.gateway.aclose()
        await client.aclose()
    free = [q.value for q in QueueId if "free" in q.value]
    assert report.completed == 12  # the paid tier's
    assert [report.per_queue[q].jobs for q in free] == [1, 1, 1]  # admitted, parked for good
    assert report.not_admitted == 9  # the free jobs still waiting for admission at the end
    assert report.leaks.stuck_jobs == 3
    assert report.leaks.parked == dict.fromkeys(sorted(free), 1)
    held = report.leaks.leases
    assert held[ghost] == 1
    shares = {AppKeys(cfg.key_prefix).admission(q) for q in free}
    shares |= {AppKeys(cfg.key_prefix).user_pending(q, "sim-user-1") for q in free}
    assert set(held) == {ghost} | shares  # the parked jobs keep their admission, rightly
    assert report.leaks.total == 3 + 3 + sum(held.values())
    assert "LEAKS" in sim_module.format_report(report)


async def test_jobs_that_fail_once_are_retried_to_completion(redis_url: str) -> None:
    report = await run(Settings(), redis_url, jobs=100, fail_rate=0.2, seed=7)
    assert_clean(report, 100)
    assert report.attempt_failures == 20
    assert report.replies.get("500") == 20
    assert report.retries == 20


async def test_a_run_can_keep_its_keys(redis_url: str) -> None:
    report = await run(Settings(), redis_url, jobs=12, keep_keys=True)
    assert_clean(report, 12)
    client = aioredis.Redis.from_url(redis_url)
    try:
        keys = [k async for k in client.scan_iter(match=report.key_prefix + ":*")]
        assert len(keys) >= 2 * 12  # each job's record and event log
        await client.unlink(*keys)
    finally:
        await client.aclose()


# -- the in-memory QStash ---------------------------------------------------------------------


async def test_the_gateway_plays_qstash_queues(monkeypatch: pytest.MonkeyPatch) -> None:
    """FIFO per queue within its parallelism, a message keeping its slot through its retries,
    deduplication, cancel, dead letters, and exceptions answered as the app would."""
    calls: list[tuple[str, str, str, str, int]] = []
    running = most = 0

    async def deliver(
        rt: Runtime, raw: bytes, route: WorkerKind, service: str, message_id: str, retried: int
    ) -> Reply:
        nonlocal running, most
        running += 1
        most = max(most, running)
        try:
            body = raw.decode()
            calls.append((body, route, service, message_id, retried))
            await asyncio.sleep(0.01)
            if body == "a" and retried == 0:
                return error_reply(500, "boom", "once", {"Retry-After": "0"})
            if body == "c":
                return non_retryable("bad", "never")
            if body == "e":
                raise RuntimeError("bug")
            return done("completed")
        finally:
            running -= 1

    monkeypatch.setattr(sim_module, "run_delivery", deliver)
    settings = Settings(queues={q: QueueSettings(parallelism=1, admission_depth=9)
                                for q in QueueId})  # fmt: skip
    gateway = SimGateway(settings, concurrency=8)
    gateway.attach(cast(Runtime, object()))
    try:
        await gateway.sync_queues()
        q, url = QueueId.PAID_BATCH.value, "http://tierq.test/api/worker/batch/chat"
        a = await gateway.publish_raw(q, url, "a", 3, dedup_id="job_a")
        assert await gateway.publish_raw(q, url, "a", 3, dedup_id="job_a") == a
        for body in "bcde":
            message = await gateway.publish_raw(q, url, body, 1)
            if body == "d":
                await gateway.cancel(message)  # not delivered yet: dropped
        await gateway.publish_raw(QueueId.FREE_STREAM.value, "http://t/api/worker/stream/x", "s", 0)
        await gateway.wait_idle(5)
        assert gateway.idle
    finally:
        await gateway.aclose()
    in_q = [(body, retried) for body, route, *_, retried in calls if route == "batch"]
    assert in_q == [("a", 0), ("a", 1), ("b", 0), ("c", 0), ("e", 0), ("e", 1)]
    assert ("s", "stream", "x") in [c[:3] for c in calls]
    assert {c[3] for c in calls if c[0] == "a"} == {a}
    assert most == 2  # one per queue: each queue has parallelism 1
    assert gateway.published == 6
    assert (gateway.deduplicated, gateway.cancelled, gateway.dead_lettered) == (1, 1, 2)
    assert (gateway.deliveries, gateway.retries, gateway.delivery_errors) == (7, 2, 2)
    assert gateway.replies == {500: 3, 200: 3, 489: 1}


# -- the leak detector, the job mix, the arguments ----------------------------------------------


@pytest.fixture
async def rt(redis_url: str) -> AsyncIterator[Runtime]:
    client = aioredis.Redis.from_url(redis_url)
    runtime = build_runtime(sim_settings(Settings(), redis_url), client)
    yield runtime
    await runtime.aclose_streams()
    await runtime.gateway.aclose()
    await client.aclose()


async def test_find_leaks_reports_live_leases_and_unfinished_jobs(rt: Runtime) -> None:
    guard = rt.keys.model_guard("sim", "free")
    await rt.leases.acquire(guard, "job_a", 5, 30)
    await rt.jobs.create(
        "job_a", {}, Queued(jobId="job_a", queueId=QueueId.FREE_BATCH, tier="free")
    )
    clean = [rt.keys.user_guard("sim-user-0")]
    states = await job_states(rt, ["job_a", "job_gone"])
    leaks = await find_leaks(rt, [guard, *clean], states)
    assert leaks.leases == {guard: 1}
    assert leaks.stuck_jobs == 2
    assert leaks.stuck_job_ids == ["job_a (queued)", "job_gone (missing)"]
    assert leaks.total == 3
    await rt.leases.release(guard, "job_a")
    await rt.jobs.delete("job_a")
    assert (await find_leaks(rt, [guard], {})).total == 0


async def test_find_leaks_reports_jobs_left_parked_or_being_published(rt: Runtime) -> None:
    def body(job_id: str, queue: QueueId) -> WorkerBody:
        return WorkerBody(
            jobId=job_id, userId="sim-user-0", plan="paid", tier="paid", queueId=queue,
            modelId="sim", service="chat", experience="batch", input=JobInput(prompt="p"),
            submittedAt=0, maxRetries=1,
        )  # fmt: skip

    paused = QueueId.PAID_BATCH
    await rt.redis.hset(rt.keys.queue_state(paused.value), "paused", "1")
    held = body("job_held", paused)
    await rt.dispatcher.call_script("park", rt.dispatcher.park_args(held, "{}", "job_held"))
    sent = body("job_sent", QueueId.FREE_BATCH)  # dispatched at once, never confirmed
    await rt.dispatcher.call_script("park", rt.dispatcher.park_args(sent, "{}", "job_sent"))
    leaks = await find_leaks(rt, [], {})
    assert leaks.parked == {paused.value: 1}
    assert leaks.dispatching == 1
    assert leaks.total == 2
    await rt.dispatcher.release(held)
    await rt.dispatcher.release(sent)
    assert (await find_leaks(rt, [], {})).total == 0


def test_the_job_mix_is_deterministic_and_covers_the_six_queues() -> None:
    settings = Settings().with_dev_defaults()

    def mix(seed: int) -> list[tuple[str, str, str, bool]]:
        specs = plan_jobs(
            settings, jobs=60, users=3, tokens=4, token_latency_ms=0, fail_rate=0.25, seed=seed
        )
        rows = []
        for s in specs:
            sim = s.request.input.simulate
            assert sim is not None
            tier = resolve_tier(s.request.mode, s.user.plan)
            rows.append((queue_for(tier, s.request.experience).value, s.user.id,
                         s.request.input.prompt, sim.fail == "error"))  # fmt: skip
        return rows

    first = mix(5)
    assert first == mix(5)
    assert first != mix(6)
    assert Counter(q for q, *_ in first) == dict.fromkeys(ALL_QUEUES, 10)
    assert sum(failing for *_, failing in first) == 15
    assert {user for _, user, *_ in first} == {"sim-user-0", "sim-user-1", "sim-user-2"}
    one_user = plan_jobs(
        settings, jobs=6, users=1, tokens=1, token_latency_ms=0, fail_rate=0, seed=1
    )
    vision = [s for s in one_user if s.request.experience == "vision"]
    assert {s.request.mode for s in one_user if s.request.experience == "stream"} == {
        "auto",
        "free",
    }  # a single paid user asks for the free tier explicitly
    assert len(vision) == 2
    assert all(s.request.input.images[0].startswith("data:image/png;base64,") for s in vision)


def test_the_run_unpauses_its_queues() -> None:
    queues = {q: QueueSettings(parallelism=1, admission_depth=5, paused=True) for q in QueueId}
    cfg = sim_settings(Settings(queues=queues), "redis://127.0.0.1:1/0")
    assert not any(conf.paused for conf in cfg.queues.values())
    assert all(conf.admission_depth == 5 for conf in cfg.queues.values())


async def test_bad_arguments_and_settings_are_refused_before_touching_redis() -> None:
    unreachable = "redis://127.0.0.1:1/0"
    with pytest.raises(SimError, match="fail rate"):
        await run(Settings(), unreachable, fail_rate=1.5)
    with pytest.raises(SimError, match="jobs must be at least 1"):
        await run(Settings(), unreachable, jobs=0)
    no_vision = Settings(services={"chat": ServiceSettings(experiences=["stream", "batch"],
                                                           models=["sim"])})  # fmt: skip
    with pytest.raises(SimError, match="'vision'"):
        await run(no_vision, unreachable)


@pytest.mark.parametrize(
    ("headers", "delay"),
    [
        ({}, sim_module.RETRY_DELAY_S),  # the sim's fixed delay, not QStash's e^2.5 s
        ({"Retry-After": "0"}, 0.0),
        ({"Retry-After": "0.1"}, 0.1),
        ({"retry-after": "100ms"}, 0.1),  # a Go duration, as the broker reads it
        ({"Retry-After": "5"}, sim_module.RETRY_AFTER_CAP_S),
        ({"Retry-After": "Fri, 01 Jan 1999 00:00:00 GMT"}, 0.0),  # an HTTP date in the past
        ({"Retry-After": "soon"}, sim_module.RETRY_DELAY_S),  # unusable: the fixed delay
        ({"Retry-After": "2d"}, sim_module.RETRY_DELAY_S),  # over a day: ignored, as QStash does
        ({"x-ratelimit-reset-requests": "150ms"}, 0.15),
    ],
)
def test_retry_delay_is_the_brokers_policy_in_sim_time(
    headers: dict[str, str], delay: float
) -> None:
    for retried in (0, 3):
        got = retry_delay(error_reply(429, "x", "y", headers), retried)
        assert got == pytest.approx(delay)


# -- the command ----------------------------------------------------------------------------


@pytest.fixture
def cli() -> Iterator[CliRunner]:
    yield CliRunner()
    structlog.reset_defaults()  # the command configures logging for the whole process


def test_cli_prints_the_report_as_json(cli: CliRunner, redis_url: str) -> None:
    result = cli.invoke(
        app, ["sim", "--jobs", "50", "--json", "--redis-url", redis_url, "--fail-rate", "0.1"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    for name in ("jobs", "completed", "failed", "cancelled", "wall_s", "throughput_jobs_s",
                 "dispatched", "deliveries", "rejections_429", "parked", "parked_by_reason",
                 "guard_waits", "guard_waits_by_guard", "per_queue", "completed_per_queue",
                 "run_ms", "latency_ms", "leaks"):  # fmt: skip
        assert name in report, name
    assert "guard_rejections" not in report
    assert report["jobs"] == report["completed"] == 50
    assert report["attempt_failures"] == 5
    assert set(report["completed_per_queue"]) == ALL_QUEUES
    assert report["leaks"]["total"] == 0
    assert set(report["leaks"]) >= {"leases", "parked", "dispatching", "stuck_jobs", "total"}
    assert set(report["run_ms"]) == {"p50_ms", "p99_ms"}


def test_cli_exits_with_leaks_when_something_leaked(
    cli: CliRunner, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = sim_module.simulate

    async def leaky(*args: Any, **kwargs: Any) -> SimReport:
        report = await real(*args, **kwargs)
        report.leaks.leases["tq:{sched}:guard:model:sim:paid"] = 1
        report.leaks.parked["q_paid_batch"] = 2
        return report

    monkeypatch.setattr(sim_module, "simulate", leaky)
    result = cli.invoke(app, ["sim", "--jobs", "6", "--redis-url", redis_url])
    assert result.exit_code == SimExit.LEAKS == 6, result.output
    assert "tq:{sched}:guard:model:sim:paid: 1 live lease" in result.stdout
    assert "q_paid_batch: 2 job(s) parked" in result.stdout
    assert "3 leak(s) found" in result.stderr


def test_cli_names_an_unreachable_redis(cli: CliRunner) -> None:
    result = cli.invoke(app, ["sim", "--jobs", "1", "--redis-url", "redis://127.0.0.1:1/0"])
    assert result.exit_code == 3, result.output
    assert "unreachable" in result.stderr
