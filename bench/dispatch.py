"""Fair-dispatch benchmark of tierq on loopback: capacity use, fairness and Redis cost.

Black-box like ``bench/streaming.py``: two embedded Redis servers (the app's and the broker's),
``tierq broker`` and ``tierq serve`` as subprocesses, a fresh system (and so fresh keys) for
every run below, each with its own settings in the environment, warmed up with 16 no-op
jobs of a user of its own before it is measured. Jobs run on the simulated model, one token
of ``D`` ms each (``input.simulate``), in ``q_paid_batch`` (experience batch, mode auto, paid
plan). The client submits with at most 32 submits in flight, each submitter on a keep-alive
HTTP/1.1 connection spoken by hand (``HttpConn``: httpx cost this process 0.3-0.4 CPU-seconds of
the 2 cores in A's 20 ms run), and reads the job state records
(``status``, ``createdAt``, ``startedAt``, ``finishedAt``) straight from the app's Redis
(pipelined ``HMGET``, every 50 ms) until every job is terminal. Nothing here asserts on
timing; every wait has a deadline, and a run that runs out of time is recorded as not
finished. Every run also reports the CPU seconds of each process and of the rest of the
machine (``other_processes``: other load skews the figures), and the slot hand-off time: how
long a freed slot stays empty while jobs wait for it (the (i + limit)-th start minus the i-th
finish; release, dispatch, publish, delivery and claim, end to end), and the machine's speed
reading taken just before it (``speed_reference_ms``, see ``common.py``; larger is slower): a
20 ms job's overhead is CPU, so A's 20 ms efficiency moves with it (measured over one day:
mostly 0.82-0.91 at readings near 6 ms, 0.65-0.75 through slow spells at 11-16 ms; a reading
takes ~0.1 s, so a spell may begin or end within the run after it).

A. limited capacity: models ``m1`` and ``m2`` limited to 4 running jobs per tier, everything
   else raised (queue parallelism 64). One user submits J jobs alternating models, each of D
   ms; ideal makespan = J * D / (2 * 4). Makespan = last ``finishedAt`` - first submit start;
   efficiency = ideal / makespan (also against the measured mean run time, finishedAt -
   startedAt). Runs: D = 20 ms, J = 400 (ideal 1.0 s; target >= 80 %) and D = 500 ms, J = 80
   (ideal 5.0 s; target >= 97 %). Also the peak running jobs per model (must stay <= 4).
B. fairness, latency: queue parallelism 8, user running limit 8, a model limit that never
   binds. User F floods 1000 jobs of 50 ms; once F has a backlog (0.3 s and 40 jobs in), 9
   light users each run a closed loop of 10 jobs (submit, wait until it finished, next).
   Light users' wait before start (startedAt - createdAt) p50/p99/max (target: p99 <= D +
   100 ms); F's completions; whether F's backlog lasted the light users' whole run (jobs of F
   created before it began and started after it ended): without it the run proves nothing.
   The light users' waits are also split by whether F was still submitting. B_settled: the
   same, but the light users start once all of F's submits have returned (F's backlog still
   waiting), so F's submit traffic does not compete with them for the app's CPU.
C. fairness, shares: same configuration as B. 10 users submit 60 jobs of 50 ms each,
   interleaved. In the window when every user still has unfinished jobs ([the last user's
   last submit returned, the first moment a user has all its jobs finished]): completions
   per user and Jain's index (sum x)^2 / (n * sum x^2) (informal target >= 0.95). Weighted
   variant: W (``user_overrides`` weight 3) and U (weight 1), 120 jobs each: W's completions
   over U's in the window (expected about 3; informal target 2.5..3.5).
D. Redis commands per job: every limit raised (nothing parks), 500 no-op jobs (0 tokens) end
   to end after the warm-up; ``INFO commandstats`` and ``total_commands_processed`` of
   the app's Redis before and after, the bench's own reads subtracted, also corrected for the
   idle rate (the dispatcher's reconciler runs every 2 s) measured over 3 s before the run.

``--repeat N`` runs the trees alternately N times (the VM's speed drifts by tens of percent
within minutes, so one run of each tree compares little) and reports, per tree and scenario,
the median of every figure (the per-model peak: the highest); each run is kept in the JSON.

``--baseline REF`` also runs D against ``git worktree add --detach`` of REF (broker and app
started with this venv's python and ``PYTHONPATH=<worktree>/src``) and reports the difference
in commands per job (what dispatch adds). A REF without the dispatcher ignores settings it
does not know (``user_overrides``) and publishes at submit; A-C against it only with
``--baseline-all``.

Usage::

    .venv/bin/python bench/dispatch.py                       # full (a minute or two)
    .venv/bin/python bench/dispatch.py --quick               # A 200/40, B 300+5x5, C 5x30
    .venv/bin/python bench/dispatch.py --only A,D
    .venv/bin/python bench/dispatch.py --baseline HEAD       # D on HEAD too, and the difference
    .venv/bin/python bench/dispatch.py --baseline HEAD --baseline-all
    .venv/bin/python bench/dispatch.py --only A --baseline HEAD --baseline-all --repeat 3
    .venv/bin/python bench/dispatch.py --out /tmp/dispatch.json --log-dir /tmp/dispatch-logs
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from common import (
    LOOP_FACTORY,
    QUEUE_IDS,
    RESULTS_DIR,
    ROOT,
    HttpConn,
    System,
    commandstats_calls,
    cpu_snapshot,
    cpu_spent,
    current_tree_info,
    json_post,
    machine_cpu_s,
    machine_info,
    now_ms,
    pct,
    results_head,
    run_system,
    serve_env,
    speed_reference_ms,
    submit_from,
    summary,
    with_deadline,
    worktree,
    write_results,
)
from tierq.keys import AppKeys

DEFAULT_OUT = RESULTS_DIR / "dispatch.json"
APP_KEY_PREFIX = "tqdisp"
BROKER_KEY_PREFIX = "benchdisp"
QUEUE = "q_paid_batch"
MODELS = ("m1", "m2")
TERMINAL = frozenset({"completed", "failed", "cancelled"})
FIELDS = ("status", "createdAt", "startedAt", "finishedAt")
SUBMIT_CONCURRENCY = 32
POLL_S = 0.05
POLL_BATCH = 128  # job records read per poll (the oldest unfinished first)
LIGHT_POLL_S = 0.01
RAISED = 100_000
DEADLINE_BASE_S = 30.0
DEADLINE_PER_IDEAL = 6.0
WARM_USER = "warm"
WARMUP_JOBS = 16
WARMUP_DEADLINE_S = 30.0

# A
A_MODEL_LIMIT = 4
A_PARALLELISM = 64
A_TARGETS = {20: 0.80, 500: 0.97}
# B and C
FAIR_PARALLELISM = 8
FAIR_USER_LIMIT = 8
FAIR_MODEL_LIMIT = 1000
FAIR_D_MS = 50
B_START_AFTER_S = 0.3
B_START_AFTER_JOBS = 40
B_SLACK_MS = 100
JAIN_TARGET = 0.95
WEIGHT_W = 3
RATIO_RANGE = (2.5, 3.5)
# D
D_IDLE_S = 3.0
D_PARALLELISM = 1000  # the broker's maximum
D_TOP = 12


@dataclass(frozen=True)
class Sizes:
    a_runs: tuple[tuple[int, int], ...]  # (D ms, J jobs)
    b_flood: int
    b_light_users: int
    b_light_jobs: int
    c_users: int
    c_jobs: int
    c_weighted_jobs: int
    d_jobs: int


FULL = Sizes(((20, 400), (500, 80)), 1000, 9, 10, 10, 60, 120, 500)
QUICK = Sizes(((20, 200), (500, 40)), 300, 5, 5, 5, 30, 120, 200)


def deadline_for(ideal_s: float) -> float:
    return DEADLINE_BASE_S + DEADLINE_PER_IDEAL * ideal_s


def api_key(user: str) -> str:
    return f"tq_bench_{user}"


# -- the system under test ---------------------------------------------------------------------


APP_SETTINGS: dict[str, str] = {}
"""``--app-env NAME=VALUE``: more of ``tierq serve``'s environment, in every run."""


