"""The broker's state in Redis: every change is one Lua script, so a crash never half-applies it.

Each public coroutine is one round trip unless its docstring says otherwise.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from tierq.broker.server.model import AttemptResponse, StoredMessage, event_base_json
from tierq.config import BrokerSettings
from tierq.errors import LimitExceeded, NotFound
from tierq.keys import BrokerKeys


def _s(value: Any) -> str:
    """Redis replies are bytes (the client does not decode: bodies are binary)."""
    return value.decode() if isinstance(value, bytes) else str(value)


_SCRIPTS = (
    "accept", "claim", "finish", "renew", "reclaim", "cancel", "queue_update", "queue_delete",
)  # fmt: skip


def _load_scripts(client: aioredis.Redis) -> dict[str, AsyncScript]:
    lua = resources.files("tierq.broker.server") / "lua"
    prelude = (lua / "_fill.lua").read_text()
    return {
        name: client.register_script(prelude + (lua / f"{name}.lua").read_text())
        for name in _SCRIPTS
    }


@dataclass
class Claimed:
    msg: StoredMessage
    body: bytes
    retried: int
    attempt: int  # which claim of the message this is: the owner of its lease


@dataclass
class FollowUpMessage:
    msg: StoredMessage
    body: bytes
    due_ms: int


@dataclass
class QueueInfo:
    name: str
    parallelism: int
    paused: bool
    created_at: int
    updated_at: int
    lag: int
    active: int

    def wire(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "createdAt": self.created_at,
            "updatedAt": self.updated_at,
            "parallelism": self.parallelism,
            "lag": self.lag,
            "paused": self.paused,
        }


@dataclass
class DlqEntry:
    dlq_id: str
    msg: StoredMessage
    body: bytes
    response: AttemptResponse
    retried: int
    time_ms: int


class BrokerStore:
    def __init__(self, client: aioredis.Redis, settings: BrokerSettings) -> None:
        self.r = client
        self.settings = settings
        self.keys = BrokerKeys(settings.key_prefix)
        self._scripts = _load_scripts(client)

    # -- messages ---------------------------------------------------------------------------

    def _queue_accept(
        self,
        msg: StoredMessage,
        body: bytes,
        due_ms: int,
        now_ms: int,
        consume_dlq: str | None,
        pipe: Any,
    ) -> None:
        """The accept script queued on ``pipe`` by sha (see :meth:`accept_many`)."""
        k = self.keys
        queue = msg.queue or ""
        dedup_ttl = int(self.settings.dedup_window_s * 1000) if msg.dedup_id else 0
        keys = [
            k.msg(msg.id),
            k.due,
            k.events,
            k.user_msgs(msg.user),
            k.dedup(msg.user, msg.dedup_id or ""),
            *k.queue_keys(msg.user, queue),
            k.queues(msg.user),
            k.dlq(msg.user),
            k.dlq_entry(msg.user, consume_dlq or ""),
        ]
        args: list[Any] = [
            msg.id,
            msg.model_dump_json(),
            body,
            msg.user,
            queue,
            due_ms,
            now_ms,
            dedup_ttl,
            event_base_json(msg),
            self.settings.events_max_len,
            msg.url,
            consume_dlq or "",
            self.settings.max_queues,
        ]
        pipe.evalsha(self._scripts["accept"].sha, len(keys), *keys, *args)

    async def accept_many(
        self,
        items: list[tuple[StoredMessage, bytes, int]],
        now_ms: int,
        consume_dlq: Sequence[str | None] | None = None,
    ) -> list[tuple[int, str]]:
        """Store messages in one round trip. Per item: (1, id) stored, (0, id) duplicate of id,
        (-1, dlq id) DLQ entry already gone, (-2, "") queue limit reached."""
        script = self._scripts["accept"]
        for attempt in (0, 1):
            # by sha: a pipeline of registered scripts asks Redis whether they exist first (one
            # more round trip per call); a Redis that forgot the script gets it again, and the
            # whole batch is sent again (nothing ran: every call failed alike)
            pipe = self.r.pipeline(transaction=False)
            for i, (msg, body, due_ms) in enumerate(items):
                dlq_id = consume_dlq[i] if consume_dlq else None
                self._queue_accept(msg, body, due_ms, now_ms, dlq_id, pipe)
            try:
                results = await pipe.execute()
            except NoScriptError:
                if attempt:
                    raise
                script.sha = await self.r.script_load(script.script)
                continue
            return [(int(code), raw.decode()) for code, raw in results]
        raise AssertionError("unreachable")

    async def claim(self, now_ms: int, limit: int, lease_ms: int) -> list[Claimed]:
        k = self.keys
        flat = await self._scripts["claim"](
            keys=[k.due, k.inflight, k.events],
            args=[now_ms, limit, lease_ms, k.msg_prefix, self.settings.events_max_len],
        )
        return [
            Claimed(
                StoredMessage.model_validate_json(flat[i + 1]),
                flat[i + 2],
                int(flat[i + 3]),
                int(flat[i + 4]),
            )
            for i in range(0, len(flat), 5)
        ]

    async def finish(
        self,
        claimed: Claimed,
        *,
        outcome: str,
        now_ms: int,
        next_due_ms: int = 0,
        events: list[str],
        response: AttemptResponse | None = None,
        dlq_id: str = "",
        followups: list[FollowUpMessage] | None = None,
    ) -> bool:
        """Apply an attempt's outcome; ``False`` when the attempt no longer held the lease.
        Idempotent: repeating a call whose reply was lost changes nothing."""
        msg, k = claimed.msg, self.keys
        queue = msg.queue or ""
        keys = [
            k.msg(msg.id),
            k.inflight,
            k.due,
            k.events,
            k.user_msgs(msg.user),
            *k.queue_keys(msg.user, queue),
            k.dlq(msg.user),
            k.dlq_entry(msg.user, dlq_id),
        ]
        args: list[Any] = [
            msg.id,
            outcome,
            now_ms,
            next_due_ms,
            self.settings.events_max_len,
            dlq_id,
            response.model_dump_json() if response else "",
            msg.user,
            claimed.attempt,
            len(events),
            *events,
        ]
        for f in followups or []:
            args += [
                k.msg(f.msg.id),
                f.msg.id,
                f.msg.model_dump_json(),
                f.body,
                f.msg.url,
                event_base_json(f.msg),
                f.due_ms,
            ]
        return bool(await self._scripts["finish"](keys=keys, args=args))

    async def renew(self, attempts: Sequence[tuple[str, int]], until_ms: int) -> int:
        """Extend the leases of these (message id, attempt) pairs where they still hold them;
        returns how many were renewed."""
        if not attempts:
            return 0
        args: list[Any] = [until_ms, self.keys.msg_prefix]
        for message_id, attempt in attempts:
            args += [message_id, attempt]
        return int(await self._scripts["renew"](keys=[self.keys.inflight], args=args))

    async def reclaim(self, cutoff_ms: int | None, now_ms: int) -> int:
        """Make in-flight messages due again: those whose lease ended, or all (``None``)."""
        cutoff = "+inf" if cutoff_ms is None else cutoff_ms
        k = self.keys
        return int(await self._scripts["reclaim"](keys=[k.inflight, k.due], args=[cutoff, now_ms]))

    async def next_due_ms(self) -> int | None:
        head = await self.r.zrange(self.keys.due, 0, 0, withscores=True)
        return int(head[0][1]) if head else None

    async def get_message(self, user: str, message_id: str) -> tuple[StoredMessage, bytes]:
        meta, body, owner = await self.r.hmget(self.keys.msg(message_id), ["m", "b", "u"])
        if meta is None or owner is None or _s(owner) != user:
            raise NotFound(f"message {message_id} not found")
        return StoredMessage.model_validate_json(meta), body if isinstance(body, bytes) else b""

    async def cancel(self, user: str, message_id: str, now_ms: int) -> int:
        """0 unknown, 1 cancelled, 2 cancel requested while in flight. Two round trips."""
        k = self.keys
        queue = await self.r.hget(k.msg(message_id), "q")
        keys = [
            k.msg(message_id),
            k.due,
            k.inflight,
            k.events,
            k.user_msgs(user),
            *k.queue_keys(user, _s(queue or b"")),
        ]
        args: list[Any] = [message_id, user, now_ms, self.settings.events_max_len]
        return int(await self._scripts["cancel"](keys=keys, args=args))

    async def user_message_ids(self, user: str) -> list[str]:
        return sorted(_s(m) for m in await self.r.smembers(self.keys.user_msgs(user)))

    # -- queues -----------------------------------------------------------------------------

    async def update_queue(
        self,
        user: str,
        name: str,
        *,
        now_ms: int,
        parallelism: int | None = None,
        paused: bool | None = None,
        create: bool,
    ) -> None:
        k = self.keys
        result = await self._scripts["queue_update"](
            keys=[*k.queue_keys(user, name), k.due, k.queues(user)],
            args=[
                name,
                "" if parallelism is None else parallelism,
                "" if paused is None else int(paused),
                now_ms,
                self.settings.max_queues,
                int(create),
            ],
        )
        if result == 0:
            raise NotFound(f"queue {name} not found")
        if result == -1:
            raise LimitExceeded(f"queue limit of {self.settings.max_queues} reached")

    async def get_queue(self, user: str, name: str) -> QueueInfo:
        infos = await self._queue_infos(user, [name])
        if not infos:
            raise NotFound(f"queue {name} not found")
        return infos[0]

    async def list_queues(self, user: str) -> list[QueueInfo]:
        names = sorted(_s(n) for n in await self.r.smembers(self.keys.queues(user)))
        return await self._queue_infos(user, names)

    async def _queue_infos(self, user: str, names: list[str]) -> list[QueueInfo]:
        pipe = self.r.pipeline(transaction=True)  # one consistent snapshot
        for name in names:
            key, pending, active = self.keys.queue_keys(user, name)
            pipe.hgetall(key)
            pipe.llen(pending)
            pipe.scard(active)
        raw = await pipe.execute()
        out = []
        for i, name in enumerate(names):
            h, lag, active = raw[3 * i], raw[3 * i + 1], raw[3 * i + 2]
            if not h:
                continue
            out.append(
                QueueInfo(
                    name=name,
                    parallelism=int(h[b"parallelism"]),
                    paused=h[b"paused"] == b"1",
                    created_at=int(h[b"createdAt"]),
                    updated_at=int(h[b"updatedAt"]),
                    lag=int(lag),
                    active=int(active),
                )
            )
        return out

    async def delete_queue(self, user: str, name: str, now_ms: int) -> None:
        k = self.keys
        done = await self._scripts["queue_delete"](
            keys=[*k.queue_keys(user, name), k.queues(user), k.events, k.user_msgs(user)],
            args=[name, now_ms, self.settings.events_max_len, k.msg_prefix],
        )
        if not done:
            raise NotFound(f"queue {name} not found")

    # -- DLQ --------------------------------------------------------------------------------

    @staticmethod
    def new_dlq_id(now_ms: int) -> str:
        return f"{now_ms}-{secrets.randbelow(10**9)}"

    async def dlq_ids(self, user: str) -> list[tuple[str, int]]:
        rows: list[Any] = await self.r.zrange(self.keys.dlq(user), 0, -1, withscores=True)
        return [(_s(m), int(score)) for m, score in rows]

    async def dlq_entries(self, user: str, ids: list[tuple[str, int]]) -> list[DlqEntry]:
        pipe = self.r.pipeline(transaction=False)
        for dlq_id, _ in ids:
            pipe.hmget(self.keys.dlq_entry(user, dlq_id), ["m", "b", "resp", "r"])
        out = []
        for (dlq_id, time_ms), (meta, body, resp, retried) in zip(
            ids, await pipe.execute(), strict=True
        ):
            if meta is None:
                continue
            out.append(
                DlqEntry(
                    dlq_id=dlq_id,
                    msg=StoredMessage.model_validate_json(meta),
                    body=body or b"",
                    response=AttemptResponse.model_validate_json(resp),
                    retried=int(retried or 0),
                    time_ms=time_ms,
                )
            )
        return out

    async def dlq_get(self, user: str, dlq_id: str) -> DlqEntry:
        score = await self.r.zscore(self.keys.dlq(user), dlq_id)
        entries = [] if score is None else await self.dlq_entries(user, [(dlq_id, int(score))])
        if not entries:
            raise NotFound(f"dlq message {dlq_id} not found")
        return entries[0]

    async def dlq_delete(self, user: str, dlq_ids: list[str]) -> int:
        pipe = self.r.pipeline(transaction=True)
        for dlq_id in dlq_ids:
            pipe.zrem(self.keys.dlq(user), dlq_id)
            pipe.delete(self.keys.dlq_entry(user, dlq_id))
        results = await pipe.execute()
        return sum(int(x) for x in results[0::2])

    # -- events -----------------------------------------------------------------------------

    async def events_page(self, start: str, count: int) -> list[tuple[str, dict[str, Any]]]:
        """Up to ``count`` log entries, newest first, from ``start`` (``+`` or ``(id``)."""
        rows: Any = await self.r.xrevrange(self.keys.events, max=start, min="-", count=count)
        return [(_s(rid), json.loads(fields[b"e"])) for rid, fields in rows]

    # -- signing keys -----------------------------------------------------------------------

    async def signing_keys(self) -> dict[str, tuple[str, str]]:
        raw: dict[Any, Any] = await self.r.hgetall(self.keys.signing_keys)
        out = {}
        for user, blob in raw.items():
            pair = json.loads(blob)
            out[_s(user)] = (pair["current"], pair["next"])
        return out

    async def save_signing_keys(self, user: str, current: str, nxt: str) -> None:
        blob = json.dumps({"current": current, "next": nxt})
        await self.r.hset(self.keys.signing_keys, user, blob)
