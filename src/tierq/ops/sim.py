"""``tierq sim``: synthetic jobs through the real producer, dispatcher and worker pipeline,
in-process, with QStash played in memory; then a look for leaks.

No HTTP and no broker, but no stand-ins for tierq's own code either. Each job is submitted with
:func:`tierq.producer.submit.submit` (the user's share and the queue's admission, the state
record, parked for the fair dispatcher). The dispatcher (:mod:`tierq.dispatch`) publishes what
may run through the runtime's gateway, here a :class:`SimGateway`: QStash's named queues in
memory, which deliver a message by calling :func:`tierq.worker.pipeline.run_delivery` as the
worker route would. Guards, a delivery parking its job again when a guard is full, releases and
the next fair choice, the dispatcher's periodic reconciler: all the real code, on real Redis.

The gateway plays QStash:

- a publish gets a new message id; one with a ``dedup_id`` already seen in the run gets the first
  message's id back and enqueues nothing;
- each queue delivers its messages in order (FIFO), at most ``parallelism`` of them at once (as
  ``sync_queues`` configured it from the settings), and a message keeps its queue slot through
  its retries (the next one waits through the current one's backoff);
- at most ``concurrency`` deliveries run at once, across all queues;
- a non-2xx reply is retried while ``retried < retries`` (``Upstash-Retried`` counting up), after
  the broker's retry policy (:func:`retry_delay`): the wait the reply asks for (``Retry-After``
  and friends) capped to :data:`RETRY_AFTER_CAP_S`, or the sim's fixed :data:`RETRY_DELAY_S`
  without one;
  a 489 with ``Upstash-NonRetryable-Error`` or a failure with no retries left is
  "dead-lettered" and ends the message; a delivery that raises is answered the way the app's
  handlers would (503 for Redis and upstream errors, else 500);
- ``cancel`` drops a message not delivered yet (and stops the retries of one that was).

The producers are clients of the producer API that honour its ``429``: a submit refused
(``queue_full``, ``user_queue_full``) is tried again after its ``Retry-After`` capped to
:data:`ADMISSION_RETRY_CAP_S`, or sooner when a delivery of its queue ends. A job is given up,
and counted as ``not_admitted``, when nothing could free that share any more: no job of the run
that may hold it (of that queue; of that user in that queue) is unfinished, no message of that
queue is in flight and no other submit to it is under way, on two refusals in a row.

The run ends when every admitted job is terminal and no message is left in flight (job states
are polled from Redis once the queues are idle). It stops waiting when nothing happens for
``settle_timeout_s`` (nothing published or delivered; producers that keep being refused are no
progress): what is not terminal then is stuck, and a producer still waiting is not admitted.

Jobs go round-robin over the six queues (paid/free x stream/batch/vision), in a shuffled order,
from users ``sim-user-0..N-1`` (even ids on the paid plan, odd ids on the free plan). The
services and models come from the settings: each experience needs a service offering it on a
``simulated`` model (the dev defaults have ``chat``/``describe`` on ``sim``). ``fail_rate`` of the
jobs fail their first attempt with a retryable error and succeed on the retry. Paused queues
are run anyway (the run's settings unpause them).

Afterwards every lease key the run could have touched (admission, each user's share and the
dispatch slots per queue, model per tier, user per sim user) must hold no live lease, nothing
may be left parked or being published, and every admitted job must be terminal; anything else
is reported as a leak. Each run uses its own key prefix and, unless ``keep_keys``, deletes its
keys at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import math
import random
import re
import secrets
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import redis.asyncio as aioredis
import structlog
from qstash import AsyncQStash
from redis.exceptions import RedisError

from tierq.broker.client import QStashGateway, QueueStatus
from tierq.broker.server.backoff import next_delay_s
from tierq.broker.server.durations import headers_wait
from tierq.config import QueueSettings, Settings, UserSettings
from tierq.contracts import TERMINAL_STATUSES, JobInput, JobRequest, Simulate
from tierq.errors import Busy, ClientError, TierqError, UpstreamError
from tierq.events.state import JobState
from tierq.observability.metrics import Metrics
from tierq.producer.submit import check_registry, resolve_tier, submit
from tierq.queues import EXPERIENCES, TIERS, Experience, Mode, QueueId, WorkerKind, queue_for
from tierq.runtime import Runtime, build_runtime, redis_clients
from tierq.worker.pipeline import enable_local_start, run_delivery
from tierq.worker.result import Reply, error_reply

log = structlog.get_logger("tierq.sim")

RETRY_DELAY_S = 0.05
"""Delay before retrying a failed delivery that gave no ``Retry-After`` (sim time)."""
_RETRY_DELAY_EXPRESSION = f"{RETRY_DELAY_S * 1000:g}"  # the same, as QStash's ms expression
RETRY_AFTER_CAP_S = 0.2
"""A ``Retry-After`` is honoured up to this many seconds (sim time; QStash would wait it all)."""
ADMISSION_RETRY_CAP_S = 1.0
"""A refused submit is tried again after its ``Retry-After`` up to this, or when a delivery of
its queue ends, whichever comes first (sim time)."""
SETTLE_TIMEOUT_S = 10.0
"""The run stops waiting after this long without any progress (at least three reconciler
periods): the jobs not terminal by then are stuck."""
STOP_GRACE_S = 5.0
"""When the run ends, producers still waiting get this long to stop between submits."""
SETTLE_POLL_S = 0.1
"""How often the run looks at its progress (and, once the queues are idle, at job states)."""
SIM_USER_PREFIX = "sim-user-"
MAX_STUCK_IDS = 20
TINY_PNG = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9Q"
    "DwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
"""A 1x1 PNG as a data URI: the image every synthetic vision job carries."""


class SimExit(enum.IntEnum):
    """Exit code of ``tierq sim`` beyond the CLI's common ones (0-5 are taken)."""

    LEAKS = 6


