"""Wire shapes of messages, DLQ entries and log events, checked against the Python SDK parsers."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import pytest
from qstash.dlq import parse_dlq_message_response
from qstash.log import LogState, parse_logs_response
from qstash.message import parse_message_response

from tierq.broker.server.model import (
    AttemptResponse,
    FollowUp,
    StoredMessage,
    body_fields,
    dlq_wire,
    event_base_json,
    event_fields,
    log_event,
    message_wire,
)

NOW_MS = 1_700_000_000_000
SDK_REQUIRED = {"messageId", "url", "method", "maxRetries", "notBefore", "createdAt"}
NON_UTF8 = b"\xff\xfe\x00binary"


def message(**overrides: Any) -> StoredMessage:
    fields: dict[str, Any] = {
        "id": "msg_1",
        "user": "u1",
        "url": "https://example.com/hook",
        "method": "PUT",
        "headers": {"Authorization": ["Bearer secret"], "X-A": ["1", "2"]},
        "max_retries": 4,
        "not_before_ms": NOW_MS + 5000,
        "created_at_ms": NOW_MS,
        "caller_ip": "203.0.113.7",
    }
    fields.update(overrides)
    return StoredMessage(**fields)


def redacted(value: bytes) -> str:
    return "REDACTED:" + hashlib.sha256(value).hexdigest()


# --- body_fields ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "prefix", "expected"),
    [
        (b"hello", "body", {"body": "hello"}),
        (b"", "body", {"body": ""}),
        ("héllo ✓".encode(), "body", {"body": "héllo ✓"}),
        (NON_UTF8, "body", {"bodyBase64": base64.b64encode(NON_UTF8).decode()}),
        (b"404 Not Found", "responseBody", {"responseBody": "404 Not Found"}),
        (b"\x80", "responseBody", {"responseBodyBase64": "gA=="}),
    ],
)
def test_body_fields(body: bytes, prefix: str, expected: dict[str, str]) -> None:
    assert body_fields(body, prefix) == expected


# --- message_wire -----------------------------------------------------------------------------


def test_message_wire_minimal_has_sdk_required_keys() -> None:
    wire = message_wire(StoredMessage(id="m", user="u", url="https://e.com"), b"")
    assert set(wire) >= SDK_REQUIRED
    assert wire["notBefore"] == 0
    assert wire["createdAt"] == 0
    assert wire["method"] == "POST"
    assert wire["maxRetries"] == 3
    # optional keys are omitted, not null
    for key in (
        "queueName",
        "retryDelayExpression",
        "callback",
        "failureCallback",
        "callbackHeader",
        "failureCallbackHeader",
        "label",
        "labels",
    ):
        assert key not in wire
    parse_message_response(wire)


def test_message_wire_full_round_trips_through_sdk() -> None:
    msg = message(
        queue="paid-stream",
        retry_delay="1000 * retried",
        callback=FollowUp(url="https://cb.example/ok", headers={"X-Cb": ["2"]}),
        failure_callback=FollowUp(url="https://cb.example/fail"),
        labels=["nightly", "eu"],
    )
    wire = message_wire(msg, b'{"a": 1}')
    assert wire == {
        "messageId": "msg_1",
        "url": "https://example.com/hook",
        "method": "PUT",
        "header": {"Authorization": ["Bearer secret"], "X-A": ["1", "2"]},
        "maxRetries": 4,
        "notBefore": NOW_MS + 5000,
        "createdAt": NOW_MS,
        "callerIP": "203.0.113.7",
        "body": '{"a": 1}',
        "queueName": "paid-stream",
        "retryDelayExpression": "1000 * retried",
        "callback": "https://cb.example/ok",
        "failureCallback": "https://cb.example/fail",
        "callbackHeader": {"X-Cb": ["2"]},
        "failureCallbackHeader": {},
        "label": "nightly",
        "labels": ["nightly", "eu"],
    }
    json.dumps(wire)  # JSON-serializable as is
    parsed = parse_message_response(wire)
    assert parsed.message_id == "msg_1"
    assert parsed.url == "https://example.com/hook"
    assert parsed.method == "PUT"
    assert parsed.max_retries == 4
    assert parsed.not_before == NOW_MS + 5000
    assert parsed.created_at == NOW_MS
    assert parsed.queue == "paid-stream"
    assert parsed.body == '{"a": 1}'
    assert parsed.body_base64 is None
    assert parsed.callback == "https://cb.example/ok"
    assert parsed.failure_callback == "https://cb.example/fail"
    assert parsed.retry_delay_expression == "1000 * retried"
    assert parsed.label == "nightly"
    assert parsed.caller_ip == "203.0.113.7"


@pytest.mark.parametrize(
    ("body", "key", "value"),
    [
        (b"plain text", "body", "plain text"),
        (b"", "body", ""),
        (NON_UTF8, "bodyBase64", base64.b64encode(NON_UTF8).decode()),
    ],
)
def test_message_wire_body_or_base64(body: bytes, key: str, value: str) -> None:
    wire = message_wire(message(), body)
    assert wire[key] == value
    other = "bodyBase64" if key == "body" else "body"
    assert other not in wire
    parsed = parse_message_response(wire)
    assert (parsed.body if key == "body" else parsed.body_base64) == value


def test_message_wire_caller_ip_missing_is_empty_string() -> None:
    assert message_wire(message(caller_ip=None), b"")["callerIP"] == ""


# --- redaction --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("redact", "header", "body_key", "body_value"),
    [
        (
            [],
            {"Authorization": ["Bearer secret"], "X-A": ["1", "2"]},
            "body",
            "secret body",
        ),
        (
            ["body"],
            {"Authorization": ["Bearer secret"], "X-A": ["1", "2"]},
            "body",
            redacted(b"secret body"),
        ),
        (
            ["header"],
            {
                "Authorization": [redacted(b"Bearer secret")],
                "X-A": [redacted(b"1"), redacted(b"2")],
            },
            "body",
            "secret body",
        ),
        (
            ["header[Authorization]"],
            {"Authorization": [redacted(b"Bearer secret")], "X-A": ["1", "2"]},
            "body",
            "secret body",
        ),
        (
            ["header[authorization]", "body"],  # header names match case-insensitively
            {"Authorization": [redacted(b"Bearer secret")], "X-A": ["1", "2"]},
            "body",
            redacted(b"secret body"),
        ),
        (
            ["header[X-Missing]"],
            {"Authorization": ["Bearer secret"], "X-A": ["1", "2"]},
            "body",
            "secret body",
        ),
    ],
)
def test_redaction(
    redact: list[str], header: dict[str, list[str]], body_key: str, body_value: str
) -> None:
    msg = message(redact=redact)
    wire = message_wire(msg, b"secret body")
    assert wire["header"] == header
    assert wire[body_key] == body_value
    # the stored message keeps the originals (they are still delivered)
    assert msg.headers == {"Authorization": ["Bearer secret"], "X-A": ["1", "2"]}


def test_redacted_value_format() -> None:
    wire = message_wire(message(redact=["body"]), b"abc")
    assert wire["body"] == (
        "REDACTED:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


def test_redaction_of_non_utf8_body_hides_it() -> None:
    wire = message_wire(message(redact=["body"]), NON_UTF8)
    assert wire["body"] == redacted(NON_UTF8)
    assert "bodyBase64" not in wire


def test_redaction_stays_in_dlq() -> None:
    msg = message(redact=["body", "header[Authorization]"])
    wire = dlq_wire(msg, b"secret", AttemptResponse(status=500), "dlq-1")
    assert wire["body"] == redacted(b"secret")
    assert wire["header"]["Authorization"] == [redacted(b"Bearer secret")]


# --- dlq_wire ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "extra"),
    [
        (
            AttemptResponse(
                status=404, headers={"Content-Type": ["text/plain"]}, body=b"404 Not Found"
            ),
            {
                "responseStatus": 404,
                "responseHeader": {"Content-Type": ["text/plain"]},
                "responseBody": "404 Not Found",
            },
        ),
        (
            AttemptResponse(status=500, body=NON_UTF8),
            {
                "responseStatus": 500,
                "responseHeader": {},
                "responseBodyBase64": base64.b64encode(NON_UTF8).decode(),
            },
        ),
        (
            AttemptResponse(status=0, error="timeout after 5s"),
            {
                "responseStatus": 0,
                "responseHeader": {},
                "responseBody": "",
                "error": "timeout after 5s",
            },
        ),
    ],
)
def test_dlq_wire(response: AttemptResponse, extra: dict[str, Any]) -> None:
    msg = message(retry_delay="2000")
    wire = dlq_wire(msg, b"payload", response, "1725323658779-0")
    base = message_wire(msg, b"payload")
    assert wire == {**base, "dlqId": "1725323658779-0", **extra}
    json.dumps(wire)
    parsed = parse_dlq_message_response(wire, "ignored")
    assert parsed.dlq_id == "1725323658779-0"
    assert parsed.message_id == "msg_1"
    assert parsed.response_status == response.status
    assert parsed.response_headers == extra["responseHeader"]
    assert parsed.response_body == extra.get("responseBody")
    assert parsed.response_body_base64 == extra.get("responseBodyBase64")
    assert parsed.retry_delay_expression == "2000"
    assert parsed.body == "payload"


# --- log events -------------------------------------------------------------------------------


def _shown(event_json: str) -> dict[str, Any]:
    event: dict[str, Any] = json.loads(event_json)
    event.pop("_u")
    return event


@pytest.mark.parametrize(
    "state",
    ["CREATED", "ACTIVE", "RETRY", "ERROR", "DELIVERED", "FAILED", "CANCEL_REQUESTED", "CANCELED"],
)
def test_log_event_minimal(state: str) -> None:
    raw = log_event(message(), state, NOW_MS)
    event = json.loads(raw)
    assert event == {
        "_u": "u1",
        "messageId": "msg_1",
        "url": "https://example.com/hook",
        "method": "PUT",
        "maxRetries": 4,
        "time": NOW_MS,
        "state": state,
    }
    (parsed,) = parse_logs_response([_shown(raw)])
    assert parsed.state == LogState(state)
    assert parsed.time == NOW_MS
    assert parsed.message_id == "msg_1"
    assert parsed.url == "https://example.com/hook"


def test_log_event_with_response_and_next_delivery() -> None:
    msg = message(queue="q1", labels=["a", "b"], retry_delay="1000")
    response = AttemptResponse(
        status=503, headers={"Retry-After": ["5"]}, body=b"busy", error="upstream busy"
    )
    raw = log_event(msg, "ERROR", NOW_MS, response=response, next_delivery_ms=NOW_MS + 5000)
    event = _shown(raw)
    assert event == {
        "messageId": "msg_1",
        "url": "https://example.com/hook",
        "method": "PUT",
        "maxRetries": 4,
        "queueName": "q1",
        "label": "a",
        "labels": ["a", "b"],
        "retryDelayExpr": "1000",
        "retryDelayExpression": "1000",
        "time": NOW_MS,
        "state": "ERROR",
        "responseStatus": 503,
        "responseHeader": {"Retry-After": ["5"]},
        "responseHeaders": {"Retry-After": ["5"]},
        "responseBody": "busy",
        "error": "upstream busy",
        "nextDeliveryTime": NOW_MS + 5000,
    }
    (parsed,) = parse_logs_response([event])
    assert parsed.state == LogState.ERROR
    assert parsed.response_status == 503
    assert parsed.response_headers == {"Retry-After": ["5"]}
    assert parsed.response_body == "busy"
    assert parsed.next_delivery_time == NOW_MS + 5000
    assert parsed.queue == "q1"
    assert parsed.retry_delay_expression == "1000"
    assert parsed.label == "a"
    assert parsed.error == "upstream busy"


def test_log_event_non_utf8_response_body() -> None:
    raw = log_event(message(), "FAILED", NOW_MS, response=AttemptResponse(status=500, body=b"\xff"))
    event = json.loads(raw)
    assert event["responseBodyBase64"] == "/w=="
    assert "responseBody" not in event
    assert "error" not in event


def test_event_base_json_is_open_object_for_lua() -> None:
    msg = message(queue="q1")
    base = event_base_json(msg)
    assert base.startswith("{")
    assert not base.endswith("}")
    closed = json.loads(base + ',"time":1,"state":"CREATED"}')
    assert closed == {**event_fields(msg), "time": 1, "state": "CREATED"}
