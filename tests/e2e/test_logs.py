"""Structured logs: secrets never logged, deltas never logged one by one, sampling, audit."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator

import pytest
import structlog

from system import DEV, FREE, PAID, System
from tierq.observability.logging import audit, configure_logging, log_job_event


@pytest.fixture
def captured() -> Iterator[tuple[io.StringIO, io.StringIO]]:
    main, audit_out = io.StringIO(), io.StringIO()
    yield main, audit_out
    structlog.reset_defaults()


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_secrets_never_reach_the_logs(
    make_system: Callable[..., System], captured: tuple[io.StringIO, io.StringIO]
) -> None:
    main, audit_out = captured
    system = make_system(qstash_retries=0)
    configure_logging(
        json_output=True, level="debug", secrets=system.settings.secret_values(),
        stream=main, audit_stream=audit_out,
    )  # fmt: skip
    ok = system.submit(PAID).json()
    system.events(ok["jobId"], ok["eventsToken"])
    failing = system.submit(FREE, input={"prompt": "x", "simulate": {"fail": "fatal"}}).json()
    system.events(failing["jobId"], failing["eventsToken"])
    assert system.submit("not-a-key").status_code == 401
    bad = system.http.post(
        "/api/worker/stream/chat", content=b"{}", headers={"Upstash-Signature": "forged"}
    )
    assert bad.status_code == 401
    structlog.get_logger("tierq.test").info(
        "with secrets", authorization=f"Bearer {PAID}", note=f"token {DEV.token} inside"
    )
    audit("test.action", token=system.settings.admin_token)
    text = main.getvalue() + audit_out.getvalue()
    assert "job.event" in text  # the job path did log
    for secret in [*system.settings.secret_values(), ok["eventsToken"]]:
        assert secret not in text, f"secret leaked: {secret[:6]}…"


def test_deltas_are_not_logged_and_sampling_applies(
    captured: tuple[io.StringIO, io.StringIO],
) -> None:
    main, audit_out = captured
    configure_logging(json_output=True, stream=main, audit_stream=audit_out)
    for _ in range(50):
        log_job_event("delta", {}, job_id="j")
        log_job_event("started", {"started": 0.0}, job_id="j")
        log_job_event("completed", {}, job_id="j")
    kinds = [e["type"] for e in lines(main)]
    assert kinds.count("completed") == 50
    assert "delta" not in kinds
    assert "started" not in kinds


def test_audit_stream_is_separate_and_unsampled(
    captured: tuple[io.StringIO, io.StringIO],
) -> None:
    main, audit_out = captured
    configure_logging(json_output=True, stream=main, audit_stream=audit_out)
    for i in range(20):
        audit("queue.pause", queue=f"q{i}")
    records = lines(audit_out)
    assert len(records) == 20
    assert all(r["audit"] is True and r["event"] == "queue.pause" for r in records)
    assert main.getvalue() == ""
