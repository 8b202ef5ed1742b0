"""The ``tierq`` command: thin — parse options, configure, call a function."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from tierq.cli_ops import register
from tierq.config import Settings
from tierq.processes import broker_accounts, dev_settings, run_server, settle_heap

if TYPE_CHECKING:
    from tierq.broker.server.credentials import Account


class Exit(enum.IntEnum):
    OK = 0
    FAILURE = 1
    USAGE = 2
    UNAVAILABLE = 3


app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
register(app)


@contextlib.contextmanager
def redis_url_or_embedded(redis_url: str | None, data_dir: Path) -> Iterator[str]:
    """The configured Redis, or an embedded redis-server for as long as the block runs."""
    if redis_url:
        yield redis_url
        return
    from tierq.embedded_redis import EmbeddedRedis  # noqa: PLC0415 - only when embedding

    with EmbeddedRedis(data_dir / "redis") as embedded:
        typer.echo(f"Embedded Redis at {embedded.url} (data in {embedded.data_dir})")
        yield embedded.url


def broker_banner(url: str, account: Account, accept_dev: bool, allowed: list[str]) -> str:
    """What ``tierq broker`` prints at start-up: no secret, only published dev credentials."""
    from tierq.broker.server.credentials import PUBLIC_VALUES, printable  # noqa: PLC0415

    # The first line matches the official dev server's, which tools detect with /runn+ing at/.
    lines = [
        f"tierq QStash-compatible broker is running at {url}",
        "Point the official SDKs at it with:",
        "",
        f"QSTASH_URL={url}",
        f"QSTASH_TOKEN={printable(account.token)}",
        f"QSTASH_CURRENT_SIGNING_KEY={printable(account.current_key)}",
        f"QSTASH_NEXT_SIGNING_KEY={printable(account.next_key)}",
        "",
    ]
    if accept_dev and account.token not in PUBLIC_VALUES:
        lines += ["The official QStash dev server's public tokens are accepted too.", ""]
    lines += [f"Deliveries allowed to: {', '.join(allowed) or 'nowhere'}", ""]
    return "\n".join(lines)


def run_broker(settings: Settings, redis_url: str) -> None:
    from tierq.broker.server.app import create_broker_app, serve  # noqa: PLC0415
    from tierq.broker.server.credentials import DEV_ACCOUNTS, dev_tokens_accepted  # noqa: PLC0415

    broker = settings.broker
    accounts = broker_accounts(settings)
    shown = accounts.get(settings.qstash_token or "") or DEV_ACCOUNTS[0]
    accept_dev = dev_tokens_accepted(broker.accept_dev_tokens, settings.qstash_token)
    url = f"http://{broker.host}:{broker.port}"

    def started() -> None:
        settle_heap()
        typer.echo(broker_banner(url, shown, accept_dev, broker.allowed_destinations))
        sys.stdout.flush()

    run_server(
        serve(
            create_broker_app(broker, redis_url, accounts),
            broker.host,
            broker.port,
            on_started=started,
        )
    )


@app.command()
def broker(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    redis_url: Annotated[
        str | None, typer.Option(help="Redis for the broker's state; default: embedded.")
    ] = None,
    key_prefix: Annotated[str, typer.Option(help="Prefix of the broker's Redis keys.")] = "tqb",
) -> None:
    """Run the embedded QStash-compatible broker."""
    settings = Settings()
    settings.broker = settings.broker.model_copy(
        update={"host": host, "port": port, "key_prefix": key_prefix}
    )
    with redis_url_or_embedded(redis_url or settings.redis_url, settings.data_dir) as url:
        run_broker(settings, url)


def dev_banner(settings: Settings, broker_url: str) -> str:
    app_url = settings.public_url
    return "\n".join(
        [
            f"tierq is running at {app_url}",
            f"  SSE test page     {app_url}/ui/sse",
            f"  submit a job      POST {app_url}/api/jobs",
            f"  QStash broker     {broker_url}",
            "  API keys          tq_dev_paid (paid plan), tq_dev_free (free plan)",
            f"  admin token       {settings.admin_token}",
            "",
        ]
    )


async def run_dev(settings: Settings) -> None:
    """The broker, then the app (which syncs the six queues into it), in one process."""
    from tierq.app import create_app  # noqa: PLC0415
    from tierq.broker.server.app import create_broker_app, serve  # noqa: PLC0415

    broker = settings.broker
    accounts = broker_accounts(settings)
    from tierq.observability.metrics import Metrics  # noqa: PLC0415

    metrics = Metrics()  # one /metrics for both
    broker_started = asyncio.Event()
    broker_task = asyncio.create_task(
        serve(
            create_broker_app(broker, settings.redis_url or "", accounts, metrics),
            broker.host,
            broker.port,
            on_started=broker_started.set,
        )
    )
    await asyncio.wait(
        [broker_task, asyncio.create_task(broker_started.wait())], return_when="FIRST_COMPLETED"
    )
    if broker_task.done():
        broker_task.result()
    host, port = _host_port(settings.public_url)
    broker_url = f"http://{broker.host}:{broker.port}"
    app_task = asyncio.create_task(
        serve(
            create_app(settings, metrics=metrics),
            host,
            port,
            on_started=lambda: typer.echo(dev_banner(settings, broker_url)),
        )
    )
    await asyncio.gather(broker_task, app_task)


def _host_port(url: str) -> tuple[str, int]:
    from urllib.parse import urlsplit  # noqa: PLC0415

    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80


WORKERS_HELP = (
    "App processes sharing the port: a number, or 'auto' (one per usable CPU core). "
    "Default: TIERQ_WORKERS, else 1 (the app runs in this process)."
)


def _workers(option: str | None, settings: Settings) -> int:
    from tierq.processes import worker_count  # noqa: PLC0415

    try:
        return worker_count(option if option is not None else settings.workers)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--workers") from None


@app.command()
def dev(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the app.")] = 8000,
    broker_port: Annotated[int, typer.Option(help="Port of the embedded broker.")] = 8080,
    workers: Annotated[
        int,
        typer.Option(
            min=1, help="App processes on the app's port (default: one process runs everything)."
        ),
    ] = 1,
) -> None:
    """Run everything locally in one process: embedded Redis, the broker, the app (with
    --workers N: Redis and the broker here, the app in N processes on its port)."""
    settings = dev_settings(host, port, broker_port)
    _setup_logs(settings, json_output=False)
    if settings.redis_cluster:
        typer.echo(
            "tierq dev runs the embedded broker on the app's Redis, which must be a single node: "
            "unset TIERQ_REDIS_CLUSTER, or run `tierq broker` on its own Redis and `tierq serve`",
            err=True,
        )
        raise typer.Exit(Exit.USAGE)
    with redis_url_or_embedded(settings.redis_url, settings.data_dir) as url:
        settings = settings.model_copy(update={"redis_url": url})
        if workers == 1:
            run_server(run_dev(settings))
            return
        from tierq.processes import dev_workers  # noqa: PLC0415

        code = dev_workers(settings, host, port, broker_port, workers, dev_banner)
    if code:
        raise typer.Exit(code)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "0.0.0.0",  # noqa: S104
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    workers: Annotated[str | None, typer.Option(help=WORKERS_HELP)] = None,
) -> None:
    """Run the app against real QStash and Redis; refuses to start without real secrets.

    With --workers N (N > 1) this process binds the port and supervises N app processes on it:
    SIGTERM/SIGINT drains them (TIERQ_SHUTDOWN_GRACE_S) and exits 0; a process that dies is
    restarted."""
    settings = Settings()
    _setup_logs(settings, json_output=settings.log_json)
    missing = settings.missing_production_secrets()
    if not settings.redis_url:
        missing.append("TIERQ_REDIS_URL")
    if missing:
        typer.echo(f"tierq serve needs real secrets; missing: {', '.join(missing)}", err=True)
        raise typer.Exit(Exit.USAGE)
    count = _workers(workers, settings)
    if count > 1:
        from tierq.processes import supervise  # noqa: PLC0415

        code = supervise(settings, host, port, count)
        if code:
            raise typer.Exit(Exit.FAILURE)
        return
    from tierq.app import create_app  # noqa: PLC0415
    from tierq.processes import app_server  # noqa: PLC0415

    run_server(app_server(create_app(settings), settings, host, port).serve())


@app.command()
def sim(
    jobs: Annotated[int, typer.Option(min=1, help="Synthetic jobs to run.")] = 1000,
    users: Annotated[
        int, typer.Option(min=1, help="Synthetic users sim-user-0.. (even: paid, odd: free).")
    ] = 20,
    concurrency: Annotated[
        int, typer.Option(min=1, help="Deliveries in flight at once, across all queues.")
    ] = 64,
    token_latency_ms: Annotated[
        float, typer.Option(min=0, max=60_000, help="Simulated model latency per token.")
    ] = 0.0,
    tokens: Annotated[int, typer.Option(min=0, max=10_000, help="Tokens per job.")] = 8,
    fail_rate: Annotated[
        float, typer.Option(min=0, max=1, help="Fraction of jobs that fail once, then retry.")
    ] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of the job mix.")] = 1,
    redis_url: Annotated[
        str | None, typer.Option(help="Redis to run against; default: embedded, temporary.")
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    keep_keys: Annotated[
        bool, typer.Option(help="Leave the run's Redis keys behind for inspection.")
    ] = False,
) -> None:
    """Drive the worker pipeline in-process with synthetic jobs and check nothing leaks.

    Exits 6 when a lease or a non-terminal job is left behind."""
    import tempfile  # noqa: PLC0415

    from tierq.errors import UpstreamError  # noqa: PLC0415
    from tierq.ops.sim import SimError, SimExit, format_report, simulate  # noqa: PLC0415

    settings = Settings()
    _setup_logs(settings.model_copy(update={"log_level": "warning"}), json_output=False)
    with contextlib.ExitStack() as stack:
        # keep stdout for the report: the embedded Redis banner goes to stderr under --json
        with contextlib.redirect_stdout(sys.stderr) if json_output else contextlib.nullcontext():
            data_dir = None if redis_url else stack.enter_context(tempfile.TemporaryDirectory())
            url = stack.enter_context(redis_url_or_embedded(redis_url, Path(data_dir or ".")))
        run = simulate(
            settings, url, jobs=jobs, users=users, concurrency=concurrency,
            token_latency_ms=token_latency_ms, tokens=tokens, fail_rate=fail_rate, seed=seed,
            keep_keys=keep_keys,
        )  # fmt: skip
        try:
            report = asyncio.run(run)
        except SimError as exc:
            typer.echo(f"tierq sim: {exc}", err=True)
            raise typer.Exit(Exit.USAGE) from None
        except UpstreamError as exc:
            typer.echo(f"tierq sim: {exc}", err=True)
            raise typer.Exit(Exit.UNAVAILABLE) from None
    typer.echo(report.to_json() if json_output else format_report(report))
    if report.leaks.total:
        typer.echo(f"tierq sim: {report.leaks.total} leak(s) found", err=True)
        raise typer.Exit(SimExit.LEAKS)


def _setup_logs(settings: Settings, *, json_output: bool) -> None:
    from tierq.observability.logging import configure_logging  # noqa: PLC0415

    configure_logging(
        json_output=json_output, level=settings.log_level, secrets=settings.secret_values()
    )


def main() -> None:
    app()
