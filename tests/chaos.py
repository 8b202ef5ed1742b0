"""Chaos: jobs flow through real processes while the app, the broker and the app's Redis are
killed (``SIGKILL``) and restarted; then every job's fate is read back from Redis and checked.

Shared by ``tests/e2e/test_chaos.py`` (small, in ``make test``) and ``bench/chaos.py`` (the long
run), so that both mean the same thing by "lost", "duplicate" and "leaked". It imports only
tierq and libraries (no pytest, no conftest), so a script can import it.

The system: two embedded Redis servers (the app's, with ``appendfsync always`` so that a
``kill -9`` loses no acknowledged write; and the broker's, never killed here), ``tierq broker``
and ``tierq serve`` as subprocesses with production-style settings, tuned so that recovery
takes seconds (short leases, a fast reconciler, QStash retries with a short backoff).

The client submits each job at a steady rate and retries a submit until it is admitted (202).
A refused connection or a ``5xx`` answer means "not admitted" by the API's contract; a
connection that died after the request went out is an *unknown* outcome: the job may exist. So
the checker does not trust the client's list: it scans every job record in the app's Redis.
Each submit attempt carries its own prompt (``chaos <job>.<attempt>``) and the simulated model's
output is a hash of the prompt, so a completed job's result names the exact attempt that made
it; a record the client never heard of (an *orphan*) is traced back that way.

After the last restart the run waits (with deadlines) until every job is terminal and then
until nothing is left in dispatch or admission; ``check_job`` judges each job's event log,
``violations`` the run. What a known tierq bug explains (``KNOWN_BUGS``, each recognised by
its exact signature) is named in ``Report.known_bugs`` and left out of ``Report.unexplained``,
which is what ``violations`` reads; the raw counts stay in ``Report.counts``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import httpx
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tierq.broker.server.credentials import DEV_ACCOUNTS
from tierq.embedded_redis import EmbeddedRedis, free_port
from tierq.keys import AppKeys, BrokerKeys
from tierq.providers.simulated import simulated_word

HOST = "127.0.0.1"
APP_PREFIX = "chaos"
BROKER_PREFIX = "chaosb"
QUEUES = (
    "q_paid_stream", "q_free_stream", "q_paid_batch",
    "q_free_batch", "q_paid_vision", "q_free_vision",
)  # fmt: skip
USERS: dict[str, Literal["paid", "free"]] = {
    "cp1": "paid", "cp2": "paid", "cf1": "free", "cf2": "free", "cf3": "free",
}  # fmt: skip
TERMINAL = frozenset({"completed", "failed", "cancelled"})

LEASE_TTL_S = 3.0
HEARTBEAT_S = 1.0
ADMISSION_SWEEP_S = 2.0
QSTASH_RETRIES = 12
# Grows from 250 ms to a 2 s cap: 12 retries cover ~20 s of a dead app, room for a slow
# restart on a loaded machine. (A constant 500 ms x 10 covers 5 s: a message that outlives
# its retries goes to the DLQ and its job stays queued until an operator retries it.)
QSTASH_RETRY_DELAY = "min(2000, 250 * pow(2, retried))"
START_DEADLINE_S = 60.0
SUBMIT_BACKOFF_S = 0.3
SUBMIT_TIMEOUT_S = 10.0
POLL_S = 0.25
MAX_EVIDENCE = 5

Target = Literal["app", "broker", "redis"]
TARGETS: tuple[Target, ...] = ("app", "broker", "redis")
CRASHES_A_RUN: frozenset[str] = frozenset({"app", "redis"})
"""Kills that may end a running job without a ``failed`` event (its process or its Redis
died); a broker kill does not: the app finishes the run and the delivery comes again."""


def api_key(user: str) -> str:
    return f"tq_chaos_{user}"


def app_env(redis_url: str, port: int, broker_url: str) -> dict[str, str]:
    """``tierq serve``'s environment: production-style secrets, the broker's dev account,
    five users, and short leases / a fast reconciler / quick QStash retries."""
    dev = DEV_ACCOUNTS[0]
    queues = {q: {"parallelism": 6, "admission_depth": 1000} for q in QUEUES}
    model = {"provider": "simulated", "limits": {"paid": 8, "free": 4}}
    keys = {api_key(u): {"id": u, "plan": plan} for u, plan in USERS.items()}
    return {
        **clean_env(),
        "TIERQ_REDIS_URL": redis_url,
        "TIERQ_KEY_PREFIX": APP_PREFIX,
        "TIERQ_PUBLIC_URL": f"http://{HOST}:{port}",
        "TIERQ_API_KEYS": json.dumps(keys),
        "TIERQ_ADMIN_TOKEN": "chaos-admin",
        "TIERQ_EVENTS_SECRET": "chaos-events-secret",
        "QSTASH_URL": broker_url,
        "QSTASH_TOKEN": dev.token,
        "QSTASH_CURRENT_SIGNING_KEY": dev.current_key,
        "QSTASH_NEXT_SIGNING_KEY": dev.next_key,
        "TIERQ_QUEUES": json.dumps(queues),
        "TIERQ_MODELS": json.dumps({"sim": model}),
        "TIERQ_USER_LIMITS": json.dumps({"paid": 4, "free": 2}),
        "TIERQ_LEASE_TTL_S": str(LEASE_TTL_S),
        "TIERQ_HEARTBEAT_S": str(HEARTBEAT_S),
        "TIERQ_GUARD_RETRY_AFTER_S": "1",
        "TIERQ_DISPATCH_RECONCILE_S": "0.5",
        "TIERQ_DISPATCH_CONFIRM_S": "3",
        "TIERQ_ADMISSION_SWEEP_S": str(ADMISSION_SWEEP_S),
        "TIERQ_QSTASH_RETRIES": str(QSTASH_RETRIES),
        "TIERQ_QSTASH_RETRY_DELAY": QSTASH_RETRY_DELAY,
        "TIERQ_QSTASH_TIMEOUT_S": "3",
        "TIERQ_REDIS_SOCKET_TIMEOUT_S": "3",
        "TIERQ_REDIS_POOL_TIMEOUT_S": "3",
    }


def broker_env() -> dict[str, str]:
    """``tierq broker``'s settings (``BrokerSettings`` through ``TIERQ_BROKER__*``): a fast
    poll, and attempt leases short enough that a delivery lost with a killed broker comes
    again within seconds of its restart."""
    return {
        **clean_env(),
        "TIERQ_BROKER__POLL_INTERVAL_S": "0.1",
        "TIERQ_BROKER__ATTEMPT_LEASE_S": "2",
        "TIERQ_BROKER__FINISH_RETRY_S": "10",
    }


def clean_env() -> dict[str, str]:
    """This process's environment without tierq or QStash settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("TIERQ_", "QSTASH_"))}


