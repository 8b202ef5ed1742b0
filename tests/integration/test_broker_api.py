"""The broker's management API, driven through the official qstash SDK against real HTTP.

Raw httpx is used only where the SDK has no method, or to check exact wire bodies (error JSON,
absent ``cursor`` keys, query-string forms the TS SDK and the docs use).
"""

from __future__ import annotations

import re
import time
from typing import Any

import httpx
import pytest
from qstash import AsyncQStash, QStash, Receiver
from qstash.errors import QStashError, SignatureError
from qstash.log import Log, LogState

from brokers import DEV, Broker
from helpers import Destination, ServerThread, wait_until
from tierq.broker.server.app import create_broker_app
from tierq.broker.server.credentials import DEV_ACCOUNTS, build_accounts

FAST_RETRY = "100"  # ms, so retry tests stay quick


# -- helpers --------------------------------------------------------------------------------


@pytest.fixture
def p(path: str) -> str:
    """``path`` without characters a URL would escape (parametrized test ids carry brackets)."""
    return re.sub(r"[^A-Za-z0-9/_-]", "_", path)


def call(
    broker: Broker,
    method: str,
    url: str,
    *,
    token: str | None = DEV.token,
    headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> httpx.Response:
    """One raw request to the broker, authenticated with the dev token unless told otherwise."""
    sent = dict(headers or {})
    if token is not None:
        sent.setdefault("Authorization", f"Bearer {token}")
    with httpx.Client(base_url=broker.url, timeout=10) as client:
        return client.request(method, url, headers=sent, **kwargs)


def error_of(response: httpx.Response, status: int) -> str:
    """Assert ``status`` and QStash's error shape ``{"error": "..."}``; return the message."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert isinstance(body["error"], str)
    assert body["error"]
    return str(body["error"])


def client_for(broker: Broker, token: str) -> QStash:
    client = QStash(token, base_url=broker.url)
    broker.clients.append(client)  # closed by the fixture
    return client


def now_ms() -> int:
    return int(time.time() * 1000)


def publish_barrier(broker: Broker, destination: Destination, path: str) -> None:
    """Publish to a plain URL and wait until delivered: proves the dispatcher ran a full cycle."""
    broker.client().message.publish(url=destination.url + path + "-barrier", body="b")
    wait_until(lambda: destination.requests(path + "-barrier"))


def events_of(qstash: QStash, message_id: str) -> list[Log]:
    """The message's log, oldest first (the API answers newest first)."""
    return list(reversed(qstash.log.list(filter={"message_ids": [message_id]}).logs))


def states_of(qstash: QStash, message_id: str) -> list[str]:
    return [e.state.value for e in events_of(qstash, message_id)]


def dlq_entry(qstash: QStash, message_id: str) -> Any:
    return wait_until(
        lambda: next((m for m in qstash.dlq.list().messages if m.message_id == message_id), None)
    )


def received(destination: Destination, path: str, count: int) -> list[Any]:
    """Wait until ``path`` got exactly ``count`` requests; return them."""
    return wait_until(  # type: ignore[no-any-return]
        lambda: len(destination.requests(path)) == count and destination.requests(path)
    )


def message_ids(received: list[Any]) -> list[str]:
    return [r.headers["upstash-message-id"] for r in received]


# -- authentication and signing keys --------------------------------------------------------


def test_bearer_and_query_token_accepted_others_rejected(
    broker: Broker, destination: Destination, p: str
) -> None:
    assert call(broker, "GET", "/v2/queues").status_code == 200
    assert (
        call(broker, "GET", "/v2/queues", token=None, params={"qstash_token": DEV.token}).json()
        == []
    )
    error_of(call(broker, "GET", "/v2/queues", token=None), 401)
    error_of(call(broker, "GET", "/v2/queues", token="not-a-token"), 401)
    error_of(call(broker, "GET", "/v2/queues", token=None, params={"qstash_token": "x"}), 401)
    error_of(call(broker, "GET", "/v2/keys", headers={"Authorization": f"Basic {DEV.token}"}), 401)
    with pytest.raises(QStashError, match="401"):
        client_for(broker, "wrong").queue.list()

    # A publish authenticated by query: the token never reaches the destination URL.
    dest = destination.url + p
    res = call(
        broker,
        "POST",
        f"/v2/publish/{dest}?a=1&qstash_token={DEV.token}",
        token=None,
        content="q",
    )
    assert res.status_code == 200, res.text
    [req] = wait_until(lambda: destination.requests(p))
    assert req.query == "a=1"
    assert req.headers["upstash-message-id"] == res.json()["messageId"]

    # Rejected publishes store nothing.
    error_of(call(broker, "POST", f"/v2/publish/{dest}-unauth", token=None, content="x"), 401)
    error_of(call(broker, "POST", f"/v2/publish/{dest}-unauth", token="bad", content="x"), 401)
    publish_barrier(broker, destination, p)
    assert destination.requests(p + "-unauth") == []
    assert broker.client().log.list(filter={"url": dest + "-unauth"}).logs == []


def test_dev_accounts_have_their_own_keys_and_data(
    broker: Broker, destination: Destination, p: str
) -> None:
    ids = []
    for i, account in enumerate(DEV_ACCOUNTS):
        client = client_for(broker, account.token)
        keys = client.signing_key.get()
        assert (keys.current, keys.next) == (account.current_key, account.next_key)
        raw = call(broker, "GET", "/v2/keys", token=account.token).json()
        assert raw == {"current": account.current_key, "next": account.next_key}
        url = f"{destination.url}{p}-{i}"
        res = client.message.publish(url=url, body=f"from {account.user}")
        [req] = wait_until(lambda url=url: destination.requests(url[len(destination.url) :]))
        assert req.headers["upstash-message-id"] == res.message_id
        sig, body = req.headers["upstash-signature"], req.body.decode()
        Receiver(
            current_signing_key=account.current_key, next_signing_key=account.current_key
        ).verify(signature=sig, body=body, url=url)
        other = DEV_ACCOUNTS[(i + 1) % len(DEV_ACCOUNTS)]
        with pytest.raises(SignatureError):
            Receiver(current_signing_key=other.current_key, next_signing_key=other.next_key).verify(
                signature=sig, body=body, url=url
            )
        ids.append(client.message.publish(url=url + "-later", body="x", delay=60).message_id)
        client.queue.upsert(f"q-{account.user}")

    # Each account sees only its own messages and queues.
    first, second = (
        client_for(broker, DEV_ACCOUNTS[0].token),
        client_for(broker, DEV_ACCOUNTS[1].token),
    )
    assert first.message.get(ids[0]).message_id == ids[0]
    with pytest.raises(QStashError, match="404"):
        first.message.get(ids[1])
    error_of(call(broker, "DELETE", f"/v2/messages/{ids[1]}"), 404)
    assert second.message.get(ids[1]).message_id == ids[1]  # not cancelled by the other user
    assert [q.name for q in first.queue.list()] == [f"q-{DEV_ACCOUNTS[0].user}"]
    assert [q.name for q in second.queue.list()] == [f"q-{DEV_ACCOUNTS[1].user}"]
    assert first.message.cancel_all() == 1
    assert second.message.get(ids[1]).message_id == ids[1]


def test_rotate_signing_keys(
    broker: Broker, redis_url: str, destination: Destination, p: str
) -> None:
    qstash = broker.client()
    old = qstash.signing_key.get()
    new = qstash.signing_key.rotate()
    assert new.current == old.next
    assert new.next.startswith("sig_")
    assert new.next not in {old.current, old.next}
    assert qstash.signing_key.get() == new
    other = client_for(broker, DEV_ACCOUNTS[1].token).signing_key.get()
    assert (other.current, other.next) == (DEV_ACCOUNTS[1].current_key, DEV_ACCOUNTS[1].next_key)

    url = destination.url + p
    qstash.message.publish(url=url, body="signed")
    [req] = wait_until(lambda: destination.requests(p))
    sig = req.headers["upstash-signature"]
    Receiver(current_signing_key=new.current, next_signing_key=new.next).verify(
        signature=sig, body="signed", url=url
    )
    # Signed with the new current key, not with the old one.
    Receiver(current_signing_key=new.current, next_signing_key="sig_unrelated").verify(
        signature=sig, body="signed", url=url
    )
    with pytest.raises(SignatureError):
        Receiver(current_signing_key=old.current, next_signing_key="sig_unrelated").verify(
            signature=sig, body="signed", url=url
        )

    # The rotation is stored: a broker restarted on the same prefix signs with the new keys.
    broker.thread.stop()
    accounts = build_accounts(dev_accounts=True, token=None, current_key=None, next_key=None)
    thread = ServerThread(create_broker_app(broker.settings, redis_url, accounts)).start()
    restarted = QStash(DEV.token, base_url=thread.url)
    try:
        assert restarted.signing_key.get() == new
        restarted.message.publish(url=url + "-after", body="again")
        [req] = wait_until(lambda: destination.requests(p + "-after"))
        Receiver(current_signing_key=new.current, next_signing_key="sig_unrelated").verify(
            signature=req.headers["upstash-signature"], body="again", url=url + "-after"
        )
        again = restarted.signing_key.rotate()
        assert again.current == new.next
    finally:
        restarted.http._client.close()  # type: ignore[attr-defined]
        thread.stop()


# -- bad input --------------------------------------------------------------------------------


def test_destination_with_bad_scheme(broker: Broker, destination: Destination, p: str) -> None:
    message = error_of(call(broker, "POST", "/v2/publish/ftp://x", content="x"), 400)
    assert "scheme" in message
    message = error_of(call(broker, "POST", "/v2/enqueue/q1/ftp://x", content="x"), 400)
    assert "scheme" in message
    with pytest.raises(QStashError, match="400"):
        broker.client().message.publish(url="ftp://example.com/a", body="x")
    publish_barrier(broker, destination, p)
    assert {e.url for e in broker.client().log.list().logs} == {destination.url + p + "-barrier"}
    with pytest.raises(QStashError, match="404"):
        broker.client().queue.get("q1")  # the rejected enqueue did not create its queue


def test_invalid_queue_name(broker: Broker, destination: Destination, p: str) -> None:
    qstash = broker.client()
    error_of(call(broker, "POST", "/v2/queues", json={"queueName": "bad name!"}), 400)
    with pytest.raises(QStashError, match="400"):
        qstash.queue.upsert("bad name!")
    error_of(call(broker, "POST", f"/v2/enqueue/bad name!/{destination.url}{p}", content="x"), 400)
    with pytest.raises(QStashError, match="400"):
        qstash.message.enqueue(queue="bad name!", url=destination.url + p, body="x")
    error_of(call(broker, "POST", "/v2/queues", json={"parallelism": 2}), 400)
    error_of(call(broker, "POST", "/v2/queues", json={"queueName": "ok", "parallelism": 0}), 400)
    error_of(call(broker, "POST", "/v2/queues", content=b"{not json"), 400)
    publish_barrier(broker, destination, p)
    assert qstash.queue.list() == []
    assert destination.requests(p) == []


def test_unknown_queue_is_404(broker: Broker) -> None:
    for method, url in [
        ("GET", "/v2/queues/nope"),
        ("POST", "/v2/queues/nope/pause"),
        ("POST", "/v2/queues/nope/resume"),
        ("DELETE", "/v2/queues/nope"),
    ]:
        error_of(call(broker, method, url), 404)
    qstash = broker.client()
    with pytest.raises(QStashError, match="404"):
        qstash.queue.pause("nope")
    with pytest.raises(QStashError, match="404"):
        qstash.queue.resume("nope")
    assert qstash.queue.list() == []  # pause/resume did not create it


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("Upstash-Retries", "abc"),
        ("Upstash-Delay", "soon"),
        ("Upstash-Retry-Delay", "import os"),
        ("Upstash-Method", "FOO"),
        ("Upstash-Timeout", "-1"),
    ],
)
def test_malformed_setting_is_400_and_stores_nothing(
    broker: Broker, destination: Destination, p: str, header: str, value: str
) -> None:
    qstash = broker.client()
    qstash.queue.upsert("held", paused=True)
    dest = destination.url + p
    message = error_of(
        call(broker, "POST", f"/v2/publish/{dest}", headers={header: value}, content="x"), 400
    )
    assert header.lower() in message.lower()
    # The same setting as a query parameter.
    error_of(call(broker, "POST", f"/v2/publish/{dest}?{header.lower()}={value}", content="x"), 400)
    error_of(
        call(broker, "POST", f"/v2/enqueue/held/{dest}", headers={header: value}, content="x"),
        400,
    )
    # In a batch (every item bad): the whole request is rejected.
    error_of(
        call(
            broker,
            "POST",
            "/v2/batch",
            json=[{"destination": dest, "headers": {header: value}, "body": "x"}],
        ),
        400,
    )
    publish_barrier(broker, destination, p)
    assert destination.requests(p) == []
    assert qstash.log.list(filter={"url": dest}).logs == []
    assert qstash.queue.get("held").lag == 0


