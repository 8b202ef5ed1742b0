"""Job-overhead benchmark of tierq on loopback: no-op jobs end to end, and a peer (taskiq).

Black-box like ``bench/dispatch.py``: two embedded Redis servers (the app's and the broker's),
``tierq broker`` and ``tierq serve`` as subprocesses, a fresh system for every run, warmed up
with 50 jobs before it is measured. Every job is a no-op: service ``chat``, experience
``batch`` (so ``q_paid_batch``), mode auto, a paid key, the simulated model with 0 tokens and
0 ms latency. Every limit is raised so nothing parks or is refused: user running limits, user
queue limits, model limits (100,000), queue parallelism 1000 (the broker's maximum) and
admission depth (100,000).

How completion is observed: the bench never opens an SSE stream (that would add a connection,
a tail and a reply per job to the app it measures). It reads the job state records (the
records behind ``GET /api/jobs/{id}``) straight from the app's Redis: every 20 ms one
pipelined ``HGET <job> status`` for the oldest (at most 64) jobs it has not yet seen terminal.
Those commands are counted and subtracted from the Redis figures, and the bench's CPU is
reported with the rest. Times come from the records, not from the polling: ``startedAt`` is the
``started`` event's ``ts`` (one value, written together) and ``finishedAt`` the terminal
event's, both the app's wall clock; submit times are the client's, on the same machine clock.
After the measured window the bench reads every record once (``HMGET``, not counted).

The client submits over raw HTTP/1.1 keep-alive connections (asyncio streams on uvloop, one
connection per submitter), so that it costs a fraction of httpx's CPU on a 2-core machine
where every process competes.

1. throughput: N jobs (2,000), C submits in flight (64). jobs/s end to end = completed /
   (last ``finishedAt`` - first submit). Also the submit phase alone: requests/s from the first
   submit to the last reply (while the workers run the jobs already in), and submit latency.
   Redis commands per job on the app's Redis and on the broker's (``CONFIG RESETSTAT``, then
   ``INFO commandstats`` / ``INFO stats`` before and after, after the traffic settled; the
   bench's own commands subtracted; also corrected for the idle rate, measured over 2 s
   before: the dispatcher's reconciler, the broker's poll). Redis 6.2 counts each command a
   Lua script runs in both ``commandstats`` and ``total_commands_processed``, as well as the
   ``EVALSHA`` that ran it (checked when this bench was written), so "commands per job" counts
   a script's inner commands; ``script_calls_per_job`` is how many scripts ran.
   CPU seconds of each process (app and broker as process trees, both Redis servers, the bench
   client) per job, the broker's share of them, and what else the machine did.
2. latency at half the peak: jobs submitted open loop at 0.5 x scenario 1's jobs/s for S
   seconds (10); submit -> ``started`` p50/p99 (``startedAt`` - the client's time just before
   writing the request), submit -> completed, submit request latency, schedule lag. Scenarios
   1 and 2 also list the ids of the jobs slowest to start, to look up in the app's log.
3. workers: if ``tierq serve --help`` lists ``--workers``, scenario 1 on a fresh system with
   each ``--workers`` value (1 and 2) and the ratio of their jobs/s; otherwise the default
   process and ``"workers": "unsupported"``. Also what the machine allows: the cores every
   measured process kept busy with each value (``cores_busy_by_workers``), and
   ``workers_scaling_ceiling``: the jobs/s at which all of this machine's cores would be busy
   at the CPU per job (app, broker, both Redis, bench client) measured with the most workers,
   over the jobs/s with one: no process layout does better here (the broker, Redis and the
   bench client share the same cores).
4. peer baseline: taskiq with taskiq-redis (``RedisStreamBroker`` + ``RedisAsyncResultBackend``,
   see ``bench/taskiq_peer.py``) on the same app Redis server, in the same invocation, after the
   tierq scenarios of the last system (whose processes then sit idle): ``taskiq worker
   --workers 2``, N no-op tasks kicked with C in flight, each result's key polled the same way
   (``EXISTS``, oldest 64, every 20 ms); the task returns its wall-clock time, so the end is
   the last task's run, as tierq's is its ``finishedAt``. ``tierq_over_taskiq`` = tierq jobs/s
   (the last system) / taskiq jobs/s. taskiq's producer (``kiq``: one ``XADD``) runs in the
   bench process, so its CPU is the bench client's; tierq's producer is the app. Skipped, with
   a note, without ``pip install -e '.[bench]'``.

Nothing here asserts on timing; every wait has a deadline, and a scenario that runs out of
time is recorded as not finished. ``--only`` takes scenario names or numbers (``1,4``).
``--baseline REF`` runs the tierq scenarios against ``git
worktree add --detach`` of REF first (this venv's python, ``PYTHONPATH=<worktree>/src``), then
against the working tree, and reports current / baseline ratios; with ``--repeat N``, N
alternating (baseline, current) pairs and the median of each figure's ratios (the VM's speed
drifts by tens of percent within one run: single pairs swung 0.75-1.41 x on the same code).

Usage::

    .venv/bin/python bench/jobs.py                       # 2,000 jobs, 64 in flight, workers 1,2
    .venv/bin/python bench/jobs.py --quick               # 300 jobs, 4 s of latency
    .venv/bin/python bench/jobs.py --only throughput,taskiq --jobs 5000
    .venv/bin/python bench/jobs.py --workers 1,2,4 --baseline HEAD
    .venv/bin/python bench/jobs.py --only throughput --workers 1 --baseline HEAD --repeat 3
    .venv/bin/python bench/jobs.py --out /tmp/jobs.json --log-dir /tmp/jobs-logs
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import importlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis

from common import (
    CLK_TCK,
    HOST,
    LOOP_FACTORY,
    QUEUE_IDS,
    RESULTS_DIR,
    ROOT,
    HttpConn,
    Proc,
    System,
    broker_proc,
    clean_env,
    commandstats_calls,
    copy_logs,
    cpu_spent,
    current_tree_info,
    json_post,
    log_flags,
    machine_info,
    now_ms,
    procs_running,
    pythonpath,
    raise_nofile,
    results_head,
    run_async,
    serve_env,
    summary,
    worktree,
    write_results,
)
from tierq.embedded_redis import EmbeddedRedis, free_port
from tierq.keys import AppKeys

DEFAULT_OUT = RESULTS_DIR / "jobs.json"
BENCH_DIR = Path(__file__).resolve().parent
PAID_KEY = "tq_bench_jobs"
APP_KEY_PREFIX = "tqjobs"
BROKER_KEY_PREFIX = "benchjobs"
QUEUE = "q_paid_batch"
RAISED = 100_000
PARALLELISM = 1000  # the broker's maximum
TERMINAL = frozenset({"completed", "failed", "cancelled"})
RECORD_FIELDS = ("status", "createdAt", "startedAt", "finishedAt", "attempts")

POLL_S = 0.02
POLL_BATCH = 64
IDLE_S = 2.0
QUIET_DEADLINE_S = 15.0
WARMUP_JOBS = 50
WARMUP_CONCURRENCY = 16
WARMUP_DEADLINE_S = 60.0
SETTLE_S = 1.0
READ_CHUNK = 500
TOP_COMMANDS = 12
TASKIQ_WORKERS = 2
TASKIQ_READY_S = 60.0
SCENARIOS = ("throughput", "latency", "workers", "taskiq")
BENCH_EXTRA_NOTE = "taskiq not installed: pip install -e '.[bench]'"

TARGETS = {
    "jobs_per_s": 600.0,  # with 2 workers
    "app_commands_per_job": 20.0,
    "submit_req_per_s": 2000.0,
    "started_p50_ms": 5.0,
    "started_p99_ms": 30.0,
    "workers_scaling": 1.6,
    "tierq_over_taskiq": 0.2,
}


@dataclass(frozen=True)
class Sizes:
    jobs: int
    latency_s: float


FULL = Sizes(2000, 10.0)
QUICK = Sizes(300, 4.0)


def rnd(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 3)


# -- CPU: process trees ------------------------------------------------------------------------


def proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds) of every process this one can read in /proc."""
    table: dict[int, tuple[int, float]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        table[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / CLK_TCK)
    return table


def descendants(table: Mapping[int, tuple[int, float]], root: int) -> list[int]:
    """``root`` and every process below it in ``table``."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in table:
            out.append(pid)
            todo.extend(children.get(pid, ()))
    return out


def machine_cpu_s() -> tuple[float | None, float | None]:
    """CPU seconds all CPUs spent busy since boot, and stolen by the hypervisor
    (``/proc/stat``); ``None`` if unreadable."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None, None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in first[1:9])
    return (user + nice + system + irq + softirq) / CLK_TCK, steal / CLK_TCK


def cpu_reading(trees: Mapping[str, int | None]) -> dict[str, float | None]:
    """CPU seconds so far of each named process tree (a process and its descendants: the
    app's workers, taskiq's), of this process alone (``bench_client``) and of the machine."""
    table = proc_table()
    out: dict[str, float | None] = {}
    for name, root in trees.items():
        pids = descendants(table, root) if root is not None else []
        out[name] = sum(table[p][1] for p in pids) if pids else None
        if len(pids) > 1:  # each member too, as "<tree>/<pid>" (not added to the totals)
            out.update({f"{name}/{p}": table[p][1] for p in pids})
    own = table.get(os.getpid())
    out["bench_client"] = own[1] if own else None
    out["machine_busy"], out["machine_steal"] = machine_cpu_s()
    return out


def cpu_report(
    before: Mapping[str, float | None], after: Mapping[str, float | None], jobs: int, wall_s: float
) -> dict[str, Any]:
    """Per process (tree): CPU seconds, ms per job, % of one core, share of the processes
    measured; each member of a tree of several (``app/<pid>``: the supervisor and its workers);
    ``other_processes``: what else the machine was busy with (it skews figures), and the time
    the hypervisor gave the machine's CPUs to others (steal)."""
    spent = cpu_spent(before, after)
    busy, steal = spent.pop("machine_busy", None), spent.pop("machine_steal", None)
    members = {k: spent.pop(k) for k in [k for k in spent if "/" in k]}
    total = sum(v for v in spent.values() if v is not None)
    out: dict[str, Any] = {}
    for name, used in spent.items():
        if used is None:
            out[name] = None
            continue
        out[name] = {
            "cpu_s": round(used, 3),
            "ms_per_job": round(used * 1000 / jobs, 3) if jobs else None,
            "pct_of_one_core": round(used / wall_s * 100, 1) if wall_s > 0 else None,
            "share": round(used / total, 3) if total else None,
        }
    out["tree_members_cpu_s"] = {k: rnd(v, 3) for k, v in members.items()}
    out["measured_total_cpu_s"] = round(total, 3)
    out["other_processes_cpu_s"] = round(busy - total, 3) if busy is not None else None
    out["stolen_by_hypervisor_cpu_s"] = rnd(steal, 3)
    out["wall_s"] = round(wall_s, 3)
    return out


# -- the system under test ---------------------------------------------------------------------


def app_env(redis_url: str, app_port: int, broker_url: str) -> dict[str, str]:
    """``tierq serve``'s environment: the no-op model ``sim``, every limit raised."""
    limits = {"paid": RAISED, "free": RAISED}
    model = {
        "provider": "simulated",
        "experiences": ["stream", "batch"],
        "limits": limits,
        "tokens": 0,
        "token_latency_ms": 0,
    }
    queues = {q: {"parallelism": PARALLELISM, "admission_depth": RAISED} for q in QUEUE_IDS}
    return serve_env(
        redis_url=redis_url,
        key_prefix=APP_KEY_PREFIX,
        app_port=app_port,
        broker_url=broker_url,
        api_keys={PAID_KEY: {"id": "bench-jobs", "plan": "paid"}},
        queue_parallelism=PARALLELISM,
        extra={
            "TIERQ_MODELS": json.dumps({"sim": model}),
            "TIERQ_SERVICES": json.dumps({"chat": {"experiences": ["stream", "batch"],
                                                   "models": ["sim"]}}),
            "TIERQ_QUEUES": json.dumps(queues),
            "TIERQ_USER_LIMITS": json.dumps(limits),
            "TIERQ_USER_QUEUE_LIMITS": json.dumps(limits),
        },
    )  # fmt: skip


def serve_has_workers(src: Path) -> bool:
    """Whether ``tierq serve`` of the code in ``src`` takes ``--workers``."""
    env = {**clean_env(), "PYTHONPATH": pythonpath(src), "COLUMNS": "200", "NO_COLOR": "1"}
    try:
        out = subprocess.run(
            [sys.executable, "-m", "tierq", "serve", "--help"],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--workers" in out.stdout + out.stderr


def stop_leftovers(pids: Sequence[int]) -> None:
    """Processes of the app's tree (its workers) still alive after the app stopped: ended by
    id (they were started by this bench's own subprocess)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [p for p in pids if Path(f"/proc/{p}").exists()]
        for pid in alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        if not alive:
            return
        time.sleep(1.0)


@contextlib.contextmanager
def running_system(workdir: Path, src: Path, workers: int | None) -> Iterator[System]:
    """Both Redis servers, the broker, the app (``--workers N`` when given), all from the code
    in ``src``; stopped at the end (with any of the app's workers left behind)."""
    broker_redis = EmbeddedRedis(workdir / "broker-redis")
    app_redis = EmbeddedRedis(workdir / "app-redis")
    broker_port, app_port = free_port(), free_port()
    path = {"PYTHONPATH": pythonpath(src)}
    tree: list[int] = []
    try:
        broker_redis.start()
        app_redis.start()
        broker = broker_proc(workdir, broker_port, broker_redis.url, BROKER_KEY_PREFIX, path)
        env = {**app_env(app_redis.url, app_port, f"http://{HOST}:{broker_port}"), **path}
        args = [sys.executable, "-m", "tierq", "serve", "--host", HOST, "--port", str(app_port)]
        if workers is not None:
            args += ["--workers", str(workers)]
        app = Proc("app", args, env, workdir / "app.log")
        system = System(app_port, broker_port, app, broker, app_redis, broker_redis)
        ready = [(broker, f"{system.broker_url}/healthz"), (app, f"{system.app_url}/healthz")]
        with procs_running(ready, workdir):
            tree = descendants(proc_table(), app.pid)[1:]
            yield system
    finally:
        stop_leftovers(tree)
        app_redis.stop()
        broker_redis.stop()


def system_trees(system: System) -> dict[str, int | None]:
    pids = system.pids()
    return {k: pids[k] for k in ("app", "broker", "app_redis", "broker_redis")}


# -- submitting over raw HTTP/1.1 ----------------------------------------------------------------


def submit_request(port: int, index: int) -> bytes:
    body = orjson.dumps(
        {
            "service": "chat",
            "experience": "batch",
            "mode": "auto",
            "model": "sim",
            "input": {"prompt": f"j{index}", "simulate": {"tokens": 0, "token_latency_ms": 0}},
        }
    )
    return json_post(port, "/api/jobs", body, {"Authorization": f"Bearer {PAID_KEY}"})


@dataclass
class Job:
    """A submitted job (or a taskiq task), and what its record said."""

    job_id: str
    key: str  # what the bench polls: the job record, or the task's result key
    submit_ms: float  # client wall clock just before the request was written
    request_ms: float  # how long the submit took
    lag_ms: float = 0.0  # open loop: how late the submit left, against its schedule
    status: str | None = None
    created: int | None = None
    started: int | None = None
    finished: int | None = None
    attempts: int | None = None
    seen_ms: float | None = None  # when the bench first saw it terminal

    @property
    def done(self) -> bool:
        return self.status in TERMINAL


@dataclass
class Batch:
    """What a batch of submits gave so far (filled as they return, so a deadline keeps it)."""

    jobs: list[Job] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    first_ms: float | None = None
    last_reply_ms: float | None = None
    submitting: bool = True
    in_flight: int = 0
    max_in_flight: int = 0


def tierq_submitter(port: int, keys: AppKeys) -> Callable[[HttpConn, int], Awaitable[Job | str]]:
    async def submit(conn: HttpConn, index: int) -> Job | str:
        data = submit_request(port, index)
        start_ms, t0 = now_ms(), time.perf_counter()
        try:
            status, body = await conn.request(data)
        except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
            return type(exc).__name__
        request_ms = (time.perf_counter() - t0) * 1000
        if status != 202:
            return f"submit {status}: {body[:80].decode(errors='replace')}"
        job_id = orjson.loads(body)["jobId"]
        return Job(job_id, keys.job(job_id), start_ms, request_ms)

    return submit


def record(batch: Batch, got: Job | str) -> None:
    if isinstance(got, str):
        batch.errors[got] += 1
    else:
        batch.jobs.append(got)
    batch.last_reply_ms = now_ms()


async def closed_loop(
    n: int, concurrency: int, submit: Callable[[int], Awaitable[Job | str]], batch: Batch
) -> None:
    """Submit ``n`` jobs from ``concurrency`` submitters (each its own connection, held by
    ``submit``), each sending its next one as soon as the last returned."""
    todo = iter(range(n))
    batch.first_ms = now_ms()

    async def submitter() -> None:
        for index in todo:
            record(batch, await submit(index))

    try:
        await asyncio.gather(*(submitter() for _ in range(min(concurrency, n))))
    finally:
        batch.submitting = False


# -- following jobs to their end -----------------------------------------------------------------


class Probe:
    """Reads what the bench needs from a Redis server, counting every command it sends."""

    def __init__(self, url: str) -> None:
        self.r: aioredis.Redis = aioredis.Redis.from_url(url, decode_responses=True)
        self.own: Counter[str] = Counter()

    async def aclose(self) -> None:
        await self.r.aclose()

    async def poll_records(self, jobs: Sequence[Job]) -> None:
        """One pipelined ``HGET status`` per job record."""
        pipe = self.r.pipeline(transaction=False)
        for job in jobs:
            pipe.hget(job.key, "status")
        rows = await pipe.execute()
        self.own["hget"] += len(jobs)
        seen = now_ms()
        for job, status in zip(jobs, rows, strict=True):
            job.status = status
            if job.done:
                job.seen_ms = seen

    async def poll_results(self, jobs: Sequence[Job]) -> None:
        """One pipelined ``EXISTS`` per taskiq result key."""
        pipe = self.r.pipeline(transaction=False)
        for job in jobs:
            pipe.exists(job.key)
        rows = await pipe.execute()
        self.own["exists"] += len(jobs)
        seen = now_ms()
        for job, exists in zip(jobs, rows, strict=True):
            if exists:
                job.status, job.seen_ms = "completed", seen

    async def read_records(self, jobs: Sequence[Job]) -> None:
        """Every job's record (not counted: only after the measured window)."""
        for at in range(0, len(jobs), READ_CHUNK):
            chunk = jobs[at : at + READ_CHUNK]
            pipe = self.r.pipeline(transaction=False)
            for job in chunk:
                pipe.hmget(job.key, list(RECORD_FIELDS))
            for job, row in zip(chunk, await pipe.execute(), strict=True):
                status, created, started, finished, attempts = row
                job.status = status
                job.created = int(created) if created else None
                job.started = int(started) if started else None
                job.finished = int(finished) if finished else None
                job.attempts = int(attempts) if attempts else None

    async def reading(self) -> Reading:
        calls = commandstats_calls(await self.r.info("commandstats"))
        processed = int((await self.r.info("stats"))["total_commands_processed"])
        return Reading(time.monotonic(), calls, processed, Counter(self.own))

    async def reset(self) -> None:
        await self.r.config_resetstat()


async def follow(
    batch: Batch, poll: Callable[[Sequence[Job]], Awaitable[None]], deadline_at: float
) -> bool:
    """Poll the oldest jobs not yet seen terminal (at most ``POLL_BATCH``, every ``POLL_S``)
    until the submits are over and every job is terminal; ``False`` past ``deadline_at`` (a
    ``time.monotonic`` value)."""
    oldest = 0
    while True:
        jobs = batch.jobs
        while oldest < len(jobs) and jobs[oldest].done:
            oldest += 1
        pending: list[Job] = []
        for job in jobs[oldest:]:
            if not job.done:
                pending.append(job)
                if len(pending) == POLL_BATCH:
                    break
        if not pending and not batch.submitting:
            return True
        if time.monotonic() > deadline_at:
            return False
        if pending:
            await poll(pending)
        await asyncio.sleep(POLL_S)


# -- Redis commands per job ----------------------------------------------------------------------


@dataclass
class Reading:
    at: float  # time.monotonic
    calls: dict[str, int]
    processed: int
    own: Counter[str]


def commands_between(a: Reading, b: Reading) -> tuple[dict[str, int], int, float]:
    """Commands Redis ran between two readings, the bench's own subtracted (its polls, and
    every ``INFO``/``CONFIG``: neither tierq nor taskiq sends those); total processed; seconds
    between them."""
    own = b.own - a.own
    calls = {k: b.calls.get(k, 0) - a.calls.get(k, 0) - own.get(k, 0) for k in b.calls}
    bench_admin = sum(
        calls.pop(k, 0) for k in [k for k in calls if k.startswith(("info", "config"))]
    )
    processed = b.processed - a.processed - sum(own.values()) - bench_admin
    return {k: v for k, v in calls.items() if v > 0}, processed, b.at - a.at


async def idle_rates(probe: Probe) -> tuple[float, float]:
    """Commands (commandstats calls, processed) per second while nothing is submitted."""
    a = await probe.reading()
    await asyncio.sleep(IDLE_S)
    calls, processed, span = commands_between(a, await probe.reading())
    return sum(calls.values()) / span, processed / span


async def wait_quiet(probe: Probe, idle_processed_per_s: float) -> None:
    """Until the server runs no more than its idle rate (and a little) per 0.5 s: the leases'
    releases and clean-up after the last terminal event are part of a job's cost."""
    deadline = time.monotonic() + QUIET_DEADLINE_S
    last = await probe.reading()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        now = await probe.reading()
        _, processed, span = commands_between(last, now)
        if processed <= idle_processed_per_s * span + 2:
            return
        last = now


def redis_report(a: Reading, b: Reading, jobs: int, idle: tuple[float, float]) -> dict[str, Any]:
    calls, processed, span = commands_between(a, b)
    total = sum(calls.values())
    scripts = sum(v for k, v in calls.items() if k in {"evalsha", "eval", "fcall"})
    ordered = sorted(calls.items(), key=lambda kv: -kv[1])
    per = max(jobs, 1)
    return {
        "commands_per_job": round(total / per, 2),
        "commands_per_job_idle_corrected": round((total - idle[0] * span) / per, 2),
        "processed_per_job": round(processed / per, 2),
        "processed_per_job_idle_corrected": round((processed - idle[1] * span) / per, 2),
        "script_calls_per_job": round(scripts / per, 2),
        "top_per_job": {k: round(v / per, 2) for k, v in ordered[:TOP_COMMANDS]},
        "calls": dict(ordered),
        "commands": total,
        "processed": processed,
        "measured_s": round(span, 2),
        "idle_calls_per_s": round(idle[0], 2),
        "idle_processed_per_s": round(idle[1], 2),
        "bench_own_subtracted": dict(b.own - a.own),
    }


# -- one measured batch (tierq or taskiq) --------------------------------------------------------


@dataclass
class Measured:
    """A batch of jobs, measured: the jobs, whether they all ended in time, the readings."""

    batch: Batch
    finished: bool
    wall_s: float
    cpu: dict[str, Any]
    redis: dict[str, dict[str, Any]]


async def measured(
    run: Callable[[Batch], Coroutine[Any, Any, None]],
    poll: Callable[[Sequence[Job]], Awaitable[None]],
    probes: Mapping[str, Probe],
    trees: Mapping[str, int | None],
    deadline_s: float,
) -> Measured:
    """Idle rates, ``CONFIG RESETSTAT`` and a reading of every probed Redis; CPU; ``run``
    (which submits into the batch) while ``follow`` polls until every job is terminal; CPU;
    the traffic settles; the readings again. Every wait is bounded by ``deadline_s``."""
    idle = {name: await idle_rates(p) for name, p in probes.items()}
    for p in probes.values():
        await p.reset()
    before = {name: await p.reading() for name, p in probes.items()}
    cpu_before, t0 = cpu_reading(trees), time.monotonic()
    batch = Batch()
    submits = asyncio.create_task(run(batch))
    finished = await follow(batch, poll, t0 + deadline_s)
    cpu_after, wall = cpu_reading(trees), time.monotonic() - t0
    if not submits.done():
        submits.cancel()
    await asyncio.gather(submits, return_exceptions=True)
    for name, p in probes.items():
        await wait_quiet(p, idle[name][1])
    after = {name: await p.reading() for name, p in probes.items()}
    jobs = len(batch.jobs)
    return Measured(
        batch,
        finished,
        wall,
        cpu_report(cpu_before, cpu_after, jobs, wall),
        {name: redis_report(before[name], after[name], jobs, idle[name]) for name in probes},
    )


def ms_summary(values: Sequence[float | None]) -> dict[str, Any]:
    return summary([float(v) for v in values if v is not None])


def slowest_starts(jobs: Sequence[Job], keep: int = 5) -> dict[str, Any]:
    """The jobs that waited longest from submit to ``started`` (ids to look up in the app's
    log), and how many ran more than once."""
    waits = sorted(
        ((j.started - j.submit_ms, j) for j in jobs if j.started is not None), key=lambda w: -w[0]
    )
    return {
        "slowest_submit_to_started": [
            {"job_id": j.job_id, "ms": round(ms, 1), "attempts": j.attempts}
            for ms, j in waits[:keep]
        ],
        "jobs_run_more_than_once": sum(1 for j in jobs if (j.attempts or 0) > 1),
    }


def timing_report(m: Measured, n: int) -> dict[str, Any]:
    """Jobs/s (end = the last job's own end stamp, and as the bench saw it), submit phase."""
    batch, jobs = m.batch, m.batch.jobs
    ok = [j for j in jobs if j.status == "completed"]
    first = batch.first_ms
    last_end = max((j.finished for j in ok if j.finished is not None), default=None)
    last_seen = max((j.seen_ms for j in ok if j.seen_ms is not None), default=None)
    span = (last_end - first) / 1000 if first and last_end else None
    seen_span = (last_seen - first) / 1000 if first and last_seen else None
    submit_s = (batch.last_reply_ms - first) / 1000 if first and batch.last_reply_ms else None
    complete = m.finished and len(ok) == n
    return {
        "jobs": n,
        "finished": complete,
        "submitted": len(jobs),
        "completed": len(ok),
        "statuses": dict(Counter(str(j.status) for j in jobs)),
        "submit_errors": dict(batch.errors.most_common(5)),
        "span_s": rnd(span, 3),
        "jobs_per_s": round(len(ok) / span, 1) if complete and span else None,
        "seen_span_s": rnd(seen_span, 3),
        "jobs_per_s_seen": round(len(ok) / seen_span, 1) if complete and seen_span else None,
        "submit_phase_s": rnd(submit_s, 3),
        "submit_req_per_s": round(len(jobs) / submit_s, 1) if submit_s else None,
        "submit_request_ms": ms_summary([j.request_ms for j in jobs]),
    }


# -- scenarios -----------------------------------------------------------------------------------


async def tierq_batch(
    system: System, n: int, concurrency: int, deadline_s: float, *, measure: bool = True
) -> tuple[Measured, Probe]:
    """``n`` no-op jobs with ``concurrency`` submits in flight, followed to their end."""
    keys = AppKeys(APP_KEY_PREFIX)
    pool = ConnPool(system.app_port)  # closed loop: at most ``concurrency`` connections
    one = functools.partial(pool.submit, tierq_submitter(system.app_port, keys))

    async def run(batch: Batch) -> None:
        await closed_loop(n, concurrency, one, batch)

    app = Probe(system.app_redis.url)
    probes = {"app_redis": app, "broker_redis": Probe(system.broker_redis.url)} if measure else {}
    try:
        m = await measured(run, app.poll_records, probes, system_trees(system), deadline_s)
        await app.read_records(m.batch.jobs)
    finally:
        pool.close()
        for p in probes.values():
            if p is not app:
                await p.aclose()
    return m, app


async def warm_up(system: System) -> dict[str, Any]:
    """No-op jobs before a run is measured: connections, lazy set-up, first scripts loaded."""
    m, probe = await tierq_batch(
        system, WARMUP_JOBS, WARMUP_CONCURRENCY, WARMUP_DEADLINE_S, measure=False
    )
    await probe.aclose()
    await asyncio.sleep(SETTLE_S)
    done = sum(j.status == "completed" for j in m.batch.jobs)
    if not done:
        errors = dict(m.batch.errors.most_common(3))
        raise RuntimeError(f"no warm-up job completed; errors {errors}\n{system.app.tail()}")
    return {"jobs": WARMUP_JOBS, "completed": done, "finished": m.finished}


def throughput_deadline(n: int) -> float:
    return 60.0 + n / 20


async def throughput(system: System, n: int, concurrency: int) -> dict[str, Any]:
    m, probe = await tierq_batch(system, n, concurrency, throughput_deadline(n))
    await probe.aclose()
    jobs = [j for j in m.batch.jobs if j.status == "completed"]
    report = timing_report(m, n)
    report.update(
        {
            "deadline_s": throughput_deadline(n),
            "concurrency": concurrency,
            "submit_to_started_ms": ms_summary(
                [j.started - j.submit_ms if j.started else None for j in jobs]
            ),
            "submit_to_completed_ms": ms_summary(
                [j.finished - j.submit_ms if j.finished else None for j in jobs]
            ),
            "redis": m.redis,
            "cpu": m.cpu,
            **slowest_starts(jobs),
        }
    )
    broker = m.cpu.get("broker")
    report["broker_cpu_share"] = broker["share"] if broker else None
    return report


class ConnPool:
    """Idle connections to the app, a new one when none is idle (as many as the submits in
    flight)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.idle: list[HttpConn] = []
        self.all: list[HttpConn] = []

    def take(self) -> HttpConn:
        if self.idle:
            return self.idle.pop()
        conn = HttpConn(self.port)
        self.all.append(conn)
        return conn

    def give(self, conn: HttpConn) -> None:
        self.idle.append(conn)

    def close(self) -> None:
        for conn in self.all:
            conn.close()

    async def submit(
        self, submit: Callable[[HttpConn, int], Awaitable[Job | str]], index: int
    ) -> Job | str:
        """``submit`` job ``index`` on an idle connection (a new one when none is idle)."""
        conn = self.take()
        try:
            return await submit(conn, index)
        finally:
            self.give(conn)


async def open_loop(
    n: int, rate: float, submit: Callable[[int], Awaitable[Job | str]], batch: Batch
) -> None:
    """Submit job i at t0 + i / ``rate`` whatever the others do; each job's lag behind its
    schedule is kept."""

    async def one(index: int, lag_ms: float) -> None:
        batch.in_flight += 1
        batch.max_in_flight = max(batch.max_in_flight, batch.in_flight)
        try:
            got = await submit(index)
        finally:
            batch.in_flight -= 1
        if isinstance(got, Job):
            got.lag_ms = lag_ms
        record(batch, got)

    tasks: set[asyncio.Task[None]] = set()
    t0 = time.monotonic() + 0.01
    batch.first_ms = now_ms() + 10
    try:
        for index in range(n):
            target = t0 + index / rate
            delay = target - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            lag = max(0.0, (time.monotonic() - target) * 1000)
            task = asyncio.create_task(one(index, lag))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        batch.submitting = False


async def latency(system: System, rate: float, duration_s: float) -> dict[str, Any]:
    """Scenario 2: ``open_loop`` at ``rate`` for ``duration_s``; submit -> started."""
    n = max(1, round(rate * duration_s))
    deadline_s = duration_s + 60.0
    pool = ConnPool(system.app_port)
    one = functools.partial(pool.submit, tierq_submitter(system.app_port, AppKeys(APP_KEY_PREFIX)))

    async def run(batch: Batch) -> None:
        await open_loop(n, rate, one, batch)

    probe = Probe(system.app_redis.url)
    try:
        m = await measured(run, probe.poll_records, {}, system_trees(system), deadline_s)
        await probe.read_records(m.batch.jobs)
    finally:
        await probe.aclose()
        pool.close()
    batch = m.batch
    jobs = [j for j in batch.jobs if j.status == "completed"]
    sent = sorted(j.submit_ms for j in batch.jobs)
    achieved = (len(sent) - 1) / ((sent[-1] - sent[0]) / 1000) if len(sent) > 1 else None
    started = [j.started - j.submit_ms for j in jobs if j.started]
    return {
        "rate_per_s": round(rate, 1),
        "duration_s": duration_s,
        "jobs": n,
        "finished": m.finished and len(jobs) == n,
        "deadline_s": deadline_s,
        "completed": len(jobs),
        "statuses": dict(Counter(str(j.status) for j in batch.jobs)),
        "submit_errors": dict(batch.errors.most_common(5)),
        "achieved_rate_per_s": rnd(achieved, 1),
        "submit_to_started_ms": ms_summary(started),
        "submit_to_completed_ms": ms_summary(
            [j.finished - j.submit_ms for j in jobs if j.finished]
        ),
        "submit_request_ms": ms_summary([j.request_ms for j in batch.jobs]),
        "schedule_lag_ms": ms_summary([j.lag_ms for j in batch.jobs]),
        **slowest_starts(jobs),
        "max_submits_in_flight": batch.max_in_flight,
        "connections_used": len(pool.all),
        "requests_resent_on_a_new_connection": sum(c.reopened for c in pool.all),
        "cpu": m.cpu,
    }


# -- the peer: taskiq ----------------------------------------------------------------------------


def taskiq_installed() -> bool:
    """Whether the ``bench`` extra (taskiq, taskiq-redis) can be imported."""
    try:
        for name in ("taskiq", "taskiq_redis"):
            importlib.import_module(name)
    except ImportError:
        return False
    return True


async def taskiq_ready(url: str, proc: Proc) -> None:
    """Until ``TASKIQ_WORKERS`` clients wait in ``XREADGROUP`` (Redis 6.2 lists a consumer in
    its group only once it was given a message, so the connections are what shows them)."""
    r: aioredis.Redis = aioredis.Redis.from_url(url, decode_responses=True)
    deadline = time.monotonic() + TASKIQ_READY_S
    try:
        while True:
            if proc.proc is None or proc.proc.poll() is not None:
                raise RuntimeError(f"taskiq worker exited:\n{proc.tail()}")
            clients = await r.client_list()
            if sum(c.get("cmd") == "xreadgroup" for c in clients) >= TASKIQ_WORKERS:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"taskiq workers not ready in {TASKIQ_READY_S}s:\n{proc.tail()}")
            await asyncio.sleep(0.2)
    finally:
        await r.aclose()


async def taskiq_run(system: System, n: int, concurrency: int) -> dict[str, Any]:
    """``n`` no-op tasks through taskiq on the app's Redis server (tierq idle meanwhile)."""
    if not taskiq_installed():
        print(f"  taskiq: skipped ({BENCH_EXTRA_NOTE})", flush=True)
        return {"skipped": BENCH_EXTRA_NOTE}
    import taskiq_peer  # noqa: PLC0415 - only with the bench extra installed

    url = system.app_redis.url
    workdir = system.app.log.parent
    env = {**clean_env(), taskiq_peer.URL_ENV: url, "PYTHONPATH": str(BENCH_DIR)}
    args = [sys.executable, "-m", "taskiq", "worker", "--workers", str(TASKIQ_WORKERS),
            "taskiq_peer:broker"]  # fmt: skip
    proc = Proc("taskiq", args, env, workdir / "taskiq.log")
    deadline_s = throughput_deadline(n)
    kicker, noop = taskiq_peer.make_broker(url)
    probe = Probe(url)
    try:
        proc.start(BENCH_DIR)
        await taskiq_ready(url, proc)
        await kicker.startup()

        async def kick(_: int) -> Job | str:
            start_ms, t0 = now_ms(), time.perf_counter()
            try:
                task = await noop.kiq()
            except (OSError, aioredis.RedisError) as exc:
                return type(exc).__name__
            request_ms = (time.perf_counter() - t0) * 1000
            return Job(task.task_id, taskiq_peer.result_key(task.task_id), start_ms, request_ms)

        async def warm(batch: Batch) -> None:
            await closed_loop(WARMUP_JOBS, WARMUP_CONCURRENCY, kick, batch)

        async def run(batch: Batch) -> None:
            await closed_loop(n, concurrency, kick, batch)

        trees = {
            "taskiq_workers": proc.pid,
            "app_redis": system.pids()["app_redis"],
            "idle_tierq_app": system.app.pid,
            "idle_tierq_broker": system.broker.pid,
        }
        warm_up_run = await measured(warm, probe.poll_results, {}, trees, WARMUP_DEADLINE_S)
        await asyncio.sleep(SETTLE_S)
        m = await measured(run, probe.poll_results, {"app_redis": probe}, trees, deadline_s)
        await taskiq_results(url, kicker, m.batch.jobs)
        log_lines = log_flags(proc.log)
    finally:
        with contextlib.suppress(Exception):
            await kicker.shutdown()
        await probe.aclose()
        proc.stop()
    report = timing_report(m, n)
    report["submit_phase_note"] = "kick phase: kiq() of every task (XADD), no HTTP"
    report.update(
        {
            "warmup_completed": sum(j.done for j in warm_up_run.batch.jobs),
            "workers": TASKIQ_WORKERS,
            "broker": "taskiq_redis.RedisStreamBroker",
            "result_backend": "taskiq_redis.RedisAsyncResultBackend",
            "deadline_s": deadline_s,
            "concurrency": concurrency,
            "kick_to_run_end_ms": ms_summary(
                [j.finished - j.submit_ms if j.finished else None for j in m.batch.jobs]
            ),
            "redis": m.redis,
            "cpu": m.cpu,
            "worker_log": log_lines,
        }
    )
    return report


async def taskiq_results(url: str, kicker: Any, jobs: Sequence[Job]) -> None:
    """Every task's result (``MGET``, after the measured window): error flag, run stamp."""
    loadb = kicker.result_backend.serializer.loadb
    r: aioredis.Redis = aioredis.Redis.from_url(url)  # results are bytes (pickled)
    try:
        for at in range(0, len(jobs), READ_CHUNK):
            chunk = jobs[at : at + READ_CHUNK]
            for job, value in zip(chunk, await r.mget([j.key for j in chunk]), strict=True):
                if value is None:
                    continue
                result = loadb(value)
                job.status = "failed" if result.get("is_err") else "completed"
                stamp = result.get("return_value")
                job.finished = int(stamp) if isinstance(stamp, int | float) else None
    finally:
        await r.aclose()


# -- runs ----------------------------------------------------------------------------------------

Work = Callable[[System, dict[str, Any]], Awaitable[None]]
"""Runs scenarios on a system, writing each result into the dict as soon as it has it."""


def run_on_system(
    label: str, src: Path, workers: int | None, work: Work, log_dir: Path | None
) -> dict[str, Any]:
    """A fresh system from ``src`` in a temporary folder, ``work`` on it, stopped. An error
    (start-up included) is recorded beside what was measured before it, and the runs go on."""
    out: dict[str, Any] = {}
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tierq-jobs-") as tmp:
        workdir = Path(tmp)
        try:
            with running_system(workdir, src, workers) as system:
                run_async(lambda: work(system, out))
        except Exception as exc:  # recorded, then the other runs go on
            out["error"] = f"{type(exc).__name__}: {exc}"[:3000]
            print(f"  [{label}] failed: {out['error'][:600]}", file=sys.stderr, flush=True)
        logs = [workdir / f"{name}.log" for name in ("app", "broker", "taskiq")]
        logs = [log for log in logs if log.exists()]
        out["logs"] = {log.stem: log_flags(log) for log in logs}
        copy_logs(logs, log_dir, prefix=f"{label}-")
    out["elapsed_s"] = round(time.monotonic() - t0, 1)
    return out


def run_tree(label: str, src: Path, args: argparse.Namespace, *, peer: bool) -> dict[str, Any]:
    """The chosen scenarios against the code in ``src``: one fresh system per ``--workers``
    value (scenario 3), or one system; scenarios 2 and 4 on the last of them."""
    only: set[str] = args.only
    supported = serve_has_workers(src)
    counts: list[int | None]
    if supported:
        counts = list(args.workers) if "workers" in only else [max(args.workers)]
    else:
        counts = [None]
    print(f"[{label}] code from {src}; serve --workers: {supported}", flush=True)
    tree: dict[str, Any] = {
        "src": str(src),
        "workers": [c for c in counts if c is not None] if supported else "unsupported",
        "systems": {},
    }
    for at, workers in enumerate(counts):
        last = at == len(counts) - 1
        name = f"workers={workers}" if workers is not None else "default"

        async def work(
            system: System, out: dict[str, Any], name: str = name, last: bool = last
        ) -> None:
            await scenarios(system, out, args, f"{label} {name}", last=last, peer=peer)

        out = run_on_system(f"{label}-{name.replace('=', '')}", src, workers, work, args.log_dir)
        tree["systems"][name] = {"workers": workers if workers is not None else "default", **out}
    tree["summary"] = tree_summary(tree)
    return tree


async def scenarios(
    system: System,
    out: dict[str, Any],
    args: argparse.Namespace,
    label: str,
    *,
    last: bool,
    peer: bool,
) -> None:
    only: set[str] = args.only
    out["warmup"] = await warm_up(system)
    need_peak = last and "latency" in only and args.rate is None
    if only & {"throughput", "workers"} or need_peak:
        await asyncio.sleep(SETTLE_S)
        out["throughput"] = await throughput(system, args.jobs, args.concurrency)
        print(f"  [{label}] throughput: {short_throughput(out['throughput'])}", flush=True)
    if last and "latency" in only:
        peak = (out.get("throughput") or {}).get("jobs_per_s")
        rate = args.rate or (0.5 * peak if peak else None)
        if rate is None:
            out["latency"] = {"skipped": "no peak: scenario 1 did not finish", "finished": False}
        else:
            await asyncio.sleep(SETTLE_S)
            out["latency"] = await latency(system, rate, args.latency_s)
        print(f"  [{label}] latency: {short_latency(out['latency'])}", flush=True)
    if last and peer and "taskiq" in only:
        await asyncio.sleep(SETTLE_S)
        out["taskiq"] = await taskiq_run(system, args.taskiq_jobs, args.concurrency)
        if "skipped" not in out["taskiq"]:
            print(f"  [{label}] taskiq: {short_throughput(out['taskiq'])}", flush=True)


def dig(doc: Mapping[str, Any] | None, *path: str) -> Any:
    for key in path:
        if not isinstance(doc, Mapping):
            return None
        doc = doc.get(key)
    return doc


def machine_cores() -> int:
    return len(os.sched_getaffinity(0))


def cores_busy(systems: list[dict[str, Any]]) -> dict[str, Any]:
    """Per ``--workers`` value: the cores every measured process kept busy on average during
    scenario 1 (its CPU seconds over its wall time; this machine has ``machine_cores()``)."""
    out: dict[str, Any] = {}
    for s in systems:
        cpu = dig(s, "throughput", "cpu")
        if cpu and cpu.get("wall_s"):
            out[str(s["workers"])] = rnd(cpu["measured_total_cpu_s"] / cpu["wall_s"], 2)
    return out


def tree_summary(tree: dict[str, Any]) -> dict[str, Any]:
    """The headline figures: of the last system (the most workers), the scaling over all."""
    systems = list(tree["systems"].values())
    main = systems[-1] if systems else {}
    t, lat, peer = main.get("throughput"), main.get("latency"), main.get("taskiq")
    by_workers = {
        str(s["workers"]): dig(s, "throughput", "jobs_per_s")
        for s in systems
        if s.get("throughput")
    }
    rates = list(by_workers.values())
    scaling: Any = "unsupported" if tree["workers"] == "unsupported" else "not measured"
    if len(rates) >= 2:
        scaling = ratio(rates[-1], rates[0])
    peer_rate = dig(peer, "jobs_per_s")
    jobs_per_s = dig(t, "jobs_per_s")
    busy, ceiling = cores_busy(systems), None
    if len(rates) >= 2 and rates[0]:
        # the most jobs/s this machine's cores could do at the CPU per job (every process
        # measured) of the most workers, over the jobs/s of one: what scaling can reach here
        cpu_s = dig(main, "throughput", "cpu", "measured_total_cpu_s")
        jobs = dig(main, "throughput", "jobs")
        if cpu_s and jobs:
            ceiling = ratio(machine_cores() / (cpu_s / jobs), rates[0])
    return {
        "workers": main.get("workers"),
        "jobs_per_s": jobs_per_s,
        "submit_req_per_s": dig(t, "submit_req_per_s"),
        "app_commands_per_job": dig(t, "redis", "app_redis", "commands_per_job"),
        "app_processed_per_job": dig(t, "redis", "app_redis", "processed_per_job"),
        "app_script_calls_per_job": dig(t, "redis", "app_redis", "script_calls_per_job"),
        "broker_commands_per_job": dig(t, "redis", "broker_redis", "commands_per_job"),
        "app_cpu_ms_per_job": dig(t, "cpu", "app", "ms_per_job"),
        "broker_cpu_ms_per_job": dig(t, "cpu", "broker", "ms_per_job"),
        "broker_cpu_share": dig(t, "broker_cpu_share"),
        "latency_rate_per_s": dig(lat, "rate_per_s"),
        "started_p50_ms": dig(lat, "submit_to_started_ms", "p50"),
        "started_p99_ms": dig(lat, "submit_to_started_ms", "p99"),
        "jobs_per_s_by_workers": by_workers,
        "workers_scaling": scaling,
        "cores_busy_by_workers": busy,
        "workers_scaling_ceiling": ceiling,
        "taskiq_jobs_per_s": peer_rate if peer_rate is not None else dig(peer, "skipped"),
        "tierq_over_taskiq": ratio(jobs_per_s, peer_rate) if peer_rate else None,
    }


COMPARED = (
    "jobs_per_s", "submit_req_per_s", "app_commands_per_job", "broker_commands_per_job",
    "app_cpu_ms_per_job", "broker_cpu_ms_per_job", "started_p50_ms", "started_p99_ms",
)  # fmt: skip


def baseline_ratios(current: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    cur, base = current.get("summary") or {}, baseline.get("summary") or {}
    return {k: {"current": cur.get(k), "baseline": base.get(k),
                "ratio": ratio(cur.get(k), base.get(k))} for k in COMPARED}  # fmt: skip


def median_ratios(pairs: list[dict[str, Any]]) -> dict[str, tuple[float | None, list[Any]]]:
    """Per compared figure: the median of the pairs' ratios, and the ratios themselves."""
    out: dict[str, tuple[float | None, list[Any]]] = {}
    for name in COMPARED:
        each = [pair[name]["ratio"] for pair in pairs if name in pair]
        known = [r for r in each if r is not None]
        out[name] = (rnd(statistics.median(known), 3) if known else None, each)
    return out


def targets(summary_: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets against the current tree's figures (reported, never asserted)."""
    rows = []
    for name, goal in TARGETS.items():
        value = summary_.get(name)
        at_most = name in {"app_commands_per_job", "started_p50_ms", "started_p99_ms"}
        met = None
        if isinstance(value, int | float):
            met = value <= goal if at_most else value >= goal
        text = f"{'<=' if at_most else '>='} {goal:g}"
        if name == "jobs_per_s":
            text += f" (workers {summary_.get('workers')}; the issue's is 2)"
        rows.append({"figure": name, "value": value, "target": text, "met": met})
    return rows


# -- output --------------------------------------------------------------------------------------


def short_throughput(r: dict[str, Any]) -> str:
    app = dig(r, "redis", "app_redis", "commands_per_job")
    return (
        f"{r['completed']}/{r['jobs']} completed, {r['jobs_per_s']} jobs/s, submit "
        f"{r['submit_req_per_s']} req/s (p50 {r['submit_request_ms']['p50']} ms), "
        f"{app} Redis commands/job, finished {r['finished']}"
    )


def short_latency(r: dict[str, Any]) -> str:
    if "skipped" in r:
        return str(r["skipped"])
    s = r["submit_to_started_ms"]
    return (
        f"{r['completed']}/{r['jobs']} at {r['rate_per_s']}/s (achieved "
        f"{r['achieved_rate_per_s']}/s): submit->started p50 {s['p50']} ms, p99 {s['p99']} ms; "
        f"other load {other_pct(r)}% of a core"
    )


def other_pct(r: dict[str, Any]) -> int | None:
    """The CPU of everything else on the machine during a scenario, in % of one core."""
    other, wall = dig(r, "cpu", "other_processes_cpu_s"), dig(r, "cpu", "wall_s")
    return round(other / wall * 100) if other is not None and wall else None


def cpu_ms(r: dict[str, Any], name: str) -> Any:
    return dig(r, "cpu", name, "ms_per_job")


def print_table(runs: dict[str, dict[str, Any]], rows: list[dict[str, Any]]) -> None:
    """Per system: jobs/s, submit req/s, Redis commands per job (app, broker), CPU ms per job
    (app or taskiq workers, broker, app Redis, bench client), broker's share of the CPU, and
    the CPU of everything else on the machine, in % of one core (other load skews the run)."""
    print(
        f"\n{'run':9} {'system':10} {'done':>9} {'jobs/s':>7} {'submit/s':>8} {'cmd/job':>7} "
        f"{'brk_cmd':>7} {'app_ms':>6} {'brk_ms':>6} {'rds_ms':>6} {'cli_ms':>6} {'brk%':>5} "
        f"{'other%':>6}"
    )
    for run, tree in runs.items():
        for name, system in tree.get("systems", {}).items():
            if "error" in system:
                print(f"{run:9} {name:10} error: {system['error'][:150]}")
            for label, r in (("", system.get("throughput")), ("taskiq", system.get("taskiq"))):
                if not r or "skipped" in r:
                    continue
                share = dig(r, "broker_cpu_share")
                print(
                    f"{run:9} {label or name:10} {r['completed']:>4}/{r['jobs']:<4} "
                    f"{r['jobs_per_s']!s:>7} {r['submit_req_per_s']!s:>8} "
                    f"{dig(r, 'redis', 'app_redis', 'commands_per_job')!s:>7} "
                    f"{dig(r, 'redis', 'broker_redis', 'commands_per_job')!s:>7} "
                    f"{cpu_ms(r, 'app') or cpu_ms(r, 'taskiq_workers')!s:>6} "
                    f"{cpu_ms(r, 'broker')!s:>6} {cpu_ms(r, 'app_redis')!s:>6} "
                    f"{cpu_ms(r, 'bench_client')!s:>6} "
                    f"{'' if share is None else round(share * 100)!s:>5} {other_pct(r)!s:>6}"
                )
            if system.get("latency"):
                print(f"{run:9} {name:10} latency: {short_latency(system['latency'])}")
            peer = system.get("taskiq")
            if peer and "skipped" in peer:
                print(f"{run:9} {'taskiq':10} skipped: {peer['skipped']}")
    for run, tree in runs.items():
        s = tree.get("summary") or {}
        print(
            f"{run}: workers scaling {s.get('workers_scaling')} "
            f"({s.get('jobs_per_s_by_workers')}), tierq/taskiq {s.get('tierq_over_taskiq')}"
        )
        if s.get("workers_scaling_ceiling") is not None:
            print(
                f"{run}: cores busy {s.get('cores_busy_by_workers')} of {machine_cores()}: "
                f"at the most workers' CPU per job this machine allows a scaling of at most "
                f"{s['workers_scaling_ceiling']}"
            )
    print(f"\n{'figure':22} {'value':>12}  {'target':45} met")
    for row in rows:
        met = {True: "y", False: "n", None: "-"}[row["met"]]
        print(f"{row['figure']:22} {row['value']!s:>12}  {row['target']:45} {met}")


def print_ratios(table: dict[str, Any]) -> None:
    if table:
        print("\ncurrent / baseline")
        for name, v in table.items():
            print(f"  {name}: {v['current']} vs {v['baseline']} (x{v['ratio']})")


# -- driver --------------------------------------------------------------------------------------


def parse_only(text: str) -> set[str]:
    numbered = dict(zip("1234", SCENARIOS, strict=True))
    chosen = {numbered.get(p.strip(), p.strip().lower()) for p in text.split(",") if p.strip()}
    if not chosen or not chosen <= set(SCENARIOS):
        raise argparse.ArgumentTypeError(f"--only wants some of {','.join(SCENARIOS)} (or 1-4)")
    return chosen


def parse_workers(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--workers wants numbers like 1,2: {exc}") from exc
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("--workers wants numbers >= 1, e.g. 1,2")
    return counts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="300 jobs, 4 s of latency")
    parser.add_argument("--jobs", type=int, default=None, help="jobs of scenario 1 (2000)")
    parser.add_argument("--concurrency", type=int, default=64, help="submits in flight (64)")
    parser.add_argument(
        "--workers", type=parse_workers, default=(1, 2), help="serve --workers values (1,2)"
    )
    parser.add_argument("--latency-s", type=float, default=None, help="scenario 2 length (10)")
    parser.add_argument("--rate", type=float, default=None, help="scenario 2 rate (0.5 x peak)")
    parser.add_argument("--taskiq-jobs", type=int, default=None, help="scenario 4 (= --jobs)")
    parser.add_argument(
        "--only", type=parse_only, default=set(SCENARIOS), help=f"some of {','.join(SCENARIOS)}"
    )
    parser.add_argument("--baseline", default=None, help="git ref to run first and compare")
    parser.add_argument(
        "--repeat", type=int, default=1,
        help="with --baseline: N alternating (baseline, current) pairs; the median of their "
        "ratios (the VM's speed drifts by tens of percent within a run)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    parser.add_argument("--log-dir", type=Path, default=None, help="keep the processes' logs")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    args.jobs = args.jobs or sizes.jobs
    args.latency_s = args.latency_s or sizes.latency_s
    args.taskiq_jobs = args.taskiq_jobs or args.jobs
    return args


def config(args: argparse.Namespace, nofile: tuple[int, int]) -> dict[str, Any]:
    return {
        "quick": args.quick,
        "only": sorted(args.only),
        "jobs": args.jobs,
        "concurrency": args.concurrency,
        "workers": list(args.workers),
        "latency_s": args.latency_s,
        "latency_rate": args.rate or "0.5 x scenario 1's jobs/s",
        "taskiq_jobs": args.taskiq_jobs,
        "taskiq_workers": TASKIQ_WORKERS,
        "queue": QUEUE,
        "experience": "batch",
        "model": "simulated, 0 tokens, 0 ms",
        "queue_parallelism": PARALLELISM,
        "limits_raised_to": RAISED,
        "warmup_jobs": WARMUP_JOBS,
        "poll_s": POLL_S,
        "poll_batch": POLL_BATCH,
        "idle_s": IDLE_S,
        "client": "raw HTTP/1.1 keep-alive, one connection per submitter",
        "client_loop": "uvloop" if LOOP_FACTORY else "asyncio",
        "rlimit_nofile": list(nofile),
        "targets": TARGETS,
    }


NOTES = [
    "All processes (bench client, app, broker, two redis-servers, taskiq workers) share this "
    "machine's CPUs; other load (see loadavg and cpu.other_processes_cpu_s) moves the figures.",
    "jobs_per_s = completed / (last finishedAt - first submit): the app's end stamp, not the "
    "poll; jobs_per_s_seen uses when the bench saw the last one terminal (20 ms polls). For "
    "taskiq the end stamp is the time the last task ran (its return value).",
    "submit_req_per_s: the submit phase (first submit to last reply), while the workers are "
    "already running the jobs submitted before.",
    "Redis: commands_per_job counts INFO commandstats calls, which include each command a "
    "Lua script runs and the EVALSHA itself (Redis 6.2 counts them in "
    "total_commands_processed too); the bench's own HGET/EXISTS/INFO/CONFIG are subtracted; "
    "the _idle_corrected figures also subtract the idle rate over the measured span.",
    "CPU: app, broker and taskiq_workers are process trees (a parent and its workers); "
    "ms_per_job = CPU / jobs submitted; share = of the processes measured.",
    "taskiq runs on the app's Redis server after the tierq scenarios of the last system; the "
    "tierq processes sit idle then (idle_tierq_* CPU), and their idle Redis traffic is "
    "subtracted as the idle rate.",
]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    nofile = raise_nofile(at_least=8192)
    started = time.time()
    machine = machine_info(
        ("tierq", "httpx", "uvicorn", "starlette", "redis", "hiredis", "taskiq", "taskiq-redis")
    )
    runs: dict[str, dict[str, Any]] = {}
    pairs: list[dict[str, Any]] = []  # with --repeat: each alternating pair's ratios
    if args.baseline and args.only - {"taskiq"}:
        with worktree(args.baseline) as (path, commit):
            for i in range(1, args.repeat):  # the pairs before the last, which is kept below
                base = run_tree(f"baseline #{i}", path / "src", args, peer=False)
                cur = run_tree(f"current #{i}", ROOT / "src", args, peer=False)
                runs[f"baseline #{i}"], runs[f"current #{i}"] = base, cur
                pairs.append(baseline_ratios(cur, base))
            runs["baseline"] = {"ref": args.baseline, "commit": commit}
            runs["baseline"].update(run_tree("baseline", path / "src", args, peer=False))
    runs["current"] = {**current_tree_info(), **run_tree("current", ROOT / "src", args, peer=True)}
    table = baseline_ratios(runs["current"], runs["baseline"]) if "baseline" in runs else {}
    if table:
        pairs.append(table)
    rows = targets(runs["current"]["summary"])
    doc = {
        **results_head(
            "tierq job overhead (no-op jobs; broker + app subprocesses, two embedded Redis)",
            started,
            machine,
        ),
        "notes": NOTES,
        "config": config(args, nofile),
        "summary": runs["current"]["summary"],
        "targets": rows,
        "ratios_vs_baseline": table,
        "ratios_per_pair": pairs,
        "median_ratios": median_ratios(pairs),
        "runs": runs,
    }
    print_table(runs, rows)
    print_ratios(table)
    if len(pairs) > 1:
        print(f"\nmedian of {len(pairs)} alternating pairs' ratios (current / baseline)")
        for name, (value, each) in median_ratios(pairs).items():
            print(f"  {name}: x{value} ({', '.join(f'x{r}' for r in each)})")
    write_results(args.out, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
