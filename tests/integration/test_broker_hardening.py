"""Issue 10: the broker under hostile input and beyond a laptop (findings 2, 3, 5).

Driven through the official qstash SDK against real HTTP; raw httpx only for exact wire
bodies and for requests the SDK cannot make (nested JSON, oversize bodies).
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from qstash import QStash
from qstash.errors import QStashError

from brokers import DEV, Broker, start_broker
from helpers import Destination, ServerThread, wait_until
from tierq.broker.server.app import create_broker_app
from tierq.broker.server.credentials import build_accounts
from tierq.broker.server.model import StoredMessage
from tierq.broker.server.store import BrokerStore
from tierq.config import BrokerSettings

FAST_RETRY = "100"


def call(broker: Broker, method: str, url: str, **kwargs: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {DEV.token}", **kwargs.pop("headers", {})}
    with httpx.Client(base_url=broker.url, timeout=30) as client:
        return client.request(method, url, headers=headers, **kwargs)


def error_of(response: httpx.Response, status: int) -> str:
    """Assert ``status`` and QStash's error shape ``{"error": "..."}``; return the message."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    return str(body["error"])


@pytest.fixture
def open_broker(redis_url: str) -> Iterator[Broker]:
    """A broker that may deliver anywhere, with private response bodies in callbacks."""
    b = start_broker(redis_url, allowed_destinations=["*"], callback_private_bodies=True)
    yield b
    b.close_clients()
    b.thread.stop()


# -- finding 2: invalid destinations -----------------------------------------------------------

BAD_URLS = ["http://[::1", "http://a%00b/", "http://xn--/", "http://a b/", "http://h:0/x"]


@pytest.mark.parametrize("bad", BAD_URLS)
def test_invalid_destination_rejected_at_publish(
    open_broker: Broker, destination: Destination, path: str, bad: str
) -> None:
    path = re.sub(r"[^A-Za-z0-9/_-]", "_", path)  # the test id carries the bad URL
    qstash = open_broker.client()
    qstash.queue.upsert("qq", parallelism=1)
    for route in ("/v2/publish/", "/v2/enqueue/qq/"):
        message = error_of(call(open_broker, "POST", route + bad, content="x"), 400)
        assert message.startswith("invalid destination url"), message
    with pytest.raises(QStashError, match="400"):
        qstash.message.enqueue(queue="qq", url=bad, body="x")
    reply = call(open_broker, "POST", "/v2/batch", json=[{"destination": bad, "body": "x"}])
    assert error_of(reply, 400).startswith("invalid destination url")
    ok_url = destination.url + "/ok"
    message = error_of(
        call(open_broker, "POST", "/v2/publish/" + ok_url, headers={"Upstash-Callback": bad}), 400
    )
    assert "Upstash-Callback" in message
    # Nothing was stored: the queue is not blocked.
    good = qstash.message.enqueue(queue="qq", url=destination.url + path, body="next")
    [req] = wait_until(lambda: destination.requests(path))
    assert req.headers["upstash-message-id"] == good.message_id


def test_delivery_that_raises_is_a_failed_attempt(
    open_broker: Broker, redis_url: str, destination: Destination, path: str
) -> None:
    """A stored URL the HTTP client refuses (httpx.InvalidURL: written by an older broker, or
    any bug) ends its attempt like a refused connection: status 0, retry/DLQ path, the queue
    moves on. Before, the exception ended the delivery task unseen and the message stayed in
    flight, blocking its queue."""
    qstash = open_broker.client()
    qstash.queue.upsert("qq", parallelism=1)
    qstash.queue.pause("qq")
    now = int(time.time() * 1000)
    bad = StoredMessage(
        id="msg_bad_url", user="defaultUser", url="http://[::1", queue="qq", max_retries=1,
        retry_delay=FAST_RETRY, created_at_ms=now, not_before_ms=now,
    )  # fmt: skip

    async def store_directly() -> None:
        client = aioredis.Redis.from_url(redis_url)
        try:
            await BrokerStore(client, open_broker.settings).accept_many([(bad, b"x", now)], now)
        finally:
            await client.aclose()

    asyncio.run(store_directly())
    good = qstash.message.enqueue(queue="qq", url=destination.url + path, body="next")
    qstash.queue.resume("qq")
    [req] = wait_until(lambda: destination.requests(path))
    assert req.headers["upstash-message-id"] == good.message_id
    [dead] = qstash.dlq.list().messages
    assert dead.message_id == bad.id
    assert dead.response_status == 0
    states = [e.state.value for e in qstash.log.list(filter={"message_id": bad.id}).logs]
    assert states.count("ERROR") == 1  # the first attempt, then its one retry failed too
    assert "FAILED" in states


