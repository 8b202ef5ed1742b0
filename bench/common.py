"""What the benchmarks share: subprocesses (log file, readiness by polling, clean stop), the
system under test (two embedded Redis servers, ``tierq broker``, ``tierq serve``; from this tree
or another), the app's production-style environment, the client's submitting helpers and event
loop, git worktrees of a baseline, /proc readings, percentiles, machine info, the JSON file."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import httpx

from tierq.broker.server.credentials import DEV_ACCOUNTS
from tierq.embedded_redis import EmbeddedRedis, free_port

try:
    import uvloop

    LOOP_FACTORY: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
    LOOP_FACTORY = None

T = TypeVar("T")
R = TypeVar("R")

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
HOST = "127.0.0.1"
START_DEADLINE_S = 60.0
PROCESS_STOP_S = 10.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
QUEUE_IDS = (
    "q_paid_stream", "q_free_stream", "q_paid_batch",
    "q_free_batch", "q_paid_vision", "q_free_vision",
)  # fmt: skip


class Proc:
    """A subprocess with its output in a log file, stopped politely then firmly."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.args, self.env, self.log = name, args, env, log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} is not running"
        return self.proc.pid

    def start(self, cwd: Path) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.args,
                env=self.env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_ready(self, url: str, deadline_s: float = START_DEADLINE_S) -> None:
        """Poll ``url`` until it answers 200; fail with the log's tail if the process dies."""
        deadline = time.monotonic() + deadline_s
        while True:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise RuntimeError(f"{self.name} exited ({code}):\n{self.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=1).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready after {deadline_s}s:\n{self.tail()}")
            time.sleep(0.1)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=PROCESS_STOP_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=PROCESS_STOP_S)


@contextlib.contextmanager
def procs_running(
    procs: Sequence[tuple[Proc, str]], workdir: Path, *, show_tails: bool = False
) -> Iterator[None]:
    """Start each ``(process, readiness URL)`` in turn, each ready before the next starts; stop
    the started ones at the end, last first. With ``show_tails``, a failure (in start-up or in
    the body) first prints the log tail of every started process to stderr."""
    running: list[Proc] = []
    try:
        for proc, ready_url in procs:
            running.append(proc)
            proc.start(workdir)
            proc.wait_ready(ready_url)
        yield
    except BaseException:
        if show_tails:
            for proc in running:
                if proc.proc is not None:
                    print(f"--- {proc.name} log tail ---\n{proc.tail()}", file=sys.stderr)
        raise
    finally:
        for proc in reversed(running):
            proc.stop()


BROKER_SETTINGS: dict[str, str] = {}
"""More of ``tierq broker``'s environment for every system a bench starts (``--broker-env``)."""


def broker_proc(
    workdir: Path, port: int, redis_url: str, key_prefix: str, env: Mapping[str, str] | None = None
) -> Proc:
    """``tierq broker`` on ``HOST:port`` over ``redis_url``, logging to ``workdir/broker.log``;
    its environment is this one's without tierq or QStash settings, plus ``env`` and
    ``BROKER_SETTINGS``."""
    return Proc(
        "broker",
        [sys.executable, "-m", "tierq", "broker", "--host", HOST, "--port", str(port),
         "--redis-url", redis_url, "--key-prefix", key_prefix],
        {**clean_env(), **(env or {}), **BROKER_SETTINGS},
        workdir / "broker.log",
    )  # fmt: skip


def app_proc(workdir: Path, port: int, env: dict[str, str]) -> Proc:
    """``tierq serve`` on ``HOST:port`` with ``env`` (see ``serve_env``), logging to
    ``workdir/app.log``."""
    return Proc(
        "app",
        [sys.executable, "-m", "tierq", "serve", "--host", HOST, "--port", str(port)],
        env,
        workdir / "app.log",
    )


# -- the system under test: broker + app, each with an embedded Redis of its own -------------


