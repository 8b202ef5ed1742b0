"""Chaos benchmark: jobs flow through tierq while the app, the broker and the app's Redis are
each killed with ``SIGKILL`` several times and restarted; then every job's fate is counted.

The long version of ``tests/e2e/test_chaos.py`` (``make test`` runs that one, small). Real
processes on loopback: ``tierq serve`` and ``tierq broker`` as subprocesses, two embedded
Redis servers with AOF (the app's with ``appendfsync always``; the broker's is not killed).
The client submits ``--jobs`` jobs at ``--rate`` per second (paid and free users, stream and
batch, one in six failing its first run), retrying a submit until it is admitted; kills go
app, broker, Redis in turn, ``--every`` seconds apart, ``--rounds`` times, each part down
``--down`` seconds before its restart. A submit is due at each kill time (kill times are whole
multiples of 1/rate), so kills land as submits reach the app, and while jobs run.

Reported (JSON, like the other benchmarks): jobs, admitted (job records, the client's and
orphans from submits whose outcome it could not know), completed, failed, lost (admitted,
never terminal), duplicate terminal events, seq gaps, wrong results, reruns with no failure or
crash between, leaked leases / admission slots / parked or dispatching jobs after the leases'
TTL, the broker's DLQ and leftover messages, the kills done (and how long each restart took),
the time to drain after the last kill, and which of these known tierq bugs explain
(``known_bugs``; ``unexplained`` is what they do not). Nothing is asserted; ``violations``
lists what a chaos run must not show.

Shared code: the scenario, the client and the checker are ``tests/chaos.py``, loaded from
there (by path: see ``load_scenario``), not copied: the test and the bench must mean the same
thing by "lost", "duplicate" and "leaked", and a copy would drift. That module imports only
tierq and libraries (no pytest, no conftest, nothing else from ``tests/``).

Usage::

    .venv/bin/python bench/chaos.py                  # 1000 jobs at 10/s, 3 kills of each part
    .venv/bin/python bench/chaos.py --quick          # 200 jobs at 10/s, 1 kill of each
    .venv/bin/python bench/chaos.py --rounds 5 --every 8 --out /tmp/chaos.json --log-dir /tmp/l
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from common import (
    LOOP_FACTORY,
    RESULTS_DIR,
    ROOT,
    copy_logs,
    current_tree_info,
    log_flags,
    machine_info,
    raise_nofile,
    results_head,
    run_async,
    write_results,
)


def load_scenario() -> ModuleType:
    """``tests/chaos.py``, loaded by path as ``tierq_chaos_scenario``: a plain ``import chaos``
    would find this script (also ``chaos``) first, to the type checker and to Python alike."""
    spec = importlib.util.spec_from_file_location(
        "tierq_chaos_scenario", ROOT / "tests" / "chaos.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


chaos = load_scenario()

DEFAULT_OUT = RESULTS_DIR / "chaos.json"
SHOWN = (
    "jobs", "admitted", "status_completed", "status_failed", "lost", "duplicate_terminal",
    "seq_gaps", "wrong_results", "unexplained_reruns", "jobs_run_more_than_once",
    "retryable_failures", "orphans", "leaked_leases", "leaked_admission", "leaked_parked",
    "leaked_dispatching", "broker_dlq", "broker_messages_left", "submit_attempts",
    "submit_refused", "submit_http_5xx", "submit_unknown",
)  # fmt: skip
NOTES = [
    "All processes (bench client, app, broker, two redis-servers) share this machine's CPUs.",
    "admitted counts job records found in the app's Redis plus the client's 202s: a submit "
    "whose connection died (submit_unknown) may have made a job the client never heard of "
    "(an orphan); a completed orphan is traced to its submit attempt by its exact result.",
    "lost: admitted and not terminal when the drain deadline passed; leaked_*: live members "
    "(expiry after Redis's now) once every job ended and the lease TTL and admission sweep "
    "had time to act (at most leak_deadline_s).",
    "unexplained: the counts with what known tierq bugs (known_bugs) explain taken out.",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="200 jobs, one kill of each part")
    parser.add_argument("--jobs", type=int, default=None, help="jobs to submit (1000)")
    parser.add_argument("--rate", type=float, default=10.0, help="submits per second (10)")
    parser.add_argument("--rounds", type=int, default=None, help="kills of each part (3)")
    parser.add_argument("--first", type=float, default=None, help="first kill, s (10)")
    parser.add_argument("--every", type=float, default=None, help="s between kills (10)")
    parser.add_argument("--down", type=float, default=1.0, help="s a killed part stays down")
    parser.add_argument("--seed", type=int, default=10, help="seed of the job mix")
    parser.add_argument("--drain-deadline-s", type=float, default=90.0, help="after submits")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    parser.add_argument("--log-dir", type=Path, default=None, help="keep the processes' logs")
    args = parser.parse_args(argv)
    quick = {"jobs": 200, "rounds": 1, "first": 4.0, "every": 5.0}
    full = {"jobs": 1000, "rounds": 3, "first": 10.0, "every": 10.0}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def plan_of(args: argparse.Namespace) -> Any:
    return chaos.Plan(
        jobs=args.jobs,
        rate=args.rate,
        kills=chaos.spread_kills(args.first, args.every, args.rounds),
        down_s=args.down,
        seed=args.seed,
        drain_deadline_s=args.drain_deadline_s,
    )


def config(args: argparse.Namespace, plan: Any) -> dict[str, Any]:
    return {
        "quick": args.quick,
        "jobs": plan.jobs,
        "rate_per_s": plan.rate,
        "kills": [{"at_s": at, "target": target} for at, target in plan.kills],
        "down_s": plan.down_s,
        "seed": plan.seed,
        "drain_deadline_s": plan.drain_deadline_s,
        "leak_deadline_s": plan.leak_deadline_s,
        "users": chaos.USERS,
        "lease_ttl_s": chaos.LEASE_TTL_S,
        "heartbeat_s": chaos.HEARTBEAT_S,
        "admission_sweep_s": chaos.ADMISSION_SWEEP_S,
        "qstash_retries": chaos.QSTASH_RETRIES,
        "qstash_retry_delay": chaos.QSTASH_RETRY_DELAY,
        "app_redis_appendfsync": "always",
        "client_loop": "uvloop" if LOOP_FACTORY else "asyncio",
    }


def run(plan: Any, log_dir: Path | None) -> tuple[Any, dict[str, Any]]:
    """One chaos run in a temporary folder; the report and the processes' log flags."""
    with tempfile.TemporaryDirectory(prefix="tierq-chaos-") as tmp:
        run_ = chaos.Chaos(plan, Path(tmp), say=lambda line: print(line, flush=True))
        try:
            report = run_async(run_.run)
        finally:
            logs = run_.system.logs()
            copy_logs(logs.values(), log_dir, prefix="chaos-")
        return report, {name: log_flags(path) for name, path in logs.items()}


def print_summary(report: Any) -> None:
    c = report.counts
    print("\n".join(f"  {name:<24} {c.get(name, 0)}" for name in SHOWN))
    print(f"  timings: {report.timings}")
    for name, items in report.known_bugs.items():
        print(f"  known bug {name}: {len(items)} ({', '.join(items[:5])})")
    for line in chaos.violations(report):
        print(f"  VIOLATION: {line}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_nofile(at_least=8192)
    started = time.time()
    machine = machine_info(("tierq", "httpx", "uvicorn", "starlette", "redis", "qstash"))
    plan = plan_of(args)
    report, logs = run(plan, args.log_dir)
    found = report.as_dict()
    found["problems"] = found["problems"][:50]
    doc = {
        **results_head(
            "tierq chaos (kill -9 of app, broker and the app's Redis while jobs flow)",
            started,
            machine,
        ),
        "notes": NOTES,
        "tree": current_tree_info(),
        "config": config(args, plan),
        "violations": chaos.violations(report),
        **found,
        "logs": logs,
    }
    print_summary(report)
    write_results(args.out, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
