"""Duration parsing (Upstash-Delay / Upstash-Timeout) and retry waits asked for by a response."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime

import pytest

from tierq.broker.server.durations import MAX_RESPONSE_WAIT_S, parse_duration, parse_response_wait

NOW_S = 1_700_000_000.0  # 2023-11-14T22:13:20Z


def _http_date(offset_s: float) -> str:
    """An RFC 1123 date ``offset_s`` seconds after NOW_S (whole seconds)."""
    return format_datetime(datetime.fromtimestamp(NOW_S + offset_s, tz=UTC), usegmt=True)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0.0),
        ("10", 10.0),
        ("1.5", 1.5),
        ("10s", 10.0),
        ("5m", 300.0),
        ("2h", 7200.0),
        ("2d", 172_800.0),
        ("1h30m", 5400.0),
        ("1h30m3s", 5403.0),
        ("1d10h30m", 86_400.0 + 36_000.0 + 1800.0),
        ("6m5s", 365.0),
        ("500ms", 0.5),
        ("1m500ms", 60.5),
        ("1.5h", 5400.0),
        ("250us", 250e-6),
        ("250µs", 250e-6),
        ("3ns", 3e-9),
        ("  10s  ", 10.0),
        ("0s", 0.0),
    ],
)
def test_parse_duration_accepts(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "s",
        "m5",
        "5x",
        "ten seconds",
        "-5",
        "-5s",
        "5s garbage",
        "1h 30m",
        "1.5.3",
        "10S",
        "5sm",
        "+5s",
    ],
)
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("value", "wait"),
    [
        ("0", 0.0),
        ("5", 5.0),
        ("1.5", 1.5),
        (" 30 ", 30.0),
        ("6m5s", 365.0),
        ("500ms", 0.5),
        ("2h", 7200.0),
        ("86400", MAX_RESPONSE_WAIT_S),  # exactly one day is still honoured
        ("24h", MAX_RESPONSE_WAIT_S),
        (_http_date(120), 120.0),
        (_http_date(3600), 3600.0),
        (_http_date(-3600), 0.0),  # a date in the past means "now"
        (_http_date(0), 0.0),
    ],
)
def test_parse_response_wait_usable(value: str, wait: float) -> None:
    assert parse_response_wait(value, NOW_S) == pytest.approx(wait)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "   ",
        "-5",
        "-1s",
        "86401",  # more than one day: ignored, the default backoff applies
        "25h",
        "2d",
        _http_date(86_400 + 60),
        "garbage",
        "Someday, 99 Foo 2015 07:28:00 GMT",
    ],
)
def test_parse_response_wait_unusable(value: str) -> None:
    assert parse_response_wait(value, NOW_S) is None


def test_http_date_wait_is_relative_to_now() -> None:
    value = "Wed, 21 Oct 2015 07:28:00 GMT"
    when = parsedate_to_datetime(value).timestamp()
    assert parse_response_wait(value, when - 90) == pytest.approx(90.0)
    assert parse_response_wait(value, when + 90) == 0.0
