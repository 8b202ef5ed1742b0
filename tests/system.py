"""The whole system for end-to-end tests: broker + app on real HTTP, one real Redis."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import redis
from redis.cluster import RedisCluster

from helpers import ServerThread
from tierq.app import create_app
from tierq.broker.server.app import create_broker_app
from tierq.broker.server.credentials import DEV_ACCOUNTS, build_accounts
from tierq.config import BrokerSettings, Settings
from tierq.embedded_redis import free_port
from tierq.keys import AppKeys
from tierq.runtime import Runtime

DEV = DEV_ACCOUNTS[0]
PAID = "tq_dev_paid"
FREE = "tq_dev_free"
_ids = itertools.count()


def sample(text: str, name: str, labels: str = "") -> float:
    """One sample of a Prometheus text exposition (0 when absent)."""
    match = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


@dataclass
class SseEvent:
    id: str
    event: str
    data: dict[str, Any]


def job_body(**job: Any) -> dict[str, Any]:
    """A submit's body: a streamed chat job on the simulated model, ``job`` overriding."""
    body: dict[str, Any] = {
        "service": "chat",
        "experience": "stream",
        "mode": "auto",
        "model": "sim",
        "input": {"prompt": "hello world"},
    }
    body.update(job)
    return body


@dataclass
class System:
    settings: Settings
    app: ServerThread
    broker: ServerThread
    redis: redis.Redis
    http: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.http = httpx.Client(base_url=self.app.url, timeout=30)

    @property
    def runtime(self) -> Runtime:
        """The app's runtime (the app runs in this process, in a thread of its own)."""
        rt: Runtime = self.app.server.config.app.state.runtime
        return rt

    @property
    def keys(self) -> AppKeys:
        return AppKeys(self.settings.key_prefix)

    def close(self) -> None:
        self.http.close()
        self.app.stop()
        self.broker.stop()
        self.redis.close()

    def submit(self, key: str = PAID, **job: Any) -> httpx.Response:
        return self.http.post(
            "/api/jobs", json=job_body(**job), headers={"Authorization": f"Bearer {key}"}
        )

    def job(self, job_id: str, key: str = PAID) -> dict[str, Any]:
        res = self.http.get(f"/api/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"})
        res.raise_for_status()
        data: dict[str, Any] = res.json()
        return data

    def events(
        self, job_id: str, token: str, last_event_id: str | None = None, limit: int | None = None
    ) -> list[SseEvent]:
        """Read the job's SSE stream until it ends (or ``limit`` events arrived)."""
        return list(itertools.islice(self.iter_events(job_id, token, last_event_id), limit))

    def iter_events(
        self, job_id: str, token: str, last_event_id: str | None = None
    ) -> Iterator[SseEvent]:
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        url = f"/api/jobs/{job_id}/events?token={token}"
        with self.http.stream("GET", url, headers=headers) as res:
            res.raise_for_status()
            current: dict[str, str] = {}
            for line in res.iter_lines():
                if not line:
                    if "data" in current:
                        yield SseEvent(current.get("id", ""), current.get("event", ""),
                                       json.loads(current["data"]))  # fmt: skip
                    current = {}
                    continue
                name, _, value = line.partition(":")
                if name:  # comment lines (pings) have no name
                    current[name] = value[1:] if value.startswith(" ") else value

    def log_events(self, job_id: str) -> list[dict[str, Any]]:
        """The job's event log as Redis holds it."""
        rows = self.redis.xrange(self.keys.job_events(job_id))
        return [json.loads(fields[b"e"]) for _, fields in rows]

    def metric(self, name: str, labels: str = "") -> float:
        """One sample of the app's /metrics (0 when absent)."""
        return sample(self.http.get("/metrics").text, name, labels)

    def xread_clients(self) -> set[str]:
        """Ids of the Redis connections whose current (or last) command is XREAD."""
        return {c["id"] for c in self.redis.client_list() if c.get("cmd") == "xread"}

    def slot_count(self, key: str) -> int:
        return int(self.redis.zcard(key))


def start_system(
    redis_url: str, *, prefix: str | None = None, app_redis_url: str | None = None, **overrides: Any
) -> System:
    """Broker and app (the dev defaults, ``overrides`` on top) on ``redis_url``, or the app on
    ``app_redis_url`` (a cluster's, with ``redis_cluster=True``); the app's keys under
    ``prefix``, the broker's under ``prefix`` + ``b`` (default: a prefix of its own)."""
    prefix = prefix or f"e2e{next(_ids)}"
    broker_settings = BrokerSettings(key_prefix=f"{prefix}b", poll_interval_s=0.2)
    accounts = build_accounts(dev_accounts=True, token=None, current_key=None, next_key=None)
    broker = ServerThread(create_broker_app(broker_settings, redis_url, accounts)).start()
    port = free_port()
    settings = (
        Settings(
            redis_url=app_redis_url or redis_url,
            key_prefix=prefix,
            public_url=f"http://127.0.0.1:{port}",
            qstash_url=broker.url,
            qstash_token=DEV.token,
            qstash_current_signing_key=DEV.current_key,
            qstash_next_signing_key=DEV.next_key,
            qstash_retry_delay="200",
            sse_ping_s=1,
            redis_client_name=f"tierq-{prefix}",  # this system's connections, in CLIENT LIST
        )
        .with_dev_defaults()
        .model_copy(update=overrides)
    )
    app = ServerThread(create_app(settings), port=port).start()
    url = settings.redis_url or ""
    client: Any = (
        RedisCluster.from_url(url) if settings.redis_cluster else redis.Redis.from_url(url)
    )
    return System(settings, app, broker, client)
