"""Tracing: one trace per job from submit to the provider call, across QStash, with the
official OpenTelemetry SDK (its in-memory exporter here; OTLP when configured)."""

from __future__ import annotations

import io
import itertools
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Sequence

import pytest
import structlog
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from helpers import Destination, wait_until
from system import PAID, System
from tierq.observability.logging import configure_logging
from tierq.observability.tracing import (
    current_traceparent,
    enable,
    otlp_endpoint,
    setup_tracing,
    span,
)

pytestmark = pytest.mark.timeout(120)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
NAMES = ("tierq.submit", "tierq.publish", "tierq.delivery", "tierq.provider")


class _Switch(SpanProcessor):
    """Records into ``exporter`` only while a test asks for it (the provider is global: it
    stays installed for the rest of the process)."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.inner = SimpleSpanProcessor(self.exporter)
        self.on = False

    def on_end(self, span: ReadableSpan) -> None:
        if self.on:
            self.inner.on_end(span)


_SWITCH = _Switch()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(_SWITCH)
        trace.set_tracer_provider(provider)
    _SWITCH.exporter.clear()
    _SWITCH.on = True
    enable()
    yield _SWITCH.exporter
    enable(False)
    _SWITCH.on = False
    _SWITCH.exporter.clear()


def job_spans(exporter: InMemorySpanExporter, job_id: str) -> dict[str, ReadableSpan]:
    """The job's spans by name (each must appear once)."""
    found: dict[str, ReadableSpan] = {}
    for s in exporter.get_finished_spans():
        if (s.attributes or {}).get("tierq.job_id") == job_id:
            found.setdefault(s.name, s)
    return found


def wait_spans(
    exporter: InMemorySpanExporter, job_id: str, names: Sequence[str] = NAMES
) -> dict[str, ReadableSpan]:
    wait_until(lambda: set(names) <= set(job_spans(exporter, job_id)))
    return job_spans(exporter, job_id)


def chain(found: dict[str, ReadableSpan]) -> None:
    """submit → publish → delivery → provider, each the parent of the next, one trace."""
    for parent, child in itertools.pairwise(NAMES):
        p, c = found[parent].get_span_context(), found[child]
        assert c.context.trace_id == p.trace_id, (parent, child)
        assert c.parent is not None, (parent, child)
        assert c.parent.span_id == p.span_id, (parent, child)


def test_a_job_is_one_trace_from_an_incoming_traceparent(
    system: System, spans: InMemorySpanExporter
) -> None:
    header = f"00-{TRACE_ID}-{PARENT_ID}-01"
    res = system.http.post(
        "/api/jobs",
        json={"service": "chat", "experience": "stream", "mode": "auto", "model": "sim",
              "input": {"prompt": "hi", "simulate": {"tokens": 2}}},
        headers={"Authorization": f"Bearer {PAID}", "traceparent": header},
    )  # fmt: skip
    assert res.status_code == 202, res.text
    job_id = res.json()["jobId"]
    found = wait_spans(spans, job_id)
    submit = found["tierq.submit"]
    assert format(submit.context.trace_id, "032x") == TRACE_ID  # the caller's trace
    assert submit.parent is not None
    assert format(submit.parent.span_id, "016x") == PARENT_ID
    assert submit.kind == SpanKind.SERVER
    assert found["tierq.publish"].kind == SpanKind.PRODUCER
    assert found["tierq.delivery"].kind == SpanKind.SERVER
    assert found["tierq.provider"].kind == SpanKind.CLIENT
    # the delivery's parent is the publish span: its traceparent went with the message (the
    # body only knows the submit span)
    chain(found)
    wait_until(lambda: system.job(job_id)["status"] == "completed")


def test_without_traceparent_a_job_starts_its_own_trace(
    system: System, spans: InMemorySpanExporter
) -> None:
    job_id = system.submit(PAID, input={"prompt": "x", "simulate": {"tokens": 1}}).json()["jobId"]
    found = wait_spans(spans, job_id)
    assert found["tierq.submit"].parent is None
    chain(found)


def test_log_lines_carry_the_trace_id(system: System, spans: InMemorySpanExporter) -> None:
    out = io.StringIO()
    configure_logging(json_output=True, stream=out, audit_stream=io.StringIO())
    try:
        job_id = system.submit(PAID).json()["jobId"]
        found = wait_spans(spans, job_id)
    finally:
        structlog.reset_defaults()
    trace_id = format(found["tierq.submit"].context.trace_id, "032x")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    queued = [x for x in lines if x.get("type") == "queued" and x.get("job_id") == job_id]
    assert queued
    assert all(x["trace_id"] == trace_id for x in queued)


def test_nothing_is_traced_or_exported_without_an_endpoint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    assert otlp_endpoint(None) is None
    assert setup_tracing(None, "tierq") is False
    assert current_traceparent() is None  # not traced
    with span("tierq.submit") as nothing:  # no span at all
        assert not nothing.get_span_context().is_valid
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    assert otlp_endpoint(None) == "http://collector:4318"
    assert otlp_endpoint("http://mine:4318") == "http://mine:4318"


def test_spans_are_exported_by_otlp_when_configured(destination: Destination) -> None:
    """In a fresh process (the provider is global): setup_tracing with an endpoint sends the
    spans to it, OTLP over HTTP (protobuf) at /v1/traces."""
    code = textwrap.dedent(f"""
        from opentelemetry import trace
        from tierq.observability.tracing import setup_tracing, span
        assert setup_tracing({destination.url!r}, "tierq-test")
        with span("tierq.submit"):
            pass
        trace.get_tracer_provider().shutdown()  # flushes the batch
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, env=env)
    [request] = destination.requests("/v1/traces")
    assert request.method == "POST"
    assert request.headers["content-type"] == "application/x-protobuf"
    assert b"tierq.submit" in request.body
    assert b"tierq-test" in request.body