@dataclass(frozen=True)
class Setup:
    """One run's settings: what ``tierq serve`` gets in its environment."""

    users: tuple[str, ...]
    model_limit: int
    parallelism: int  # of q_paid_batch; the other queues get FAIR_PARALLELISM
    user_limit: int
    user_queue_limit: int = RAISED
    overrides: dict[str, dict[str, int]] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        limits = {"paid": self.model_limit, "free": self.model_limit}
        model = {
            "provider": "simulated",
            "experiences": ["stream", "batch"],
            "limits": limits,
            "tokens": 1,
            "token_latency_ms": 0,
        }
        queues = {
            q: {"parallelism": self.parallelism if q == QUEUE else FAIR_PARALLELISM,
                "admission_depth": RAISED}
            for q in QUEUE_IDS
        }  # fmt: skip
        user = {"paid": self.user_limit, "free": self.user_limit}
        queued = {"paid": self.user_queue_limit, "free": self.user_queue_limit}
        env = {
            "TIERQ_MODELS": json.dumps(dict.fromkeys(MODELS, model)),
            "TIERQ_SERVICES": json.dumps(
                {"chat": {"experiences": ["stream", "batch"], "models": list(MODELS)}}
            ),
            "TIERQ_QUEUES": json.dumps(queues),
            "TIERQ_USER_LIMITS": json.dumps(user),
            "TIERQ_USER_QUEUE_LIMITS": json.dumps(queued),
        }
        if self.overrides:
            env["TIERQ_USER_OVERRIDES"] = json.dumps(self.overrides)
        return {**env, **APP_SETTINGS}

    def api_keys(self) -> dict[str, dict[str, str]]:
        return {api_key(u): {"id": u, "plan": "paid"} for u in (*self.users, WARM_USER)}

    def serve_env(self, redis_url: str, app_port: int, broker_url: str) -> dict[str, str]:
        """``tierq serve``'s whole environment for this run (a ``common.AppEnv``)."""
        return serve_env(
            redis_url=redis_url,
            key_prefix=APP_KEY_PREFIX,
            app_port=app_port,
            broker_url=broker_url,
            api_keys=self.api_keys(),
            queue_parallelism=FAIR_PARALLELISM,
            extra=self.env(),
        )


# -- jobs: submitting and reading their records --------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One job to submit."""

    user: str
    model: str
    duration_ms: float
    prompt: str

    def body(self) -> dict[str, Any]:
        tokens = 1 if self.duration_ms > 0 else 0
        return {
            "service": "chat",
            "experience": "batch",
            "mode": "auto",
            "model": self.model,
            "input": {
                "prompt": self.prompt,
                "simulate": {"tokens": tokens, "token_latency_ms": self.duration_ms},
            },
        }


@dataclass
class Job:
    """A submitted job, and its state record as last read."""

    job_id: str
    user: str
    model: str
    submit_ms: float  # the submit started (client wall clock)
    returned_ms: float  # the submit returned
    status: str | None = None
    created: int | None = None
    started: int | None = None
    finished: int | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def run_ms(self) -> int | None:
        if self.started is None or self.finished is None:
            return None
        return self.finished - self.started

    @property
    def wait_ms(self) -> int | None:
        if self.started is None or self.created is None:
            return None
        return self.started - self.created

    def update(self, row: Sequence[str | None]) -> None:
        status, created, started, finished = row
        self.status = status
        self.created = int(created) if created else None
        self.started = int(started) if started else None
        self.finished = int(finished) if finished else None


@dataclass
class Submitted:
    """What a batch of submits gave so far (filled as they return, so a deadline keeps it)."""

    jobs: list[Job] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    done_ms: float | None = None
    notify_at: int = 0  # ``reached`` is set once this many jobs are in
    reached: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, job: Job) -> None:
        self.jobs.append(job)
        if len(self.jobs) >= self.notify_at:
            self.reached.set()


async def submit_one(conn: HttpConn, spec: Spec) -> Job | str:
    """One submit: the job, or why it failed."""
    headers = {"Authorization": f"Bearer {api_key(spec.user)}"}
    request = json_post(conn.port, "/api/jobs", json.dumps(spec.body()).encode(), headers)
    start = now_ms()
    try:
        status, data = await conn.request(request)
    except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
        return type(exc).__name__
    if status != 202:
        return f"submit {status}: {data[:120].decode(errors='replace')}"
    return Job(json.loads(data)["jobId"], spec.user, spec.model, start, now_ms())


async def submit_all(
    port: int, specs: Iterable[Spec], into: Submitted, concurrency: int = SUBMIT_CONCURRENCY
) -> None:
    """Submit every spec, in order, from ``concurrency`` submitters (see ``submit_from``)."""
    await submit_from(port, list(specs), submit_one, into.add, into.errors, concurrency)
    into.done_ms = now_ms()


