"""Step 1: the delivery's body is a WorkerBody meant for this route."""

from __future__ import annotations

from pydantic import ValidationError

from tierq.contracts import WorkerBody
from tierq.queues import WorkerKind, queue_for, worker_kind
from tierq.worker.result import Err, Ok, Reply, Result, non_retryable


def validate(raw: bytes, route: WorkerKind, service: str) -> Result[WorkerBody, Reply]:
    """A body that can never succeed goes to the DLQ at once (489), not through retries."""
    try:
        body = WorkerBody.model_validate_json(raw)
    except ValidationError as exc:
        return Err(non_retryable("invalid_body", f"not a tierq job: {exc.error_count()} errors"))
    if worker_kind(body.experience) != route:
        return Err(non_retryable("wrong_route", f"{body.experience} jobs go to the other worker"))
    if body.service != service:
        return Err(non_retryable("wrong_service", f"job is for service {body.service!r}"))
    if queue_for(body.tier, body.experience) != body.queue_id:
        return Err(non_retryable("wrong_queue", "queueId does not match tier and experience"))
    return Ok(body)
