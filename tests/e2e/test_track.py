"""The per-job lifecycle record (``job.track``): one unsampled audit record per job when it
ends — completed, failed for good, cancelled while running or while queued — and none for an
attempt that will be retried."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import structlog
from qstash import QStash

from helpers import wait_until
from system import DEV, PAID, System
from tierq.observability.logging import configure_logging

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def audit_out() -> Iterator[io.StringIO]:
    out = io.StringIO()
    # sampling of job events must not touch the lifecycle record
    configure_logging(json_output=True, stream=io.StringIO(), audit_stream=out)
    yield out
    structlog.reset_defaults()


def tracked(out: io.StringIO) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for line in out.getvalue().splitlines():
        record = json.loads(line)
        if record.get("event") == "job.track":
            found.setdefault(record["job_id"], []).append(record)
    return found


def one_record(out: io.StringIO, job_id: str) -> dict[str, Any]:
    wait_until(lambda: job_id in tracked(out))
    [record] = tracked(out)[job_id]
    return record


def test_each_ending_is_tracked_once(
    make_system: Callable[..., System], audit_out: io.StringIO
) -> None:
    system = make_system(log_sample_rates={"completed": 0.0, "failed": 0.0, "started": 0.0})
    ok = system.submit(PAID, input={"prompt": "a b c", "simulate": {"tokens": 3}}).json()
    fatal = system.submit(PAID, input={"prompt": "x", "simulate": {"fail": "fatal"}}).json()
    # fails once (retryable), then completes: tracked once, at the end, with 2 attempts
    flaky = system.submit(
        PAID, input={"prompt": "y", "simulate": {"tokens": 2, "fail": "error", "fail_attempts": 1}}
    ).json()
    hang = system.submit(PAID, input={"prompt": "z", "simulate": {"fail": "hang"}}).json()
    wait_until(lambda: system.job(hang["jobId"])["status"] == "running")
    assert (
        system.http.delete(
            f"/api/jobs/{hang['jobId']}", headers={"Authorization": f"Bearer {PAID}"}
        ).status_code
        == 200
    )

    done = one_record(audit_out, ok["jobId"])
    assert done["outcome"] == "completed"
    assert done["audit"] is True
    assert (done["queue"], done["tier"], done["model"], done["user"]) == (
        "q_paid_stream",
        "paid",
        "sim",
        "dev-paid",
    )
    assert done["attempts"] == 1
    assert done["usage"]["completion_tokens"] == 3
    assert 0 <= done["wait_ms"] <= done["total_ms"]
    assert 0 <= done["run_ms"] <= done["total_ms"]

    failed = one_record(audit_out, fatal["jobId"])
    assert (failed["outcome"], failed["code"]) == ("failed", "simulated_fatal")

    wait_until(lambda: system.job(flaky["jobId"])["status"] == "completed", timeout=60)
    again = one_record(audit_out, flaky["jobId"])
    assert (again["outcome"], again["attempts"]) == ("completed", 2)

    cancelled = one_record(audit_out, hang["jobId"])
    assert cancelled["outcome"] == "cancelled"
    assert cancelled["attempts"] == 1


def test_a_job_cancelled_while_queued_is_tracked(
    make_system: Callable[..., System], audit_out: io.StringIO
) -> None:
    system = make_system(local_start=False)
    client = QStash(DEV.token, base_url=system.broker.url)
    try:
        client.queue.pause("q_paid_stream")  # QStash holds it: the job stays queued
        job = system.submit(PAID).json()
        res = system.http.delete(
            f"/api/jobs/{job['jobId']}", headers={"Authorization": f"Bearer {PAID}"}
        )
        assert res.json()["status"] == "cancelled", res.text
    finally:
        client.http._client.close()  # type: ignore[attr-defined]
    record = one_record(audit_out, job["jobId"])
    assert (record["outcome"], record["queue"], record["user"]) == (
        "cancelled",
        "q_paid_stream",
        "dev-paid",
    )
    assert "attempts" not in record  # it never ran
