"""Local start: the process that dispatches a job starts running it at once, and the job's
QStash delivery, when it reaches the same process, adopts that run instead of starting one.

Why: between a freed slot and the next job's start, the publish, QStash's queue and its HTTP
delivery back to a worker route cost several milliseconds (measured on loopback with the
embedded broker: about 10 ms of a slot cycle; against QStash in the cloud, tens). The job
needs none of that to start: the dispatcher has already taken its leases, recorded it and
published it.

A job dispatched by a freed slot (a release, a resume, the reconciler) starts as its publish
goes out, not once QStash answered (:meth:`LocalRuns.begin`): the run learns its message id
when the publish answers, and waits for it only where it needs it (its end, parking the job
again). Until then its record says ``localRun: "pending"``. A submit's own job starts once its
publish answered (:meth:`LocalRuns.expect`): a submit whose publish fails takes the job out
again. If the publish of a started job fails, the dispatcher leaves the job to its run (it
is not put back in its line): the run goes on, its release forgets the job in dispatch, and
an attempt to retry goes back to the front of its line (no QStash message would retry it).
If this process dies meanwhile, the job is still marked as being published: the reconciler
puts it back in its line at the deadline.

What stays as it was: the job is still published to its named QStash queue, so QStash still
holds it if this process dies; the run is the same pipeline a delivery runs (claim, start,
execute, events, cleanup), under the same message id.
A delivery of that message to this process waits for the local run and answers what the run
would have answered (2xx, a retryable 5xx, 489): QStash acts on it as before. A delivery that
comes after the run ended gets the same answer (kept for ``KEEP_S``, at most ``KEEP_MAX``
of them). A delivery that reaches another process finds the job's record naming this message
(or ``pending``) as a local start's (``localRun``) and waits for the run's end in the job's
log, then answers as the job ended (a job that failed for good: ``489``, so its message still
reaches the DLQ); one that arrives before the local run starts runs the job itself, and the
local run then finds it taken and steps aside.

Turn it off (``local_start=false``) when the worker routes are served by another deployment
than the one that submits (the dispatching process must be able to run the job).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from tierq.observability.metrics import Metrics


class Answer(Protocol):
    """What a run gives back (a worker reply): ``ran`` says it ran (or ended) the job."""

    ran: bool


Runner = Callable[[bytes, dict[str, Any], str, str | None], Coroutine[Any, Any, Any]]
"""Runs a published job here: (worker body, the body parsed, message id, traceparent)."""

log = structlog.get_logger("tierq.worker")

KEEP_S = 120.0
"""How long an ended local run's answer waits for its delivery."""
KEEP_MAX = 10_000
"""Ended runs' answers kept at most (the oldest go first)."""


PENDING = "pending"
"""``localRun`` on a job's record while its local run's publish has not answered yet."""


@dataclass
class _Run:
    """A local run, or one about to start: its job's publish is in flight (``task`` None)."""

    ready: asyncio.Future[None]  # done once the publish answered (sent, or failed)
    task: asyncio.Task[Any] | None = None
    message_id: str = ""  # once the publish answered: the message's id ("": it failed)
    taken: bool = False  # a delivery waits for its answer


