"""Hostile input, by hand: every answer of the app's own API and of the OpenAI front door to
what an attacker or a broken client sends is a 4xx in the surface's error shape, never a 5xx.

One case a row: nested JSON (deeper than the bound, and far deeper than Python's recursion
limit), huge strings, wrong types, control characters in path parameters and ids, bad cursors,
empty and oversized id lists, bodies that are not UTF-8 or not JSON, wrong content types. One
whole system (broker + app on real HTTP, one real Redis) serves the module.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from system import PAID, System, start_system
from tierq.config import DEV_ADMIN_TOKEN
from tierq.web.bodies import json_depth, too_deep

JSON = "application/json"
DEPTH = 64  # Settings.max_json_depth
HUGE_IMAGE = "data:image/png;base64," + "A" * 3_000_000  # over Settings.max_body_bytes


def nested(depth: int, kind: str = "array") -> str:
    if kind == "array":
        return "[" * depth + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


def job(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "service": "chat",
        "experience": "stream",
        "model": "sim",
        "input": {"prompt": "hello"},
    }
    body.update(fields)
    return body


def chat(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "sim", "messages": [{"role": "user", "content": "hi"}]}
    body.update(fields)
    return body


def with_raw(body: dict[str, Any], name: str, raw: str) -> bytes:
    """``body`` as JSON with the value of ``name`` (top level) replaced by raw JSON text."""
    marker = "__raw__"
    return json.dumps({**body, name: marker}).replace(f'"{marker}"', raw).encode()


@dataclass(frozen=True)
class Case:
    id: str
    method: str
    path: str
    body: bytes | None = None
    content_type: str | None = JSON
    auth: str = "user"  # user (a paid API key), admin, none
    params: dict[str, str] = field(default_factory=dict)
    status: int | None = None  # the exact 4xx when it matters; else any 4xx


def encoded(value: Any) -> bytes:
    return json.dumps(value).encode()


API_CASES = [
    # -- POST /api/jobs ------------------------------------------------------------------------
    Case("jobs-nested-100k", "POST", "/api/jobs",
         with_raw(job(), "input", nested(100_000)), status=400),
    Case("jobs-nested-objects-5k", "POST", "/api/jobs",
         with_raw(job(), "input", nested(5_000, "object")), status=400),
    Case("jobs-nested-just-over", "POST", "/api/jobs",
         with_raw(job(), "input", nested(DEPTH + 1)), status=400),
    Case("jobs-nested-under-bound", "POST", "/api/jobs",
         with_raw(job(), "input", nested(DEPTH - 2)), status=422),
    Case("jobs-nested-utf16", "POST", "/api/jobs",
         with_raw(job(), "input", nested(5_000)).decode().encode("utf-16"), status=400),
    Case("jobs-huge-prompt", "POST", "/api/jobs",
         encoded(job(input={"prompt": "x" * 3_000_000})), status=413),
    Case("jobs-long-prompt", "POST", "/api/jobs", encoded(job(input={"prompt": "x" * 200_000}))),
    Case("jobs-huge-service", "POST", "/api/jobs", encoded(job(service="s" * 1_000_000))),
    Case("jobs-huge-model", "POST", "/api/jobs", encoded(job(model="m" * 1_000_000))),
    Case("jobs-huge-image", "POST", "/api/jobs",
         encoded(job(service="describe", experience="vision",
                     input={"prompt": "x", "images": [HUGE_IMAGE]})),
         status=413),
    Case("jobs-too-many-images", "POST", "/api/jobs",
         encoded(job(service="describe", experience="vision",
                     input={"prompt": "x", "images": ["https://example.com/a.png"] * 1000}))),
    Case("jobs-lone-surrogate", "POST", "/api/jobs", b'{"service": "chat", '
         b'"experience": "stream", "model": "sim", "input": {"prompt": "\\ud800"}}'),
    Case("jobs-nul-in-model", "POST", "/api/jobs", encoded(job(model="sim\u0000"))),
    Case("jobs-control-in-service", "POST", "/api/jobs", encoded(job(service="ch\u0001at"))),
    Case("jobs-service-int", "POST", "/api/jobs", encoded(job(service=123)), status=422),
    Case("jobs-experience-list", "POST", "/api/jobs", encoded(job(experience=["stream"]))),
    Case("jobs-input-string", "POST", "/api/jobs", encoded(job(input="x")), status=422),
    Case("jobs-mode-bool", "POST", "/api/jobs", encoded(job(mode=True)), status=422),
    Case("jobs-tokens-huge", "POST", "/api/jobs",
         encoded(job(input={"prompt": "x", "simulate": {"tokens": 10**30}}))),
    Case("jobs-latency-nan", "POST", "/api/jobs", with_raw(job(), "input",
         '{"prompt": "x", "simulate": {"token_latency_ms": NaN}}')),
    Case("jobs-latency-infinity", "POST", "/api/jobs", with_raw(job(), "input",
         '{"prompt": "x", "simulate": {"token_latency_ms": 1e999}}')),
    Case("jobs-extra-field", "POST", "/api/jobs", encoded(job(priority=1)), status=422),
    Case("jobs-array-body", "POST", "/api/jobs", b"[]", status=422),
    Case("jobs-null-body", "POST", "/api/jobs", b"null", status=422),
    Case("jobs-string-body", "POST", "/api/jobs", b'"job"', status=422),
    Case("jobs-empty-body", "POST", "/api/jobs", b"", status=422),
    Case("jobs-truncated-json", "POST", "/api/jobs", b'{"service": "chat", "input": {'),
    Case("jobs-not-utf8", "POST", "/api/jobs", b'{"service": "\xff\xfe\xfa"}'),
    Case("jobs-binary", "POST", "/api/jobs", bytes(range(256)) * 4),
    Case("jobs-text-plain", "POST", "/api/jobs", encoded(job()), content_type="text/plain"),
    Case("jobs-form", "POST", "/api/jobs", b"service=chat&experience=stream",
         content_type="application/x-www-form-urlencoded"),
    Case("jobs-no-content-type", "POST", "/api/jobs", encoded(job()), content_type=None),
    Case("jobs-no-key", "POST", "/api/jobs", encoded(job()), auth="none", status=401),
    # -- job ids in paths ----------------------------------------------------------------------
    Case("job-get-control", "GET", "/api/jobs/a%01b", status=404),
    Case("job-get-nul", "GET", "/api/jobs/%00", status=404),
    Case("job-get-huge-id", "GET", "/api/jobs/" + "j" * 20_000, status=404),
    Case("job-get-unicode", "GET", "/api/jobs/%F0%9F%92%A5", status=404),
    Case("job-get-bad-utf8", "GET", "/api/jobs/%FF%FE", status=404),
    Case("job-delete-control", "DELETE", "/api/jobs/a%0Ab", status=404),
    Case("job-delete-with-nested-body", "DELETE", "/api/jobs/x", nested(100_000).encode(),
         status=400),
    Case("job-events-control", "GET", "/api/jobs/%01/events", params={"token": "x"}),
    Case("job-events-bad-token", "GET", "/api/jobs/x/events", params={"token": "\u0001" * 500}),
    Case("job-events-no-auth", "GET", "/api/jobs/x/events", auth="none", status=401),
    # -- worker routes without a signature -----------------------------------------------------
    Case("worker-nested", "POST", "/api/worker/stream/chat", nested(100_000).encode(),
         auth="none", status=400),
    Case("worker-unsigned", "POST", "/api/worker/batch/%01", encoded({}), auth="none"),
    # -- admin: DLQ ids ------------------------------------------------------------------------
    Case("dlq-get-control", "GET", "/api/admin/dlq/a%01b", auth="admin", status=422),
    Case("dlq-get-nul", "GET", "/api/admin/dlq/%00", auth="admin", status=422),
    Case("dlq-get-dotdot", "GET", "/api/admin/dlq/%2E%2E", auth="admin", status=422),
    Case("dlq-get-space", "GET", "/api/admin/dlq/a%20b", auth="admin", status=422),
    Case("dlq-get-query-chars", "GET", "/api/admin/dlq/a%3Fb%23c", auth="admin", status=422),
    Case("dlq-get-percent", "GET", "/api/admin/dlq/a%2500", auth="admin", status=422),
    Case("dlq-get-huge", "GET", "/api/admin/dlq/" + "d" * 5_000, auth="admin", status=422),
    Case("dlq-delete-control", "DELETE", "/api/admin/dlq/a%7Fb", auth="admin", status=422),
    Case("dlq-get-unknown", "GET", "/api/admin/dlq/1700000000000-1", auth="admin", status=404),
    Case("dlq-retry-control", "POST", "/api/admin/dlq/retry", encoded({"dlqIds": ["a\u0001b"]}),
         auth="admin", status=422),
    Case("dlq-retry-nul", "POST", "/api/admin/dlq/retry", encoded({"dlqIds": ["\u0000"]}),
         auth="admin", status=422),
    Case("dlq-retry-dotdot", "POST", "/api/admin/dlq/retry", encoded({"dlqIds": [".."]}),
         auth="admin", status=422),
    Case("dlq-retry-slash", "POST", "/api/admin/dlq/retry", encoded({"dlqIds": ["../queues"]}),
         auth="admin", status=422),
    Case("dlq-retry-empty-id", "POST", "/api/admin/dlq/retry", encoded({"dlqIds": [""]}),
         auth="admin", status=422),
    Case("dlq-retry-empty-list", "POST", "/api/admin/dlq/retry", encoded({"dlqIds": []}),
         auth="admin", status=422),
    Case("dlq-retry-101-ids", "POST", "/api/admin/dlq/retry",
         encoded({"dlqIds": [f"id-{i}" for i in range(101)]}), auth="admin", status=422),
    Case("dlq-retry-int-id", "POST", "/api/admin/dlq/retry", encoded({"dlqIds": [5]}),
         auth="admin", status=422),
    Case("dlq-retry-string", "POST", "/api/admin/dlq/retry", encoded({"dlqIds": "a"}),
         auth="admin", status=422),
    Case("dlq-retry-nested", "POST", "/api/admin/dlq/retry",
         with_raw({}, "dlqIds", nested(100_000)), auth="admin", status=400),
    Case("dlq-retry-no-body", "POST", "/api/admin/dlq/retry", auth="admin", status=422),
    Case("dlq-retry-not-utf8", "POST", "/api/admin/dlq/retry", b'{"dlqIds": ["\xff"]}',
         auth="admin"),
    Case("dlq-delete-control", "DELETE", "/api/admin/dlq", encoded({"dlqIds": ["a\u001bb"]}),
         auth="admin", status=422),
    Case("dlq-delete-empty-list", "DELETE", "/api/admin/dlq", encoded({"dlqIds": []}),
         auth="admin", status=422),
    Case("dlq-delete-huge-id", "DELETE", "/api/admin/dlq", encoded({"dlqIds": ["d" * 10_000]}),
         auth="admin", status=422),
    # -- admin: DLQ listing --------------------------------------------------------------------
    Case("dlq-bad-cursor", "GET", "/api/admin/dlq", auth="admin", params={"cursor": "zzz"},
         status=400),
    Case("dlq-cursor-control", "GET", "/api/admin/dlq", auth="admin",
         params={"cursor": "a\u0001b"}, status=422),
    Case("dlq-cursor-huge", "GET", "/api/admin/dlq", auth="admin", params={"cursor": "c" * 5000},
         status=422),
    Case("dlq-count-zero", "GET", "/api/admin/dlq", auth="admin", params={"count": "0"},
         status=422),
    Case("dlq-count-text", "GET", "/api/admin/dlq", auth="admin", params={"count": "many"},
         status=422),
    Case("dlq-status-text", "GET", "/api/admin/dlq", auth="admin",
         params={"responseStatus": "5xx"}, status=422),
    Case("dlq-status-huge", "GET", "/api/admin/dlq", auth="admin",
         params={"responseStatus": "9" * 40}, status=422),
    Case("dlq-queue-unknown", "GET", "/api/admin/dlq", auth="admin",
         params={"queueId": "q_\u0001"}, status=404),
    # -- admin: queues and jobs ----------------------------------------------------------------
    Case("queue-control", "POST", "/api/admin/queues/q%01/pause", auth="admin", status=404),
    Case("parallelism-string", "PUT", "/api/admin/queues/q_paid_stream/parallelism",
         encoded({"parallelism": "8"}), auth="admin", status=422),
    Case("parallelism-negative", "PUT", "/api/admin/queues/q_paid_stream/parallelism",
         encoded({"parallelism": -1}), auth="admin", status=422),
    Case("parallelism-float", "PUT", "/api/admin/queues/q_paid_stream/parallelism",
         b'{"parallelism": 1e400}', auth="admin", status=422),
    Case("parallelism-nested", "PUT", "/api/admin/queues/q_paid_stream/parallelism",
         with_raw({}, "parallelism", nested(5000, "object")), auth="admin", status=400),
    Case("admin-job-control", "GET", "/api/admin/jobs/%01", auth="admin", status=404),
    Case("admin-job-cancel-control", "DELETE", "/api/admin/jobs/a%00", auth="admin", status=404),
]  # fmt: skip

FRONTDOOR_CASES = [
    Case("chat-nested-100k", "POST", "/v1/chat/completions",
         with_raw(chat(), "messages", nested(100_000)), status=400),
    Case("chat-nested-content", "POST", "/v1/chat/completions", json.dumps(chat()).replace(
         '"hi"', nested(990)).encode(), status=400),
    Case("chat-nested-metadata", "POST", "/v1/chat/completions",
         with_raw(chat(), "metadata", nested(DEPTH + 1, "object")), status=400),
    Case("chat-nested-utf32", "POST", "/v1/chat/completions",
         with_raw(chat(), "metadata", nested(3000)).decode().encode("utf-32"), status=400),
    Case("chat-huge-content", "POST", "/v1/chat/completions",
         encoded(chat(messages=[{"role": "user", "content": "x" * 3_000_000}])), status=413),
    Case("chat-long-content", "POST", "/v1/chat/completions",
         encoded(chat(messages=[{"role": "user", "content": "x" * 200_000}]))),
    Case("chat-huge-model", "POST", "/v1/chat/completions", encoded(chat(model="m" * 1_000_000))),
    Case("chat-huge-image", "POST", "/v1/chat/completions", encoded(chat(messages=[
         {"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "image_url",
          "image_url": {"url": HUGE_IMAGE}}]}])), status=413),
    Case("chat-lone-surrogate", "POST", "/v1/chat/completions",
         b'{"model": "sim", "messages": [{"role": "user", "content": "\\udfff"}]}'),
    Case("chat-nul-model", "POST", "/v1/chat/completions", encoded(chat(model="sim\u0000"))),
    Case("chat-messages-string", "POST", "/v1/chat/completions", encoded(chat(messages="hi")),
         status=400),
    Case("chat-messages-empty", "POST", "/v1/chat/completions", encoded(chat(messages=[])),
         status=400),
    Case("chat-model-int", "POST", "/v1/chat/completions", encoded(chat(model=5)), status=400),
    Case("chat-stream-string", "POST", "/v1/chat/completions", encoded(chat(stream={"on": 1})),
         status=400),
    Case("chat-role-int", "POST", "/v1/chat/completions",
         encoded(chat(messages=[{"role": 1, "content": "x"}])), status=400),
    Case("chat-part-text-int", "POST", "/v1/chat/completions",
         encoded(chat(messages=[{"role": "user", "content": [{"type": "text", "text": 1}]}])),
         status=400),
    Case("chat-n-huge", "POST", "/v1/chat/completions", encoded(chat(n=10**40)), status=400),
    Case("chat-array-body", "POST", "/v1/chat/completions", b"[]", status=400),
    Case("chat-null-body", "POST", "/v1/chat/completions", b"null", status=400),
    Case("chat-empty-body", "POST", "/v1/chat/completions", b"", status=400),
    Case("chat-truncated", "POST", "/v1/chat/completions", b'{"model": "sim", "messages": [',
         status=400),
    Case("chat-not-utf8", "POST", "/v1/chat/completions", b"\xff\xfe\xfd\xfc", status=400),
    Case("chat-binary", "POST", "/v1/chat/completions", bytes(range(256)) * 4, status=400),
    Case("chat-form", "POST", "/v1/chat/completions", b"model=sim&messages=hi",
         content_type="application/x-www-form-urlencoded", status=400),
    Case("chat-no-key", "POST", "/v1/chat/completions", encoded(chat()), auth="none",
         status=401),
    Case("models-control", "GET", "/v1/models/%01", status=404),
    Case("models-huge", "GET", "/v1/models/" + "m" * 20_000, status=404),
    Case("unknown-nested", "POST", "/v1/embeddings", nested(100_000).encode(), status=400),
]  # fmt: skip


@pytest.fixture(scope="module")
def hostile(redis_url: str) -> Iterator[System]:
    system = start_system(redis_url)
    yield system
    system.close()


def send(system: System, case: Case) -> httpx.Response:
    token = {"user": PAID, "admin": DEV_ADMIN_TOKEN}.get(case.auth)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if case.content_type and case.body is not None:
        headers["Content-Type"] = case.content_type
    return system.http.request(
        case.method, case.path, content=case.body, headers=headers, params=case.params
    )


def assert_refused(res: httpx.Response, case: Case) -> dict[str, Any]:
    assert 400 <= res.status_code < 500, (res.status_code, res.text[:300])
    if case.status is not None:
        assert res.status_code == case.status, res.text[:300]
    body: dict[str, Any] = res.json()
    assert set(body) == {"error"}, body
    return dict(body["error"])


@pytest.mark.parametrize("case", API_CASES, ids=[c.id for c in API_CASES])
def test_tierq_api_refuses_hostile_input_with_a_4xx(hostile: System, case: Case) -> None:
    error = assert_refused(send(hostile, case), case)
    assert set(error) == {"code", "message"}, error
    assert isinstance(error["code"], str)
    assert isinstance(error["message"], str)
    assert error["message"]


@pytest.mark.parametrize("case", FRONTDOOR_CASES, ids=[c.id for c in FRONTDOOR_CASES])
def test_front_door_refuses_hostile_input_in_openai_shape(hostile: System, case: Case) -> None:
    error = assert_refused(send(hostile, case), case)
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str)
    assert error["message"]
    assert error["type"] in {"invalid_request_error", "permission_error", "requests"}


def test_the_app_still_works_after_the_hostile_table(hostile: System) -> None:
    res = hostile.submit(PAID)
    assert res.status_code == 202, res.text
    reply = res.json()
    assert hostile.events(reply["jobId"], reply["eventsToken"])[-1].event == "completed"
    assert hostile.http.get("/readyz").status_code == 200


DEPTHS = [
    (b"", 0),
    (b"7", 0),
    (b"[]", 1),
    (b'{"a": [{"b": [1]}]}', 4),
    (b'"[[[["', 0),
    (b'["\\"[[[", [1]]', 2),  # an escaped quote does not end the string
    (b'["\\\\", [1]]', 2),  # an escaped backslash does not escape the quote after it
    (b'["\\\\\\"[[", [1]]', 2),
    (b"[" * 100_000, 100_000),
    (b'"unterminated [[[[', 0),  # the parser refuses it before any bracket
    (b'[[["unterminated', 3),
    ('[["\\"", [[1]]]]'.encode("utf-16"), 4),  # json.loads reads UTF-16 too
    ("\ufeff[[1]]".encode(), 2),
]


@pytest.mark.parametrize(("raw", "depth"), DEPTHS)
def test_json_depth_counts_what_the_parser_would_recurse_into(raw: bytes, depth: int) -> None:
    assert json_depth(raw) == depth


def test_too_deep_is_the_bound() -> None:
    assert not too_deep(nested(DEPTH).encode(), DEPTH)
    assert too_deep(nested(DEPTH + 1).encode(), DEPTH)
    assert not too_deep(("[1]," * 10_000).encode(), DEPTH)  # many brackets, shallow