def test_enqueue_rejects_delay_and_not_before(
    broker: Broker, destination: Destination, p: str
) -> None:
    qstash = broker.client()
    qstash.queue.upsert("nodelay", paused=True)
    dest = destination.url + p
    for headers in (
        {"Upstash-Delay": "10s"},
        {"Upstash-Not-Before": str(int(time.time()) + 60)},
    ):
        message = error_of(
            call(broker, "POST", f"/v2/enqueue/nodelay/{dest}", headers=headers, content="x"), 400
        )
        assert "delay" in message.lower()
    error_of(call(broker, "POST", f"/v2/enqueue/nodelay/{dest}?upstash-delay=5s", content="x"), 400)
    qstash.message.enqueue(queue="nodelay", url=dest, body="fine")
    assert qstash.queue.get("nodelay").lag == 1
    events = qstash.log.list(filter={"url": dest}).logs
    assert [e.state for e in events] == [LogState.CREATED]


def test_unsupported_features_are_501(broker: Broker, destination: Destination, p: str) -> None:
    qstash = broker.client()
    for method, url, headers in [
        ("GET", "/v2/schedules", {}),
        ("POST", f"/v2/schedules/{destination.url}{p}", {"Upstash-Cron": "* * * * *"}),
        ("GET", "/v2/schedules/scd_1", {}),
        ("PATCH", "/v2/schedules/scd_1/pause", {}),
        ("GET", "/v2/topics", {}),
        ("POST", "/v2/topics/group/endpoints", {}),
        ("GET", "/v2/flowControl", {}),
        ("GET", "/v2/flowControl/key", {}),
        ("POST", "/v2/flowControl/key/pause", {}),
        ("GET", "/v2/globalParallelism", {}),
    ]:
        message = error_of(call(broker, method, url, headers=headers), 501)
        assert "not supported" in message
        error_of(call(broker, method, url, headers=headers, token=None), 401)
    assert "schedule" in error_of(call(broker, "GET", "/v2/schedules"), 501)
    assert "URL group" in error_of(call(broker, "GET", "/v2/topics"), 501)
    assert "flow control" in error_of(call(broker, "GET", "/v2/flowControl/k"), 501)
    with pytest.raises(QStashError, match="501"):
        qstash.schedule.list()
    with pytest.raises(QStashError, match="501"):
        qstash.url_group.list()
    with pytest.raises(QStashError, match="501"):
        qstash.flow_control.get("key")
    # Publishing to a URL group, or with flow control, is refused as well, and stores nothing.
    assert "URL group" in error_of(call(broker, "POST", "/v2/publish/my-group", content="x"), 501)
    with pytest.raises(QStashError, match="501"):
        qstash.message.publish(
            url=destination.url + p, body="x", flow_control={"key": "k", "parallelism": 1}
        )
    publish_barrier(broker, destination, p)
    assert destination.requests(p) == []
    assert qstash.log.list(filter={"url": destination.url + p}).logs == []


