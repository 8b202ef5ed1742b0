"""``tierq queues|dlq|jobs`` against a running system: every command, ``--json`` output,
named exit codes with one-line errors, and ``jobs tail`` following a job to its end."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import structlog
from click.testing import Result
from typer.testing import CliRunner

from helpers import wait_until
from system import PAID, System
from tierq.cli import app
from tierq.cli_ops import Code, event_line, sse_data, table
from tierq.embedded_redis import free_port
from tierq.observability.logging import configure_logging
from tierq.queues import QueueId

FATAL = {"prompt": "x", "simulate": {"fail": "fatal"}}
FAIL_ONCE = {"prompt": "x", "simulate": {"fail": "error", "fail_attempts": 1}}
HANG = {"prompt": "x", "simulate": {"fail": "hang"}}
SLOW = {"prompt": "x", "simulate": {"tokens": 5, "token_latency_ms": 50}}


@pytest.fixture(autouse=True)
def server_logs() -> Iterator[io.StringIO]:
    """The servers run in this process: keep their logs out of the CLI's captured stdout."""
    logs = io.StringIO()
    configure_logging(json_output=True, stream=logs)
    yield logs
    structlog.reset_defaults()


def run(system: System | None, *args: str, token: str | None = "admin") -> Result:
    env: dict[str, str | None] = {"TIERQ_URL": system.app.url if system else None}
    if token == "admin":
        assert system is not None
        token = system.settings.admin_token
    env["TIERQ_ADMIN_TOKEN"] = token
    return CliRunner().invoke(app, list(args), env=env)


def ok_json(system: System, *args: str) -> Any:
    result = run(system, *args, "--json")
    assert result.exit_code == Code.OK, result.output
    return json.loads(result.stdout)


def fails(result: Result, code: Code, text: str) -> None:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert lines, result.output
    assert lines[-1].startswith("error: ")
    assert text in lines[-1]


def submit(system: System, job_input: dict[str, Any]) -> dict[str, Any]:
    res = system.submit(PAID, input=job_input)
    assert res.status_code == 202, res.text
    reply: dict[str, Any] = res.json()
    return reply


def dead_letter(system: System, job_input: dict[str, Any]) -> tuple[str, str]:
    """(job id, DLQ id) of a job that failed for good."""
    job = submit(system, job_input)
    assert system.events(job["jobId"], job["eventsToken"])[-1].event == "failed"

    def entry() -> str | None:
        found = [
            m["dlqId"]
            for m in ok_json(system, "dlq", "list")["messages"]
            if m["jobId"] == job["jobId"]
        ]
        return found[0] if found else None

    return job["jobId"], wait_until(entry)


def test_queues_commands(system: System) -> None:
    queues = ok_json(system, "queues", "list")["queues"]
    assert [q["queueId"] for q in queues] == [q.value for q in QueueId]
    human = run(system, "queues", "list")
    assert human.exit_code == Code.OK
    lines = human.stdout.splitlines()
    assert lines[0].split() == [
        "QUEUE", "PARALLEL", "PAUSED", "LAG", "IN-FLIGHT", "PARKED", "TOP-PARKED", "ADMITTED",
        "DEPTH", "DLQ",
    ]  # fmt: skip
    assert lines[1].split() == ["q_paid_stream", "16", "no", "0", "0", "0", "-", "0", "800", "0"]

    assert ok_json(system, "queues", "pause", "q_free_batch")["paused"] is True
    changed = ok_json(system, "queues", "set-parallelism", "q_free_batch", "7")
    assert (changed["parallelism"], changed["paused"]) == (7, True)
    assert ok_json(system, "queues", "resume", "q_free_batch")["paused"] is False
    paused = run(system, "queues", "pause", "q_paid_vision")
    assert paused.exit_code == Code.OK
    assert paused.stdout.splitlines()[1].split()[:3] == ["q_paid_vision", "4", "yes"]
    synced = ok_json(system, "queues", "sync")["queues"]
    by_id = {q["queueId"]: q for q in synced}
    assert (by_id["q_free_batch"]["parallelism"], by_id["q_paid_vision"]["paused"]) == (2, False)

    fails(run(system, "queues", "pause", "q_nope"), Code.NOT_FOUND, "not one of the six")
    zero = run(system, "queues", "set-parallelism", "q_free_batch", "0")
    assert zero.exit_code == Code.USAGE


