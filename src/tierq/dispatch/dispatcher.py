"""Decide at dispatch, not at delivery.

A submitted job is parked in Redis, in its user's line (FIFO) of its queue, and published to
its QStash queue only once it can run: its queue has a free slot (``parallelism`` jobs
dispatched and not finished), its user is under their running limit, and its model+tier has
room. Those three leases are taken at dispatch, by job id, so the delivery finds them held.
The next job is chosen by weighted deficit round robin over the users of the queue, whenever
something may have freed room: a job parked, a run ended, a queue resumed, and (as a safety
net for lost wake-ups and dead publishers) every ``dispatch_reconcile_s`` from each process.

Every step is one Lua script over keys that share a hash tag (``AppKeys.sched``); publishes go
out through the gateway's group commit with a deduplication id, and a job whose publish was
not confirmed in time (its publisher crashed) goes back to the front of its line: published
again, QStash recognises it and does not deliver it twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any, cast

import orjson
import redis.asyncio as aioredis
import structlog
from opentelemetry.trace import SpanKind
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError

from tierq.aio import raise_if_cancelled
from tierq.broker.client import QStashGateway
from tierq.config import Settings
from tierq.contracts import Hold, Waiting, WorkerBody
from tierq.errors import UpstreamError
from tierq.events.log import JobStore
from tierq.events.state import JobState
from tierq.guards.leases import KEY_GRACE_MS, ttl_ms
from tierq.keys import AppKeys
from tierq.observability.metrics import Metrics
from tierq.observability.tracing import current_traceparent, span
from tierq.queues import QueueId, delivery_path
from tierq.redis_pool import LeanRedis

if TYPE_CHECKING:
    from tierq.dispatch.local import LocalRuns

log = structlog.get_logger("tierq.dispatch")
_SWEPT = ("status", "userId", "messageId", "createdAt")  # what the sweep reads of a record

_SCRIPTS = (
    "park", "release", "claim", "confirm", "requeue", "reconcile", "positions", "aimd"
)  # fmt: skip
_APPENDED = {"admit": "park", "admit_record": "admit"}
"""Scripts made of several files: ``admit`` runs ``park`` once the job is admitted;
``admit_record`` is ``admit`` that also writes the job's record (a single Redis only)."""
POSITION_RATIO = 0.8
"""A parked job hears its new position when it fell to this fraction of the last one told (or
what holds it changed)."""
POSITIONS_MAX = 1000
"""Positions looked at per pass (the first ones of each queue's order)."""
PUBLISH_LINGER_S = 0.003
"""How long the publish of a job that already started here waits for others to go with it in
one request (its run needs the message id only at its end; a submit's publish never waits)."""
CONFIRM_AFTER_S = 0.005
"""How long the confirmation of a release's publishes waits for others to go with it, in one
round trip (nothing waits for it: unconfirmed, a job goes back to its line only after
``dispatch_confirm_s``)."""


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _tell_local(
    local: LocalRuns, out: Sequence[_Out], results: Sequence[Any], early: set[str], hold: str | None
) -> None:
    """How the publishes went, for the local runs: those that started as their publish went
    out (``early``) learn their message id; the submit's own job (``hold``) starts once
    published."""
    for o, r in zip(out, results, strict=True):
        message_id = r if isinstance(r, str) else ""
        if o.job_id in early:
            local.published(o.job_id, message_id)
        elif o.job_id == hold and message_id:
            local.begin(hold, o.body, o.data, o.traceparent, message_id)
        elif o.job_id == hold:
            local.unexpect(hold)


@dataclass(frozen=True)
class Parked:
    """Where a parked job stands: ``reason`` is empty when it was dispatched at once, else what
    holds it (``paused``, ``user``, ``model`` or ``queue``), with the jobs going before it."""

    reason: str
    position: int

    @property
    def dispatched(self) -> bool:
        return not self.reason

    def event(self, job_id: str) -> Waiting:
        """The ``waiting`` event that tells the job's followers where it stands."""
        now = int(time.time() * 1000)
        return Waiting(jobId=job_id, ts=now, guard=cast(Hold, self.reason), position=self.position)


@dataclass(frozen=True)
class Quota:
    """One of a user's rate quotas after a submit: its limit per minute (0: none), what is
    left of it, and the seconds until it is whole again."""

    limit: int
    remaining: int
    reset_s: float


