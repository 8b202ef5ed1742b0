"""A worker process killed mid-job (kill -9) leaks nothing; the redelivered job completes once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from helpers import ServerThread, wait_until
from system import DEV, PAID
from tierq.broker.server.app import create_broker_app
from tierq.broker.server.credentials import build_accounts
from tierq.config import BrokerSettings
from tierq.embedded_redis import free_port
from tierq.keys import AppKeys


class AppProcess:
    """``tierq serve`` in a subprocess, with production-style configuration from the env."""

    def __init__(self, env: dict[str, str], port: int, log: Path) -> None:
        self.env, self.port, self.log = env, port, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tierq", "serve", "--host", "127.0.0.1",
                 "--port", str(self.port)],
                env=self.env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        url = f"http://127.0.0.1:{self.port}/healthz"

        def healthy() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"app exited: {self.log.read_text()[-3000:]}")
            try:
                return httpx.get(url, timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, timeout=30, interval=0.1)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def app_env(
    redis_url: str, prefix: str, port: int, qstash_url: str, **extra: str
) -> dict[str, str]:
    """``tierq serve``'s environment: production-style settings, one paid user ``crash-user``."""
    return {
        **os.environ,
        "TIERQ_REDIS_URL": redis_url,
        "TIERQ_KEY_PREFIX": prefix,
        "TIERQ_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "TIERQ_API_KEYS": json.dumps({PAID: {"id": "crash-user", "plan": "paid"}}),
        "TIERQ_ADMIN_TOKEN": "crash-admin",
        "TIERQ_EVENTS_SECRET": "crash-secret",
        "QSTASH_URL": qstash_url,
        "QSTASH_TOKEN": DEV.token,
        "QSTASH_CURRENT_SIGNING_KEY": DEV.current_key,
        "QSTASH_NEXT_SIGNING_KEY": DEV.next_key,
        **extra,
    }


@pytest.fixture
def broker_thread(redis_url: str) -> Iterator[ServerThread]:
    settings = BrokerSettings(key_prefix=f"crash{os.getpid()}b", poll_interval_s=0.2)
    accounts = build_accounts(dev_accounts=True, token=None, current_key=None, next_key=None)
    thread = ServerThread(create_broker_app(settings, redis_url, accounts)).start()
    yield thread
    thread.stop()


@pytest.mark.timeout(180)
def test_worker_killed_mid_job_leaks_nothing(
    redis_url: str, broker_thread: ServerThread, tmp_path: Path
) -> None:
    port = free_port()
    prefix = f"crash{os.getpid()}"
    # 10 retries a second apart: room for a slow restart on a busy machine
    env = app_env(
        redis_url, prefix, port, broker_thread.url,
        TIERQ_LEASE_TTL_S="2", TIERQ_HEARTBEAT_S="0.5", TIERQ_QSTASH_RETRIES="10",
        TIERQ_QSTASH_RETRY_DELAY="1000", TIERQ_GUARD_RETRY_AFTER_S="1",
    )  # fmt: skip
    app = AppProcess(env, port, tmp_path / "app.log")
    keys = AppKeys(prefix)
    auth = {"Authorization": f"Bearer {PAID}"}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
        try:
            app.start()
            job = {
                "service": "chat", "experience": "stream", "model": "sim",
                "input": {"prompt": "crash", "simulate": {"tokens": 30, "token_latency_ms": 100}},
            }  # fmt: skip
            submitted = http.post("/api/jobs", json=job, headers=auth)
            assert submitted.status_code == 202, submitted.text
            reply = submitted.json()
            job_id = reply["jobId"]

            def status() -> str:
                res = http.get(f"/api/jobs/{job_id}", headers=auth)
                assert res.status_code == 200, res.text
                return str(res.json()["status"])

            wait_until(lambda: status() == "running")
            app.kill9()
            app.start()
            wait_until(lambda: status() == "completed", timeout=120)
            url = f"/api/jobs/{job_id}/events?token={reply['eventsToken']}"
            with http.stream("GET", url) as res:
                kinds = [
                    json.loads(line[5:])["type"]
                    for line in res.iter_lines()
                    if line.startswith("data:")
                ]
            assert kinds.count("completed") == 1
            assert sum(k in ("completed", "failed", "cancelled") for k in kinds) == 1
            assert kinds.count("started") >= 2  # it ran again after the crash
            guards = [
                keys.model_guard("sim", "paid"), keys.user_guard("crash-user"),
                keys.admission("q_paid_stream"),
            ]  # fmt: skip
            client = redis.Redis.from_url(redis_url)
            try:
                wait_until(lambda: all(client.zcard(k) == 0 for k in guards), timeout=10)
            finally:
                client.close()
        finally:
            app.stop()


