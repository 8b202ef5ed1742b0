"""Several app processes on one port: ``tierq serve --workers N`` (and ``tierq dev --workers N``).

The parent binds the listening socket itself (a port in use fails at once, before any child
starts) and starts N children, ``python -m tierq.processes``. Each child inherits the socket's
file descriptor and a pipe on which it says ``ready`` once its app has started (lifespan done,
accepting), then runs the app exactly as a single ``tierq serve`` does: its own Redis pools,
tail hub, delta writer, cancel subscription, dispatcher reconciler and Prometheus registry. The
kernel hands each new connection on the shared socket to one of the children; nothing is
shared between them but Redis and QStash (every cross-process decision — leases, dispatch,
admission, the run a delivery may start — is a Redis script; the singleton loops take Redis
locks).

The parent then only watches signals and its children:

- SIGTERM or SIGINT: the parent closes its copy of the socket and sends SIGTERM to every child.
  A child stops accepting, lets requests in flight (worker deliveries, SSE streams) finish for
  up to ``shutdown_grace_s``, cancels what is left, runs the app's shutdown (pending deltas
  written, the reconciler stopped) and exits 0. The parent exits 0 once every child did; a child
  still alive ``shutdown_grace_s`` + :data:`STOP_MARGIN_S` after the signal is killed and the
  parent exits 1. A second SIGINT/SIGTERM makes the children stop at once (no drain).
- A child that exits on its own after it was ready is restarted (same worker number, a new pid);
  its runs in flight were cut, and QStash redelivers them (their leases lapse; a redelivery
  cannot run a job twice). More than :data:`MAX_RESTARTS` exits within
  :data:`RESTART_WINDOW_S`, or a child that fails before the first start of all N completed
  (bad configuration, Redis unreachable: a restart would fail the same way), stops everything:
  the parent exits 1 for its own supervisor (systemd, Kubernetes) to decide.
- The parent killed outright (``kill -9``, the OOM killer): each child gets SIGTERM from the
  kernel (``PR_SET_PDEATHSIG``) and stops as above; no child outlives its parent.

Every log line of a child carries ``worker`` (its number, 0..N-1) and ``pid``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import math
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Generator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog
import uvicorn

from tierq.web.http11 import server_config

if TYPE_CHECKING:
    from tierq.broker.server.credentials import Account
    from tierq.config import Settings

log = structlog.get_logger("tierq.serve")


def run_server(main: Coroutine[Any, Any, None]) -> None:
    """Run a server on uvloop (installed with uvicorn[standard]; it cuts the event loop's cost
    per SSE write and Redis reply), or on asyncio's own loop where uvloop is missing."""
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:  # pragma: no cover - uvloop ships with uvicorn[standard] on Linux
        asyncio.run(main)
        return
    uvloop.run(main)


def dev_settings(host: str, port: int, broker_port: int) -> Settings:
    """Everything local: dev keys, the embedded broker with its dev credentials."""
    from tierq.broker.server.credentials import DEV_ACCOUNTS  # noqa: PLC0415
    from tierq.config import Settings  # noqa: PLC0415

    base = Settings()
    dev = DEV_ACCOUNTS[0]
    own_broker = base.qstash_url is None
    return base.with_dev_defaults().model_copy(
        update={
            "public_url": f"http://{host}:{port}",
            "qstash_url": base.qstash_url or f"http://{host}:{broker_port}",
            "qstash_token": base.qstash_token or dev.token,
            "qstash_current_signing_key": base.qstash_current_signing_key or dev.current_key,
            "qstash_next_signing_key": base.qstash_next_signing_key or dev.next_key,
            "broker": base.broker.model_copy(
                update={
                    "host": host,
                    "port": broker_port,
                    # the broker delivers to this app's worker routes, wherever it listens
                    "allowed_destinations": [
                        *base.broker.allowed_destinations,
                        f"http://{host}:{port}/api/worker/",
                    ],
                }
            )
            if own_broker
            else base.broker,
        }
    )


def broker_accounts(settings: Settings) -> dict[str, Account]:
    """The embedded broker's accounts (token → account): the configured QStash token and
    signing keys, and the dev accounts as ``broker.accept_dev_tokens`` decides (auto: only
    while no private token is set)."""
    from tierq.broker.server.credentials import build_accounts  # noqa: PLC0415

    return build_accounts(
        dev_accounts=settings.broker.accept_dev_tokens,
        token=settings.qstash_token,
        current_key=settings.qstash_current_signing_key,
        next_key=settings.qstash_next_signing_key,
    )


