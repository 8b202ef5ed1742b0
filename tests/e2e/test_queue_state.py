"""Operator state survives restarts: configuration only seeds, an operator's pause and
parallelism stay until changed or ``tierq queues sync``, QStash and tierq's dispatcher agree
after every start, and every change is audited. Real broker, app and Redis; the app is
restarted on the same port, Redis and broker keep their state."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from qstash import QStash
from typer.testing import CliRunner

from helpers import ServerThread, wait_until
from system import DEV, FREE, PAID, System
from tierq.app import create_app
from tierq.cli import app as cli_app
from tierq.cli_ops import Code
from tierq.config import QueueSettings
from tierq.ops.queue_state import seed_lock_key
from tierq.queues import QueueId

pytestmark = pytest.mark.timeout(120)

HANG = {"prompt": "x", "simulate": {"fail": "hang"}}


def audits(stream: io.StringIO, event: str) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]
    return [r for r in rows if r["event"] == event]


@pytest.fixture
def qstash(system: System) -> Iterator[QStash]:
    client = QStash(DEV.token, base_url=system.broker.url)
    yield client
    client.http._client.close()  # type: ignore[attr-defined]


def admin(system: System, method: str, path: str, **kw: Any) -> Any:
    headers = {"Authorization": f"Bearer {system.settings.admin_token}"}
    res = system.http.request(method, f"/api/admin{path}", headers=headers, **kw)
    assert res.status_code == 200, res.text
    return res.json()


def cli(system: System, *args: str) -> None:
    env = {"TIERQ_URL": system.app.url, "TIERQ_ADMIN_TOKEN": system.settings.admin_token}
    result = CliRunner().invoke(cli_app, ["queues", *args, "--json"], env=env)
    assert result.exit_code == Code.OK, result.output


def restart(system: System, **overrides: Any) -> None:
    """Stop the app and start it again on the same port (Redis and broker keep running)."""
    system.app.stop()
    system.settings = system.settings.model_copy(update=overrides)
    system.app = ServerThread(create_app(system.settings), port=system.app.port).start()


def in_qstash(qstash: QStash, queue: str) -> tuple[int, bool]:
    q = qstash.queue.get(queue)
    return q.parallelism, q.paused


def record(system: System, queue: str) -> dict[str, str]:
    raw = system.redis.hgetall(system.keys.queue_state(queue))
    return {k.decode(): v.decode() for k, v in raw.items()}


def test_operator_changes_survive_restarts_until_sync(
    system: System, qstash: QStash, audit_log: io.StringIO
) -> None:
    cli(system, "pause", "q_free_batch")
    cli(system, "set-parallelism", "q_paid_stream", "32")
    parked = system.submit(FREE, experience="batch").json()

    for _ in range(2):  # a rolling deploy restarts every process; twice changes nothing more
        restart(system)
        assert in_qstash(qstash, "q_free_batch") == (2, True)
        assert in_qstash(qstash, "q_paid_stream") == (32, False)
        paused = admin(system, "GET", "/queues/q_free_batch")
        assert (paused["paused"], paused["dispatchPaused"], paused["parked"]) == (True, True, 1)
        assert admin(system, "GET", "/queues/q_paid_stream")["parallelism"] == 32
        assert system.job(parked["jobId"], FREE)["status"] == "queued"
    assert audits(audit_log, "queue.seed") == []  # nothing differed: nothing was written

    cli(system, "sync")  # on purpose: configuration over everything
    restart(system)
    assert in_qstash(qstash, "q_free_batch") == (2, False)
    assert in_qstash(qstash, "q_paid_stream") == (16, False)
    assert record(system, "q_free_batch") == {}
    assert system.events(parked["jobId"], parked["eventsToken"])[-1].event == "completed"

    changes = [(r["event"], r.get("queue")) for r in audit_log_rows(audit_log)]
    assert changes == [
        ("queue.pause", "q_free_batch"),
        ("queue.parallelism", "q_paid_stream"),
        ("queue.sync", None),
    ]
    sync = audits(audit_log, "queue.sync")[0]
    assert sync["outcome"] == "ok"
    assert sync["previous"]["q_free_batch"] == {"parallelism": 2, "paused": True}
    assert sync["previous"]["q_paid_stream"] == {"parallelism": 32, "paused": False}


def audit_log_rows(stream: io.StringIO) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]
    return [r for r in rows if r["event"].startswith("queue.")]


def test_start_heals_qstash_from_the_operators_record(
    system: System, qstash: QStash, audit_log: io.StringIO
) -> None:
    """A pause the operator made that QStash lost (an older tierq re-synced it at start, or
    the queue was deleted) is put back in QStash; the configuration does not win."""
    admin(system, "POST", "/queues/q_paid_vision/pause")
    admin(system, "PUT", "/queues/q_free_vision/parallelism", json={"parallelism": 3})
    qstash.queue.resume("q_paid_vision")
    qstash.queue.delete("q_free_vision")
    restart(system)
    assert in_qstash(qstash, "q_paid_vision") == (4, True)
    assert in_qstash(qstash, "q_free_vision") == (3, False)
    seeded = {r["queue"]: r for r in audits(audit_log, "queue.seed")}
    assert set(seeded) == {"q_paid_vision", "q_free_vision"}
    assert seeded["q_paid_vision"]["source"] == {"parallelism": "qstash", "paused": "operator"}
    assert seeded["q_paid_vision"]["previous"] == {"parallelism": 4, "paused": False}
    assert seeded["q_free_vision"]["previous"] is None  # created again
    assert seeded["q_free_vision"]["source"]["parallelism"] == "operator"


def test_qstash_changes_and_new_configuration_are_kept_and_applied_by_dispatch(
    system: System, qstash: QStash, audit_log: io.StringIO
) -> None:
    """Set in QStash (the Upstash console) or changed in configuration after the queue
    exists: QStash keeps what it has, and tierq's dispatcher is told to apply the same."""
    qstash.queue.upsert("q_paid_batch", parallelism=1, paused=False)
    queues = dict(system.settings.queues)
    queues[QueueId.FREE_STREAM] = QueueSettings(parallelism=6, admission_depth=200)
    restart(system, queues=queues)
    assert in_qstash(qstash, "q_paid_batch") == (1, False)
    assert in_qstash(qstash, "q_free_stream") == (4, False)  # configuration only seeds
    assert record(system, "q_paid_batch") == {"parallelism": "1"}
    assert record(system, "q_free_stream") == {"parallelism": "4"}
    assert {r["queue"]: r["recorded"] for r in audits(audit_log, "queue.seed")} == {
        "q_paid_batch": ["parallelism"],
        "q_free_stream": ["parallelism"],
    }

    # the dispatcher applies QStash's parallelism 1: one job out, the next held by the queue
    first = system.submit(PAID, experience="batch", input=HANG).json()
    second = system.submit(PAID, experience="batch", input=HANG).json()
    view = wait_until(
        lambda: (v := admin(system, "GET", "/queues/q_paid_batch"))["inFlight"] == 1 and v
    )
    assert view["parked"] == 1
    for job in (first, second):
        res = system.http.delete(
            f"/api/jobs/{job['jobId']}", headers={"Authorization": f"Bearer {PAID}"}
        )
        assert res.status_code == 200

    admin(system, "POST", "/queues/sync")  # now the configuration, in both places
    assert in_qstash(qstash, "q_free_stream") == (6, False)
    assert record(system, "q_free_stream") == {}


