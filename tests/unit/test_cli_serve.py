"""`tierq serve` refuses to start without real secrets (dev conveniences are `tierq dev` only);
``--workers`` and the supervisor of several app processes."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import json
import os
import signal
import sys
from collections.abc import Iterator

import pytest
import structlog
import uvicorn
from pydantic import ValidationError
from typer.testing import CliRunner

from tierq import processes
from tierq.cli import app
from tierq.config import Settings
from tierq.embedded_redis import free_port
from tierq.observability.logging import configure_logging
from tierq.processes import Supervisor, bind_socket, usable_cpus, worker_count


def test_serve_refuses_to_start_without_real_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    secrets = [
        "TIERQ_API_KEYS", "TIERQ_ADMIN_TOKEN", "TIERQ_EVENTS_SECRET", "TIERQ_REDIS_URL",
        "QSTASH_TOKEN", "QSTASH_CURRENT_SIGNING_KEY", "QSTASH_NEXT_SIGNING_KEY",
    ]  # fmt: skip
    for name in secrets:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TIERQ_ADMIN_TOKEN", "set-but-not-enough")
    result = CliRunner().invoke(app, ["serve", "--port", "1"])
    assert result.exit_code == 2
    for missing in ("TIERQ_API_KEYS", "TIERQ_EVENTS_SECRET", "QSTASH_TOKEN", "TIERQ_REDIS_URL"):
        assert missing in result.output
    assert "TIERQ_ADMIN_TOKEN" not in result.output.split("missing:")[1]


# -- --workers: parsing, and the supervisor with stand-in children -----------------------------


def secrets_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "TIERQ_API_KEYS": '{"k_unit_test": {"id": "u", "plan": "paid"}}',
        "TIERQ_ADMIN_TOKEN": "unit-admin", "TIERQ_EVENTS_SECRET": "unit-events",
        "TIERQ_REDIS_URL": "redis://127.0.0.1:1/0", "QSTASH_TOKEN": "unit-token",
        "QSTASH_CURRENT_SIGNING_KEY": "unit-current", "QSTASH_NEXT_SIGNING_KEY": "unit-next",
    }.items():  # fmt: skip
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize(("value", "expected"), [(1, 1), ("3", 3), (" 2 ", 2), ("AUTO", None)])
def test_worker_count(value: int | str, expected: int | None) -> None:
    assert worker_count(value) == (expected or usable_cpus())


@pytest.mark.parametrize("value", [0, -1, "0", "-2", "x", "", "1.5"])
def test_worker_count_refuses(value: int | str) -> None:
    with pytest.raises(ValueError, match="number >= 1 or 'auto'"):
        worker_count(value)


def test_workers_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().workers == 1
    monkeypatch.setenv("TIERQ_WORKERS", "auto")
    assert Settings().workers == "auto"
    monkeypatch.setenv("TIERQ_WORKERS", "4")
    assert Settings().workers == 4
    monkeypatch.setenv("TIERQ_WORKERS", "0")
    with pytest.raises(ValidationError):
        Settings()


@pytest.mark.parametrize("option", ["0", "many"])
def test_serve_refuses_a_bad_workers_option(monkeypatch: pytest.MonkeyPatch, option: str) -> None:
    secrets_env(monkeypatch)
    result = CliRunner().invoke(app, ["serve", "--port", "1", "--workers", option])
    assert result.exit_code == 2
    assert "--workers" in result.output


# A stand-in child: says ready on its fd (or not), then behaves as told until SIGTERM.
CHILD = """
import os, signal, sys, time
fd, how = int(sys.argv[1]), sys.argv[2]
if how == "fail":
    sys.exit(3)
signal.signal(signal.SIGTERM, signal.SIG_IGN if how == "stubborn" else
              lambda *_: sys.exit(0))
os.write(fd, b"ready\\n")
os.close(fd)
if how == "crash":
    sys.exit(1)
while True:
    time.sleep(60)
"""


@pytest.fixture
def logs() -> Iterator[io.StringIO]:
    """The supervisor's log lines (JSON)."""
    out = io.StringIO()
    configure_logging(json_output=True, stream=out)
    yield out
    structlog.reset_defaults()


def supervisor(hows: list[str], grace_s: float = 5.0) -> Supervisor:
    sock = bind_socket("127.0.0.1", 0)

    def command(index: int, ready_fd: int) -> list[str]:
        return [sys.executable, "-c", CHILD, str(ready_fd), hows[min(index, len(hows) - 1)]]

    return Supervisor(sock, len(hows), command, grace_s)


def gone(pids: list[int]) -> bool:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 0)
            return False
    return True


