"""End-to-end benchmark of tierq on loopback: broker + app as real processes, two real Redis.

What it measures (nothing here asserts on timing; every wait has a deadline):

1. throughput: M jobs submitted with bounded client concurrency, each followed over SSE to its
   terminal event; jobs/s end to end, submit→``started`` latency (the ``started`` event's ``ts``
   minus the client's submit time, one machine clock), submit request latency;
2. Redis commands per job on the app's own Redis (``CONFIG RESETSTAT`` before, ``INFO
   commandstats`` / ``INFO stats`` after);
3. SSE streams held at once: K hanging jobs, K concurrent SSE connections, held, cancelled, and
   the app's RSS before/while holding.

Usage::

    .venv/bin/python bench/e2e.py            # full run (1000 jobs, 500 held streams)
    .venv/bin/python bench/e2e.py --quick    # 100 jobs, 50 streams
    .venv/bin/python bench/e2e.py --out /tmp/e2e.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import redis

import common
from common import (
    RESULTS_DIR,
    commandstats_calls,
    copy_logs,
    cpu_snapshot,
    cpu_spent,
    machine_info,
    now_ms,
    open_fds,
    raise_nofile,
    results_head,
    serve_env,
    summary,
    vm_rss_kib,
    write_results,
)
from tierq.broker.server.credentials import DEV_ACCOUNTS
from tierq.keys import AppKeys

T = TypeVar("T")

DEFAULT_OUT = RESULTS_DIR / "e2e.json"
PAID_KEY = "tq_bench_paid"
APP_KEY_PREFIX = "tqbench"
BROKER_KEY_PREFIX = "bench"
QUEUE_PARALLELISM = 64
HANG_QUEUE = "q_paid_stream"
TERMINAL = frozenset({"completed", "cancelled"})
START_DEADLINE_S = 60.0
CANCEL_ATTEMPTS = 3


# -- small helpers ---------------------------------------------------------------------------


def rss_mib(pid: int) -> float | None:
    """VmRSS of ``pid`` in MiB, ``None`` if unreadable."""
    kib = vm_rss_kib(pid)
    return None if kib is None else round(kib / 1024, 1)


# -- the system under test -------------------------------------------------------------------


@dataclass
class System(common.System):
    """The running system, and a client of the app's Redis for the bench's own reads."""

    redis: redis.Redis


def app_env(redis_url: str, app_port: int, broker_url: str, job_timeout_s: float) -> dict[str, str]:
    limits = {"paid": 10_000, "free": 10_000}
    model = {"token_latency_ms": 0, "tokens": 8, "timeout_s": job_timeout_s, "limits": limits}
    return serve_env(
        redis_url=redis_url,
        key_prefix=APP_KEY_PREFIX,
        app_port=app_port,
        broker_url=broker_url,
        api_keys={PAID_KEY: {"id": "bench-paid", "plan": "paid"}},
        queue_parallelism=QUEUE_PARALLELISM,
        extra={
            "TIERQ_USER_LIMITS": json.dumps(limits),
            "TIERQ_USER_QUEUE_LIMITS": json.dumps(limits),
            "TIERQ_MODELS": json.dumps({"sim": model}),
            "TIERQ_JOB_TIMEOUT_S": str(job_timeout_s),
        },
    )


@contextlib.contextmanager
def running_system(workdir: Path, job_timeout_s: float, redis_query: str) -> Iterator[System]:
    """The system (the installed tierq); the app's Redis URL gets ``redis_query`` appended. On a
    failure the processes' log tails go to stderr."""

    def env(redis_url: str, app_port: int, broker_url: str) -> dict[str, str]:
        return app_env(redis_url + redis_query, app_port, broker_url, job_timeout_s)

    with common.running_system(
        workdir, broker_key_prefix=BROKER_KEY_PREFIX, app_env=env, show_tails=True
    ) as system:
        client = redis.Redis.from_url(system.app_redis.url, decode_responses=True)
        try:
            yield System(**vars(system), redis=client)
        finally:
            client.close()


# -- SSE ---------------------------------------------------------------------------------------


@dataclass
class SseEvent:
    type: str
    data: dict[str, Any]
    id: str
    recv_ms: float