def test_processes_starting_together_take_turns(
    make_system: Callable[..., System], qstash_factory: Callable[[System], QStash],
    audit_log: io.StringIO,
) -> None:  # fmt: skip
    """Seeding runs under a Redis lock: two processes starting at once (``serve --workers``,
    a deploy) wait for it, then seed one after the other; each queue is created once."""
    system = make_system()
    client = qstash_factory(system)
    for queue in QueueId:
        client.queue.delete(queue.value)
    system.app.stop()
    audit_log.seek(0)
    audit_log.truncate()  # the first start's seeding
    held = system.redis.lock(seed_lock_key(system.keys), timeout=60)
    assert held.acquire(blocking=False)
    apps = [ServerThread(create_app(system.settings)) for _ in range(2)]
    starters = [threading.Thread(target=a.start) for a in apps]
    try:
        for t in starters:
            t.start()
        wait_until(lambda: len(waiting_for_the_lock(system)) == 2, timeout=20)
        assert not any(a.server.started for a in apps)
        assert audits(audit_log, "queue.seed") == []
        held.release()
        for t in starters:
            t.join(timeout=30)
        assert all(a.server.started for a in apps)
        seeded = [r["queue"] for r in audits(audit_log, "queue.seed")]
        assert sorted(seeded) == sorted(q.value for q in QueueId)  # once each, not twice
        assert {q.name for q in client.queue.list()} >= {q.value for q in QueueId}
        for a in apps:
            assert httpx.get(f"{a.url}/readyz").status_code == 200
    finally:
        for a in apps:
            a.stop()


def waiting_for_the_lock(system: System) -> list[str]:
    """Ids of app connections whose last command is a ``SET`` (the lock's ``SET NX`` retried
    while another holds it: the app connects only to take it, at this point of its start)."""
    return [
        c["id"]
        for c in system.redis.client_list()
        if c.get("name") == system.settings.redis_client_name and c.get("cmd") == "set"
    ]


@pytest.fixture
def qstash_factory() -> Iterator[Callable[[System], QStash]]:
    made: list[QStash] = []

    def make(system: System) -> QStash:
        client = QStash(DEV.token, base_url=system.broker.url)
        made.append(client)
        return client

    yield make
    for client in made:
        client.http._client.close()  # type: ignore[attr-defined]
