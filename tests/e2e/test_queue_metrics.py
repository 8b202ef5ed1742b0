"""Per-queue gauges from one shared snapshot: what they show, that scrapes and dashboard
viewers never cause a QStash call, that processes share one snapshot through Redis, and that
the admin lists read the same snapshot. Real broker, app(s) and Redis."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from qstash import QStash

from deploy_files import deploy_metric_names, exported_names
from helpers import ServerThread, wait_until
from system import DEV, FREE, PAID, System, sample
from tierq.app import create_app
from tierq.ops.queue_metrics import snapshot_key

pytestmark = pytest.mark.timeout(120)

FATAL = {"prompt": "x", "simulate": {"fail": "fatal"}}
HANG = {"prompt": "x", "simulate": {"fail": "hang"}}


@pytest.fixture
def qstash(system: System) -> Iterator[QStash]:
    client = QStash(DEV.token, base_url=system.broker.url)
    yield client
    client.http._client.close()  # type: ignore[attr-defined]


def admin(http: httpx.Client, token: str | None, method: str, path: str) -> Any:
    res = http.request(method, f"/api/admin{path}", headers={"Authorization": f"Bearer {token}"})
    assert res.status_code == 200, res.text
    return res.json()


def gauge(text: str, name: str, queue: str) -> float | None:
    """The queue's sample of ``name`` (``None`` when absent)."""
    if f'{name}{{queue="{queue}"}} ' not in text:
        return None
    return sample(text, name, f'{{queue="{queue}"}}')


def submitted(system: System, key: str, **job: Any) -> dict[str, Any]:
    res = system.submit(key, **job)
    assert res.status_code == 202, res.text
    reply: dict[str, Any] = res.json()
    return reply


def cancel(system: System, job: dict[str, Any], key: str) -> None:
    res = system.http.delete(
        f"/api/jobs/{job['jobId']}", headers={"Authorization": f"Bearer {key}"}
    )
    assert res.status_code == 200, res.text


def test_gauges_show_every_queue(make_system: Callable[..., System]) -> None:
    system = make_system(queue_metrics_s=0.2, qstash_retries=0, local_start=False)
    token = system.settings.admin_token
    client = QStash(DEV.token, base_url=system.broker.url)
    try:
        admin(system.http, token, "POST", "/queues/q_free_batch/pause")
        parked = submitted(system, FREE, experience="batch")
        running = submitted(system, PAID, input=HANG)
        failed = submitted(system, PAID, experience="batch", input=FATAL)
        assert system.events(failed["jobId"], failed["eventsToken"])[-1].event == "failed"
        client.queue.pause("q_free_stream")  # behind tierq's back: dispatch still publishes
        held = submitted(system, FREE)
        client.queue.delete("q_free_vision")

        def shown() -> str | None:
            text = system.http.get("/metrics").text
            wanted = {
                ("tierq_queue_paused", "q_free_batch"): 1,
                ("tierq_queue_parked", "q_free_batch"): 1,
                ("tierq_queue_admitted", "q_free_batch"): 1,
                ("tierq_queue_in_flight", "q_paid_stream"): 1,
                ("tierq_queue_dlq_messages", "q_paid_batch"): 1,
                ("tierq_queue_lag", "q_free_stream"): 1,
                ("tierq_queue_state_mismatch", "q_free_stream"): 1,
                ("tierq_queue_state_mismatch", "q_free_vision"): 1,
            }
            ok = all(gauge(text, n, q) == v for (n, q), v in wanted.items())
            return text if ok else None

        text = wait_until(shown)
        assert gauge(text, "tierq_queue_parallelism", "q_paid_stream") == 16
        assert gauge(text, "tierq_queue_admission_depth", "q_paid_stream") == 800
        assert gauge(text, "tierq_queue_state_mismatch", "q_free_batch") == 0  # paused in both
        assert gauge(text, "tierq_queue_lag", "q_paid_stream") == 0
        for name in ("tierq_queue_parallelism", "tierq_queue_paused", "tierq_queue_lag"):
            assert gauge(text, name, "q_free_vision") is None  # QStash lacks it: unknown
        assert gauge(text, "tierq_queue_parked", "q_free_vision") == 0
        assert time.time() - sample(text, "tierq_queue_metrics_timestamp_seconds") < 30
        assert sample(text, "tierq_queue_metrics_polls_total", '{outcome="ok"}') >= 1
    finally:
        client.http._client.close()
    for job, key in ((parked, FREE), (running, PAID), (held, FREE)):
        cancel(system, job, key)