# -- messages ---------------------------------------------------------------------------------


def test_get_and_cancel_delayed_message(broker: Broker, destination: Destination, p: str) -> None:
    qstash = broker.client()
    dest = destination.url + p + "?k=v"
    before = now_ms()
    res = qstash.message.publish(
        url=dest,
        body="later",
        delay=60,
        method="PUT",
        retries=2,
        content_type="text/plain",
        headers={"X-Test": "yes"},
    )
    after = now_ms()
    msg = qstash.message.get(res.message_id)
    assert msg.message_id == res.message_id
    assert msg.url == dest
    assert msg.method == "PUT"
    assert msg.body == "later"
    assert msg.headers is not None
    assert msg.headers["X-Test"] == ["yes"]
    assert msg.max_retries == 2
    assert before <= msg.created_at <= after
    assert before + 60_000 <= msg.not_before <= after + 60_000
    assert msg.queue is None

    qstash.message.cancel(res.message_id)
    with pytest.raises(QStashError, match="404"):
        qstash.message.get(res.message_id)
    error_of(call(broker, "GET", f"/v2/messages/{res.message_id}"), 404)
    error_of(call(broker, "DELETE", f"/v2/messages/{res.message_id}"), 404)
    logs = events_of(qstash, res.message_id)
    assert [e.state for e in logs] == [
        LogState.CREATED,
        LogState.CANCEL_REQUESTED,
        LogState.CANCELED,
    ]
    assert all(e.url == dest and e.message_id == res.message_id for e in logs)


