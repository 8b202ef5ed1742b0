"""Time added by tierq: the same OpenAI-compatible upstream called directly and through tierq's
front door (``/v1/chat/completions``), on loopback, with the official ``openai`` client.

Processes: a minimal OpenAI-compatible upstream (this file, ``--serve-upstream``), the embedded
QStash broker (``tierq broker``) and the app (``tierq serve``, model ``gpt`` = that upstream via
the OpenAI provider), one embedded Redis shared by broker and app (separate key prefixes).

Per request, one at a time (no queueing behind other jobs), alternating direct and tierq:

- streamed: time to first token (first chunk with content) and total time (to ``[DONE]``);
- non-streamed: total time.

Through tierq a request is: front door → submit (admission, job record, publish to the
QStash queue) → broker delivery to the worker → guards → upstream call → each chunk a ``delta``
in the job's Redis event log → the front door tails the log → OpenAI chunk to the client.

Usage::

    .venv/bin/python bench/overhead.py            # 200 requests of each kind
    .venv/bin/python bench/overhead.py --quick    # 20
    .venv/bin/python bench/overhead.py --out /tmp/overhead.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import uvicorn

from common import (
    HOST,
    RESULTS_DIR,
    Proc,
    app_proc,
    broker_proc,
    clean_env,
    copy_logs,
    machine_info,
    procs_running,
    results_head,
    serve_env,
    summary,
    write_results,
)
from tierq.embedded_redis import EmbeddedRedis, free_port

DEFAULT_OUT = RESULTS_DIR / "overhead.json"
KEY = "tq_bench_overhead"
UPSTREAM_KEY_ENV = "BENCH_UPSTREAM_KEY"
UPSTREAM_KEY = "sk-bench-upstream"
UPSTREAM_MODEL = "bench-model"
MODEL = "gpt"


# -- the upstream: a minimal OpenAI-compatible server (its own process) -------------------------


def _tokens(n: int) -> list[str]:
    return [f"w{i}" if i == 0 else f" w{i}" for i in range(n)]


class Upstream:
    """``POST /v1/chat/completions`` (streamed or not) answering ``tokens`` tokens, ``token_ms``
    apart, and ``GET /healthz``. Deterministic; no directives, no recording."""

    def __init__(self, tokens: int, token_ms: float) -> None:
        self.tokens = tokens
        self.delay_s = token_ms / 1000

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["path"] == "/healthz":
            await _json(send, 200, {"status": "ok"})
        elif scope["path"] == "/v1/chat/completions" and scope["method"] == "POST":
            await self._chat(json.loads(raw), send)
        else:
            await _json(send, 404, {"error": {"message": "no such route", "type": "x",
                                              "param": None, "code": None}})  # fmt: skip

    async def _chat(self, body: dict[str, Any], send: Any) -> None:
        base = {"id": "chatcmpl-up", "created": int(time.time()), "model": body.get("model")}
        usage = {"prompt_tokens": 3, "completion_tokens": self.tokens,
                 "total_tokens": 3 + self.tokens}  # fmt: skip
        parts = _tokens(self.tokens)
        if not body.get("stream"):
            if self.delay_s:
                await asyncio.sleep(self.delay_s * self.tokens)
            message = {"role": "assistant", "content": "".join(parts)}
            await _json(send, 200, {**base, "object": "chat.completion", "usage": usage,
                                    "choices": [{"index": 0, "message": message,
                                                 "finish_reason": "stop"}]})  # fmt: skip
            return
        headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})

        async def chunk(delta: dict[str, Any] | None, finish: str | None = None,
                        with_usage: bool = False) -> None:  # fmt: skip
            data: dict[str, Any] = {**base, "object": "chat.completion.chunk", "choices": []}
            if delta is not None:
                data["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish}]
            if with_usage:
                data["usage"] = usage
            line = b"data: " + json.dumps(data).encode() + b"\n\n"
            await send({"type": "http.response.body", "body": line, "more_body": True})

        await chunk({"role": "assistant", "content": ""})
        for text in parts:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            await chunk({"content": text})
        await chunk({}, "stop")
        if (body.get("stream_options") or {}).get("include_usage"):
            await chunk(None, with_usage=True)
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


async def _json(send: Any, status: int, body: Any) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def serve_upstream(port: int, tokens: int, token_ms: float) -> None:
    uvicorn.run(Upstream(tokens, token_ms), host=HOST, port=port, log_level="warning",
                access_log=False, lifespan="on")  # fmt: skip


# -- the system under test ----------------------------------------------------------------------


@dataclass
class Running:
    upstream_url: str
    app_url: str
    procs: list[Proc]


def app_env(redis_url: str, app_port: int, broker_url: str, upstream_url: str) -> dict[str, str]:
    limits = {"paid": 10_000, "free": 10_000}
    model = {"provider": "openai", "base_url": f"{upstream_url}/v1", "upstream": UPSTREAM_MODEL,
             "api_key_env": UPSTREAM_KEY_ENV, "timeout_s": 30, "limits": limits}  # fmt: skip
    services = {"chat": {"experiences": ["stream", "batch"], "models": [MODEL]}}
    return serve_env(
        redis_url=redis_url,
        key_prefix="tqov",
        app_port=app_port,
        broker_url=broker_url,
        api_keys={KEY: {"id": "bench", "plan": "paid"}},
        queue_parallelism=64,
        extra={
            "TIERQ_USER_LIMITS": json.dumps(limits),
            "TIERQ_USER_QUEUE_LIMITS": json.dumps(limits),
            "TIERQ_MODELS": json.dumps({MODEL: model}),
            "TIERQ_SERVICES": json.dumps(services),
            UPSTREAM_KEY_ENV: UPSTREAM_KEY,
        },
    )


@contextlib.contextmanager
def running(workdir: Path, tokens: int, token_ms: float) -> Iterator[Running]:
    """The upstream, then the broker, then the app (one Redis for both); all stopped at the
    end. On a failure the processes' log tails go to stderr."""
    redis_server = EmbeddedRedis(workdir / "redis")
    ports = {name: free_port() for name in ("upstream", "broker", "app")}
    urls = {name: f"http://{HOST}:{port}" for name, port in ports.items()}
    try:
        redis_server.start()
        upstream = Proc(
            "upstream",
            [sys.executable, __file__, "--serve-upstream", "--port", str(ports["upstream"]),
             "--tokens", str(tokens), "--token-ms", str(token_ms)],
            clean_env(), workdir / "upstream.log",
        )  # fmt: skip
        broker = broker_proc(workdir, ports["broker"], redis_server.url, "tqovb")
        env = app_env(redis_server.url, ports["app"], urls["broker"], urls["upstream"])
        app = app_proc(workdir, ports["app"], env)
        procs = [upstream, broker, app]
        ready = [(proc, f"{urls[proc.name]}/healthz") for proc in procs]
        with procs_running(ready, workdir, show_tails=True):
            yield Running(urls["upstream"], urls["app"], procs)
    finally:
        redis_server.stop()


