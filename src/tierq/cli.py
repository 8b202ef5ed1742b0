"""The ``tierq`` command: thin — parse options, configure, call a function."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from tierq.config import BrokerSettings, Settings


class Exit(enum.IntEnum):
    OK = 0
    FAILURE = 1
    USAGE = 2
    UNAVAILABLE = 3


app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)


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


def broker_banner(url: str, token: str, current: str, nxt: str) -> str:
    # The first line matches the official dev server's, which tools detect with /runn+ing at/.
    return "\n".join(
        [
            f"tierq QStash-compatible broker is running at {url}",
            "Point the official SDKs at it with:",
            "",
            f"QSTASH_URL={url}",
            f"QSTASH_TOKEN={token}",
            f"QSTASH_CURRENT_SIGNING_KEY={current}",
            f"QSTASH_NEXT_SIGNING_KEY={nxt}",
            "",
        ]
    )


def run_broker(settings: Settings, redis_url: str) -> None:
    from tierq.broker.server.app import create_broker_app, serve  # noqa: PLC0415
    from tierq.broker.server.credentials import DEV_ACCOUNTS, build_accounts  # noqa: PLC0415

    broker = settings.broker
    accounts = build_accounts(
        dev_accounts=broker.accept_dev_tokens,
        token=settings.qstash_token,
        current_key=settings.qstash_current_signing_key,
        next_key=settings.qstash_next_signing_key,
    )
    shown = accounts.get(settings.qstash_token or "") or DEV_ACCOUNTS[0]
    url = f"http://{broker.host}:{broker.port}"

    def started() -> None:
        typer.echo(broker_banner(url, shown.token, shown.current_key, shown.next_key))
        sys.stdout.flush()

    asyncio.run(
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


@app.command()
def dev(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    broker_port: Annotated[int, typer.Option(help="Port of the embedded broker.")] = 8080,
) -> None:
    """Run everything locally: embedded Redis and the broker."""
    settings = Settings()
    settings.broker = BrokerSettings(host=host, port=broker_port)
    with redis_url_or_embedded(settings.redis_url, settings.data_dir) as url:
        run_broker(settings, url)


def main() -> None:
    app()
