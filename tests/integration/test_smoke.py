from __future__ import annotations

from brokers import Broker
from helpers import Destination, wait_until


def test_publish_is_delivered_and_signed(
    broker: Broker, destination: Destination, path: str
) -> None:
    qstash = broker.client()
    res = qstash.message.publish_json(url=destination.url + path + "?x=1", body={"a": 1})
    got = wait_until(lambda: destination.requests(path))
    req = got[0]
    assert req.query == "x=1"
    assert req.headers["upstash-message-id"] == res.message_id
    broker.receiver().verify(
        signature=req.headers["upstash-signature"],
        body=req.body.decode(),
        url=destination.url + path + "?x=1",
    )