async def follow_sse(
    client: httpx.AsyncClient, url: str, on_event: Callable[[SseEvent], None]
) -> str | None:
    """Read one job's SSE stream until its terminal event (or the server ends it); returns the
    terminal type, or ``None`` when the stream ended without one."""
    async with client.stream("GET", url, headers={"Accept": "text/event-stream"}) as res:
        if res.status_code != 200:
            await res.aread()
            raise RuntimeError(f"SSE {res.status_code}: {res.text[:200]}")
        fields: dict[str, str] = {}
        async for line in res.aiter_lines():
            if line:
                if not line.startswith(":"):
                    name, _, value = line.partition(":")
                    value = value.removeprefix(" ")
                    fields[name] = f"{fields[name]}\n{value}" if name in fields else value
                continue
            if "data" in fields:
                data = json.loads(fields["data"])
                kind = str(data.get("type") or fields.get("event", ""))
                on_event(SseEvent(kind, data, fields.get("id", ""), now_ms()))
                if kind in TERMINAL or (kind == "failed" and not data.get("retryable")):
                    return kind
            fields = {}
    return None


def http_client(connections: int, read_timeout_s: float = 60.0) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        timeout=httpx.Timeout(30.0, read=read_timeout_s),
    )


async def bounded(limit: int, factories: Sequence[Callable[[], Awaitable[T]]]) -> list[T]:
    """Await every factory's result, at most ``limit`` at once; the results in order."""
    sem = asyncio.Semaphore(limit)

    async def one(factory: Callable[[], Awaitable[T]]) -> T:
        async with sem:
            return await factory()

    return await asyncio.gather(*(one(f) for f in factories))


def job_payload(tokens: int, *, hang: bool = False, prompt: str = "bench") -> dict[str, Any]:
    simulate: dict[str, Any] = {"fail": "hang"} if hang else {
        "tokens": tokens,
        "token_latency_ms": 0,
    }  # fmt: skip
    return {
        "service": "chat",
        "experience": "stream",
        "mode": "auto",
        "model": "sim",
        "input": {"prompt": prompt, "simulate": simulate},
    }


AUTH = {"Authorization": f"Bearer {PAID_KEY}"}


# -- phase: throughput -------------------------------------------------------------------------


@dataclass
class JobRun:
    submit_wall_ms: float = 0.0
    submit_perf: float = 0.0
    submit_latency_ms: float | None = None
    status: int | None = None
    started_ts: float | None = None
    completed_ts: float | None = None
    started_recv_ms: float | None = None
    done_perf: float | None = None
    done_recv_ms: float | None = None
    terminal: str | None = None
    error: str | None = None
    events: Counter[str] = field(default_factory=Counter)
    last_type: str | None = None
    job_id: str | None = None
    server_status: str | None = None


async def run_job(
    client: httpx.AsyncClient, base: str, payload: dict[str, Any], deadline_s: float
) -> JobRun:
    run = JobRun()

    def seen(ev: SseEvent) -> None:
        run.events[ev.type] += 1
        run.last_type = ev.type
        if ev.type == "started" and run.started_ts is None:
            run.started_ts, run.started_recv_ms = ev.data.get("ts"), ev.recv_ms
        elif ev.type in TERMINAL or ev.type == "failed":
            run.completed_ts, run.done_recv_ms = ev.data.get("ts"), ev.recv_ms
            run.done_perf = time.perf_counter()

    try:
        async with asyncio.timeout(deadline_s):
            run.submit_wall_ms, run.submit_perf = now_ms(), time.perf_counter()
            res = await client.post(f"{base}/api/jobs", json=payload, headers=AUTH)
            run.submit_latency_ms = (time.perf_counter() - run.submit_perf) * 1000
            run.status = res.status_code
            if res.status_code != 202:
                run.error = f"submit {res.status_code}: {res.text[:200]}"
                return run
            reply = res.json()
            run.job_id = reply["jobId"]
            url = f"{base}{reply['eventsUrl']}?token={reply['eventsToken']}"
            run.terminal = await follow_sse(client, url, seen)
    except TimeoutError:
        run.error = f"no terminal event within {deadline_s}s"
    except (httpx.HTTPError, RuntimeError, ValueError) as exc:
        run.error = f"{type(exc).__name__}: {exc}"
    return run


