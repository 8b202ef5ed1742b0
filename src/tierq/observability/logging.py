"""Structured logs (structlog): JSON in production, readable in dev; an unsampled audit stream.

- Context (job id, queue, user, trace id) is bound through contextvars by the code that knows it.
- Job events are logged through ``log_job_event``, sampled per event type
  (``log_sample_rates``); ``delta`` events are never logged one by one.
- ``audit(action, **fields)`` writes to the separate ``tierq.audit`` stream, never sampled.
- Secrets never reach a log line: values of sensitive keys are masked, and any configured secret
  that appears inside a value is replaced.
"""

from __future__ import annotations

import json
import logging
import random
import re
import sys
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any, TextIO

import orjson
import structlog

from tierq.observability.tracing import add_trace_ids

SENSITIVE_KEYS = frozenset(
    {"authorization", "token", "api_key", "apikey", "password", "secret", "qstash_token",
     "signing_key", "signature", "upstash-signature", "events_token", "admin_token"}
)  # fmt: skip
MASK = "***"
AUDIT_LOGGER = "tierq.audit"


class SecretMasker:
    """A structlog processor: masks sensitive keys and known secret values anywhere."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self.secrets = sorted({s for s in secrets if s and len(s) >= 6}, key=len, reverse=True)
        # one search per string value, in C, instead of a ``in`` per secret (longest first: at
        # a position where two secrets start, the longer one is masked)
        self._pattern = re.compile("|".join(map(re.escape, self.secrets))) if self.secrets else None

    def _clean(self, value: Any) -> Any:
        if isinstance(value, str):
            return self._pattern.sub(MASK, value) if self._pattern is not None else value
        if isinstance(value, Mapping):
            return {k: MASK if str(k).lower() in SENSITIVE_KEYS else self._clean(v)
                    for k, v in value.items()}  # fmt: skip
        if isinstance(value, list | tuple):
            return [self._clean(v) for v in value]
        return value

    def __call__(
        self, logger: Any, name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        search = self._pattern.search if self._pattern is not None else None
        for key, value in event_dict.items():  # values replaced in place, no key added
            if key in SENSITIVE_KEYS or key.lower() in SENSITIVE_KEYS:
                event_dict[key] = MASK
            elif type(value) is str:  # the common case, without _clean's dispatch
                if search is not None and search(value):
                    event_dict[key] = self._clean(value)
            elif not isinstance(value, int | float | bool | type(None)):
                event_dict[key] = self._clean(value)
        return event_dict


def _json(obj: Any, **options: Any) -> str:
    """structlog's JSON serializer: orjson (a fifth of json.dumps's time for a log line), the
    standard library's for what orjson refuses (e.g. an int wider than 64 bits)."""
    default = options.get("default")
    try:
        return orjson.dumps(obj, default=default, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:
        return json.dumps(obj, **options)


def configure_logging(
    *,
    json_output: bool,
    level: str = "info",
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
    audit_stream: TextIO | None = None,
) -> None:
    """Set up structlog and stdlib logging once per process (CLI entry points call this)."""
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=_json)
        if json_output
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            add_trace_ids,
            structlog.stdlib.add_logger_name,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            SecretMasker(secrets),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=_Factory(stream or sys.stderr, audit_stream or stream or sys.stderr),
        cache_logger_on_first_use=False,
    )
    _bound.clear()
    for name in _BOUND:
        _bound[name] = structlog.get_logger(name).bind()


class _NamedPrintLogger(structlog.PrintLogger):
    def __init__(self, name: str, file: TextIO) -> None:
        super().__init__(file)
        self.name = name


class _Factory:
    """Audit lines go to their own stream; everything else to the main one."""

    def __init__(self, main: TextIO, audit: TextIO) -> None:
        self.main, self.audit = main, audit

    def __call__(self, *args: Any) -> structlog.PrintLogger:
        name = str(args[0]) if args else "tierq"
        return _NamedPrintLogger(name, self.audit if name == AUDIT_LOGGER else self.main)


JOBS_LOGGER = "tierq.jobs"
_BOUND = (JOBS_LOGGER, AUDIT_LOGGER)
_bound: dict[str, Any] = {}
"""The loggers of every job's lines, as :func:`configure_logging` last bound them."""


def _logger(name: str) -> Any:
    """The logger ``name`` as :func:`configure_logging` bound it, or structlog's lazy proxy
    while logging is not configured (e.g. after ``structlog.reset_defaults``). A proxy builds
    a new logger on every call (~1.5 % of the app's CPU under load: several lines a job)."""
    if structlog.is_configured():
        bound = _bound.get(name)
        if bound is not None:
            return bound
    return structlog.get_logger(name)


def audit(action: str, **fields: Any) -> None:
    """One audit record (admin actions): never sampled, always written."""
    _logger(AUDIT_LOGGER).info(action, audit=True, **fields)


def log_job_event(event_type: str, rates: Mapping[str, float], **fields: Any) -> None:
    """Log one job event, sampled at ``rates[event_type]`` (default 1); never ``delta``."""
    if event_type == "delta":
        return
    rate = rates.get(event_type, 1.0)
    if rate >= 1.0 or random.random() < rate:
        _logger(JOBS_LOGGER).info("job.event", type=event_type, **fields)


def track_job(outcome: str, **fields: Any) -> None:
    """The job's lifecycle record (``trackEvent``), written once when it ends — completed,
    failed for good, or cancelled — on the audit stream, never sampled: who, where, how long it
    waited and ran, how many attempts, its usage and how it ended."""
    audit("job.track", outcome=outcome, **fields)
