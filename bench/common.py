"""What the benchmarks share: subprocesses (log file, readiness by polling, clean stop), the
app's production-style environment, /proc readings, percentiles, machine info, the JSON file."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx

from tierq.broker.server.credentials import DEV_ACCOUNTS

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


def cpu_snapshot(pids: dict[str, int | None]) -> dict[str, float | None]:
    """CPU seconds so far of each named process, and of this one as ``bench_client``."""
    out = {name: cpu_seconds(pid) for name, pid in pids.items()}
    out["bench_client"] = cpu_seconds(os.getpid())
    return out


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
        "packages": versions,
    }


def write_results(out: Path, doc: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")
