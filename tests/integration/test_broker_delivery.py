"""Delivery conformance, driven only through the official qstash SDK against real HTTP."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import pytest
from qstash import AsyncQStash, QStash

from brokers import Broker, start_broker
from helpers import Destination, wait_until
from tierq.broker.server.credentials import DEV_ACCOUNTS

FAST_RETRY = "100"  # ms, so retry tests stay quick


def publish_barrier(broker: Broker, destination: Destination, path: str) -> None:
    """Publish to a plain URL and wait until delivered: proves the dispatcher ran a full cycle."""
    broker.client().message.publish(url=destination.url + path + "-barrier", body="b")
    wait_until(lambda: destination.requests(path + "-barrier"))


def test_delivery_headers_and_signature(
    broker: Broker, destination: Destination, path: str
) -> None:
    url = destination.url + path + "?a=1&b=two"
    res = broker.client().message.publish(
        url=url,
        body="hello",
        content_type="text/plain",
        headers={"X-Custom": "v1"},
        method="PUT",
    )
    [req] = wait_until(lambda: destination.requests(path))
    assert req.method == "PUT"
    assert req.query == "a=1&b=two"
    assert req.body == b"hello"
    assert req.headers["content-type"] == "text/plain"
    assert req.headers["x-custom"] == "v1"
    assert req.headers["user-agent"] == "Upstash-QStash"
    assert req.headers["upstash-message-id"] == res.message_id
    assert req.headers["upstash-retried"] == "0"
    broker.receiver().verify(signature=req.headers["upstash-signature"], body="hello", url=url)


async def test_async_client_publish_enqueue_verified(
    broker: Broker, aqstash: AsyncQStash, destination: Destination, path: str
) -> None:
    await aqstash.queue.upsert("async-q", parallelism=2)
    res = await aqstash.message.enqueue_json(
        queue="async-q", url=destination.url + path, body={"n": 1}
    )
    res2 = await aqstash.message.publish_json(url=destination.url + path, body={"n": 2})
    got = wait_until(lambda: len(destination.requests(path)) == 2 and destination.requests(path))
    assert {r.headers["upstash-message-id"] for r in got} == {res.message_id, res2.message_id}
    for req in got:
        broker.receiver().verify(
            signature=req.headers["upstash-signature"],
            body=req.body.decode(),
            url=destination.url + path,
        )
    queue = await aqstash.queue.get("async-q")
    assert queue.parallelism == 2


def test_fifo_order_in_queue(broker: Broker, destination: Destination, path: str) -> None:
    qstash = broker.client()
    qstash.queue.upsert("fifo", parallelism=1)
    ids = [
        qstash.message.enqueue(queue="fifo", url=destination.url + path, body=str(i)).message_id
        for i in range(25)
    ]
    got = wait_until(lambda: len(destination.requests(path)) == 25 and destination.requests(path))
    assert [r.headers["upstash-message-id"] for r in got] == ids


def test_fifo_waits_through_retries(broker: Broker, destination: Destination, path: str) -> None:
    qstash = broker.client()
    destination.script(path + "-first", (500, {}, b"no"), (500, {}, b"no"), (200, {}, b"ok"))
    qstash.queue.upsert("fifo-retry", parallelism=1)
    qstash.message.enqueue(
        queue="fifo-retry", url=destination.url + path + "-first", body="1", retry_delay=FAST_RETRY
    )
    qstash.message.enqueue(queue="fifo-retry", url=destination.url + path + "-second", body="2")
    second = wait_until(lambda: destination.requests(path + "-second"))
    first = destination.requests(path + "-first")
    assert len(first) == 3
    assert first[-1].at <= second[0].at  # the next message waited for the last retry


@pytest.mark.parametrize("parallelism", [1, 4])
def test_parallelism_is_reached_and_never_exceeded(
    broker: Broker, destination: Destination, path: str, parallelism: int
) -> None:
    qstash = broker.client()
    destination.script(path, (200, {}, b"ok"), delay=0.15)
    queue = f"par-{parallelism}"
    qstash.queue.upsert(queue, parallelism=parallelism)
    qstash.message.batch(
        [{"queue": queue, "url": destination.url + path, "body": str(i)} for i in range(16)]
    )
    wait_until(lambda: len(destination.requests(path)) == 16, timeout=20)
    assert destination.max_in_flight[path] == parallelism


def test_pause_holds_and_resume_drains(broker: Broker, destination: Destination, path: str) -> None:
    qstash = broker.client()
    qstash.queue.upsert("pausable", parallelism=2, paused=True)
    for i in range(5):
        qstash.message.enqueue(queue="pausable", url=destination.url + path, body=str(i))
    publish_barrier(broker, destination, path)
    assert destination.requests(path) == []
    queue = qstash.queue.get("pausable")
    assert queue.paused
    assert queue.lag == 5
    qstash.queue.resume("pausable")
    wait_until(lambda: len(destination.requests(path)) == 5)
    assert qstash.queue.get("pausable").lag == 0
    qstash.queue.pause("pausable")
    qstash.message.enqueue(queue="pausable", url=destination.url + path, body="later")
    publish_barrier(broker, destination, path + "-2")
    assert len(destination.requests(path)) == 5
    assert qstash.queue.get("pausable").lag == 1


def test_retries_count_and_custom_delay(
    broker: Broker, destination: Destination, path: str
) -> None:
    destination.script(path, (503, {}, b"busy"), (503, {}, b"busy"), (200, {}, b"ok"))
    broker.client().message.publish(
        url=destination.url + path, body="x", retries=3, retry_delay="200"
    )
    got = wait_until(lambda: len(destination.requests(path)) == 3 and destination.requests(path))
    assert [r.headers["upstash-retried"] for r in got] == ["0", "1", "2"]
    assert got[1].at - got[0].at >= 0.19
    assert got[2].at - got[1].at >= 0.19


def test_retry_after_overrides_backoff(broker: Broker, destination: Destination, path: str) -> None:
    destination.script(path, (429, {"Retry-After": "1"}, b"slow down"), (200, {}, b"ok"))
    # Without the response's wait, this expression would put the retry an hour away.
    broker.client().message.publish(
        url=destination.url + path, body="x", retries=2, retry_delay="3600000"
    )
    got = wait_until(lambda: len(destination.requests(path)) == 2 and destination.requests(path))
    assert 0.95 <= got[1].at - got[0].at < 5


def test_ratelimit_reset_header_overrides_backoff(
    broker: Broker, destination: Destination, path: str
) -> None:
    destination.script(path, (429, {"X-RateLimit-Reset-Requests": "300ms"}, b""), (200, {}, b""))
    broker.client().message.publish(url=destination.url + path, body="x", retry_delay="3600000")
    got = wait_until(lambda: len(destination.requests(path)) == 2 and destination.requests(path))
    assert 0.25 <= got[1].at - got[0].at < 5


def test_non_retryable_489_goes_to_dlq_at_once(
    broker: Broker, destination: Destination, path: str
) -> None:
    destination.script(path, (489, {"Upstash-NonRetryable-Error": "true"}, b"invalid input"))
    qstash = broker.client()
    res = qstash.message.publish(url=destination.url + path, body="x", retries=3)
    entry = wait_until(
        lambda: next(
            (m for m in qstash.dlq.list().messages if m.message_id == res.message_id), None
        )
    )
    assert len(destination.requests(path)) == 1
    assert entry.response_status == 489
    assert entry.response_body == "invalid input"


def test_exhausted_retries_land_in_dlq_with_last_response(
    broker: Broker, destination: Destination, path: str
) -> None:
    destination.script(path, (500, {}, b"first"), (502, {"X-Why": "gateway"}, b"last"))
    qstash = broker.client()
    res = qstash.message.publish(
        url=destination.url + path, body="payload", retries=1, retry_delay=FAST_RETRY
    )
    entry = wait_until(
        lambda: next(
            (m for m in qstash.dlq.list().messages if m.message_id == res.message_id), None
        )
    )
    assert len(destination.requests(path)) == 2
    assert entry.response_status == 502
    assert entry.response_body == "last"
    assert entry.response_headers is not None
    assert entry.response_headers["X-Why"] == ["gateway"]
    assert entry.body == "payload"
    assert entry.retry_delay_expression == FAST_RETRY


def test_attempt_timeout(broker: Broker, destination: Destination, path: str) -> None:
    destination.script(path, (200, {}, b"too late"), delay=3)
    qstash = broker.client()
    res = qstash.message.publish(url=destination.url + path, body="x", retries=0, timeout=1)
    entry = wait_until(
        lambda: next(
            (m for m in qstash.dlq.list().messages if m.message_id == res.message_id), None
        )
    )
    assert entry.response_status == 0


def test_deduplication(broker: Broker, destination: Destination, path: str) -> None:
    qstash = broker.client()
    url = destination.url + path
    first = qstash.message.publish(url=url, body="a", deduplication_id="once")
    again = qstash.message.publish(url=url, body="b", deduplication_id="once")
    assert again.message_id == first.message_id
    assert again.deduplicated
    assert not first.deduplicated
    c1 = qstash.message.publish(url=url, body="same", content_based_deduplication=True)
    c2 = qstash.message.publish(url=url, body="same", content_based_deduplication=True)
    c3 = qstash.message.publish(url=url, body="other", content_based_deduplication=True)
    assert c1.message_id == c2.message_id != c3.message_id
    assert c2.deduplicated
    wait_until(lambda: len(destination.requests(path)) == 3)
    publish_barrier(broker, destination, path)
    assert sorted(r.body for r in destination.requests(path)) == [b"a", b"other", b"same"]


@pytest.fixture
def private_bodies_broker(redis_url: str) -> Iterator[Broker]:
    """A broker whose callbacks may carry answers from private addresses (this machine)."""
    b = start_broker(redis_url, callback_private_bodies=True)
    yield b
    b.close_clients()
    b.thread.stop()


def test_callback_and_failure_callback(
    private_bodies_broker: Broker, destination: Destination, path: str
) -> None:
    broker = private_bodies_broker
    qstash = broker.client()
    ok_url = destination.url + path + "-ok"
    bad_url = destination.url + path + "-bad"
    cb_url = destination.url + path + "-cb"
    fcb_url = destination.url + path + "-fcb"
    destination.script(path + "-ok", (201, {"X-R": "1"}, b"done"))
    destination.script(path + "-bad", (500, {}, b"broken"))
    ok = qstash.message.publish(
        url=ok_url, body="in", callback=cb_url, callback_headers={"X-Cb": "yes"}
    )
    [cb] = wait_until(lambda: destination.requests(path + "-cb"))
    payload = json.loads(cb.body)
    assert payload["status"] == 201
    assert base64.b64decode(payload["body"]) == b"done"
    assert payload["sourceMessageId"] == ok.message_id
    assert payload["retried"] == 0
    assert payload["maxRetries"] == 3
    assert base64.b64decode(payload["sourceBody"]) == b"in"
    assert payload["url"] == ok_url
    assert "dlqId" not in payload
    assert cb.headers["x-cb"] == "yes"
    broker.receiver().verify(
        signature=cb.headers["upstash-signature"], body=cb.body.decode(), url=cb_url
    )

    bad = qstash.message.publish(
        url=bad_url, body="in", retries=1, retry_delay=FAST_RETRY, failure_callback=fcb_url
    )
    [fcb] = wait_until(lambda: destination.requests(path + "-fcb"))
    failure = json.loads(fcb.body)
    assert failure["status"] == 500
    assert failure["sourceMessageId"] == bad.message_id
    assert failure["retried"] == 1
    assert base64.b64decode(failure["body"]) == b"broken"
    dlq = qstash.dlq.list().messages
    assert failure["dlqId"] in {m.dlq_id for m in dlq}


def test_delay_is_honoured(broker: Broker, destination: Destination, path: str) -> None:
    qstash = broker.client()
    immediate_path = path + "-now"
    qstash.message.publish(url=destination.url + path, body="later", delay=1)
    qstash.message.publish(url=destination.url + immediate_path, body="now")
    [now_req] = wait_until(lambda: destination.requests(immediate_path))
    [later_req] = wait_until(lambda: destination.requests(path), timeout=10)
    assert later_req.at - now_req.at >= 0.8


def test_deliveries_never_carry_cookies_between_users(
    broker: Broker, destination: Destination, path: str
) -> None:
    destination.script(path, (200, {"Set-Cookie": "session=SECRET; Path=/"}, b"ok"))
    first = broker.client()
    first.message.publish(url=destination.url + path, body="a")
    wait_until(lambda: destination.requests(path))
    other = QStash(DEV_ACCOUNTS[1].token, base_url=broker.url)
    try:
        other.message.publish(url=destination.url + path, body="b")
    finally:
        other.http._client.close()
    got = wait_until(lambda: len(destination.requests(path)) == 2 and destination.requests(path))
    assert all("cookie" not in r.headers for r in got)
