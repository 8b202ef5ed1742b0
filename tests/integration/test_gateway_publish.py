"""The QStash gateway's batch publish (the SDK's request over aiohttp) against the real broker:
what is delivered, deduplication, and every failure becoming ``UpstreamError``."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket

import pytest

from brokers import Broker
from helpers import Destination, raw_http_server, wait_until
from tierq.broker.client import QStashGateway, _env_proxy, qstash_client
from tierq.config import Settings
from tierq.errors import UpstreamError


def gateway(url: str, token: str) -> QStashGateway:
    settings = Settings(qstash_url=url, qstash_token=token, qstash_timeout_s=5)
    return QStashGateway(qstash_client(settings), settings)


async def test_publishes_together_go_out_and_arrive_as_published(
    broker: Broker, destination: Destination, path: str
) -> None:
    gw = gateway(broker.url, broker.token)
    try:
        bodies = [json.dumps({"n": n}) for n in range(12)]
        ids = await asyncio.gather(
            *(
                gw.publish_raw(
                    "q_gw", destination.url + path, body, 0, headers={"traceparent": f"t-{n}"}
                )
                for n, body in enumerate(bodies)
            )
        )
        assert len(set(ids)) == 12
        assert all(i.startswith("msg_") for i in ids)
        assert gw.requests < 12  # group commit: some went out together
        got = wait_until(
            lambda: len(destination.requests(path)) == 12 and destination.requests(path)
        )
        assert sorted(r.body.decode() for r in got) == sorted(bodies)
        first = next(r for r in got if r.body == bodies[0].encode())
        assert first.headers["content-type"] == "application/json"
        assert first.headers["traceparent"] == "t-0"  # forwarded (Upstash-Forward-)
        assert first.headers["upstash-message-id"] in ids
        # the same deduplication id within the window: QStash's first message id again
        one = await gw.publish_raw("q_gw", destination.url + path, "{}", 0, "dedup-1")
        assert await gw.publish_raw("q_gw", destination.url + path, "{}", 0, "dedup-1") == one
    finally:
        await gw.aclose()


async def test_a_refused_publish_is_an_upstream_error(
    broker: Broker, destination: Destination, path: str
) -> None:
    gw = gateway(broker.url, "not-the-token")
    try:
        with pytest.raises(UpstreamError, match="401"):
            await gw.publish_raw("q_gw", destination.url + path, "{}", 0)
    finally:
        await gw.aclose()


async def test_an_unreachable_qstash_is_an_upstream_error(path: str) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gw = gateway(f"http://127.0.0.1:{port}", "token")
    try:
        with pytest.raises(UpstreamError, match="qstash publish failed"):
            await gw.publish_raw("q_gw", "http://127.0.0.1:9/x", "{}", 0)
    finally:
        await gw.aclose()


def test_proxies_come_from_the_environment_unless_bypassed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("http_proxy", "https_proxy", "no_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    assert _env_proxy("https://qstash.upstash.io/v2/batch") is None
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    assert _env_proxy("https://qstash.upstash.io/v2/batch") == "http://proxy.internal:3128"
    monkeypatch.setenv("NO_PROXY", "qstash.upstash.io")
    assert _env_proxy("https://qstash.upstash.io/v2/batch") is None


@pytest.mark.parametrize(
    ("answer", "told"),
    [
        # a redirect is refused, not followed (the SDK's client does not follow them either)
        (b"HTTP/1.1 307 Temporary Redirect\r\nLocation: http://127.0.0.1:9/v2/batch\r\n"
         b"Content-Length: 0\r\n\r\n", "307"),
        # a compressed error body is read once: its status and text reach the error
        (b"HTTP/1.1 500 Internal Server Error\r\nContent-Encoding: gzip\r\nContent-Length: "
         + str(len(gzip.compress(b"boom inside"))).encode() + b"\r\n\r\n"
         + gzip.compress(b"boom inside"), "boom inside"),
    ],
)  # fmt: skip
async def test_a_qstash_that_answers_oddly_is_an_upstream_error(answer: bytes, told: str) -> None:
    srv = await raw_http_server(lambda path: answer)
    port = srv.sockets[0].getsockname()[1]
    gw = gateway(f"http://127.0.0.1:{port}", "token")
    try:
        with pytest.raises(UpstreamError, match=told):
            await gw.publish_raw("q_gw", "http://127.0.0.1:9/x", "{}", 0)
    finally:
        await gw.aclose()
        srv.close()
        await srv.wait_closed()


async def test_a_closed_gateway_publishes_nothing(broker: Broker) -> None:
    gw = gateway(broker.url, broker.token)
    await gw.aclose()
    with pytest.raises(UpstreamError, match="closed"):
        await gw.publish_raw("q_gw", "http://127.0.0.1:9/x", "{}", 0)
    assert gw._session is None  # nothing opened after close
