"""Test support: real servers in background threads, a recording HTTP destination, waiting,
``tierq dev`` in a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn

from tierq.embedded_redis import free_port


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01) -> Any:
    """Poll ``predicate`` until it is truthy or the deadline passes (then fail the test)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


class ServerThread:
    """Serve an ASGI app with uvicorn on a free loopback port, in a thread of its own."""

    def __init__(self, app: Any, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on",
            access_log=False, interface="asgi3",
        )  # fmt: skip
        self.server = uvicorn.Server(config)
        self.server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.loop: asyncio.AbstractEventLoop | None = None

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        await self.server.serve()

    def start(self) -> ServerThread:
        self.thread.start()
        wait_until(lambda: self.server.started or not self.thread.is_alive(), timeout=15)
        if not self.server.started:
            raise RuntimeError("server did not start")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


@dataclass
class Received:
    path: str
    query: str
    method: str
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def url_path(self) -> str:
        return self.path + (f"?{self.query}" if self.query else "")


@dataclass
class Script:
    """How an endpoint answers: a list of (status, headers, body) used in turn, the last one
    repeated; ``delay`` seconds before answering; ``hold`` makes answers wait for a release."""

    answers: list[tuple[int, dict[str, str], bytes]] = field(
        default_factory=lambda: [(200, {}, b"ok")]
    )
    delay: float = 0.0
    hold: asyncio.Event | None = None


class Destination:
    """A real HTTP endpoint that records every request and answers as scripted per path."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.received: list[Received] = []
        self.scripts: dict[str, Script] = {}
        self.in_flight: dict[str, int] = {}
        self.max_in_flight: dict[str, int] = {}
        self.thread = ServerThread(self.app)

    @property
    def url(self) -> str:
        return self.thread.url

    def script(self, path: str, *answers: tuple[int, dict[str, str], bytes], delay: float = 0.0,
               hold: bool = False) -> Script:  # fmt: skip
        hold_event: asyncio.Event | None = None
        if hold:
            assert self.thread.loop is not None
            hold_event = asyncio.Event()
        s = Script(list(answers) or [(200, {}, b"ok")], delay, hold_event)
        with self.lock:
            self.scripts[path] = s
        return s

    def release(self, path: str) -> None:
        """Let held requests on ``path`` answer."""
        event = self.scripts[path].hold
        assert event is not None
        assert self.thread.loop is not None
        self.thread.loop.call_soon_threadsafe(event.set)

    def requests(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.received if r.path == path]

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        body = await read_body(receive)
        path = scope["path"]
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        with self.lock:
            self.received.append(
                Received(
                    path,
                    scope["query_string"].decode(),
                    scope["method"],
                    headers,
                    body,
                    time.monotonic(),
                )
            )
            count = sum(1 for r in self.received if r.path == path)
            script = self.scripts.get(path, Script())
            self.in_flight[path] = self.in_flight.get(path, 0) + 1
            self.max_in_flight[path] = max(self.max_in_flight.get(path, 0), self.in_flight[path])
        try:
            if script.delay:
                await asyncio.sleep(script.delay)
            if script.hold is not None:
                await script.hold.wait()
            status, extra, answer = script.answers[min(count, len(script.answers)) - 1]
        finally:
            with self.lock:
                self.in_flight[path] -= 1
        raw_headers = [(k.encode(), v.encode()) for k, v in extra.items()]
        await send({"type": "http.response.start", "status": status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": answer})


async def read_body(receive: Any) -> bytes:
    """The whole body of an ASGI HTTP request."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


async def answer_lifespan(
    receive: Any,
    send: Any,
    startup: Callable[[], Awaitable[None]] | None = None,
    shutdown: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Answer an ASGI app's lifespan until it shuts down: ``startup`` and ``shutdown`` (when
    given) are awaited before each is reported complete."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            if startup is not None:
                await startup()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            if shutdown is not None:
                await shutdown()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def async_wait_until(
    predicate: Callable[[], Any], within_s: float = 10.0, interval: float = 0.01
) -> Any:
    """``wait_until`` for coroutines: ``predicate`` returns an awaitable."""
    deadline = time.monotonic() + within_s
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within_s}s")
        await asyncio.sleep(interval)


def clean_env() -> dict[str, str]:
    """This process's environment without tierq or QStash settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("TIERQ_", "QSTASH_"))}


@dataclass
class DevCommand:
    """A running ``tierq dev``: its app on ``port``, its output in ``out``, its data (the
    embedded Redis's among it) in ``data_dir``; ``code`` is its exit code once stopped."""

    proc: subprocess.Popen[bytes]
    port: int
    out: Path
    data_dir: Path
    code: int | None = None

    def text(self) -> str:
        return self.out.read_text()

    def redis_pid(self) -> int | None:
        """The pid its embedded Redis wrote (``None`` when the file is gone)."""
        pid_file = self.data_dir / "redis" / "redis.pid"
        return int(pid_file.read_text()) if pid_file.exists() else None


@contextlib.contextmanager
def tierq_dev(tmp_path: Path, *options: str, stop_s: float) -> Iterator[DevCommand]:
    """``tierq dev`` (plus ``options``) on free ports with a clean environment and its data
    under ``tmp_path``; SIGINT at the end of the block, killed after ``stop_s``."""
    port, broker_port = free_port(), free_port()
    env = clean_env()
    env["TIERQ_DATA_DIR"] = str(tmp_path / "data")
    out = tmp_path / "dev.out"
    with out.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tierq", "dev", "--port", str(port),
             "--broker-port", str(broker_port), *options],
            env=env, stdout=sink, stderr=subprocess.STDOUT,
        )  # fmt: skip
    dev = DevCommand(proc, port, out, tmp_path / "data")
    try:
        yield dev
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            dev.code = proc.wait(timeout=stop_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            dev.code = proc.wait()


def most_at_once(intervals: list[tuple[int, int]]) -> int:
    """The most intervals that overlap at one instant (an end before a start at the same ms)."""
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = most = 0
    for _, step in edges:
        running += step
        most = max(most, running)
    return most


async def raw_http_server(answer: Callable[[str], bytes]) -> asyncio.Server:
    """An HTTP/1.1 server on a free loopback port that reads each request (head and a
    ``Content-Length`` body) and writes ``answer(path)`` back as raw bytes, keeping the
    connection open until the client closes it. For answers no framework would write."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                length = next(
                    (int(line.split(":", 1)[1]) for line in head.split("\r\n")
                     if line.lower().startswith("content-length:")),
                    0,
                )  # fmt: skip
                await reader.readexactly(length)
                writer.write(answer(head.split(" ")[1]))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)
