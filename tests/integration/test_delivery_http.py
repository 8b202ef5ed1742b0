"""The broker's delivery client (aiohttp) against a real HTTP server answering raw bytes: what a
delivery reports of the answer, as the httpx client it replaced did."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from helpers import raw_http_server
from tierq.broker.server import delivery_http
from tierq.broker.server.delivery_http import DeliveryClient

ANSWERS = {
    "small": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    "empty": b"HTTP/1.1 204 No Content\r\n\r\n",
    "long-header": b"HTTP/1.1 200 OK\r\nContent-Security-Policy: "
    + b"a" * 9000
    + b"\r\nContent-Length: 2\r\n\r\nok",
    "utf8": "HTTP/1.1 200 OK\r\nX-Name: caf\u00e9\r\nContent-Length: 0\r\n\r\n".encode(),
    "big": b"HTTP/1.1 200 OK\r\nContent-Length: 300000\r\n\r\n" + b"x" * 300000,
}


@pytest.fixture
async def server() -> AsyncIterator[str]:
    srv = await raw_http_server(lambda path: ANSWERS[path.strip("/")])
    port = srv.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    srv.close()
    await srv.wait_closed()


@pytest.fixture
async def client() -> AsyncIterator[DeliveryClient]:
    made = DeliveryClient(4)
    yield made
    await made.close()


@pytest.mark.parametrize("path", ["small", "empty", "big"])
async def test_the_peer_address_is_known_however_small_the_answer(
    server: str, client: DeliveryClient, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiohttp hands a connection back as soon as a small body arrived; the peer must still be
    judged by its address, not taken for unknown (private): here every address counts as
    public, so ``private_peer`` must be False."""
    monkeypatch.setattr(delivery_http, "is_private_address", lambda host: False)
    got = await client.send("POST", f"{server}/{path}", b"{}", [("User-Agent", "t")], 1000)
    assert got.private_peer is False
    assert got.status in (200, 204)
    assert len(got.body) == {"small": 5, "empty": 0, "big": 1000}[path]  # capped at 1000


async def test_loopback_counts_as_private(server: str, client: DeliveryClient) -> None:
    got = await client.send("POST", f"{server}/small", b"{}", [], 1000)
    assert got.private_peer is True


async def test_long_and_non_ascii_response_headers_are_read(
    server: str, client: DeliveryClient
) -> None:
    got = await client.send("POST", f"{server}/long-header", b"{}", [], 1000)
    assert got.status == 200
    assert len(got.headers["Content-Security-Policy"][0]) == 9000
    got = await client.send("POST", f"{server}/utf8", b"{}", [], 1000)
    assert got.headers["X-Name"] == ["caf\u00e9"]
