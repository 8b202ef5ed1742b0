"""Step 2: decide what this delivery does, from the job's state record.

Finished jobs are never run again (a redelivery answers 200); a job whose cancel was requested
while no worker held it ends now; a failed job only runs again from a new QStash message (a DLQ
retry), never from a redelivery of the message that failed it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tierq.events.state import JobState
from tierq.worker.result import Err, Ok, Reply, Result, done, error_reply

Action = Literal["run", "cancel"]


@dataclass(frozen=True)
class Decision:
    action: Action
    revive: bool = False


def decide(
    state: JobState | None,
    message_id: str,
    runner_alive: bool,
    retry_after_s: int,
) -> Result[Decision, Reply]:
    if state is None:
        return Err(done("gone", message="the job's records expired or it was never admitted"))
    status = state.status
    if status in ("completed", "cancelled"):
        return Err(done(status))
    if status == "failed":
        if state.failed_message_id == message_id:
            return Err(done("failed"))
        return Ok(Decision("run", revive=True))
    if state.cancel_requested:
        return Ok(Decision("cancel"))
    if status == "running" and runner_alive:
        return Err(
            error_reply(
                429,
                "already_running",
                "another worker runs this job",
                {"Retry-After": str(retry_after_s)},
            )
        )
    return Ok(Decision("run"))
