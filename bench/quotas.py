"""What rate quotas and the usage ledger add to a job, measured in one run (ratios).

Black-box like the other benches: two embedded Redis servers, ``tierq broker`` and ``tierq
serve`` as subprocesses, a fresh system per configuration. N no-op batch jobs (simulated model,
0 tokens) are submitted 32 at a time; completion is read from the job records in the app's Redis
(one pipelined ``HGET status`` per 20 ms for the jobs not yet seen ended; those reads are counted
and subtracted). Per configuration: Redis commands per job on the app's Redis (``INFO
commandstats``; Redis counts the commands a script runs), the scripts run per job, app CPU µs
per job, jobs/s. Configurations:

- ``plain``: no quotas, the ledger off;
- ``ledger``: the usage ledger on (the default);
- ``quotas``: the ledger, plus a user rpm/tpm quota and a model rpm/tpm quota, all far from
  binding (so every check and every take runs, nothing waits).

The JSON gives each, and ``ledger`` and ``quotas`` over ``plain``. Nothing asserts on timing.

Usage::

    .venv/bin/python bench/quotas.py [--jobs 1000] [--out bench/results/quotas.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import redis

from common import (
    RESULTS_DIR,
    HttpConn,
    commandstats_calls,
    cpu_snapshot,
    cpu_spent,
    json_post,
    machine_info,
    results_head,
    run_async,
    running_system,
    serve_env,
    submit_from,
    write_results,
)

KEY = "tq_bench_quota"
PREFIX = "tqquota"
AUTH = {"Authorization": f"Bearer {KEY}"}
BIG = 10_000_000
CONFIGS = ("plain", "ledger", "quotas")


def env_for(config: str) -> Any:
    def app_env(redis_url: str, app_port: int, broker_url: str) -> dict[str, str]:
        limits = {"paid": 100_000, "free": 100_000}
        model: dict[str, Any] = {"provider": "simulated", "tokens": 0, "token_latency_ms": 0,
                                 "limits": limits}  # fmt: skip
        extra = {
            "TIERQ_USER_LIMITS": json.dumps(limits),
            "TIERQ_USER_QUEUE_LIMITS": json.dumps(limits),
            "TIERQ_USAGE_LEDGER": "false" if config == "plain" else "true",
            "TIERQ_LOG_LEVEL": "warning",
        }
        if config == "quotas":
            rate = {"rpm": BIG, "tpm": BIG}
            model["rates"] = {"paid": rate, "free": rate}
            extra["TIERQ_USER_RATES"] = json.dumps({"paid": rate, "free": rate})
        extra["TIERQ_MODELS"] = json.dumps({"sim": model})
        return serve_env(
            redis_url=redis_url, key_prefix=PREFIX, app_port=app_port, broker_url=broker_url,
            api_keys={KEY: {"id": "bench-quota", "plan": "paid"}}, queue_parallelism=1000,
            extra=extra,
        )  # fmt: skip

    return app_env


async def run_jobs(system: Any, n: int, concurrency: int) -> dict[str, Any]:
    payload = {"service": "chat", "experience": "batch", "mode": "auto", "model": "sim",
               "input": {"prompt": "quota bench", "simulate": {"tokens": 0}}}  # fmt: skip
    url = f"{system.app_url}/api/jobs"
    r = redis.Redis.from_url(system.app_redis.url)
    job_ids: list[str] = []

    body = json.dumps(payload).encode()
    request = json_post(system.app_port, "/api/jobs", body, AUTH)
    errors: Counter[str] = Counter()

    async def submit(conn: HttpConn, _: int) -> dict[str, Any] | str:
        status, data = await conn.request(request)
        return json.loads(data) if status == 202 else f"submit {status}"

    def took(reply: dict[str, Any]) -> None:
        job_ids.append(reply["jobId"])

    # warm up, then measure from a clean slate
    async with httpx.AsyncClient() as client:
        for _ in range(20):
            (await client.post(url, json=payload, headers=AUTH)).raise_for_status()
    await asyncio.sleep(1.0)
    r.config_resetstat()
    pids = system.pids()
    cpu0, t0 = cpu_snapshot(pids), time.monotonic()
    submitters = asyncio.ensure_future(
        submit_from(
            system.app_port,
            range(n),
            submit,
            took,
            errors,
            concurrency,
        )
    )
    seen: set[str] = set()
    own_reads = 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        pending = [j for j in job_ids if j not in seen][:256]
        if pending:
            pipe = r.pipeline(transaction=False)
            for job_id in pending:
                pipe.hget(f"{PREFIX}:job:{{{job_id}}}", "status")
            own_reads += len(pending)
            for job_id, status in zip(pending, pipe.execute(), strict=True):
                if status in (b"completed", b"failed"):
                    seen.add(job_id)
        if len(seen) == n:
            break
        await asyncio.sleep(0.02)
    await submitters
    if errors:
        raise RuntimeError(f"submits failed: {dict(errors)}")
    wall = time.monotonic() - t0
    cpu = cpu_spent(cpu0, cpu_snapshot(pids))
    calls = commandstats_calls(r.info("commandstats"))
    total = sum(calls.values()) - own_reads
    scripts = calls.get("evalsha", 0) + calls.get("eval", 0)
    app_cpu = cpu.get("app") or 0.0
    return {
        "jobs": n,
        "completed": len(seen),
        "wall_s": round(wall, 3),
        "jobs_per_s": round(len(seen) / wall, 1),
        "redis_commands_per_job": round(total / n, 2),
        "scripts_per_job": round(scripts / n, 2),
        "app_cpu_us_per_job": round(app_cpu / n * 1e6, 1),
        "cpu_s": {k: round(v, 3) for k, v in cpu.items() if v is not None},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "quotas.json")
    args = parser.parse_args(argv)
    started = time.time()
    runs: dict[str, Any] = {}
    for config in CONFIGS:
        with (
            tempfile.TemporaryDirectory(prefix="tierq-bench-") as tmp,
            running_system(
                Path(tmp), broker_key_prefix="tqquotab", app_env=env_for(config)
            ) as system,
        ):
            runs[config] = run_async(lambda s=system: run_jobs(s, args.jobs, args.concurrency))
        print(f"  {config}: {runs[config]}", flush=True)
    base = runs["plain"]
    added = {
        config: {
            "redis_commands_per_job": round(
                runs[config]["redis_commands_per_job"] - base["redis_commands_per_job"], 2
            ),
            "app_cpu_us_per_job": round(
                runs[config]["app_cpu_us_per_job"] - base["app_cpu_us_per_job"], 1
            ),
            "app_cpu_ratio": round(
                runs[config]["app_cpu_us_per_job"] / base["app_cpu_us_per_job"], 3
            ),
        }
        for config in ("ledger", "quotas")
    }
    doc = {
        **results_head("tierq quotas and ledger cost per job", started, machine_info(("tierq",))),
        "config": {"jobs": args.jobs, "concurrency": args.concurrency},
        "runs": runs,
        "added_over_plain": added,
    }
    write_results(args.out, doc)
    print(json.dumps(added, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