async def throughput(
    system: System, jobs: int, concurrency: int, tokens: int, deadline_s: float
) -> tuple[list[JobRun], float]:
    async with http_client(concurrency * 2 + 16) as client:
        factories = [
            (lambda i=i: run_job(client, system.app_url, job_payload(tokens, prompt=f"b{i}"),
                                 deadline_s))
            for i in range(jobs)
        ]  # fmt: skip
        t0 = time.perf_counter()
        runs = await bounded(concurrency, factories)
        wall = time.perf_counter() - t0
        await server_status(client, system.app_url, [r for r in runs if r.terminal != "completed"])
    return runs, wall


async def server_status(client: httpx.AsyncClient, base: str, runs: list[JobRun]) -> None:
    """What the app says about jobs whose stream did not show them complete (at most 50)."""
    for run in [r for r in runs if r.job_id][:50]:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            res = await client.get(f"{base}/api/jobs/{run.job_id}", headers=AUTH)
            run.server_status = str(res.json().get("status", res.status_code))


def throughput_report(runs: list[JobRun], wall_s: float, tokens: int) -> dict[str, Any]:
    ok = [r for r in runs if r.terminal == "completed"]
    first = min((r.submit_perf for r in runs), default=0.0)
    last = max((r.done_perf for r in ok if r.done_perf is not None), default=first)
    span = last - first
    started = [r.started_ts - r.submit_wall_ms for r in ok if r.started_ts is not None]
    done = [r.completed_ts - r.submit_wall_ms for r in ok if r.completed_ts is not None]
    run_ms = [
        r.completed_ts - r.started_ts
        for r in ok
        if r.completed_ts is not None and r.started_ts is not None
    ]
    recv_lag = [
        r.done_recv_ms - r.completed_ts
        for r in ok
        if r.done_recv_ms is not None and r.completed_ts is not None
    ]
    events: Counter[str] = Counter()
    for r in ok:
        events.update(r.events)
    wrong_deltas = sum(1 for r in ok if r.events["delta"] != tokens)
    errors = Counter((r.error or "")[:120] for r in runs if r.error)
    cut = [r for r in runs if r.terminal is None and r.error is None and r.status == 202]
    return {
        "jobs": len(runs),
        "completed": len(ok),
        "terminal_types": dict(Counter(str(r.terminal) for r in runs)),
        "submit_statuses": dict(Counter(str(r.status) for r in runs)),
        "errors": dict(errors.most_common(10)),
        "span_s": round(span, 3),
        "wall_s": round(wall_s, 3),
        "jobs_per_s": round(len(ok) / span, 1) if span > 0 else None,
        "submit_request_ms": summary([r.submit_latency_ms for r in runs if r.submit_latency_ms]),
        "submit_to_started_ms": summary(started),
        "submit_to_completed_ms": summary(done),
        "started_to_completed_ms": summary(run_ms),
        "completed_ts_to_client_receive_ms": summary(recv_lag),
        "events_per_completed_job": {k: round(v / max(1, len(ok)), 2) for k, v in events.items()},
        "jobs_with_wrong_delta_count": wrong_deltas,
        "streams_closed_by_server_without_terminal_event": len(cut),
        "last_event_seen_on_those_streams": dict(Counter(str(r.last_type) for r in cut)),
        "delta_events_seen_on_those_streams": dict(Counter(r.events["delta"] for r in cut)),
        "server_status_of_jobs_not_seen_completed": dict(
            Counter(str(r.server_status) for r in runs if r.terminal != "completed" and r.job_id)
        ),
    }


# -- phase: Redis commands ---------------------------------------------------------------------


def commandstats(client: redis.Redis) -> dict[str, int]:
    return commandstats_calls(client.info("commandstats"))


def total_processed(client: redis.Redis) -> int:
    return int(client.info("stats")["total_commands_processed"])


def connections_received(client: redis.Redis) -> int:
    return int(client.info("stats")["total_connections_received"])


