"""Issue 10, finding 1: an attempt's outcome survives a Redis outage during the delivery.

A Redis of its own (AOF on, restartable on the same port and data dir) is stopped while an
attempt is at the destination and started again once the attempt has ended. The outcome must
be recorded (or the message delivered again) within seconds of Redis's return — before the fix
the write failed once (``broker.finish_failed``) and the message held its queue slot for
``max_timeout_s`` + a grace (about 16 minutes).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from qstash import QStash

from brokers import DEV
from helpers import Destination, ServerThread, wait_until
from tierq.broker.server.app import create_broker_app
from tierq.broker.server.credentials import build_accounts
from tierq.config import BrokerSettings
from tierq.embedded_redis import EmbeddedRedis

OUTAGE_S = 2.0  # how long Redis stays down after the attempt ended (fault injection)
RECOVERY_S = 8.0  # "seconds, not minutes": the whole recovery must fit in this


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "redis", appendfsync="always")
    server.start()
    yield server
    server.stop()


def restart(server: EmbeddedRedis) -> None:
    """Start the stopped server again on the same port, from its AOF."""
    server.start()


def start_broker(redis_url: str, **overrides: object) -> tuple[ServerThread, QStash]:
    settings = BrokerSettings(key_prefix="blip", poll_interval_s=0.2, **overrides)  # type: ignore[arg-type]
    accounts = build_accounts(dev_accounts=True, token=None, current_key=None, next_key=None)
    thread = ServerThread(create_broker_app(settings, redis_url, accounts)).start()
    return thread, QStash(DEV.token, base_url=thread.url, retry=False)


def ids(destination: Destination, path: str) -> list[str]:
    return [r.headers["upstash-message-id"] for r in destination.requests(path)]


def stop_redis_while_attempt_ends(
    own_redis: EmbeddedRedis, destination: Destination, qstash: QStash, path: str
) -> tuple[str, str]:
    """Enqueue a held message and one behind it (parallelism 1); stop Redis while the first
    is at the destination, let its attempt end, keep Redis down a while, start it again."""
    held, after = path + "-held", path + "-after"
    destination.script(held, (200, {}, b"ok"), hold=True)
    qstash.queue.upsert("blip-q", parallelism=1)
    first = qstash.message.enqueue(queue="blip-q", url=destination.url + held, body="1")
    second = qstash.message.enqueue(queue="blip-q", url=destination.url + after, body="2")
    wait_until(lambda: destination.requests(held))
    own_redis.stop()
    destination.release(held)  # the attempt ends (200) while its outcome cannot be written
    time.sleep(OUTAGE_S)  # fault injection: Redis stays down, not a synchronisation
    restart(own_redis)
    return first.message_id, second.message_id


@pytest.mark.timeout(60)
def test_outcome_written_once_redis_returns(
    own_redis: EmbeddedRedis, destination: Destination, path: str
) -> None:
    thread, qstash = start_broker(own_redis.url)
    try:
        first, second = stop_redis_while_attempt_ends(own_redis, destination, qstash, path)
        back = time.monotonic()
        wait_until(lambda: ids(destination, path + "-after") == [second], timeout=RECOVERY_S)
        assert time.monotonic() - back < RECOVERY_S
        # The retried write recorded the 200: the first message was not delivered again.
        assert ids(destination, path + "-held") == [first]
        wait_until(lambda: qstash.queue.get("blip-q").lag == 0)
        states = [e.state.value for e in qstash.log.list(filter={"message_id": first}).logs]
        assert states.count("DELIVERED") == 1
        assert qstash.dlq.list().messages == []
    finally:
        qstash.http._client.close()  # type: ignore[attr-defined]
        thread.stop()


@pytest.mark.timeout(60)
def test_unrecorded_attempt_delivered_again_when_its_lease_lapses(
    own_redis: EmbeddedRedis, destination: Destination, path: str
) -> None:
    """The outcome write gives up during the outage (the broker lost track of the attempt):
    the attempt's lease is no longer renewed, lapses, and the message is delivered again."""
    thread, qstash = start_broker(own_redis.url, finish_retry_s=0.2, attempt_lease_s=2.0)
    try:
        first, second = stop_redis_while_attempt_ends(own_redis, destination, qstash, path)
        back = time.monotonic()
        wait_until(lambda: ids(destination, path + "-after") == [second], timeout=RECOVERY_S)
        assert time.monotonic() - back < RECOVERY_S
        assert ids(destination, path + "-held") == [first, first]  # at-least-once
        wait_until(lambda: qstash.queue.get("blip-q").lag == 0)
        assert qstash.dlq.list().messages == []
    finally:
        qstash.http._client.close()  # type: ignore[attr-defined]
        thread.stop()
