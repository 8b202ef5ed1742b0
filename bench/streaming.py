"""Streaming benchmark of tierq on loopback: many live token streams, many idle SSE connections.

Black-box like ``bench/e2e.py``: two embedded Redis servers (the app's and the broker's),
``tierq broker`` and ``tierq serve`` as subprocesses. The client is cheap on purpose, so it is
not the bottleneck: raw asyncio streams on uvloop, HTTP/1.1 and SSE parsed by hand (chunked or
not), orjson per event. Nothing here asserts on timing; every wait has a deadline, and a
scenario that runs out of time is recorded as not finished.

A. streams K (K = 50, 100, 200, 500): K streamed jobs at once on the simulated model, 100
   tokens 20 ms apart (2.0 s of model time), submitted 64 at a time, each followed over SSE
   from the moment its submit returns. Per K: jobs completed, wall time from the first submit
   to the last terminal event, that over the model time (target: within 1.25 x model + 1 s),
   tokens/s, CPU of app / broker / both Redis servers (total and per token), token delay and
   correctness. Token delay = arrival time at the client - the delta event's ``ts``, counted
   once per token (whitespace word) of the event; ``ts`` is stamped when the event is written,
   so for an event carrying several tokens it is the delay of its OLDEST token (an upper bound
   for the others); ``token_delay_early_ms`` is the same for the text that was out before
   the client's stream was open (it reached the client as replay, late by the stream's
   opening; the sooner a job starts, the more of its text that is), ``token_delay_live_ms``
   for the rest, and ``submit_to_stream_open_ms`` how long that opening took;
   ``token_delay_by_window`` gives p50/p99 by when the text was written (250 ms windows from
   the first submit). Correctness per job: ``seq`` dense from 1 (no gap, no repeat), the
   deltas joined with no separator equal the ``completed`` result, 100 words, terminal
   ``completed``. ``--follow get`` (default: the shape issue 8 measured) has each client
   submit, then open ``eventsUrl`` on a connection of its own; ``--follow post`` has each
   submit ask for its job's events in its own response (``Accept: text/event-stream``), so
   the stream is open before the job exists (no early text).
B. idle SSE connections (N = 5000): ``q_paid_stream`` paused through the admin API so N jobs
   stay queued; N SSE connections opened, each waits for its first event (``queued``); the
   app's VmRSS before and after (2 s settle) gives KiB per connection (target: <= 20 KiB);
   ``GET /healthz`` latency while they are held. The connections are then closed and the
   system stopped (the paused queue and its jobs go away with the throw-away Redis).

``--baseline REF`` first runs the same scenarios against ``git worktree add --detach`` of REF
(broker and app started with this venv's python and ``PYTHONPATH=<worktree>/src``), then
against the working tree, and reports current / baseline ratios.

Usage::

    .venv/bin/python bench/streaming.py                        # K = 50,100,200,500; 5000 idle
    .venv/bin/python bench/streaming.py --quick                # K = 20,50; 300 idle
    .venv/bin/python bench/streaming.py --ks 50,500 --idle 1000
    .venv/bin/python bench/streaming.py --baseline HEAD        # HEAD vs the working tree
    .venv/bin/python bench/streaming.py --ks 500 --idle 0 --follow post --baseline-follow get
    .venv/bin/python bench/streaming.py --out /tmp/streaming.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from common import (
    BROKER_SETTINGS,
    HOST,
    LOOP_FACTORY,
    RESULTS_DIR,
    ROOT,
    HttpConn,
    System,
    cpu_snapshot,
    cpu_spent,
    current_tree_info,
    json_post,
    machine_cpu_s,
    machine_info,
    now_ms,
    open_fds,
    pct,
    raise_nofile,
    results_head,
    run_system,
    serve_env,
    speed_reference_ms,
    summary,
    vm_rss_kib,
    with_deadline,
    worktree,
    write_results,
)

try:
    import orjson

    loads: Callable[[bytes], Any] = orjson.loads
except ImportError:  # pragma: no cover - orjson is a tierq dependency
    loads = json.loads

DEFAULT_OUT = RESULTS_DIR / "streaming.json"
PAID_KEY = "tq_bench_paid"
ADMIN_TOKEN = "tq-bench-admin"  # what serve_env configures
APP_KEY_PREFIX = "tqstream"
BROKER_KEY_PREFIX = "benchstream"
STREAM_QUEUE = "q_paid_stream"
QUEUE_PARALLELISM = 1000  # the broker's maximum; >= every K
TOKENS = 100
TOKEN_LATENCY_MS = 20
MODEL_S = TOKENS * TOKEN_LATENCY_MS / 1000
TARGET_S = 1.25 * MODEL_S + 1.0
TARGET_P99_MS = 50.0  # issue 8, at K = 500
TARGET_APP_US = 60.0
IDLE_TARGET_KIB = 20.0
SUBMIT_CONCURRENCY = 64
FOLLOW_MODES = ("get", "post")
"""How scenario A's clients follow their jobs: "get" submits, then opens ``eventsUrl`` (a
browser's ``EventSource``); "post" asks for the events in the submit's own response
(``Accept: text/event-stream``, read with ``fetch``)."""
OPEN_CONCURRENCY = 128
SETTLE_S = 2.0
HEALTHZ_SAMPLES = 20
WARMUP_JOBS = 10
DEFAULT_KS = (50, 100, 200, 500)
QUICK_KS = (20, 50)
APP_SETTINGS: dict[str, str] = {}
"""``--app-env NAME=VALUE``: more of ``tierq serve``'s environment (e.g. TIERQ_DELTA_FLUSH_MS)."""
AUTH = {"Authorization": f"Bearer {PAID_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def ratio(current: float | None, baseline: float | None) -> float | None:
    if current is None or not baseline:
        return None
    return round(current / baseline, 3)


# -- the system under test ---------------------------------------------------------------------


def app_env(redis_url: str, app_port: int, broker_url: str) -> dict[str, str]:
    """``tierq serve``'s environment: the simulated model ``sim``, limits that never bind."""
    limits = {"paid": 100_000, "free": 100_000}
    model = {
        "provider": "simulated",
        "tokens": TOKENS,
        "token_latency_ms": TOKEN_LATENCY_MS,
        "limits": limits,
    }
    return serve_env(
        redis_url=redis_url,
        key_prefix=APP_KEY_PREFIX,
        app_port=app_port,
        broker_url=broker_url,
        api_keys={PAID_KEY: {"id": "bench-paid", "plan": "paid"}},
        queue_parallelism=QUEUE_PARALLELISM,
        extra={
            "TIERQ_MODELS": json.dumps({"sim": model}),
            "TIERQ_USER_LIMITS": json.dumps(limits),
            "TIERQ_USER_QUEUE_LIMITS": json.dumps(limits),
            "TIERQ_SSE_PING_S": "600",
            **APP_SETTINGS,
        },
    )


# -- a cheap SSE client ------------------------------------------------------------------------


class ChunkedDecoder:
    """Incremental decoder of an HTTP/1.1 chunked body."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.need = 0  # bytes left in the current chunk
        self.skip = 0  # CRLF after a chunk's data
        self.done = False

    def feed(self, data: bytes) -> bytes:
        self.buf += data
        out: list[bytes] = []
        while not self.done:
            if self.need:
                take = min(self.need, len(self.buf))
                out.append(bytes(self.buf[:take]))
                del self.buf[:take]
                self.need -= take
                if self.need:
                    break
                self.skip = 2
            if self.skip:
                take = min(self.skip, len(self.buf))
                del self.buf[:take]
                self.skip -= take
                if self.skip:
                    break
            end = self.buf.find(b"\r\n")
            if end < 0:
                break
            size = int(bytes(self.buf[:end]).split(b";", 1)[0], 16)
            del self.buf[: end + 2]
            self.need = size
            self.done = size == 0
        return b"".join(out)


class SseParser:
    """Incremental text/event-stream parser: ``feed`` returns the ``data`` of complete events.
    Lines end in CRLF, LF or CR; ``:`` lines are comments (pings); ``id``/``event`` are kept."""

    def __init__(self) -> None:
        self.pending = b""
        self.data: list[bytes] = []
        self.event = b""
        self.id = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        buf = self.pending + chunk
        keep = b""
        if buf.endswith(b"\r"):  # maybe the first half of a CRLF split across reads
            buf, keep = buf[:-1], b"\r"
        lines = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        self.pending = lines.pop() + keep
        out: list[bytes] = []
        for line in lines:
            if not line:
                if self.data:
                    out.append(b"\n".join(self.data))
                self.data = []
                continue
            if line.startswith(b":"):
                continue
            name, _, value = line.partition(b":")
            value = value.removeprefix(b" ")
            if name == b"data":
                self.data.append(value)
            elif name == b"event":
                self.event = value
            elif name == b"id":
                self.id = value
        return out


@dataclass
class JobStream:
    """One job's SSE stream, as the client saw it."""

    job_id: str
    path: str
    submit_ms: float
    first_event: asyncio.Event = field(default_factory=asyncio.Event)
    first_type: str | None = None
    framing: str | None = None
    seqs: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    delays_ms: list[float] = field(default_factory=list)
    early_delays_ms: list[float] = field(default_factory=list)  # text older than the stream
    live_delays_ms: list[float] = field(default_factory=list)  # text out once it was open
    stamps: list[tuple[float, float, int]] = field(default_factory=list)  # (ts, delay, words)
    opened_ms: float | None = None  # when the SSE response's head arrived
    tokens: int = 0
    first_delta_ms: float | None = None
    terminal: str | None = None
    result: str | None = None
    done_ms: float | None = None
    error: str | None = None

    def handle(self, raw: bytes, arrived_ms: float) -> bool:
        """Record one event; ``True`` when it is the terminal one."""
        data = loads(raw)
        kind = data.get("type")
        if self.first_type is None:
            self.first_type = kind
            self.first_event.set()
        self.seqs.append(data.get("seq"))
        if kind == "delta":
            text = data.get("text") or ""
            words = len(text.split())
            self.texts.append(text)
            self.tokens += words
            if self.first_delta_ms is None:
                self.first_delta_ms = arrived_ms
            delays = [arrived_ms - data["ts"]] * words
            self.delays_ms.extend(delays)
            self.stamps.append((data["ts"], arrived_ms - data["ts"], words))
            if self.opened_ms is not None and data["ts"] < self.opened_ms:
                self.early_delays_ms.extend(delays)
            else:
                self.live_delays_ms.extend(delays)
            return False
        if kind in ("completed", "cancelled") or (kind == "failed" and not data.get("retryable")):
            self.terminal, self.result, self.done_ms = kind, data.get("result"), arrived_ms
            return True
        return False


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter, "ChunkedDecoder | None", str]


