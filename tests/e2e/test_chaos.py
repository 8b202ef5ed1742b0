"""Chaos in ``make test``: jobs keep flowing while the app, the broker and the app's Redis are
each killed with ``SIGKILL`` and restarted, one after another; afterwards every admitted job
ended exactly once with its exact result, and nothing holds a lease or an admission slot.

Real processes only (see ``tests/chaos.py``): ``tierq serve`` and ``tierq broker`` as
subprocesses with production-style settings, two embedded Redis servers with AOF. The app's
Redis runs with ``appendfsync always``: each write is on disk before Redis acknowledges it, so
its ``kill -9`` loses nothing the app was told had happened (with the default ``everysec`` a
crash may drop the last second of acknowledged writes, e.g. a ``completed`` event: that is
Redis's durability setting, not tierq's behaviour under test). The restarted Redis replays the
AOF on the same port and data dir. The broker's Redis is not killed here.

The three tierq bugs this suite found have deterministic reproductions below, kept as
regression tests: a submit killed between recording and
parking its job, a Redis error at the admission acquire, a publish that lands while a failed
submit undoes its job. Two need the app to stop or wait at one exact line: a *failpoint*, a
``sitecustomize`` module on the app's ``PYTHONPATH`` that wraps one tierq function for jobs
with one special prompt (test code only, written to ``tmp_path``).

The sizes are small (a minute or so): the long run is ``bench/chaos.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from chaos import (
    ADMISSION_SWEEP_S,
    APP_PREFIX,
    LEASE_TTL_S,
    Chaos,
    ChaosSystem,
    Plan,
    Report,
    api_key,
    violations,
)
from helpers import wait_until
from tierq.keys import AppKeys

PLAN = Plan(
    jobs=180,
    rate=6.0,
    kills=((6.0, "app"), (14.0, "broker"), (22.0, "redis")),
    down_s=1.0,
    drain_deadline_s=30.0,
)
"""180 jobs over 30 s, one kill of each part. Kill times are whole multiples of 1/rate, so a
submit reaches the app as each kill lands (and the kill waits until a job runs): kills hit
submits, publishes and runs in flight."""
RECOVERY_S = LEASE_TTL_S + 2 * ADMISSION_SWEEP_S + 5.0
"""Long enough for every recovery path (lease expiry, reconciler, admission sweep) to act."""


def explain(report: Report, chaos: Chaos) -> str:
    """The assertion message: counts, the problems, evidence, and the processes' log tails."""
    evidence = json.dumps(report.evidence, indent=1)[:6000]
    return (
        f"{'; '.join(violations(report))}\n{report.summary()}\nevidence: {evidence}\n"
        f"{chaos.system.tails(3000)}"
    )


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_jobs_survive_kills_of_app_broker_and_redis(tmp_path: Path) -> None:
    chaos = Chaos(PLAN, tmp_path)
    report = await chaos.run()
    (tmp_path / "report.json").write_text(json.dumps(report.as_dict(), indent=1, default=str))
    print(json.dumps({"counts": report.counts, "timings": report.timings}, indent=1))
    c = report.counts
    assert c["kills_app"] == c["kills_broker"] == c["kills_redis"] == 1, report.kills
    assert c["admitted"] >= PLAN.jobs, explain(report, chaos)
    assert not violations(report), explain(report, chaos)


# -- the known bugs, deterministically ------------------------------------------------------

DIE_BEFORE_RECORD = "die before record"
RECORD_FAILPOINT = f'''"""Test failpoint (tests/e2e/test_chaos.py): the app dies (SIGKILL)
right after admitting (and dispatching) a job whose prompt is {DIE_BEFORE_RECORD!r}: before
recording it, the submit recording as on Redis Cluster (in a second call), unless
TIERQ_TEST_RECORD_AT_ADMISSION is set (one script admits and records, as on a single Redis)."""
import os
import signal

from tierq.dispatch.dispatcher import Dispatcher
from tierq.producer import submit

if not os.environ.get("TIERQ_TEST_RECORD_AT_ADMISSION"):
    submit.records_at_admission = lambda settings: False
_admit = Dispatcher.admit


async def admit(self, body, raw, **kwargs):
    admission = await _admit(self, body, raw, **kwargs)
    if body.input.prompt == {DIE_BEFORE_RECORD!r}:
        os.kill(os.getpid(), signal.SIGKILL)
    return admission


Dispatcher.admit = admit
'''


