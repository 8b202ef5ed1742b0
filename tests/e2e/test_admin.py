"""The admin API end to end: token, queues (pause/resume/parallelism/sync), DLQ, jobs, guards,
overview and the audit records, against a real broker, app and Redis."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from qstash import QStash

from helpers import wait_until
from system import DEV, PAID, System
from tierq.broker.qstash_api import checked_dlq_id, dlq_path
from tierq.errors import ClientError
from tierq.queues import QueueId

FATAL = {"prompt": "x", "simulate": {"fail": "fatal"}}
FAIL_ONCE = {"prompt": "x", "simulate": {"fail": "error", "fail_attempts": 1}}
HANG = {"prompt": "x", "simulate": {"fail": "hang"}}


def admin(
    system: System, method: str, path: str, token: str | None = None, **kw: Any
) -> httpx.Response:
    token = token or system.settings.admin_token
    headers = {"Authorization": f"Bearer {token}"}
    return system.http.request(method, f"/api/admin{path}", headers=headers, **kw)


def ok(res: httpx.Response, status: int = 200) -> Any:
    assert res.status_code == status, res.text
    return res.json()


def queue(system: System, queue_id: str) -> dict[str, Any]:
    view: dict[str, Any] = ok(admin(system, "GET", f"/queues/{queue_id}"))
    return view


def dlq(system: System, **params: str) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = ok(admin(system, "GET", "/dlq", params=params))["messages"]
    return messages


def submit(system: System, **job: Any) -> dict[str, Any]:
    res = system.submit(PAID, **job)
    assert res.status_code == 202, res.text
    reply: dict[str, Any] = res.json()
    return reply


def dead_letter(system: System, job_input: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Submit a job that fails for good; its reply and its DLQ id once it is there."""
    job = submit(system, input=job_input)
    assert system.events(job["jobId"], job["eventsToken"])[-1].event == "failed"

    def entry() -> str | None:
        found = [m for m in dlq(system) if m["jobId"] == job["jobId"]]
        return found[0]["dlqId"] if found else None

    return job, wait_until(entry)


@pytest.fixture
def qstash(system: System) -> Iterator[QStash]:
    client = QStash(DEV.token, base_url=system.broker.url)
    yield client
    client.http._client.close()  # type: ignore[attr-defined]


