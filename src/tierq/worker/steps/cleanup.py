"""Step 6: give back every lease the delivery held, and the admission slots once finished.

Runs on every path out of the pipeline (success, failure, exception, timeout, cancellation).
"""

from __future__ import annotations

from tierq.contracts import WorkerBody
from tierq.runtime import Runtime


async def cleanup(
    rt: Runtime, body: WorkerBody, held: list[tuple[str, str]], finished: bool
) -> None:
    leases = list(held)
    if finished:
        queue = body.queue_id.value
        leases.append((rt.keys.admission(queue), body.job_id))
        leases.append((rt.keys.user_pending(queue, body.user_id), body.job_id))
    if leases:
        await rt.leases.release_all(leases)
