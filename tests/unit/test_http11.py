"""The servers' HTTP/1.1 protocol (tierq.web.http11): a response's head goes out with its body
in one write; a stream's head goes out alone at the end of its turn, before its body exists.

uvicorn's real protocol and request cycle run here; only the socket under them is replaced by
a transport that records what is written to it (what a write system call would send)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import uvicorn
from uvicorn.server import ServerState

from tierq.web.http11 import HttpProtocol

pytestmark = pytest.mark.timeout(10)


class Recorder(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8000)}.get(
            name, default
        )

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def until(check: Any, deadline_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while not check():
        assert loop.time() < end, "not within the deadline"
        await asyncio.sleep(0.001)


def connection(app: Any) -> tuple[HttpProtocol, Recorder]:
    config = uvicorn.Config(app, http=HttpProtocol, lifespan="off", log_level="warning")
    protocol = HttpProtocol(config, ServerState(), {}, asyncio.get_running_loop())
    transport = Recorder()
    protocol.connection_made(transport)
    return protocol, transport


async def test_a_reply_is_written_in_one_write() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        body = b'{"ok":true}'
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode())]})  # fmt: skip
        await send({"type": "http.response.body", "body": body})

    protocol, transport = connection(app)
    for _ in range(2):  # and again on the same keep-alive connection
        before = len(transport.writes)
        protocol.data_received(b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n")
        await until(lambda before=before: len(transport.writes) > before)
        await asyncio.sleep(0)  # a head written alone would be followed by its body here
        assert len(transport.writes) == before + 1
        reply = transport.writes[-1]
        assert reply.startswith(b"HTTP/1.1 200 OK\r\n")
        assert reply.endswith(b'\r\n\r\n{"ok":true}')


async def test_a_stream_gets_its_head_before_its_body_exists() -> None:
    more = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})  # fmt: skip
        await more.wait()
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    protocol, transport = connection(app)
    protocol.data_received(b"GET /events HTTP/1.1\r\nhost: x\r\n\r\n")
    await until(lambda: len(transport.writes) == 1)
    head = transport.writes[0]
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert head.endswith(b"transfer-encoding: chunked\r\n\r\n")  # the head alone
    more.set()
    await until(lambda: len(transport.writes) == 3)
    assert transport.writes[1] == b"9\r\ndata: 1\n\n\r\n"
    assert transport.writes[2] == b"0\r\n\r\n"


async def test_100_continue_is_not_held() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        message = await receive()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"2")]})  # fmt: skip
        await send({"type": "http.response.body", "body": message["body"][:2]})

    protocol, transport = connection(app)
    protocol.data_received(
        b"POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n"
    )
    await until(lambda: len(transport.writes) == 1)
    assert transport.writes[0] == b"HTTP/1.1 100 Continue\r\n\r\n"
    protocol.data_received(b"hello")
    await until(lambda: len(transport.writes) == 2)
    assert transport.writes[1].startswith(b"HTTP/1.1 200 OK\r\n")
    assert transport.writes[1].endswith(b"\r\n\r\nhe")
