"""Prometheus metrics. One ``Metrics`` per app (its own registry, no global state); under
``tierq dev`` the broker shares it, so ``/metrics`` shows both."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
_RUN_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)


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
        self.broker_dlq = Counter("tierq_broker_dlq", "Messages moved to the DLQ", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def broker_attempt(self, outcome: str) -> None:
        """Hook for the broker's dispatcher: one delivery attempt ended with ``outcome``."""
        self.broker_deliveries.labels(outcome).inc()
        if outcome == "retry":
            self.broker_retries.inc()
        elif outcome == "failed":
            self.broker_dlq.inc()

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