def wait_redis_quiet(client: redis.Redis, deadline_s: float = 15.0) -> int:
    """Wait until the app's Redis sees no traffic but our own INFO; returns the count then."""
    deadline = time.monotonic() + deadline_s
    last = total_processed(client)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        current = total_processed(client)
        if current - last <= 1:
            return current
        last = current
    return last


def redis_report(calls: dict[str, int], processed: int, jobs: int) -> dict[str, Any]:
    own = {k: calls.pop(k) for k in ("info", "config|resetstat", "config") if k in calls}
    processed -= sum(own.values())
    total = sum(calls.values())
    per_job = {k: round(v / jobs, 2) for k, v in sorted(calls.items(), key=lambda kv: -kv[1])}
    return {
        "jobs": jobs,
        "commandstats_total_calls": total,
        "commandstats_calls_per_job": round(total / jobs, 2),
        "commandstats_per_job": per_job,
        "total_commands_processed": processed,
        "total_commands_processed_per_job": round(processed / jobs, 2),
        "bench_own_commands_excluded": own,
        "note": (
            "INFO commandstats counts commands executed inside Lua scripts (redis.call) as well "
            "as the EVALSHA/EVAL that ran them, so commandstats_total_calls double-counts "
            "script work by design; total_commands_processed (INFO stats) is the number of "
            "commands Redis processed, whose relation to script-inner commands depends on the "
            "Redis version — compare both. Counts cover the measured run only (after a "
            "warm-up and CONFIG RESETSTAT); the bench's own INFO calls are subtracted."
        ),
    }


# -- phase: held SSE streams -------------------------------------------------------------------


@dataclass
class HeldStream:
    job_id: str
    url: str
    first_event: asyncio.Event = field(default_factory=asyncio.Event)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    settled: asyncio.Event = field(default_factory=asyncio.Event)  # started, or stream over
    ended: bool = False
    types: list[str] = field(default_factory=list)
    cancel_sent_perf: float | None = None
    cancel_status: str | None = None
    done_perf: float | None = None
    terminal: str | None = None
    error: str | None = None


async def hold_one(client: httpx.AsyncClient, stream: HeldStream, deadline_s: float) -> None:
    def seen(ev: SseEvent) -> None:
        stream.types.append(ev.type)
        stream.first_event.set()
        if ev.type == "started":
            stream.started.set()
            stream.settled.set()
        if ev.type in TERMINAL or ev.type == "failed":
            stream.done_perf = time.perf_counter()

    try:
        async with asyncio.timeout(deadline_s):
            stream.terminal = await follow_sse(client, stream.url, seen)
    except TimeoutError:
        stream.error = f"no terminal event within {deadline_s}s"
    except (httpx.HTTPError, RuntimeError, ValueError) as exc:
        stream.error = f"{type(exc).__name__}: {exc}"
    finally:
        stream.ended = True
        stream.first_event.set()  # never leave a waiter hanging on a dead stream
        stream.settled.set()


async def set_parallelism(broker_url: str, queue: str, parallelism: int) -> int:
    async with httpx.AsyncClient(timeout=10) as client:
        res = await client.post(
            f"{broker_url}/v2/queues",
            json={"queueName": queue, "parallelism": parallelism},
            headers={"Authorization": f"Bearer {DEV_ACCOUNTS[0].token}"},
        )
    return res.status_code


async def wait_all(events: list[asyncio.Event], deadline_s: float) -> float:
    t0 = time.perf_counter()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(deadline_s):
            await asyncio.gather(*(e.wait() for e in events))
    return time.perf_counter() - t0


def process_sample(system: System) -> dict[str, Any]:
    clients = system.redis.info("clients")
    return {
        "app_rss_mib": rss_mib(system.app.pid),
        "app_open_fds": open_fds(system.app.pid),
        "broker_rss_mib": rss_mib(system.broker.pid),
        "app_redis_connected_clients": clients.get("connected_clients"),
    }