# -- measuring ----------------------------------------------------------------------------------


@dataclass
class Series:
    ttft_ms: list[float] = field(default_factory=list)
    total_ms: list[float] = field(default_factory=list)
    batch_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def streamed(client: openai.OpenAI, model: str, expected: str) -> tuple[float, float]:
    t0 = time.perf_counter()
    first: float | None = None
    parts: list[str] = []
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "bench"}], stream=True
    )
    with stream:
        for chunk in stream:
            text = chunk.choices[0].delta.content if chunk.choices else None
            if text:
                first = first if first is not None else time.perf_counter()
                parts.append(text)
    end = time.perf_counter()
    if first is None or "".join(parts) != expected:
        raise RuntimeError(f"unexpected answer {''.join(parts)!r}")
    return (first - t0) * 1000, (end - t0) * 1000


def batched(client: openai.OpenAI, model: str, expected: str) -> float:
    t0 = time.perf_counter()
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "bench"}]
    )
    elapsed = (time.perf_counter() - t0) * 1000
    if reply.choices[0].message.content != expected:
        raise RuntimeError(f"unexpected answer {reply.choices[0].message.content!r}")
    return elapsed


def one_round(client: openai.OpenAI, model: str, expected: str, series: Series) -> None:
    try:
        ttft, total = streamed(client, model, expected)
        series.ttft_ms.append(ttft)
        series.total_ms.append(total)
        series.batch_ms.append(batched(client, model, expected))
    except (openai.OpenAIError, RuntimeError) as exc:
        series.errors.append(f"{type(exc).__name__}: {exc}"[:200])