def test_dlq_commands(make_system: Callable[..., System]) -> None:
    system = make_system(qstash_retries=0)
    once_job, once = dead_letter(system, FAIL_ONCE)
    _, fatal_a = dead_letter(system, FATAL)
    _, fatal_b = dead_letter(system, FATAL)
    listed = ok_json(system, "dlq", "list")["messages"]
    assert {m["dlqId"] for m in listed} == {once, fatal_a, fatal_b}
    assert ok_json(system, "dlq", "list", "--queue", "q_free_batch") == {"messages": []}
    human = run(system, "dlq", "list", "--queue", "q_paid_stream")
    assert human.exit_code == Code.OK
    assert human.stdout.splitlines()[0].split()[:3] == ["DLQ", "ID", "QUEUE"]
    assert len(human.stdout.splitlines()) == 4
    assert once in human.stdout

    shown = ok_json(system, "dlq", "show", once)
    assert (shown["jobId"], shown["responseStatus"]) == (once_job, 500)
    shown_human = run(system, "dlq", "show", fatal_a)
    assert shown_human.exit_code == Code.OK
    assert "responseStatus  489" in shown_human.stdout
    fails(run(system, "dlq", "show", "dlq_missing"), Code.NOT_FOUND, "not found")

    retried = ok_json(system, "dlq", "retry", once)
    assert [r["dlqId"] for r in retried["retried"]] == [once]
    wait_until(lambda: system.job(once_job)["status"] == "completed")
    fails(run(system, "dlq", "retry", once), Code.NOT_FOUND, once)
    fails(run(system, "dlq", "retry"), Code.USAGE, "--all")
    fails(run(system, "dlq", "retry", fatal_a, "--all"), Code.USAGE, "--all")
    fails(run(system, "dlq", "retry", fatal_a, "--queue", "q_paid_stream"), Code.USAGE, "--all")

    everything = run(system, "dlq", "retry", "--all")
    assert everything.exit_code == Code.OK, everything.output
    assert everything.stdout.strip() == "retried 2, missing 0"
    assert "retrying 2/2" in everything.stderr

    def back() -> list[str] | None:
        ids = [m["dlqId"] for m in ok_json(system, "dlq", "list")["messages"]]
        return ids if len(ids) == 2 else None

    again = wait_until(back, timeout=15)
    deleted = run(system, "dlq", "delete", *again)
    assert deleted.exit_code == Code.OK, deleted.output
    assert deleted.stdout.strip() == "deleted 2 of 2"
    fails(run(system, "dlq", "delete", again[0]), Code.NOT_FOUND, "1 were not in the DLQ")
    assert ok_json(system, "dlq", "list") == {"messages": []}
    assert ok_json(system, "dlq", "retry", "--all") == {"retried": [], "missing": []}


def test_jobs_show_cancel_and_tail_of_a_cancelled_job(system: System) -> None:
    job = submit(system, HANG)
    job_id = job["jobId"]
    wait_until(lambda: system.job(job_id)["status"] == "running")
    shown = ok_json(system, "jobs", "show", job_id)
    assert (shown["status"], shown["userId"], shown["queueId"]) == (
        "running", "dev-paid", "q_paid_stream",
    )  # fmt: skip
    human = run(system, "jobs", "show", job_id)
    assert human.exit_code == Code.OK
    assert "status      running" in human.stdout
    assert "eventsToken" not in human.stdout

    cancelled = run(system, "jobs", "cancel", job_id)
    assert cancelled.exit_code == Code.OK, cancelled.output
    assert cancelled.stdout.strip() == f"{job_id}: cancelling"
    tail = run(system, "jobs", "tail", job_id)
    assert tail.exit_code == Code.FAILURE, tail.output
    kinds = [line.split()[1] for line in tail.stdout.splitlines()]
    assert kinds == ["queued", "started", "cancelled"]
    assert ok_json(system, "jobs", "cancel", job_id) == {"jobId": job_id, "status": "cancelled"}
    for command in ("show", "cancel", "tail"):
        fails(run(system, "jobs", command, "job_unknown"), Code.NOT_FOUND, "not found")


