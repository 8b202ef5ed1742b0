"""Two ``tierq serve`` replicas behind a load balancer, one Redis, one broker: what production
looks like with several boxes. The broker delivers to the public URL (the load balancer), which
hands each request to one of the replicas; clients submit and follow through it too.

Jobs complete exactly once wherever they run, a user's limit of running jobs holds across both
replicas, and an SSE stream on one replica follows (and resumes) a job the other one runs."""

from __future__ import annotations

import itertools
import json
import os
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from test_workers import (
    ADMIN,
    HOST,
    USERS,
    ServeProcess,
    iter_sse,
    log_events,
    ran_once,
    serve_env,
    sse,
    submit,
)

from helpers import ServerThread, answer_lifespan, most_at_once, read_body, wait_until
from system import FREE, PAID, sample
from tierq.embedded_redis import free_port
from tierq.keys import AppKeys

JOBS = 40
LIMIT = 2  # running jobs per user (both plans), across the replicas


class Balancer:
    """An HTTP load balancer (as a cloud one, per request): each request goes to a replica
    picked at random (seeded), its response streamed back as it comes (SSE included)."""

    HOP = frozenset({b"host", b"connection", b"keep-alive", b"transfer-encoding",
                     b"content-length"})  # fmt: skip

    def __init__(self, backends: list[str]) -> None:
        self.backends = backends
        self.requests = [0] * len(backends)
        self._random = random.Random(11)
        self._client: httpx.AsyncClient | None = None
        self.server = ServerThread(self)

    @property
    def url(self) -> str:
        return self.server.url

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send, self._open, self._close)
            return
        assert self._client is not None
        pick = self._random.randrange(len(self.backends))
        self.requests[pick] += 1
        body = await read_body(receive)
        query = scope["query_string"].decode()
        url = self.backends[pick] + scope["path"] + (f"?{query}" if query else "")
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in self.HOP]
        request = self._client.build_request(scope["method"], url, headers=headers, content=body)
        response = await self._client.send(request, stream=True)
        try:
            out = [(k, v) for k, v in response.headers.raw if k.lower() not in self.HOP]
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": out})  # fmt: skip
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await response.aclose()

    async def _open(self) -> None:
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(60, connect=5))

    async def _close(self) -> None:
        if self._client is not None:
            await self._client.aclose()


class LeaseProbe:
    """Samples the users' guard leases (ZCARD) until stopped: the most each user held."""

    def __init__(self, client: redis.Redis, keys: list[str]) -> None:
        self.client, self.keys = client, keys
        self.most = dict.fromkeys(keys, 0)
        self.samples = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LeaseProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._done.wait(0.005):
            pipe = self.client.pipeline(transaction=False)
            for key in self.keys:
                pipe.zcard(key)
            for key, held in zip(self.keys, pipe.execute(), strict=True):
                self.most[key] = max(self.most[key], int(held))
            self.samples += 1


@dataclass
class Replicas:
    servers: list[ServeProcess]
    balancer: Balancer
    keys: AppKeys


_runs = itertools.count()


@pytest.fixture
def replicas(redis_url: str, broker_url: str, tmp_path: Path) -> Iterator[Replicas]:
    """Two ``tierq serve`` (one process each) sharing a key prefix, behind a balancer that is
    their public URL."""
    ports = [free_port(), free_port()]
    balancer = Balancer([f"http://{HOST}:{port}" for port in ports])
    balancer.server.start()
    prefix = f"rep{os.getpid()}x{next(_runs)}"
    limits = json.dumps({"paid": LIMIT, "free": LIMIT})
    env = serve_env(redis_url, prefix, balancer.url, broker_url, TIERQ_USER_LIMITS=limits)
    servers = [ServeProcess(env, port, tmp_path / f"replica{i}.log", workers=1)
               for i, port in enumerate(ports)]  # fmt: skip
    try:
        for server in servers:
            server.start()
        yield Replicas(servers, balancer, AppKeys(prefix))
    finally:
        for server in servers:
            server.stop()
        balancer.server.stop()


