"""The HTTP/1.1 protocol of tierq's servers (the app's and the broker's): uvicorn's httptools
protocol, except that a response's head goes out with its body, in one write.

uvicorn writes a response's status line and headers when the app sends
``http.response.start``, and its body when the app sends ``http.response.body``: two writes,
two ``send`` system calls, for nearly every response (a JSON reply, a delivery's answer, a
publish's), although the body follows at once: py-spy put uvicorn's two writes at ~5 % of the
app's samples under 20 ms jobs (``bench/dispatch.py`` A), the body's a third of that. Here the
head waits for the first write after it and goes with it. A response whose body does not
follow in the same turn of the event loop (a stream, e.g. SSE, whose client waits for the head)
gets its head written alone at the end of that turn. Measured (``bench/http_writes.py``, a bare
ASGI app, 8 keep-alive connections, alternating rounds): in a quiet spell of the VM the
server's CPU per request 20.6 -> 18.1 µs (x 0.88), 4 of 4 rounds; in slow spells, where rounds
scatter by tens of percent, 0.82-1.09 over four invocations: no effect told apart from the drift.
"""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

_HEAD = b"HTTP/1.1 "
_INFORMATIONAL = ord("1")  # "HTTP/1.1 100 Continue": the client waits for it, it goes at once


class HeadWithBody:
    """A request's view of its connection's transport: the response's head (the first write
    that is a final status line) is held until the next write, or until the end of this turn
    of the event loop; everything else goes through."""

    __slots__ = ("_held", "_loop", "_transport", "_waited")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None
        self._waited = False  # a head was held once (a request has one response)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held + bytes(data))
        elif (
            not self._waited
            and isinstance(data, bytes)
            and data.startswith(_HEAD)
            and data[len(_HEAD)] != _INFORMATIONAL
        ):
            self._held, self._waited = data, True
            self._loop.call_soon(self.flush)
        else:
            self._transport.write(data)

    def flush(self) -> None:
        """Write the held head now (nothing followed it in its turn)."""
        held = self._held
        if held is not None:
            self._held = None
            if not self._transport.is_closing():  # the client went away meanwhile
                self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:  # get_extra_info, pause_reading, ...
        return getattr(self._transport, name)


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol whose requests write through :class:`HeadWithBody`. Pass
    it as ``uvicorn.Config(http=HttpProtocol)``."""

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        cycle.transport = HeadWithBody(cycle.transport, self.loop)  # type: ignore[assignment]
        super()._start_asgi_task(cycle, app)


def server_config(app: Any, host: str, port: int, **options: Any) -> uvicorn.Config:
    """The ``uvicorn.Config`` of one of tierq's servers (``options``: uvicorn's others): this
    protocol, the app's lifespan on, no access log (tierq logs its own lines)."""
    return uvicorn.Config(
        app, host=host, port=port, access_log=False, lifespan="on", http=HttpProtocol, **options
    )