MAX_RESTARTS = 5
"""Children that may exit on their own (and be restarted) within :data:`RESTART_WINDOW_S`."""
RESTART_WINDOW_S = 60.0
STOP_MARGIN_S = 15.0
"""After the drain (``shutdown_grace_s``): time for the app's own shutdown before a kill."""
STARTUP_FAILURE = 3
"""A child's exit code when its app did not start (uvicorn's code for the same)."""
BACKLOG = 2048
ACCEPTORS = 4
"""Listening handles per TCP socket in one app process (``AppServer._more_acceptors``). At 500
streams starting: 1 → SSE connections read after 300-700 ms; 4 → after 20-240 ms, and the token
delay p99 no longer depends on whether the broker's connections were already open (2 and 8 were
no better than 4)."""
_PR_SET_PDEATHSIG = 1
_CLEAN_STOP = frozenset({0, -signal.SIGTERM, -signal.SIGINT})


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity mask; not a container's CPU quota)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def worker_count(value: int | str) -> int:
    """``--workers`` / ``TIERQ_WORKERS``: a number >= 1, or ``auto`` (one per usable core)."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return usable_cpus()
        if not text.isdigit():
            raise ValueError(f"workers must be a number >= 1 or 'auto', not {value!r}")
        value = int(text)
    if value < 1:
        raise ValueError(f"workers must be a number >= 1 or 'auto', not {value!r}")
    return value


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening socket all children share (IPv6 when ``host`` is an IPv6 address)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


# -- one app process ---------------------------------------------------------------------------


GC_YOUNG = 5_000
"""Allocations (net) between collections of the youngest generation (Python's default: 700)."""
GC_MIDDLE = 2
"""Young collections between two of the middle generation (Python's default: 10)."""
GC_OLDEST = 400
"""Middle collections between two full ones (Python's default: 10); the interpreter skips a full
one anyway until the old generation grew by a quarter."""


def settle_heap() -> None:
    """Once started: move everything alive now (modules, the app, its schemas and scripts) out
    of the cyclic GC's reach, and collect the young generation less often. Requests allocate
    many short-lived objects; with the defaults the collector ran every 700 allocations and each
    full collection re-walked the whole start-up heap (``gc_collect_main`` was 8 % of the app's
    samples under 500 streams, ``py-spy --native``).

    A collection of the middle generation walks everything the young collections promoted
    since the last one, and stops the event loop meanwhile: with 10,000 x 20 that was ~116,000
    objects, a 70-80 ms pause during a burst of 500 streams starting (every stream's tokens
    late at once; bench/streaming.py after its smaller rounds). At 5,000 x 2 the pauses stay
    near 10 ms for about the same total collector time; full collections come as rarely as
    before (every 4 million net allocations)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG, GC_MIDDLE, GC_OLDEST)


class AppServer(uvicorn.Server):
    """uvicorn's server, with three differences: ``on_started`` runs once the app has started
    and the socket listens; the app's local starts (``tierq.dispatch.local``) count as requests in
    flight, so a stopping server lets them finish within its grace too; and a signal that
    stopped it gracefully is not raised again afterwards (uvicorn's default), so a drained
    process exits 0 instead of dying of its SIGTERM."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None] | None = None):
        super().__init__(config)
        self.on_started = on_started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and not self.should_exit:
            runtime = getattr(getattr(self.config.app, "state", None), "runtime", None)
            if runtime is not None:  # local starts drain like the requests in flight
                runtime.local.drain_with(self.server_state.tasks)
            await self._more_acceptors()
            settle_heap()
            if self.on_started is not None:
                self.on_started()

    async def _more_acceptors(self) -> None:
        """Listen on each TCP socket ``ACCEPTORS`` times: duplicates of its descriptor, so one
        accept queue. uvloop's libuv accepts one connection per listening handle per turn of
        the event loop, so a busy process accepted ~700 connections a second: while 500 streams
        started, up to 776 connections waited in the kernel's accept queue and SSE connections
        took 300-700 ms to be read (bench/streaming.py). Each duplicate is one more accept per
        turn; uvicorn's shutdown closes them with its own servers."""
        config = self.config
        loop = asyncio.get_running_loop()

        def protocol() -> asyncio.Protocol:  # as uvicorn's startup makes for its own servers
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=self.server_state, app_state=self.lifespan.state
            )

        extra = []
        for server in self.servers:
            for sock in server.sockets or ():
                if sock.family not in (socket.AF_INET, socket.AF_INET6):
                    continue
                for _ in range(ACCEPTORS - 1):
                    dup = socket.socket(fileno=os.dup(sock.fileno()))
                    extra.append(
                        await loop.create_server(protocol, sock=dup, backlog=config.backlog)
                    )
        self.servers.extend(extra)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def app_server(
    app: Any,
    settings: Settings,
    host: str,
    port: int,
    *,
    log_level: str = "info",
    on_started: Callable[[], None] | None = None,
) -> AppServer:
    """The server of one app process: requests in flight get ``shutdown_grace_s`` to finish
    when it is told to stop (then they are cancelled and the app's shutdown runs)."""
    config = server_config(
        app,
        host,
        port,
        log_level=log_level,
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s),
    )
    return AppServer(config, on_started)


