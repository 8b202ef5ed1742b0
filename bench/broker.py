"""Benchmark of the embedded QStash-compatible broker on loopback, driven by the official SDK.

Three real processes besides this one: an embedded ``redis-server``, the broker (``python -m
tierq broker``) and a no-op destination (this file run with ``--sink-port``: a bare ASGI app
under uvicorn that answers 200 at once and records, per ``Upstash-Message-Id``, the wall-clock
time the request arrived).

What it measures (nothing here asserts on timing; every wait has a deadline):

1. queue throughput at parallelism 1, 8 and 64: a fresh queue is created paused, N messages are
   batch-enqueued into it, the queue is resumed, and delivered messages per second are taken
   from the first to the last delivery the destination saw (so publishing is never the
   bottleneck); the CPU seconds each process used while delivering are recorded too;
2. publish-to-delivery latency: single non-queued publishes sent one at a time at a fixed
   interval; latency = destination receive time minus the client's ``time.time()`` taken just
   before the publish call (one machine, one clock).

Usage::

    .venv/bin/python bench/broker.py            # full run (about a minute on 2 cores)
    .venv/bin/python bench/broker.py --quick    # small N, a smoke check
    .venv/bin/python bench/broker.py --out /tmp/broker.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
from qstash import QStash

from common import BROKER_SETTINGS, Proc, clean_env, cpu_seconds, machine_info, pct, write_results
from tierq.broker.server.credentials import DEV_TOKEN
from tierq.embedded_redis import EmbeddedRedis, free_port

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "broker.json"
HOST = "127.0.0.1"
BROKER_KEY_PREFIX = "benchq"
PARALLELISMS = (1, 8, 64)
FULL_MESSAGES = {1: 2000, 8: 5000, 64: 5000}
QUICK_MESSAGES = {1: 200, 8: 500, 64: 500}
FULL_LATENCY_COUNT = 300
QUICK_LATENCY_COUNT = 50
LATENCY_INTERVAL_S = 0.010
PUBLISH_BATCH = 250  # messages per /v2/batch request
WARMUP_MESSAGES = 50
POLL_S = 0.05
MIN_DELIVERY_DEADLINE_S = 20.0
SLOWEST_RATE_PER_S = 50.0  # a delivery deadline allows at least this slow a rate
Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]


# -- the destination (runs in its own process) -------------------------------------------------


class Sink:
    """A bare ASGI app: any path but ``/_*`` is a delivery, answered 200 at once.

    ``GET /_stats`` counts, ``GET /_times`` id -> first receive time (``time.time()``),
    ``POST /_reset`` forgets everything.
    """

    def __init__(self) -> None:
        self.requests = 0
        self.retried = 0
        self.first_seen: dict[str, float] = {}

    def reset(self) -> None:
        self.requests = 0
        self.retried = 0
        self.first_seen = {}

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        arrived = time.time()
        more = True
        while more:  # drain the body; deliveries are small
            event = await receive()
            more = event["type"] == "http.request" and bool(event.get("more_body"))
        path: str = scope["path"]
        if path == "/_stats":
            stats = {
                "requests": self.requests,
                "unique": len(self.first_seen),
                "retried": self.retried,
            }
            await _reply(send, 200, json.dumps(stats).encode(), b"application/json")
        elif path == "/_times":
            await _reply(send, 200, json.dumps(self.first_seen).encode(), b"application/json")
        elif path == "/_reset":
            self.reset()
            await _reply(send, 200, b"{}", b"application/json")
        else:
            self.requests += 1
            headers = dict(scope["headers"])
            message_id = headers.get(b"upstash-message-id", b"").decode()
            if message_id:
                self.first_seen.setdefault(message_id, arrived)
            if headers.get(b"upstash-retried", b"0") != b"0":
                self.retried += 1
            await _reply(send, 200, b"ok", b"text/plain")


async def _reply(send: Send, status: int, body: bytes, content_type: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def run_sink(port: int) -> int:
    import uvicorn  # noqa: PLC0415 - only the destination process needs it

    uvicorn.run(Sink(), host=HOST, port=port, log_level="warning", access_log=False, lifespan="off")
    return 0


# -- small helpers ---------------------------------------------------------------------------


# -- the system under test -------------------------------------------------------------------


@dataclass
class System:
    broker_url: str
    sink_url: str
    broker: Proc
    sink: Proc
    redis: EmbeddedRedis
    http: httpx.Client

    def redis_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int(self.redis.pid_file.read_text().strip())
        return None

    def cpu(self) -> dict[str, float | None]:
        return {
            "broker": cpu_seconds(self.broker.pid),
            "redis": cpu_seconds(self.redis_pid()),
            "sink": cpu_seconds(self.sink.pid),
            "bench": cpu_seconds(os.getpid()),
        }

    def destination(self, tag: str) -> str:
        return f"{self.sink_url}/hit/{tag}"

    def sink_reset(self) -> None:
        self.http.post(f"{self.sink_url}/_reset").raise_for_status()

    def sink_stats(self) -> dict[str, int]:
        res = self.http.get(f"{self.sink_url}/_stats")
        res.raise_for_status()
        return dict(res.json())

    def sink_times(self) -> dict[str, float]:
        res = self.http.get(f"{self.sink_url}/_times")
        res.raise_for_status()
        return dict(res.json())

    def wait_delivered(self, count: int, deadline_s: float) -> tuple[dict[str, int], bool]:
        """Poll the destination until it saw ``count`` distinct messages or the deadline."""
        deadline = time.monotonic() + deadline_s
        while True:
            stats = self.sink_stats()
            if stats["unique"] >= count:
                return stats, True
            if time.monotonic() > deadline:
                return stats, False
            if self.broker.proc is None or self.broker.proc.poll() is not None:
                raise RuntimeError(f"broker exited:\n{self.broker.tail()}")
            time.sleep(POLL_S)


@contextlib.contextmanager
def running_system(workdir: Path) -> Iterator[System]:
    redis = EmbeddedRedis(workdir / "redis")
    broker_port, sink_port = free_port(HOST), free_port(HOST)
    broker_url, sink_url = f"http://{HOST}:{broker_port}", f"http://{HOST}:{sink_port}"
    sink = Proc(
        "sink",
        [sys.executable, str(Path(__file__).resolve()), "--sink-port", str(sink_port)],
        clean_env(),
        workdir / "sink.log",
    )
    broker: Proc | None = None
    http = httpx.Client(timeout=httpx.Timeout(30.0, connect=5.0))
    try:
        sink.start(workdir)
        redis.start()
        broker = Proc(
            "broker",
            [sys.executable, "-m", "tierq", "broker", "--host", HOST, "--port", str(broker_port),
             "--redis-url", redis.url, "--key-prefix", BROKER_KEY_PREFIX],
            {**clean_env(), **BROKER_SETTINGS},
            workdir / "broker.log",
        )  # fmt: skip
        broker.start(workdir)
        sink.wait_ready(f"{sink_url}/_stats")
        broker.wait_ready(f"{broker_url}/healthz")
        yield System(broker_url, sink_url, broker, sink, redis, http)
    except BaseException:
        for proc in (broker, sink):
            if proc is not None and proc.proc is not None:
                print(f"--- {proc.name} log tail ---\n{proc.tail()}", file=sys.stderr)
        raise
    finally:
        http.close()
        if broker is not None:
            broker.stop()
        sink.stop()
        redis.stop()


def delivery_deadline_s(count: int) -> float:
    return max(MIN_DELIVERY_DEADLINE_S, count / SLOWEST_RATE_PER_S)


# -- phases ----------------------------------------------------------------------------------


def warm_up(system: System, client: QStash) -> dict[str, Any]:
    """A few batch-published messages: connections, scripts and code paths get warm."""
    system.sink_reset()
    url = system.destination("warmup")
    client.message.batch([{"url": url, "body": str(i)} for i in range(WARMUP_MESSAGES)])
    stats, complete = system.wait_delivered(WARMUP_MESSAGES, MIN_DELIVERY_DEADLINE_S)
    return {"messages": WARMUP_MESSAGES, "delivered": stats["unique"], "complete": complete}


def _delta(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else after - before


def throughput(system: System, client: QStash, parallelism: int, count: int) -> dict[str, Any]:
    """Enqueue ``count`` messages into a paused queue, resume it, time the deliveries."""
    queue = f"bench-p{parallelism}-{uuid.uuid4().hex[:8]}"
    url = system.destination(queue)
    client.queue.upsert(queue, parallelism=parallelism, paused=True)
    system.sink_reset()
    ids: set[str] = set()
    publish_start = time.perf_counter()
    for start in range(0, count, PUBLISH_BATCH):
        items = [
            {"queue": queue, "url": url, "body": str(i)}
            for i in range(start, min(start + PUBLISH_BATCH, count))
        ]
        for reply in client.message.batch(items):  # type: ignore[arg-type]
            ids.add(reply.message_id)  # type: ignore[union-attr]
    publish_s = time.perf_counter() - publish_start

    cpu_before = system.cpu()
    resumed_at = time.time()
    client.queue.resume(queue)
    stats, complete = system.wait_delivered(count, delivery_deadline_s(count))
    cpu_after = system.cpu()
    times = sorted(t for mid, t in system.sink_times().items() if mid in ids)
    lag_after = client.queue.get(queue).lag
    with contextlib.suppress(Exception):  # the numbers are in; cleanup is best effort
        client.queue.delete(queue)

    delivered = len(times)
    seconds = times[-1] - times[0] if delivered > 1 else 0.0
    cpu = {name: _delta(cpu_after[name], before) for name, before in cpu_before.items()}
    return {
        "parallelism": parallelism,
        "messages": count,
        "delivered": delivered,
        "complete": complete,
        "seconds": round(seconds, 3),
        "per_second": round((delivered - 1) / seconds, 1) if seconds > 0 else None,
        "resume_to_last_s": round(times[-1] - resumed_at, 3) if times else None,
        "resume_to_first_ms": round((times[0] - resumed_at) * 1000, 1) if times else None,
        "queue_lag_after": lag_after,
        "sink_requests": stats["requests"],
        "duplicate_deliveries": stats["requests"] - stats["unique"],
        "retried_deliveries": stats["retried"],
        "publish": {
            "seconds": round(publish_s, 3),
            "per_second": round(count / publish_s, 1) if publish_s > 0 else None,
            "batch_size": PUBLISH_BATCH,
        },
        "cpu_seconds_while_delivering": {
            k: None if v is None else round(v, 2) for k, v in cpu.items()
        },
        "broker_cpu_ms_per_message": (
            round(cpu["broker"] * 1000 / delivered, 3)
            if cpu["broker"] is not None and delivered
            else None
        ),
    }


def latency(system: System, client: QStash, count: int, interval_s: float) -> dict[str, Any]:
    """Single non-queued publishes at a fixed pace; publish-to-delivery latency."""
    system.sink_reset()
    url = system.destination("latency")
    sent: dict[str, float] = {}
    call_ms: list[float] = []
    begin = time.monotonic()
    for i in range(count):
        pause = begin + i * interval_s - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        before = time.time()
        reply = client.message.publish(url=url, body=str(i))
        call_ms.append((time.time() - before) * 1000)
        sent[reply.message_id] = before  # type: ignore[union-attr]
    stats, complete = system.wait_delivered(count, MIN_DELIVERY_DEADLINE_S)
    times = system.sink_times()
    lat = [(times[mid] - t0) * 1000 for mid, t0 in sent.items() if mid in times]
    return {
        "count": count,
        "received": len(lat),
        "complete": complete,
        "interval_ms": round(interval_s * 1000, 1),
        "p50_ms": pct(lat, 50),
        "p90_ms": pct(lat, 90),
        "p99_ms": pct(lat, 99),
        "max_ms": round(max(lat), 2) if lat else None,
        "min_ms": round(min(lat), 2) if lat else None,
        "duplicate_deliveries": stats["requests"] - stats["unique"],
        "publish_call_p50_ms": pct(call_ms, 50),
        "publish_call_p99_ms": pct(call_ms, 99),
    }


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="small N: a smoke check")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the JSON")
    parser.add_argument("--sink-port", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # runs the finally blocks, which stop the subprocesses


def print_summary(doc: dict[str, Any]) -> None:
    machine = doc["machine"]
    print(
        f"tierq broker bench ({'quick' if doc['config']['quick'] else 'full'}), "
        f"{machine['cpu_count']} CPUs, Python {machine['python']}, {doc['duration_s']}s"
    )
    for key, row in doc["throughput"].items():
        flag = "" if row["complete"] else f"  INCOMPLETE ({row['delivered']} delivered)"
        rate = row["per_second"]
        print(
            f"  parallelism {key:>3}: {row['messages']:>5} msgs in {row['seconds']:>7.3f}s "
            f"= {rate if rate is not None else '-':>8} msg/s  "
            f"(broker {row['broker_cpu_ms_per_message']} CPU-ms/msg, "
            f"publish {row['publish']['per_second']} msg/s){flag}"
        )
    lat = doc["latency"]
    flag = "" if lat["complete"] else f"  INCOMPLETE ({lat['received']} received)"
    print(
        f"  latency: {lat['count']} publishes every {lat['interval_ms']} ms: "
        f"p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms, max {lat['max_ms']} ms{flag}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.sink_port is not None:
        return run_sink(args.sink_port)
    signal.signal(signal.SIGTERM, _terminate)
    sizes = QUICK_MESSAGES if args.quick else FULL_MESSAGES
    latency_count = QUICK_LATENCY_COUNT if args.quick else FULL_LATENCY_COUNT
    started = time.time()
    machine = machine_info(("tierq", "qstash", "httpx", "uvicorn", "starlette", "redis"))
    with (
        tempfile.TemporaryDirectory(prefix="tierq-bench-broker-") as tmp,
        running_system(Path(tmp)) as system,
    ):
        client = QStash(DEV_TOKEN, base_url=system.broker_url, retry=False)
        try:
            warmup = warm_up(system, client)
            rows = {str(p): throughput(system, client, p, sizes[p]) for p in PARALLELISMS}
            lat = latency(system, client, latency_count, LATENCY_INTERVAL_S)
        finally:
            client.http._client.close()
    doc = {
        "benchmark": "tierq broker (embedded Redis + broker + no-op destination, loopback)",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": round(time.time() - started, 1),
        "machine": machine,
        "config": {
            "quick": args.quick,
            "publish_batch": PUBLISH_BATCH,
            "queue_started_paused": True,
            "latency_interval_ms": LATENCY_INTERVAL_S * 1000,
            "broker_key_prefix": BROKER_KEY_PREFIX,
        },
        "loadavg_at_end": list(os.getloadavg()),
        "warmup": warmup,
        "throughput": rows,
        "latency": lat,
    }
    print_summary(doc)
    write_results(args.out, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
