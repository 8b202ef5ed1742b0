"""``tierq sim``, the smoke load test CI runs: synthetic jobs through the real worker pipeline on
real Redis, across the six queues, with guards under pressure and retries, and nothing leaked."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
import structlog
from typer.testing import CliRunner

from tierq.cli import app
from tierq.config import ModelSettings, ServiceSettings, Settings, TierLimits
from tierq.contracts import Queued
from tierq.ops import sim as sim_module
from tierq.ops.sim import (
    SimError,
    SimExit,
    SimReport,
    find_leaks,
    job_states,
    plan_jobs,
    retry_delay,
    sim_settings,
    simulate,
)
from tierq.producer.submit import resolve_tier
from tierq.queues import QueueId, queue_for
from tierq.runtime import Runtime, build_runtime
from tierq.worker.result import error_reply

ALL_QUEUES = {q.value for q in QueueId}


def tight() -> Settings:
    """Low limits, a short guard wait and a fast poll: guards wait and answer 429 a lot."""
    return Settings(
        models={"sim": ModelSettings(limits=TierLimits(paid=2, free=1))},
        user_limits=TierLimits(paid=2, free=1),
        guard_wait_s=0.2,
        guard_poll_s=0.01,
        guard_retry_after_s=1,
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
    assert report.leaks.keys_checked == 6 + 6 + 2 + report.users  # admission, running, model, user
    assert report.replies["200"] == jobs
    assert report.deliveries == jobs + report.retries
    assert set(report.per_queue) == ALL_QUEUES
    assert all(s.completed > 0 for s in report.per_queue.values())
    assert sum(report.completed_per_queue.values()) == jobs
    assert report.throughput_jobs_s > 0
    assert report.run_ms.p50_ms is not None
    assert report.run_ms.p99_ms is not None
    assert report.run_ms.p50_ms <= report.run_ms.p99_ms


async def test_tight_limits_wait_retry_and_complete_every_job_without_leaks(
    redis_url: str,
) -> None:
    report = await run(tight(), redis_url, jobs=200, token_latency_ms=2.0)
    assert_clean(report, 200)
    assert report.guard_waits > 0
    assert report.guard_waits == sum(report.guard_waits_by_guard.values())
    assert report.rejections_429 > 0  # some waits ran out: 429, retried, then completed
    assert report.rejections_429 == sum(report.guard_rejections.values())
    assert report.retries == report.rejections_429
    client = aioredis.Redis.from_url(redis_url)
    try:  # the run deleted its own keys
        assert [k async for k in client.scan_iter(match=report.key_prefix + ":*")] == []
    finally:
        await client.aclose()


async def test_jobs_that_fail_once_are_retried_to_completion(redis_url: str) -> None:
    report = await run(Settings(), redis_url, jobs=100, fail_rate=0.2, seed=7)
    assert_clean(report, 100)
    assert report.attempt_failures == 20
    assert report.replies.get("500") == 20
    assert report.retries >= 20


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


# -- the leak detector, the job mix, the arguments ----------------------------------------------


@pytest.fixture
async def rt(redis_url: str) -> AsyncIterator[Runtime]:
    client = aioredis.Redis.from_url(redis_url)
    runtime = build_runtime(sim_settings(Settings(), redis_url), client)
    yield runtime
    await runtime.aclose_streams()
    await runtime.gateway.qstash.http._client.aclose()
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


def test_retry_delay_honours_retry_after_up_to_the_cap() -> None:
    assert retry_delay(error_reply(500, "x", "y")) == sim_module.RETRY_DELAY_S
    assert retry_delay(error_reply(429, "x", "y", {"Retry-After": "0"})) == 0
    assert retry_delay(error_reply(429, "x", "y", {"Retry-After": "5"})) == (
        sim_module.RETRY_AFTER_CAP_S
    )


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
                 "deliveries", "rejections_429", "guard_waits", "per_queue",
                 "completed_per_queue", "run_ms", "latency_ms", "leaks"):  # fmt: skip
        assert name in report, name
    assert report["jobs"] == report["completed"] == 50
    assert report["attempt_failures"] == 5
    assert set(report["completed_per_queue"]) == ALL_QUEUES
    assert report["leaks"]["total"] == 0
    assert set(report["run_ms"]) == {"p50_ms", "p99_ms"}


def test_cli_exits_with_leaks_when_something_leaked(
    cli: CliRunner, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = sim_module.simulate

    async def leaky(*args: Any, **kwargs: Any) -> SimReport:
        report = await real(*args, **kwargs)
        report.leaks.leases["tq:guard:model:sim:paid"] = 1
        return report

    monkeypatch.setattr(sim_module, "simulate", leaky)
    result = cli.invoke(app, ["sim", "--jobs", "6", "--redis-url", redis_url])
    assert result.exit_code == SimExit.LEAKS == 6, result.output
    assert "tq:guard:model:sim:paid: 1 live lease" in result.stdout
    assert "1 leak(s) found" in result.stderr


def test_cli_names_an_unreachable_redis(cli: CliRunner) -> None:
    result = cli.invoke(app, ["sim", "--jobs", "1", "--redis-url", "redis://127.0.0.1:1/0"])
    assert result.exit_code == 3, result.output
    assert "unreachable" in result.stderr