async def submit_hangers(
    client: httpx.AsyncClient, base: str, count: int
) -> tuple[list[HeldStream], Counter[str]]:
    async def one(i: int) -> HeldStream | str:
        try:
            res = await client.post(
                f"{base}/api/jobs", json=job_payload(0, hang=True, prompt=f"h{i}"), headers=AUTH
            )
        except httpx.HTTPError as exc:
            return type(exc).__name__
        if res.status_code != 202:
            return f"submit {res.status_code}"
        reply = res.json()
        url = f"{base}{reply['eventsUrl']}?token={reply['eventsToken']}"
        return HeldStream(reply["jobId"], url)

    results = await bounded(64, [functools.partial(one, i) for i in range(count)])
    streams = [r for r in results if isinstance(r, HeldStream)]
    return streams, Counter(r for r in results if isinstance(r, str))


async def cancel_all(client: httpx.AsyncClient, base: str, streams: list[HeldStream]) -> None:
    async def one(stream: HeldStream) -> None:
        stream.cancel_sent_perf = time.perf_counter()
        statuses = []
        for _ in range(CANCEL_ATTEMPTS):  # a client retries a 503 ("retry shortly")
            code = 0
            try:
                res = await client.delete(f"{base}/api/jobs/{stream.job_id}", headers=AUTH)
                code = res.status_code
                statuses.append(str(res.json().get("status", code)) if code == 200 else str(code))
            except (httpx.HTTPError, ValueError) as exc:
                statuses.append(type(exc).__name__)
            if code != 503:
                break
            await asyncio.sleep(0.2)
        stream.cancel_status = " then ".join(statuses)

    await bounded(64, [functools.partial(one, s) for s in streams])


def guard_occupancy(system: System) -> dict[str, int]:
    keys = AppKeys(APP_KEY_PREFIX)
    names = {
        "admission_" + HANG_QUEUE: keys.admission(HANG_QUEUE),
        "model_sim_paid": keys.model_guard("sim", "paid"),
        "user_bench_paid": keys.user_guard("bench-paid"),
    }
    return {name: int(system.redis.zcard(key)) for name, key in names.items()}


