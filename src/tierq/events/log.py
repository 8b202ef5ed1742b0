"""A job's state record and append-only event log (a Redis Stream), changed only by scripts.

Every event gets its ``seq`` inside the script that appends it, so sequence numbers are dense
and ordered even with several writers; the log entry id is what SSE sends as ``id``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from tierq.contracts import Waiting, WorkerEvent, is_terminal
from tierq.errors import UpstreamError
from tierq.events.state import JobState
from tierq.keys import AppKeys


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def event_prefix(event: WorkerEvent) -> str:
    """The event as JSON without ``seq`` and without its closing brace (the script adds both)."""
    return event.model_dump_json(by_alias=True, exclude={"seq"})[:-1]


@dataclass(frozen=True)
class Appended:
    entry_id: str
    seq: int


def _waiting_held() -> str:
    """The end of a ``waiting`` event's JSON prefix that ``admit_record.lua`` writes itself (what
    holds the job, its position); checked once: the model must serialise them last."""
    held = ',"guard":"queue","position":0'
    sample = event_prefix(Waiting(jobId="j", ts=0, guard="queue", position=0))
    if not sample.endswith(held):
        raise RuntimeError(f"a waiting event ends otherwise than admit_record.lua writes: {sample}")
    return held


_WAITING_HELD = _waiting_held()


def _flatten(fields: dict[str, str] | None) -> list[str]:
    return [x for pair in (fields or {}).items() for x in pair]


class JobStore:
    """State and events of jobs. Each method is one Redis round trip."""

    def __init__(
        self,
        client: aioredis.Redis,
        keys: AppKeys,
        retention_s: float,
    ) -> None:
        self.r = client
        self.keys = keys
        self.retention_ms = int(retention_s * 1000)
        lua = resources.files("tierq.events") / "lua"
        self._scripts: dict[str, AsyncScript] = {
            name: client.register_script((lua / f"{name}.lua").read_text())
            for name in ("create", "append", "cancel", "append_deltas", "set_if_exists")
        }

    def scripts(self) -> list[AsyncScript]:
        return list(self._scripts.values())

    def _job_keys(self, job_id: str) -> list[str]:
        return [self.keys.job(job_id), self.keys.job_events(job_id)]

    def record_args(
        self, job_id: str, fields: dict[str, str], first: WorkerEvent, ts: int
    ) -> list[str]:
        """How the dispatcher's ``admit_record`` script writes what :meth:`create` writes (the
        ``waiting`` event, at ``ts``, when the job is parked): the job's keys, its first event,
        the ``waiting`` event up to what holds the job (the script adds that and its position),
        the record's fields."""
        waiting = event_prefix(Waiting(jobId=job_id, ts=ts, guard="queue", position=0))
        return [
            *self._job_keys(job_id),
            event_prefix(first),
            waiting[: -len(_WAITING_HELD)],
            *_flatten(fields),
        ]

    async def create(
        self,
        job_id: str,
        fields: dict[str, str],
        first: WorkerEvent,
        then: WorkerEvent | None = None,
    ) -> bool:
        """Create the job with its first event (and ``then`` after it, in the same call);
        ``False`` when it already exists."""
        second = event_prefix(then) if then is not None else ""
        try:
            result = await self._scripts["create"](
                keys=self._job_keys(job_id), args=[event_prefix(first), second, *_flatten(fields)]
            )
        except RedisError as exc:
            raise UpstreamError(f"redis: {exc}") from exc
        return bool(result)

    async def append(
        self,
        event: WorkerEvent,
        *,
        status: str | None = None,
        fields: dict[str, str] | None = None,
        revive: bool = False,
        if_queued: bool = False,
    ) -> Appended | None:
        """Log ``event`` (and set the status/fields); ``None`` when the job is gone or already
        terminal — the caller must then stop working on it — or, with ``if_queued``, when the
        job is not queued any more."""
        mode = "revive" if revive else ("queued" if if_queued else "")
        appended = await self._append(event, status, fields, mode)
        return appended if isinstance(appended, Appended) else None

    async def start(
        self,
        event: WorkerEvent,
        runs: int,
        fields: dict[str, str],
        *,
        revive: bool = False,
        fresh: bool = False,
    ) -> Appended | str:
        """Log the ``started`` of run ``runs + 1`` (status ``running``), only while the job has
        had exactly ``runs`` runs; otherwise why not: ``taken`` (another delivery started this
        run first), ``missing``, or the terminal status. ``fresh`` (the caller did not read the
        job): also not when its cancel was requested (``cancel_requested``)."""
        mode = ("revive-" if revive else "") + ("fresh-" if fresh else "") + f"start:{runs}"
        return await self._append(event, "running", fields, mode)

    def _append_args(
        self, event: WorkerEvent, status: str | None, fields: dict[str, str] | None, mode: str
    ) -> list[str | int]:
        terminal = is_terminal(event)
        return [
            event_prefix(event),
            status or "",
            "1" if terminal else "0",
            self.retention_ms,
            mode,
            *_flatten(fields),
        ]

    async def _append(
        self, event: WorkerEvent, status: str | None, fields: dict[str, str] | None, mode: str
    ) -> Appended | str:
        try:
            reply = await self._scripts["append"](
                keys=self._job_keys(event.job_id),
                args=self._append_args(event, status, fields, mode),
            )
        except RedisError as exc:
            raise UpstreamError(f"redis: {exc}") from exc
        return appended(reply)

    def queue_append(
        self,
        pipe: Any,
        event: WorkerEvent,
        *,
        status: str | None = None,
        fields: dict[str, str] | None = None,
    ) -> None:
        """:meth:`append` queued on a pipeline (by sha; the script must be loaded); its reply
        reads with :func:`appended`."""
        args = self._append_args(event, status, fields, "")
        pipe.evalsha(self._scripts["append"].sha, 2, *self._job_keys(event.job_id), *args)

    async def append_deltas(self, items: Sequence[tuple[str, bytes]]) -> list[Written]:
        """Append one ``delta`` event per job (``(job id, delta_prefix(...))``) in one round
        trip and one script call: what one flush tick of the process writes. Each result is
        ``(seq, entry id)`` of the event, or ``None`` when the job was gone or terminal.

        One call for many jobs' keys needs them on one Redis node (a single server, as today;
        under Redis Cluster the call must be split by hash slot)."""
        keys = [key for job_id, _ in items for key in self._job_keys(job_id)]
        try:
            seqs: list[Any] = await self._scripts["append_deltas"](
                keys=keys, args=[prefix for _, prefix in items]
            )
        except RedisError as exc:
            raise UpstreamError(f"redis: {exc}") from exc
        return [written(reply) for reply in seqs]

    async def request_cancel(self, event: WorkerEvent, channel: str, now_ms: int) -> str:
        """``cancelled`` (it was queued), ``requested`` (its worker will stop it), ``missing``,
        or the terminal status it already had."""
        try:
            result = await self._scripts["cancel"](
                keys=self._job_keys(event.job_id),
                args=[event_prefix(event), self.retention_ms, channel, event.job_id, now_ms],
            )
        except RedisError as exc:
            raise UpstreamError(f"redis: {exc}") from exc
        return _s(result)

    async def state(self, job_id: str) -> JobState | None:
        """The job's record, parsed; ``None`` when the job is gone (or never was)."""
        raw: dict[Any, Any] = await self.r.hgetall(self.keys.job(job_id))
        return JobState.parse(raw)

    async def set_fields(self, job_id: str, fields: dict[str, str]) -> None:
        await self.r.hset(self.keys.job(job_id), mapping=fields)  # type: ignore[arg-type]

    async def set_if_exists(self, job_id: str, fields: dict[str, str]) -> bool:
        """Set ``fields`` on the job's record unless it is gone (then ``False``)."""
        try:
            done = await self._scripts["set_if_exists"](
                keys=[self.keys.job(job_id)], args=_flatten(fields)
            )
        except RedisError as exc:
            raise UpstreamError(f"redis: {exc}") from exc
        return bool(done)

    def queue_set_if_exists(self, pipe: Any, job_id: str, fields: dict[str, str]) -> None:
        """:meth:`set_if_exists` queued on a pipeline (by sha; the script must be loaded)."""
        pipe.evalsha(
            self._scripts["set_if_exists"].sha, 1, self.keys.job(job_id), *_flatten(fields)
        )

    async def delete(self, job_id: str) -> None:
        await self.r.delete(*self._job_keys(job_id))

    async def last(self, job_id: str) -> tuple[str, str] | None:
        """The job's last log entry (id, event JSON); ``None`` when the log is empty or gone."""
        rows: Any = await self.r.xrevrange(self.keys.job_events(job_id), count=1)
        if not rows:
            return None
        entry_id, fields = rows[0]
        return _s(entry_id), _s(fields[b"e"] if b"e" in fields else fields["e"])

    async def read(
        self, job_id: str, after: str | None, count: int = 500, *, until: str | None = None
    ) -> list[tuple[str, str]]:
        """Log entries after ``after`` (exclusive; ``None`` = from the start), up to ``until``
        (inclusive; ``None`` = the end)."""
        start = f"({after}" if after and after != "0-0" else "-"
        rows: Any = await self.r.xrange(
            self.keys.job_events(job_id), min=start, max=until or "+", count=count
        )
        return [(_s(i), _s(f[b"e"] if b"e" in f else f["e"])) for i, f in rows]


Written = tuple[int, str] | None
"""A delta the flush script wrote: ``(seq, log entry id)``; ``None``: skipped (job gone or
ended)."""


def written(reply: Any) -> Written:
    """One job's part of the ``append_deltas`` script's reply."""
    if isinstance(reply, (list, tuple)):
        return int(reply[0]), _s(reply[1])
    return None


def appended(reply: Any) -> Appended | str:
    """The append script's reply: where the event went, or why it was not appended."""
    entry, second = reply
    return Appended(_s(entry), int(second)) if _s(entry) else _s(second)