GHOST = "ghost"
GHOST_FAILPOINT = f'''"""Test failpoints (tests/e2e/test_chaos.py), for jobs whose prompt is
{GHOST!r}: the first publish fails at once, the next takes 1.5 s; a failed submit waits 1 s
before its undo. They only widen the windows of a race that chaos runs hit (the broker down
while submits fail and dispatch passes publish again)."""
import asyncio

from tierq.dispatch.dispatcher import Dispatcher
from tierq.errors import UpstreamError
from tierq.producer import submit

_send, _undo = Dispatcher._send, submit._undo
_sends = {{}}


async def send(self, out, *args):
    if out.data["input"]["prompt"] == {GHOST!r}:
        _sends[out.job_id] = _sends.get(out.job_id, 0) + 1
        if _sends[out.job_id] == 1:
            raise UpstreamError("failpoint: the first publish fails")
        await asyncio.sleep(1.5)
    return await _send(self, out, *args)


async def undo(rt, body, lease_keys):
    if body.input.prompt == {GHOST!r}:
        await asyncio.sleep(1.0)
    return await _undo(rt, body, lease_keys)


Dispatcher._send = send
submit._undo = undo
'''


def with_failpoints(tmp_path: Path, code: str) -> dict[str, str]:
    """The app's extra environment that loads ``code`` (a ``sitecustomize``) at start-up."""
    failpoint = tmp_path / "failpoint"
    failpoint.mkdir()
    (failpoint / "sitecustomize.py").write_text(code)
    return {"PYTHONPATH": str(failpoint)}


def job_body(prompt: str, experience: str = "stream") -> dict[str, object]:
    return {
        "service": "chat", "experience": experience, "mode": "auto", "model": "sim",
        "input": {"prompt": prompt, "simulate": {"tokens": 2, "token_latency_ms": 10}},
    }  # fmt: skip


def job_ids(client: redis.Redis) -> list[str]:
    keys = client.scan_iter(AppKeys(APP_PREFIX).job("*"))
    return [str(k).split("{")[1].rstrip("}") for k in keys if not str(k).endswith(":events")]


def live_members(client: redis.Redis, key: str) -> list[str]:
    """Members of a lease zset whose expiry is after Redis's now."""
    seconds, micros = client.time()
    now = seconds * 1000 + micros // 1000
    return [str(m) for m in client.zrangebyscore(key, f"({now}", "+inf")]


def admission_holds(keys: AppKeys) -> list[str]:
    """What a job of user ``cp1`` in ``q_paid_stream`` holds from its admission on."""
    return [
        keys.admission("q_paid_stream"),
        keys.user_pending("q_paid_stream", "cp1"),
        keys.queue_slots("q_paid_stream"),
        keys.user_guard("cp1"),
        keys.model_guard("sim", "paid"),
    ]


async def submit_killing_the_app(system: ChaosSystem) -> None:
    """Submit the job whose admission kills the app (``RECORD_FAILPOINT``); restart the app."""
    auth = {"Authorization": f"Bearer {api_key('cp1')}"}
    async with httpx.AsyncClient(base_url=system.app_url, timeout=10) as http:
        with pytest.raises(httpx.HTTPError):  # the app died inside the request
            await http.post("/api/jobs", json=job_body(DIE_BEFORE_RECORD), headers=auth)
    await system.restart("app")


