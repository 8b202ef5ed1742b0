"""Duration and retry-wait parsing: pure functions, table-tested.

QStash accepts ``<n><unit>`` compounds (``10s``, ``1d10h30m``) in ``Upstash-Delay`` and
``Upstash-Timeout``, and honours ``Retry-After`` / ``X-RateLimit-Reset*`` on failed responses in
seconds, an HTTP date or a Go-style duration (``6m5s``, ``500ms``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from email.utils import parsedate_to_datetime

_UNIT_S = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|μs|ms|s|m|h|d)")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")

MAX_RESPONSE_WAIT_S = 86400.0
WAIT_HEADERS = (
    "retry-after",
    "x-ratelimit-reset",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
)
"""The response headers a failed delivery may ask for a wait in, first usable one wins."""


def parse_duration(text: str) -> float:
    """Seconds in ``text``: a bare number (seconds) or unit compounds. Raises ``ValueError``."""
    value = text.strip()
    if _NUMBER.fullmatch(value):
        return float(value)
    pos, total = 0, 0.0
    for match in _PART.finditer(value):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT_S[match.group(2)]
        pos = match.end()
    if pos == 0 or pos != len(value):
        raise ValueError(f"invalid duration {text!r}: use forms like 10s, 5m, 1h30m, 2d")
    return total


def parse_response_wait(value: str, now_s: float) -> float | None:
    """Seconds to wait from a ``Retry-After``-like header, or ``None`` when unusable.

    Waits over one day are ignored (the default backoff applies), as QStash documents.
    """
    text = value.strip()
    if not text:
        return None
    wait: float | None
    try:
        wait = parse_duration(text)
    except ValueError:
        wait = _http_date_wait(text, now_s)
    if wait is None or wait < 0 or wait > MAX_RESPONSE_WAIT_S:
        return None
    return wait


def _http_date_wait(text: str, now_s: float) -> float | None:
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - now_s)


def headers_wait(headers: Mapping[str, Iterable[str]], now_s: float) -> float | None:
    """The first usable wait a failed response asks for in :data:`WAIT_HEADERS` (names in any
    case, each with its values), or ``None``."""
    lowered: dict[str, list[str]] = {}
    for name, values in headers.items():
        lowered.setdefault(name.lower(), []).extend(values)
    for name in WAIT_HEADERS:
        for value in lowered.get(name, []):
            wait = parse_response_wait(value, now_s)
            if wait is not None:
                return wait
    return None