def test_scrapes_and_viewers_never_poll_qstash(make_system: Callable[..., System]) -> None:
    """With an interval longer than the test, one snapshot is taken at start; a hundred
    scrapes and dashboard polls after it read that one; a change takes a fresh one."""
    system = make_system(queue_metrics_s=3600)
    token = system.settings.admin_token

    def polls() -> float:
        return system.metric("tierq_queue_metrics_polls_total", '{outcome="ok"}')

    wait_until(lambda: polls() >= 1)
    before = polls()
    as_of = admin(system.http, token, "GET", "/overview")["asOf"]
    stamp = system.metric("tierq_queue_metrics_timestamp_seconds")
    assert as_of == round(stamp * 1000)  # the dashboard reads what the gauges show
    for _ in range(30):
        assert system.http.get("/metrics").status_code == 200
        assert admin(system.http, token, "GET", "/overview")["asOf"] == as_of
        assert admin(system.http, token, "GET", "/queues")["asOf"] == as_of
    assert polls() == before

    admin(system.http, token, "POST", "/queues/q_paid_batch/pause")
    assert polls() == before + 1
    listed = admin(system.http, token, "GET", "/queues")
    assert listed["asOf"] > as_of
    view = next(q for q in listed["queues"] if q["queueId"] == "q_paid_batch")
    assert (view["paused"], view["dispatchPaused"]) == (True, True)
    assert system.metric("tierq_queue_paused", '{queue="q_paid_batch"}') == 1


def test_processes_share_one_snapshot(make_system: Callable[..., System]) -> None:
    """Two app processes on one Redis: one of them asks QStash per interval (a Redis lock),
    the other reads the stored snapshot; both export it."""
    every = 0.25
    system = make_system(queue_metrics_s=every)
    other = ServerThread(create_app(system.settings)).start()
    try:
        https = [system.http, httpx.Client(base_url=other.url, timeout=30)]

        def scrape(http: httpx.Client) -> tuple[float, float]:
            text = http.get("/metrics").text
            return (
                sample(text, "tierq_queue_metrics_polls_total", '{outcome="ok"}'),
                sample(text, "tierq_queue_metrics_timestamp_seconds"),
            )

        wait_until(lambda: all(scrape(h)[1] > 0 for h in https))
        start = time.monotonic()
        first = [scrape(h) for h in https]
        # both processes export snapshots taken well after the first ones
        later = [f[1] + 12 * every for f in first]
        wait_until(lambda: all(scrape(h)[1] > t for h, t in zip(https, later, strict=True)))
        elapsed = time.monotonic() - start
        last = [scrape(h) for h in https]
        polls = sum(b[0] - a[0] for a, b in zip(first, last, strict=True))
        assert polls >= 1
        assert polls <= elapsed / every + 2, (polls, elapsed)  # one process per interval
        https[1].close()
    finally:
        other.stop()


def test_deploy_files_name_only_exported_metrics(system: System) -> None:
    """Every metric the alert rules and the Grafana dashboard name is on a real /metrics: the
    app's or the broker's (here one ``System``: each serves its own)."""
    exported = exported_names(system.http.get("/metrics").text)
    exported |= exported_names(httpx.get(f"{system.broker.url}/metrics").text)
    names = deploy_metric_names()
    assert len(names) >= 15
    assert sorted(names - exported) == []


def test_an_older_poll_never_replaces_a_newer_snapshot(make_system: Callable[..., System]) -> None:
    """Snapshots are stored newest first: a poll that began before another one stored its
    snapshot (a tick racing a change's refresh) does not overwrite it. A snapshot this version
    cannot read (another version's, mid-deploy) is taken again."""
    system = make_system(queue_metrics_s=3600)
    token = system.settings.admin_token
    key = snapshot_key(system.keys)
    raw = wait_until(lambda: system.redis.get(key))
    newer = json.loads(raw)
    newer["at_ms"] += 3_600_000  # as if a poll that began an hour later had stored it
    system.redis.set(key, json.dumps(newer))
    admin(system.http, token, "POST", "/queues/q_paid_batch/pause")  # its refresh: older
    assert admin(system.http, token, "GET", "/queues")["asOf"] == newer["at_ms"]

    system.redis.set(key, b'{"format": "of another version"}')
    listed = admin(system.http, token, "GET", "/overview")
    assert 0 < listed["asOf"] < newer["at_ms"]
    assert json.loads(system.redis.get(key))["at_ms"] == listed["asOf"]
