"""What a response's head written with its body (``tierq.web.http11.HttpProtocol``) saves a
server, against uvicorn's own httptools protocol (head and body in two writes), in one run.

Each round starts one server process per protocol, in turn: uvicorn on uvloop with a bare ASGI
app that answers every request with a small JSON body (content-length, as tierq's replies).
The client (this process, uvloop) sends R requests over C keep-alive connections, one request
in flight per connection, after a warm-up; the server's CPU time (``/proc/<pid>/stat``) per
request and the wall time are recorded. Rounds alternate the protocols (the VM's speed
drifts); the summary gives each protocol's median and the ratio of medians.

Usage::

    .venv/bin/python bench/http_writes.py [--rounds 4] [--requests 40000] [--connections 8]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    HOST,
    RESULTS_DIR,
    ROOT,
    HttpConn,
    Proc,
    clean_env,
    cpu_seconds,
    free_port,
    machine_info,
    pythonpath,
    results_head,
    run_async,
    write_results,
)

SERVER = """
import sys, uvicorn
from tierq.web.http11 import HttpProtocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
BODY = b'{"jobId":"j_0123456789abcdef","status":"queued"}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]
async def app(scope, receive, send):
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        await send({"type": "http.response.body", "body": BODY})
protocol = HttpProtocol if sys.argv[2] == "one_write" else HttpToolsProtocol
uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=int(sys.argv[1]), http=protocol,
    lifespan="off", log_level="warning", access_log=False, loop="uvloop")).run()
"""
PROTOCOLS = ("one_write", "uvicorn")
REQUEST = f"GET /x HTTP/1.1\r\nhost: {HOST}\r\n\r\n".encode()
DEFAULT_OUT = RESULTS_DIR / "http_writes.json"


async def load(port: int, requests: int, connections: int) -> None:
    """``requests`` requests over ``connections`` keep-alive connections, one in flight each."""

    async def one(n: int) -> None:
        conn = HttpConn(port)
        try:
            for _ in range(n):
                await conn.request(REQUEST)
        finally:
            conn.close()

    await asyncio.gather(*(one(requests // connections) for _ in range(connections)))


def run_round(protocol: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    port = free_port()
    env = {**clean_env(), "PYTHONPATH": pythonpath(ROOT / "src")}
    server = Proc(protocol, [sys.executable, "-c", SERVER, str(port), protocol], env,
                  workdir / f"{protocol}.log")  # fmt: skip
    server.start(workdir)
    try:
        server.wait_ready(f"http://{HOST}:{port}/")
        run_async(lambda: load(port, args.requests // 10, args.connections))  # warm-up
        before, began = cpu_seconds(server.pid), time.perf_counter()
        run_async(lambda: load(port, args.requests, args.connections))
        wall, after = time.perf_counter() - began, cpu_seconds(server.pid)
    finally:
        server.stop()
    if before is None or after is None:
        raise RuntimeError(f"{protocol}: the server's /proc/<pid>/stat is unreadable")
    return {
        "protocol": protocol,
        "server_cpu_us_per_request": round((after - before) * 1e6 / args.requests, 2),
        "wall_us_per_request": round(wall * 1e6 / args.requests, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--requests", type=int, default=40_000)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    started = time.time()
    machine = machine_info(("uvicorn", "uvloop", "httptools"))
    rounds = []
    with tempfile.TemporaryDirectory(prefix="tierq-http-writes-") as workdir:
        for i in range(args.rounds):
            for protocol in PROTOCOLS if i % 2 == 0 else reversed(PROTOCOLS):
                result = run_round(protocol, args, Path(workdir))
                rounds.append(result)
                print(f"  round {i + 1} {protocol}: {result}", flush=True)
    medians = {
        p: {
            key: statistics.median(r[key] for r in rounds if r["protocol"] == p)
            for key in ("server_cpu_us_per_request", "wall_us_per_request")
        }
        for p in PROTOCOLS
    }
    ratios = {
        key: round(medians["one_write"][key] / medians["uvicorn"][key], 3)
        for key in ("server_cpu_us_per_request", "wall_us_per_request")
    }
    doc = {
        **results_head("http writes: head with body vs uvicorn's two writes", started, machine),
        "config": vars(args) | {"out": str(args.out)},
        "rounds": rounds,
        "medians": medians,
        "one_write_over_uvicorn": ratios,
    }
    print(f"medians: {medians}\none_write / uvicorn: {ratios}")
    write_results(args.out, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