# -- processes -------------------------------------------------------------------------------


class Proc:
    """A subprocess logging to a file (appended across restarts), killed with ``SIGKILL``."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.args, self.env, self.log = name, args, env, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.args, env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip

    async def wait_ready(self, url: str, deadline_s: float = START_DEADLINE_S) -> None:
        """Poll ``url`` until 200; fail with the log's tail if the process exits or is late."""
        deadline = time.monotonic() + deadline_s
        async with httpx.AsyncClient(timeout=1) as client:
            while True:
                if self.proc is None or self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited:\n{tail(self.log)}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(url)).status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} not ready in {deadline_s}s:\n{tail(self.log)}")
                await asyncio.sleep(0.05)

    def kill9(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


class ChaosSystem:
    """The app's Redis, the broker's Redis, ``tierq broker`` and ``tierq serve``, each of the
    first three parts killable and restartable on the same port (Redis on the same data dir)."""

    def __init__(self, workdir: Path, app_extra_env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.app_extra_env = app_extra_env or {}
        self.app_redis = EmbeddedRedis(workdir / "app-redis", appendfsync="always")
        self.broker_redis = EmbeddedRedis(workdir / "broker-redis")
        self.app_port, self.broker_port = free_port(), free_port()
        self.broker: Proc | None = None
        self.app: Proc | None = None

    @property
    def app_url(self) -> str:
        return f"http://{HOST}:{self.app_port}"

    @property
    def broker_url(self) -> str:
        return f"http://{HOST}:{self.broker_port}"

    async def start(self) -> None:
        self.app_redis.start()
        self.broker_redis.start()
        tierq = [sys.executable, "-m", "tierq"]
        self.broker = Proc(
            "broker",
            [*tierq, "broker", "--host", HOST, "--port", str(self.broker_port),
             "--redis-url", self.broker_redis.url, "--key-prefix", BROKER_PREFIX],
            broker_env(), self.workdir / "broker.log",
        )  # fmt: skip
        self.app = Proc(
            "app",
            [*tierq, "serve", "--host", HOST, "--port", str(self.app_port)],
            {**app_env(self.app_redis.url, self.app_port, self.broker_url), **self.app_extra_env},
            self.workdir / "app.log",
        )
        await self.restart("broker")
        await self.restart("app")

    def kill(self, target: Target) -> None:
        if target == "redis":
            self.app_redis.kill()
        else:
            self._proc(target).kill9()

    async def restart(self, target: Target) -> None:
        """Start ``target`` again (after :meth:`kill`, or after it died) and wait until ready."""
        if target == "redis":
            self.app_redis.start()  # blocks until PING answers (the AOF is loaded by then)
            return
        proc = self._proc(target)
        proc.kill9()  # reaps one that died by itself
        proc.start()
        url = self.app_url if target == "app" else self.broker_url
        await proc.wait_ready(f"{url}/healthz")

    def _proc(self, target: Target) -> Proc:
        proc = self.app if target == "app" else self.broker
        assert proc is not None, "the system is not started"
        return proc

    def stop(self) -> None:
        for proc in (self.app, self.broker):
            if proc is not None:
                proc.stop()
        self.app_redis.stop()
        self.broker_redis.stop()

    def logs(self) -> dict[str, Path]:
        return {
            "app": self.workdir / "app.log",
            "broker": self.workdir / "broker.log",
            "app-redis": self.app_redis.data_dir / "redis.log",
        }

    def tails(self, chars: int = 4000) -> str:
        return "\n".join(
            f"--- {name}: {path} (tail) ---\n{tail(path, chars)}"
            for name, path in self.logs().items()
        )


# -- the jobs --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One job to submit; ``fails_once``: its first run fails (retryably), the next succeeds."""

    index: int
    user: str
    experience: Literal["stream", "batch"]
    tokens: int
    token_latency_ms: int
    fails_once: bool

    def prompt(self, attempt: int) -> str:
        return f"chaos {self.index}.{attempt}"

    def body(self, attempt: int) -> dict[str, Any]:
        simulate: dict[str, Any] = {
            "tokens": self.tokens,
            "token_latency_ms": self.token_latency_ms,
        }
        if self.fails_once:
            simulate.update(fail="error", fail_attempts=1)
        return {
            "service": "chat", "experience": self.experience, "mode": "auto", "model": "sim",
            "input": {"prompt": self.prompt(attempt), "simulate": simulate},
        }  # fmt: skip

    def expected(self, attempt: int) -> str:
        """The simulated model's exact output for submit attempt ``attempt``."""
        prompt = self.prompt(attempt)
        return " ".join(simulated_word(prompt, i) for i in range(self.tokens))


def make_specs(count: int, seed: int) -> list[Spec]:
    """A reproducible mix: paid and free users, stream and batch, 3-12 tokens of 10-120 ms,
    about one job in six failing its first run."""
    rng = random.Random(seed)
    users = sorted(USERS)
    return [
        Spec(
            index=i,
            user=rng.choice(users),
            experience=rng.choice(("stream", "batch")),
            tokens=rng.randint(3, 12),
            token_latency_ms=rng.randint(10, 120),
            fails_once=rng.random() < 1 / 6,
        )
        for i in range(count)
    ]


# -- the client ------------------------------------------------------------------------------

Outcome = Literal["admitted", "refused", "http_5xx", "http_429", "unknown", "http_other"]


@dataclass
class Submission:
    """What the client knows of one spec: each attempt's outcome, and the job it got."""

    spec: Spec
    outcomes: list[Outcome] = field(default_factory=list)
    job_id: str | None = None
    attempt: int | None = None  # which attempt was admitted
    error: str | None = None  # a submit the client gave up on, and why


def classify_error(exc: httpx.HTTPError) -> Outcome:
    """A request that never reached the app is ``refused`` (not admitted); any other failure
    may have happened after the app got it: the job may exist (``unknown``)."""
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
        return "refused"
    return "unknown"


async def submit(client: httpx.AsyncClient, base: str, sub: Submission, deadline: float) -> None:
    """Submit ``sub.spec`` until it is admitted (or the deadline passes, or the app answers
    something a retry cannot fix)."""
    spec = sub.spec
    headers = {"Authorization": f"Bearer {api_key(spec.user)}"}
    while time.monotonic() < deadline:
        attempt = len(sub.outcomes)
        wait = SUBMIT_BACKOFF_S
        try:
            res = await client.post(f"{base}/api/jobs", json=spec.body(attempt), headers=headers)
        except httpx.HTTPError as exc:
            sub.outcomes.append(classify_error(exc))
        else:
            if res.status_code == 202:
                sub.outcomes.append("admitted")
                sub.job_id, sub.attempt = res.json()["jobId"], attempt
                return
            if res.status_code == 429 or res.status_code >= 500:
                sub.outcomes.append("http_429" if res.status_code == 429 else "http_5xx")
                with contextlib.suppress(ValueError):
                    wait = min(2.0, max(wait, float(res.headers.get("retry-after", 0))))
            else:
                sub.outcomes.append("http_other")
                sub.error = f"{res.status_code}: {res.text[:200]}"
                return
        await asyncio.sleep(wait)
    sub.error = sub.error or "not admitted before the deadline"


# -- reading the app's Redis -----------------------------------------------------------------


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Inspector:
    """Reads job records, event logs and dispatch state from the app's Redis (and the broker's
    queues from the broker's)."""

    def __init__(self, app_redis_url: str, broker_redis_url: str) -> None:
        self.r = self._client(app_redis_url)
        self.b = self._client(broker_redis_url)
        self.keys = AppKeys(APP_PREFIX)
        self.bkeys = BrokerKeys(BROKER_PREFIX)

    @staticmethod
    def _client(url: str) -> aioredis.Redis:
        """A client that reconnects after a restart of its server (a pooled connection to a
        killed Redis fails once)."""
        retry = Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=5)
        errors: list[type[Exception]] = [RedisConnectionError, RedisTimeoutError]
        return aioredis.Redis.from_url(
            url, decode_responses=True, retry=retry, retry_on_error=errors
        )

    async def aclose(self) -> None:
        await self.r.aclose()
        await self.b.aclose()

    async def job_ids(self) -> set[str]:
        """Every job with a state record (``<prefix>:job:{<id>}``)."""
        found: set[str] = set()
        async for key in self.r.scan_iter(match=self.keys.job("*"), count=1000):
            found.add(_s(key).split("{", 1)[1].rsplit("}", 1)[0])
        return found

    async def statuses(self, job_ids: Sequence[str]) -> dict[str, str | None]:
        pipe = self.r.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(self.keys.job(job_id), "status")
        return dict(zip(job_ids, await pipe.execute(), strict=True))

    async def job(self, job_id: str) -> tuple[dict[str, str], list[dict[str, Any]]]:
        """The job's state record and its event log (in log order)."""
        pipe = self.r.pipeline(transaction=False)
        pipe.hgetall(self.keys.job(job_id))
        pipe.xrange(self.keys.job_events(job_id))
        state, rows = await pipe.execute()
        return state, [json.loads(fields["e"]) for _, fields in rows]

    async def now_ms(self) -> int:
        seconds, micros = await self.r.time()
        return int(seconds) * 1000 + int(micros) // 1000

    async def leftovers(self) -> dict[str, Any]:
        """Whatever dispatch or admission still holds: live members (expiry after Redis's
        now) of every guard, slot, admission and user-share zset; non-zero parked counts;
        jobs being published, parked, or remembered by the dispatcher. Empty when clean."""
        now = await self.now_ms()
        sched = self.keys.sched
        zsets = [k async for k in self.r.scan_iter(match=f"{sched}:guard:*", count=1000)]
        zsets += [k async for k in self.r.scan_iter(match=f"{sched}:slots:*", count=1000)]
        admission = [self.keys.admission(q) for q in QUEUES]
        admission += [self.keys.user_pending(q, u) for q in QUEUES for u in USERS]
        out: dict[str, Any] = {}
        leases = {_s(k): await self._live(k, now) for k in zsets}
        slots = {k: await self._live(k, now) for k in admission}
        out["leases"] = {k: v for k, v in leases.items() if v}
        out["admission"] = {k: v for k, v in slots.items() if v}
        parked_counts = {
            k: int(v) for k, v in (await self.r.hgetall(self.keys.parked_counts)).items()
        }
        out["parked_counts"] = {k: v for k, v in parked_counts.items() if v}
        out["dispatching"] = await self.r.zrange(self.keys.dispatching, 0, -1)
        lines = [k async for k in self.r.scan_iter(match=f"{sched}:parked:*", count=1000)]
        out["parked_lines"] = {_s(k): await self.r.lrange(k, 0, -1) for k in lines}
        out["parked_lines"] = {k: v for k, v in out["parked_lines"].items() if v}
        out["dispatch_jobs"] = await self.r.hkeys(f"{sched}:jobs")
        return {k: v for k, v in out.items() if v}

    async def in_dispatch(self) -> set[str]:
        """Jobs the dispatcher knows: remembered (parked or being published), dispatching, or
        in a parked line."""
        sched = self.keys.sched
        jobs = {_s(k).split(":", 1)[0] for k in await self.r.hkeys(f"{sched}:jobs")}
        jobs.update(_s(m) for m in await self.r.zrange(self.keys.dispatching, 0, -1))
        async for key in self.r.scan_iter(match=f"{sched}:parked:*", count=1000):
            jobs.update(_s(m) for m in await self.r.lrange(key, 0, -1))
        return jobs

    async def _live(self, key: str, now: int) -> list[str]:
        return [_s(m) for m in await self.r.zrangebyscore(key, f"({now}", "+inf")]

    async def broker_state(self) -> dict[str, int]:
        """Messages the broker still holds (due or in flight) and its DLQ entries."""
        dlq = 0
        async for key in self.b.scan_iter(match=f"{BROKER_PREFIX}:u:*:dlq", count=1000):
            dlq += int(await self.b.zcard(key))
        return {
            "due": int(await self.b.zcard(self.bkeys.due)),
            "inflight": int(await self.b.zcard(self.bkeys.inflight)),
            "dlq": dlq,
        }


# -- checking one job ------------------------------------------------------------------------


@dataclass
class Kill:
    target: Target
    at_s: float  # after the first submit
    killed_ms: int  # wall clock, as the app stamps its events
    restarted_ms: int = 0
    restart_s: float = 0.0  # how long the restart took until ready


def ends(event: dict[str, Any]) -> bool:
    kind = event.get("type")
    if kind == "failed":
        return event.get("retryable") is False
    return kind in TERMINAL


def check_job(
    events: Sequence[dict[str, Any]],
    state: dict[str, str],
    expected: str | None,
    ends_ms: Sequence[int],
) -> list[str]:
    """What is wrong with one finished job (empty: nothing): ``seq`` dense from 1; exactly one
    terminal event, last, a ``completed`` one with the exact ``expected`` result (``None``:
    unknown, not checked) matching the state record; ``started`` runs numbered 0, 1, 2, ...;
    a run started again only after a ``failed`` event, or a known end of the run without
    one between the two starts (``ends_ms``: kills of the app or its Redis, and the app's
    ``worker.upstream_error`` for this job: a dependency failed, the run was abandoned and
    answered 503, QStash delivers it again); for a streamed job, the ``delta`` texts of its
    last run joined are exactly the result."""
    problems: list[str] = []
    seqs = [e.get("seq") for e in events]
    if seqs != list(range(1, len(events) + 1)):
        problems.append(f"seq not dense from 1: {seqs}")
    terminal = [e for e in events if ends(e)]
    if len(terminal) != 1:
        problems.append(f"{len(terminal)} terminal events: {[e['type'] for e in terminal]}")
    if not terminal:
        return problems
    last = terminal[-1]
    if events[-1] is not last:
        problems.append(f"events after the terminal one: {[e['type'] for e in events]}")
    if last["type"] != "completed":
        problems.append(f"ended {last['type']}: {last}")
        return problems
    if expected is not None and last.get("result") != expected:
        problems.append(f"result {last.get('result')!r} != expected {expected!r}")
    if state.get("status") != "completed" or state.get("result") != last.get("result"):
        problems.append(f"state record disagrees: status {state.get('status')!r}")
    problems += _check_runs(events, ends_ms)
    if state.get("experience") == "stream":
        problems += _check_text(events, last.get("result", ""))
    return problems


def _check_runs(events: Sequence[dict[str, Any]], ends_ms: Sequence[int]) -> list[str]:
    problems: list[str] = []
    starts = [i for i, e in enumerate(events) if e["type"] == "started"]
    attempts = [events[i].get("attempt") for i in starts]
    if attempts != list(range(len(starts))):
        problems.append(f"started attempts {attempts}, want 0..{len(starts) - 1}")
    for a, b in itertools.pairwise(starts):
        failed = any(e["type"] == "failed" for e in events[a:b])
        t0, t1 = events[a]["ts"], events[b]["ts"]
        ended = any(t0 <= k <= t1 for k in ends_ms)
        if not failed and not ended:
            problems.append(f"run started again (seq {events[b]['seq']}) with no failure or crash")
    return problems


def _check_text(events: Sequence[dict[str, Any]], result: str) -> list[str]:
    last_start = max((i for i, e in enumerate(events) if e["type"] == "started"), default=-1)
    text = "".join(e.get("text", "") for e in events[last_start + 1 :] if e["type"] == "delta")
    return [] if text == result else [f"streamed text {text!r} != result {result!r}"]


def runs_abandoned(app_log: Path) -> dict[str, list[int]]:
    """When the app abandoned a job's run because a dependency failed (``worker.upstream_error``
    in its JSON log: answered 503, QStash delivers again): job id -> ms."""
    out: dict[str, list[int]] = {}
    with contextlib.suppress(OSError), app_log.open(errors="replace") as lines:
        for line in lines:
            if '"worker.upstream_error"' not in line:
                continue
            with contextlib.suppress(ValueError, KeyError, TypeError):
                entry = json.loads(line)
                at = datetime.fromisoformat(entry["timestamp"]).timestamp()
                out.setdefault(entry["job_id"], []).append(int(at * 1000))
    return out


def is_ghost(state: dict[str, str], events: Sequence[dict[str, Any]]) -> bool:
    """A job record that is no job: no status, no event, only fields a late write put back
    after the record was deleted (``messageId``: see ``KNOWN_BUGS["ghost_record"]``)."""
    return bool(state) and not events and set(state) <= {"messageId"}


def lost_job(
    state: dict[str, str], events: Sequence[dict[str, Any]], known: bool, in_dispatch: bool
) -> dict[str, Any]:
    """What a job that never ended looks like (for the report, and to recognise known bugs)."""
    return {
        "status": state.get("status"),
        "created_ms": int(state.get("createdAt", 0)),
        "events": [e["type"] for e in events],
        "client_got_202": known,
        "in_dispatch": in_dispatch,
        "user": state.get("userId"),
        "queue": state.get("queueId"),
    }


# -- the run ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """``jobs`` submitted ``rate`` per second; at each ``(seconds after the first submit,
    target)`` the target is killed, left down ``down_s``, and restarted."""

    jobs: int
    rate: float
    kills: tuple[tuple[float, Target], ...]
    down_s: float = 1.0
    seed: int = 10
    submit_grace_s: float = 60.0  # submits keep retrying this long after the last one started
    drain_deadline_s: float = 90.0  # after the last submit and the last restart
    leak_deadline_s: float = LEASE_TTL_S + ADMISSION_SWEEP_S + 5.0  # once every job ended


@dataclass
class Report:
    """What a chaos run found; ``problems`` lists every violation (empty: all held)."""

    counts: dict[str, Any] = field(default_factory=dict)
    kills: list[Kill] = field(default_factory=list)
    timings: dict[str, float | None] = field(default_factory=dict)
    leftovers: dict[str, Any] = field(default_factory=dict)
    broker: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    evidence: dict[str, Any] = field(default_factory=dict)
    lost: dict[str, dict[str, Any]] = field(default_factory=dict)  # job id -> what it looks like
    ghosts: dict[str, dict[str, str]] = field(default_factory=dict)  # job id -> its record
    slot_holders: dict[str, str | None] = field(default_factory=dict)  # job -> status (None: gone)
    known_bugs: dict[str, list[str]] = field(default_factory=dict)  # bug -> what it explains
    unexplained: dict[str, Any] = field(default_factory=dict)  # counts minus known bugs

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One paragraph for an assertion message."""
        return json.dumps(
            {"counts": self.counts, "unexplained": self.unexplained,
             "known_bugs": self.known_bugs, "timings": self.timings, "kills": self.kills,
             "leftovers": self.leftovers, "lost": self.lost, "broker": self.broker,
             "problems": self.problems[:20]},
            indent=1, default=str,
        )  # fmt: skip