@dataclass(frozen=True)
class Admission:
    """What :meth:`Dispatcher.admit` decided: ``refused`` (``user``: the user's share of the
    queue is full; ``queue``: its admission depth; ``requests``/``tokens``: the user's rate
    quota, for ``retry_after_s``) or where the job stands, with the rows of the jobs dispatched
    meanwhile (this one, when it goes at once), to publish once it is recorded, and the user's
    ``requests`` and ``tokens`` quotas after it."""

    refused: str
    parked: Parked
    rows: Sequence[Any]
    retry_after_s: float = 0.0
    requests: Quota | None = None
    tokens: Quota | None = None


@dataclass
class _Out:
    job_id: str
    dedup_id: str
    body: str
    data: dict[str, Any]
    traceparent: str | None = None  # what its publish sent QStash (its delivery's parent)

    @classmethod
    def of(cls, job_id: Any, dedup_id: Any, body: Any) -> _Out:
        text = _s(body)
        return cls(_s(job_id), _s(dedup_id), text, orjson.loads(text))


_CLOCKLESS = ("confirm",)
"""Dispatch scripts that never read the clock (``NOW``): they run without the ``TIME`` call."""


def _load(client: aioredis.Redis) -> dict[str, AsyncScript]:
    lua = resources.files("tierq.dispatch") / "lua"
    clock = (resources.files("tierq.guards") / "lua" / "_clock.lua").read_text()
    prelude = clock + (lua / "_lib.lua").read_text()
    scripts = {n: prelude + (lua / f"{n}.lua").read_text() for n in _SCRIPTS}
    clockless = prelude.replace("local NOW = now_ms()", "local NOW = nil  -- not needed here")
    assert clockless != prelude
    for name in _CLOCKLESS:  # one TIME less in a script that needs no time
        scripts[name] = clockless + (lua / f"{name}.lua").read_text()
    for name, then in _APPENDED.items():
        scripts[name] = prelude + (lua / f"{name}.lua").read_text() + scripts[then][len(prelude) :]
    return {name: client.register_script(text) for name, text in scripts.items()}


class _Only:
    """A pipeline that queues only the commands at ``keep`` (their indices in the order they
    are queued) and counts them all (``len``), for :meth:`Dispatcher.run_pipeline`'s resend."""

    def __init__(self, pipe: Any, keep: frozenset[int]) -> None:
        self._pipe, self._keep, self._queued = pipe, keep, 0

    def __len__(self) -> int:
        return self._queued

    def __getattr__(self, name: str) -> Callable[..., _Only]:
        command = getattr(self._pipe, name)

        def queue(*args: Any, **kwargs: Any) -> _Only:
            if self._queued in self._keep:
                command(*args, **kwargs)
            self._queued += 1
            return self

        return queue