def _die_with_parent(parent: int) -> None:
    """SIGTERM (so: drain, then exit) when the parent dies, however it dies."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the line above
        raise SystemExit(STARTUP_FAILURE)


def child_settings(mode: str, host: str, port: int, broker_port: int) -> Settings:
    from tierq.config import Settings  # noqa: PLC0415

    if mode == "dev":
        return dev_settings(host, port, broker_port)  # the Redis URL comes from the env
    return Settings()


def child_main(argv: Sequence[str] | None = None) -> None:
    """One child: ``python -m tierq.processes --index I --fd F --ready-fd R ...``."""
    parser = argparse.ArgumentParser(prog="python -m tierq.processes")
    for name in ("--index", "--fd", "--ready-fd", "--parent", "--port", "--broker-port"):
        parser.add_argument(name, type=int, required=name != "--broker-port", default=0)
    parser.add_argument("--host", required=True)
    parser.add_argument("--mode", choices=["serve", "dev"], default="serve")
    args = parser.parse_args(argv)
    _die_with_parent(args.parent)

    from tierq.app import create_app  # noqa: PLC0415
    from tierq.observability.logging import configure_logging  # noqa: PLC0415

    settings = child_settings(args.mode, args.host, args.port, args.broker_port)
    configure_logging(
        json_output=args.mode == "serve" and settings.log_json,
        level=settings.log_level,
        secrets=settings.secret_values(),
    )
    # bound before the event loop starts: every task copies this context
    structlog.contextvars.bind_contextvars(worker=args.index, pid=os.getpid())
    sock = socket.socket(fileno=args.fd)

    def ready() -> None:
        with contextlib.suppress(OSError):
            os.write(args.ready_fd, b"ready\n")
            os.close(args.ready_fd)

    server = app_server(create_app(settings), settings, args.host, args.port, on_started=ready)
    run_server(server.serve(sockets=[sock]))
    if not server.started:
        raise SystemExit(STARTUP_FAILURE)


# -- the parent --------------------------------------------------------------------------------


@dataclass
class _Child:
    index: int
    proc: subprocess.Popen[bytes]
    ready_fd: int | None
    ready: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid


def _exit_text(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"exit code {code}"


@dataclass
class Supervisor:
    """Starts ``workers`` children on ``sock`` and watches them (see the module doc).
    ``command(index, ready_fd)`` is a child's command line; ``on_ready`` runs once, when all
    ``workers`` children have said ready for the first time."""

    sock: socket.socket
    workers: int
    command: Callable[[int, int], list[str]]
    grace_s: float
    env: dict[str, str] | None = None
    on_ready: Callable[[list[int]], None] | None = None
    children: dict[int, _Child] = field(default_factory=dict)
    stopping: bool = False
    failed: bool = False
    all_started: bool = False
    _signals: list[int] = field(default_factory=list)
    _exits: list[float] = field(default_factory=list)
    _deadline: float = 0.0
    _killed: bool = False
    _selector: selectors.BaseSelector = field(default_factory=selectors.DefaultSelector)

    def run(self) -> int:
        """Until every child has stopped; the exit code for the ``tierq`` command."""
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        handled = (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in handled}
        old_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        self._selector.register(wake_r, selectors.EVENT_READ, None)
        try:
            log.info("serve.starting", workers=self.workers, pid=os.getpid())
            for index in range(self.workers):
                self._start(index)
            while self.children:
                self._wait(wake_r)
                self._handle_signals()
                self._reap()
                if self.stopping and not self._killed and time.monotonic() > self._deadline:
                    self._kill_all()
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._selector.close()
            for fd in (wake_r, wake_w):
                os.close(fd)
            with contextlib.suppress(OSError):
                self.sock.close()
        log.info("serve.stopped", failed=self.failed)
        return 1 if self.failed else 0

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum != signal.SIGCHLD:
            self._signals.append(signum)

    def _start(self, index: int) -> _Child:
        ready_r, ready_w = os.pipe()
        try:
            proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
                self.command(index, ready_w),
                pass_fds=(self.sock.fileno(), ready_w),
                stdin=subprocess.DEVNULL,
                env=self.env,
            )
        finally:
            os.close(ready_w)
        child = self.children[index] = _Child(index, proc, ready_r)
        self._selector.register(ready_r, selectors.EVENT_READ, index)
        log.info("serve.worker_started", worker=index, worker_pid=proc.pid)
        return child

    def _wait(self, wake_r: int) -> None:
        timeout = 1.0  # SIGCHLD and the ready pipes wake it sooner
        if self.stopping and not self._killed:
            timeout = max(0.0, min(timeout, self._deadline - time.monotonic()))
        for key, _ in self._selector.select(timeout):
            if key.data is None:
                with contextlib.suppress(BlockingIOError):
                    while os.read(wake_r, 512):
                        pass
                continue
            self._read_ready(key.data, key.fd)

    def _read_ready(self, index: int, fd: int) -> None:
        try:
            data = os.read(fd, 64)
        except OSError:
            data = b""
        child = self.children.get(index)
        if data and child is not None and child.ready_fd == fd:
            if not child.ready:
                child.ready = True
                log.info("serve.worker_ready", worker=index, worker_pid=child.pid)
                self._maybe_all_ready()
            return
        self._close_ready_fd(fd, child)

    def _close_ready_fd(self, fd: int, child: _Child | None) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(fd)
        with contextlib.suppress(OSError):
            os.close(fd)
        if child is not None and child.ready_fd == fd:
            child.ready_fd = None

    def _maybe_all_ready(self) -> None:
        if self.all_started or self.stopping:
            return
        if len(self.children) == self.workers and all(c.ready for c in self.children.values()):
            self.all_started = True
            pids = [self.children[i].pid for i in sorted(self.children)]
            log.info("serve.ready", workers=self.workers, worker_pids=pids)
            if self.on_ready is not None:
                self.on_ready(pids)

    def _handle_signals(self) -> None:
        while self._signals:
            signum = self._signals.pop(0)
            name = signal.Signals(signum).name
            if not self.stopping:
                log.info("serve.stopping", signal=name, grace_s=self.grace_s)
                self._stop()
            else:  # a second signal: no drain
                log.warning("serve.stopping_now", signal=name)
                self._send_all(signal.SIGINT)

    def _stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        self._deadline = time.monotonic() + self.grace_s + STOP_MARGIN_S
        with contextlib.suppress(OSError):
            self.sock.close()  # the children close theirs as they stop: the port closes
        self._send_all(signal.SIGTERM)

    def _send_all(self, signum: int) -> None:
        for child in self.children.values():
            if child.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(signum)

    def _kill_all(self) -> None:
        self._killed = True
        for child in self.children.values():
            if child.proc.poll() is None:
                log.error("serve.worker_killed", worker=child.index, worker_pid=child.pid,
                          reason="did not stop in time")  # fmt: skip
                child.proc.kill()
        self.failed = True

    def _reap(self) -> None:
        for index, child in list(self.children.items()):
            code = child.proc.poll()
            if code is None:
                continue
            del self.children[index]
            if child.ready_fd is not None:
                self._close_ready_fd(child.ready_fd, child)
            self._exited(child, code)

    def _exited(self, child: _Child, code: int) -> None:
        fields = {"worker": child.index, "worker_pid": child.pid, "exit": _exit_text(code)}
        if self.stopping:
            if code not in _CLEAN_STOP:
                self.failed = True
            log.info("serve.worker_stopped", **fields)
            return
        log.warning("serve.worker_exited", **fields)
        if not self.all_started:
            log.error("serve.worker_failed_to_start", **fields)
            self.failed = True
            self._stop()
            return
        now = time.monotonic()
        self._exits = [t for t in self._exits if now - t < RESTART_WINDOW_S] + [now]
        if len(self._exits) > MAX_RESTARTS:
            log.error("serve.restarting_too_often", restarts=MAX_RESTARTS,
                      window_s=RESTART_WINDOW_S)  # fmt: skip
            self.failed = True
            self._stop()
            return
        new = self._start(child.index)
        log.info("serve.worker_restarted", worker=new.index, worker_pid=new.pid,
                 replaces=child.pid)  # fmt: skip


def child_command(
    mode: str, host: str, port: int, fd: int, broker_port: int = 0
) -> Callable[[int, int], list[str]]:
    """How the parent starts child ``index`` on the listening socket ``fd`` (no secret on the
    command line: children read their configuration from the environment, as the parent did)."""
    parent = os.getpid()

    def command(index: int, ready_fd: int) -> list[str]:
        return [
            sys.executable, "-m", "tierq.processes", "--mode", mode, "--index", str(index),
            "--fd", str(fd), "--ready-fd", str(ready_fd), "--parent", str(parent),
            "--host", host, "--port", str(port), "--broker-port", str(broker_port),
        ]  # fmt: skip

    return command


def supervise(
    settings: Settings,
    host: str,
    port: int,
    workers: int,
    *,
    mode: str = "serve",
    broker_port: int = 0,
    env: dict[str, str] | None = None,
    on_ready: Callable[[list[int]], None] | None = None,
) -> int:
    """Bind ``host:port``, run ``workers`` app processes on it until a signal stops them;
    the exit code (0: stopped cleanly; 1: a child failed, or had to be killed)."""
    try:
        sock = bind_socket(host, port)
    except OSError as exc:
        log.error("serve.bind_failed", host=host, port=port, error=str(exc))
        return 1
    port = sock.getsockname()[1]  # the port itself when 0 asked for any free one
    log.info("serve.listening", host=host, port=port, workers=workers)
    supervisor = Supervisor(
        sock,
        workers,
        child_command(mode, host, port, sock.fileno(), broker_port),
        settings.shutdown_grace_s,
        env=env,
        on_ready=on_ready,
    )
    return supervisor.run()


# -- tierq dev --workers N ---------------------------------------------------------------------


class _BrokerThread:
    """The embedded broker in a thread of the parent (its own event loop), for ``tierq dev``."""

    def __init__(self, app: Any, host: str, port: int) -> None:
        config = server_config(app, host, port, log_level="warning")
        self.started = threading.Event()
        self.server = AppServer(config, self.started.set)
        self.thread = threading.Thread(target=self._run, name="tierq-broker", daemon=True)

    def _run(self) -> None:
        try:
            run_server(self.server.serve())
        finally:
            self.started.set()  # also when it could not start

    def start(self) -> bool:
        self.thread.start()
        self.started.wait()
        return bool(self.server.started)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=STOP_MARGIN_S)


def dev_workers(
    settings: Settings,
    host: str,
    port: int,
    broker_port: int,
    workers: int,
    banner: Callable[[Settings, str], str],
) -> int:
    """``tierq dev --workers N``: the broker in this process, N app processes on ``port`` (each
    with the dev settings and this Redis); ``banner`` is printed once all N are ready."""
    from tierq.broker.server.app import create_broker_app  # noqa: PLC0415

    broker = settings.broker
    accounts = broker_accounts(settings)
    broker_url = f"http://{broker.host}:{broker.port}"
    thread = _BrokerThread(
        create_broker_app(broker, settings.redis_url or "", accounts), broker.host, broker.port
    )
    if not thread.start():
        log.error("dev.broker_failed_to_start", url=broker_url)
        return 1

    def ready(pids: list[int]) -> None:
        sys.stdout.write(banner(settings, broker_url))
        sys.stdout.write(f"  app processes     {len(pids)} (pids {', '.join(map(str, pids))})\n")
        sys.stdout.flush()

    try:
        env = {**os.environ, "TIERQ_REDIS_URL": settings.redis_url or ""}
        return supervise(
            settings, host, port, workers, mode="dev", broker_port=broker_port, env=env,
            on_ready=ready,
        )  # fmt: skip
    finally:
        thread.stop()


if __name__ == "__main__":
    child_main()
