"""The dispatcher's pure policy: outcome of an attempt, response waits, callbacks, headers."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from tierq.broker.server.dispatcher import (
    callback_body,
    classify,
    delivery_headers,
    followup_messages,
    response_wait_s,
)
from tierq.broker.server.model import AttemptResponse, FollowUp, StoredMessage

NOW_MS = 1_700_000_000_000
NOW_S = NOW_MS / 1000
NON_RETRYABLE = "Upstash-NonRetryable-Error"


def message(**overrides: Any) -> StoredMessage:
    fields: dict[str, Any] = {
        "id": "msg_src",
        "user": "u1",
        "url": "https://example.com/hook",
        "method": "PUT",
        "headers": {"X-A": ["1"]},
        "content_type": "text/plain",
        "max_retries": 3,
        "retry_delay": "1000",
        "not_before_ms": NOW_MS - 10_000,
        "created_at_ms": NOW_MS - 20_000,
        "caller_ip": "203.0.113.7",
    }
    fields.update(overrides)
    return StoredMessage(**fields)


# --- classify ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "headers", "retried", "max_retries", "outcome"),
    [
        (200, {}, 0, 3, "delivered"),
        (201, {}, 0, 3, "delivered"),
        (204, {}, 3, 3, "delivered"),
        (299, {}, 0, 0, "delivered"),
        (200, {NON_RETRYABLE: ["true"]}, 0, 3, "delivered"),
        (500, {}, 0, 3, "retry"),
        (500, {}, 2, 3, "retry"),
        (500, {}, 3, 3, "failed"),  # retries exhausted
        (500, {}, 4, 3, "failed"),
        (500, {}, 0, 0, "failed"),  # Upstash-Retries: 0 means a single attempt
        (0, {}, 0, 3, "retry"),  # timeout / connection error
        (0, {}, 3, 3, "failed"),
        (199, {}, 0, 3, "retry"),
        (300, {}, 0, 3, "retry"),
        (302, {}, 0, 3, "retry"),
        (404, {}, 0, 3, "retry"),
        (429, {"Retry-After": ["5"]}, 0, 3, "retry"),
        (489, {NON_RETRYABLE: ["true"]}, 0, 3, "failed"),
        (489, {NON_RETRYABLE: ["True"]}, 0, 3, "failed"),
        (489, {"upstash-nonretryable-error": ["true"]}, 0, 3, "failed"),
        (489, {"UPSTASH-NONRETRYABLE-ERROR": [" TRUE "]}, 1, 20, "failed"),
        (489, {NON_RETRYABLE: ["false"]}, 0, 3, "retry"),
        (489, {}, 0, 3, "retry"),  # 489 without the header is an ordinary failure
        (489, {"X-Other": ["true"]}, 0, 3, "retry"),
        (500, {NON_RETRYABLE: ["true"]}, 0, 3, "retry"),  # header only counts with 489
        (400, {NON_RETRYABLE: ["true"]}, 0, 3, "retry"),
    ],
)
def test_classify(
    status: int, headers: dict[str, list[str]], retried: int, max_retries: int, outcome: str
) -> None:
    response = AttemptResponse(status=status, headers=headers)
    assert classify(response, retried, max_retries) == outcome


# --- response_wait_s --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "wait"),
    [
        ({}, None),
        ({"Content-Type": ["text/plain"]}, None),
        ({"Retry-After": ["5"]}, 5.0),
        ({"retry-after": ["5"]}, 5.0),
        ({"RETRY-AFTER": ["0"]}, 0.0),
        ({"Retry-After": ["Tue, 14 Nov 2023 22:15:20 GMT"]}, 120.0),
        ({"X-RateLimit-Reset": ["6m5s"]}, 365.0),
        ({"X-Ratelimit-Reset": ["30"]}, 30.0),
        ({"x-ratelimit-reset-requests": ["500ms"]}, 0.5),
        ({"X-Ratelimit-Reset-Tokens": ["1m"]}, 60.0),
        # Retry-After is looked at first
        ({"X-Ratelimit-Reset": ["30"], "Retry-After": ["7"]}, 7.0),
        # an unusable value is skipped, the next usable one counts
        ({"Retry-After": ["soon"], "X-Ratelimit-Reset": ["9"]}, 9.0),
        ({"Retry-After": ["nonsense", "4"]}, 4.0),
        ({"Retry-After": ["172800"]}, None),  # over one day: default backoff
        ({"Retry-After": ["-5"]}, None),
        ({"Retry-After": ["172800"], "X-Ratelimit-Reset-Tokens": ["2s"]}, 2.0),
    ],
)
def test_response_wait(headers: dict[str, list[str]], wait: float | None) -> None:
    got = response_wait_s(AttemptResponse(status=429, headers=headers), NOW_S)
    if wait is None:
        assert got is None
    else:
        assert got == pytest.approx(wait)


# --- callback_body ----------------------------------------------------------------------------

CALLBACK_KEYS = {
    "status",
    "header",
    "body",
    "retried",
    "maxRetries",
    "sourceMessageId",
    "topicName",
    "endpointName",
    "url",
    "method",
    "sourceHeader",
    "sourceBody",
    "notBefore",
    "createdAt",
    "scheduleId",
    "callerIP",
}


@pytest.mark.parametrize(
    ("dlq_id", "keys"),
    [(None, CALLBACK_KEYS), ("1725323658779-0", CALLBACK_KEYS | {"dlqId"})],
    ids=["callback", "failure-callback"],
)
@pytest.mark.parametrize(
    ("response_body", "source_body"),
    [
        (b"ok", b'{"prompt": "hi"}'),
        (b"", b""),
        (b"\xff\x00 binary", "héllo".encode()),
    ],
)
def test_callback_body(
    dlq_id: str | None, keys: set[str], response_body: bytes, source_body: bytes
) -> None:
    msg = message()
    response = AttemptResponse(
        status=503, headers={"Retry-After": ["5"], "X-B": ["1", "2"]}, body=response_body
    )
    payload = json.loads(callback_body(msg, source_body, response, 2, dlq_id))
    assert set(payload) == keys
    assert payload["status"] == 503
    assert payload["header"] == {"Retry-After": ["5"], "X-B": ["1", "2"]}
    assert base64.b64decode(payload["body"]) == response_body
    assert payload["retried"] == 2
    assert payload["maxRetries"] == 3
    assert payload["sourceMessageId"] == "msg_src"
    assert payload["url"] == "https://example.com/hook"
    assert payload["method"] == "PUT"
    assert payload["sourceHeader"] == {"X-A": ["1"]}
    assert base64.b64decode(payload["sourceBody"]) == source_body
    assert int(payload["notBefore"]) == NOW_MS - 10_000
    assert int(payload["createdAt"]) == NOW_MS - 20_000
    assert payload["callerIP"] == "203.0.113.7"
    if dlq_id is not None:
        assert payload["dlqId"] == dlq_id


def test_callback_body_base64_is_standard_alphabet() -> None:
    # 0xfb 0xff -> "+/8=" in standard base64, "-_8=" in url-safe
    payload = json.loads(
        callback_body(
            message(), b"\xfb\xff", AttemptResponse(status=200, body=b"\xfb\xff"), 0, None
        )
    )
    assert payload["body"] == "+/8="
    assert payload["sourceBody"] == "+/8="


# --- followup_messages ------------------------------------------------------------------------

CALLBACK = FollowUp(url="https://cb.example/ok", headers={"X-Cb": ["2"]})
FAILURE = FollowUp(
    url="https://cb.example/fail",
    method="PATCH",
    headers={"X-F": ["3"]},
    retries=1,
    timeout_s=7.0,
    retry_delay="500",
    delay_s=5.0,
)


@pytest.mark.parametrize(
    ("callback", "failure", "outcome", "expected"),
    [
        (None, None, "delivered", []),
        (None, None, "failed", []),
        (CALLBACK, None, "delivered", ["callback"]),
        (CALLBACK, None, "retry", ["callback"]),  # called after every attempt
        (CALLBACK, None, "failed", ["callback"]),
        (None, FAILURE, "delivered", []),
        (None, FAILURE, "retry", []),
        (None, FAILURE, "failed", ["failure_callback"]),
        (CALLBACK, FAILURE, "delivered", ["callback"]),
        (CALLBACK, FAILURE, "retry", ["callback"]),
        (CALLBACK, FAILURE, "failed", ["callback", "failure_callback"]),
    ],
)
def test_followup_targets(
    callback: FollowUp | None, failure: FollowUp | None, outcome: str, expected: list[str]
) -> None:
    msg = message(callback=callback, failure_callback=failure)
    out = followup_messages(msg, b"src", AttemptResponse(status=500), 1, outcome, "dlq-1", NOW_MS)
    assert [f.msg.kind for f in out] == expected
    urls = {"callback": "https://cb.example/ok", "failure_callback": "https://cb.example/fail"}
    assert [f.msg.url for f in out] == [urls[k] for k in expected]


@pytest.mark.parametrize("kind", ["callback", "failure_callback"])
def test_no_followups_for_followups(kind: str) -> None:
    msg = message(kind=kind, callback=CALLBACK, failure_callback=FAILURE)
    assert followup_messages(msg, b"", AttemptResponse(status=500), 3, "failed", "d", NOW_MS) == []


def test_followup_messages_fields() -> None:
    msg = message(callback=CALLBACK, failure_callback=FAILURE)
    response = AttemptResponse(status=404, body=b"404 Not Found")
    cb, fail = followup_messages(msg, b"src body", response, 3, "failed", "dlq-9", NOW_MS)

    assert cb.msg.kind == "callback"
    assert cb.msg.id.startswith("msg_")
    assert cb.msg.id != msg.id
    assert cb.msg.user == "u1"
    assert cb.msg.method == "POST"
    assert cb.msg.headers == {"X-Cb": ["2"]}
    assert cb.msg.content_type == "application/json"
    assert cb.msg.max_retries == msg.max_retries  # original retries unless overridden
    assert cb.msg.source_message_id == "msg_src"
    assert cb.msg.not_before_ms == NOW_MS
    assert cb.msg.created_at_ms == NOW_MS
    assert cb.due_ms == NOW_MS
    assert cb.msg.callback is None
    assert cb.msg.failure_callback is None
    cb_payload = json.loads(cb.body)
    assert "dlqId" not in cb_payload
    assert cb_payload["status"] == 404
    assert cb_payload["retried"] == 3
    assert base64.b64decode(cb_payload["body"]) == b"404 Not Found"
    assert base64.b64decode(cb_payload["sourceBody"]) == b"src body"

    assert fail.msg.kind == "failure_callback"
    assert fail.msg.id not in (msg.id, cb.msg.id)
    assert fail.msg.url == "https://cb.example/fail"
    assert fail.msg.method == "PATCH"
    assert fail.msg.headers == {"X-F": ["3"]}
    assert fail.msg.max_retries == 1
    assert fail.msg.timeout_s == 7.0
    assert fail.msg.retry_delay == "500"
    assert fail.msg.not_before_ms == NOW_MS + 5000
    assert fail.due_ms == NOW_MS + 5000
    assert fail.msg.source_message_id == "msg_src"
    fail_payload = json.loads(fail.body)
    assert fail_payload["dlqId"] == "dlq-9"
    assert {k: v for k, v in fail_payload.items() if k != "dlqId"} == cb_payload


@pytest.mark.parametrize("retries", [0, 2, 20])
def test_followup_retries_override(retries: int) -> None:
    msg = message(callback=FollowUp(url="https://cb.example/ok", retries=retries))
    (cb,) = followup_messages(msg, b"", AttemptResponse(status=200), 0, "delivered", "", NOW_MS)
    assert cb.msg.max_retries == retries


# --- delivery_headers -------------------------------------------------------------------------


def _names(headers: list[tuple[str, str]]) -> list[str]:
    return [name.lower() for name, _ in headers]


def test_delivery_headers_full() -> None:
    msg = message(headers={"X-A": ["1", "2"], "Authorization": ["Bearer t"]})
    headers = delivery_headers(msg, 2, "jwt.token.sig")
    assert sorted(headers) == sorted(
        [
            ("X-A", "1"),
            ("X-A", "2"),
            ("Authorization", "Bearer t"),
            ("Content-Type", "text/plain"),
            ("User-Agent", "Upstash-QStash"),
            ("Upstash-Signature", "jwt.token.sig"),
            ("Upstash-Message-Id", "msg_src"),
            ("Upstash-Retried", "2"),
            ("Upstash-Caller-Ip", "203.0.113.7"),
        ]
    )


@pytest.mark.parametrize(
    ("overrides", "values", "absent"),
    [
        ({"content_type": None}, {}, {"content-type"}),
        ({"caller_ip": None}, {}, {"upstash-caller-ip"}),
        # the Python SDK forwards content-type as Upstash-Forward-content-type
        (
            {"content_type": None, "headers": {"Content-Type": ["application/json"]}},
            {"content-type": "application/json"},
            set(),
        ),
        # both given: still exactly one Content-Type on the wire
        (
            {"content_type": "text/plain", "headers": {"Content-Type": ["application/json"]}},
            {},
            set(),
        ),
        # a forwarded User-Agent is not doubled
        ({"headers": {"User-Agent": ["my-agent"]}}, {}, set()),
        ({"headers": {}}, {"user-agent": "Upstash-QStash", "content-type": "text/plain"}, set()),
    ],
)
def test_delivery_headers_variants(
    overrides: dict[str, Any], values: dict[str, str], absent: set[str]
) -> None:
    headers = delivery_headers(message(**overrides), 0, "sig")
    names = _names(headers)
    lowered = {name.lower(): value for name, value in headers}
    for name, value in values.items():
        assert lowered[name] == value
    for name in absent:
        assert name not in names
    single = ["upstash-signature", "upstash-message-id", "upstash-retried", "user-agent"]
    if "content-type" not in absent:
        single.append("content-type")
    for name in single:
        assert names.count(name) == 1, name


@pytest.mark.parametrize("retried", [0, 1, 19])
def test_delivery_headers_retried(retried: int) -> None:
    headers = dict(delivery_headers(message(), retried, "sig"))
    assert headers["Upstash-Retried"] == str(retried)
    assert headers["Upstash-Message-Id"] == "msg_src"
    assert headers["Upstash-Signature"] == "sig"