def test_cancel_many_and_cancel_all(broker: Broker, destination: Destination, p: str) -> None:
    qstash = broker.client()
    url = destination.url + p
    a, b, c, d = (
        qstash.message.publish(url=url, body=str(i), delay=60).message_id for i in range(4)
    )
    qstash.queue.upsert("cq", paused=True)
    q1 = qstash.message.enqueue(queue="cq", url=url, body="q1").message_id
    q2 = qstash.message.enqueue(queue="cq", url=url, body="q2").message_id
    assert qstash.message.cancel_many([a, b, "msg_does_not_exist"]) == 2
    for gone in (a, b):
        with pytest.raises(QStashError, match="404"):
            qstash.message.get(gone)
    assert qstash.message.get(c).message_id == c
    assert qstash.message.cancel_many([a]) == 0  # already cancelled
    assert qstash.message.cancel_many([q1]) == 1
    assert qstash.queue.get("cq").lag == 1

    assert qstash.message.cancel_all() == 3  # c, d, q2
    for gone in (c, d, q2):
        with pytest.raises(QStashError, match="404"):
            qstash.message.get(gone)
    assert qstash.queue.get("cq").lag == 0
    assert qstash.message.cancel_all() == 0
    for message_id in (a, q1, d):
        assert LogState.CANCELED in [e.state for e in events_of(qstash, message_id)]
    qstash.queue.resume("cq")
    publish_barrier(broker, destination, p)
    assert destination.requests(p) == []


def test_bulk_cancel_by_query(broker: Broker, destination: Destination, p: str) -> None:
    qstash = broker.client()
    url = destination.url + p
    a, b, c, d = (
        qstash.message.publish(url=url, body=str(i), delay=60).message_id for i in range(4)
    )
    res = call(broker, "DELETE", f"/v2/messages?messageIds={a}&messageIds={b}")
    assert res.status_code == 200, res.text
    assert res.json() == {"cancelled": 2}
    res = call(broker, "DELETE", "/v2/messages", params={"messageIds": f"{c},msg_unknown"})
    assert res.json() == {"cancelled": 1}
    for gone in (a, b, c):
        with pytest.raises(QStashError, match="404"):
            qstash.message.get(gone)
    assert qstash.message.get(d).body == "3"


def test_cancel_while_waiting_to_retry(broker: Broker, destination: Destination, p: str) -> None:
    qstash = broker.client()
    destination.script(p + "-c", (500, {}, b"no"))
    destination.script(p + "-ctl", (500, {}, b"no"), (200, {}, b"ok"))
    doomed = qstash.message.publish(
        url=destination.url + p + "-c", body="x", retries=3, retry_delay="500", label="doomed"
    ).message_id
    wait_until(lambda: "RETRY" in states_of(qstash, doomed))
    waiting = qstash.message.get(doomed)  # still pending between attempts
    assert waiting.max_retries == 3
    assert waiting.label == "doomed"
    qstash.message.cancel(doomed)
    # A control message on the same retry schedule, started later: once its retry arrived, the
    # cancelled message's retry would have been due too.
    qstash.message.publish(url=destination.url + p + "-ctl", body="y", retries=3, retry_delay="500")
    received(destination, p + "-ctl", 2)
    publish_barrier(broker, destination, p)
    assert len(destination.requests(p + "-c")) == 1
    expected = ["CREATED", "ACTIVE", "ERROR", "RETRY", "CANCEL_REQUESTED", "CANCELED"]
    assert states_of(qstash, doomed) == expected
    labelled = qstash.log.list(filter={"label": "doomed"}).logs
    assert len(labelled) == len(expected)
    assert {(e.message_id, e.label) for e in labelled} == {(doomed, "doomed")}


# -- queues -----------------------------------------------------------------------------------


def test_queue_crud(broker: Broker) -> None:
    qstash = broker.client()
    before = now_ms()
    qstash.queue.upsert("alpha", parallelism=2)
    qstash.queue.upsert("beta", paused=True)
    alpha = qstash.queue.get("alpha")
    assert (alpha.name, alpha.parallelism, alpha.paused, alpha.lag) == ("alpha", 2, False, 0)
    assert before <= alpha.created_at <= alpha.updated_at <= now_ms()
    listed = {q.name: q for q in qstash.queue.list()}
    assert set(listed) == {"alpha", "beta"}
    assert listed["beta"].paused
    assert listed["beta"].parallelism == 1

    qstash.queue.upsert("alpha", parallelism=5, paused=True)
    changed = qstash.queue.get("alpha")
    assert (changed.parallelism, changed.paused) == (5, True)
    assert changed.created_at == alpha.created_at
    assert changed.updated_at >= alpha.updated_at
    qstash.queue.resume("alpha")
    assert not qstash.queue.get("alpha").paused
    qstash.queue.pause("alpha")
    qstash.queue.pause("alpha")  # idempotent
    assert qstash.queue.get("alpha").paused

    qstash.queue.delete("alpha")
    with pytest.raises(QStashError, match="404"):
        qstash.queue.get("alpha")
    assert [q.name for q in qstash.queue.list()] == ["beta"]
    error_of(call(broker, "DELETE", "/v2/queues/alpha"), 404)