class Records:
    """Reads job state records from the app's Redis, counting the commands it sends."""

    def __init__(self, url: str) -> None:
        self.r: aioredis.Redis = aioredis.Redis.from_url(url, decode_responses=True)
        self.keys = AppKeys(prefix=APP_KEY_PREFIX)
        self.own: Counter[str] = Counter()

    async def aclose(self) -> None:
        await self.r.aclose()

    async def refresh(self, jobs: Sequence[Job]) -> None:
        if not jobs:
            return
        pipe = self.r.pipeline(transaction=False)
        for job in jobs:
            pipe.hmget(self.keys.job(job.job_id), list(FIELDS))
        rows = await pipe.execute()
        self.own["hmget"] += len(jobs)
        for job, row in zip(jobs, rows, strict=True):
            job.update(row)

    async def wait_terminal(self, jobs: Callable[[], list[Job]], deadline_at: float) -> bool:
        """Poll until every job of ``jobs()`` is terminal (``False`` past ``deadline_at``, a
        ``time.monotonic`` value). Reads the oldest unfinished ones first, a batch a poll."""
        while True:
            pending = [j for j in jobs() if not j.terminal]
            if not pending:
                return True
            if time.monotonic() > deadline_at:
                return False
            await self.refresh(pending[:POLL_BATCH])
            if any(not j.terminal for j in pending[:POLL_BATCH]):
                await asyncio.sleep(POLL_S)

    async def info(self, section: str) -> dict[str, Any]:
        self.own["info"] += 1
        reply: dict[str, Any] = await self.r.info(section)
        return reply


def left(deadline_at: float) -> float:
    return deadline_at - time.monotonic()


def machine_busy_s() -> float | None:
    """CPU seconds all CPUs spent busy or stolen since boot, ``None`` if unreadable."""
    reading = machine_cpu_s()
    return None if reading is None else sum(reading)


def cpu_reading(system: System) -> dict[str, float | None]:
    """CPU seconds so far of each process of the system, of this one, and of the machine."""
    return {**cpu_snapshot(system.pids()), "machine_busy": machine_busy_s()}


def cpu_used(before: dict[str, float | None], after: dict[str, float | None]) -> dict[str, Any]:
    """CPU seconds spent between two readings, by process; ``other_processes`` is what the
    machine was busy with besides the system and the bench (other load skews the figures)."""
    spent = cpu_spent(before, after)
    used = {name: None if s is None else round(s, 2) for name, s in spent.items()}
    busy = used.get("machine_busy")
    ours = [v for k, v in used.items() if k != "machine_busy" and v is not None]
    used["other_processes"] = round(busy - sum(ours), 2) if busy is not None else None
    return used


def peak_overlap(intervals: Iterable[tuple[int, int]]) -> int:
    """Most intervals open at once (one ending at t does not overlap one starting at t)."""
    points = sorted(p for s, e in intervals for p in ((s, 1), (e, -1)))
    peak = now = 0
    for _, step in points:
        now += step
        peak = max(peak, now)
    return peak


def spans(jobs: Iterable[Job]) -> list[tuple[int, int]]:
    return [(j.started, j.finished) for j in jobs if j.started is not None and j.finished]


def handoffs(jobs: Iterable[Job], limit: int) -> list[float]:
    """How long a freed slot stays empty while ``limit`` binds (a backlog waits): the
    (i + limit)-th start minus the i-th finish, in ms. With at most ``limit`` jobs running at
    once, the (i + limit)-th start comes after at least i + 1 finishes, so each is >= 0."""
    done = [j for j in jobs if j.started is not None and j.finished is not None]
    starts = sorted(j.started for j in done if j.started is not None)
    ends = sorted(j.finished for j in done if j.finished is not None)
    return [float(starts[i + limit] - ends[i]) for i in range(len(starts) - limit)]


def statuses(jobs: Iterable[Job]) -> dict[str, int]:
    return dict(Counter(str(j.status) for j in jobs))


def ms_summary(values: Iterable[int | None]) -> dict[str, Any]:
    return summary([float(v) for v in values if v is not None])


def window_counts(
    jobs: Iterable[Job], users: Sequence[str], start: float, end: float
) -> dict[str, int]:
    counts = dict.fromkeys(users, 0)
    for j in jobs:
        if j.finished is not None and start <= j.finished <= end and j.user in counts:
            counts[j.user] += 1
    return counts


def jain(values: Sequence[float]) -> float | None:
    squares = sum(v * v for v in values)
    if not values or not squares:
        return None
    return round(sum(values) ** 2 / (len(values) * squares), 4)


async def run_jobs(
    system: System, records: Records, specs: list[Spec], deadline_s: float
) -> tuple[Submitted, bool]:
    """Submit ``specs``, then wait until every job is terminal."""
    deadline_at = time.monotonic() + deadline_s
    sub = Submitted()
    submitted = await with_deadline(deadline_s, submit_all(system.app_port, specs, sub))
    done = submitted and await records.wait_terminal(lambda: sub.jobs, deadline_at)
    return sub, done


async def run_and_read(
    system: System, specs: list[Spec], deadline_s: float
) -> tuple[Submitted, bool]:
    """``run_jobs`` with a reader of its own, then every job's record read once more."""
    records = Records(system.app_redis.url)
    try:
        sub, done = await run_jobs(system, records, specs, deadline_s)
        await records.refresh(sub.jobs)
    finally:
        await records.aclose()
    return sub, done


async def warm_up(system: System) -> dict[str, Any]:
    """No-op jobs of a user of its own through both models, before a run is measured: the
    first requests of a fresh system pay for connections and lazy set-up."""
    specs = [Spec(WARM_USER, MODELS[i % 2], 0, f"warm {i}") for i in range(WARMUP_JOBS)]
    sub, done = await run_and_read(system, specs, WARMUP_DEADLINE_S)
    await asyncio.sleep(0.3)  # their releases and clean-up
    completed = sum(1 for j in sub.jobs if j.status == "completed")
    return {"jobs": WARMUP_JOBS, "completed": completed, "in_time": done}


# -- A: limited capacity -------------------------------------------------------------------------


def setup_a() -> Setup:
    return Setup(("A",), A_MODEL_LIMIT, A_PARALLELISM, user_limit=10_000)