def records(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


ROUTES = [
    ("GET", "/queues"),
    ("GET", "/queues/q_paid_stream"),
    ("POST", "/queues/q_paid_stream/pause"),
    ("PUT", "/queues/q_paid_stream/parallelism"),
    ("POST", "/queues/sync"),
    ("GET", "/dlq"),
    ("POST", "/dlq/retry"),
    ("DELETE", "/dlq/some-id"),
    ("GET", "/jobs/job_x"),
    ("DELETE", "/jobs/job_x"),
    ("GET", "/guards"),
    ("GET", "/overview"),
]


def test_every_route_needs_the_admin_token(system: System, audit_log: io.StringIO) -> None:
    for method, path in ROUTES:
        missing = system.http.request(method, f"/api/admin{path}")
        assert missing.status_code == 401, (method, path)
        assert missing.json()["error"]["code"] == "unauthorized"
        wrong = admin(system, method, path, token=PAID)
        assert wrong.status_code == 403, (method, path)
        assert wrong.json()["error"]["code"] == "forbidden"
    assert queue(system, "q_paid_stream")["paused"] is False  # nothing changed
    denied = [r for r in records(audit_log) if r["event"] == "admin.denied"]
    assert {r["reason"] for r in denied} == {"missing_token", "invalid_token"}
    assert len(denied) == 2 * len(ROUTES)
    assert PAID not in audit_log.getvalue()


def test_queues_list_shows_the_six(system: System) -> None:
    queues = ok(admin(system, "GET", "/queues"))["queues"]
    assert [q["queueId"] for q in queues] == [q.value for q in QueueId]
    expected = {"q_paid_stream": 16, "q_free_stream": 4, "q_paid_batch": 8, "q_free_batch": 2,
                "q_paid_vision": 4, "q_free_vision": 1}  # fmt: skip
    for q in queues:
        assert q["parallelism"] == expected[q["queueId"]]
        assert (q["paused"], q["lag"], q["inFlight"], q["admitted"], q["dlq"]) == (
            False, 0, 0, 0, 0,
        )  # fmt: skip
        assert q["admissionDepth"] == expected[q["queueId"]] * 50
        assert q["queueId"] == f"q_{q['tier']}_{q['experience']}"
    assert queue(system, "q_free_vision")["parallelism"] == 1
    missing = admin(system, "GET", "/queues/q_nope")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "queue_not_found"


def test_pause_holds_jobs_and_resume_drains(system: System) -> None:
    paused = ok(admin(system, "POST", "/queues/q_paid_stream/pause"))
    assert paused["paused"] is True
    held = submit(system)
    cancelled = submit(system)
    view = queue(system, "q_paid_stream")  # parked by tierq: nothing was published
    assert (view["parked"], view["lag"], view["admitted"], view["inFlight"]) == (2, 0, 2, 0)
    assert system.job(held["jobId"])["status"] == "queued"
    # A queued job is cancelled at once, from the admin side too.
    assert ok(admin(system, "DELETE", f"/jobs/{cancelled['jobId']}")) == {
        "jobId": cancelled["jobId"],
        "status": "cancelled",
    }
    assert (
        queue(system, "q_paid_stream")["admitted"],
        queue(system, "q_paid_stream")["parked"],
    ) == (1, 1)

    resumed = ok(admin(system, "POST", "/queues/q_paid_stream/resume"))
    assert resumed["paused"] is False
    assert system.events(held["jobId"], held["eventsToken"])[-1].event == "completed"
    drained = wait_until(
        lambda: (q := queue(system, "q_paid_stream"))["lag"] == 0 and q["admitted"] == 0 and q
    )
    assert (drained["inFlight"], drained["parked"]) == (0, 0)
    assert system.job(cancelled["jobId"])["status"] == "cancelled"


def test_set_parallelism_then_sync_restores_configuration(system: System, qstash: QStash) -> None:
    ok(admin(system, "POST", "/queues/q_free_batch/pause"))
    changed = ok(admin(system, "PUT", "/queues/q_free_batch/parallelism", json={"parallelism": 5}))
    assert (changed["parallelism"], changed["paused"]) == (5, True)
    in_qstash = qstash.queue.get("q_free_batch")
    assert (in_qstash.parallelism, in_qstash.paused) == (5, True)
    for bad in ({"parallelism": 0}, {"parallelism": "3"}, {}, {"parallelism": 2, "x": 1}):
        res = admin(system, "PUT", "/queues/q_free_batch/parallelism", json=bad)
        assert res.status_code == 422, bad
        assert res.json()["error"]["code"] == "invalid_request"
    assert (
        admin(system, "PUT", "/queues/q_x/parallelism", json={"parallelism": 2}).status_code == 404
    )

    too_many = admin(system, "PUT", "/queues/q_free_batch/parallelism", json={"parallelism": 5000})
    assert too_many.status_code == 412  # the broker's maximum, passed on as QStash's verdict
    assert too_many.json()["error"]["code"] == "qstash_rejected"

    synced = ok(admin(system, "POST", "/queues/sync"))["queues"]
    view = next(q for q in synced if q["queueId"] == "q_free_batch")
    assert (view["parallelism"], view["paused"]) == (2, False)
    in_qstash = qstash.queue.get("q_free_batch")
    assert (in_qstash.parallelism, in_qstash.paused) == (2, False)


def test_dlq_list_show_delete(make_system: Callable[..., System]) -> None:
    system = make_system(qstash_retries=0)
    job, dlq_id = dead_letter(system, FATAL)
    entry = ok(admin(system, "GET", f"/dlq/{dlq_id}"))
    assert entry["dlqId"] == dlq_id
    assert entry["jobId"] == job["jobId"]
    assert entry["userId"] == "dev-paid"
    assert entry["queueId"] == "q_paid_stream"
    assert entry["responseStatus"] == 489
    assert "simulated_fatal" in entry["responseBody"]
    assert entry["url"].endswith("/api/worker/stream/chat")
    assert entry["messageId"] == ok(admin(system, "GET", f"/jobs/{job['jobId']}"))["messageId"]
    assert isinstance(entry["createdAt"], int)
    assert dlq(system) == [entry]
    assert dlq(system, queueId="q_paid_stream") == [entry]
    assert dlq(system, queueId="q_free_stream") == []
    assert dlq(system, responseStatus="500") == []
    assert admin(system, "GET", "/dlq", params={"queueId": "nope"}).status_code == 404
    assert admin(system, "GET", "/dlq", params={"count": "101"}).status_code == 422
    assert queue(system, "q_paid_stream")["dlq"] == 1
    assert queue(system, "q_free_stream")["dlq"] == 0
    # the overview is the shared snapshot, at most queue_metrics_s old (one queue's view: now)
    wait_until(lambda: ok(admin(system, "GET", "/overview"))["dlqSize"] == 1)

    assert ok(admin(system, "DELETE", f"/dlq/{dlq_id}")) == {"deleted": 1}
    gone = admin(system, "GET", f"/dlq/{dlq_id}")
    assert gone.status_code == 404
    assert gone.json()["error"]["code"] == "dlq_not_found"
    assert admin(system, "DELETE", f"/dlq/{dlq_id}").status_code == 404
    assert dlq(system) == []


def test_dlq_pages_follow_the_cursor(make_system: Callable[..., System]) -> None:
    system = make_system(qstash_retries=0)
    ids = {dead_letter(system, FATAL)[1] for _ in range(3)}
    first = ok(admin(system, "GET", "/dlq", params={"count": "2"}))
    assert len(first["messages"]) == 2
    second = ok(admin(system, "GET", "/dlq", params={"count": "2", "cursor": first["cursor"]}))
    assert "cursor" not in second
    assert {m["dlqId"] for m in first["messages"] + second["messages"]} == ids


def test_bad_dlq_cursors_and_ids_are_client_errors(make_system: Callable[..., System]) -> None:
    """A cursor QStash never gave is a 400 (it was a 503 "dependency unavailable"); a DLQ id
    that could change the QStash URL it goes into is a 422 before any request (a control
    character made httpx raise InvalidURL: a 500)."""
    system = make_system(qstash_retries=0)
    _, dlq_id = dead_letter(system, FATAL)
    res = admin(system, "GET", "/dlq", params={"cursor": "zzz"})
    assert res.status_code == 400, res.text
    assert res.json()["error"]["code"] == "invalid_cursor"
    assert admin(system, "GET", "/dlq", params={"cursor": "a\u0001"}).status_code == 422
    for bad in ("a\u0001b", "\u0000", "..", ".", "a b", "a?b", "a#b", "a%2Fb", "\u00e9", "x" * 201):
        path = "/dlq/" + quote(bad, safe="").replace(".", "%2E")  # no client-side ".." folding
        for res in (
            admin(system, "GET", path),
            admin(system, "DELETE", path),
            admin(system, "POST", "/dlq/retry", json={"dlqIds": [dlq_id, bad]}),
            admin(system, "DELETE", "/dlq", json={"dlqIds": [dlq_id, bad]}),
        ):
            assert res.status_code == 422, (bad, res.request.method, res.request.url, res.text)
            assert res.json()["error"]["code"] == "invalid_request"
    for empty in ({"dlqIds": []}, {"dlqIds": [""]}):
        assert admin(system, "DELETE", "/dlq", json=empty).status_code == 422
    assert [m["dlqId"] for m in dlq(system)] == [dlq_id]  # nothing was retried or deleted
    assert ok(admin(system, "GET", f"/dlq/{dlq_id}"))["dlqId"] == dlq_id


def test_dlq_ids_are_checked_and_escaped_by_the_client() -> None:
    for good in ("1700000000000-123", "dlq_AbC-9", "a.b:c~d+e=f"):
        assert checked_dlq_id(good) == good
        assert dlq_path(good) == "/v2/dlq/" + quote(good, safe="")
    for bad in ("", ".", "..", "a/b", "a b", "a\u0001", "a%00", "a?b"):
        with pytest.raises(ClientError) as caught:
            dlq_path(bad)
        assert caught.value.status == 422


def test_dlq_retry_runs_the_job_again_to_completion(make_system: Callable[..., System]) -> None:
    system = make_system(qstash_retries=0)
    job, dlq_id = dead_letter(system, FAIL_ONCE)
    reply = ok(admin(system, "POST", "/dlq/retry", json={"dlqIds": [dlq_id, "dlq_missing"]}))
    assert reply["missing"] == ["dlq_missing"]
    assert [r["dlqId"] for r in reply["retried"]] == [dlq_id]
    assert reply["retried"][0]["messageId"]
    wait_until(lambda: system.job(job["jobId"])["status"] == "completed")
    assert system.events(job["jobId"], job["eventsToken"])[-1].event == "completed"
    assert dlq(system) == []
    again = ok(admin(system, "POST", "/dlq/retry", json={"dlqIds": [dlq_id]}))
    assert again == {"retried": [], "missing": [dlq_id]}
    for bad in ({"dlqIds": []}, {}, {"dlqIds": ["x"] * 101}):
        assert admin(system, "POST", "/dlq/retry", json=bad).status_code == 422


def test_dlq_retry_of_a_fatal_job_fails_again_and_bulk_delete(
    make_system: Callable[..., System],
) -> None:
    system = make_system(qstash_retries=0)
    job, dlq_id = dead_letter(system, FATAL)
    retried = ok(admin(system, "POST", "/dlq/retry", json={"dlqIds": [dlq_id]}))["retried"]
    assert len(retried) == 1

    def back_in_dlq() -> list[dict[str, Any]]:
        return [m for m in dlq(system) if m["messageId"] == retried[0]["messageId"]]

    (entry,) = wait_until(back_in_dlq)
    assert entry["dlqId"] != dlq_id
    assert entry["jobId"] == job["jobId"]
    assert system.job(job["jobId"])["status"] == "failed"
    _, other = dead_letter(system, FATAL)
    deleted = ok(admin(system, "DELETE", "/dlq", json={"dlqIds": [entry["dlqId"], other, "x"]}))
    assert deleted == {"deleted": 2}
    assert dlq(system) == []


def test_jobs_show_cancel_and_guard_occupancy(system: System) -> None:
    job = submit(system, input=HANG)
    job_id = job["jobId"]
    wait_until(lambda: system.job(job_id)["status"] == "running")
    view = ok(admin(system, "GET", f"/jobs/{job_id}"))
    assert view["jobId"] == job_id
    assert view["status"] == "running"
    assert view["userId"] == "dev-paid"
    assert view["messageId"]
    assert view["eventsToken"] == job["eventsToken"]
    assert {"queueId": "q_paid_stream", "tier": "paid", "modelId": "sim"}.items() <= view.items()

    guards = ok(admin(system, "GET", "/guards"))
    models = {(g["modelId"], g["tier"]): g for g in guards["models"]}
    assert models["sim", "paid"] == {
        "modelId": "sim", "tier": "paid", "running": 1, "limit": 8, "effectiveLimit": 8,
        "jobs": [job_id],
    }  # fmt: skip
    assert models["sim", "free"]["running"] == 0
    assert guards["users"] == [{"userId": "dev-paid", "running": 1, "limit": 8, "jobs": [job_id]}]
    running = queue(system, "q_paid_stream")
    assert (running["inFlight"], running["admitted"]) == (1, 1)

    assert ok(admin(system, "DELETE", f"/jobs/{job_id}")) == {
        "jobId": job_id,
        "status": "cancelling",
    }
    assert system.events(job_id, job["eventsToken"])[-1].event == "cancelled"

    def idle() -> dict[str, Any] | None:
        g = ok(admin(system, "GET", "/guards"))
        return g if not g["users"] and all(m["running"] == 0 for m in g["models"]) else None

    wait_until(idle)
    assert wait_until(lambda: queue(system, "q_paid_stream")["inFlight"] == 0)
    assert ok(admin(system, "DELETE", f"/jobs/{job_id}"))["status"] == "cancelled"
    for method in ("GET", "DELETE"):
        res = admin(system, method, "/jobs/job_unknown")
        assert res.status_code == 404
        assert res.json()["error"]["code"] == "job_not_found"


def test_overview_for_the_dashboard(system: System) -> None:
    done = submit(system)
    system.events(done["jobId"], done["eventsToken"])
    view = ok(admin(system, "GET", "/overview"))
    assert [q["queueId"] for q in view["queues"]] == [q.value for q in QueueId]
    assert set(view["guards"]) == {"models", "users"}
    assert view["dlqSize"] == 0
    assert set(view["counters"]) == {q.value for q in QueueId}
    paid = view["counters"]["q_paid_stream"]
    assert paid == {"submitted": 1.0, "completed": 1.0, "failed": 0.0, "cancelled": 0.0}


def test_changes_are_audited_without_the_token(
    make_system: Callable[..., System], audit_log: io.StringIO
) -> None:
    system = make_system(qstash_retries=0)
    ok(admin(system, "POST", "/queues/q_free_vision/pause"))
    ok(admin(system, "POST", "/queues/q_free_vision/resume"))
    ok(admin(system, "PUT", "/queues/q_free_vision/parallelism", json={"parallelism": 3}))
    ok(admin(system, "POST", "/queues/sync"))
    job, dlq_id = dead_letter(system, FATAL)
    ok(admin(system, "POST", "/dlq/retry", json={"dlqIds": ["dlq_missing"]}))
    assert admin(system, "DELETE", "/dlq/dlq_missing").status_code == 404
    ok(admin(system, "DELETE", "/dlq", json={"dlqIds": [dlq_id]}))
    ok(admin(system, "DELETE", f"/jobs/{job['jobId']}"))
    ok(admin(system, "GET", "/queues"))  # reads are not audited

    # admin changes only: not refusals, start-up seeding (test_queue_state.py) or job records
    others = {"admin.denied", "queue.seed", "job.track"}
    got = [r for r in records(audit_log) if r["event"] not in others]
    assert all(r["audit"] is True for r in got)
    assert [(r["event"], r["outcome"]) for r in got] == [
        ("queue.pause", "ok"),
        ("queue.resume", "ok"),
        ("queue.parallelism", "ok"),
        ("queue.sync", "ok"),
        ("dlq.retry", "ok"),
        ("dlq.delete", "error"),
        ("dlq.delete", "ok"),
        ("job.cancel", "ok"),
    ]
    assert got[0]["queue"] == "q_free_vision"
    assert (got[2]["parallelism"], got[2]["previous"]) == (3, 1)
    assert got[4]["missing"] == ["dlq_missing"]
    assert (got[5]["dlq_ids"], got[5]["deleted"], got[5]["error"]) == (
        ["dlq_missing"],
        0,
        "NotFound",
    )
    assert (got[6]["dlq_ids"], got[6]["deleted"]) == ([dlq_id], 1)
    assert (got[7]["job_id"], got[7]["status"]) == (job["jobId"], "failed")
    assert system.settings.admin_token not in audit_log.getvalue()


def test_a_queue_missing_in_qstash_until_sync(system: System, qstash: QStash) -> None:
    qstash.queue.delete("q_free_vision")
    missing = queue(system, "q_free_vision")
    assert (missing["parallelism"], missing["paused"], missing["lag"]) == (None, None, 0)
    for method, path, body in [
        ("POST", "/queues/q_free_vision/pause", None),
        ("POST", "/queues/q_free_vision/resume", None),
        ("PUT", "/queues/q_free_vision/parallelism", {"parallelism": 2}),
    ]:
        res = admin(system, method, path, json=body)
        assert res.status_code == 409, (path, res.text)
        assert res.json()["error"]["code"] == "queue_not_synced"
    ok(admin(system, "POST", "/queues/sync"))
    assert queue(system, "q_free_vision")["parallelism"] == 1
