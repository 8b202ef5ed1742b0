"""/metrics counts what happened: jobs per queue, timings, guards, admission, SSE, broker."""

from __future__ import annotations

from collections.abc import Callable

from qstash import QStash

from helpers import wait_until
from system import DEV, PAID, System, sample
from tierq.config import ModelSettings, QueueSettings, TierLimits
from tierq.queues import QueueId


def test_metrics_follow_the_job_path(make_system: Callable[..., System]) -> None:
    queues = {q: QueueSettings(parallelism=4, admission_depth=3) for q in QueueId}
    system = make_system(
        queues=queues,
        qstash_retries=0,
        models={"sim": ModelSettings(limits=TierLimits(paid=1, free=1))},
    )
    ok = system.submit(PAID).json()
    system.events(ok["jobId"], ok["eventsToken"])
    bad = system.submit(PAID, input={"prompt": "x", "simulate": {"fail": "fatal"}}).json()
    system.events(bad["jobId"], bad["eventsToken"])
    slow = system.submit(
        PAID, input={"prompt": "a", "simulate": {"tokens": 5, "token_latency_ms": 60}}
    ).json()
    wait_until(lambda: system.job(slow["jobId"])["status"] == "running")
    waiter = system.submit(PAID).json()
    system.events(waiter["jobId"], waiter["eventsToken"])
    qstash = QStash(DEV.token, base_url=system.broker.url)
    try:
        qstash.queue.pause("q_paid_batch")
        for _ in range(3):
            assert system.submit(PAID, experience="batch").status_code == 202
        assert system.submit(PAID, experience="batch").status_code == 429
    finally:
        qstash.http._client.close()
    text = system.http.get("/metrics").text
    q = '{queue="q_paid_stream"}'
    assert sample(text, "tierq_jobs_submitted_total", q) == 4
    assert sample(text, "tierq_jobs_completed_total", q) >= 2
    assert sample(text, "tierq_jobs_failed_total", q) == 1
    assert sample(text, "tierq_queue_wait_seconds_count", q) >= 3
    assert sample(text, "tierq_run_seconds_count", q) >= 3
    assert sample(text, "tierq_time_to_first_token_seconds_count", q) >= 2
    assert sample(text, "tierq_jobs_parked_total", '{queue="q_paid_stream",reason="model"}') == 1
    assert sample(text, "tierq_jobs_dispatched_total", q) == 4
    assert sample(text, "tierq_jobs_dispatched_total", '{queue="q_paid_batch"}') == 1  # model: 1
    assert sample(text, "tierq_admission_rejections_total", '{queue="q_paid_batch"}') == 1
    assert sample(text, "tierq_sse_streams_total") == 3
    assert sample(text, "tierq_sse_connections") == 0
    broker = system.http.get(f"{system.broker.url}/metrics").text
    assert sample(broker, "tierq_broker_deliveries_total", '{outcome="delivered"}') >= 3
    assert sample(broker, "tierq_broker_dlq_total", q) == 1