async def scenario_a(system: System, duration_ms: int, n: int) -> dict[str, Any]:
    slots = len(MODELS) * A_MODEL_LIMIT
    ideal_s = n * duration_ms / slots / 1000
    deadline_s = deadline_for(ideal_s)
    specs = [Spec("A", MODELS[i % 2], duration_ms, f"a {duration_ms} {i}") for i in range(n)]
    before = cpu_reading(system)
    t0 = now_ms()
    sub, done = await run_and_read(system, specs, deadline_s)
    after = cpu_reading(system)
    jobs = sub.jobs
    completed = [j for j in jobs if j.status == "completed"]
    finished = done and len(completed) == n
    last = max((j.finished for j in jobs if j.finished), default=None)
    makespan_s = (last - t0) / 1000 if finished and last else None
    runs = [j.run_ms for j in completed if j.run_ms is not None]
    mean_run = sum(runs) / len(runs) if runs else None
    ideal_measured_s = n * mean_run / slots / 1000 if mean_run is not None else None
    busy_s = sum(runs) / 1000
    return {
        "duration_ms": duration_ms,
        "jobs": n,
        "model_limit": A_MODEL_LIMIT,
        "slots": slots,
        "finished": finished,
        "deadline_s": round(deadline_s, 1),
        "jobs_submitted": len(jobs),
        "submit_errors": dict(sub.errors),
        "statuses": statuses(jobs),
        "submit_phase_s": round((sub.done_ms - t0) / 1000, 3) if sub.done_ms else None,
        "ideal_s": round(ideal_s, 3),
        "makespan_s": round(makespan_s, 3) if makespan_s else None,
        "efficiency": round(ideal_s / makespan_s, 4) if makespan_s else None,
        "target": A_TARGETS.get(duration_ms),
        "run_ms": ms_summary(runs),
        "ideal_with_measured_run_s": round(ideal_measured_s, 3) if ideal_measured_s else None,
        "efficiency_vs_measured_run": round(ideal_measured_s / makespan_s, 4)
        if makespan_s and ideal_measured_s
        else None,
        "model_busy_fraction": round(busy_s / (slots * makespan_s), 4) if makespan_s else None,
        "wait_before_start_ms": ms_summary(j.wait_ms for j in jobs),
        "peak_running_per_model": {
            m: peak_overlap(spans(j for j in jobs if j.model == m)) for m in MODELS
        },
        "slot_handoff_ms": summary(
            [h for m in MODELS for h in handoffs((j for j in jobs if j.model == m), A_MODEL_LIMIT)]
        ),
        "first_start_after_submit_ms": min(j.started for j in jobs if j.started) - t0
        if any(j.started for j in jobs)
        else None,
        "completed_per_model": dict(Counter(j.model for j in completed)),
        "completions_per_100ms": timeline(j.finished - t0 for j in completed if j.finished),
        "rate_after_submits": rate_after(
            [j.finished for j in completed if j.finished], sub.done_ms, slots, duration_ms
        ),
        "cpu_s": cpu_used(before, after),
    }