async def sse_connect(port: int, path: str) -> Connection:
    """GET ``path`` as an event stream; the reader is left at the start of the body."""
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nAccept: text/event-stream\r\n"
        "Cache-Control: no-cache\r\nConnection: close\r\n\r\n".encode()
    )
    return (await sse_head(reader, writer))[0]


async def sse_head(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> tuple[Connection, dict[str, str]]:
    """Read an event stream's response head (raising unless ``200``): the connection left at
    the start of the body, and the head's headers (lower-cased)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    status = int(status_line.split(" ", 2)[1])
    if status != 200:
        body = await asyncio.wait_for(reader.read(300), 5)
        writer.close()
        raise RuntimeError(f"SSE {status}: {body[:200]!r}")
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return (reader, writer, ChunkedDecoder(), "chunked"), headers
    framing = "content-length" if "content-length" in headers else "until-close"
    return (reader, writer, None, framing), headers


async def follow(stream: JobStream, port: int, opened: Connection | None = None) -> None:
    """Read ``stream`` (on the connection ``opened`` already, else on one of its own) until
    its terminal event, its end, an error or cancellation."""
    writer: asyncio.StreamWriter | None = None
    try:
        if opened is None:
            opened = await sse_connect(port, stream.path)
            stream.opened_ms = now_ms()
        reader, writer, decoder, stream.framing = opened
        parser = SseParser()
        while True:
            data = await reader.read(65536)
            arrived = now_ms()
            if not data:
                stream.error = "connection closed before the terminal event"
                return
            for raw in parser.feed(decoder.feed(data) if decoder else data):
                if stream.handle(raw, arrived):
                    return
            if decoder is not None and decoder.done:
                stream.error = "stream ended before the terminal event"
                return
    except (OSError, RuntimeError, ValueError, asyncio.IncompleteReadError) as exc:
        stream.error = f"{type(exc).__name__}: {exc}"[:160]
    finally:
        stream.first_event.set()
        if writer is not None:
            writer.close()


# -- submitting --------------------------------------------------------------------------------


def job_body(prompt: str) -> dict[str, Any]:
    return {
        "service": "chat",
        "experience": "stream",
        "mode": "paid",
        "model": "sim",
        "input": {"prompt": prompt},
    }


async def submit(conn: HttpConn, prompt: str) -> JobStream | str:
    """One submit on a submitter's keep-alive connection (spoken by hand: with httpx this
    process's event loop lagged up to ~30 ms while the burst of submits went out, and that lag
    was counted as token delay of the streams it read meanwhile): the job's stream to
    follow, or why it failed."""
    submit_ms = now_ms()
    request = json_post(conn.port, "/api/jobs", json.dumps(job_body(prompt)).encode(), AUTH)
    try:
        status, data = await conn.request(request)
    except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
        return type(exc).__name__
    if status != 202:
        return f"submit {status}"
    reply = loads(data)
    path = f"{reply['eventsUrl']}?token={quote(reply['eventsToken'], safe='')}"
    return JobStream(reply["jobId"], path, submit_ms)


async def submit_streamed(port: int, prompt: str) -> tuple[JobStream, Connection] | str:
    """One submit that answers with the job's event stream (``Accept: text/event-stream``),
    on a connection of its own (the stream holds it): the stream, open, or why it failed."""
    submit_ms = now_ms()
    payload = json.dumps(job_body(prompt)).encode()
    writer: asyncio.StreamWriter | None = None
    try:
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(
            f"POST /api/jobs HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
            f"Authorization: {AUTH['Authorization']}\r\nContent-Type: application/json\r\n"
            f"Accept: text/event-stream\r\nConnection: close\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        opened, headers = await sse_head(reader, writer)
    except (OSError, RuntimeError, ValueError, asyncio.IncompleteReadError) as exc:
        if writer is not None:
            writer.close()
        return type(exc).__name__
    job_id = headers.get("x-tierq-job-id")
    if not job_id:
        writer.close()
        return "no x-tierq-job-id"
    stream = JobStream(job_id, headers.get("x-tierq-events-url", ""), submit_ms)
    stream.opened_ms = now_ms()
    return stream, opened


@dataclass
class Submitted:
    """What a batch of submits gave so far (filled as they return, so a deadline keeps it)."""

    streams: list[JobStream] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    done_ms: float | None = None


async def submit_many(
    port: int,
    prompts: list[str],
    into: Submitted,
    on_submitted: Callable[[JobStream, Connection | None], None] = lambda *_: None,
    follow_mode: str = "get",
) -> None:
    """Submit every prompt from ``SUBMIT_CONCURRENCY`` submitters, each with a connection of
    its own, like that many users; ``on_submitted`` runs as soon as each submit returns.
    ``follow_mode`` "post": each submit asks for its job's event stream in its response, on
    a connection of its own, handed to ``on_submitted`` open."""
    todo = iter(prompts)

    async def submitter() -> None:
        raw = HttpConn(port)
        try:
            for prompt in todo:
                got: tuple[JobStream, Connection | None] | str
                if follow_mode == "post":
                    got = await submit_streamed(port, prompt)
                else:
                    one = await submit(raw, prompt)
                    got = one if isinstance(one, str) else (one, None)
                if isinstance(got, str):
                    into.errors[got] += 1
                else:
                    into.streams.append(got[0])
                    on_submitted(*got)
        finally:
            raw.close()

    await asyncio.gather(*(submitter() for _ in range(min(SUBMIT_CONCURRENCY, len(prompts)))))
    into.done_ms = now_ms()


async def finish_tasks(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# -- scenario A: K live streams ----------------------------------------------------------------


def cpu_used(
    before: dict[str, float | None], after: dict[str, float | None], tokens: int
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, used in cpu_spent(before, after).items():
        if used is None:
            out[name] = None
            continue
        per_token = round(used * 1e6 / tokens, 1) if tokens else None
        out[name] = {"cpu_s": round(used, 2), "us_per_token": per_token}
    return out


def check_stream(stream: JobStream) -> str | None:
    """Why this job's stream is wrong, or ``None``."""
    if stream.terminal is None:
        return f"no terminal event ({stream.error or 'deadline'})"
    if stream.terminal != "completed":
        return f"terminal {stream.terminal}"
    if stream.seqs != list(range(1, len(stream.seqs) + 1)):
        seen = Counter(stream.seqs)
        dups = sum(1 for n in seen.values() if n > 1)
        gaps = max(stream.seqs, default=0) - len(seen)
        return f"seq not dense from 1 ({dups} repeated, {gaps} missing)"
    if "".join(stream.texts) != stream.result:
        return "deltas joined != completed result"
    if stream.tokens != TOKENS:
        return f"{stream.tokens} tokens, not {TOKENS}"
    return None


