"""A worker process killed mid-job (kill -9) leaks nothing; the redelivered job completes once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

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
    env = {
        **os.environ,
        "TIERQ_REDIS_URL": redis_url,
        "TIERQ_KEY_PREFIX": prefix,
        "TIERQ_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "TIERQ_API_KEYS": json.dumps({PAID: {"id": "crash-user", "plan": "paid"}}),
        "TIERQ_ADMIN_TOKEN": "crash-admin",
        "TIERQ_EVENTS_SECRET": "crash-secret",
        "QSTASH_URL": broker_thread.url,
        "QSTASH_TOKEN": DEV.token,
        "QSTASH_CURRENT_SIGNING_KEY": DEV.current_key,
        "QSTASH_NEXT_SIGNING_KEY": DEV.next_key,
        "TIERQ_LEASE_TTL_S": "2",
        "TIERQ_HEARTBEAT_S": "0.5",
        "TIERQ_QSTASH_RETRIES": "10",
        "TIERQ_QSTASH_RETRY_DELAY": "300",
        "TIERQ_GUARD_RETRY_AFTER_S": "1",
    }
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
            import redis  # noqa: PLC0415

            client = redis.Redis.from_url(redis_url)
            try:
                wait_until(lambda: all(client.zcard(k) == 0 for k in guards), timeout=10)
            finally:
                client.close()
        finally:
            app.stop()
