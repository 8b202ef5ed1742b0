"""Prometheus metrics. One ``Metrics`` per app (its own registry, no global state); under
``tierq dev`` the broker shares it, so ``/metrics`` shows both."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Self

import prometheus_client
from prometheus_client import CollectorRegistry, generate_latest


class _CachedLabels:
    """``labels(*values)`` answered from a dict after the first call for those values:
    prometheus_client's takes a lock and rebuilds the key every time (~1.3 µs of the ~1.9 µs a
    labelled ``inc`` costs; a job makes a dozen). Children are never removed here."""

    _children: dict[tuple[Any, ...], Self]

    def labels(self, *values: Any, **by_name: Any) -> Self:
        if by_name:
            return super().labels(*values, **by_name)  # type: ignore[misc,no-any-return]
        try:
            return self._children[values]
        except AttributeError:
            self._children = {}
        except KeyError:
            pass
        child: Self = super().labels(*values)  # type: ignore[misc]
        self._children[values] = child
        return child


class Counter(_CachedLabels, prometheus_client.Counter):
    pass


class Gauge(_CachedLabels, prometheus_client.Gauge):
    pass


class Histogram(_CachedLabels, prometheus_client.Histogram):
    pass


_WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
_RUN_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)


QUEUE_GAUGES: dict[str, tuple[str, str]] = {
    "lag": ("tierq_queue_lag", "QStash: messages of the queue waiting to start"),
    "paused": ("tierq_queue_paused", "QStash: 1 when the queue is paused"),
    "parallelism": ("tierq_queue_parallelism", "QStash: deliveries in flight at most"),
    "in_flight": ("tierq_queue_in_flight", "Jobs dispatched and not finished (slots held)"),
    "admitted": ("tierq_queue_admitted", "Jobs admitted and not finished (admission slots)"),
    "admission_depth": ("tierq_queue_admission_depth", "Jobs admitted at most (configured)"),
    "parked": ("tierq_queue_parked", "Jobs parked in tierq, waiting to be dispatched"),
    "dlq": ("tierq_queue_dlq_messages", "QStash DLQ entries whose message is of the queue"),
    "mismatch": (
        "tierq_queue_state_mismatch",
        "1 when QStash lacks the queue or its paused/parallelism differ from tierq's dispatcher",
    ),
}
"""Field of a queue snapshot → (gauge name, help); every gauge is labelled by ``queue``."""


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.submitted = Counter(
            "tierq_jobs_submitted", "Jobs admitted and published", ["queue"], registry=r
        )
        self.completed = Counter("tierq_jobs_completed", "Jobs completed", ["queue"], registry=r)
        self.failed = Counter("tierq_jobs_failed", "Jobs failed for good", ["queue"], registry=r)
        self.cancelled = Counter("tierq_jobs_cancelled", "Jobs cancelled", ["queue"], registry=r)
        self.attempt_failures = Counter(
            "tierq_job_attempt_failures", "Attempts that failed and will be retried", ["queue"],
            registry=r,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "tierq_queue_wait_seconds", "Submit to start of the run", ["queue"],
            buckets=_WAIT_BUCKETS, registry=r,
        )  # fmt: skip
        self.run_time = Histogram(
            "tierq_run_seconds", "Start of the run to its end", ["queue"],
            buckets=_RUN_BUCKETS, registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "tierq_time_to_first_token_seconds", "Start of the run to the first delta", ["queue"],
            buckets=_WAIT_BUCKETS, registry=r,
        )  # fmt: skip
        self.local_runs = Counter(
            "tierq_local_runs", "Runs started where their job was dispatched (started), and "
            "deliveries that took such a run's answer (adopted)", ["event"], registry=r,
        )  # fmt: skip
        self.guard_waits = Counter(
            "tierq_guard_waits", "Deliveries without leases that found a guard full (parked)",
            ["guard"], registry=r,
        )  # fmt: skip
        self.parked = Counter(
            "tierq_jobs_parked", "Jobs parked on submit or delivery, by what held them",
            ["queue", "reason"], registry=r,
        )  # fmt: skip
        self.dispatched = Counter(
            "tierq_jobs_dispatched", "Jobs published to QStash by the dispatcher", ["queue"],
            registry=r,
        )  # fmt: skip
        self.publish_failures = Counter(
            "tierq_dispatch_publish_failures", "Dispatched jobs whose publish failed (requeued)",
            registry=r,
        )  # fmt: skip
        self.admission_rejections = Counter(
            "tierq_admission_rejections", "Submits refused with 429 (queue full)", ["queue"],
            registry=r,
        )  # fmt: skip
        # usage, by model and tier (never by user: cardinality; the ledger has users)
        self.usage_tokens = Counter(
            "tierq_usage_tokens", "Tokens used by jobs (every attempt), by kind",
            ["model", "tier", "kind"], registry=r,
        )  # fmt: skip
        self.usage_jobs = Counter(
            "tierq_usage_jobs", "Jobs that ended, by outcome", ["model", "tier", "outcome"],
            registry=r,
        )  # fmt: skip
        self.rate_limited = Counter(
            "tierq_rate_limited", "Submits refused by a user's rate quota, by quota", ["kind"],
            registry=r,
        )  # fmt: skip
        self.model_limit = Gauge(
            "tierq_model_effective_limit",
            "A model's running-job limit now (lowered by adaptive limits, else configured)",
            ["model", "tier"], registry=r,
        )  # fmt: skip
        self.worker_deliveries = Counter(
            "tierq_worker_deliveries",
            "Deliveries answered by the worker routes, by route (unified/legacy) and status",
            ["route", "status"], registry=r,
        )  # fmt: skip
        self.sse_open = Gauge("tierq_sse_connections", "SSE streams open now", registry=r)
        self.sse_total = Counter("tierq_sse_streams", "SSE streams opened", registry=r)
        self.sse_tail_streams = Gauge(
            "tierq_sse_tail_streams", "Job logs the tail hub follows now", registry=r
        )
        self.sse_dropped = Counter(
            "tierq_sse_dropped_slow_clients", "SSE streams ended: client too slow", registry=r
        )
        self.broker_deliveries = Counter(
            "tierq_broker_deliveries", "Broker delivery attempts by outcome", ["outcome"],
            registry=r,
        )  # fmt: skip
        self.broker_retries = Counter(
            "tierq_broker_retries", "Broker attempts that scheduled a retry", registry=r
        )
        self.broker_dlq = Counter(
            "tierq_broker_dlq", "Messages moved to the DLQ, by queue (\"\" for none)", ["queue"],
            registry=r,
        )  # fmt: skip
        self.lease_expiries = Counter(
            "tierq_lease_expiries", "Leases found expired under a running job (heartbeat late)",
            registry=r,
        )  # fmt: skip
        self._queue_gauges(r)

    def _queue_gauges(self, r: CollectorRegistry) -> None:
        """Per queue, from the shared queue snapshot (``tierq.ops.queue_metrics``): every
        process shows the same numbers, refreshed every ``queue_metrics_s``."""
        self.queue = {
            field: Gauge(name, text, ["queue"], registry=r)
            for field, (name, text) in QUEUE_GAUGES.items()
        }
        self.queue_snapshot_at = Gauge(
            "tierq_queue_metrics_timestamp_seconds",
            "When the queue snapshot behind the tierq_queue_* gauges was taken (Unix time)",
            registry=r,
        )
        self.queue_polls = Counter(
            "tierq_queue_metrics_polls", "Queue snapshots this process took from QStash and Redis",
            ["outcome"], registry=r,
        )  # fmt: skip

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def broker_attempt(self, outcome: str, queue: str | None = None) -> None:
        """Hook for the broker's dispatcher: one delivery attempt of a message of ``queue``
        (``None``: not enqueued) ended with ``outcome``."""
        self.broker_deliveries.labels(outcome).inc()
        if outcome == "retry":
            self.broker_retries.inc()
        elif outcome == "failed":
            self.broker_dlq.labels(queue or "").inc()

    def lease_lost(self, _key: str) -> None:
        """Hook for the lease heartbeat's ``on_lost``: a running job's lease had expired."""
        self.lease_expiries.inc()

    def set_queue(self, queue: str, values: Mapping[str, float | None]) -> None:
        """Set the ``queue``'s gauges from one snapshot (keys of :data:`QUEUE_GAUGES`); a
        ``None`` value (unknown: QStash lacks the queue) removes that gauge's sample."""
        for field, value in values.items():
            gauge = self.queue[field]
            if value is not None:
                gauge.labels(queue).set(value)
            else:
                gauge.remove(queue)  # a no-op when it has no sample

    def counters(self, queues: list[str]) -> dict[str, dict[str, float]]:
        """Totals per queue since start, for the dashboard's rates."""
        names = ("submitted", "completed", "failed", "cancelled")
        return {
            q: {
                n: self.registry.get_sample_value(f"tierq_jobs_{n}_total", {"queue": q}) or 0.0
                for n in names
            }
            for q in queues
        }
