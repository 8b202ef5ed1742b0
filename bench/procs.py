"""Subprocesses for the benchmarks: output to a log file, readiness by polling, clean stop."""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path

import httpx

START_DEADLINE_S = 60.0
PROCESS_STOP_S = 10.0


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