# -- finding 3: hostile bodies -----------------------------------------------------------------

JSON_ROUTES = [
    ("POST", "/v2/batch"),
    ("DELETE", "/v2/dlq"),
    ("DELETE", "/v2/messages"),
    ("POST", "/v2/dlq/retry"),
    ("POST", "/v2/queues"),
]


@pytest.mark.parametrize(("method", "route"), JSON_ROUTES)
@pytest.mark.parametrize("depth", [40, 100_000])
def test_deeply_nested_json_is_400(broker: Broker, method: str, route: str, depth: int) -> None:
    nested = "[" * depth + "]" * depth
    message = error_of(call(broker, method, route, content=nested), 400)
    assert "deeper than" in message
    wrapped = '{"messageIds": ' + nested + ', "dlqIds": ' + nested + "}"
    error_of(call(broker, method, route, content=wrapped), 400)


def test_batch_message_count_is_bounded(broker: Broker, destination: Destination) -> None:
    qstash = broker.client()
    qstash.queue.upsert("held", parallelism=1, paused=True)  # nothing is delivered
    limit = broker.settings.max_batch_messages
    assert limit == 1000
    item = {"url": destination.url + "/never", "body": "x", "queue": "held"}
    assert len(qstash.message.batch([item] * limit)) == limit
    with pytest.raises(QStashError, match="400"):
        qstash.message.batch([item] * (limit + 1))
    assert qstash.queue.get("held").lag == limit


def test_request_bodies_are_bounded(redis_url: str, destination: Destination) -> None:
    small = start_broker(redis_url, max_request_bytes=4096, max_body_bytes=1024)
    try:
        item = {"destination": destination.url + "/never", "body": "x" * 100}
        message = error_of(call(small, "POST", "/v2/batch", json=[item] * 60), 413)
        assert "4096" in message
        error_of(call(small, "POST", "/v2/publish/" + destination.url, content=b"x" * 1025), 413)

        def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while reading
            yield from [b"y" * 512] * 4

        error_of(call(small, "POST", "/v2/publish/" + destination.url, content=chunks()), 413)
        error_of(call(small, "DELETE", "/v2/messages", json={"messageIds": ["m" * 2000]}), 413)
    finally:
        small.thread.stop()


# -- finding 5: allowed destinations, callbacks --------------------------------------------------


def test_default_allows_only_this_machine(
    broker: Broker, destination: Destination, path: str
) -> None:
    qstash = broker.client()
    for url in ("http://10.1.2.3/x", "https://example.com/hook", "http://169.254.169.254/"):
        message = error_of(call(broker, "POST", "/v2/publish/" + url, content="x"), 400)
        assert "allowed destinations" in message
        with pytest.raises(QStashError, match="400"):
            qstash.message.publish(url=url, body="x")
    with pytest.raises(QStashError, match="400"):
        qstash.message.publish(url=destination.url + path, body="x", callback="http://10.0.0.1/")
    with pytest.raises(QStashError, match="400"):
        qstash.message.publish(
            url=destination.url + path, body="x", failure_callback="https://example.com/f"
        )
    reply = call(
        broker, "POST", "/v2/batch",
        json=[{"destination": "http://10.1.2.3/x"}, {"destination": destination.url + path}],
    )  # fmt: skip
    assert reply.status_code == 200, reply.text
    refused, accepted = reply.json()
    assert "allowed destinations" in refused["error"]
    [req] = wait_until(lambda: destination.requests(path))
    assert req.headers["upstash-message-id"] == accepted["messageId"]
    localhost = destination.url.replace("127.0.0.1", "localhost")
    qstash.message.publish(url=localhost + path + "-named", body="x")
    wait_until(lambda: destination.requests(path + "-named"))


