"""Step 2: decide what this delivery does, from the job's state record.

Finished jobs are never run again (a redelivery answers 200; of the message that failed the job,
489 with its error, so it reaches the DLQ); a job whose cancel was requested
while no worker held it ends now; a failed job only runs again from a new QStash message (a DLQ
retry), never from a redelivery of the message that failed it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from tierq.events.state import JobState
from tierq.worker.result import Err, Ok, Reply, Result, done, error_reply, non_retryable

Action = Literal["run", "cancel"]


@dataclass(frozen=True)
class Decision:
    action: Action
    revive: bool = False


def failed_for_good(state: JobState) -> Reply:
    """The answer to the message that failed the job for good, delivered again (its answer was
    lost, or the run was this process's local start, elsewhere): ``489`` with the job's error,
    so the message reaches the DLQ with the response that failed it, as the first answer would
    have sent it there."""
    try:
        error = json.loads(state.error or "{}")
    except ValueError:
        error = {}
    if not isinstance(error, dict):
        error = {}
    return non_retryable(
        str(error.get("code") or "failed"), str(error.get("message") or "the job failed")
    )


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
            return Err(failed_for_good(state))
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
