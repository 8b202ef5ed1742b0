"""Every Redis key pattern tierq uses, and its lifetime, in one place.

No other module builds a key string. The broker's keys live under their own prefix (``tqb`` by
default) so several brokers, or a broker and its tests, can share one Redis without touching each
other's state.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass


@dataclass(frozen=True)
class BrokerKeys:
    """Keys of the embedded QStash broker. The broker needs a single Redis node (not Cluster):
    its scripts touch message, queue and schedule keys together.

    - ``due``: zset message id → ms when it may be attempted (ready or waiting to retry)
    - ``inflight``: zset message id → ms when its delivery lease expires
    - ``msg(id)``: hash ``m`` (JSON), ``b`` (body), ``r`` (retries so far), ``u`` (user),
      ``q`` (queue or ""), ``url``, ``c`` ("1" once a cancel was requested); deleted when done
    - ``user_msgs(user)``: set of that user's live message ids
    - ``events``: stream of log events (``e`` = JSON), trimmed to a maximum length
    - ``dedup(user, key)``: string message id, expires after the deduplication window
    - ``queues(user)``: set of queue names; ``queue``: hash name/parallelism/paused/createdAt/
      updatedAt; ``queue_pending``: list (FIFO) of ids not started; ``queue_active``: set of ids
      started and not finished (their retries included), never larger than parallelism
    - ``dlq(user)``: zset dlq id → ms; ``dlq_entry(user, id)``: hash ``m``, ``b``, ``resp``
    - ``signing_keys``: hash user → JSON ``{"current", "next"}``
    - ``seq``: counter for DLQ ids
    """

    prefix: str = "tqb"

    @property
    def due(self) -> str:
        return f"{self.prefix}:due"

    @property
    def inflight(self) -> str:
        return f"{self.prefix}:inflight"

    @property
    def msg_prefix(self) -> str:
        return f"{self.prefix}:msg:"

    def msg(self, message_id: str) -> str:
        return self.msg_prefix + message_id

    def user_msgs(self, user: str) -> str:
        return f"{self.prefix}:u:{user}:msgs"

    @property
    def events(self) -> str:
        return f"{self.prefix}:events"

    def dedup(self, user: str, key: str) -> str:
        return f"{self.prefix}:u:{user}:dedup:{key}"

    def queues(self, user: str) -> str:
        return f"{self.prefix}:u:{user}:queues"

    def queue(self, user: str, name: str) -> str:
        return f"{self.prefix}:u:{user}:q:{name}"

    def queue_pending(self, user: str, name: str) -> str:
        return f"{self.prefix}:u:{user}:q:{name}:pending"

    def queue_active(self, user: str, name: str) -> str:
        return f"{self.prefix}:u:{user}:q:{name}:active"

    def queue_keys(self, user: str, name: str) -> list[str]:
        return [
            self.queue(user, name),
            self.queue_pending(user, name),
            self.queue_active(user, name),
        ]

    def dlq(self, user: str) -> str:
        return f"{self.prefix}:u:{user}:dlq"

    def dlq_entry(self, user: str, dlq_id: str) -> str:
        return f"{self.prefix}:u:{user}:dlq:{dlq_id}"

    @property
    def signing_keys(self) -> str:
        return f"{self.prefix}:signing-keys"

    @property
    def seq(self) -> str:
        return f"{self.prefix}:seq"


@dataclass(frozen=True)
class AppKeys:
    """Keys of the tierq app. Job keys share a hash tag (``{job id}``; on Redis Cluster one of
    ``job_tags`` shared ones), so the scripts that touch a job's state and its event log
    together also work on Redis Cluster; every guard is one key.

    - ``job(id)``: hash, the job's state record (status, owner, queue, result, …); expires
      ``event_retention_s`` after the terminal event
    - ``job_events(id)``: stream, the job's append-only event log; same expiry
    - ``admission(queue)``: zset job id → lease expiry ms (producer backpressure), under
      ``sched``: a submit admits and parks a job in one script
    - ``user_pending(queue, user)``: zset job id → lease expiry ms: the user's share of the
      queue's admission (taken and given back with the admission lease), under ``sched``
    - ``sched``: the prefix of the fair dispatcher's keys, one hash tag for all of them (its
      scripts touch a queue's lines, the guards and the job's lease together; on Redis Cluster
      they all live in one slot). Under it (names built by ``dispatch/lua/_lib.lua`` too):
      ``guard:model:<model>:<tier>``, ``guard:user:<user>`` and ``slots:<queue>`` (zsets job id →
      lease expiry ms: running or dispatched jobs per model+tier, per user, per queue);
      ``parked:<queue>:<user>`` (list, FIFO: the user's parked jobs in that queue);
      ``rr:<queue>`` (list: the users of the queue in round-robin order); ``credit:<queue>`` and
      ``uconf:<queue>`` (hashes user → turns left, user → "limit\tweight\t");
      ``pusers:<queue>`` (zset user → parked jobs); ``parked`` (hash queue → parked jobs);
      ``active`` (set of queues with parked jobs); ``meta``/``body`` (hashes job id → what
      dispatch needs / the worker body, while parked or being published); ``dispatching``
      (zset job id → ms by which its publish must be confirmed); ``queue:<queue>`` (hash
      ``paused``/``parallelism`` set by operators, over the configuration)
    - ``model_guard(model, tier)``, ``user_guard(user)``: the guards, under ``sched``
    - ``cancel_channel``: pub/sub channel; a message is a job id whose run must stop now
    - ``tail_wake``: stream per app process (on Redis Cluster, per hash slot it follows:
      ``<tail_wake>:<process>:{<tag>}``), written to wake its blocked tail-hub ``XREAD``
    Guard keys get a TTL on every write, so an idle guard disappears instead of lingering.
    """

    prefix: str = "tq"
    job_tags: int = 0
    """0 (one Redis node): a job's keys are tagged with its id, ``tq:job:{<id>}``. N > 0 (Redis
    Cluster): jobs share N hash tags, ``tq:job:{j<crc32(id) % N>}:<id>``, so that the tail hub
    (one blocking ``XREAD`` per slot: Cluster refuses one across slots) and the delta writer
    (one script call per slot) need at most N of them per process, however many jobs."""

    def job_tag(self, job_id: str) -> str:
        """The hash tag of ``job_id``'s keys (without braces)."""
        return f"j{zlib.crc32(job_id.encode()) % self.job_tags}" if self.job_tags else job_id

    def job(self, job_id: str) -> str:
        if self.job_tags:
            return f"{self.prefix}:job:{{{self.job_tag(job_id)}}}:{job_id}"
        return f"{self.prefix}:job:{{{job_id}}}"

    def job_events(self, job_id: str) -> str:
        return f"{self.job(job_id)}:events"

    def admission(self, queue_id: str) -> str:
        return f"{self.sched}:admission:{queue_id}"

    @property
    def sched(self) -> str:
        return f"{self.prefix}:{{sched}}"

    def model_guard(self, model_id: str, tier: str) -> str:
        return f"{self.sched}:guard:model:{model_id}:{tier}"

    def user_guard(self, user_id: str) -> str:
        return f"{self.sched}:guard:user:{user_id}"

    @property
    def user_guard_pattern(self) -> str:
        return f"{self.sched}:guard:user:*"

    def queue_slots(self, queue_id: str) -> str:
        return f"{self.sched}:slots:{queue_id}"

    def parked(self, queue_id: str, user_id: str) -> str:
        return f"{self.sched}:parked:{queue_id}:{user_id}"

    def parked_users(self, queue_id: str) -> str:
        return f"{self.sched}:pusers:{queue_id}"

    @property
    def parked_counts(self) -> str:
        return f"{self.sched}:parked"

    def queue_state(self, queue_id: str) -> str:
        return f"{self.sched}:queue:{queue_id}"

    @property
    def dispatching(self) -> str:
        return f"{self.sched}:dispatching"

    def user_pending(self, queue_id: str, user_id: str) -> str:
        return f"{self.sched}:pending:{queue_id}:{user_id}"

    @property
    def cancel_channel(self) -> str:
        return f"{self.prefix}:cancel"

    @property
    def tail_wake(self) -> str:
        """Prefix of each process's tail-hub wake-up stream (a random suffix per process;
        capped at a few entries, expires an hour after its last use)."""
        return f"{self.prefix}:tailwake"