class Chaos:
    """One chaos run over a :class:`ChaosSystem` (started and stopped by :meth:`run`)."""

    def __init__(self, plan: Plan, workdir: Path, say: Callable[[str], None] = print) -> None:
        self.plan = plan
        self.system = ChaosSystem(workdir)
        self.say = say
        self.subs = [Submission(s) for s in make_specs(plan.jobs, plan.seed)]
        self.report = Report()
        self.t0 = 0.0

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    async def run(self) -> Report:
        try:
            await self.system.start()
            insp = Inspector(self.system.app_redis.url, self.system.broker_redis.url)
            try:
                await self._run(insp)
            finally:
                await insp.aclose()
        finally:
            self.system.stop()
        return self.report

    async def _run(self, insp: Inspector) -> None:
        self.t0 = time.monotonic()
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=16)
        timeout = httpx.Timeout(SUBMIT_TIMEOUT_S, connect=2.0)
        async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
            chaos = asyncio.create_task(self._kills(insp))
            await self._submit_all(client)
            await chaos
        submitted_at = self.elapsed()
        last_up = max([submitted_at, *(self._restarted_s(k) for k in self.report.kills)])
        drained, settled = await self._drain(insp)
        last_kill = self._last_kill_s()
        self.report.timings.update(
            submit_s=round(submitted_at, 2),
            drain_after_last_kill_s=None if drained is None else round(drained - last_kill, 2),
            drain_after_last_restart_s=None if drained is None else round(drained - last_up, 2),
            settled_after_last_kill_s=round(settled - last_kill, 2),
        )
        leak_start = time.monotonic()
        await self._wait_clean(insp)
        self.report.timings["leak_wait_s"] = round(time.monotonic() - leak_start, 2)
        await self._check(insp)

    def _restarted_s(self, kill: Kill) -> float:
        return kill.at_s + self.plan.down_s + kill.restart_s

    def _last_kill_s(self) -> float:
        return max((k.at_s for k in self.report.kills), default=0.0)

    async def _submit_all(self, client: httpx.AsyncClient) -> None:
        base = self.system.app_url
        deadline = self.t0 + self.plan.jobs / self.plan.rate + self.plan.submit_grace_s
        tasks = []
        for i, sub in enumerate(self.subs):
            await asyncio.sleep(max(0.0, i / self.plan.rate - self.elapsed()))
            tasks.append(asyncio.create_task(submit(client, base, sub, deadline)))
        await asyncio.gather(*tasks)

    async def _kills(self, insp: Inspector) -> None:
        for at_s, target in self.plan.kills:
            await asyncio.sleep(max(0.0, at_s - self.elapsed()))
            await self._until_running(insp, timeout_s=3.0)
            kill = Kill(target, round(self.elapsed(), 2), now_ms())
            self.system.kill(target)
            self.say(f"[chaos {kill.at_s:6.1f}s] killed {target} (kill -9)")
            await asyncio.sleep(self.plan.down_s)
            began = time.monotonic()
            await self.system.restart(target)
            kill.restarted_ms, kill.restart_s = now_ms(), round(time.monotonic() - began, 2)
            self.report.kills.append(kill)
            self.say(f"[chaos {self.elapsed():6.1f}s] {target} back after {kill.restart_s}s")

    async def _until_running(self, insp: Inspector, timeout_s: float) -> None:
        """Best effort: wait until one of the latest jobs runs, so a kill lands mid-run."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            recent = [s.job_id for s in self.subs if s.job_id][-40:]
            with contextlib.suppress(Exception):  # the app's Redis may be coming back
                if "running" in (await insp.statuses(recent)).values():
                    return
            await asyncio.sleep(0.05)

    async def _all_ids(self, insp: Inspector) -> set[str]:
        return {s.job_id for s in self.subs if s.job_id} | await insp.job_ids()

    async def _drain(self, insp: Inspector) -> tuple[float | None, float]:
        """Wait until every job with a record (and every admitted one) is terminal. Returns
        when that happened (seconds after the first submit; ``None`` if the deadline came
        first) and when a job last became terminal (the system settled)."""
        deadline = time.monotonic() + self.plan.drain_deadline_s
        settled, before = self.elapsed(), -1
        while True:
            known = {s.job_id for s in self.subs if s.job_id}
            statuses = await insp.statuses(sorted(known | await insp.job_ids()))
            # a record without status is no job (see ``is_ghost``), unless the client has its id
            ids = [j for j, s in statuses.items() if s is not None or j in known]
            done = sum(statuses[j] in TERMINAL for j in ids)
            if done != before:
                settled, before = self.elapsed(), done
            if done == len(ids):
                return self.elapsed(), settled
            if time.monotonic() > deadline:
                self.say(f"[chaos] {len(ids) - done} jobs not terminal at the deadline")
                return None, settled
            await asyncio.sleep(POLL_S)

    async def _wait_clean(self, insp: Inspector) -> None:
        deadline = time.monotonic() + self.plan.leak_deadline_s
        while True:
            if not await insp.leftovers() or time.monotonic() > deadline:
                return
            await asyncio.sleep(POLL_S)

    async def _check(self, insp: Inspector) -> None:
        rep = self.report
        rep.leftovers = await insp.leftovers()
        rep.broker = await insp.broker_state()
        known = {s.job_id: s for s in self.subs if s.job_id}
        ids = await self._all_ids(insp)
        dispatch = await insp.in_dispatch()
        by_result = self._results_index()
        c: Counter[str] = Counter()
        crashes = [k.killed_ms for k in rep.kills if k.target in CRASHES_A_RUN]
        abandoned = runs_abandoned(self.system.logs()["app"])
        for job_id in sorted(ids):
            state, events = await insp.job(job_id)
            if job_id not in known and is_ghost(state, events):
                rep.ghosts[job_id] = state
                continue
            sub = known.get(job_id)
            attempt = sub.attempt if sub else None
            if sub is None:
                c["orphans"] += 1
                sub, attempt = self._trace_orphan(state, events, by_result, c)
            self._count_job(job_id, state, events, c)
            expected = sub.spec.expected(attempt) if sub and attempt is not None else None
            ends_ms = [*crashes, *abandoned.get(job_id, [])]
            problems = check_job(events, state, expected, ends_ms) if state else []
            if not state:
                problems = ["the job's record vanished"]
            if state.get("status") not in TERMINAL:
                rep.lost[job_id] = lost_job(state, events, job_id in known, job_id in dispatch)
                problems = [f"not terminal: status {state.get('status')!r}", *problems]
            if problems:
                self._problem(job_id, problems, state, events, c)
        self._count_submits(c)
        self._count_leftovers(c)
        holders = {m for key in rep.leftovers.get("admission", {}).values() for m in key}
        rep.slot_holders = await insp.statuses(sorted(holders))
        c["ghost_records"] = len(rep.ghosts)
        admitted = len(ids) - len(rep.ghosts)
        rep.counts = {"jobs": self.plan.jobs, "admitted": admitted, **dict(sorted(c.items()))}
        for key in ("lost", "duplicate_terminal", "seq_gaps", "wrong_results"):
            rep.counts.setdefault(key, 0)
        classify(rep)

    def _results_index(self) -> dict[str, tuple[Submission, int]]:
        """Every output a submit attempt could have produced → (submission, attempt)."""
        return {
            s.spec.expected(a): (s, a) for s in self.subs for a in range(len(s.outcomes))
        }  # fmt: skip

    def _trace_orphan(
        self,
        state: dict[str, str],
        events: Sequence[dict[str, Any]],
        by_result: dict[str, tuple[Submission, int]],
        c: Counter[str],
    ) -> tuple[Submission | None, int | None]:
        """A record the client never got a 202 for: which submit attempt made it, and what
        that attempt's outcome was (``unknown`` is expected; ``refused`` or a 5xx is not)."""
        result = next((e.get("result") for e in events if e["type"] == "completed"), None)
        found = by_result.get(result) if isinstance(result, str) else None
        if found is None:
            c["orphans_untraced"] += 1
            return None, None
        sub, attempt = found
        outcome = sub.outcomes[attempt]
        c[f"orphans_after_{outcome}"] += 1
        if state.get("userId") != sub.spec.user:
            self.report.problems.append(f"orphan of job {sub.spec.index} has the wrong owner")
        return sub, attempt

    def _count_job(
        self, job_id: str, state: dict[str, str], events: Sequence[dict[str, Any]], c: Counter[str]
    ) -> None:
        status = state.get("status") if state else None
        c[f"status_{status or 'vanished'}"] += 1
        if status not in TERMINAL:
            c["lost"] += 1
        kinds = Counter(e["type"] for e in events)
        if sum(1 for e in events if ends(e)) > 1:
            c["duplicate_terminal"] += 1
        if [e.get("seq") for e in events] != list(range(1, len(events) + 1)):
            c["seq_gaps"] += 1
        c["started_events"] += kinds["started"]
        c["retryable_failures"] += kinds["failed"]
        if kinds["started"] > 1:
            c["jobs_run_more_than_once"] += 1

    def _problem(
        self,
        job_id: str,
        problems: list[str],
        state: dict[str, str],
        events: Sequence[Any],
        c: Counter[str],
    ) -> None:
        rep = self.report
        rep.problems += [f"{job_id}: {p}" for p in problems]
        c["jobs_with_problems"] += 1
        if any(p.startswith("result ") for p in problems):
            c["wrong_results"] += 1
        if any(p.startswith("run started again") for p in problems):
            c["unexplained_reruns"] += 1
        if any(p.startswith("streamed text") for p in problems):
            c["wrong_streamed_text"] += 1
        if len(rep.evidence) < MAX_EVIDENCE:
            rep.evidence[job_id] = {"state": state, "events": list(events)}

    def _count_submits(self, c: Counter[str]) -> None:
        for sub in self.subs:
            c.update(f"submit_{o}" for o in sub.outcomes)
            if sub.error:
                c["never_admitted"] += 1
                self.report.problems.append(f"job {sub.spec.index} not admitted: {sub.error}")
        c["submit_attempts"] = sum(len(s.outcomes) for s in self.subs)
        c["fails_once"] = sum(s.spec.fails_once for s in self.subs)
        for target in TARGETS:
            c[f"kills_{target}"] = sum(k.target == target for k in self.report.kills)

    def _count_leftovers(self, c: Counter[str]) -> None:
        left = self.report.leftovers
        c["leaked_leases"] = sum(len(v) for v in left.get("leases", {}).values())
        c["leaked_admission"] = sum(len(v) for v in left.get("admission", {}).values())
        c["leaked_parked"] = sum(left.get("parked_counts", {}).values()) + sum(
            len(v) for v in left.get("parked_lines", {}).values()
        )
        c["leaked_dispatching"] = len(left.get("dispatching", []))
        c["leaked_dispatch_jobs"] = len(left.get("dispatch_jobs", []))
        c["broker_dlq"] = self.report.broker.get("dlq", 0)
        c["broker_messages_left"] = self.report.broker.get("due", 0) + self.report.broker.get(
            "inflight", 0
        )