async def hold_streams(system: System, count: int, hold_s: float) -> dict[str, Any]:
    report: dict[str, Any] = {"requested": count, "idle": process_sample(system)}
    parallelism = max(QUEUE_PARALLELISM, count)
    report["queue"] = HANG_QUEUE
    report["queue_parallelism_during_hold"] = parallelism
    report["parallelism_upsert_status"] = await set_parallelism(
        system.broker_url, HANG_QUEUE, parallelism
    )
    async with http_client(count + 128, read_timeout_s=120.0) as client:
        t0 = time.perf_counter()
        streams, submit_errors = await submit_hangers(client, system.app_url, count)
        report["submitted"] = len(streams)
        report["submit_errors"] = dict(submit_errors)
        report["submit_s"] = round(time.perf_counter() - t0, 3)
        deadline_s = START_DEADLINE_S + hold_s + 60.0
        tasks = [asyncio.create_task(hold_one(client, s, deadline_s)) for s in streams]
        await wait_all([s.first_event for s in streams], START_DEADLINE_S)
        report["all_streams_open_s_after_first_submit"] = round(time.perf_counter() - t0, 3)
        await wait_all([s.settled for s in streams], START_DEADLINE_S)
        report["all_started_s_after_first_submit"] = round(time.perf_counter() - t0, 3)
        report["streams_with_queued"] = sum("queued" in s.types for s in streams)
        report["streams_with_started"] = sum(s.started.is_set() for s in streams)
        report["held_at_start_of_hold"] = sum(s.started.is_set() and not s.ended for s in streams)
        samples = []
        hold_end = time.monotonic() + hold_s
        while time.monotonic() < hold_end:
            sample = process_sample(system)
            sample["streams_open"] = sum(s.started.is_set() and not s.ended for s in streams)
            samples.append(sample)
            await asyncio.sleep(0.5)
        report["streams_open_during_hold"] = [s["streams_open"] for s in samples]
        report["held_to_end_of_hold"] = sum(s.started.is_set() and not s.ended for s in streams)
        report["holding"] = samples[-1] if samples else process_sample(system)
        report["holding_max_app_rss_mib"] = max(
            (s["app_rss_mib"] or 0 for s in samples), default=None
        )
        report["guards_while_holding"] = guard_occupancy(system)
        t1 = time.perf_counter()
        await cancel_all(client, system.app_url, streams)
        report["cancel_requests_s"] = round(time.perf_counter() - t1, 3)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(60):
                await asyncio.gather(*tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    report["all_cancelled_s"] = round(time.perf_counter() - t1, 3)
    report["cancel_statuses"] = dict(Counter(str(s.cancel_status) for s in streams))
    report["terminal_types"] = dict(Counter(str(s.terminal) for s in streams))
    report["ended_with_cancelled"] = sum(s.terminal == "cancelled" for s in streams)
    report["stream_errors"] = dict(Counter((s.error or "")[:120] for s in streams if s.error))
    report["cancel_to_cancelled_event_ms"] = summary(
        [
            (s.done_perf - s.cancel_sent_perf) * 1000
            for s in streams
            if s.done_perf is not None and s.cancel_sent_perf is not None
        ]
    )
    await asyncio.sleep(1.0)
    report["after_cancel"] = process_sample(system)
    report["guards_after_cancel"] = guard_occupancy(system)
    await set_parallelism(system.broker_url, HANG_QUEUE, QUEUE_PARALLELISM)
    return report


LOG_MARKERS = ("warning", "error", "traceback", "exception")


def log_findings(path: Path, keep: int = 8) -> dict[str, Any]:
    """How many lines of a process log look like warnings/errors, and a few distinct ones."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return {"lines": 0}
    flagged = [
        line[:300]
        for line in lines
        if any(m in line.lower() for m in LOG_MARKERS) and not line.startswith((" ", "Traceback"))
    ]
    common = Counter(flagged).most_common(keep)
    return {"lines": len(lines), "flagged_lines": len(flagged), "top": dict(common)}


# -- driver ------------------------------------------------------------------------------------


def cpu_report(
    before: dict[str, float | None], after: dict[str, float | None], wall_s: float
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, used in cpu_spent(before, after).items():
        if used is not None:
            out[name] = {"cpu_s": round(used, 2), "cpu_pct_of_one_core": round(used / wall_s * 100)}
    return out


async def measure(system: System, args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"app_rss_mib_at_start": rss_mib(system.app.pid)}
    warm, _ = await throughput(system, args.warmup, min(args.concurrency, 16), args.tokens, 60)
    results["warmup_completed"] = sum(r.terminal == "completed" for r in warm)
    if not results["warmup_completed"]:
        errors = Counter(r.error for r in warm).most_common(3)
        raise RuntimeError(f"no warm-up job completed; errors: {errors}\n{system.app.tail()}")
    wait_redis_quiet(system.redis)

    system.redis.config_resetstat()
    processed_before = total_processed(system.redis)
    cpu_before = cpu_snapshot(system.pids())
    deadline_s = max(120.0, args.jobs / 5)
    runs, wall = await throughput(system, args.jobs, args.concurrency, args.tokens, deadline_s)
    cpu_after = cpu_snapshot(system.pids())
    processed_after = wait_redis_quiet(system.redis)
    calls = commandstats(system.redis)
    connections = connections_received(system.redis)

    results["throughput"] = throughput_report(runs, wall, args.tokens)
    results["throughput"]["cpu"] = cpu_report(cpu_before, cpu_after, wall)
    results["throughput"]["app_rss_mib_after"] = rss_mib(system.app.pid)
    results["redis_per_job"] = redis_report(calls, processed_after - processed_before, args.jobs)
    results["redis_per_job"]["connections_opened_during_run"] = connections
    results["redis_per_job"]["connected_clients_after_run"] = system.redis.info("clients").get(
        "connected_clients"
    )
    results["sse_hold"] = await hold_streams(system, args.streams, args.hold_s)
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="100 jobs, 50 held streams")
    parser.add_argument("--jobs", type=int, default=None, help="throughput jobs (1000)")
    parser.add_argument("--concurrency", type=int, default=64, help="jobs in flight (64)")
    parser.add_argument("--tokens", type=int, default=8, help="simulated tokens per job (8)")
    parser.add_argument("--warmup", type=int, default=20, help="warm-up jobs, not measured")
    parser.add_argument("--streams", type=int, default=None, help="SSE streams held (500)")
    parser.add_argument("--hold-s", type=float, default=None, help="seconds to hold them (5)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    parser.add_argument("--log-dir", type=Path, default=None, help="keep app/broker logs here")
    parser.add_argument(
        "--app-redis-query",
        default="",
        help="query string appended to the app's TIERQ_REDIS_URL, e.g. "
        "'max_connections=4000&socket_timeout=60' (redis-py client options; default: none)",
    )
    args = parser.parse_args(argv)
    args.jobs = args.jobs or (100 if args.quick else 1000)
    args.streams = args.streams or (50 if args.quick else 500)
    args.hold_s = args.hold_s if args.hold_s is not None else (2.0 if args.quick else 5.0)
    return args


def print_summary(doc: dict[str, Any]) -> None:
    t = doc["results"]["throughput"]
    r = doc["results"]["redis_per_job"]
    h = doc["results"]["sse_hold"]
    top = ", ".join(f"{k} {v}" for k, v in list(r["commandstats_per_job"].items())[:8])
    print(f"throughput: {t['completed']}/{t['jobs']} completed, {t['jobs_per_s']} jobs/s")
    cut = t["streams_closed_by_server_without_terminal_event"]
    if cut or t["errors"]:
        print(f"  streams closed without terminal event: {cut}; errors: {t['errors']}")
    print(
        f"  submit→started ms p50 {t['submit_to_started_ms']['p50']} "
        f"p99 {t['submit_to_started_ms']['p99']}; submit request ms p50 "
        f"{t['submit_request_ms']['p50']} p99 {t['submit_request_ms']['p99']}"
    )
    print(f"  cpu: {json.dumps(t['cpu'])}")
    print(
        f"redis per job: {r['commandstats_calls_per_job']} commandstats calls, "
        f"{r['total_commands_processed_per_job']} total_commands_processed"
    )
    print(f"  top: {top}")
    print(
        f"sse hold: {h['streams_with_started']}/{h['requested']} saw started, "
        f"{h['held_to_end_of_hold']} still open after {doc['config']['hold_s']}s, "
        f"{h['ended_with_cancelled']} ended cancelled; app RSS idle "
        f"{h['idle']['app_rss_mib']} MiB → holding {h['holding_max_app_rss_mib']} MiB"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_nofile(at_least=8192)
    started = time.time()
    machine = machine_info(
        ("tierq", "httpx", "uvicorn", "fastapi", "starlette", "redis", "sse-starlette")
    )
    with tempfile.TemporaryDirectory(prefix="tierq-bench-") as tmp:
        job_timeout_s = 120.0
        query = f"?{args.app_redis_query}" if args.app_redis_query else ""
        with running_system(Path(tmp), job_timeout_s, query) as system:
            redis_version = system.redis.info("server").get("redis_version")
            results = asyncio.run(measure(system, args))
            results["logs"] = {p.name: log_findings(p.log) for p in (system.app, system.broker)}
            copy_logs((system.app.log, system.broker.log), args.log_dir)
    head = results_head(
        "tierq e2e (broker + app subprocesses, two embedded Redis, loopback)", started, machine
    )
    head["machine"]["redis_version"] = redis_version
    doc = {
        **head,
        "notes": [
            "All processes (bench client, app, broker, two redis-servers) share this machine's "
            "CPUs; other load on the machine (see loadavg) moves the figures.",
            "Each held stream in sse_hold is one hanging job: one SSE connection plus one "
            "in-flight QStash delivery and its leases, so the app RSS covers both.",
            "submit_to_started_ms = started event ts (app clock) - client time before POST "
            "(same machine clock).",
        ],
        "config": {
            "quick": args.quick,
            "jobs": args.jobs,
            "concurrency": args.concurrency,
            "tokens_per_job": args.tokens,
            "token_latency_ms": 0,
            "warmup_jobs": args.warmup,
            "held_streams": args.streams,
            "hold_s": args.hold_s,
            "queue_parallelism": QUEUE_PARALLELISM,
            "admission_depth": 100_000,
            "user_and_model_limits": 10_000,
            "job_timeout_s": job_timeout_s,
            "app_redis_url_query": args.app_redis_query or None,
            "experience": "stream",
            "key": "paid",
        },
        "results": results,
    }
    print_summary(doc)
    write_results(args.out, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
