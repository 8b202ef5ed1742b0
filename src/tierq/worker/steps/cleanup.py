"""Step 6: give back every lease the delivery held, and the admission slots once finished;
the dispatcher then publishes whatever that made room for.

Runs on every path out of the pipeline (success, failure, exception, timeout, cancellation),
except a delivery that parked its job again (it holds nothing).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tierq.contracts import WorkerBody
from tierq.runtime import Runtime


async def cleanup(
    rt: Runtime,
    body: WorkerBody,
    held: list[tuple[str, str]],
    finished: bool,
    write: Callable[[Any], None] | None = None,
    used_tokens: int | None = None,
) -> None:
    """``write`` (the attempt's outcome, see :func:`~tierq.worker.steps.events.settle`, and its
    usage) goes first, in the same round trip; ``used_tokens`` (the job ended) corrects the
    token quotas from the job's estimate."""
    dispatch_leases = rt.dispatcher.leases(body)  # released by the dispatcher in any case
    also = [lease for lease in held if lease not in dispatch_leases]
    if finished:
        queue = body.queue_id.value
        also.append((rt.keys.admission(queue), body.job_id))
        also.append((rt.keys.user_pending(queue, body.user_id), body.job_id))
    await rt.dispatcher.release(body, also=also, before=write, used_tokens=used_tokens)