@contextlib.asynccontextmanager
async def started(system: ChaosSystem) -> AsyncIterator[redis.Redis]:
    """The system, running; a client of the app's Redis. Stopped at the end."""
    try:
        await system.start()
        with contextlib.closing(
            redis.Redis.from_url(system.app_redis.url, decode_responses=True)
        ) as client:
            yield client
    finally:
        system.stop()


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_app_killed_between_admit_and_record_strands_no_job(tmp_path: Path) -> None:
    """On Redis Cluster a submit admits and dispatches a job in one script, then records it:
    killed in between, the job has leases and a place in dispatch but no record. Nobody heard a
    202 for it; it must go away: its unconfirmed publish is made again, the delivery finds no
    record and gives the leases back, and the admission sweep drops its admission and share."""
    system = ChaosSystem(tmp_path, app_extra_env=with_failpoints(tmp_path, RECORD_FAILPOINT))
    keys = AppKeys(APP_PREFIX)
    holds = admission_holds(keys)
    async with started(system) as client:
        await submit_killing_the_app(system)
        assert not job_ids(client)  # never recorded
        [job_id] = live_members(client, keys.admission("q_paid_stream"))
        assert client.hexists(f"{keys.sched}:jobs", job_id)  # dispatched, publish unconfirmed

        def recovered() -> bool:
            in_dispatch = client.hexists(f"{keys.sched}:jobs", job_id)
            return not in_dispatch and not any(job_id in live_members(client, k) for k in holds)

        with contextlib.suppress(AssertionError):
            await asyncio.to_thread(wait_until, recovered, RECOVERY_S, 0.2)
        held = {k: live_members(client, k) for k in holds}
        assert recovered(), f"job {job_id} stranded after {RECOVERY_S}s: holds {held}"
        assert not job_ids(client)  # and no record came back


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_app_killed_right_after_admitting_and_recording_runs_the_job_once(
    tmp_path: Path,
) -> None:
    """On a single Redis one script admits, dispatches and records the job: killed right after
    it, before the publish and the 202, the job is recorded, holds its leases and waits in
    dispatch with an unconfirmed publish. It is not lost: the reconciler puts it back in its
    line and sends it again, it runs once, and nothing is held afterwards. (As a submit killed
    after recording always did: a job recorded is a job admitted, whether its 202 got out.)"""
    env = with_failpoints(tmp_path, RECORD_FAILPOINT) | {"TIERQ_TEST_RECORD_AT_ADMISSION": "1"}
    system = ChaosSystem(tmp_path, app_extra_env=env)
    keys = AppKeys(APP_PREFIX)
    holds = admission_holds(keys)
    async with started(system) as client:
        await submit_killing_the_app(system)
        [job_id] = job_ids(client)  # recorded with its admission
        assert client.hget(keys.job(job_id), "status") == "queued"
        assert client.hexists(f"{keys.sched}:jobs", job_id)  # dispatched, publish unconfirmed

        def recovered() -> bool:
            done = client.hget(keys.job(job_id), "status") == "completed"
            in_dispatch = client.hexists(f"{keys.sched}:jobs", job_id)
            held = any(job_id in live_members(client, k) for k in holds)
            return done and not in_dispatch and not held

        with contextlib.suppress(AssertionError):
            await asyncio.to_thread(wait_until, recovered, RECOVERY_S, 0.2)
        held = {k: live_members(client, k) for k in holds}
        status = client.hget(keys.job(job_id), "status")
        assert recovered(), f"job {job_id} ({status}) not recovered in {RECOVERY_S}s: {held}"
        events = [json.loads(e["e"]) for _, e in client.xrange(keys.job_events(job_id))]
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        assert [e["type"] for e in events].count("started") == 1
        assert [e["type"] for e in events].count("completed") == 1


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_submit_failing_at_admission_gives_the_users_share_back(tmp_path: Path) -> None:
    system = ChaosSystem(tmp_path)
    keys = AppKeys(APP_PREFIX)
    admission, share = keys.admission("q_paid_stream"), keys.user_pending("q_paid_stream", "cp1")
    async with started(system) as client:
        client.set(admission, "not a zset")  # the admission acquire meets a Redis error
        auth = {"Authorization": f"Bearer {api_key('cp1')}"}
        async with httpx.AsyncClient(base_url=system.app_url, timeout=10) as http:
            res = await http.post("/api/jobs", json=job_body("share"), headers=auth)
        assert res.status_code == 503, res.text  # not admitted (and nothing is left behind)
        client.delete(admission)
        assert not job_ids(client)
        await asyncio.to_thread(
            wait_until, lambda: not live_members(client, share), RECOVERY_S, 0.2
        )


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_failed_submit_leaves_no_record_behind(tmp_path: Path) -> None:
    system = ChaosSystem(tmp_path, app_extra_env=with_failpoints(tmp_path, GHOST_FAILPOINT))
    async with started(system) as client:
        auth = {"Authorization": f"Bearer {api_key('cp1')}"}
        async with httpx.AsyncClient(base_url=system.app_url, timeout=10) as http:
            res = await http.post("/api/jobs", json=job_body(GHOST), headers=auth)
        assert res.status_code == 503, res.text  # not admitted: nothing may be left behind

        def records() -> dict[str, dict[str, str]]:
            keys = AppKeys(APP_PREFIX)
            return {j: {str(k): str(v) for k, v in client.hgetall(keys.job(j)).items()}
                    for j in job_ids(client)}  # fmt: skip

        # "never": watch for the whole window the failpoints open (a 1.5 s publish), and more
        seen = await asyncio.to_thread(watch, records, GHOST_WATCH_S)
        assert not seen, f"records left after a submit answered 503: {seen}"


GHOST_WATCH_S = 5.0


def watch(read: Callable[[], dict[str, Any]], seconds: float) -> dict[str, Any]:
    """Everything ``read`` returned during ``seconds`` (polled), merged."""
    seen: dict[str, Any] = {}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        seen.update(read())
        time.sleep(0.1)
    return seen