def test_jobs_tail_follows_a_job_until_completed(system: System) -> None:
    job = submit(system, SLOW)
    tail = run(system, "jobs", "tail", job["jobId"])
    assert tail.exit_code == Code.OK, tail.output
    lines = tail.stdout.splitlines()
    kinds = [line.split()[1] for line in lines]
    assert kinds[:2] == ["queued", "started"]
    assert kinds[-1] == "completed"
    # the text between: deltas only (how many depends on how the 5 tokens were coalesced: a
    # run whose loop lagged gets several tokens in one chunk)
    assert kinds[2:-1]
    assert set(kinds[2:-1]) == {"delta"}
    assert [int(line.split()[0]) for line in lines] == list(range(1, len(lines) + 1))

    as_json = run(system, "jobs", "tail", job["jobId"], "--json")
    assert as_json.exit_code == Code.OK
    events = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [e["type"] for e in events] == kinds
    assert events[-1]["result"] == "".join(e["text"] for e in events if e["type"] == "delta")
    assert len(events[-1]["result"].split()) == 5  # every token, once


def test_errors_have_named_exit_codes(system: System) -> None:
    fails(run(system, "queues", "list", token=PAID), Code.AUTH, "invalid admin token")
    fails(run(system, "queues", "list", token=None), Code.AUTH, "TIERQ_ADMIN_TOKEN")
    fails(run(system, "jobs", "show", "job_unknown"), Code.NOT_FOUND, "job job_unknown")
    nowhere = f"http://127.0.0.1:{free_port()}"
    result = run(system, "queues", "list", "--url", nowhere)
    fails(result, Code.UNAVAILABLE, f"cannot reach tierq at {nowhere}")
    assert result.stdout == ""
    assert run(system, "queues", "nope").exit_code == Code.USAGE


def test_the_tierq_command_has_the_operator_commands(system: System) -> None:
    env = {**os.environ, "TIERQ_URL": system.app.url}
    env["TIERQ_ADMIN_TOKEN"] = system.settings.admin_token or ""
    done = subprocess.run(
        [sys.executable, "-m", "tierq", "queues", "list", "--json"],
        capture_output=True, text=True, env=env, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["queues"]) == 6
    denied = subprocess.run(
        [sys.executable, "-m", "tierq", "jobs", "show", "job_x", "--token", "wrong"],
        capture_output=True, text=True, env=env, timeout=30, check=False,
    )  # fmt: skip
    assert denied.returncode == Code.AUTH
    assert denied.stderr.strip() == "error: 403: invalid admin token"


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (["event: queued", 'data: {"a": 1}', "id: 1-0", ""], [{"a": 1}]),
        ([": ping", "", "data: {}", ""], [{}]),
        (["data: {", "data: }", ""], [{}]),
        (["data: {}"], []),  # an event is dispatched only at its blank line
    ],
)
def test_sse_data(lines: list[str], expected: list[dict[str, Any]]) -> None:
    assert list(sse_data(lines)) == expected


def test_rendering() -> None:
    text = table([{"a": "x", "b": None}, {"a": "longer", "b": True}], [("a", "A"), ("b", "B")])
    assert text.splitlines() == ["A       B", "x       -", "longer  yes"]
    assert event_line({"seq": 3, "type": "delta", "text": "hi"}) == '   3  delta      "hi"'
    failed = {"seq": 4, "type": "failed", "code": "c", "message": "m", "retryable": True}
    assert event_line(failed) == "   4  failed     c: m (will retry)"
