"""Tracing with OpenTelemetry: one trace per job, across QStash.

Spans: ``tierq.submit`` (server; an incoming W3C ``traceparent`` on the request is its parent),
``tierq.publish`` (producer, when dispatch hands the job to QStash; its ``traceparent`` goes
with the message as a forwarded header, and is kept in the worker body for dispatch to find
later), ``tierq.delivery`` (server, the worker route; parent: the delivery's ``traceparent``)
and ``tierq.provider`` (client, the model call). Log lines written inside a span carry its
``trace_id`` and ``span_id``.

Exported by OTLP (http/protobuf) when an endpoint is configured (``otel_endpoint``, or the
standard ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``); otherwise
nothing is traced: no span is even started (the no-op API costs ~5 % of a job's CPU, measured
with bench/jobs.py). A process that installs its own SDK tracer provider (a test's in-memory
exporter) calls :func:`enable` after it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import context, propagate, trace
from opentelemetry.trace import Span, SpanKind

TRACEPARENT = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
"""A W3C ``traceparent`` of version 00 (what the API writes and what we keep)."""

_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
_on = False


def enable(on: bool = True) -> None:
    """Trace (or stop) in this process, with whatever tracer provider is installed."""
    global _on  # noqa: PLW0603 - one switch per process, set at start-up
    _on = on


def enabled() -> bool:
    return _on


def otlp_endpoint(configured: str | None) -> str | None:
    """Where spans go: the configured endpoint, else the standard environment variables."""
    if configured:
        return configured
    return next((os.environ[v] for v in _ENDPOINT_VARS if os.environ.get(v)), None)


def setup_tracing(endpoint: str | None, service_name: str) -> bool:
    """Install an SDK tracer provider exporting by OTLP to ``endpoint`` (see
    :func:`otlp_endpoint`); nothing without one, or when a provider is installed already.
    Returns whether this call installed one."""
    url = otlp_endpoint(endpoint)
    if not url:
        return False
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
        OTLPSpanExporter,
    )
    from opentelemetry.sdk.resources import Resource  # noqa: PLC0415
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415

    enable()
    if isinstance(trace.get_tracer_provider(), TracerProvider):
        return False
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if not url.rstrip("/").endswith("/v1/traces") and not os.environ.get(_ENDPOINT_VARS[0]):
        url = url.rstrip("/") + "/v1/traces"  # a base endpoint, as OTEL_EXPORTER_OTLP_ENDPOINT
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
    trace.set_tracer_provider(provider)
    return True


def tracer() -> trace.Tracer:
    return trace.get_tracer("tierq")


def _parent(carrier: Mapping[str, str] | None) -> context.Context | None:
    if not carrier:
        return None
    return propagate.extract(carrier)


@contextmanager
def span(
    name: str,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    parent: Mapping[str, str] | None = None,
    attributes: Mapping[str, Any] | None = None,
) -> Iterator[Span]:
    """A span around the block, current inside it; its parent is the ``traceparent`` in
    ``parent`` (headers) when there is one, else the current span. Not traced: nothing."""
    if not _on:
        yield trace.INVALID_SPAN
        return
    with tracer().start_as_current_span(
        name, context=_parent(parent), kind=kind, attributes=attributes
    ) as current:
        yield current


def current_traceparent() -> str | None:
    """The current span's W3C ``traceparent``; ``None`` when nothing is being traced."""
    if not _on:
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    value = carrier.get("traceparent")
    return value if value and TRACEPARENT.fullmatch(value) else None


def add_trace_ids(
    logger: Any, name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """A structlog processor: the current span's ``trace_id`` and ``span_id``, when any."""
    if not _on:
        return event_dict
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event_dict.setdefault("trace_id", format(ctx.trace_id, "032x"))
        event_dict.setdefault("span_id", format(ctx.span_id, "016x"))
    return event_dict
