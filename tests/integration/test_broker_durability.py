"""Crash safety: the broker runs as a real process and is killed with SIGKILL mid-flight.

Every message the broker accepted (answered 2xx to) must still be delivered after a restart on
the same Redis key prefix: nothing lost, in-flight deliveries repeated (at-least-once), queue
order kept, nothing dead-lettered.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import IO, Any

import httpx
import pytest
from qstash import QStash

from brokers import DEV
from helpers import Destination, wait_until
from tierq.embedded_redis import free_port

_prefixes = itertools.count()


class BrokerProcess:
    """``python -m tierq broker`` as a child process, restartable on the same port and prefix."""

    def __init__(self, redis_url: str, prefix: str, workdir: Path) -> None:
        self.redis_url = redis_url
        self.prefix = prefix
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None
        self.runs += 1
        self._close_log()
        self._log = (self.workdir / f"broker-{self.runs}.log").open("wb")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TIERQ_", "QSTASH_"))}
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "tierq", "broker",
                "--port", str(self.port),
                "--redis-url", self.redis_url,
                "--key-prefix", self.prefix,
            ],
            cwd=self.workdir,  # no stray tierq.toml is picked up
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_until(self._healthy, timeout=30, interval=0.05)

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"broker exited with {self.proc.returncode}:\n{self.output()}")
        try:
            with httpx.Client(timeout=1) as client:
                return client.get(self.url + "/healthz").status_code == 200
        except httpx.TransportError:
            return False

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        assert self.proc.wait(timeout=10) == -signal.SIGKILL

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._close_log()

    def output(self) -> str:
        return "".join(
            p.read_text(errors="replace") for p in sorted(self.workdir.glob("broker-*.log"))
        )

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


@pytest.fixture
def broker_process(redis_url: str, tmp_path: Path) -> Any:
    proc = BrokerProcess(redis_url, f"dur{os.getpid()}x{next(_prefixes)}", tmp_path)
    clients: list[QStash] = []

    def client() -> QStash:
        # No SDK-side retries: a call must not silently succeed on a second try.
        c = QStash(DEV.token, base_url=proc.url, retry=False)
        clients.append(c)
        return c

    proc.client = client  # type: ignore[attr-defined]
    try:
        yield proc
    finally:
        for c in clients:
            c.http._client.close()  # type: ignore[attr-defined]
        proc.stop()


def first_arrivals(received: list[Any]) -> list[str]:
    """Message ids in the order of their first delivery."""
    seen: dict[str, None] = {}
    for r in received:
        seen.setdefault(r.headers["upstash-message-id"], None)
    return list(seen)


def test_kill9_mid_delivery_loses_nothing(
    broker_process: BrokerProcess, destination: Destination, path: str
) -> None:
    answer_s, parallelism, total = 0.2, 4, 200
    queued_path, delayed_path = path + "-q", path + "-later"
    destination.script(queued_path, (200, {}, b"ok"), delay=answer_s)
    broker_process.start()
    qstash = broker_process.client()  # type: ignore[attr-defined]
    qstash.queue.upsert("durable", parallelism=parallelism)

    # Delayed messages: some fall due before the crash, some while the broker is down.
    delayed = [
        qstash.message.publish(
            url=destination.url + delayed_path, body=f"d{i}", delay=f"{1 + i % 4}s"
        ).message_id
        for i in range(12)
    ]
    queued = [
        qstash.message.enqueue(
            queue="durable", url=destination.url + queued_path, body=str(i)
        ).message_id
        for i in range(total)
    ]

    # Kill while deliveries are in flight: right after one arrived at the destination.
    def fresh_arrival() -> bool:
        got = destination.requests(queued_path)
        return len(got) >= 40 and time.monotonic() - got[-1].at < answer_s / 4

    wait_until(fresh_arrival, timeout=30)
    broker_process.kill9()
    dead_at = time.monotonic()
    before = destination.requests(queued_path)
    # A request whose answer was due after the broker died was never answered to it.
    unanswered = {r.headers["upstash-message-id"] for r in before if r.at + answer_s > dead_at}
    assert unanswered, "the kill did not hit an in-flight delivery"
    assert len(before) < total

    broker_process.start()
    qstash = broker_process.client()  # type: ignore[attr-defined]

    def all_delivered() -> bool:
        ids = {r.headers["upstash-message-id"] for r in destination.requests(queued_path)}
        later = {r.headers["upstash-message-id"] for r in destination.requests(delayed_path)}
        return ids >= set(queued) and later >= set(delayed)

    wait_until(all_delivered, timeout=45)
    got = destination.requests(queued_path)
    counts = Counter(r.headers["upstash-message-id"] for r in got)
    assert set(counts) == set(queued)  # nothing unknown delivered either
    # Every delivery that was in flight at the crash is made again after the restart.
    for message_id in unanswered:
        assert counts[message_id] >= 2, message_id
    assert {r.headers["upstash-message-id"] for r in got if r.at > dead_at} >= unanswered

    # FIFO: a message starts only once every message at least `parallelism` places ahead of it
    # has been delivered, so no first delivery overtakes one enqueued that far before it.
    position = {m: i for i, m in enumerate(queued)}
    order = [position[m] for m in first_arrivals(got)]
    for index, enqueued_at in enumerate(order):
        earlier = max(order[:index], default=-1)
        assert enqueued_at > earlier - parallelism, (index, enqueued_at, earlier)
    assert destination.max_in_flight[queued_path] <= parallelism + len(unanswered)

    wait_until(lambda: qstash.queue.get("durable").lag == 0)
    assert qstash.queue.get("durable").parallelism == parallelism
    assert qstash.dlq.list().messages == []
    bodies = {r.body for r in destination.requests(delayed_path)}
    assert bodies == {f"d{i}".encode() for i in range(12)}


def test_kill9_right_after_publish_loses_nothing(
    broker_process: BrokerProcess, destination: Destination, path: str
) -> None:
    plain_path, queued_path = path + "-plain", path + "-q"
    destination.script(queued_path, (200, {}, b"ok"), delay=0.05)
    broker_process.start()
    qstash = broker_process.client()  # type: ignore[attr-defined]
    qstash.queue.upsert("after-publish", parallelism=1)
    accepted: list[str] = []
    for i in range(30):
        accepted.append(
            qstash.message.enqueue(
                queue="after-publish", url=destination.url + queued_path, body=f"q{i}"
            ).message_id
        )
        accepted.append(
            qstash.message.publish(url=destination.url + plain_path, body=f"p{i}").message_id
        )
    batch = qstash.message.batch(
        [{"url": destination.url + plain_path, "body": f"b{i}"} for i in range(10)]
    )
    accepted += [b.message_id for b in batch]  # type: ignore[union-attr]
    last = qstash.message.publish(url=destination.url + plain_path, body="last").message_id
    accepted.append(last)
    broker_process.kill9()  # the 200 for `last` was just received
    queued_before = len(destination.requests(queued_path))
    assert queued_before < 30  # the crash really interrupted the queue

    broker_process.start()
    qstash = broker_process.client()  # type: ignore[attr-defined]

    def delivered() -> set[str]:
        return {
            r.headers["upstash-message-id"]
            for p in (plain_path, queued_path)
            for r in destination.requests(p)
        }

    wait_until(lambda: delivered() >= set(accepted), timeout=30)
    assert delivered() == set(accepted)
    queued_order = first_arrivals(destination.requests(queued_path))
    assert queued_order == accepted[0:60:2]  # parallelism 1: strict FIFO across the crash
    assert qstash.dlq.list().messages == []
    wait_until(lambda: qstash.queue.get("after-publish").lag == 0)