class Dispatcher:
    """The fair dispatcher of one app process (any number of processes may share Redis)."""

    def __init__(
        self,
        client: aioredis.Redis,
        keys: AppKeys,
        settings: Settings,
        gateway: QStashGateway,
        metrics: Metrics,
        jobs: JobStore,
    ) -> None:
        self.r = client
        self.jobs = jobs
        self.keys = keys
        self.settings = settings
        self.gateway = gateway
        self.metrics = metrics
        self._scripts = _load(client)
        self.also_scripts: list[AsyncScript] = []  # others' scripts queued on run_pipeline
        # the local start: told of each job this process publishes (tierq.dispatch.local)
        self.local: LocalRuns | None = None
        self._reconciler: asyncio.Task[None] | None = None
        self._confirms: dict[str, str] = {}  # job id -> message id: published, to confirm soon
        self._confirming: asyncio.Task[None] | None = None
        queues = ";".join(
            f"{q.value}={conf.parallelism}={int(conf.paused)}"
            for q, conf in settings.queues.items()
        )
        self._common: list[str | int] = [
            keys.sched,
            ttl_ms(settings.lease_ttl_s),
            KEY_GRACE_MS,
            ttl_ms(settings.dispatch_confirm_s),
            settings.dispatch_batch,
            settings.dispatch_lookahead,
            settings.dispatch_max_scan,
            queues,
        ]

    # -- the job's terms ---------------------------------------------------------------------

    def _job_args(self, body: WorkerBody) -> list[str | int]:
        s = self.settings
        model = s.models[body.model_id]
        limit = model.limits.for_tier(body.tier)
        return [
            body.job_id,
            body.queue_id.value,
            body.user_id,
            self.keys.model_guard(body.model_id, body.tier),
            f"{limit}a" if model.adaptive.enabled else limit,  # see model_cap in _lib.lua
            s.user_running_limit(body.user_id, body.plan),
        ]

    def leases(self, body: WorkerBody) -> list[tuple[str, str]]:
        """The ``(key, holder)`` leases a dispatched or claimed job holds while it runs."""
        job = body.job_id
        return [
            (self.keys.queue_slots(body.queue_id.value), job),
            (self.keys.user_guard(body.user_id), job),
            (self.keys.model_guard(body.model_id, body.tier), job),
        ]

    async def call_script(self, name: str, extra: Sequence[str | int | bytes]) -> Any:
        """Run one dispatch script (common arguments first) and return its raw reply; nothing
        is published (the operations below do that)."""
        try:
            return await self._scripts[name](
                keys=[f"{self.keys.sched}:active"], args=[*self._common, *extra]
            )
        except RedisError as exc:
            raise UpstreamError(f"redis: {exc}") from exc

    def _queue_script(self, pipe: Any, name: str, extra: Sequence[str | int | bytes]) -> None:
        sha = self._scripts[name].sha
        pipe.evalsha(sha, 1, f"{self.keys.sched}:active", *self._common, *extra)

    async def run_pipeline(self, build: Callable[[Any], None]) -> list[Any]:
        """One round trip of the commands and scripts ``build`` queues (the scripts by sha: a
        pipeline that registers scripts would ask Redis whether they exist on every call); the
        replies, or the first error. Commands Redis answered ``NOSCRIPT`` (it forgot the
        scripts: a restart, a failover, ``SCRIPT FLUSH``, or a fresh server) did not run: the
        scripts are loaded and those commands alone are sent again (``build`` queues the same
        commands in the same order each time). The others ran and are not sent twice: a
        dispatch script's reply lists the jobs it dispatched, to publish, and a second run
        would lose them (they would sit dispatched, unpublished, until the reconciler)."""
        pipe = self.r.pipeline(transaction=False)
        build(pipe)
        replies = list(await pipe.execute(raise_on_error=False))
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            if isinstance(self.r, LeanRedis):  # every script of the client, one round trip
                await self.r.load_scripts()
            else:
                for script in [*self._scripts.values(), *self.jobs.scripts(), *self.also_scripts]:
                    script.sha = await self.r.script_load(script.script)
            again = self.r.pipeline(transaction=False)
            build(_Only(again, frozenset(missing)))
            for i, reply in zip(missing, await again.execute(raise_on_error=False), strict=True):
                replies[i] = reply
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    # -- operations --------------------------------------------------------------------------

    def park_args(
        self, body: WorkerBody, raw: bytes | str, dedup_id: str, front: bool = False
    ) -> list[str | int | bytes]:
        weight = self.settings.user_weight(body.user_id, body.plan)
        rate = self.settings.models[body.model_id].rates.for_tier(body.tier)
        return [
            *self._job_args(body),
            weight,
            dedup_id,
            "1" if front else "0",
            raw,
            rate.rpm or 0,
            rate.tpm or 0,
            body.estimated_tokens,
        ]

    async def park(
        self,
        body: WorkerBody,
        raw: bytes | str,
        *,
        dedup_id: str,
        front: bool = False,
        must_publish: bool = False,
    ) -> Parked:
        """Park the job (at the back of its user's line, or at the front when it goes back
        there) and dispatch its queue; publishes whatever was dispatched before returning.
        With ``must_publish``, a job dispatched at once whose publish failed raises
        :class:`UpstreamError` (it is back in its line; the caller takes it out)."""
        reply = await self.call_script("park", self.park_args(body, raw, dedup_id, front))
        reason, position = _s(reply[0]), int(reply[1])
        if reason:
            self.metrics.parked.labels(body.queue_id.value, reason).inc()
        sent = await self._publish(reply[2:])
        if must_publish and not reason and body.job_id not in sent:
            raise UpstreamError("qstash is unavailable: the job could not be published")
        return Parked(reason, position)

    async def admit(
        self,
        body: WorkerBody,
        raw: bytes | str,
        *,
        depth: int,
        share: int,
        record: Sequence[str] = (),
    ) -> Admission:
        """Admit a new job (its user's rate quotas, their ``share`` of the queue, then the
        queue's ``depth``) and park it, in one script; nothing is published yet
        (:meth:`publish` does, once the job's record exists). With ``record``
        (:meth:`JobStore.record_args`; a single Redis only), the same script writes the job's
        record once it is admitted, as :meth:`JobStore.create` would. A refused job leaves
        nothing behind."""
        rate = self.settings.user_rate(body.user_id, body.plan)
        args = [
            *self.park_args(body, raw, body.job_id),
            depth,
            share,
            ttl_ms(self.settings.admission_ttl_s),
            rate.rpm or 0,
            rate.tpm or 0,
            *record,
        ]
        reply = await self.call_script("admit_record" if record else "admit", args)
        if _s(reply[0]) == "full":
            wait_ms = int(reply[2]) if len(reply) > 2 else 0
            return Admission(_s(reply[1]), Parked("", 0), (), retry_after_s=wait_ms / 1000)
        reason, position = _s(reply[0]), int(reply[1])
        if reason:
            self.metrics.parked.labels(body.queue_id.value, reason).inc()
        quotas = _s(reply[-1]).split("\t")
        requests, tokens = (
            Quota(int(quotas[i]), int(quotas[i + 1]), int(quotas[i + 2]) / 1000)
            if int(quotas[i])
            else None
            for i in (0, 3)
        )
        return Admission(
            "", Parked(reason, position), reply[2:-1], requests=requests, tokens=tokens
        )

    async def publish(self, admission: Admission, job_id: str, *, skip: bool = False) -> None:
        """Publish what :meth:`admit` dispatched (without ``job_id`` when ``skip``). Raises
        :class:`UpstreamError` when ``job_id`` was to go at once and could not be published (it
        is back in its line; the caller takes it out)."""
        rows = admission.rows
        if skip:
            rows = [
                x for i in range(0, len(rows), 3) if _s(rows[i]) != job_id for x in rows[i : i + 3]
            ]
        sent = await self._publish(rows, hold=None if skip else job_id)
        if not skip and admission.parked.dispatched and job_id not in sent:
            raise UpstreamError("qstash is unavailable: the job could not be published")

    def _claim_args(self, body: WorkerBody) -> list[str | int]:
        return [*self._job_args(body), ttl_ms(2 * self.settings.heartbeat_s)]

    async def claim(self, body: WorkerBody) -> str:
        """For a delivery: take (or keep) the job's three leases, all or none. ``"ok"``, or the
        guard that is full (``user``, ``model``, ``queue``)."""
        return _s(await self.call_script("claim", self._claim_args(body))).partition(":")[0]

    async def claim_with_state(self, body: WorkerBody) -> tuple[JobState | None, str, bool]:
        """The job's state record, :meth:`claim`'s answer, and whether dispatch had the job
        (parked or being published: admitted, even if its record is not written yet), in one
        round trip. The claim is made before the state is known: a delivery that must not run
        gives the leases back (:meth:`release`) unless the job runs elsewhere (they are that
        run's own leases)."""

        def build(pipe: Any) -> None:
            pipe.hgetall(self.keys.job(body.job_id))
            self._queue_script(pipe, "claim", self._claim_args(body))

        try:
            raw, full = await self.run_pipeline(build)
        except RedisError as exc:
            raise UpstreamError(f"redis: {exc}") from exc
        answer, _, sent = _s(full).partition(":")
        return JobState.parse(raw), answer, sent == "sent"

    async def release(
        self,
        body: WorkerBody,
        also: Sequence[tuple[str, str]] = (),
        before: Callable[[Any], None] | None = None,
        used_tokens: int | None = None,
    ) -> list[Any]:
        """The job's run ended: give back its leases (and ``also``, e.g. admission, in the same
        round trip, after what ``before`` queues first: e.g. the job's terminal event), then
        publish what the freed room lets through. With ``used_tokens`` (the job ended), the
        user's and the model's token quotas are corrected from the estimate to it. Returns the
        replies to ``before``'s commands."""
        correction: list[str | int] = []
        if used_tokens is not None and used_tokens != body.estimated_tokens:
            user = self.settings.user_rate(body.user_id, body.plan)
            model = self.settings.models[body.model_id].rates.for_tier(body.tier)
            if user.tpm or model.tpm:
                correction = [
                    user.rpm or 0, user.tpm or 0, model.rpm or 0, model.tpm or 0,
                    used_tokens - body.estimated_tokens,
                ]  # fmt: skip
        return await self.release_job(
            body.job_id, body.queue_id.value, body.user_id, body.model_id, body.tier, also,
            before, correction,
        )  # fmt: skip

    async def release_job(
        self,
        job_id: str,
        queue: str,
        user_id: str,
        model_id: str,
        tier: str,
        also: Sequence[tuple[str, str]] = (),
        before: Callable[[Any], None] | None = None,
        correction: Sequence[str | int] = (),
    ) -> list[Any]:
        """:meth:`release` from a job's state record (when no worker body is at hand). A job
        whose own publish is still to be confirmed (it ran in less than ``CONFIRM_AFTER_S``)
        gets its message id on its record in the same round trip (the release forgets it in
        dispatch)."""
        extra = [job_id, queue, user_id, self.keys.model_guard(model_id, tier), *correction]
        first = 0
        own = self._confirms.pop(job_id, None)

        def build(pipe: Any) -> None:
            nonlocal first
            if before is not None:
                before(pipe)
                first = len(pipe)
            if own is not None:
                self.jobs.queue_set_if_exists(pipe, job_id, {"messageId": own})
            for key, holder in also:
                pipe.zrem(key, holder)
            self._queue_script(pipe, "release", extra)

        try:
            replies = await self.run_pipeline(build)
        except RedisError as exc:
            if own is not None:
                self._confirm_later({job_id: own})
            raise UpstreamError(f"redis: {exc}") from exc
        await self._publish(replies[-1])
        return replies[:first]

    def queue_adapt(self, pipe: Any, body: WorkerBody, action: str) -> None:
        """Queue on ``pipe`` the move of the job's model's adaptive limit after one attempt:
        ``decrease`` (an upstream 429), ``slow`` (its rate-limit headers ran low) or
        ``increase`` (a success); see ``aimd.lua``."""
        model = self.settings.models[body.model_id]
        adaptive = model.adaptive
        factor = adaptive.decrease if action == "decrease" else adaptive.slow_down
        limit = model.limits.for_tier(body.tier)
        self._queue_script(
            pipe, "aimd",
            [self.keys.model_guard(body.model_id, body.tier), limit,
             min(adaptive.min_limit, limit), action, str(factor)],
        )  # fmt: skip

    async def model_limits(self) -> dict[str, float]:
        """Effective limits of adaptive models now under their configured ones, by model
        guard key."""
        try:
            raw = await self.r.hgetall(f"{self.keys.sched}:aimd")
        except RedisError as exc:
            raise UpstreamError(f"redis: {exc}") from exc
        return {_s(k): float(_s(v)) for k, v in raw.items()}

    async def show_model_limits(self) -> None:
        """Set ``tierq_model_effective_limit`` for the models with adaptive limits."""
        adaptive = [(m, c) for m, c in self.settings.models.items() if c.adaptive.enabled]
        if not adaptive:
            return
        now = await self.model_limits()
        for model_id, conf in adaptive:
            for tier in ("paid", "free"):
                limit = conf.limits.for_tier(tier)
                moved = now.get(self.keys.model_guard(model_id, tier))
                shown = limit if moved is None else max(1, min(limit, int(moved)))
                self.metrics.model_limit.labels(model_id, tier).set(shown)

    async def kick(self) -> int:
        """Requeue publishes never confirmed in time, then dispatch every queue (the periodic
        safety net, and what resume calls). Returns how many jobs were published."""
        return len(await self._publish(await self.call_script("reconcile", [])))

    # -- operators -----------------------------------------------------------------------------

    async def set_queue(
        self, queue: str, *, paused: bool | None = None, parallelism: int | None = None
    ) -> None:
        """An operator's pause/resume or parallelism for ``queue``: it holds over the
        configuration (across restarts) until :meth:`clear_queue_overrides`. A paused queue
        dispatches nothing new; on resume (or more parallelism) its parked jobs go out fairly,
        at once."""
        fields: dict[str, str] = {}
        if paused is not None:
            fields["paused"] = "1" if paused else "0"
        if parallelism is not None:
            fields["parallelism"] = str(parallelism)
        try:
            await self.r.hset(self.keys.queue_state(queue), mapping=fields)  # type: ignore[arg-type]
        except RedisError as exc:
            raise UpstreamError(f"redis: {exc}") from exc
        await self.kick()

    async def clear_queue_overrides(self) -> None:
        """Back to the configuration for every queue (``tierq queues sync``)."""
        try:
            await self.r.delete(*(self.keys.queue_state(q.value) for q in self.settings.queues))
        except RedisError as exc:
            raise UpstreamError(f"redis: {exc}") from exc
        await self.kick()

    async def queue_stats(self, queue: str, top: int = 5) -> dict[str, Any]:
        """What dispatch holds for ``queue``: jobs parked, the users with most of them, and
        whether it is paused here."""
        try:
            pipe = self.r.pipeline(transaction=False)
            pipe.hget(self.keys.parked_counts, queue)
            pipe.zrevrange(self.keys.parked_users(queue), 0, top - 1, withscores=True)
            pipe.hgetall(self.keys.queue_state(queue))
            parked, users, state = await pipe.execute()
        except RedisError as exc:
            raise UpstreamError(f"redis: {exc}") from exc
        conf = {_s(k): _s(v) for k, v in state.items()}
        configured = self.settings.queues.get(QueueId(queue))
        return {
            "parked": int(parked or 0),
            "topParked": [{"userId": _s(u), "parked": int(n)} for u, n in users],
            "dispatchPaused": conf.get("paused", "1" if configured and configured.paused else "0")
            == "1",
        }

    # -- publishing --------------------------------------------------------------------------

    async def _publish(self, rows: Sequence[Any], hold: str | None = None) -> dict[str, str]:
        """Publish dispatched ``(job, dedup id, body)`` rows together (one group commit); confirm
        the ones QStash took, put the others back in their lines (except those that started
        here as their publish went out: their runs see to it). Raises nothing for a failed
        publish: the job waits, parked, for the next attempt. Returns job id → message id of
        the ones published. ``hold``: the job of the submit publishing (it starts here only
        once published)."""
        if not rows:
            return {}
        out = [_Out.of(*rows[i : i + 3]) for i in range(0, len(rows), 3)]
        local = self.local
        early: set[str] = set()  # the jobs that started here as their publish went out
        if local is not None and hold is not None and any(o.job_id == hold for o in out):
            local.expect(hold)
        results: list[Any] = [None] * len(out)
        try:
            results = await self._send_all(out, early, hold)
        finally:
            if local is not None:  # before the confirm: its round trip is not the run's
                # business (were it lost, the job goes back to its line, is published again
                # and finds itself running or ended)
                _tell_local(local, out, results, early, hold)
        sent = {o.job_id: r for o, r in zip(out, results, strict=True) if isinstance(r, str)}
        # a job whose publish failed goes back to its line, unless it runs here: that run
        # ends it, or puts it back itself (see the worker pipeline's _end)
        failed = [o.job_id for o in out if o.job_id not in sent and o.job_id not in early]
        if hold is None and not failed:  # a release's: confirmed with others, in a moment
            self._confirm_later(sent)
        else:  # a submit's (its caller reads the record next), or some go back to their lines
            await self._confirm(sent, failed)
        for o, result in zip(out, results, strict=True):
            if isinstance(result, BaseException):
                self.metrics.publish_failures.inc()
                log.warning("dispatch.publish_failed", job_id=o.job_id, error=str(result))
            else:
                self.metrics.dispatched.labels(o.data["queueId"]).inc()
        return sent

    async def _confirm(self, sent: dict[str, str], failed: Sequence[str]) -> None:
        """One round trip: the publishes QStash took are confirmed (their message ids on their
        records), the ``failed`` ones go back to their lines. On a Redis error the reconciler
        puts back what was not confirmed."""

        def build(pipe: Any) -> None:
            for job_id, message_id in sent.items():  # never re-creates a taken-back job
                self.jobs.queue_set_if_exists(pipe, job_id, {"messageId": message_id})
            if sent:
                self._queue_script(pipe, "confirm", list(sent))
            if failed:
                self._queue_script(pipe, "requeue", list(failed))

        if not sent and not failed:
            return
        try:
            await self.run_pipeline(build)
        except RedisError as exc:  # the reconciler requeues what was not confirmed
            log.warning("dispatch.confirm_failed", error=str(exc))

    def _confirm_later(self, sent: dict[str, str]) -> None:
        """Confirm ``sent`` within ``CONFIRM_AFTER_S``, with the others published meanwhile: a
        release dispatches one job or two, one round trip each to confirm them cost the app
        ~4 % of its CPU under load."""
        self._confirms.update(sent)
        if self._confirming is None and self._confirms:
            self._confirming = asyncio.get_running_loop().create_task(
                self._confirm_soon(), name="tierq-dispatch-confirm"
            )

    async def _confirm_soon(self) -> None:
        """The one task that confirms, while it lives: what comes in during a round trip goes
        in the next one."""
        try:
            await asyncio.sleep(CONFIRM_AFTER_S)
            while self._confirms:
                sent, self._confirms = self._confirms, {}
                await self._confirm(sent, [])
        finally:
            self._confirming = None

    async def _send_all(self, out: list[_Out], early: set[str], hold: str | None) -> list[Any]:
        """:meth:`_send` each: its message id, or the exception that failed it. One (the most
        common case: one release, one job) is sent from this task, not from a task of its own
        as ``gather`` would: its local run starts a loop turn sooner."""
        if len(out) != 1:
            return await asyncio.gather(
                *(self._send(o, early, hold) for o in out), return_exceptions=True
            )
        try:
            return [await self._send(out[0], early, hold)]
        except Exception as exc:  # as gather(return_exceptions=True) gives it
            return [exc]

    async def _send(self, o: _Out, early: set[str], hold: str | None = None) -> str:
        """Publish ``o``; its job starts here at once (added to ``early``) when local starts
        are on (:mod:`tierq.dispatch.local`): the run's first steps overlap the publish's
        round trip. Not the job ``hold`` (its submit, which takes it out if the publish fails:
        it starts once the publish answered). The run is traced under the publish, as its
        delivery would be."""
        data = o.data
        path = delivery_path(
            o.job_id,
            data["tier"],
            data["experience"],
            data["service"],
            self.settings.unified_share,
        )
        url = self.settings.public_url.rstrip("/") + path
        submitted = data.get("traceparent")
        with span(
            "tierq.publish",
            kind=SpanKind.PRODUCER,
            parent={"traceparent": submitted} if submitted else None,
            attributes={"tierq.job_id": o.job_id, "tierq.queue": data["queueId"]},
        ):
            traceparent = o.traceparent = current_traceparent() if submitted else None
            local = self.local
            linger = 0.0
            if (
                o.job_id != hold
                and local is not None
                and local.begin(o.job_id, o.body, data, traceparent)
            ):
                early.add(o.job_id)
                linger = PUBLISH_LINGER_S  # its run is going: only its end needs the answer
            return await self.gateway.publish_raw(
                data["queueId"], url, o.body, int(data["maxRetries"]), o.dedup_id,
                headers={"traceparent": traceparent} if traceparent else None, linger_s=linger,
            )  # fmt: skip

    # -- the safety net ----------------------------------------------------------------------

    def start(self) -> None:
        if self._reconciler is None or self._reconciler.done():
            self._reconciler = asyncio.create_task(self._reconcile(), name="tierq-dispatch")

    async def stop(self) -> None:
        """Stop the reconciler; let the confirming task finish (a few ms), so that every
        publish made is confirmed."""
        task, self._reconciler = self._reconciler, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._confirming is not None:
            await self._confirming

    async def _reconcile(self) -> None:
        every = self.settings.dispatch_reconcile_s
        loop = asyncio.get_running_loop()
        next_positions = next_sweep = loop.time()
        while True:
            await asyncio.sleep(every)
            try:
                await self.kick()
                await self.show_model_limits()
                if loop.time() >= next_positions:
                    next_positions = loop.time() + self.settings.waiting_update_s
                    await self.tell_positions()
                if loop.time() >= next_sweep:
                    next_sweep = loop.time() + self.settings.admission_sweep_s
                    await self.sweep_admission()
            except UpstreamError as exc:
                log.warning("dispatch.reconcile_failed", error=str(exc))
            raise_if_cancelled()  # stop() must end this loop, even through redis-py

    async def sweep_admission(self, *, force: bool = False) -> int:
        """Keep each queue's admission count equal to the jobs that exist unfinished: renew the
        admission lease (and the user's share) of every such job, drop the leases of jobs that
        ended or vanished. One process per ``admission_sweep_s`` (a Redis lock). Returns how
        many leases were dropped."""
        lock = f"{self.keys.sched}:sweeplock"
        ttl = ttl_ms(self.settings.admission_ttl_s)
        try:
            if not force and not await self.r.set(
                lock, "1", nx=True, px=ttl_ms(self.settings.admission_sweep_s)
            ):
                return 0
            seconds, micros = await self.r.time()
            expiry = seconds * 1000 + micros // 1000 + ttl
            dropped = 0
            for queue in self.settings.queues:
                dropped += await self._sweep_queue(queue.value, expiry, ttl + KEY_GRACE_MS)
                dropped += await self._sweep_shares(queue.value)
        except RedisError as exc:
            raise UpstreamError(f"redis: {exc}") from exc
        return dropped

    async def _sweep_queue(self, queue: str, expiry: int, key_ttl: int) -> int:
        admission = self.keys.admission(queue)
        members = [_s(m) for m in await self.r.zrange(admission, 0, -1)]
        dropped = 0
        for start in range(0, len(members), 500):
            chunk = members[start : start + 500]
            pipe = self.r.pipeline(transaction=False)
            for job_id in chunk:
                pipe.hmget(self.keys.job(job_id), *_SWEPT)
                pipe.hexists(f"{self.keys.sched}:jobs", job_id)
            replies = await pipe.execute()
            states = [
                (JobState.parse(dict(zip(_SWEPT, replies[i], strict=True))), replies[i + 1])
                for i in range(0, len(replies), 2)
            ]
            pipe = self.r.pipeline(transaction=False)
            for job_id, (state, in_dispatch) in zip(chunk, states, strict=True):
                user = state.user_id if state else None
                share = self.keys.user_pending(queue, user) if user else None
                stranded = self._never_parked(state, bool(in_dispatch))
                if stranded:
                    pipe.delete(self.keys.job(job_id), self.keys.job_events(job_id))
                    log.warning("dispatch.stranded_job_taken_back", job_id=job_id)
                if stranded or state is None or state.status is None or state.terminal:
                    dropped += 1
                    pipe.zrem(admission, job_id)
                    if share:
                        pipe.zrem(share, job_id)
                    continue
                pipe.zadd(admission, {job_id: expiry}, xx=True)
                if share:
                    pipe.zadd(share, {job_id: expiry}, xx=True)
                    pipe.pexpire(share, key_ttl)
            pipe.pexpire(admission, key_ttl)
            await pipe.execute()
        return dropped

    async def _sweep_shares(self, queue: str) -> int:
        """Drop users' shares held by jobs that have no record and no admission slot (a submit
        that failed or died between taking the share and recording the job)."""
        admission = self.keys.admission(queue)
        dropped = 0
        pattern = self.keys.user_pending(queue, "*")
        async for raw_key in self.r.scan_iter(match=pattern, count=500):
            key = _s(raw_key)
            members = [_s(m) for m in await self.r.zrange(key, 0, -1)]
            if not members:
                continue
            pipe = self.r.pipeline(transaction=False)
            for job_id in members:
                pipe.exists(self.keys.job(job_id))
                pipe.zscore(admission, job_id)
            found = await pipe.execute()
            orphans = [
                job_id
                for i, job_id in enumerate(members)
                if not found[2 * i] and found[2 * i + 1] is None
            ]
            if orphans:
                dropped += len(orphans)
                await self.r.zrem(key, *orphans)
        return dropped

    def _never_parked(self, state: JobState | None, in_dispatch: bool) -> bool:
        """A job recorded by a submit that died before parking it (its process was killed, or
        Redis failed in between): queued, never published, not parked or being published, and
        older than a publish may take. Nobody heard a 202 for it; it is taken back."""
        if state is None or state.status != "queued" or state.message_id is not None or in_dispatch:
            return False
        age_ms = time.time() * 1000 - (state.created_at or 0)
        return age_ms > ttl_ms(self.settings.dispatch_confirm_s) + 5000

    async def tell_positions(self, *, force: bool = False) -> int:
        """Send parked jobs whose position or hold changed meaningfully a new ``waiting`` event.
        One process does it per ``waiting_update_s`` (a Redis lock), so with any number of
        replicas a job hears at most one update per interval. Returns the events written."""
        lock = f"{self.keys.sched}:poslock"
        ttl = ttl_ms(self.settings.waiting_update_s)
        try:
            if not force and not await self.r.set(lock, "1", nx=True, px=ttl):
                return 0
        except RedisError as exc:
            raise UpstreamError(f"redis: {exc}") from exc
        rows = await self.call_script("positions", [POSITIONS_MAX, str(POSITION_RATIO)])
        moved = [
            Parked(_s(rows[i + 1]), int(rows[i + 2])).event(_s(rows[i]))
            for i in range(0, len(rows), 3)
        ]
        await asyncio.gather(*(self.jobs.append(e, if_queued=True) for e in moved))
        return len(moved)