async def test_queue_crud_async(broker: Broker, aqstash: AsyncQStash) -> None:
    await aqstash.queue.upsert("async-a", parallelism=3)
    await aqstash.queue.upsert("async-b", paused=True)
    got = await aqstash.queue.get("async-a")
    assert (got.name, got.parallelism, got.paused, got.lag) == ("async-a", 3, False, 0)
    assert {q.name for q in await aqstash.queue.list()} == {"async-a", "async-b"}
    await aqstash.queue.pause("async-a")
    assert (await aqstash.queue.get("async-a")).paused
    await aqstash.queue.resume("async-a")
    assert not (await aqstash.queue.get("async-a")).paused
    await aqstash.queue.delete("async-b")
    assert [q.name for q in await aqstash.queue.list()] == ["async-a"]
    with pytest.raises(QStashError, match="404"):
        await aqstash.queue.get("async-b")


def test_lag_is_exact_on_paused_queue(broker: Broker, destination: Destination, p: str) -> None:
    qstash = broker.client()
    qstash.queue.upsert("lagq", parallelism=2, paused=True)
    ids = [
        qstash.message.enqueue(queue="lagq", url=destination.url + p, body=str(i)).message_id
        for i in range(7)
    ]
    assert qstash.queue.get("lagq").lag == 7
    publish_barrier(broker, destination, p)
    assert destination.requests(p) == []
    assert qstash.queue.get("lagq").lag == 7
    qstash.queue.resume("lagq")
    got = received(destination, p, 7)
    assert sorted(message_ids(got)) == sorted(ids)
    assert message_ids(got)[0] in ids[:2]
    assert qstash.queue.get("lagq").lag == 0
    wait_until(lambda: all(states_of(qstash, i)[-1] == "DELIVERED" for i in ids))
    assert qstash.queue.get("lagq").lag == 0


def test_parallelism_update_takes_effect(broker: Broker, destination: Destination, p: str) -> None:
    qstash = broker.client()
    destination.script(p, (200, {}, b"ok"), hold=True)
    qstash.queue.upsert("grow", parallelism=1)
    ids = [
        qstash.message.enqueue(queue="grow", url=destination.url + p, body=str(i)).message_id
        for i in range(6)
    ]
    try:
        wait_until(lambda: len(destination.requests(p)) == 1)
        publish_barrier(broker, destination, p)
        assert len(destination.requests(p)) == 1
        assert qstash.queue.get("grow").lag == 5
        qstash.queue.upsert("grow", parallelism=3)
        wait_until(lambda: len(destination.requests(p)) == 3)
        publish_barrier(broker, destination, p + "-2")
        assert len(destination.requests(p)) == 3
        assert qstash.queue.get("grow").lag == 3
    finally:
        destination.release(p)
    got = received(destination, p, 6)
    assert message_ids(got)[0] == ids[0]
    assert sorted(message_ids(got)) == sorted(ids)
    assert destination.max_in_flight[p] == 3


def test_parallelism_above_max_is_412(broker: Broker) -> None:
    qstash = broker.client()
    limit = broker.settings.max_parallelism
    message = error_of(
        call(broker, "POST", "/v2/queues", json={"queueName": "big", "parallelism": limit + 1}),
        412,
    )
    assert str(limit) in message
    with pytest.raises(QStashError, match="412"):
        qstash.queue.upsert("big", parallelism=limit + 1)
    with pytest.raises(QStashError, match="404"):
        qstash.queue.get("big")
    qstash.queue.upsert("big", parallelism=limit)
    assert qstash.queue.get("big").parallelism == limit
    with pytest.raises(QStashError, match="412"):
        qstash.queue.upsert("big", parallelism=limit + 1)
    assert qstash.queue.get("big").parallelism == limit  # unchanged by the refused update


# -- DLQ --------------------------------------------------------------------------------------


def test_failed_message_lands_in_dlq(broker: Broker, destination: Destination, p: str) -> None:
    qstash = broker.client()
    destination.script(p, (500, {"X-Fail": "1"}, b"boom"))
    url = destination.url + p
    res = qstash.message.publish(url=url, body="payload", retries=0, headers={"X-In": "1"})
    entry = dlq_entry(qstash, res.message_id)
    assert entry.response_status == 500
    assert entry.response_body == "boom"
    assert entry.response_headers is not None
    assert entry.response_headers["X-Fail"] == ["1"]
    assert entry.url == url
    assert entry.body == "payload"
    assert entry.max_retries == 0
    assert entry.headers is not None
    assert entry.headers["X-In"] == ["1"]
    assert len(destination.requests(p)) == 1

    got = qstash.dlq.get(entry.dlq_id)
    assert got.dlq_id == entry.dlq_id
    assert got.message_id == res.message_id
    assert got.response_status == 500
    assert got.response_body == "boom"
    with pytest.raises(QStashError, match="404"):
        qstash.dlq.get("0-0")
    with pytest.raises(QStashError, match="404"):
        qstash.message.get(res.message_id)  # a failed message is no longer pending
    assert states_of(qstash, res.message_id) == ["CREATED", "ACTIVE", "FAILED"]