@pytest.mark.timeout(60)
def test_supervisor_stops_its_children_on_sigterm_and_exits_0(logs: io.StringIO) -> None:
    sup = supervisor(["serve", "serve", "serve"])
    seen: list[list[int]] = []

    def ready(pids: list[int]) -> None:
        seen.append(pids)
        os.kill(os.getpid(), signal.SIGTERM)  # as an operator would, once all are up

    sup.on_ready = ready
    assert sup.run() == 0
    [pids] = seen
    assert len(set(pids)) == 3
    assert gone(pids)
    assert sup.sock.fileno() == -1  # closed: the port is free again


def events(logs: io.StringIO) -> list[str]:
    """The ``event`` of every JSON log line written so far."""
    return [json.loads(line)["event"] for line in logs.getvalue().splitlines() if line]


@pytest.mark.timeout(60)
def test_supervisor_kills_a_child_that_does_not_stop_and_exits_1(
    monkeypatch: pytest.MonkeyPatch, logs: io.StringIO
) -> None:
    monkeypatch.setattr(processes, "STOP_MARGIN_S", 0.5)
    sup = supervisor(["serve", "stubborn"], grace_s=0)
    sup.on_ready = lambda pids: os.kill(os.getpid(), signal.SIGTERM)
    assert sup.run() == 1
    assert not sup.children
    assert "serve.worker_killed" in events(logs)


@pytest.mark.timeout(60)
def test_supervisor_stops_when_a_child_cannot_start(logs: io.StringIO) -> None:
    sup = supervisor(["serve", "fail"])
    assert sup.run() == 1
    assert sup.failed
    assert not sup.all_started
    assert "serve.worker_failed_to_start" in logs.getvalue()


@pytest.mark.timeout(60)
def test_supervisor_restarts_a_crashed_child_within_a_budget(
    monkeypatch: pytest.MonkeyPatch, logs: io.StringIO
) -> None:
    monkeypatch.setattr(processes, "MAX_RESTARTS", 3)
    sup = supervisor(["serve", "crash"])
    started: list[int] = []
    original = sup._start

    def counting(index: int) -> processes._Child:
        started.append(index)
        return original(index)

    monkeypatch.setattr(sup, "_start", counting)
    # worker 1 crashes right after each ready: restarted 3 times, the 4th exit stops it all
    sup.all_started = True  # as if both had been up once (else its first exit is a failed start)
    assert sup.run() == 1
    assert started == [0, 1, 1, 1, 1]
    assert events(logs).count("serve.worker_restarted") == 3
    assert "serve.restarting_too_often" in events(logs)


@pytest.fixture
def gc_restored() -> Iterator[None]:
    """``settle_heap`` freezes the heap and sets thresholds for the whole process: undo both."""
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_after_settle_heap_no_collection_walks_a_growing_heap_at_once(gc_restored: None) -> None:
    """A burst of jobs grows the heap by ~100,000 objects at a time; a collection stops the event
    loop while it walks its generations, so collections of the young and middle generations
    must stay small however much the heap grows (full ones are rare: none here)."""
    walked: list[tuple[int, int]] = []

    def record(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            generation = info["generation"]
            size = sum(len(gc.get_objects(g)) for g in range(generation + 1))
            walked.append((generation, size))

    processes.settle_heap()
    gc.callbacks.append(record)
    try:
        held = [[i] for i in range(300_000)]  # alive and tracked (lists): collections walk them
    finally:
        gc.callbacks.remove(record)
    assert held[-1] == [299_999]
    assert {g for g, _ in walked} == {0, 1}  # young and middle collections, no full one
    assert max(size for _, size in walked) <= 25_000  # was ~200,000 at 10,000 x 20


async def test_an_app_process_listens_on_its_port_with_several_acceptors(
    gc_restored: None,
) -> None:
    """Each TCP socket gets ``ACCEPTORS`` listening handles (one accept queue): every
    connection is served whichever handle took it, and stopping closes them all."""

    async def hello(scope: dict, receive: object, send: object) -> None:  # type: ignore[type-arg]
        assert scope["type"] == "http"
        await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b"hi"})  # type: ignore[operator]

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    port = free_port()
    config = uvicorn.Config(hello, host="127.0.0.1", port=port, lifespan="off", log_level="error")
    started = asyncio.Event()
    server = processes.AppServer(config, on_started=started.set)
    before_fds = open_fds()
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(10):
            await started.wait()
        assert len(server.servers) == processes.ACCEPTORS
        assert {s.sockets[0].getsockname()[1] for s in server.servers} == {port}

        async def get() -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = await reader.read()
            writer.close()
            return answer

        async with asyncio.timeout(10):
            answers = await asyncio.gather(*(get() for _ in range(50)))
        assert all(a.startswith(b"HTTP/1.1 200") and b"\r\nhi\r\n" in a for a in answers)
    finally:
        server.should_exit = True
        async with asyncio.timeout(10):
            await task
    assert open_fds() == before_fds  # every duplicate closed
