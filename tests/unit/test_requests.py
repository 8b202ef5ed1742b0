"""Publish/enqueue request parsing: destination, settings, forwarded headers, validation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from tierq.broker.server.model import StoredMessage
from tierq.broker.server.requests import (
    Incoming,
    build_message,
    canonical_header,
    check_destination,
    check_queue_name,
    destination_from_raw,
    split_headers,
)
from tierq.config import BrokerSettings
from tierq.errors import ClientError, NotSupported

LIMITS = BrokerSettings()
NOW_MS = 1_700_000_000_000
DEST = "https://example.com/hook"
Pairs = Sequence[tuple[str, str]]


def build(
    headers: Pairs = (),
    query: Pairs = (),
    *,
    dest: str = DEST,
    body: bytes = b"hi",
    queue: str | None = None,
    limits: BrokerSettings = LIMITS,
) -> tuple[StoredMessage, str | None]:
    return build_message(
        message_id="msg_1",
        user="u1",
        dest=dest,
        body=body,
        incoming=split_headers(headers, query),
        queue=queue,
        now_ms=NOW_MS,
        caller_ip="203.0.113.7",
        limits=limits,
    )


def build_error(headers: Pairs = (), **kwargs: Any) -> ClientError:
    with pytest.raises(ClientError) as info:
        build(headers, **kwargs)
    return info.value


# --- canonical_header -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("content-type", "Content-Type"),
        ("CONTENT-TYPE", "Content-Type"),
        ("x-a-b", "X-A-B"),
        ("X-Custom-HEADER", "X-Custom-Header"),
        ("authorization", "Authorization"),
        ("x-ratelimit-reset", "X-Ratelimit-Reset"),
        ("etag", "Etag"),
        ("a", "A"),
    ],
)
def test_canonical_header(name: str, canonical: str) -> None:
    assert canonical_header(name) == canonical


# --- destination_from_raw ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw_rest", "raw_query", "dest"),
    [
        ("https://example.com/a", "", "https://example.com/a"),
        ("http://127.0.0.1:9000/x/y", "", "http://127.0.0.1:9000/x/y"),
        ("https:/example.com/a", "", "https://example.com/a"),  # proxy collapsed '//'
        ("http:/127.0.0.1:9000/x", "", "http://127.0.0.1:9000/x"),
        ("https://example.com/a", "b=1", "https://example.com/a?b=1"),
        ("https://example.com/a", "b=1&c=%20x", "https://example.com/a?b=1&c=%20x"),
        ("https://example.com/123/", "asdasd=ooo", "https://example.com/123/?asdasd=ooo"),
        ("https://example.com/a", "qstash_token=secret", "https://example.com/a"),
        ("https://example.com/a", "upstash-retries=3&upstash-delay=10s", "https://example.com/a"),
        (
            "https://example.com/a",
            "b=1&upstash-retries=3&qstash_token=t&c=2&Upstash-Delay=1s&QSTASH_TOKEN=u",
            "https://example.com/a?b=1&c=2",
        ),
        (
            "https://example.com/a",
            "upstash-forward-x-a=1&keep=upstash-retries",
            "https://example.com/a?keep=upstash-retries",
        ),
        ("https://example.com/a", "b=1&&c=2&", "https://example.com/a?b=1&c=2"),
        ("https://example.com/a", "flag", "https://example.com/a?flag"),
        ("https://example.com/a", "upstash_x=1", "https://example.com/a?upstash_x=1"),
        ("my-group", "b=1", "my-group?b=1"),
    ],
)
def test_destination_from_raw(raw_rest: str, raw_query: str, dest: str) -> None:
    assert destination_from_raw(raw_rest, raw_query) == dest


# --- check_destination ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dest",
    [
        "https://example.com",
        "https://example.com/",
        "http://127.0.0.1:9000/x",
        "https://example.com/a?b=1&c=2",
        "http://localhost/x#frag",
        "https://user:pw@example.com:8443/p",
    ],
)
def test_check_destination_accepts_urls(dest: str) -> None:
    check_destination(dest)


@pytest.mark.parametrize(
    "dest",
    [
        "example.com",
        "example.com/a",
        "ftp://example.com/a",
        "ws://example.com",
        "https://",
        "https:///a",
        "https://example.com/a b",
        "localhost:8080/x",
        "",
        "/relative/path",
    ],
)
def test_check_destination_invalid_scheme_is_400(dest: str) -> None:
    with pytest.raises(ClientError, match="invalid destination url") as info:
        check_destination(dest)
    assert info.value.status == 400
    assert not isinstance(info.value, NotSupported)


@pytest.mark.parametrize("dest", ["my-group", "group_1", "Orders"])
def test_check_destination_url_group_is_501(dest: str) -> None:
    with pytest.raises(NotSupported) as info:
        check_destination(dest)
    assert info.value.status == 501


# --- check_queue_name -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["q", "paid-stream", "a.b_c-d", "Q1", "x" * 100])
def test_check_queue_name_accepts(name: str) -> None:
    check_queue_name(name)


@pytest.mark.parametrize("name", ["", "a b", "a/b", "a:b", "ä", "x" * 101, "q\n"])
def test_check_queue_name_rejects(name: str) -> None:
    with pytest.raises(ClientError, match="invalid queue name") as info:
        check_queue_name(name)
    assert info.value.status == 400


# --- split_headers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "query", "settings", "forwarded"),
    [
        ([], [], {}, {}),
        (
            [("Upstash-Forward-x-custom", "1"), ("Upstash-Forward-content-type", "text/plain")],
            [],
            {},
            {"X-Custom": ["1"], "Content-Type": ["text/plain"]},
        ),
        (
            [("upstash-forward-X-A", "1"), ("UPSTASH-FORWARD-x-a", "2")],
            [],
            {},
            {"X-A": ["1", "2"]},
        ),
        (
            [("Upstash-Retries", "3"), ("Content-Type", "application/json"), ("X-Other", "x")],
            [],
            {"upstash-retries": "3", "content-type": "application/json"},
            {},
        ),
        (
            [("Upstash-Retries", "1"), ("Upstash-Delay", "5s")],
            [("upstash-retries", "4")],
            {"upstash-retries": "4", "upstash-delay": "5s"},
            {},
        ),
        (
            [],
            [("Upstash-Timeout", "10s"), ("b", "1"), ("upstash-forward-x-q", "v")],
            {"upstash-timeout": "10s"},
            {"X-Q": ["v"]},
        ),
        (
            [("Upstash-Telemetry-Sdk", "upstash-qstash-js"), ("Authorization", "Bearer t")],
            [],
            {"upstash-telemetry-sdk": "upstash-qstash-js"},
            {},
        ),
    ],
)
def test_split_headers(
    headers: Pairs,
    query: Pairs,
    settings: dict[str, str],
    forwarded: dict[str, list[str]],
) -> None:
    assert split_headers(headers, query) == Incoming(settings, forwarded)


INCOMING_WEBHOOK = [
    ("Host", "broker:8080"),
    ("Authorization", "Bearer tok"),
    ("Content-Length", "2"),
    ("Connection", "keep-alive"),
    ("Content-Type", "application/json"),
    ("X-GitHub-Event", "push"),
    ("Accept", "*/*"),
    ("Upstash-Telemetry-Runtime", "node"),
    ("Upstash-Forward-X-Explicit", "1"),
]


@pytest.mark.parametrize(
    ("switch", "query"),
    [
        ([("Upstash-Header-Forward", "true")], []),
        ([("Upstash-Header-Forward", "True")], []),
        ([("upstash-header-forward", "TRUE")], []),
        ([], [("upstash-header-forward", "true")]),
    ],
)
def test_header_forward_true_forwards_incoming_headers(switch: Pairs, query: Pairs) -> None:
    incoming = split_headers([*INCOMING_WEBHOOK, *switch], query)
    assert incoming.forwarded == {
        "X-Github-Event": ["push"],
        "Accept": ["*/*"],
        "X-Explicit": ["1"],
    }
    # transport/auth headers and Upstash settings are never forwarded
    assert incoming.settings["content-type"] == "application/json"
    assert incoming.settings["upstash-telemetry-runtime"] == "node"


@pytest.mark.parametrize("value", ["false", "", "1", "yes"])
def test_header_forward_other_values_forward_only_prefixed(value: str) -> None:
    incoming = split_headers([*INCOMING_WEBHOOK, ("Upstash-Header-Forward", value)])
    assert incoming.forwarded == {"X-Explicit": ["1"]}


# --- build_message: basics --------------------------------------------------------------------


def test_build_message_defaults() -> None:
    msg, dedup = build([("Upstash-Forward-X-A", "1"), ("Content-Type", "text/plain")])
    assert dedup is None
    assert msg.id == "msg_1"
    assert msg.user == "u1"
    assert msg.url == DEST
    assert msg.method == "POST"
    assert msg.headers == {"X-A": ["1"]}
    assert msg.content_type == "text/plain"
    assert msg.max_retries == 3
    assert msg.retry_delay is None
    assert msg.timeout_s is None
    assert msg.not_before_ms == NOW_MS
    assert msg.created_at_ms == NOW_MS
    assert msg.callback is None
    assert msg.failure_callback is None
    assert msg.queue is None
    assert msg.labels == []
    assert msg.caller_ip == "203.0.113.7"
    assert msg.redact == []
    assert msg.kind == "message"
    assert msg.config == {"content-type": "text/plain"}


def test_build_message_without_content_type_keeps_none() -> None:
    msg, _ = build([("Upstash-Forward-content-type", "application/json")])
    assert msg.content_type is None
    assert msg.headers == {"Content-Type": ["application/json"]}


def test_build_message_with_queue() -> None:
    msg, _ = build(queue="paid-stream")
    assert msg.queue == "paid-stream"
    assert msg.not_before_ms == NOW_MS


@pytest.mark.parametrize(
    ("kwargs", "status", "error_type"),
    [
        ({"dest": "example.com"}, 400, ClientError),
        ({"dest": "ftp://example.com"}, 400, ClientError),
        ({"dest": "my-group"}, 501, NotSupported),
        ({"queue": "bad name"}, 400, ClientError),
        ({"queue": ""}, 400, ClientError),
    ],
)
def test_build_message_checks_destination_and_queue(
    kwargs: dict[str, str], status: int, error_type: type[ClientError]
) -> None:
    err = build_error(**kwargs)
    assert type(err) is error_type
    assert err.status == status


# --- retries ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "query", "max_retries"),
    [
        ([], [], 3),
        ([("Upstash-Retries", "0")], [], 0),
        ([("Upstash-Retries", "5")], [], 5),
        ([("Upstash-Retries", " 7 ")], [], 7),
        ([("upstash-retries", "20")], [], 20),
        ([("Upstash-Retries", "1")], [("upstash-retries", "2")], 2),
        ([], [("upstash-retries", "0")], 0),
    ],
)
def test_retries(headers: Pairs, query: Pairs, max_retries: int) -> None:
    msg, _ = build(headers, query)
    assert msg.max_retries == max_retries


def test_retries_default_comes_from_settings() -> None:
    msg, _ = build(limits=BrokerSettings(default_retries=5))
    assert msg.max_retries == 5


@pytest.mark.parametrize("value", ["-1", "21", "1000", "abc", "", "1.5", "3s"])
def test_retries_invalid(value: str) -> None:
    err = build_error([("Upstash-Retries", value)])
    assert err.status == 400
    assert "Upstash-Retries" in err.message


def test_retries_limit_comes_from_settings() -> None:
    assert build([("Upstash-Retries", "2")], limits=BrokerSettings(max_retries=2))[0].max_retries
    err = build_error([("Upstash-Retries", "3")], limits=BrokerSettings(max_retries=2))
    assert err.status == 400


# --- retry delay expression -------------------------------------------------------------------


@pytest.mark.parametrize(
    "expr", ["1000", "pow(2, retried) * 1000", "min(86400000, 1000 * (1 + retried))"]
)
def test_retry_delay_valid(expr: str) -> None:
    msg, _ = build([("Upstash-Retry-Delay", expr)])
    assert msg.retry_delay == expr


@pytest.mark.parametrize(
    "expr",
    [
        "__import__('os').system('id')",
        "retried.real",
        "x * 1000",
        "'1000'",
        "lambda: 1",
        "1000 *",
        "pow(2)",
        "1/0",  # ZeroDivisionError must not escape as a 500
        "10 % 0",
    ],
)
def test_retry_delay_invalid_is_400(expr: str) -> None:
    err = build_error([("Upstash-Retry-Delay", expr)])
    assert err.status == 400
    assert "Upstash-Retry-Delay" in err.message


@pytest.mark.parametrize("expr", ["exp(1000)", "pow(10, 1000)"])
def test_retry_delay_overflow_is_accepted_or_400(expr: str) -> None:
    outcome: StoredMessage | ClientError
    try:
        outcome = build([("Upstash-Retry-Delay", expr)])[0]
    except ClientError as exc:
        outcome = exc
    if isinstance(outcome, ClientError):
        assert outcome.status == 400
    else:
        assert outcome.retry_delay == expr


# --- delay / not-before -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "query", "not_before_ms"),
    [
        ([], [], NOW_MS),
        ([("Upstash-Delay", "10s")], [], NOW_MS + 10_000),
        ([("Upstash-Delay", "1m")], [], NOW_MS + 60_000),
        ([("Upstash-Delay", "1d10h30m")], [], NOW_MS + (86_400 + 36_000 + 1_800) * 1000),
        ([("Upstash-Delay", "0s")], [], NOW_MS),
        ([], [("upstash-delay", "100s")], NOW_MS + 100_000),
        ([("Upstash-Not-Before", "1700000100")], [], 1_700_000_100_000),
        # not-before wins over delay
        (
            [("Upstash-Delay", "10s"), ("Upstash-Not-Before", "1700000500")],
            [],
            1_700_000_500_000,
        ),
        (
            [("Upstash-Delay", "1h")],
            [("upstash-not-before", "1700000050")],
            1_700_000_050_000,
        ),
        # a not-before in the past means now
        ([("Upstash-Not-Before", "1600000000")], [], NOW_MS),
    ],
)
def test_delay_and_not_before(headers: Pairs, query: Pairs, not_before_ms: int) -> None:
    msg, _ = build(headers, query)
    assert msg.not_before_ms == not_before_ms
    assert msg.created_at_ms == NOW_MS


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("Upstash-Delay", "soon"),
        ("Upstash-Delay", "-5s"),
        ("Upstash-Delay", "10 s"),
        ("Upstash-Not-Before", "tomorrow"),
        ("Upstash-Not-Before", "1700000000.5"),
    ],
)
def test_delay_and_not_before_invalid(name: str, value: str) -> None:
    err = build_error([(name, value)])
    assert err.status == 400
    assert name in err.message


@pytest.mark.parametrize(
    "headers",
    [
        [("Upstash-Delay", "10s")],
        [("Upstash-Not-Before", "1700000100")],
        [("Upstash-Delay", "10s"), ("Upstash-Not-Before", "1700000100")],
    ],
)
def test_enqueue_rejects_delay_and_not_before(headers: Pairs) -> None:
    err = build_error(headers, queue="q")
    assert err.status == 400
    assert "queue" in err.message


# --- timeout ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "timeout_s"),
    [
        ("30s", 30.0),
        ("30", 30.0),
        ("2m", 120.0),
        ("500ms", 0.5),
        ("15m", 900.0),
        ("1h", 900.0),  # can only shorten the maximum
        ("1d", 900.0),
    ],
)
def test_timeout(value: str, timeout_s: float) -> None:
    msg, _ = build([("Upstash-Timeout", value)])
    assert msg.timeout_s == pytest.approx(timeout_s)


@pytest.mark.parametrize("value", ["0", "0s", "-1s", "forever", ""])
def test_timeout_invalid(value: str) -> None:
    err = build_error([("Upstash-Timeout", value)])
    assert err.status == 400
    assert "Upstash-Timeout" in err.message


# --- method -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "method"),
    [("GET", "GET"), ("post", "POST"), ("Put", "PUT"), ("PATCH", "PATCH"), (" delete ", "DELETE")],
)
def test_method(value: str, method: str) -> None:
    msg, _ = build([("Upstash-Method", value)])
    assert msg.method == method


@pytest.mark.parametrize("value", ["TRACE", "OPTIONS", "HEAD", "CONNECT", "", "GETX"])
def test_method_invalid(value: str) -> None:
    err = build_error([("Upstash-Method", value)])
    assert err.status == 400
    assert "Upstash-Method" in err.message


# --- callbacks --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["Callback", "Failure-Callback"])
def test_followup_config_and_forwarded_headers(kind: str) -> None:
    prefix = f"Upstash-{kind}"
    msg, _ = build(
        [
            (prefix, "https://cb.example/done"),
            (f"{prefix}-Forward-X-Docs-Style", "1"),
            (f"{prefix}-X-Cb", "2"),  # Python SDK: callback_headers={"X-Cb": "2"}
            (f"{prefix}-Retries", "2"),
            (f"{prefix}-Method", "put"),
            (f"{prefix}-Timeout", "10s"),
            (f"{prefix}-Retry-Delay", "1000 * retried"),
            (f"{prefix}-Delay", "5s"),
        ]
    )
    target = msg.callback if kind == "Callback" else msg.failure_callback
    other = msg.failure_callback if kind == "Callback" else msg.callback
    assert other is None
    assert target is not None
    assert target.url == "https://cb.example/done"
    assert target.headers == {"X-Docs-Style": ["1"], "X-Cb": ["2"]}
    assert target.retries == 2
    assert target.method == "PUT"
    assert target.timeout_s == 10.0
    assert target.retry_delay == "1000 * retried"
    assert target.delay_s == 5.0


def test_callback_and_failure_callback_headers_do_not_mix() -> None:
    msg, _ = build(
        [
            ("Upstash-Callback", "https://cb.example/ok"),
            ("Upstash-Callback-X-A", "a"),
            ("Upstash-Failure-Callback", "https://cb.example/fail"),
            ("Upstash-Failure-Callback-X-B", "b"),
            ("Upstash-Failure-Callback-Forward-X-C", "c"),
        ]
    )
    assert msg.callback is not None
    assert msg.failure_callback is not None
    assert msg.callback.url == "https://cb.example/ok"
    assert msg.callback.headers == {"X-A": ["a"]}
    assert msg.failure_callback.url == "https://cb.example/fail"
    assert msg.failure_callback.headers == {"X-B": ["b"], "X-C": ["c"]}


def test_callback_defaults() -> None:
    msg, _ = build([("Upstash-Callback", "http://127.0.0.1:9000/cb")])
    assert msg.callback is not None
    assert msg.callback.method == "POST"
    assert msg.callback.headers == {}
    assert msg.callback.retries is None
    assert msg.callback.timeout_s is None
    assert msg.callback.retry_delay is None
    assert msg.callback.delay_s is None


def test_callback_settings_without_url_are_ignored() -> None:
    msg, _ = build([("Upstash-Callback-Retries", "2"), ("Upstash-Callback-X-A", "1")])
    assert msg.callback is None


def test_callback_from_query() -> None:
    msg, _ = build(query=[("upstash-callback", "https://cb.example/q")])
    assert msg.callback is not None
    assert msg.callback.url == "https://cb.example/q"


@pytest.mark.parametrize("kind", ["Callback", "Failure-Callback"])
@pytest.mark.parametrize(
    ("suffix", "value"),
    [
        ("", "cb.example/x"),
        ("", "ftp://cb.example/x"),
        ("", "my-group"),
        ("-Retries", "99"),
        ("-Retries", "x"),
        ("-Method", "TRACE"),
        ("-Timeout", "0s"),
        ("-Timeout", "nope"),
        ("-Retry-Delay", "__import__('os')"),
        ("-Delay", "later"),
    ],
)
def test_followup_invalid(kind: str, suffix: str, value: str) -> None:
    headers = [(f"Upstash-{kind}", "https://cb.example/x"), (f"Upstash-{kind}{suffix}", value)]
    err = build_error(headers)
    assert err.status == 400
    assert f"Upstash-{kind}" in err.message


# --- deduplication ----------------------------------------------------------------------------


def test_deduplication_id() -> None:
    msg, dedup = build([("Upstash-Deduplication-Id", "order-42")])
    assert dedup is not None
    assert "order-42" in dedup
    assert msg.dedup_id == dedup
    _, dedup2 = build([("Upstash-Deduplication-Id", "order-42")], body=b"different")
    assert dedup2 == dedup
    assert build([("Upstash-Deduplication-Id", "order-43")])[1] != dedup


@pytest.mark.parametrize("value", ["true", "True", "TRUE", " true "])
def test_content_based_deduplication_any_case(value: str) -> None:
    msg, dedup = build([("Upstash-Content-Based-Deduplication", value)])
    assert dedup is not None
    assert msg.dedup_id == dedup
    again = build([("Upstash-Content-Based-Deduplication", "true")])[1]
    assert again == dedup


@pytest.mark.parametrize("value", ["false", "False", "", "no"])
def test_content_based_deduplication_off(value: str) -> None:
    msg, dedup = build([("Upstash-Content-Based-Deduplication", value)])
    assert dedup is None
    assert msg.dedup_id is None


CBD = ("Upstash-Content-Based-Deduplication", "True")


@pytest.mark.parametrize(
    ("headers", "kwargs"),
    [
        ([CBD], {"body": b"other body"}),
        ([CBD], {"dest": "https://example.com/other"}),
        ([CBD, ("Content-Type", "text/plain")], {}),
        ([CBD, ("Upstash-Forward-X-A", "1")], {}),
    ],
)
def test_content_based_deduplication_depends_on_content(
    headers: Pairs, kwargs: dict[str, Any]
) -> None:
    base = build([CBD])[1]
    changed = build(headers, **kwargs)[1]
    assert changed is not None
    assert changed != base


def test_deduplication_id_and_content_based_differ() -> None:
    by_id = build([("Upstash-Deduplication-Id", "k")])[1]
    by_content = build([CBD])[1]
    assert by_id is not None
    assert by_content is not None
    assert by_id != by_content


# --- labels, redaction, flow control, body size -----------------------------------------------


@pytest.mark.parametrize(
    ("value", "labels"),
    [
        ("nightly", ["nightly"]),
        ("a,b", ["a", "b"]),
        (" a , b ,, ", ["a", "b"]),
        ("", []),
    ],
)
def test_labels(value: str, labels: list[str]) -> None:
    msg, _ = build([("Upstash-Label", value)])
    assert msg.labels == labels


@pytest.mark.parametrize(
    ("value", "redact"),
    [
        ("body", ["body"]),
        ("body,header[Authorization]", ["body", "header[Authorization]"]),
        ("header", ["header"]),
        ("headers", ["header"]),
        ("headers[X-Secret], body", ["header[X-Secret]", "body"]),
    ],
)
def test_redact_fields(value: str, redact: list[str]) -> None:
    msg, _ = build([("Upstash-Redact-Fields", value)])
    assert msg.redact == redact


@pytest.mark.parametrize(
    ("headers", "query"),
    [
        ([("Upstash-Flow-Control-Key", "k")], []),
        ([("Upstash-Flow-Control-Key", "k"), ("Upstash-Flow-Control-Value", "parallelism=3")], []),
        ([], [("upstash-flow-control-key", "k")]),
    ],
)
def test_flow_control_is_not_supported(headers: Pairs, query: Pairs) -> None:
    with pytest.raises(NotSupported) as info:
        build(headers, query)
    assert info.value.status == 501


@pytest.mark.parametrize(
    ("size", "ok"),
    [(0, True), (10, True), (11, False), (1000, False)],
)
def test_body_size_limit(size: int, ok: bool) -> None:
    limits = BrokerSettings(max_body_bytes=10)
    if ok:
        msg, _ = build(body=b"x" * size, limits=limits)
        assert msg.url == DEST
    else:
        err = build_error(body=b"x" * size, limits=limits)
        assert err.status == 413


def test_default_body_limit_is_one_mebibyte() -> None:
    build(body=b"x" * (1024 * 1024))
    assert build_error(body=b"x" * (1024 * 1024 + 1)).status == 413


def test_config_keeps_all_settings_for_dlq_retry() -> None:
    headers = [
        ("Upstash-Retries", "2"),
        ("Upstash-Delay", "5s"),
        ("Upstash-Forward-X-A", "1"),
        ("Content-Type", "text/plain"),
    ]
    msg, _ = build(headers, [("upstash-timeout", "9s")])
    assert msg.config == {
        "upstash-retries": "2",
        "upstash-delay": "5s",
        "content-type": "text/plain",
        "upstash-timeout": "9s",
    }