def _three_dlq_entries(broker: Broker, destination: Destination, p: str) -> dict[str, Any]:
    """A: url a, status 500; B: url b via queue dq, status 404; C: url b, status 500."""
    qstash = broker.client()
    t0 = now_ms()
    url_a, url_b = destination.url + p + "-a", destination.url + p + "-b"
    destination.script(p + "-a", (500, {}, b"a"))
    destination.script(p + "-b", (404, {}, b"b"), (500, {}, b"c"))
    a = qstash.message.publish(url=url_a, body="A", retries=0, label="lab-a").message_id
    dlq_entry(qstash, a)  # A is dead-lettered first (the order tests rely on it)
    b = qstash.message.enqueue(queue="dq", url=url_b, body="B", retries=0).message_id
    dlq_entry(qstash, b)  # B must take the 404 before C takes the 500
    c = qstash.message.publish(url=url_b, body="C", retries=0).message_id
    listed = wait_until(lambda: len(qstash.dlq.list().messages) == 3 and qstash.dlq.list().messages)
    entries = {m.message_id: m for m in listed}
    assert set(entries) == {a, b, c}
    return {
        "A": entries[a],
        "B": entries[b],
        "C": entries[c],
        "url_a": url_a,
        "url_b": url_b,
        "t0": t0,
    }


def test_dlq_filters_and_pagination(broker: Broker, destination: Destination, p: str) -> None:
    qstash = broker.client()
    e = _three_dlq_entries(broker, destination, p)

    def ids(**flt: Any) -> set[str]:
        return {m.message_id for m in qstash.dlq.list(filter=flt).messages}  # type: ignore[arg-type]

    a, b, c = e["A"].message_id, e["B"].message_id, e["C"].message_id
    assert ids(url=e["url_a"]) == {a}
    assert ids(url=e["url_b"]) == {b, c}
    assert ids(queue="dq") == {b}
    assert ids(response_status=500) == {a, c}
    assert ids(response_status=404) == {b}
    assert ids(url=e["url_b"], response_status=500) == {c}
    assert ids(message_id=a) == {a}
    assert ids(queue="other") == set()
    assert ids(label="lab-a") == {a}
    assert e["A"].label == "lab-a"
    assert ids(from_time=e["t0"], to_time=now_ms()) == {a, b, c}
    assert ids(from_time=now_ms() + 60_000) == set()
    assert ids(to_time=e["t0"] - 1) == set()

    earliest = [m["messageId"] for m in call(broker, "GET", "/v2/dlq").json()["messages"]]
    latest = call(broker, "GET", "/v2/dlq", params={"order": "latestFirst"}).json()["messages"]
    assert earliest == [a, b, c]
    assert [m["messageId"] for m in latest] == [c, b, a]

    # Raw pages of one: a cursor on every page but the last, which has no cursor key at all.
    seen: list[str] = []
    cursor = None
    for page in range(3):
        res = call(
            broker, "GET", "/v2/dlq", params={"count": 1, **({"cursor": cursor} if cursor else {})}
        )
        body = res.json()
        assert len(body["messages"]) == 1
        seen += [m["dlqId"] for m in body["messages"]]
        if page < 2:
            assert body["cursor"]
            cursor = body["cursor"]
        else:
            assert "cursor" not in body
    assert sorted(seen) == sorted(x.dlq_id for x in (e["A"], e["B"], e["C"]))
    assert "cursor" not in call(broker, "GET", "/v2/dlq", params={"count": 3}).json()
    two = call(broker, "GET", "/v2/dlq", params={"count": 2, "responseStatus": 500}).json()
    assert len(two["messages"]) == 2
    assert "cursor" not in two

    # The SDK pages the same way and ends with cursor None.
    sdk_seen, sdk_cursor, pages = [], None, 0
    while True:
        listed = qstash.dlq.list(cursor=sdk_cursor, count=2)
        sdk_seen += [m.dlq_id for m in listed.messages]
        pages += 1
        sdk_cursor = listed.cursor
        if sdk_cursor is None:
            break
        assert pages < 5
    assert pages == 2
    assert sorted(sdk_seen) == sorted(seen)


def test_dlq_delete_single_and_bulk(broker: Broker, destination: Destination, p: str) -> None:
    qstash = broker.client()
    destination.script(p, (500, {}, b"no"))
    mids = [
        qstash.message.publish(url=destination.url + p, body=str(i), retries=0).message_id
        for i in range(5)
    ]
    dlq_ids = [dlq_entry(qstash, m).dlq_id for m in mids]

    qstash.dlq.delete(dlq_ids[0])
    error_of(call(broker, "DELETE", f"/v2/dlq/{dlq_ids[0]}"), 404)
    with pytest.raises(QStashError, match="404"):
        qstash.dlq.get(dlq_ids[0])

    assert qstash.dlq.delete_many([dlq_ids[1], "0-0"]) == 1
    res = call(broker, "DELETE", f"/v2/dlq?dlqIds={dlq_ids[2]}&dlqIds={dlq_ids[3]}")
    assert res.status_code == 200, res.text
    assert res.json()["deleted"] == 2
    assert [m.dlq_id for m in qstash.dlq.list().messages] == [dlq_ids[4]]
    assert qstash.dlq.delete_many([dlq_ids[1]]) == 0


def test_dlq_retry_one(broker: Broker, destination: Destination, p: str) -> None:
    qstash = broker.client()
    url = destination.url + p
    destination.script(p, (500, {}, b"boom"), (200, {}, b"ok"))
    res = qstash.message.publish(
        url=url, body="again", retries=0, headers={"X-Keep": "1"}, content_type="text/plain"
    )
    entry = dlq_entry(qstash, res.message_id)

    retried = call(broker, "POST", f"/v2/dlq/retry/{entry.dlq_id}")
    assert retried.status_code == 201, retried.text
    new_id = retried.json()["messageId"]
    assert new_id != res.message_id
    assert entry.dlq_id not in {m.dlq_id for m in qstash.dlq.list().messages}
    with pytest.raises(QStashError, match="404"):
        qstash.dlq.get(entry.dlq_id)
    error_of(call(broker, "POST", f"/v2/dlq/retry/{entry.dlq_id}"), 404)

    first, second = received(destination, p, 2)
    assert second.headers["upstash-message-id"] == new_id
    assert second.body == first.body == b"again"
    assert second.headers["x-keep"] == "1"
    assert second.headers["content-type"] == "text/plain"
    broker.receiver().verify(signature=second.headers["upstash-signature"], body="again", url=url)
    wait_until(lambda: states_of(qstash, new_id) == ["CREATED", "ACTIVE", "DELIVERED"])
    assert qstash.dlq.list().messages == []