class LocalRuns:
    """The runs this process started at dispatch, by job id, until each ends (see module doc).

    A run starts as its job's publish is sent (:meth:`begin`), not once QStash answered: the
    publish's round trip (the app to the broker and back, ~3 ms on loopback when idle, more
    under load; tens of ms to QStash in the cloud) was most of a freed slot's hand-off. What
    the run needs of the message (its id: a failure for good names it, and deliveries find the
    run by it) it waits for only where it needs it (:meth:`message_of`): at its end, or to park
    the job again. A delivery that comes while the publish's answer is still on its way waits
    for it, then for the run (measured with no-op jobs: without this, most deliveries reached
    the app before the publish's answer and ran the claim a second time)."""

    def __init__(self) -> None:
        self._runs: dict[str, _Run] = {}
        # ended runs' answers for their deliveries: job id -> (message id, answer, kept until)
        self._ended: OrderedDict[str, tuple[str, Answer, float]] = OrderedDict()
        self._run: Runner | None = None
        self._metrics: Metrics | None = None
        self._drained: set[asyncio.Task[Any]] | None = None  # the server's requests in flight
        self.started = 0  # runs started here (for tests and metrics)
        self.adopted = 0  # deliveries that took a local run's answer
        self.waiting = 0  # deliveries waiting for a local run now
        self.awaiting_elsewhere = 0  # deliveries waiting for another process's local run

    def __len__(self) -> int:
        return sum(1 for run in self._runs.values() if run.task is not None)

    def bind(self, run: Runner, metrics: Metrics) -> None:
        """Start runs with ``run`` (the worker pipeline's; the dispatcher then tells this
        object what it publishes)."""
        self._run, self._metrics = run, metrics

    def drain_with(self, tasks: set[asyncio.Task[Any]]) -> None:
        """Count the runs among ``tasks`` (uvicorn's requests in flight): a stopping server
        lets them finish within its grace, as it does deliveries (``tierq serve``)."""
        self._drained = tasks

    def expect(self, job_id: str) -> None:
        """``job_id``'s publish is about to be sent, and it starts once that answered (its
        submit undoes the job if the publish fails: see :meth:`Dispatcher.publish`)."""
        if job_id not in self._runs:
            self._runs[job_id] = _Run(asyncio.get_running_loop().create_future())

    def unexpect(self, job_id: str) -> None:
        """``job_id``'s publish failed: no run here (a delivery waiting on it goes on alone)."""
        run = self._runs.get(job_id)
        if run is not None and run.task is None:
            del self._runs[job_id]
            if not run.ready.done():
                run.ready.set_result(None)

    def begin(
        self,
        job_id: str,
        body: str,
        data: dict[str, Any],
        traceparent: str | None = None,
        message_id: str = "",
    ) -> bool:
        """Run the job ``job_id`` (its worker ``body``, parsed as ``data``) here, now: its
        publish is about to be sent (:meth:`published` says how it went), or answered
        ``message_id``. ``False``: no run (not bound, or it runs here already)."""
        run = self._runs.get(job_id)
        if self._run is None or (run is not None and run.task is not None):
            return False
        if run is None:
            run = self._runs[job_id] = _Run(asyncio.get_running_loop().create_future())
        run.task = task = asyncio.create_task(
            self._run(body.encode(), data, message_id, traceparent), name=f"tierq-local-{job_id}"
        )
        if message_id:
            self.published(job_id, message_id)
        if self._drained is not None:
            self._drained.add(task)
        self.started += 1
        if self._metrics is not None:
            self._metrics.local_runs.labels("started").inc()
        task.add_done_callback(lambda done: self._finished(job_id, done))
        return True

    def published(self, job_id: str, message_id: str) -> None:
        """``job_id``'s publish answered: with ``message_id``, or failed (``""``)."""
        run = self._runs.get(job_id)
        if run is not None and not run.ready.done():
            run.message_id = message_id
            run.ready.set_result(None)

    def message_now(self, job_id: str) -> str:
        """The message id of ``job_id``'s local run, if its publish answered already."""
        run = self._runs.get(job_id)
        return run.message_id if run is not None and run.ready.done() else ""

    async def message_of(self, job_id: str) -> str:
        """The message id of ``job_id``'s local run, once its publish answered (``""``: it
        failed, or no local run)."""
        run = self._runs.get(job_id)
        if run is None:
            return ""
        if not run.ready.done():
            await asyncio.shield(run.ready)
        return run.message_id

    def detach(self, job_id: str) -> None:
        """The running task is ``job_id``'s local run, and it has put the job back in its line
        (its publish failed): from now on the job's next dispatch may start a run here."""
        run = self._runs.get(job_id)
        if run is not None and run.task is asyncio.current_task():
            del self._runs[job_id]

    def _finished(self, job_id: str, task: asyncio.Task[Any]) -> None:
        if self._drained is not None:
            self._drained.discard(task)
        run = self._runs.get(job_id)
        if run is None or run.task is not task:
            return
        del self._runs[job_id]
        if not run.ready.done():  # a run that ended before its publish answered: no answer kept
            run.ready.set_result(None)
            return
        if task.cancelled() or run.taken:
            return  # a delivery waits for this answer already: it is not given twice
        if task.exception() is not None:
            log.error("worker.local_run_crashed", job_id=job_id, error=repr(task.exception()))
            return
        reply: Answer = task.result()
        if reply.ran and run.message_id:  # its delivery, when it comes, answers the same
            now = time.monotonic()
            self._ended[job_id] = (run.message_id, reply, now + KEEP_S)
            self._ended.move_to_end(job_id)
            while self._ended:
                oldest = next(iter(self._ended.values()))
                if len(self._ended) <= KEEP_MAX and oldest[2] > now:
                    break
                self._ended.popitem(last=False)

    def find(self, job_id: str, message_id: str) -> asyncio.Future[Any] | Answer | None:
        """For a delivery of this message of ``job_id``: the publish in flight (a future to
        wait for, then ask again), the local run while it runs, or its answer once it ended
        (given once: the delivery takes it); ``None``: no local run of this message."""
        run = self._runs.get(job_id)
        if run is not None:
            if not run.ready.done() or run.task is None:
                return run.ready
            if run.message_id != message_id:
                return None
            run.taken = True
            return run.task
        ended = self._ended.get(job_id)
        if ended is None or ended[0] != message_id or ended[2] <= time.monotonic():
            return None
        del self._ended[job_id]
        return ended[1]

    async def stop(self) -> None:
        """Cancel the runs still going (at shutdown, after requests in flight, and under
        ``tierq serve`` these runs, had their grace): each cleans up as a cancelled delivery
        does; QStash delivers the job again."""
        tasks = [run.task for run in self._runs.values() if run.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