def now_ms() -> int:
    return int(time.time() * 1000)


def spread_kills(first_s: float, every_s: float, rounds: int) -> tuple[tuple[float, Target], ...]:
    """``rounds`` of app, broker, Redis kills, one every ``every_s`` from ``first_s``."""
    order: Iterable[Target] = [t for _ in range(rounds) for t in TARGETS]
    return tuple((first_s + i * every_s, t) for i, t in enumerate(order))


def violations(report: Report) -> list[str]:
    """The properties a chaos run must hold, each false one as a sentence with its count;
    what a known bug (``report.known_bugs``) explains is left out."""
    c = report.unexplained or report.counts
    checks = [
        ("jobs lost (admitted, never terminal)", c.get("lost", 0)),
        ("jobs with duplicate terminal events", c.get("duplicate_terminal", 0)),
        ("jobs with seq gaps", c.get("seq_gaps", 0)),
        ("jobs with a wrong result", c.get("wrong_results", 0)),
        (
            "streamed jobs whose last run's deltas are not the result",
            c.get("wrong_streamed_text", 0),
        ),
        ("jobs run again with no failure or crash between", c.get("unexplained_reruns", 0)),
        ("specs never admitted", c.get("never_admitted", 0)),
        ("orphans after a refused connection", c.get("orphans_after_refused", 0)),
        ("orphans after a 5xx answer", c.get("orphans_after_http_5xx", 0)),
        ("orphans not traced to a submit", c.get("orphans_untraced", 0)),
        ("leaked leases", c.get("leaked_leases", 0)),
        ("leaked admission slots", c.get("leaked_admission", 0)),
        ("leaked parked jobs", c.get("leaked_parked", 0)),
        ("jobs left dispatching", c.get("leaked_dispatching", 0)),
        ("jobs left in the dispatcher's records", c.get("leaked_dispatch_jobs", 0)),
        ("jobs failing a per-job check (see the problems)", c.get("jobs_with_problems", 0)),
        ("job records without status or events (ghosts)", c.get("ghost_records", 0)),
        ("other problems (see the report)", c.get("other_problems", 0)),
    ]
    return [f"{n} {what}" for what, n in checks if n]


# -- known tierq bugs ------------------------------------------------------------------------

KNOWN_BUGS: dict[str, str] = {}
"""Open tierq bugs a run may hit, by name -> reason (none now). The three this suite found —
a job stranded by a submit that died before parking it, a ghost record re-created by a late
publish, a user's share leaked by a failed admission — are fixed; their deterministic
reproductions in tests/e2e/test_chaos.py are regression tests."""


def classify(rep: Report) -> None:
    """Name what open known bugs explain (``rep.known_bugs``: none today); the rest is
    ``rep.unexplained``."""
    rep.known_bugs = {}
    rep.unexplained = dict(rep.counts)


def known_bug_reasons(report: Report) -> str:
    """Why the run shows known bugs: each bug's reason and what it explains in this run."""
    return "; ".join(
        f"{KNOWN_BUGS[name]} [this run: {', '.join(items)}]"
        for name, items in report.known_bugs.items()
    )