def test_dlq_retry_request_content_type_keeps_the_messages(
    broker: Broker, destination: Destination, p: str
) -> None:
    """A DLQ retry is the same message again: the retry request's own ``Content-Type`` (HTTP
    clients add one, e.g. ``application/json``) describes that request, not the message."""
    qstash = broker.client()
    destination.script(p, (500, {}, b"boom"), (200, {}, b"ok"))
    res = qstash.message.publish(
        url=destination.url + p, body="plain", retries=0, content_type="text/plain"
    )
    entry = dlq_entry(qstash, res.message_id)
    retried = call(
        broker,
        "POST",
        f"/v2/dlq/retry/{entry.dlq_id}",
        headers={"Content-Type": "application/json"},
    )
    assert retried.status_code == 201, retried.text
    _, second = received(destination, p, 2)
    assert second.headers["upstash-message-id"] == retried.json()["messageId"]
    assert second.headers["content-type"] == "text/plain"


def test_dlq_retry_many(broker: Broker, destination: Destination, p: str) -> None:
    qstash = broker.client()
    destination.script(p, (500, {}, b"x"), (500, {}, b"x"), (500, {}, b"x"), (200, {}, b"ok"))
    mids = []
    for i in range(3):  # one after the other, so each takes one of the three 500s
        mids.append(
            qstash.message.publish(url=destination.url + p, body=str(i), retries=0).message_id
        )
        dlq_entry(qstash, mids[-1])
    entries = {m.message_id: m.dlq_id for m in qstash.dlq.list().messages}
    a, b, c = (entries[m] for m in mids)

    res = call(broker, "POST", f"/v2/dlq/retry?dlqIds={a}&dlqIds={b}")
    assert res.status_code == 201, res.text
    body = res.json()
    assert "cursor" not in body
    new_ids = [r["messageId"] for r in body["responses"]]
    assert len(new_ids) == 2
    assert not set(new_ids) & set(mids)
    assert [m.dlq_id for m in qstash.dlq.list().messages] == [c]
    got = received(destination, p, 5)
    assert set(message_ids(got[3:])) == set(new_ids)
    assert sorted(r.body for r in got[3:]) == [b"0", b"1"]


def test_dlq_retry_keeps_settings_and_header_overrides_them(
    broker: Broker, destination: Destination, p: str
) -> None:
    qstash = broker.client()
    destination.script(p, (500, {}, b"always"))
    res = qstash.message.publish(
        url=destination.url + p, body="x", retries=2, retry_delay=FAST_RETRY
    )
    entry = dlq_entry(qstash, res.message_id)
    assert entry.max_retries == 2
    assert len(destination.requests(p)) == 3

    # Without overrides the original settings apply again: 1 + 2 attempts.
    again = call(broker, "POST", f"/v2/dlq/retry/{entry.dlq_id}")
    assert again.status_code == 201, again.text
    second = dlq_entry(qstash, again.json()["messageId"])
    assert second.max_retries == 2
    assert second.retry_delay_expression == FAST_RETRY
    assert len(destination.requests(p)) == 6

    # A setting header on the retry request overrides the stored one: a single attempt.
    retried = call(
        broker, "POST", f"/v2/dlq/retry/{second.dlq_id}", headers={"Upstash-Retries": "0"}
    )
    assert retried.status_code == 201, retried.text
    once = dlq_entry(qstash, retried.json()["messageId"])
    assert once.max_retries == 0
    assert once.retry_delay_expression == FAST_RETRY
    assert len(destination.requests(p)) == 7  # then straight back to the DLQ
    assert [m.dlq_id for m in qstash.dlq.list().messages] == [once.dlq_id]


# -- events -----------------------------------------------------------------------------------


def test_events_for_delivered_and_retried_messages(
    broker: Broker, destination: Destination, p: str
) -> None:
    qstash = broker.client()
    url_ok, url_retry = destination.url + p + "-ok", destination.url + p + "-retry"
    destination.script(p + "-retry", (503, {"X-R": "1"}, b"busy"), (200, {}, b"ok"))
    ok = qstash.message.publish(url=url_ok, body="a").message_id
    wait_until(lambda: states_of(qstash, ok) == ["CREATED", "ACTIVE", "DELIVERED"])
    retried = qstash.message.publish(
        url=url_retry, body="b", retries=2, retry_delay=FAST_RETRY
    ).message_id
    expected = ["CREATED", "ACTIVE", "ERROR", "RETRY", "ACTIVE", "DELIVERED"]
    wait_until(lambda: states_of(qstash, retried) == expected)

    logs = events_of(qstash, ok)
    assert all(e.url == url_ok and e.message_id == ok for e in logs)
    assert [e.time for e in logs] == sorted(e.time for e in logs)
    logs = events_of(qstash, retried)
    error, retry = logs[2], logs[3]
    assert error.response_status == 503
    assert error.response_body == "busy"
    for event in (error, retry):
        assert event.next_delivery_time is not None
        assert error.time + 50 <= event.next_delivery_time <= error.time + 5000
    assert logs[4].time >= retry.next_delivery_time - 5  # type: ignore[operator]

    in_progress = qstash.log.list(
        filter={"message_ids": [ok, retried], "state": LogState.IN_PROGRESS}
    ).logs
    assert sorted(e.state.value for e in in_progress) == [
        "ACTIVE",
        "ACTIVE",
        "ACTIVE",
        "ERROR",
        "RETRY",
    ]
    delivered = qstash.log.list(filter={"state": LogState.DELIVERED}).logs
    assert {e.message_id for e in delivered} >= {ok, retried}
    assert all(e.state == LogState.DELIVERED for e in delivered)
    assert {e.message_id for e in qstash.log.list(filter={"url": url_retry}).logs} == {retried}