class SimError(TierqError, ValueError):
    """The run cannot start: bad arguments or a configuration the sim cannot drive."""


# -- the report -----------------------------------------------------------------------------


@dataclass
class Percentiles:
    p50_ms: float | None = None
    p99_ms: float | None = None


@dataclass
class QueueStats:
    jobs: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0


@dataclass
class Leaks:
    """What a finished run left behind: live leases per key, jobs still parked per queue (or
    being published), and jobs not in a terminal state."""

    leases: dict[str, int] = field(default_factory=dict)
    parked: dict[str, int] = field(default_factory=dict)
    """Queue → jobs its dispatcher still counts as parked (only queues not at 0)."""
    dispatching: int = 0
    """Jobs dispatched whose publish was never confirmed."""
    stuck_jobs: int = 0
    stuck_job_ids: list[str] = field(default_factory=list)
    keys_checked: int = 0

    @property
    def total(self) -> int:
        parked = sum(abs(n) for n in self.parked.values())
        return sum(self.leases.values()) + parked + self.dispatching + self.stuck_jobs


@dataclass
class SimReport:
    jobs: int
    completed: int
    failed: int
    cancelled: int
    dead_lettered: int
    """Messages QStash would have moved to the DLQ (489, or retries used up)."""
    not_admitted: int
    """Jobs given up after ``429``s: nothing left could free their share (see the module)."""
    wall_s: float
    throughput_jobs_s: float
    """Completed jobs per wall-clock second."""
    dispatched: int
    """Publishes by the dispatcher (``tierq_jobs_dispatched``): one per job, plus one each time a
    delivery parked its job again."""
    deduplicated: int
    """Publishes that QStash's deduplication turned into the first message's id."""
    deliveries: int
    retries: int
    """Deliveries that were QStash retries of a message (``Upstash-Retried`` > 0)."""
    replies: dict[str, int]
    """Delivery replies by HTTP status."""
    rejections_429: int
    parked: int
    """Times a job was parked and not dispatched at once (``tierq_jobs_parked``), on submit or by
    a delivery that found a guard full."""
    parked_by_reason: dict[str, int]
    guard_waits: int
    """Deliveries that found a guard full and parked their job again (``tierq_guard_waits``)."""
    guard_waits_by_guard: dict[str, int]
    attempt_failures: int
    admission_rejections: int
    """Submits refused with ``429`` (``queue_full`` or ``user_queue_full``)."""
    delivery_errors: int
    """Deliveries that raised instead of answering (answered 500/503 here, as the app would)."""
    per_queue: dict[str, QueueStats]
    run_ms: Percentiles
    """Start of the last run to the terminal event, completed jobs."""
    latency_ms: Percentiles
    """Admission to the terminal event, completed jobs."""
    leaks: Leaks
    seed: int
    users: int
    concurrency: int
    key_prefix: str

    @property
    def completed_per_queue(self) -> dict[str, int]:
        return {q: s.completed for q, s in self.per_queue.items()}

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["leaks"]["total"] = self.leaks.total
        data["completed_per_queue"] = self.completed_per_queue
        return data

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def _by(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "-"


def format_report(r: SimReport) -> str:
    """The report for people (``--json`` prints :meth:`SimReport.to_json`)."""
    replies = "  ".join(f"{k}: {v}" for k, v in sorted(r.replies.items()))
    lines = [
        f"sim: {r.jobs} jobs in {r.wall_s:.2f} s ({r.throughput_jobs_s:.1f} jobs/s), "
        f"{r.deliveries} deliveries ({r.retries} retries)",
        f"  completed {r.completed}  failed {r.failed}  cancelled {r.cancelled}  "
        f"dead-lettered {r.dead_lettered}  not admitted {r.not_admitted}",
        f"  replies    {replies}",
        f"  dispatch   {r.dispatched} published ({r.deduplicated} deduplicated); "
        f"parked {r.parked} ({_by(r.parked_by_reason)})",
        f"  guards     {r.guard_waits} deliveries parked again ({_by(r.guard_waits_by_guard)})",
        f"  attempts   {r.attempt_failures} failed and retried; {r.delivery_errors} raised",
        f"  admission  {r.admission_rejections} refused (429: queue or user share full)",
        f"  run time   p50 {_ms(r.run_ms.p50_ms)}  p99 {_ms(r.run_ms.p99_ms)}",
        f"  latency    p50 {_ms(r.latency_ms.p50_ms)}  p99 {_ms(r.latency_ms.p99_ms)}",
        f"  {'queue':<15} {'jobs':>6} {'completed':>10} {'failed':>7} {'cancelled':>10}",
    ]
    for queue, s in r.per_queue.items():
        lines.append(f"  {queue:<15} {s.jobs:>6} {s.completed:>10} {s.failed:>7} {s.cancelled:>10}")
    leaks = r.leaks
    if leaks.total:
        held, parked = sum(leaks.leases.values()), sum(leaks.parked.values())
        lines.append(
            f"  LEAKS      {held} live lease(s), {parked} job(s) parked, {leaks.dispatching} "
            f"publish(es) unconfirmed, {leaks.stuck_jobs} job(s) not terminal"
        )
        lines += [f"    {key}: {n} live lease(s)" for key, n in leaks.leases.items()]
        lines += [f"    {queue}: {n} job(s) parked" for queue, n in leaks.parked.items()]
        if leaks.stuck_jobs:
            lines.append(f"    not terminal: {', '.join(leaks.stuck_job_ids)}")
    else:
        lines.append(f"  leaks      none ({leaks.keys_checked} lease keys checked)")
    lines.append(f"  key prefix {r.key_prefix}  seed {r.seed}")
    return "\n".join(lines)


def percentiles(values: list[float]) -> Percentiles:
    """Nearest-rank p50 and p99 (``None`` without values)."""
    if not values:
        return Percentiles()
    ordered = sorted(values)

    def rank(p: float) -> float:
        return ordered[max(0, math.ceil(p * len(ordered)) - 1)]

    return Percentiles(p50_ms=rank(0.50), p99_ms=rank(0.99))


# -- planning -------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobSpec:
    user: UserSettings
    request: JobRequest


def sim_users(count: int) -> list[UserSettings]:
    return [
        UserSettings(id=f"{SIM_USER_PREFIX}{i}", plan="paid" if i % 2 == 0 else "free")
        for i in range(count)
    ]


def _routes(settings: Settings) -> dict[Experience, tuple[str, str]]:
    """(service, model) per experience: the first service offering it on a simulated model."""
    routes: dict[Experience, tuple[str, str]] = {}
    for experience in EXPERIENCES:
        for service, offer in settings.services.items():
            model = next(
                (
                    m
                    for m in offer.models
                    if m in settings.models
                    and settings.models[m].provider == "simulated"
                    and experience in offer.experiences
                    and experience in settings.models[m].experiences
                ),
                None,
            )
            if model is not None:
                routes[experience] = (service, model)
                break
        else:
            raise SimError(
                f"no service offers {experience!r} jobs on a simulated model; the sim needs one "
                "per experience (stream, batch, vision)"
            )
    return routes


def plan_jobs(
    settings: Settings,
    *,
    jobs: int,
    users: int,
    tokens: int,
    token_latency_ms: float,
    fail_rate: float,
    seed: int,
) -> list[JobSpec]:
    """The synthetic jobs, deterministic for a seed: round-robin over the six queues, shuffled."""
    routes = _routes(settings)
    people = sim_users(users)
    paid = [u for u in people if u.plan == "paid"]
    free = [u for u in people if u.plan == "free"]
    rng = random.Random(seed)
    failing = set(rng.sample(range(jobs), round(jobs * fail_rate)))
    specs: list[JobSpec] = []
    for k in range(jobs):
        tier = TIERS[k % len(TIERS)]
        experience = EXPERIENCES[(k // len(TIERS)) % len(EXPERIENCES)]
        mode: Mode = "auto"
        if tier == "paid":
            user = rng.choice(paid)
        elif free:
            user = rng.choice(free)
        else:  # only paid users: they may ask for the free tier
            user, mode = rng.choice(paid), "free"
        service, model = routes[experience]
        simulate = Simulate(tokens=tokens, token_latency_ms=token_latency_ms)
        if k in failing:
            simulate = simulate.model_copy(update={"fail": "error", "fail_attempts": 1})
        request = JobRequest(
            service=service,
            experience=experience,
            mode=mode,
            model=model,
            input=JobInput(
                prompt=f"sim job {k} for {user.id}",
                images=[TINY_PNG] if experience == "vision" else [],
                simulate=simulate,
            ),
        )
        try:
            check_registry(settings, request)
        except ClientError as exc:
            raise SimError(f"the sim's {experience} job is not admissible: {exc.message}") from exc
        specs.append(JobSpec(user=user, request=request))
    rng.shuffle(specs)
    return specs


def _check_args(
    jobs: int, users: int, concurrency: int, tokens: int, token_latency_ms: float, fail_rate: float
) -> None:
    problems = [
        ("jobs must be at least 1", jobs < 1),
        ("users must be at least 1", users < 1),
        ("concurrency must be at least 1", concurrency < 1),
        ("tokens must be between 0 and 10000", not 0 <= tokens <= 10_000),
        ("token latency must be between 0 and 60000 ms", not 0 <= token_latency_ms <= 60_000),
        ("fail rate must be between 0 and 1", not 0 <= fail_rate <= 1),
    ]
    bad = [message for message, failed in problems if failed]
    if bad:
        raise SimError("; ".join(bad))


# -- QStash, in memory ----------------------------------------------------------------------

_WORKER_URL = re.compile(r"/api/worker/(stream|batch)/([^/?#]+)$")


@dataclass(eq=False)
class _Message:
    message_id: str
    queue: str
    url: str
    body: bytes
    retries: int
    retried: int = 0
    cancelled: bool = False


class SimGateway(QStashGateway):
    """QStash's named queues in memory (see the module for the rules it plays by): what the
    dispatcher publishes is delivered in-process through :func:`run_delivery`. Never talks to a
    broker; :meth:`attach` gives it the runtime its deliveries run in."""

    def __init__(self, settings: Settings, concurrency: int) -> None:
        # the SDK client is never used: every method that would reach QStash is played here
        super().__init__(AsyncQStash("sim", base_url=settings.qstash_url), settings)
        self._rt: Runtime | None = None
        self._slots = asyncio.Semaphore(concurrency)
        self._parallelism: dict[str, int] = {}
        self._pending: dict[str, deque[_Message]] = {}
        self._busy: Counter[str] = Counter()  # messages holding a slot of their queue
        self._messages: dict[str, _Message] = {}  # not finished yet: pending or holding a slot
        self._dedup: dict[str, str] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._waiters: dict[str, deque[asyncio.Future[None]]] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        self.published = 0
        self.deduplicated = 0
        self.cancelled = 0
        self.deliveries = 0
        self.retries = 0
        self.dead_lettered = 0
        self.delivery_errors = 0
        self.delivering = 0  # deliveries running now
        self.replies: Counter[int] = Counter()
        self.events = 0  # anything that happened (a publish, a delivery ended, a message ended)

    def attach(self, rt: Runtime) -> None:
        self._rt = rt

    @property
    def idle(self) -> bool:
        """No message is waiting or being delivered (nor between its retries)."""
        return not self._messages

    def in_flight(self, queue: str) -> bool:
        return self._busy[queue] > 0 or bool(self._pending.get(queue))

    # -- what QStash offers ------------------------------------------------------------------

    async def publish_raw(
        self,
        queue: str,
        url: str,
        body: str,
        retries: int,
        dedup_id: str | None = None,
        headers: dict[str, str] | None = None,  # forwarded headers: not played by the sim
        linger_s: float = 0.0,  # nothing to batch: published at once
    ) -> str:
        if self._closed:
            raise UpstreamError("qstash publish failed: the sim's queues are closed")
        if dedup_id and dedup_id in self._dedup:
            self.deduplicated += 1
            return self._dedup[dedup_id]
        message_id = "msg_sim_" + secrets.token_hex(12)
        if dedup_id:
            self._dedup[dedup_id] = message_id
        message = _Message(message_id, queue, url, body.encode(), retries)
        self._messages[message_id] = message
        self._pending.setdefault(queue, deque()).append(message)
        self._idle.clear()
        self.published += 1
        self.events += 1
        self._pump(queue)
        return message_id

    async def cancel(self, message_id: str) -> None:
        message = self._messages.get(message_id)
        if message is None or message.cancelled:
            return
        message.cancelled = True
        self.cancelled += 1
        pending = self._pending.get(message.queue, deque())
        if message in pending:  # never delivered: gone; else no further attempt
            pending.remove(message)
            self._finished(message)

    async def sync_queue(self, queue: QueueId, conf: QueueSettings) -> None:
        self._parallelism[queue.value] = conf.parallelism
        self._pump(queue.value)

    async def queue_status(self, queue: str) -> QueueStatus:
        lag = len(self._pending.get(queue, ()))
        return QueueStatus(queue, self._parallelism.get(queue, 1), False, lag)

    # -- delivering --------------------------------------------------------------------------

    def _pump(self, queue: str) -> None:
        """Start the queue's next messages while it has free slots (a queue QStash creates on
        first publish has parallelism 1)."""
        pending = self._pending.get(queue)
        while pending and self._busy[queue] < self._parallelism.get(queue, 1):
            message = pending.popleft()
            self._busy[queue] += 1
            task = asyncio.create_task(self._run(message), name=f"tierq-sim-{queue}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, message: _Message) -> None:
        """Deliver the message, and retry it like QStash, holding its queue slot throughout."""
        try:
            while not (message.cancelled or self._closed):
                reply = await self._attempt(message)
                if 200 <= reply.status < 300:
                    return
                non_retryable = (
                    reply.status == 489
                    and reply.headers.get("Upstash-NonRetryable-Error", "").lower() == "true"
                )
                if non_retryable or message.retried >= message.retries:
                    self.dead_lettered += 1
                    log.info(
                        "sim.dead_lettered", message_id=message.message_id, status=reply.status,
                        retried=message.retried, reply=reply.body,
                    )  # fmt: skip
                    return
                delay = retry_delay(reply, message.retried)
                message.retried += 1
                await asyncio.sleep(delay)
        finally:
            self._busy[message.queue] -= 1
            self._finished(message)
            self._pump(message.queue)

    async def _attempt(self, message: _Message) -> Reply:
        async with self._slots:
            self.delivering += 1
            try:
                reply = await self._deliver(message)
            finally:
                self.delivering -= 1
        self.deliveries += 1
        if message.retried:
            self.retries += 1
        self.replies[reply.status] += 1
        self.events += 1
        return reply

    async def _deliver(self, message: _Message) -> Reply:
        """One delivery to the worker route of its URL; an exception is answered the way the
        app's handlers would."""
        assert self._rt is not None, "SimGateway.attach(rt) first"
        route = _WORKER_URL.search(message.url)
        if route is None:
            return error_reply(404, "not_found", f"no worker route at {message.url}")
        kind: WorkerKind = "stream" if route[1] == "stream" else "batch"
        try:
            return await run_delivery(
                self._rt, message.body, kind, route[2], message.message_id, message.retried
            )
        except (RedisError, UpstreamError) as exc:
            self.delivery_errors += 1
            log.warning("sim.delivery_error", error=str(exc))
            return error_reply(503, "unavailable", "a dependency is unavailable; retry shortly")
        except Exception as exc:
            self.delivery_errors += 1
            log.exception("sim.delivery_exception", error=str(exc))
            return error_reply(500, "internal_error", f"{type(exc).__name__}: {exc}")

    def _finished(self, message: _Message) -> None:
        self._messages.pop(message.message_id, None)
        self.events += 1
        waiters = self._waiters.get(message.queue)
        while waiters:  # one producer waiting on this queue tries again
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break
        if not self._messages:
            self._idle.set()

    # -- for the run -------------------------------------------------------------------------

    async def message_ended(self, queue: str, at_most_s: float) -> None:
        """Wait until a message of ``queue`` ends (at most ``at_most_s`` seconds)."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self._waiters.setdefault(queue, deque())
        waiters.append(waiter)
        try:
            async with asyncio.timeout(at_most_s):
                await waiter
        except TimeoutError:
            pass
        finally:
            with contextlib.suppress(ValueError):
                waiters.remove(waiter)

    def wake_all(self) -> None:
        """Wake every producer waiting in :meth:`message_ended` (the run is ending)."""
        for waiters in self._waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def wait_idle(self, at_most_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(at_most_s):
                await self._idle.wait()

    async def aclose(self) -> None:
        """Accept nothing more, stop what is still being delivered, close the SDK client."""
        if self._closed:
            return
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await super().aclose()


def retry_delay(reply: Reply, retried: int) -> float:
    """Seconds before retry number ``retried + 1``, by the broker's own policy
    (:func:`tierq.broker.server.backoff.next_delay_s`): a wait the reply asks for, read from the
    headers the broker reads and parsed as it parses them (seconds, an HTTP date, a duration;
    :func:`tierq.broker.server.durations.headers_wait`), capped to :data:`RETRY_AFTER_CAP_S`
    (sim time; QStash would wait it all). Without one the sim keeps its own fast fixed delay,
    :data:`RETRY_DELAY_S`, given to that policy as the message's retry-delay expression, where
    QStash's default backoff would wait e^2.5 s and more."""
    asked = headers_wait({name: [value] for name, value in reply.headers.items()}, time.time())
    return next_delay_s(
        retried=retried,
        expression=_RETRY_DELAY_EXPRESSION,
        response_wait_s=None if asked is None else min(asked, RETRY_AFTER_CAP_S),
    )


# -- the producers --------------------------------------------------------------------------


class _Producers:
    """Clients of the producer API: submit every job, honouring ``429``; then wait until the
    admitted jobs are terminal and the queues are idle."""

    def __init__(self, rt: Runtime, gateway: SimGateway) -> None:
        self.rt = rt
        self.gateway = gateway
        self.job_ids: list[str] = []
        self.open: dict[str, tuple[str, str]] = {}  # admitted, not seen terminal: (queue, user)
        self.submitting: Counter[str] = Counter()  # submits under way, per queue
        self.not_admitted = 0
        self.admission_rejections = 0
        self._unsubmitted = 0
        self._stopping = False

    async def run(self, specs: Sequence[JobSpec], settle_timeout_s: float) -> bool:
        """Submit ``specs`` and wait for the run to end; ``False`` when it stopped waiting for
        want of progress (the producers still waiting count as not admitted)."""
        self._unsubmitted = len(specs)
        producers = [asyncio.create_task(self.submit_job(spec)) for spec in specs]
        try:
            return await self._settle(producers, settle_timeout_s)
        finally:
            # Producers still waiting stop between submits rather than being cancelled: on
            # Python 3.11 a cancel that lands in a Redis command of a client with a socket
            # timeout can be lost (asyncio.wait_for), and the producer would go on submitting.
            self._stopping = True
            self.gateway.wake_all()
            _, late = await asyncio.wait(producers, timeout=STOP_GRACE_S)
            for task in late:
                task.cancel()
            await asyncio.gather(*producers, return_exceptions=True)
            self.not_admitted += self._unsubmitted
            self._unsubmitted = 0

    async def submit_job(self, spec: JobSpec) -> None:
        user, request = spec.user, spec.request
        queue = queue_for(resolve_tier(request.mode, user.plan), request.experience).value
        hopeless = False
        while not self._stopping:
            self.submitting[queue] += 1
            try:
                accepted = await submit(self.rt, user, request)
            except Busy as exc:
                refused: Busy | None = exc
            else:
                refused = None
            finally:
                self.submitting[queue] -= 1
            if refused is None:
                self._unsubmitted -= 1
                self.job_ids.append(accepted.job_id)
                self.open[accepted.job_id] = (queue, user.id)
                return
            self.admission_rejections += 1
            owner = user.id if refused.code == "user_queue_full" else None
            if await self._may_free(queue, owner):
                hopeless = False
                wait_s = min(refused.retry_after_s, ADMISSION_RETRY_CAP_S)
                await self.gateway.message_ended(queue, wait_s)
            elif self.submitting[queue]:  # another submit may hold it for a moment
                await self.gateway.message_ended(queue, RETRY_DELAY_S * random.random())
            elif hopeless:  # twice nothing that could free it: it is held for good
                self._unsubmitted -= 1
                self.not_admitted += 1
                log.warning("sim.not_admitted", queue=queue, user=user.id, code=refused.code)
                return
            else:  # what held it may just have ended: once more, at once
                hopeless = True

    async def _may_free(self, queue: str, user_id: str | None) -> bool:
        """Whether anything of the run could still free a share of ``queue`` (``user_id``'s
        share when given): a message of the queue in flight, or an unfinished job."""
        if self.gateway.in_flight(queue):
            return True
        holders = [
            job
            for job, (q, u) in self.open.items()
            if q == queue and (user_id is None or u == user_id)
        ]
        await self._prune(holders)
        return any(job in self.open for job in holders)

    async def _prune(self, job_ids: list[str]) -> None:
        """Forget the jobs of ``job_ids`` that are terminal now."""
        for start in range(0, len(job_ids), 500):
            chunk = job_ids[start : start + 500]
            pipe = self.rt.redis.pipeline(transaction=False)
            for job_id in chunk:
                pipe.hget(self.rt.keys.job(job_id), "status")
            for job_id, status in zip(chunk, await pipe.execute(), strict=True):
                if status is not None and _s(status) in TERMINAL_STATUSES:
                    self.open.pop(job_id, None)

    async def _settle(self, producers: list[asyncio.Task[None]], timeout_s: float) -> bool:
        mark = -1
        quiet_since = time.monotonic()
        while True:
            for task in producers:  # a producer that raised (Redis gone) ends the run
                error = task.exception() if task.done() and not task.cancelled() else None
                if error is not None:
                    raise error
            if self.gateway.idle and all(task.done() for task in producers):
                await self._prune(list(self.open))
                if not self.open and self.gateway.idle:
                    return True
            now = time.monotonic()
            # progress is what the queues see: producers retrying on their own are none
            if self.gateway.events != mark or self.gateway.delivering:
                mark, quiet_since = self.gateway.events, now
            elif now - quiet_since >= timeout_s:
                log.warning(
                    "sim.stalled", open_jobs=len(self.open), waited_s=timeout_s,
                    producers_waiting=sum(not task.done() for task in producers),
                )  # fmt: skip
                return False
            if self.gateway.idle:
                await asyncio.sleep(SETTLE_POLL_S)
            else:
                await self.gateway.wait_idle(SETTLE_POLL_S)


# -- leaks ----------------------------------------------------------------------------------


def lease_keys(rt: Runtime, users: list[UserSettings], models: set[str]) -> list[str]:
    """Every lease key a run with these users and models can touch."""
    queues = [q.value for q in QueueId]
    keys = [rt.keys.admission(q) for q in queues]
    keys += [rt.keys.user_pending(q, u.id) for q in queues for u in users]
    keys += [rt.keys.queue_slots(q) for q in queues]
    keys += [rt.keys.model_guard(m, t) for m in sorted(models) for t in TIERS]
    keys += [rt.keys.user_guard(u.id) for u in users]
    return keys


async def job_states(rt: Runtime, job_ids: list[str]) -> dict[str, JobState | None]:
    """State records of ``job_ids`` (pipelined; a missing job maps to ``None``)."""
    states: dict[str, JobState | None] = {}
    batch = 500
    for start in range(0, len(job_ids), batch):
        chunk = job_ids[start : start + batch]
        pipe = rt.redis.pipeline(transaction=False)
        for job_id in chunk:
            pipe.hgetall(rt.keys.job(job_id))
        rows = await pipe.execute()
        for job_id, row in zip(chunk, rows, strict=True):
            states[job_id] = JobState.parse(row)
    return states


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _status(state: JobState | None) -> str:
    return (state.status if state else None) or "missing"


async def find_leaks(rt: Runtime, keys: list[str], states: dict[str, JobState | None]) -> Leaks:
    """Live leases on ``keys``, jobs the dispatcher still holds (parked, or published and never
    confirmed) and jobs (of ``states``) not in a terminal state."""
    leaks = Leaks(keys_checked=len(keys))
    for key in keys:
        live = await rt.leases.count(key)
        if live:
            leaks.leases[key] = live
    parked = await rt.redis.hgetall(rt.keys.parked_counts)
    leaks.parked = {_s(q): int(n) for q, n in sorted(parked.items()) if int(n)}
    leaks.dispatching = int(await rt.redis.zcard(rt.keys.dispatching))
    stuck = sorted(j for j, s in states.items() if s is None or not s.terminal)
    leaks.stuck_jobs = len(stuck)
    leaks.stuck_job_ids = [f"{j} ({_status(states[j])})" for j in stuck][:MAX_STUCK_IDS]
    return leaks


def _counter_by(metrics: Metrics, name: str, label: str | None = None) -> dict[str, int]:
    """The counter ``name`` summed by one of its labels (over all the others); without
    ``label``, its total under ``""``."""
    sums: Counter[str] = Counter()
    for family in metrics.registry.collect():
        if family.name != name:
            continue
        for sample in family.samples:
            if sample.name == f"{name}_total":
                sums[sample.labels.get(label, "") if label else ""] += int(sample.value)
    return dict(sorted(sums.items()))


async def _report(
    rt: Runtime,
    gateway: SimGateway,
    producers: _Producers,
    wall_s: float,
    *,
    jobs: int,
    users: list[UserSettings],
    models: set[str],
    concurrency: int,
    seed: int,
) -> SimReport:
    states = await job_states(rt, producers.job_ids)
    per_queue = {q.value: QueueStats() for q in QueueId}
    run: list[float] = []
    latency: list[float] = []
    statuses: Counter[str] = Counter()
    for state in states.values():
        status = _status(state)
        statuses[status] += 1
        stats = per_queue.setdefault((state and state.queue_id) or "?", QueueStats())
        stats.jobs += 1
        if status in ("completed", "failed", "cancelled"):
            setattr(stats, status, getattr(stats, status) + 1)
        if state and status == "completed" and state.finished_at is not None:
            if state.started_at is not None:
                run.append(state.finished_at - state.started_at)
            if state.created_at is not None:
                latency.append(state.finished_at - state.created_at)
    leaks = await find_leaks(rt, lease_keys(rt, users, models), states)
    m = rt.metrics
    waits = _counter_by(m, "tierq_guard_waits", "guard")
    parked = _counter_by(m, "tierq_jobs_parked", "reason")
    completed = statuses["completed"]
    return SimReport(
        jobs=jobs,
        completed=completed,
        failed=statuses["failed"],
        cancelled=statuses["cancelled"],
        dead_lettered=gateway.dead_lettered,
        not_admitted=producers.not_admitted,
        wall_s=round(wall_s, 3),
        throughput_jobs_s=round(completed / wall_s, 1) if wall_s > 0 else 0.0,
        dispatched=sum(_counter_by(m, "tierq_jobs_dispatched").values()),
        deduplicated=gateway.deduplicated,
        deliveries=gateway.deliveries,
        retries=gateway.retries,
        replies={str(k): v for k, v in sorted(gateway.replies.items())},
        rejections_429=gateway.replies[429],
        parked=sum(parked.values()),
        parked_by_reason=parked,
        guard_waits=sum(waits.values()),
        guard_waits_by_guard=waits,
        attempt_failures=sum(_counter_by(m, "tierq_job_attempt_failures").values()),
        admission_rejections=producers.admission_rejections,
        delivery_errors=gateway.delivery_errors,
        per_queue=per_queue,
        run_ms=percentiles(run),
        latency_ms=percentiles(latency),
        leaks=leaks,
        seed=seed,
        users=len(users),
        concurrency=concurrency,
        key_prefix=rt.settings.key_prefix,
    )


async def _drop_keys(client: aioredis.Redis, prefix: str) -> None:
    pattern = "".join("\\" + c if c in "*?[]\\" else c for c in prefix) + ":*"
    batch: list[Any] = []
    async for key in client.scan_iter(match=pattern, count=1000):
        batch.append(key)
        if len(batch) >= 500:
            await client.unlink(*batch)
            batch = []
    if batch:
        await client.unlink(*batch)


# -- entry point ----------------------------------------------------------------------------


def sim_settings(settings: Settings, redis_url: str) -> Settings:
    """The run's settings: dev defaults, this Redis, a key prefix of its own, no queue
    paused."""
    prefix = f"{settings.key_prefix}-sim-{secrets.token_hex(4)}"
    queues = {q: conf.model_copy(update={"paused": False}) for q, conf in settings.queues.items()}
    return settings.with_dev_defaults().model_copy(
        update={"redis_url": redis_url, "key_prefix": prefix, "queues": queues}
    )


async def simulate(
    settings: Settings,
    redis_url: str,
    *,
    jobs: int,
    users: int,
    concurrency: int,
    token_latency_ms: float,
    tokens: int,
    fail_rate: float,
    seed: int,
    metrics: Metrics | None = None,
    keep_keys: bool = False,
    settle_timeout_s: float | None = None,
) -> SimReport:
    """Submit ``jobs`` synthetic jobs and run them through the dispatcher and the worker
    pipeline against ``redis_url``.

    Raises :class:`SimError` for bad arguments or settings, :class:`UpstreamError` when Redis
    cannot be reached. Limits, queues, models and services come from ``settings``.
    ``settle_timeout_s`` (default: :data:`SETTLE_TIMEOUT_S`, or three reconciler periods if
    longer) is how long the run waits without progress before it reports what is stuck.
    """
    _check_args(jobs, users, concurrency, tokens, token_latency_ms, fail_rate)
    cfg = sim_settings(settings, redis_url)
    missing = [q.value for q in QueueId if q not in cfg.queues]
    if missing:
        raise SimError(f"settings have no queue {', '.join(missing)}")
    specs = plan_jobs(
        cfg,
        jobs=jobs,
        users=users,
        tokens=tokens,
        token_latency_ms=token_latency_ms,
        fail_rate=fail_rate,
        seed=seed,
    )
    if settle_timeout_s is None:
        settle_timeout_s = max(SETTLE_TIMEOUT_S, 3 * cfg.dispatch_reconcile_s)
    people = sim_users(users)
    models = {spec.request.model for spec in specs}
    clients = redis_clients(cfg)  # the app's pools: commands wait for a free connection
    client = clients.commands
    gateway = SimGateway(cfg, concurrency)
    rt = build_runtime(
        cfg, client, metrics or Metrics(), clients.tails, clients.pubsub, gateway=gateway
    )
    gateway.attach(rt)
    enable_local_start(rt)
    try:
        try:
            await client.ping()
        except (RedisError, OSError) as exc:
            raise UpstreamError(f"redis at {redis_url} is unreachable: {exc}") from exc
        await rt.cancels.start()
        try:
            await gateway.sync_queues()
            rt.dispatcher.start()  # the reconciler: lost wake-ups are covered, as in the app
            producers = _Producers(rt, gateway)
            started = time.monotonic()
            await producers.run(specs, settle_timeout_s)
            wall_s = time.monotonic() - started
            await rt.dispatcher.stop()
            await gateway.aclose()
            return await _report(
                rt, gateway, producers, wall_s, jobs=jobs, users=people, models=models,
                concurrency=concurrency, seed=seed,
            )  # fmt: skip
        finally:
            await rt.aclose_streams()
            await rt.cancels.stop()
            if not keep_keys:
                await _drop_keys(client, cfg.key_prefix)
    finally:
        await gateway.aclose()
        await rt.providers.aclose()
        await clients.aclose()
