"""How many SSE streams one process serves per job and per user, and refusing more."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from tierq.errors import Busy


class StreamCaps:
    """Open-stream counts per job and per user in this process, each under its cap. Per
    process on purpose: a stream is served by one process, and the caps bound what one
    client can make one process do (replays of long logs are the expensive part)."""

    def __init__(self, per_job: int, per_user: int) -> None:
        self.per_job = per_job
        self.per_user = per_user
        self.jobs: Counter[str] = Counter()
        self.users: Counter[str] = Counter()

    def take(self, job_id: str, user_id: str) -> None:
        """Count one more stream, or raise :class:`Busy` (429) when a cap is reached."""
        if self.jobs[job_id] >= self.per_job:
            raise Busy(
                f"job {job_id} already has {self.per_job} event streams open here; close one",
                retry_after_s=1,
                code="too_many_streams",
            )
        self.take_user(user_id)
        self.jobs[job_id] += 1

    def take_user(self, user_id: str) -> None:
        """Count one more stream of ``user_id`` for a job not known yet (a submit that streams
        its job's events: the cap is checked before anything is submitted); :meth:`add_job`
        names the job once it is."""
        if self.users[user_id] >= self.per_user:
            raise Busy(
                f"you have {self.per_user} event streams open here; close one",
                retry_after_s=1,
                code="too_many_streams",
            )
        self.users[user_id] += 1

    def add_job(self, job_id: str) -> None:
        self.jobs[job_id] += 1

    def give_user(self, user_id: str) -> None:
        self._drop(self.users, user_id)

    def give(self, job_id: str, user_id: str) -> None:
        self._drop(self.jobs, job_id)
        self._drop(self.users, user_id)

    @staticmethod
    def _drop(counts: Counter[str], key: str) -> None:
        counts[key] -= 1
        if counts[key] <= 0:
            del counts[key]

    @contextmanager
    def held(self, job_id: str, user_id: str) -> Iterator[None]:
        self.take(job_id, user_id)
        try:
            yield
        finally:
            self.give(job_id, user_id)