def stalling_qstash() -> Starlette:
    """A QStash that accepts everything but never answers a publish (``/v2/batch``)."""

    async def stall(request: Request) -> Response:
        await asyncio.sleep(20)
        return JSONResponse({"error": "stalled"}, status_code=500)

    async def fine(request: Request) -> Response:
        return JSONResponse({})

    methods = ["GET", "POST", "PUT", "DELETE"]
    return Starlette(routes=[Route("/v2/batch", stall, methods=["POST"]),
                             Route("/{path:path}", fine, methods=methods)])  # fmt: skip


@pytest.mark.timeout(180)
def test_app_killed_between_lease_and_publish_runs_the_job_once(
    redis_url: str, broker_thread: ServerThread, tmp_path: Path
) -> None:
    stalled = ServerThread(stalling_qstash()).start()
    port = free_port()
    prefix = f"crashp{os.getpid()}"
    env = app_env(
        redis_url, prefix, port, stalled.url,
        TIERQ_LEASE_TTL_S="3", TIERQ_HEARTBEAT_S="1", TIERQ_DISPATCH_CONFIRM_S="2",
        TIERQ_DISPATCH_RECONCILE_S="0.3",
    )  # fmt: skip
    app = AppProcess(env, port, tmp_path / "app.log")
    keys = AppKeys(prefix)
    client = redis.Redis.from_url(redis_url)
    job = {"service": "chat", "experience": "stream", "model": "sim",
           "input": {"prompt": "crash", "simulate": {"tokens": 3}}}  # fmt: skip
    auth = {"Authorization": f"Bearer {PAID}"}
    try:
        app.start()

        def submit() -> None:
            with contextlib.suppress(httpx.HTTPError):
                httpx.post(f"http://127.0.0.1:{port}/api/jobs", json=job, headers=auth, timeout=30)

        submitter = threading.Thread(target=submit, daemon=True)
        submitter.start()
        # the dispatcher took the leases, the job is recorded and its publish hangs (the stalling
        # QStash): the app dies right there (killed before the record, the submit never said
        # 202: that job must vanish instead, see test_chaos.py)
        [job_id] = wait_until(lambda: client.zrange(keys.dispatching, 0, -1))
        wait_until(lambda: client.exists(keys.job(job_id.decode())))
        app.kill9()
        submitter.join(timeout=30)
        leases = [keys.queue_slots("q_paid_stream"), keys.user_guard("crash-user"),
                  keys.model_guard("sim", "paid")]  # fmt: skip
        assert all(client.zscore(k, job_id) is not None for k in leases)
        app.env = {**env, "QSTASH_URL": broker_thread.url}
        app.start()
        state = keys.job(job_id.decode())
        wait_until(lambda: client.hget(state, "status") == b"completed", timeout=60)
        kinds = [
            json.loads(f[b"e"])["type"] for _, f in client.xrange(keys.job_events(job_id.decode()))
        ]
        assert (kinds.count("started"), kinds.count("completed")) == (1, 1)
        done = [*leases, keys.admission("q_paid_stream"), keys.dispatching]
        wait_until(lambda: all(client.zcard(k) == 0 for k in done), timeout=10)
    finally:
        app.stop()
        stalled.stop()
        client.close()