def test_events_pagination_has_no_cursor_on_last_page(
    broker: Broker, destination: Destination, p: str
) -> None:
    qstash = broker.client()
    mid = qstash.message.publish(url=destination.url + p, body="a").message_id
    wait_until(lambda: states_of(qstash, mid) == ["CREATED", "ACTIVE", "DELIVERED"])
    total = len(call(broker, "GET", "/v2/events").json()["events"])
    assert total >= 3

    full = call(broker, "GET", "/v2/events", params={"count": total}).json()
    assert len(full["events"]) == total
    assert "cursor" not in full

    # Pages of one over this message's events: each has a cursor until the last.
    seen: list[str] = []
    cursor: str | None = None
    last: dict[str, Any] = {}
    for _ in range(10):
        params: dict[str, Any] = {"count": 1, "messageIds": mid}
        if cursor:
            params["cursor"] = cursor
        last = call(broker, "GET", "/v2/events", params=params).json()
        seen += [e["state"] for e in last["events"]]
        if "cursor" not in last:
            break
        assert last["cursor"]  # never an empty string
        cursor = last["cursor"]
    assert "cursor" not in last
    assert list(reversed(seen)) == ["CREATED", "ACTIVE", "DELIVERED"]

    # The SDK follows the same cursors to the end.
    sdk_states: list[str] = []
    sdk_cursor: str | None = None
    for _ in range(10):
        page = qstash.log.list(cursor=sdk_cursor, count=2, filter={"message_id": mid})
        sdk_states += [e.state.value for e in page.logs]
        sdk_cursor = page.cursor
        if sdk_cursor is None:
            break
    assert sdk_cursor is None
    assert list(reversed(sdk_states)) == ["CREATED", "ACTIVE", "DELIVERED"]


# -- batch ------------------------------------------------------------------------------------


def test_batch_json_mixed_queue_and_plain(broker: Broker, destination: Destination, p: str) -> None:
    qstash = broker.client()
    qstash.queue.upsert("batch-q", parallelism=1)
    url_a, url_b = destination.url + p + "-a", destination.url + p + "-b"
    res = qstash.message.batch_json(
        [
            {"url": url_a, "body": {"n": 1}},
            {"url": url_b, "body": {"n": 2}, "queue": "batch-q"},
            {"url": url_a, "body": {"n": 3}, "headers": {"X-H": "h"}, "method": "PUT"},
            {"url": url_b, "body": {"n": 4}, "queue": "batch-q"},
        ]
    )
    assert len(res) == 4
    ids = [r.message_id for r in res]  # type: ignore[union-attr]
    assert len(set(ids)) == 4
    got_a = received(destination, p + "-a", 2)
    got_b = received(destination, p + "-b", 2)
    assert {r.headers["upstash-message-id"]: r.body for r in got_a} == {
        ids[0]: b'{"n": 1}',
        ids[2]: b'{"n": 3}',
    }
    assert message_ids(got_b) == [ids[1], ids[3]]  # FIFO through the queue
    third = next(r for r in got_a if r.headers["upstash-message-id"] == ids[2])
    assert third.method == "PUT"
    assert third.headers["x-h"] == "h"
    assert all(r.headers["content-type"] == "application/json" for r in got_a + got_b)
    assert {e.queue for e in events_of(qstash, ids[1])} == {"batch-q"}
    assert {e.queue for e in events_of(qstash, ids[0])} == {None}


def test_batch_bad_item_gets_error_slot(broker: Broker, destination: Destination, p: str) -> None:
    qstash = broker.client()
    dest = destination.url + p
    res = call(
        broker,
        "POST",
        "/v2/batch",
        json=[
            {"destination": dest, "headers": {}, "body": "ok1", "queue": None},
            {"destination": "ftp://x", "headers": {}, "body": "bad", "queue": None},
            {"destination": dest, "headers": {"Upstash-Retries": "abc"}, "body": "bad"},
            {"destination": dest, "headers": {}, "body": "bad", "queue": "bad name!"},
            {"destination": dest, "headers": {"Upstash-Delay": "5s"}, "body": "bad", "queue": "bq"},
            {
                "destination": dest,
                "headers": {"upstash-forward-x-low": "1"},
                "body": "ok2",
                "queue": "bq",
            },
        ],
    )
    assert res.status_code == 200, res.text
    slots = res.json()
    assert len(slots) == 6
    for i in (1, 2, 3, 4):
        assert set(slots[i]) == {"error"}, slots[i]
        assert slots[i]["error"]
    assert "scheme" in slots[1]["error"]
    good = [slots[0]["messageId"], slots[5]["messageId"]]
    got = received(destination, p, 2)
    assert {r.headers["upstash-message-id"]: r.body for r in got} == {
        good[0]: b"ok1",
        good[1]: b"ok2",
    }
    assert next(r for r in got if r.body == b"ok2").headers["x-low"] == "1"
    publish_barrier(broker, destination, p)
    assert len(destination.requests(p)) == 2
    assert [q.name for q in qstash.queue.list()] == ["bq"]
    assert {e.message_id for e in qstash.log.list(filter={"url": dest}).logs} == set(good)

    error_of(call(broker, "POST", "/v2/batch", json=[]), 400)
    error_of(call(broker, "POST", "/v2/batch", json={"destination": dest}), 400)