def timeline(offsets_ms: Iterable[float], step_ms: int = 100) -> list[int]:
    """How many of ``offsets_ms`` fall in each ``step_ms`` window from 0."""
    counts: Counter[int] = Counter(int(o // step_ms) for o in offsets_ms)
    return [counts.get(i, 0) for i in range(max(counts, default=-1) + 1)]


def rate_after(finished: list[float], since: float | None, slots: int, duration_ms: int) -> Any:
    """Completions per second once every submit had returned, over what the limits allow
    (``slots`` / the job's duration): the slot cycle without the submits' load."""
    if since is None:
        return None
    later = sorted(f for f in finished if f >= since)
    if len(later) < 2:
        return None
    rate = (len(later) - 1) / ((later[-1] - later[0]) / 1000)
    return round(rate / (slots * 1000 / duration_ms), 4)


# -- B: fairness, latency ------------------------------------------------------------------------


def fair_setup(users: Sequence[str], overrides: dict[str, dict[str, int]] | None = None) -> Setup:
    return Setup(
        tuple(users), FAIR_MODEL_LIMIT, FAIR_PARALLELISM, FAIR_USER_LIMIT,
        overrides=overrides or {},
    )  # fmt: skip


def light_users(sizes: Sizes) -> list[str]:
    return [f"L{i + 1}" for i in range(sizes.b_light_users)]


async def light_loop(
    port: int, records: Records, user: str, n: int, into: Submitted, deadline_at: float
) -> None:
    """Submit one job, wait until it is terminal, then the next; ``n`` jobs."""
    conn = HttpConn(port)
    try:
        for i in range(n):
            got = await submit_one(conn, Spec(user, "m1", FAIR_D_MS, f"{user} {i}"))
            if isinstance(got, str):
                into.errors[got] += 1
                await asyncio.sleep(0.1)
                continue
            into.jobs.append(got)
            while not got.terminal and time.monotonic() < deadline_at:
                await asyncio.sleep(LIGHT_POLL_S)
                await records.refresh([got])
    finally:
        conn.close()


async def scenario_b(system: System, sizes: Sizes, *, settled: bool = False) -> dict[str, Any]:
    """F floods; the light users start once F has a backlog, or (``settled``) once every
    submit of F has returned, so that F's submit traffic no longer competes for the app."""
    ideal_s = sizes.b_flood * FAIR_D_MS / FAIR_PARALLELISM / 1000
    deadline_s = deadline_for(ideal_s)
    deadline_at = time.monotonic() + deadline_s
    flood = [Spec("F", "m1", FAIR_D_MS, f"F {i}") for i in range(sizes.b_flood)]
    records = Records(system.app_redis.url)
    f_sub, l_sub = Submitted(notify_at=min(B_START_AFTER_JOBS, sizes.b_flood)), Submitted()
    report: dict[str, Any] = {"deadline_s": round(deadline_s, 1)}
    before = cpu_reading(system)
    t0 = now_ms()
    flooding = asyncio.create_task(submit_all(system.app_port, flood, f_sub))
    try:
        await asyncio.sleep(B_START_AFTER_S)
        backlog = asyncio.create_task(f_sub.reached.wait())
        await asyncio.wait(
            {flooding} if settled else {backlog, flooding},
            timeout=left(deadline_at),
            return_when=asyncio.FIRST_COMPLETED,
        )
        backlog.cancel()
        light_start = now_ms()
        loops = [
            light_loop(system.app_port, records, u, sizes.b_light_jobs, l_sub, deadline_at)
            for u in light_users(sizes)
        ]
        report["light_in_time"] = await with_deadline(left(deadline_at), asyncio.gather(*loops))
        light_end = now_ms()
        report["flood_submitted_in_time"] = await with_deadline(left(deadline_at), flooding)
        report["flood_in_time"] = await records.wait_terminal(lambda: f_sub.jobs, deadline_at)
        await records.refresh(f_sub.jobs + l_sub.jobs)
    finally:
        flooding.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flooding
        await records.aclose()
    after = cpu_reading(system)
    report["light_start"] = "after F's submits" if settled else "once F has a backlog"
    report.update(b_report(sizes, f_sub, l_sub, t0, light_start, light_end))
    report["finished"] = bool(
        report["light_in_time"] and report["flood_in_time"] and report["light_completed"]
        == sizes.b_light_users * sizes.b_light_jobs
    )  # fmt: skip
    report["cpu_s"] = cpu_used(before, after)
    return report


def b_report(
    sizes: Sizes, f_sub: Submitted, l_sub: Submitted, t0: float, start: float, end: float
) -> dict[str, Any]:
    flood, light = f_sub.jobs, l_sub.jobs
    waits = [float(j.wait_ms) for j in light if j.wait_ms is not None]
    p99 = pct(waits, 99)
    limit = FAIR_D_MS + B_SLACK_MS
    through = [
        j for j in flood
        if j.created is not None and j.created <= start and (j.started is None or j.started >= end)
    ]  # fmt: skip
    not_started_at_end = [
        j for j in flood if j.created is not None and j.created <= end
        and (j.started is None or j.started > end)
    ]  # fmt: skip
    in_window = [j for j in flood if j.finished is not None and start <= j.finished <= end]
    light_done = [j for j in light if j.status == "completed"]
    f_done = f_sub.done_ms or now_ms()
    during = [float(j.wait_ms) for j in light if j.wait_ms is not None and j.submit_ms < f_done]
    after = [float(j.wait_ms) for j in light if j.wait_ms is not None and j.submit_ms >= f_done]
    return {
        "flood_jobs": sizes.b_flood,
        "light_users": sizes.b_light_users,
        "light_jobs_each": sizes.b_light_jobs,
        "duration_ms": FAIR_D_MS,
        "light_started_after_s": round((start - t0) / 1000, 3),
        "light_window_s": round((end - start) / 1000, 3),
        "flood_submitted_before_light": sum(1 for j in flood if j.returned_ms <= start),
        "light_completed": len(light_done),
        "light_statuses": statuses(light),
        "light_submit_errors": dict(l_sub.errors),
        "light_wait_before_start_ms": summary(waits),
        "light_wait_p99_ms": p99,
        "light_wait_while_flood_submitting_ms": summary(during),
        "light_wait_after_flood_submitted_ms": summary(after),
        # a submit's own time (sent -> 202): while F's submits crowd the app's admission bound
        "light_submit_while_flood_submitting_ms": summary(
            [j.returned_ms - j.submit_ms for j in light if j.submit_ms < f_done]
        ),
        "flood_submit_ms": summary([j.returned_ms - j.submit_ms for j in flood]),
        "flood_submit_phase_s": round((f_sub.done_ms - t0) / 1000, 3) if f_sub.done_ms else None,
        "target_p99_ms": limit,
        "light_submit_to_finish_ms": summary(
            [j.finished - j.submit_ms for j in light if j.finished is not None]
        ),
        "flood_completed": sum(1 for j in flood if j.status == "completed"),
        "flood_statuses": statuses(flood),
        "flood_submit_errors": dict(f_sub.errors),
        "flood_completed_in_light_window": len(in_window),
        "light_completed_in_light_window": sum(
            1 for j in light if j.finished is not None and start <= j.finished <= end
        ),
        "flood_jobs_waiting_through_light_window": len(through),
        "flood_not_started_at_light_end": len(not_started_at_end),
        "flood_backlog_held": bool(through),
        "flood_wait_before_start_ms": ms_summary(j.wait_ms for j in flood),
        "peak_running_in_queue": peak_overlap(spans(flood + light)),
        "slot_handoff_ms": summary(handoffs(flood + light, FAIR_PARALLELISM)),
        "peak_running_flood": peak_overlap(spans(flood)),
        "run_ms": ms_summary(j.run_ms for j in flood + light),
    }


# -- C: fairness, shares -------------------------------------------------------------------------


def interleaved(users: Sequence[str], n: int, tag: str) -> list[Spec]:
    return [Spec(u, "m1", FAIR_D_MS, f"{tag} {u} {i}") for i in range(n) for u in users]


async def scenario_c(system: System, users: Sequence[str], n: int) -> dict[str, Any]:
    """Every user in ``users`` submits ``n`` jobs at once (interleaved); shares in the window
    when all of them still have unfinished jobs."""
    ideal_s = len(users) * n * FAIR_D_MS / FAIR_PARALLELISM / 1000
    deadline_s = deadline_for(ideal_s)
    specs = interleaved(users, n, "c")
    before = cpu_reading(system)
    t0 = now_ms()
    sub, done = await run_and_read(system, specs, deadline_s)
    after = cpu_reading(system)
    jobs = sub.jobs
    by_user = {u: [j for j in jobs if j.user == u] for u in users}
    last_submit = {u: max((j.returned_ms for j in js), default=None) for u, js in by_user.items()}
    all_done = {
        u: max(j.finished or 0 for j in js)
        for u, js in by_user.items()
        if len(js) == n and all(j.status == "completed" and j.finished for j in js)
    }
    start = max((v for v in last_submit.values() if v is not None), default=None)
    end = min(all_done.values(), default=None) if all_done else None
    report: dict[str, Any] = {
        "users": list(users),
        "jobs_each": n,
        "duration_ms": FAIR_D_MS,
        "finished": done and len(all_done) == len(users),
        "deadline_s": round(deadline_s, 1),
        "jobs_submitted": len(jobs),
        "submit_errors": dict(sub.errors),
        "statuses": statuses(jobs),
        "submit_phase_s": round((sub.done_ms - t0) / 1000, 3) if sub.done_ms else None,
        "window_start_s": round((start - t0) / 1000, 3) if start else None,
        "window_end_s": round((end - t0) / 1000, 3) if end else None,
        "user_done_s": {u: round((v - t0) / 1000, 3) for u, v in all_done.items()},
        "peak_running_in_queue": peak_overlap(spans(jobs)),
        "slot_handoff_ms": summary(handoffs(jobs, FAIR_PARALLELISM)),
        "peak_running_per_user_max": max(
            (peak_overlap(spans(js)) for js in by_user.values()), default=0
        ),
        "wait_before_start_ms": ms_summary(j.wait_ms for j in jobs),
        "cpu_s": cpu_used(before, after),
    }
    if start is None or end is None or end <= start:
        report["window_s"] = None
        report["note"] = "no window in which every user still had unfinished jobs"
        return report
    counts = window_counts(jobs, users, start, end)
    report["window_s"] = round((end - start) / 1000, 3)
    report["completions_in_window"] = counts
    report["jain_index"] = jain(list(counts.values()))
    return report


async def scenario_c_weighted(system: System, n: int) -> dict[str, Any]:
    report = await scenario_c(system, ("W", "U"), n)
    counts = report.get("completions_in_window")
    report["weights"] = {"W": WEIGHT_W, "U": 1}
    report["ratio_w_to_u"] = round(counts["W"] / counts["U"], 3) if counts and counts["U"] else None
    report["expected_ratio"] = WEIGHT_W
    return report


# -- D: Redis commands per job -------------------------------------------------------------------


def setup_d() -> Setup:
    return Setup(("D",), RAISED, D_PARALLELISM, user_limit=RAISED)


@dataclass
class Stats:
    at: float  # time.monotonic
    calls: dict[str, int]
    processed: int
    own: Counter[str]


async def read_stats(records: Records) -> Stats:
    calls = commandstats_calls(await records.info("commandstats"))
    processed = int((await records.info("stats"))["total_commands_processed"])
    return Stats(time.monotonic(), calls, processed, Counter(records.own))


def diff(a: Stats, b: Stats) -> tuple[dict[str, int], int, float]:
    """Commands Redis ran between two readings (the bench's own subtracted; ``info`` left out
    of the calls), total processed, seconds between them."""
    own = b.own - a.own
    calls = {k: b.calls.get(k, 0) - a.calls.get(k, 0) - own.get(k, 0) for k in b.calls}
    calls.pop("info", None)
    calls = {k: v for k, v in calls.items() if v > 0}
    processed = b.processed - a.processed - sum(own.values())
    return calls, processed, b.at - a.at


async def wait_quiet(records: Records, idle_per_s: float, deadline_s: float = 15.0) -> None:
    """Until the app's Redis runs no more than its idle rate (and a little) per 0.5 s."""
    deadline = time.monotonic() + deadline_s
    last = await read_stats(records)
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        now = await read_stats(records)
        _, processed, span = diff(last, now)
        if processed <= idle_per_s * span + 2:
            return
        last = now


async def scenario_d(system: System, n: int) -> dict[str, Any]:
    deadline_s = 60.0
    records = Records(system.app_redis.url)
    try:
        await asyncio.sleep(1.0)
        idle_a = await read_stats(records)
        await asyncio.sleep(D_IDLE_S)
        idle_b = await read_stats(records)
        idle_calls, idle_processed, idle_span = diff(idle_a, idle_b)
        idle_calls_per_s = sum(idle_calls.values()) / idle_span
        idle_processed_per_s = idle_processed / idle_span
        before = await read_stats(records)
        cpu_before = cpu_reading(system)
        specs = [Spec("D", "m1", 0, f"noop {i}") for i in range(n)]
        sub, done = await run_jobs(system, records, specs, deadline_s)
        await wait_quiet(records, idle_processed_per_s)
        after = await read_stats(records)
        cpu_after = cpu_reading(system)
    finally:
        await records.aclose()
    calls, processed, span = diff(before, after)
    jobs = len(sub.jobs) or 1
    total = sum(calls.values())
    ordered = sorted(calls.items(), key=lambda kv: -kv[1])
    return {
        "jobs": n,
        "finished": done and sum(1 for j in sub.jobs if j.status == "completed") == n,
        "jobs_submitted": len(sub.jobs),
        "submit_errors": dict(sub.errors),
        "statuses": statuses(sub.jobs),
        "measured_s": round(span, 2),
        "commandstats_calls": total,
        "commandstats_calls_per_job": round(total / jobs, 2),
        "commandstats_calls_per_job_idle_corrected": round(
            (total - idle_calls_per_s * span) / jobs, 2
        ),
        "total_commands_processed": processed,
        "processed_per_job": round(processed / jobs, 2),
        "processed_per_job_idle_corrected": round(
            (processed - idle_processed_per_s * span) / jobs, 2
        ),
        "idle_calls_per_s": round(idle_calls_per_s, 2),
        "idle_processed_per_s": round(idle_processed_per_s, 2),
        "idle_calls": idle_calls,
        "top_calls_per_job": {k: round(v / jobs, 2) for k, v in ordered[:D_TOP]},
        "calls_per_job": {k: round(v / jobs, 3) for k, v in ordered},
        "bench_reads_subtracted": dict(after.own - before.own),
        "cpu_s": cpu_used(cpu_before, cpu_after),
    }


# -- runs --------------------------------------------------------------------------------------


def run_one(
    label: str,
    src: Path,
    setup: Setup,
    work: Callable[[System], Awaitable[dict[str, Any]]],
    log_dir: Path | None,
) -> dict[str, Any]:
    """A fresh system from ``src`` with ``setup``, warmed up, ``work`` on it, stopped; errors
    recorded."""
    t0 = time.monotonic()

    async def warm_then_work(system: System) -> dict[str, Any]:
        warm = await warm_up(system)
        if not warm["in_time"] or warm["completed"] < warm["jobs"]:
            # jobs left behind here hold slots during the measured run (this is how jobs
            # dispatched but never published were found): say so, loudly
            print(f"  [{label}] WARNING warm-up: {warm}", flush=True)
        return {"warmup": warm, **await work(system)}

    out = run_system(
        label,
        warm_then_work,
        broker_key_prefix=BROKER_KEY_PREFIX,
        app_env=setup.serve_env,
        src=src,
        log_dir=log_dir,
        on_error={"finished": False},
    )
    out["elapsed_s"] = round(time.monotonic() - t0, 1)
    return out


def run_tree(tree: str, src: Path, args: argparse.Namespace, only: set[str]) -> dict[str, Any]:
    """The chosen scenarios against the code in ``src``, each run in a fresh system."""
    sizes: Sizes = args.sizes
    out: dict[str, Any] = {}
    print(f"[{tree}] code from {src}", flush=True)

    def one(name: str, setup: Setup, work: Callable[[System], Awaitable[dict[str, Any]]]) -> None:
        print(f"  [{tree}] {name} ...", flush=True)
        speed = speed_reference_ms()  # the machine's speed now (it drifts; see common.py)
        out[name] = run_one(f"{tree}-{name}", src, setup, work, args.log_dir)
        out[name]["speed_reference_ms"] = speed
        other = (out[name].get("cpu_s") or {}).get("other_processes")
        print(
            f"  [{tree}] {name}: {short(name, out[name])}; other CPU {other} s; speed {speed} ms",
            flush=True,
        )

    if "A" in only:
        for d_ms, n in sizes.a_runs:

            async def a(system: System, d_ms: int = d_ms, n: int = n) -> dict[str, Any]:
                return await scenario_a(system, d_ms, n)

            one(f"A_{d_ms}ms", setup_a(), a)
    if "B" in only:
        users = ["F", *light_users(sizes)]

        async def b(system: System) -> dict[str, Any]:
            return await scenario_b(system, sizes)

        async def b_settled(system: System) -> dict[str, Any]:
            return await scenario_b(system, sizes, settled=True)

        one("B", fair_setup(users), b)
        one("B_settled", fair_setup(users), b_settled)
    if "C" in only:
        users_c = [f"C{i + 1}" for i in range(sizes.c_users)]

        async def c(system: System) -> dict[str, Any]:
            return await scenario_c(system, users_c, sizes.c_jobs)

        async def cw(system: System) -> dict[str, Any]:
            return await scenario_c_weighted(system, sizes.c_weighted_jobs)

        one("C", fair_setup(users_c), c)
        one("C_weighted", fair_setup(("W", "U"), {"W": {"weight": WEIGHT_W}}), cw)
    if "D" in only:

        async def d(system: System) -> dict[str, Any]:
            return await scenario_d(system, sizes.d_jobs)

        one("D", setup_d(), d)
    return out


# -- baseline ----------------------------------------------------------------------------------


def d_comparison(current: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """Commands per job of D: current, baseline and current - baseline."""
    cur, base = current.get("D") or {}, baseline.get("D") or {}
    out: dict[str, Any] = {}
    for name in (
        "commandstats_calls_per_job",
        "commandstats_calls_per_job_idle_corrected",
        "processed_per_job",
        "processed_per_job_idle_corrected",
    ):
        c, b = cur.get(name), base.get(name)
        out[name] = {
            "current": c,
            "baseline": b,
            "added": round(c - b, 2) if c is not None and b is not None else None,
        }
    cur_calls, base_calls = cur.get("calls_per_job") or {}, base.get("calls_per_job") or {}
    added = {
        k: round(cur_calls.get(k, 0) - base_calls.get(k, 0), 3)
        for k in set(cur_calls) | set(base_calls)
    }
    out["added_calls_per_job_by_command"] = dict(
        sorted(((k, v) for k, v in added.items() if v), key=lambda kv: -abs(kv[1]))
    )
    return out


# -- targets and output --------------------------------------------------------------------------


def targets(runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per figure with a target (or an expectation), and whether it was met."""
    rows: list[dict[str, Any]] = []
    for run, res in runs.items():
        for name, r in res.items():
            for figure, value, target, met in scenario_targets(name, r):
                rows.append(
                    {"run": run, "scenario": name, "figure": figure, "value": value,
                     "target": target, "met": met}
                )  # fmt: skip
    return rows


def scenario_targets(name: str, r: dict[str, Any]) -> list[tuple[str, Any, str, bool | None]]:
    """``(figure, value, target, met)`` of one scenario's result."""
    out: list[tuple[str, Any, str, bool | None]] = []
    if name.startswith("A_"):
        goal, eff = r.get("target"), r.get("efficiency")
        ok = None if goal is None else eff is not None and eff >= goal
        out.append(("efficiency", eff, f">= {goal}", ok))
        measured = r.get("efficiency_vs_measured_run")
        out.append(("efficiency_vs_measured_run", measured, "(reported)", None))
        peak = max((r.get("peak_running_per_model") or {}).values(), default=None)
        ok = peak is not None and peak <= A_MODEL_LIMIT
        out.append(("peak_running_per_model", peak, f"<= {A_MODEL_LIMIT}", ok))
        # a 20 ms job's overhead is CPU: its efficiency moves with the machine's speed
        out.append(("speed_reference_ms", r.get("speed_reference_ms"), "(larger: slower)", None))
    elif name.startswith("B"):
        p99, goal = r.get("light_wait_p99_ms"), FAIR_D_MS + B_SLACK_MS
        out.append(("light_wait_p99_ms", p99, f"<= {goal}", p99 is not None and p99 <= goal))
        held = r.get("flood_backlog_held")
        out.append(("flood_backlog_held", held, "true", bool(held)))
    elif name == "C":
        j = r.get("jain_index")
        ok = j is not None and j >= JAIN_TARGET
        out.append(("jain_index", j, f">= {JAIN_TARGET} (informal)", ok))
    elif name == "C_weighted":
        ratio, (lo, hi) = r.get("ratio_w_to_u"), RATIO_RANGE
        ok = ratio is not None and lo <= ratio <= hi
        out.append(("ratio_w_to_u", ratio, f"{lo}..{hi} (informal)", ok))
    elif name == "D":
        for figure in ("commandstats_calls_per_job", "processed_per_job"):
            out.append((figure, r.get(figure), "(reported)", None))
    if r.get("finished") is False:
        out.append(("finished", False, "true", False))
    return out


def short(name: str, r: dict[str, Any]) -> str:
    if "error" in r:
        return f"error: {r['error'][:200]}"
    if name.startswith("A_"):
        return (
            f"{r['statuses']} makespan {r['makespan_s']} s (ideal {r['ideal_s']}), efficiency "
            f"{r['efficiency']} (vs measured run {r['efficiency_vs_measured_run']}), run mean "
            f"{r['run_ms']['mean']} ms, slot hand-off p50/p99 {r['slot_handoff_ms']['p50']}/"
            f"{r['slot_handoff_ms']['p99']} ms, peak/model {r['peak_running_per_model']}"
        )
    if name.startswith("B"):
        w = r["light_wait_before_start_ms"]
        ls, fs = r["light_submit_while_flood_submitting_ms"], r["flood_submit_ms"]
        return (
            f"light wait p50/p99/max {w['p50']}/{w['p99']}/{w['max']} ms, light "
            f"{r['light_completed']} done, F {r['flood_completed']} done "
            f"({r['flood_completed_in_light_window']} in light window), backlog held "
            f"{r['flood_backlog_held']} ({r['flood_jobs_waiting_through_light_window']} F jobs); "
            f"submit p50/p99 light {ls['p50']}/{ls['p99']} ms (while F submits), F "
            f"{fs['p50']}/{fs['p99']} ms"
        )
    if name == "C":
        return (
            f"window {r.get('window_s')} s, Jain {r.get('jain_index')}, "
            f"counts {r.get('completions_in_window')}"
        )
    if name == "C_weighted":
        return (
            f"window {r.get('window_s')} s, W/U {r.get('ratio_w_to_u')} "
            f"({r.get('completions_in_window')})"
        )
    if name == "D":
        return (
            f"{r['statuses']} commandstats {r['commandstats_calls_per_job']}/job "
            f"(idle-corrected {r['commandstats_calls_per_job_idle_corrected']}), processed "
            f"{r['processed_per_job']}/job, top {dict(list(r['top_calls_per_job'].items())[:5])}"
        )
    return ""


def print_table(rows: list[dict[str, Any]], comparison: dict[str, Any]) -> None:
    print(f"\n{'run':9} {'scenario':11} {'figure':42} {'value':>10}  {'target':22} met")
    for r in rows:
        met = {True: "y", False: "n", None: "-"}[r["met"]]
        print(
            f"{r['run']:9} {r['scenario']:11} {r['figure']:42} {r['value']!s:>10}  "
            f"{r['target']:22} {met}"
        )
    if comparison:
        print("\nD: commands per job, current vs baseline")
        for name, v in comparison.items():
            if name == "added_calls_per_job_by_command":
                top = dict(list(v.items())[:10])
                print(f"  added per job by command: {top}")
            else:
                print(f"  {name}: {v['current']} vs {v['baseline']} (added {v['added']})")


# -- driver ------------------------------------------------------------------------------------


def parse_only(text: str) -> set[str]:
    chosen = {part.strip().upper() for part in text.split(",") if part.strip()}
    if not chosen or not chosen <= {"A", "B", "C", "D"}:
        raise argparse.ArgumentTypeError("--only wants letters from A,B,C,D, e.g. A,D")
    return chosen


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    parser.add_argument("--only", type=parse_only, default={"A", "B", "C", "D"}, help="e.g. A,D")
    parser.add_argument("--baseline", default=None, help="git ref: run D on it too, compare")
    parser.add_argument(
        "--baseline-all", action="store_true", help="with --baseline: A-C on the baseline too"
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="run the trees alternately N times; report medians"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    parser.add_argument("--log-dir", type=Path, default=None, help="keep app/broker logs here")
    parser.add_argument(
        "--app-env", action="append", default=[], metavar="NAME=VALUE",
        help="more environment for tierq serve in every run, e.g. TIERQ_WORKERS=2 (repeatable)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    for item in args.app_env:
        name, sep, value = item.partition("=")
        if not sep or not name.startswith("TIERQ_"):
            parser.error(f"--app-env takes TIERQ_NAME=VALUE, not {item!r}")
        APP_SETTINGS[name] = value
    if args.repeat < 1:
        parser.error("--repeat wants a number >= 1")
    args.sizes = QUICK if args.quick else FULL
    return args


def config(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "quick": args.quick,
        "only": sorted(args.only),
        "sizes": asdict(args.sizes),
        "queue": QUEUE,
        "models": list(MODELS),
        "submit_concurrency": SUBMIT_CONCURRENCY,
        "app_env": dict(APP_SETTINGS),
        "poll_s": POLL_S,
        "poll_batch": POLL_BATCH,
        "light_poll_s": LIGHT_POLL_S,
        "deadline": f"{DEADLINE_BASE_S} s + {DEADLINE_PER_IDEAL} x ideal per run (D: 60 s)",
        "A": {"model_limit": A_MODEL_LIMIT, "parallelism": A_PARALLELISM,
              "targets": {str(k): v for k, v in A_TARGETS.items()}},
        "B_C": {"parallelism": FAIR_PARALLELISM, "user_limit": FAIR_USER_LIMIT,
                "model_limit": FAIR_MODEL_LIMIT, "duration_ms": FAIR_D_MS,
                "b_start_after_s": B_START_AFTER_S, "b_start_after_jobs": B_START_AFTER_JOBS,
                "b_target_p99_ms": FAIR_D_MS + B_SLACK_MS, "jain_target": JAIN_TARGET,
                "weight_w": WEIGHT_W, "ratio_range": list(RATIO_RANGE)},
        "D": {"idle_s": D_IDLE_S, "parallelism": D_PARALLELISM},
        "warmup_jobs": WARMUP_JOBS,
        "client_loop": "uvloop" if LOOP_FACTORY else "asyncio",
    }  # fmt: skip


NOTES = [
    "All processes (bench client, app, broker, two redis-servers) share this machine's CPUs; "
    "other load on the machine (see loadavg) moves the figures.",
    "Times: createdAt/startedAt/finishedAt are the app's wall clock (ms), submit times the "
    "client's; one machine, one clock. A's makespan starts at the first submit, so it "
    "includes the submit phase (submit_phase_s).",
    "A run is a job's finishedAt - startedAt: the model's time plus recording the result; "
    "releasing its leases and dispatching the next job happen after finishedAt.",
    "D: INFO commandstats counts commands run inside Lua scripts as well as the EVALSHA that "
    "ran them; total_commands_processed is what Redis processed (compare both). The bench's "
    "own HMGET/INFO are subtracted; idle-corrected figures also subtract the idle rate "
    "(the dispatcher's reconciler) over the measured span.",
    "C and C_weighted targets are informal (Jain >= 0.95; W/U in 2.5..3.5); A and B targets "
    "are the brief's.",
]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    machine = machine_info(("tierq", "httpx", "uvicorn", "starlette", "redis"))
    repeats: dict[str, list[dict[str, Any]]] = {"current": []}
    meta: dict[str, dict[str, Any]] = {}
    only_base = (args.only if args.baseline_all else args.only & {"D"}) if args.baseline else set()
    with contextlib.ExitStack() as stack:
        base_src = None
        if only_base:
            path, commit = stack.enter_context(worktree(args.baseline))
            meta["baseline"] = {"ref": args.baseline, "commit": commit, "src": str(path)}
            base_src, repeats = path / "src", {"baseline": [], "current": []}
        meta["current"] = {**current_tree_info(), "src": str(ROOT / "src")}
        for n in range(args.repeat):  # the trees alternate: the VM's drift hits both alike
            tag = f" #{n + 1}" if args.repeat > 1 else ""
            if base_src is not None:
                repeats["baseline"].append(run_tree(f"baseline{tag}", base_src, args, only_base))
            repeats["current"].append(run_tree(f"current{tag}", ROOT / "src", args, args.only))
    runs = {label: median_run(done) for label, done in repeats.items()}
    comparison = d_comparison(runs["current"], runs["baseline"]) if "baseline" in runs else {}
    rows = targets(runs)
    doc = {
        **results_head(
            "tierq fair dispatch (broker + app subprocesses, two embedded Redis)", started, machine
        ),
        "notes": NOTES,
        "config": config(args),
        "trees": meta,
        "runs": runs,
        "repeats": repeats if args.repeat > 1 else {},
        "targets": rows,
        "d_comparison": comparison,
    }
    if args.repeat > 1:
        print(f"\nmedians of {args.repeat} alternating runs per tree")
    print_table(rows, comparison)
    write_results(args.out, doc)
    return 0


def median_run(done: list[dict[str, Any]]) -> dict[str, Any]:
    """One run's results, or, over repeated runs, each scenario's median of every numeric
    figure (a per-model peak: its highest), the rest as the first run had it."""
    if len(done) == 1:
        return done[0]
    out: dict[str, Any] = {}
    for name, first in done[0].items():
        if not isinstance(first, dict):
            out[name] = first
            continue
        results = [run[name] for run in done if isinstance(run.get(name), dict)]
        merged = dict(first)
        for key in first:
            values = [r.get(key) for r in results]
            if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
                merged[key] = round(statistics.median(values), 4)
            elif key == "peak_running_per_model":
                peaks: dict[str, int] = {}
                for v in values:
                    for model, peak in (v or {}).items():
                        peaks[model] = max(peaks.get(model, 0), peak)
                merged[key] = peaks
        merged["repeats"] = len(results)
        out[name] = merged
    return out


if __name__ == "__main__":
    sys.exit(main())