def broker_on(redis_url: str, prefix: str, allowed: list[str]) -> tuple[ServerThread, QStash]:
    settings = BrokerSettings(key_prefix=prefix, poll_interval_s=0.2, allowed_destinations=allowed)
    accounts = build_accounts(dev_accounts=True, token=None, current_key=None, next_key=None)
    thread = ServerThread(create_broker_app(settings, redis_url, accounts)).start()
    return thread, QStash(DEV.token, base_url=thread.url, retry=False)


def test_allowed_url_prefix(redis_url: str, destination: Destination, path: str) -> None:
    base = destination.url + path
    thread, qstash = broker_on(redis_url, f"allow{time.time_ns()}", [base + "/in/"])
    try:
        qstash.message.publish(url=base + "/in/a?x=1", body="x")
        wait_until(lambda: destination.requests(path + "/in/a"))
        outside = [
            base + "/out",
            base + "/inside",
            destination.url + "/metrics",
            base + "/in/%2e%2e/out",
            base.replace("127.0.0.1", "localhost") + "/in/a",  # another host, same machine
        ]
        for url in outside:
            with pytest.raises(QStashError, match="400"):
                qstash.message.publish(url=url, body="x")
        # Dot segments are resolved first (as they will be requested): ../ leaves the prefix.
        reply = httpx.post(
            thread.url + "/v2/batch",
            headers={"Authorization": f"Bearer {DEV.token}"},
            json=[{"destination": base + "/in/../out"}],
        )
        assert "allowed destinations" in error_of(reply, 400)
    finally:
        qstash.http._client.close()  # type: ignore[attr-defined]
        thread.stop()


def test_dlq_retry_checks_the_allow_list_again(
    redis_url: str, destination: Destination, path: str
) -> None:
    prefix = f"allowdlq{time.time_ns()}"
    destination.script(path, (500, {}, b"no"))
    thread, qstash = broker_on(redis_url, prefix, ["*"])
    try:
        qstash.message.publish(url=destination.url + path, body="x", retries=0)
        [dead] = wait_until(lambda: qstash.dlq.list().messages)
    finally:
        qstash.http._client.close()  # type: ignore[attr-defined]
        thread.stop()
    thread, qstash = broker_on(redis_url, prefix, ["http://127.0.0.1:1/"])
    try:
        reply = httpx.post(
            f"{thread.url}/v2/dlq/retry/{dead.dlq_id}",
            headers={"Authorization": f"Bearer {DEV.token}"},
        )
        assert "allowed destinations" in error_of(reply, 400)
        assert [m.dlq_id for m in qstash.dlq.list().messages] == [dead.dlq_id]  # kept
    finally:
        qstash.http._client.close()  # type: ignore[attr-defined]
        thread.stop()


def test_bad_allow_list_entry_fails_at_start() -> None:
    with pytest.raises(ValueError, match="allowed destination"):
        create_broker_app(
            BrokerSettings(allowed_destinations=["http://[::1"]), "redis://unused", {}
        )


def test_callback_never_carries_a_private_answer(
    broker: Broker, destination: Destination, path: str
) -> None:
    """The destination answers from loopback: its callback learns the status, not the body
    or headers (a callback to /metrics-like pages would otherwise read them out)."""
    destination.script(path, (200, {"X-Secret": "s3"}, b"private page"))
    qstash = broker.client()
    message = qstash.message.publish(
        url=destination.url + path, body="in", callback=destination.url + path + "-cb"
    )
    [cb] = wait_until(lambda: destination.requests(path + "-cb"))
    payload = json.loads(cb.body)
    assert payload["status"] == 200
    assert payload["sourceMessageId"] == message.message_id
    assert base64.b64decode(payload["body"]) == b""
    assert payload["header"] == {}
    assert base64.b64decode(payload["sourceBody"]) == b"in"  # the publisher's own body