class LoopLag:
    """How late this process's event loop wakes from a 1 ms sleep, sampled through a run: the
    bench client shares the machine with the system it measures, and its own lag is counted
    in every token delay it measures."""

    def __init__(self, every_s: float = 0.001) -> None:
        self.every_s = every_s
        self.samples: list[tuple[float, float]] = []  # (wall ms, how late in ms)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(self.every_s)
            late_ms = (loop.time() - before - self.every_s) * 1000
            self.samples.append((now_ms(), max(0.0, late_ms)))

    def report(self, t0: float, step_ms: int = 250) -> dict[str, Any]:
        windows: dict[int, list[float]] = {}
        for at, late in self.samples:
            windows.setdefault(int((at - t0) // step_ms), []).append(late)
        return {
            **summary([late for _, late in self.samples]),
            "by_window": [
                {"from_ms": i * step_ms, "p99": pct(v, 99), "max": round(max(v), 2)}
                for i, v in sorted(windows.items())
            ],
        }


class CpuWindows:
    """Cores each process of the system (and this client, and the whole machine: busy, and
    stolen by the hypervisor) kept busy, by window of ``step_s`` through a run: whether the
    machine had CPU to spare where tokens were late."""

    def __init__(self, system: System, step_s: float = 0.25) -> None:
        self.system = system
        self.step_s = step_s
        self.readings: list[tuple[float, dict[str, float | None]]] = []

    def read(self) -> None:
        machine = machine_cpu_s()
        reading: dict[str, float | None] = dict(cpu_snapshot(self.system.pids()))
        reading["machine_busy"], reading["machine_steal"] = machine or (None, None)
        self.readings.append((now_ms(), reading))

    async def run(self) -> None:
        while True:
            self.read()
            await asyncio.sleep(self.step_s)

    def report(self, t0: float) -> list[dict[str, Any]]:
        out = []
        for (t1, a), (t2, b) in itertools.pairwise(self.readings):
            span_s = (t2 - t1) / 1000
            used = cpu_spent(a, b)
            cores = {k: round(v / span_s, 2) for k, v in used.items() if v is not None}
            out.append({"from_ms": round(t1 - t0), "to_ms": round(t2 - t0), "cores": cores})
        return out


async def run_streams(
    system: System, k: int, tag: str, deadline_s: float, follow_mode: str = "get"
) -> dict[str, Any]:
    """K jobs submitted at once, each followed over SSE from the moment its submit returns
    (``follow_mode`` "post": in the submit's own response)."""
    tasks: list[asyncio.Task[None]] = []
    prompts = [f"bench {tag} {i}" for i in range(k)]

    def follow_now(stream: JobStream, opened: Connection | None) -> None:
        tasks.append(asyncio.create_task(follow(stream, system.app_port, opened)))

    before = cpu_snapshot(system.pids())
    t0 = now_ms()
    sub = Submitted()
    lag, windows = LoopLag(), CpuWindows(system)
    samplers = [asyncio.create_task(lag.run()), asyncio.create_task(windows.run())]

    async def work() -> None:
        await submit_many(system.app_port, prompts, sub, follow_now, follow_mode)
        await asyncio.gather(*tasks)

    try:
        in_time = await with_deadline(deadline_s, work())
    finally:
        await finish_tasks([*tasks, *samplers])
    windows.read()
    after = cpu_snapshot(system.pids())
    report = streams_report(k, sub, in_time, t0, before, after)
    report["client_loop_lag_ms"] = lag.report(t0)
    report["cores_by_window"] = windows.report(t0)
    report["unfinished_jobs"] = await unfinished(system.app_url, sub.streams)
    return report


async def unfinished(base: str, streams: list[JobStream], show: int = 5) -> dict[str, Any]:
    """For streams with no terminal event: what the server says of their jobs (up to 20
    asked), and what the client saw of a few of them."""
    stuck = [s for s in streams if s.terminal is None]
    statuses: Counter[str] = Counter()
    async with httpx.AsyncClient(timeout=10) as client:
        for stream in stuck[:20]:
            try:
                res = await client.get(f"{base}/api/jobs/{stream.job_id}", headers=AUTH)
                statuses[str(res.json().get("status", res.status_code))] += 1
            except (httpx.HTTPError, ValueError) as exc:
                statuses[type(exc).__name__] += 1
    seen = [
        {"job_id": s.job_id, "events": len(s.seqs), "last_seq": s.seqs[-1] if s.seqs else None,
         "tokens": s.tokens, "error": s.error}
        for s in stuck[:show]
    ]  # fmt: skip
    return {"count": len(stuck), "server_status": dict(statuses), "client_saw": seen}


def delay_windows(streams: list[JobStream], t0: float, step_ms: int = 250) -> list[Any]:
    """Token delay by when the text was written (its ``ts``), in ``step_ms`` windows from the
    first submit: where in the run the late tokens are."""
    windows: dict[int, list[float]] = {}
    for stream in streams:
        for ts, delay, words in stream.stamps:
            windows.setdefault(int((ts - t0) // step_ms), []).extend([delay] * words)
    return [
        {"from_ms": i * step_ms, "n": len(d), "p50": pct(d, 50), "p99": pct(d, 99)}
        for i, d in sorted(windows.items())
    ]


def streams_report(
    k: int,
    sub: Submitted,
    in_time: bool,
    t0: float,
    before: dict[str, float | None],
    after: dict[str, float | None],
) -> dict[str, Any]:
    streams, submitted_ms = sub.streams, sub.done_ms
    done = [s.done_ms for s in streams if s.done_ms is not None]
    completed = sum(s.terminal == "completed" for s in streams)
    finished = in_time and completed == k
    wall_s = (max(done) - t0) / 1000 if finished and done else None
    tokens = sum(s.tokens for s in streams)
    failures = Counter(r for r in map(check_stream, streams) if r is not None)
    delays = [d for s in streams for d in s.delays_ms]
    early = [d for s in streams for d in s.early_delays_ms]
    live = [d for s in streams for d in s.live_delays_ms]
    opens = [s.opened_ms - s.submit_ms for s in streams if s.opened_ms is not None]
    first = [s.first_delta_ms - s.submit_ms for s in streams if s.first_delta_ms is not None]
    return {
        "k": k,
        "finished": finished,
        "jobs_submitted": len(streams),
        "submit_errors": dict(sub.errors),
        "jobs_completed": completed,
        "terminal_types": dict(Counter(str(s.terminal) for s in streams)),
        "submit_phase_s": round((submitted_ms - t0) / 1000, 3) if submitted_ms else None,
        "wall_s": round(wall_s, 3) if wall_s is not None else None,
        "elapsed_until_stop_s": round((now_ms() - t0) / 1000, 3),
        "model_s": MODEL_S,
        "last_done_over_model": round(wall_s / MODEL_S, 3) if wall_s is not None else None,
        "within_target": wall_s is not None and wall_s <= TARGET_S,
        "target_s": TARGET_S,
        "tokens_delivered": tokens,
        "tokens_per_s": round(tokens / wall_s) if wall_s else None,
        "cpu": cpu_used(before, after, tokens),
        "token_delay_ms": summary(delays),
        # tokens whose text was out before the client's stream was open (sent as replay)
        "token_delay_early_ms": summary(early),
        # the others: out while the client's stream was open (what tierq alone decides)
        "token_delay_live_ms": summary(live),
        "token_delay_by_window": delay_windows(streams, t0),
        "submit_to_stream_open_ms": summary(opens),
        "submit_to_first_token_ms": summary(first),
        "delta_events_per_job_mean": round(sum(len(s.texts) for s in streams) / len(streams), 2)
        if streams
        else None,
        "correctness_failures": sum(failures.values()) + (k - len(streams)),
        "failure_reasons": dict(failures.most_common(5)),
        "sse_framing": dict(Counter(str(s.framing) for s in streams)),
    }


# -- scenario B: idle SSE connections ----------------------------------------------------------


async def admin_queue(base: str, action: str) -> tuple[int, Any]:
    async with httpx.AsyncClient(timeout=30) as client:
        res = await client.post(f"{base}/api/admin/queues/{STREAM_QUEUE}/{action}", headers=ADMIN)
    try:
        return res.status_code, res.json().get("paused")
    except ValueError:
        return res.status_code, res.text[:200]


async def healthz_latency(base: str) -> dict[str, Any]:
    times: list[float] = []
    errors = 0
    async with httpx.AsyncClient(timeout=10) as client:
        for _ in range(HEALTHZ_SAMPLES):
            t0 = time.perf_counter()
            try:
                res = await client.get(f"{base}/healthz")
                ok = res.status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                times.append((time.perf_counter() - t0) * 1000)
            else:
                errors += 1
    return {**summary(times), "errors": errors}


async def hold(stream: JobStream, port: int, sem: asyncio.Semaphore) -> None:
    """Open ``stream`` (at most ``OPEN_CONCURRENCY`` opening at once), then keep it open."""
    async with sem:
        task = asyncio.create_task(follow(stream, port))
        waiter = asyncio.create_task(stream.first_event.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
    try:
        await task
    finally:
        task.cancel()


def memory_reading(system: System) -> dict[str, Any]:
    pids = system.pids()
    return {
        "app_rss_kib": vm_rss_kib(pids["app"]),
        "app_redis_rss_kib": vm_rss_kib(pids["app_redis"]),
        "app_open_fds": open_fds(system.app.pid),
    }


async def run_idle(system: System, n: int, deadline_s: float) -> dict[str, Any]:
    report: dict[str, Any] = {"n": n}
    report["pause"] = await admin_queue(system.app_url, "pause")
    t0 = time.perf_counter()
    sub = Submitted()
    prompts = [f"idle {i}" for i in range(n)]
    report["submitted_in_time"] = await with_deadline(
        deadline_s, submit_many(system.app_port, prompts, sub)
    )
    streams = sub.streams
    report["jobs_submitted"], report["submit_errors"] = len(streams), dict(sub.errors)
    report["submit_s"] = round(time.perf_counter() - t0, 2)
    await asyncio.sleep(SETTLE_S)
    report["before"] = memory_reading(system)
    sem = asyncio.Semaphore(OPEN_CONCURRENCY)
    tasks = [asyncio.create_task(hold(s, system.app_port, sem)) for s in streams]
    try:
        await idle_hold(system, streams, report, deadline_s)
    finally:
        await finish_tasks(tasks)
    return report


async def idle_hold(
    system: System, streams: list[JobStream], report: dict[str, Any], deadline_s: float
) -> None:
    t0 = time.perf_counter()
    waits = asyncio.gather(*(s.first_event.wait() for s in streams))
    report["opened_in_time"] = await with_deadline(deadline_s, waits)
    report["open_s"] = round(time.perf_counter() - t0, 2)
    report["first_event_types"] = dict(Counter(str(s.first_type) for s in streams))
    report["connections_with_queued"] = sum(s.first_type == "queued" for s in streams)
    report["stream_errors"] = dict(Counter(s.error for s in streams if s.error).most_common(5))
    await asyncio.sleep(SETTLE_S)
    report["after"] = memory_reading(system)
    report["still_open"] = sum(s.first_type is not None and s.error is None for s in streams)
    report["healthz_ms_while_holding"] = await healthz_latency(system.app_url)
    before, after = report["before"]["app_rss_kib"], report["after"]["app_rss_kib"]
    held = report["connections_with_queued"]
    if before is not None and after is not None and held:
        report["kib_per_connection"] = round((after - before) / held, 2)
        report["within_target"] = report["kib_per_connection"] <= IDLE_TARGET_KIB
    rb, ra = report["before"]["app_redis_rss_kib"], report["after"]["app_redis_rss_kib"]
    if rb is not None and ra is not None and held:
        report["app_redis_kib_per_connection"] = round((ra - rb) / held, 2)


# -- one tree ----------------------------------------------------------------------------------


async def scenarios(
    system: System, args: argparse.Namespace, label: str, follow_mode: str
) -> dict[str, Any]:
    out: dict[str, Any] = {"app_rss_kib_at_start": vm_rss_kib(system.app.pid)}
    out["follow"] = follow_mode
    warm = await run_streams(system, WARMUP_JOBS, f"{label} warm-up", args.deadline_s, follow_mode)
    out["warmup"] = {k: warm[k] for k in ("jobs_completed", "correctness_failures", "wall_s")}
    out["streams"] = {}
    for k in args.ks:
        await asyncio.sleep(1.0)  # let the previous round's cleanup finish
        speed = speed_reference_ms()  # the machine's speed now (it drifts; see common.py)
        out["streams"][str(k)] = await run_streams(
            system, k, f"{label} {k}", args.deadline_s, follow_mode
        )
        out["streams"][str(k)]["speed_reference_ms"] = speed
        print(f"  [{label}] K={k}: {short_streams(out['streams'][str(k)])}", flush=True)
    if args.idle:
        idle_deadline = max(args.deadline_s, args.idle / 25)
        out["idle_sse"] = await run_idle(system, args.idle, idle_deadline)
        print(f"  [{label}] idle: {short_idle(out['idle_sse'])}", flush=True)
    return out


def run_tree(
    label: str, src: Path, args: argparse.Namespace, follow_mode: str = "get"
) -> dict[str, Any]:
    """Start a system from ``src``, run the scenarios, stop it; errors are recorded."""
    print(f"[{label}] code from {src}, streams followed by {follow_mode}", flush=True)

    async def work(system: System) -> dict[str, Any]:
        return await scenarios(system, args, label, follow_mode)

    run = run_system(
        label,
        work,
        broker_key_prefix=BROKER_KEY_PREFIX,
        app_env=app_env,
        src=src,
        log_dir=args.log_dir,
    )
    return {"src": str(src), **run}


# -- baseline ----------------------------------------------------------------------------------


def run_baseline(
    label: str, src: Path, args: argparse.Namespace, follow_mode: str
) -> dict[str, Any]:
    """``run_tree`` with the baseline's own settings (``--baseline-app-env``) over the rest."""
    current = dict(APP_SETTINGS)
    APP_SETTINGS.update(args.baseline_settings)
    try:
        return run_tree(label, src, args, follow_mode)
    finally:
        APP_SETTINGS.clear()
        APP_SETTINGS.update(current)


STREAM_FIGURES: tuple[tuple[str, Callable[[dict[str, Any]], Any]], ...] = (
    ("last_done_over_model", lambda r: r["last_done_over_model"]),
    ("tokens_per_s", lambda r: r["tokens_per_s"]),
    ("app_us_per_token", lambda r: (r["cpu"].get("app") or {}).get("us_per_token")),
    ("broker_us_per_token", lambda r: (r["cpu"].get("broker") or {}).get("us_per_token")),
    ("app_redis_us_per_token", lambda r: (r["cpu"].get("app_redis") or {}).get("us_per_token")),
    ("token_delay_p50_ms", lambda r: r["token_delay_ms"]["p50"]),
    ("token_delay_p99_ms", lambda r: r["token_delay_ms"]["p99"]),
    ("delta_events_per_job", lambda r: r["delta_events_per_job_mean"]),
)


def ratios(current: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, cur in current.get("streams", {}).items():
        base = baseline.get("streams", {}).get(k)
        if base is not None:
            out[f"streams_{k}"] = {name: ratio(get(cur), get(base)) for name, get in STREAM_FIGURES}
    cur_idle, base_idle = current.get("idle_sse"), baseline.get("idle_sse")
    if cur_idle and base_idle:
        out["idle_sse"] = {
            "kib_per_connection": ratio(
                cur_idle.get("kib_per_connection"), base_idle.get("kib_per_connection")
            ),
            "healthz_p50_ms": ratio(
                cur_idle["healthz_ms_while_holding"]["p50"],
                base_idle["healthz_ms_while_holding"]["p50"],
            ),
        }
    return out


# -- output ------------------------------------------------------------------------------------


def short_streams(r: dict[str, Any]) -> str:
    live, early = r.get("token_delay_live_ms") or {}, r.get("token_delay_early_ms") or {}
    return (
        f"{r['jobs_completed']}/{r['k']} completed, wall {r['wall_s']} s "
        f"(x{r['last_done_over_model']} model), {r['tokens_per_s']} tok/s, "
        f"delay p50/p99 {r['token_delay_ms']['p50']}/{r['token_delay_ms']['p99']} ms "
        f"(live {live.get('p50')}/{live.get('p99')}, early {early.get('n')} tokens), "
        f"client loop lag p99 {(r.get('client_loop_lag_ms') or {}).get('p99')} ms, "
        f"{r['correctness_failures']} failures"
    )


def short_idle(r: dict[str, Any]) -> str:
    return (
        f"{r.get('connections_with_queued')}/{r['n']} got queued, "
        f"{r.get('kib_per_connection')} KiB/conn, healthz p50 "
        f"{(r.get('healthz_ms_while_holding') or {}).get('p50')} ms"
    )


def us(r: dict[str, Any], name: str) -> Any:
    return (r["cpu"].get(name) or {}).get("us_per_token")


def print_table(runs: dict[str, dict[str, Any]]) -> None:
    cols = "run        K  done  wall_s  x_model ok    tok/s  app_us  brk_us  rds_us  p50_ms  "
    print("\n" + cols + "p99_ms  d/job fails ref_ms")
    for label, run in runs.items():
        if "error" in run:
            print(f"{label:8} error: {run['error'][:200]}")
        for r in run.get("streams", {}).values():
            d = r["token_delay_ms"]
            print(
                f"{label:8} {r['k']:4} {r['jobs_completed']:5} {r['wall_s']!s:>7} "
                f"{r['last_done_over_model']!s:>8} {'y' if r['within_target'] else 'n':2} "
                f"{r['tokens_per_s']!s:>8} {us(r, 'app')!s:>7} {us(r, 'broker')!s:>7} "
                f"{us(r, 'app_redis')!s:>7} {d['p50']!s:>7} {d['p99']!s:>7} "
                f"{r['delta_events_per_job_mean']!s:>6} {r['correctness_failures']:5} "
                f"{r.get('speed_reference_ms')!s:>6}"
            )
    print("\nrun          N  queued  KiB/conn ok  healthz_p50_ms  healthz_max_ms")
    for label, run in runs.items():
        idle = run.get("idle_sse")
        if idle:
            h = idle.get("healthz_ms_while_holding") or {}
            ok = "y" if idle.get("within_target") else "n"
            print(
                f"{label:8} {idle['n']:5} {idle.get('connections_with_queued')!s:>7} "
                f"{idle.get('kib_per_connection')!s:>9} {ok:2} {h.get('p50')!s:>15} "
                f"{h.get('max')!s:>15}"
            )


def print_ratios(table: dict[str, Any]) -> None:
    if not table:
        return
    print("\ncurrent / baseline")
    for name, figures in table.items():
        print(f"  {name}: " + ", ".join(f"{k} {v}" for k, v in figures.items()))


# -- driver ------------------------------------------------------------------------------------


def parse_ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--ks wants numbers like 50,500: {exc}") from exc
    if not ks or min(ks) < 1 or max(ks) > QUEUE_PARALLELISM:
        raise argparse.ArgumentTypeError(f"each K must be 1..{QUEUE_PARALLELISM}")
    return ks


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="K = 20,50 and 300 idle")
    parser.add_argument("--ks", type=parse_ks, default=None, help="K values, e.g. 50,500")
    parser.add_argument("--idle", type=int, default=None, help="idle SSE connections (5000)")
    parser.add_argument("--baseline", default=None, help="git ref to run first and compare")
    parser.add_argument(
        "--repeat", type=int, default=1,
        help="run each tree N times, alternating (baseline, current, baseline, ...): medians",
    )  # fmt: skip
    parser.add_argument(
        "--follow", choices=FOLLOW_MODES, default="get",
        help="how clients follow their jobs: get (submit, then GET eventsUrl; default) or post "
        "(the submit asks for the events in its own response, Accept: text/event-stream)",
    )  # fmt: skip
    parser.add_argument(
        "--baseline-follow", choices=FOLLOW_MODES, default=None,
        help="--follow for the baseline run; without --baseline, the baseline is the working "
        "tree followed this way (compares the two ways of following, alternating)",
    )  # fmt: skip
    parser.add_argument("--deadline-s", type=float, default=120.0, help="per scenario (120)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    parser.add_argument("--log-dir", type=Path, default=None, help="keep app/broker logs here")
    parser.add_argument(
        "--app-env", action="append", default=[], metavar="NAME=VALUE",
        help="more environment for tierq serve, e.g. TIERQ_DELTA_FLUSH_MS=40 (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--baseline-app-env", action="append", default=[], metavar="NAME=VALUE",
        help="environment for tierq serve in the baseline runs only (over --app-env); without "
        "--baseline, the baseline is the working tree so configured (compares two settings)",
    )  # fmt: skip
    parser.add_argument(
        "--broker-env", action="append", default=[], metavar="NAME=VALUE",
        help="more environment for tierq broker, e.g. TIERQ_BROKER__MAX_IN_FLIGHT=500",
    )  # fmt: skip
    args = parser.parse_args(argv)
    args.baseline_settings = {}
    for option, into in (
        (args.app_env, APP_SETTINGS),
        (args.broker_env, BROKER_SETTINGS),
        (args.baseline_app_env, args.baseline_settings),
    ):
        for item in option:
            name, sep, value = item.partition("=")
            if not sep or not name.startswith("TIERQ_"):
                parser.error(f"--app-env/--broker-env take TIERQ_NAME=VALUE, not {item!r}")
            into[name] = value
    args.ks = args.ks or (QUICK_KS if args.quick else DEFAULT_KS)
    if args.idle is None:
        args.idle = 300 if args.quick else 5000
    return args


def config(args: argparse.Namespace, nofile: tuple[int, int]) -> dict[str, Any]:
    return {
        "ks": list(args.ks),
        "idle_connections": args.idle,
        "tokens_per_job": TOKENS,
        "token_latency_ms": TOKEN_LATENCY_MS,
        "model_s": MODEL_S,
        "target_s": TARGET_S,
        "idle_target_kib_per_connection": IDLE_TARGET_KIB,
        "submit_concurrency": SUBMIT_CONCURRENCY,
        "follow": args.follow,
        "baseline_follow": args.baseline_follow or args.follow,
        "open_concurrency_idle": OPEN_CONCURRENCY,
        "queue_parallelism": QUEUE_PARALLELISM,
        "warmup_jobs": WARMUP_JOBS,
        "deadline_s": args.deadline_s,
        "sse_ping_s": 600,
        "app_env": dict(APP_SETTINGS),
        "baseline_app_env": args.baseline_settings,
        "broker_env": dict(BROKER_SETTINGS),
        "client_loop": "uvloop" if LOOP_FACTORY else "asyncio",
        "client_json": loads.__module__ or "json",
        "rlimit_nofile": list(nofile),
    }


NOTES = [
    "All processes (bench client, app, broker, two redis-servers) share this machine's CPUs; "
    "other load on the machine (see loadavg) moves the figures.",
    "token_delay_ms: client arrival time - the delta event's ts (both wall clock, one "
    "machine), one sample per whitespace word of the event. ts is stamped when the event is "
    "written, so for a multi-token event it is the delay of its oldest token: an upper bound.",
    "wall_s: first submit to the last terminal event's arrival; submits are 64 at a time.",
    "app_redis is the app's Redis; broker_redis stands in for QStash's own storage.",
    "idle_sse: KiB per connection = app VmRSS delta / connections that got their queued "
    "event, each read after a 2 s settle; the queue is left paused (throw-away Redis).",
]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    nofile = raise_nofile()
    started = time.time()
    machine = machine_info(("tierq", "httpx", "uvicorn", "starlette", "redis", "sse-starlette"))
    repeats: dict[str, list[dict[str, Any]]] = {"current": []}
    baseline_follow = args.baseline_follow or args.follow
    compare = bool(args.baseline or baseline_follow != args.follow or args.baseline_settings)
    with contextlib.ExitStack() as stack:
        if args.baseline:
            path, commit = stack.enter_context(worktree(args.baseline))
        if compare:
            repeats = {"baseline": [], "current": []}
        for n in range(max(1, args.repeat)):
            suffix = f" #{n + 1}" if args.repeat > 1 else ""
            if compare:  # alternating: the VM's speed drifts within minutes
                if args.baseline:
                    run, src = {"ref": args.baseline, "commit": commit}, path / "src"
                else:
                    run, src = current_tree_info(), ROOT / "src"
                run.update(run_baseline(f"baseline{suffix}", src, args, baseline_follow))
                repeats["baseline"].append(run)
            run = {
                **current_tree_info(),
                **run_tree(f"current{suffix}", ROOT / "src", args, args.follow),
            }
            repeats["current"].append(run)
    runs = {label: done[0] for label, done in repeats.items()}
    table = ratios(runs["current"], runs["baseline"]) if "baseline" in runs else {}
    doc = {
        **results_head(
            "tierq streaming (broker + app subprocesses, two embedded Redis, loopback)",
            started,
            machine,
        ),
        "notes": NOTES,
        "config": config(args, nofile),
        "runs": runs,
        "ratios": table,
    }
    if args.repeat > 1:
        doc["repeats"] = repeats
        doc["medians"] = {label: medians(done) for label, done in repeats.items()}
        if "baseline" in repeats:
            doc["ratios_of_medians"] = ratios(doc["medians"]["current"], doc["medians"]["baseline"])
        print_table({f"{label} #{n + 1}": run for label, done in repeats.items()
                     for n, run in enumerate(done)})  # fmt: skip
        print(f"\nmedians of {args.repeat} runs each:")
        print_table(doc["medians"])
        for label, med in doc["medians"].items():
            if (r := med["streams"].get("500")) is not None:
                met = f"{r['runs_meeting_targets']}/{r['runs']}"
                print(f"{label}: K=500 runs meeting every target (wall, p99, app CPU): {met}")
        if "ratios_of_medians" in doc:
            print_ratios(doc["ratios_of_medians"])
    else:
        print_table(runs)
        print_ratios(table)
    write_results(args.out, doc)
    return 0


def medians(done: list[dict[str, Any]]) -> dict[str, Any]:
    """Each K's report as the median over repeated runs, figure by figure (a run that did not
    finish counts as missing), and how many runs met the issue's K = 500 targets."""
    out: dict[str, Any] = {"streams": {}}
    for k in sorted({k for run in done for k in run.get("streams", {})}, key=int):
        reports = [run["streams"][k] for run in done if k in run.get("streams", {})]
        report: dict[str, Any] = {"k": int(k), "runs": len(reports), "cpu": {}}
        for name in MEDIAN_FIGURES:
            report[name] = _median([r.get(name) for r in reports])
        report["finished"] = all(r.get("finished") for r in reports)
        report["within_target"] = (report["wall_s"] or 1e9) <= TARGET_S
        for proc in ("app", "broker", "app_redis", "broker_redis", "bench_client"):
            values = [(r["cpu"].get(proc) or {}).get("us_per_token") for r in reports]
            report["cpu"][proc] = {"us_per_token": _median(values)}
        report["token_delay_ms"] = {
            q: _median([r["token_delay_ms"].get(q) for r in reports]) for q in ("p50", "p99")
        }
        report["runs_meeting_targets"] = sum(
            bool(r.get("finished")) and (r.get("wall_s") or 1e9) <= TARGET_S
            and (r["token_delay_ms"].get("p99") or 1e9) <= TARGET_P99_MS
            and ((r["cpu"].get("app") or {}).get("us_per_token") or 1e9) <= TARGET_APP_US
            for r in reports
        )  # fmt: skip
        out["streams"][k] = report
    idle = [run["idle_sse"] for run in done if run.get("idle_sse")]
    if idle:
        out["idle_sse"] = {
            "n": idle[0].get("n"),
            "connections_with_queued": _median([i.get("connections_with_queued") for i in idle]),
            "kib_per_connection": _median([i.get("kib_per_connection") for i in idle]),
            "within_target": all(i.get("within_target") for i in idle),
            "healthz_ms_while_holding": {
                q: _median([(i.get("healthz_ms_while_holding") or {}).get(q) for i in idle])
                for q in ("p50", "max")
            },
        }
    return out


MEDIAN_FIGURES = (
    "speed_reference_ms",
    "wall_s",
    "last_done_over_model",
    "tokens_per_s",
    "delta_events_per_job_mean",
    "jobs_completed",
    "correctness_failures",
)


def _median(values: list[Any]) -> float | None:
    present = [v for v in values if isinstance(v, int | float)]
    return round(statistics.median(present), 3) if present else None


if __name__ == "__main__":
    sys.exit(main())