@pytest.mark.timeout(240)
def test_replicas_share_the_work_and_the_limits(
    replicas: Replicas, redis_client: redis.Redis
) -> None:
    keys, url = replicas.keys, replicas.balancer.url
    guards = [keys.user_guard(user) for user, _ in USERS.values()]
    user_of: dict[str, str] = {}
    with LeaseProbe(redis_client, guards) as probe:
        for i in range(JOBS):
            key = PAID if i % 2 else FREE
            job = submit(url, key, tokens=5, token_latency_ms=30)
            user_of[job["jobId"]] = USERS[key][0]

        def all_ended() -> bool:
            pipe = redis_client.pipeline(transaction=False)
            for job_id in user_of:
                pipe.hget(keys.job(job_id), "status")
            return all(s in (b"completed", b"failed", b"cancelled") for s in pipe.execute())

        wait_until(all_ended, timeout=120, interval=0.05)
    assert probe.samples > 10

    # exactly once: one run, one terminal event, seq dense, for every job
    logs = {job_id: log_events(redis_client, keys, job_id) for job_id in user_of}
    for job_id, events in logs.items():
        assert ran_once(events), (job_id, events)
    # ... each run on one replica only; both replicas ran jobs of both users
    ran = [set(server.started_jobs()) for server in replicas.servers]
    assert ran[0].isdisjoint(ran[1])
    assert ran[0] | ran[1] == set(logs)
    for user, _ in USERS.values():
        assert all(any(user_of[j] == user for j in jobs) for jobs in ran), (user, ran)
    assert all(replicas.balancer.requests), replicas.balancer.requests

    # a user's limit held across both: at no instant did a user run more than LIMIT jobs,
    # never were more than LIMIT of a user's leases held (the probe); the limit was reached
    by_user: dict[str, list[tuple[int, int]]] = {}
    for job_id, events in logs.items():
        started = next(e["ts"] for e in events if e["type"] == "started")
        by_user.setdefault(user_of[job_id], []).append((started, events[-1]["ts"]))
    assert {user: most_at_once(spans) for user, spans in by_user.items()} == {
        user: LIMIT for user, _ in USERS.values()
    }
    assert all(held <= LIMIT for held in probe.most.values()), probe.most

    # metrics are per process: the replicas' counts add up to every job
    admin = {"Authorization": f"Bearer {ADMIN}"}
    completed = 0.0
    for server in replicas.servers:
        text = httpx.get(f"{server.url}/metrics", headers=admin, timeout=10).text
        completed += sum(sample(text, "tierq_jobs_completed_total", f'{{queue="{q}"}}')
                         for q in ("q_paid_stream", "q_free_stream"))  # fmt: skip
    assert completed == JOBS


@pytest.mark.timeout(180)
def test_sse_on_one_replica_follows_a_job_the_other_runs(
    replicas: Replicas, redis_client: redis.Redis
) -> None:
    keys = replicas.keys
    job = submit(replicas.balancer.url, PAID, tokens=15, token_latency_ms=100)  # ~1.5 s
    job_id = job["jobId"]

    def runner() -> int | None:
        found = [i for i, s in enumerate(replicas.servers) if job_id in s.started_jobs()]
        return found[0] if found else None

    wait_until(lambda: runner() is not None, timeout=30)
    running_on = runner()
    assert running_on is not None
    runs, follows = replicas.servers[running_on], replicas.servers[1 - running_on]

    # follow it on the replica that does not run it, from the start, live
    received: list[tuple[str, dict[str, Any]]] = []
    live = False
    for entry in iter_sse(follows.url, job):
        received.append(entry)
        if entry[1]["type"] == "started":
            live = redis_client.hget(keys.job(job_id), "status") == b"running"
    assert live  # the stream was following while the other replica still ran the job
    events = [e for _, e in received]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["type"] == "completed"
    assert sum(e["type"] == "delta" for e in events) >= 1
    assert ran_once(log_events(redis_client, keys, job_id))
    assert job_id not in follows.started_jobs()

    # resume on the replica that ran it, after the third event: exactly the rest
    assert sse(runs.url, job, last_event_id=received[2][0]) == received[3:]