def measure(system: Running, requests: int, warmup: int, tokens: int) -> dict[str, Series]:
    expected = "".join(_tokens(tokens))
    clients = {
        "direct": (openai.OpenAI(base_url=f"{system.upstream_url}/v1", api_key=UPSTREAM_KEY,
                                 max_retries=0, timeout=60), UPSTREAM_MODEL),
        "tierq": (openai.OpenAI(base_url=f"{system.app_url}/v1", api_key=KEY, max_retries=0,
                                timeout=60), MODEL),
    }  # fmt: skip
    out = {name: Series() for name in clients}
    try:
        for _ in range(warmup):
            for client, model in clients.values():
                one_round(client, model, expected, Series())
        for i in range(requests):
            order = ("direct", "tierq") if i % 2 == 0 else ("tierq", "direct")
            for name in order:
                client, model = clients[name]
                one_round(client, model, expected, out[name])
    finally:
        for client, _model in clients.values():
            client.close()
    return out


def pctl(values: dict[str, Any], name: str) -> float | None:
    value = values.get(name)
    return value if isinstance(value, float | int) else None


def added(direct: dict[str, Any], tierq: dict[str, Any]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for p in ("p50", "p90", "p99", "mean"):
        a, b = pctl(direct, p), pctl(tierq, p)
        out[p] = round(b - a, 2) if a is not None and b is not None else None
    return out


def report(series: dict[str, Series]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for metric in ("ttft_ms", "total_ms", "batch_ms"):
        direct = summary(getattr(series["direct"], metric))
        tierq = summary(getattr(series["tierq"], metric))
        out[metric] = {"direct": direct, "tierq": tierq, "added_ms": added(direct, tierq)}
    out["errors"] = {name: s.errors[:10] for name, s in series.items()}
    out["error_counts"] = {name: len(s.errors) for name, s in series.items()}
    return out


def print_summary(doc: dict[str, Any]) -> None:
    r = doc["results"]
    labels = {"ttft_ms": "stream time to first token", "total_ms": "stream total",
              "batch_ms": "non-streamed total"}  # fmt: skip
    cfg = doc["config"]
    print(f"{cfg['requests']} requests each, {cfg['tokens']} tokens {cfg['token_ms']} ms apart")
    for metric, label in labels.items():
        d, t, a = r[metric]["direct"], r[metric]["tierq"], r[metric]["added_ms"]
        print(
            f"  {label:28s} direct p50 {d['p50']:>7} p99 {d['p99']:>7} | tierq p50 {t['p50']:>7} "
            f"p99 {t['p99']:>7} | added p50 {a['p50']:>7} p99 {a['p99']:>7} ms"
        )
    if any(r["error_counts"].values()):
        print(f"  errors: {r['error_counts']} {r['errors']}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="20 requests of each kind")
    parser.add_argument("--requests", type=int, default=None, help="requests of each kind (200)")
    parser.add_argument("--warmup", type=int, default=10, help="warm-up rounds, not measured")
    parser.add_argument("--tokens", type=int, default=16, help="tokens per answer (16)")
    parser.add_argument("--token-ms", type=float, default=2.0, help="ms between tokens (2)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    parser.add_argument("--log-dir", type=Path, default=None, help="keep the processes' logs")
    parser.add_argument("--serve-upstream", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.requests = args.requests or (20 if args.quick else 200)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_upstream:
        serve_upstream(args.port, args.tokens, args.token_ms)
        return 0
    started = time.time()
    machine = machine_info(("tierq", "openai", "httpx", "uvicorn", "fastapi", "starlette", "redis"))
    with (
        tempfile.TemporaryDirectory(prefix="tierq-overhead-") as tmp,
        running(Path(tmp), args.tokens, args.token_ms) as system,
    ):
        series = measure(system, args.requests, args.warmup, args.tokens)
        copy_logs((proc.log for proc in system.procs), args.log_dir)
    doc = {
        **results_head(
            "tierq overhead: OpenAI front door vs the same upstream called directly",
            started,
            machine,
        ),
        "notes": [
            "One request at a time, direct and tierq alternating; both with the official openai "
            "client (sync), keep-alive connections, after warm-up rounds.",
            "ttft_ms: request start to the first chunk with content; total_ms: to the end of "
            "the stream ([DONE]); batch_ms: a non-streamed request (a batch job through tierq).",
            "added_ms: tierq percentile minus direct percentile (not a percentile of differences).",
            "All processes (client, upstream, app, broker, redis-server) share this machine's "
            "CPUs, over loopback.",
        ],
        "config": {
            "quick": args.quick,
            "requests": args.requests,
            "warmup_rounds": args.warmup,
            "tokens": args.tokens,
            "token_ms": args.token_ms,
            "tier": "paid",
            "queue_parallelism": 64,
        },
        "results": report(series),
    }
    print_summary(doc)
    write_results(args.out, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