def redis_pid(server: EmbeddedRedis) -> int | None:
    """The pid of an embedded Redis server (from its pid file), ``None`` if unreadable."""
    try:
        return int(server.pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


@dataclass
class System:
    """A running broker and app (on ``HOST``) and their two Redis servers."""

    app_port: int
    broker_port: int
    app: Proc
    broker: Proc
    app_redis: EmbeddedRedis
    broker_redis: EmbeddedRedis

    @property
    def app_url(self) -> str:
        return f"http://{HOST}:{self.app_port}"

    @property
    def broker_url(self) -> str:
        return f"http://{HOST}:{self.broker_port}"

    def pids(self) -> dict[str, int | None]:
        return {
            "app": self.app.pid,
            "broker": self.broker.pid,
            "app_redis": redis_pid(self.app_redis),
            "broker_redis": redis_pid(self.broker_redis),
        }


AppEnv = Callable[[str, int, str], dict[str, str]]
"""``(app Redis URL, app port, broker URL)`` -> ``tierq serve``'s environment."""


@contextlib.contextmanager
def running_system(
    workdir: Path,
    *,
    broker_key_prefix: str,
    app_env: AppEnv,
    src: Path | None = None,
    show_tails: bool = False,
) -> Iterator[System]:
    """Both Redis servers, then the broker, then the app; all stopped at the end. With ``src``
    both run the code of that ``src`` folder (``PYTHONPATH``, see ``pythonpath``), without it
    the tierq this venv has installed. ``show_tails``: see ``procs_running``."""
    broker_redis = EmbeddedRedis(workdir / "broker-redis")
    app_redis = EmbeddedRedis(workdir / "app-redis")
    broker_port, app_port = free_port(), free_port()
    path = {} if src is None else {"PYTHONPATH": pythonpath(src)}
    try:
        broker_redis.start()
        app_redis.start()
        broker = broker_proc(workdir, broker_port, broker_redis.url, broker_key_prefix, path)
        env = app_env(app_redis.url, app_port, f"http://{HOST}:{broker_port}")
        app = app_proc(workdir, app_port, {**env, **path})
        system = System(app_port, broker_port, app, broker, app_redis, broker_redis)
        ready = [(broker, f"{system.broker_url}/healthz"), (app, f"{system.app_url}/healthz")]
        with procs_running(ready, workdir, show_tails=show_tails):
            yield system
    finally:
        app_redis.stop()
        broker_redis.stop()


def run_system(
    label: str,
    work: Callable[[System], Awaitable[dict[str, Any]]],
    *,
    broker_key_prefix: str,
    app_env: AppEnv,
    src: Path,
    log_dir: Path | None,
    on_error: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A fresh system from ``src`` in a temporary folder, ``work`` on it (in ``run_async``),
    stopped. Returns ``work``'s result, or ``on_error`` and the ``error`` (start-up included:
    recorded so that other runs go on), and the ``logs``' flags; the logs are copied to
    ``log_dir`` as ``<label>-app.log`` and ``<label>-broker.log``."""
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tierq-bench-") as tmp:
        workdir = Path(tmp)
        try:
            with running_system(
                workdir, broker_key_prefix=broker_key_prefix, app_env=app_env, src=src
            ) as system:
                out.update(run_async(lambda: work(system)))
        except Exception as exc:  # recorded, then the other runs go on
            out.update(on_error or {})
            out["error"] = f"{type(exc).__name__}: {exc}"[:3000]
            print(f"  [{label}] failed: {out['error'][:600]}", file=sys.stderr, flush=True)
        logs = [workdir / f"{name}.log" for name in ("app", "broker")]
        out["logs"] = {log.stem: log_flags(log) for log in logs}
        copy_logs(logs, log_dir, prefix=f"{label}-")
    return out


OPTIONAL_SPEEDUPS = ("hiredis",)
"""Installed in this venv, picked up by a library when present (redis-py parses replies with
hiredis): a tree whose pyproject does not list one runs without it, as it was installed."""


def pythonpath(src: Path) -> str:
    """``src``, after stub packages that hide the speed-ups its pyproject does not ask for."""
    pyproject = (src.parent / "pyproject.toml").read_text()
    hidden = [name for name in OPTIONAL_SPEEDUPS if f'"{name}' not in pyproject]
    if not hidden:
        return str(src)
    stubs = Path(tempfile.mkdtemp(prefix="tierq-hidden-"))
    for name in hidden:
        (stubs / f"{name}.py").write_text(f"raise ImportError('{name} hidden for this run')\n")
    return f"{stubs}{os.pathsep}{src}"


def raise_nofile(at_least: int | None = None) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE (the subprocesses inherit it): to the hard limit, or with
    ``at_least`` to that many (not lowered; capped by the hard limit). Returns the limits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard
    if at_least is not None:
        want = max(soft, at_least)
        if hard != resource.RLIM_INFINITY:
            want = min(hard, want)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# -- process logs ---------------------------------------------------------------------------


def log_flags(path: Path) -> dict[str, Any]:
    """How many lines of a process log look like warnings or errors, and a few of them."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return {"lines": 0}
    markers = ("warning", "error", "traceback", "exception")
    flagged = [line[:240] for line in lines if any(m in line.lower() for m in markers)]
    return {"lines": len(lines), "flagged": len(flagged), "first": flagged[:3]}


def copy_logs(logs: Iterable[Path], log_dir: Path | None, prefix: str = "") -> None:
    """Copy each log into ``log_dir`` (when given) as ``<prefix><its name>``; one that cannot
    be copied is left out."""
    if log_dir is None:
        return
    log_dir.mkdir(parents=True, exist_ok=True)
    for log in logs:
        with contextlib.suppress(OSError):
            shutil.copy(log, log_dir / f"{prefix}{log.name}")


# -- the client -----------------------------------------------------------------------------


def now_ms() -> float:
    """Wall-clock time in ms (the app stamps its records and events on the same clock)."""
    return time.time() * 1000


def run_async(work: Callable[[], Awaitable[T]]) -> T:
    """Run ``work()`` to its end on a fresh event loop (uvloop when installed)."""

    async def main() -> T:
        return await work()

    with asyncio.Runner(loop_factory=LOOP_FACTORY) as runner:
        return runner.run(main())


async def with_deadline(deadline_s: float, work: Awaitable[Any]) -> bool:
    """Run ``work``; ``False`` if the deadline passed first (``work`` is then cancelled)."""
    try:
        async with asyncio.timeout(max(deadline_s, 0.001)):
            await work
    except TimeoutError:
        return False
    return True


IDLE_REOPEN_S = 2.0


class HttpConn:
    """One keep-alive HTTP/1.1 connection to the app, opened on first use, reopened after an
    error, a ``Connection: close`` or ``IDLE_REOPEN_S`` unused (the server may have closed it:
    uvicorn's keep-alive timeout is 5 s). A request on a reused connection that the server
    closed before answering a byte is sent once more on a new one, as HTTP clients do. Replies
    must carry ``Content-Length`` (the app's JSON replies do)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.used_at = 0.0
        self.reopened = 0  # requests sent again after the server closed an idle connection

    async def request(self, data: bytes) -> tuple[int, bytes]:
        if self.writer is not None and time.monotonic() - self.used_at > IDLE_REOPEN_S:
            self.close()
        reused = self.writer is not None
        try:
            return await self._request(data)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            if not reused or (isinstance(exc, asyncio.IncompleteReadError) and exc.partial):
                raise
        self.reopened += 1
        return await self._request(data)

    async def _request(self, data: bytes) -> tuple[int, bytes]:
        if self.reader is None or self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(HOST, self.port)
        reader, writer = self.reader, self.writer
        try:
            writer.write(data)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            lower = head.lower()
            at = lower.find(b"\r\ncontent-length:")
            if at < 0:
                raise ValueError(f"reply {status} without Content-Length")
            end = lower.index(b"\r\n", at + 2)
            body = await reader.readexactly(int(lower[at + 17 : end]))
            if b"\r\nconnection: close" in lower:
                self.close()
        except BaseException:
            self.close()
            raise
        self.used_at = time.monotonic()
        return status, body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def json_post(port: int, path: str, body: bytes, headers: Mapping[str, str]) -> bytes:
    """An HTTP/1.1 POST of the JSON ``body``, whole, for ``HttpConn.request``."""
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n{extra}"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def submit_from(
    port: int,
    items: Iterable[T],
    submit: Callable[[HttpConn, T], Awaitable[R | str]],
    on_job: Callable[[R], None],
    errors: Counter[str],
    concurrency: int,
) -> None:
    """Submit every item, in order, from ``concurrency`` submitters, each with an ``HttpConn``
    of its own to the app on ``port``, like one user each: ``submit`` gives the job or why it
    failed; ``on_job`` runs as soon as a submit returns a job, and a failure is counted in
    ``errors``. Raw HTTP, not httpx: on this 2-core machine the client shares the CPU with the
    system it measures, and httpx cost it several hundred microseconds a submit."""
    todo = iter(items)

    async def submitter() -> None:
        conn = HttpConn(port)
        try:
            for item in todo:
                got = await submit(conn, item)
                if isinstance(got, str):
                    errors[got] += 1
                else:
                    on_job(got)
        finally:
            conn.close()

    await asyncio.gather(*(submitter() for _ in range(concurrency)))


# -- a baseline: another git ref of this repository -------------------------------------------


def git(*args: str) -> str:
    """``git -C ROOT args``' output, stripped; raises ``CalledProcessError`` on failure."""
    return subprocess.run(
        ["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


@contextlib.contextmanager
def worktree(ref: str) -> Iterator[tuple[Path, str]]:
    """A detached worktree of ``ref`` and its commit; removed at the end."""
    parent = Path(tempfile.mkdtemp(prefix="tierq-baseline-"))
    path = parent / "tree"
    try:
        git("worktree", "add", "--detach", str(path), ref)
        yield path, git("-C", str(path), "rev-parse", "HEAD")
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            git("worktree", "remove", "--force", str(path))
        shutil.rmtree(parent, ignore_errors=True)


def current_tree_info() -> dict[str, Any]:
    """The working tree: its HEAD and the paths under ``src`` that differ from it."""
    info: dict[str, Any] = {"ref": "working tree"}
    with contextlib.suppress(subprocess.CalledProcessError, OSError):
        info["head"] = git("rev-parse", "HEAD")
        info["dirty_paths"] = git("status", "--porcelain", "--", "src").splitlines()
    return info


# -- environment ----------------------------------------------------------------------------


def clean_env() -> dict[str, str]:
    """This process's environment without any tierq or QStash setting."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("TIERQ_", "QSTASH_"))}


def serve_env(
    *,
    redis_url: str,
    key_prefix: str,
    app_port: int,
    broker_url: str,
    api_keys: dict[str, dict[str, str]],
    queue_parallelism: int,
    extra: dict[str, str],
) -> dict[str, str]:
    """``tierq serve``'s environment: real-style secrets, the broker's dev credentials, all six
    queues at ``queue_parallelism`` with room to admit, plus ``extra`` settings."""
    dev = DEV_ACCOUNTS[0]
    queues = {q: {"parallelism": queue_parallelism, "admission_depth": 100_000} for q in QUEUE_IDS}
    return {
        **clean_env(),
        "TIERQ_REDIS_URL": redis_url,
        "TIERQ_KEY_PREFIX": key_prefix,
        "TIERQ_PUBLIC_URL": f"http://127.0.0.1:{app_port}",
        "TIERQ_API_KEYS": json.dumps(api_keys),
        "TIERQ_ADMIN_TOKEN": "tq-bench-admin",
        "TIERQ_EVENTS_SECRET": "tq-bench-events-secret",
        "TIERQ_QUEUES": json.dumps(queues),
        "QSTASH_URL": broker_url,
        "QSTASH_TOKEN": dev.token,
        "QSTASH_CURRENT_SIGNING_KEY": dev.current_key,
        "QSTASH_NEXT_SIGNING_KEY": dev.next_key,
        # one bench user follows every job: the per-user SSE cap would refuse most of them
        "TIERQ_SSE_MAX_PER_USER": "1000000",
        **extra,
    }


# -- readings -------------------------------------------------------------------------------


def pct(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile; ``None`` for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, round(p / 100 * len(ordered) + 0.4999))
    return round(ordered[min(rank, len(ordered)) - 1], 2)


def summary(values: list[float]) -> dict[str, Any]:
    return {
        "n": len(values),
        "p50": pct(values, 50),
        "p90": pct(values, 90),
        "p99": pct(values, 99),
        "mean": round(statistics.fmean(values), 2) if values else None,
        "max": round(max(values), 2) if values else None,
    }


def cpu_seconds(pid: int | None) -> float | None:
    """utime + stime of ``pid`` in seconds (Linux /proc), ``None`` if unreadable."""
    if pid is None:
        return None
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def vm_rss_kib(pid: int | None) -> int | None:
    """VmRSS of ``pid`` in KiB (from /proc), ``None`` if unreadable."""
    if pid is None:
        return None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


def open_fds(pid: int) -> int | None:
    """How many file descriptors ``pid`` has open, ``None`` if unreadable."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def machine_cpu_s() -> tuple[float, float] | None:
    """CPU seconds all CPUs spent busy (user, nice, system, irq, softirq) and stolen by the
    hypervisor (``steal``: this VM's vCPUs wanted to run and did not) since boot
    (``/proc/stat``); ``None`` if unreadable."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in first[1:9])
    return (user + nice + system + irq + softirq) / CLK_TCK, steal / CLK_TCK


def cpu_snapshot(pids: Mapping[str, int | None]) -> dict[str, float | None]:
    """CPU seconds so far of each named process, and of this one as ``bench_client``."""
    out = {name: cpu_seconds(pid) for name, pid in pids.items()}
    out["bench_client"] = cpu_seconds(os.getpid())
    return out


def cpu_spent(
    before: Mapping[str, float | None], after: Mapping[str, float | None]
) -> dict[str, float | None]:
    """CPU seconds spent between two readings (``cpu_snapshot``), by name of ``before``;
    ``None`` where either reading is missing."""
    out: dict[str, float | None] = {}
    for name, start in before.items():
        end = after.get(name)
        out[name] = None if start is None or end is None else end - start
    return out


def commandstats_calls(raw: Mapping[str, Any]) -> dict[str, int]:
    """Calls by command (``cmdstat_`` dropped) from a parsed ``INFO commandstats`` reply."""
    return {
        name.removeprefix("cmdstat_"): int(stats["calls"])
        for name, stats in raw.items()
        if isinstance(stats, dict) and "calls" in stats
    }


def speed_reference_ms(rounds: int = 7) -> float:
    """How fast this machine runs Python right now: the median CPU time (ms) of a fixed piece
    of pure-Python work (dicts, strings, calls, as a request's handling does). This VM's speed
    drifts by tens of percent between hours and sessions, every process's CPU per unit of work
    moving with it; results carry this reading taken at their start and end, so figures from
    different runs can be told apart from a change of the machine (larger is slower)."""
    times = []
    for _ in range(rounds):
        began = time.process_time()
        table: dict[str, int] = {}
        for i in range(20_000):
            key = f"k{i % 512}"
            table[key] = table.get(key, 0) + len(key.upper())
            "-".join((key, str(i))).split("-")
        times.append((time.process_time() - began) * 1000)
    return round(statistics.median(times), 2)


def machine_info(packages: tuple[str, ...]) -> dict[str, Any]:
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_total_mib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        first = Path("/proc/meminfo").read_text().splitlines()[0]
        mem_total_mib = round(int(first.split()[1]) / 1024)
    versions = {}
    for dist in packages:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    return {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model,
        "mem_total_mib": mem_total_mib,
        "loadavg_at_start": list(os.getloadavg()),
        "speed_reference_ms_at_start": speed_reference_ms(),
        "packages": versions,
    }


def results_head(benchmark: str, started: float, machine: dict[str, Any]) -> dict[str, Any]:
    """The first fields of a results file: what ran, when (``started``, a ``time.time()``),
    for how long until now, on what machine (with its load average now)."""
    return {
        "benchmark": benchmark,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": round(time.time() - started, 1),
        "machine": {
            **machine,
            "loadavg_at_end": list(os.getloadavg()),
            "speed_reference_ms_at_end": speed_reference_ms(),
        },
    }


def write_results(out: Path, doc: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    machine = doc.get("machine") or {}
    start, end = (machine.get(f"speed_reference_ms_at_{when}") for when in ("start", "end"))
    if start is not None:
        at_end = f", {end} at end" if end is not None else ""
        print(f"machine speed reference (ms of CPU, larger is slower): {start} at start{at_end}")
    print(f"wrote {out}")
