"""All settings and limits of tierq, in one place (pydantic-settings; units in names).

Environment variables use the ``TIERQ_`` prefix, except the QStash ones, which keep the names
Upstash documents (``QSTASH_URL``, ``QSTASH_TOKEN``, ``QSTASH_CURRENT_SIGNING_KEY``,
``QSTASH_NEXT_SIGNING_KEY``).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class BrokerSettings(BaseModel):
    """The embedded QStash-compatible broker."""

    host: str = "127.0.0.1"
    port: int = 8080
    key_prefix: str = "tqb"
    accept_dev_tokens: bool = True
    default_retries: int = 3
    max_retries: int = 20
    max_timeout_s: float = 900.0
    max_parallelism: int = 1000
    max_queues: int = 1000
    dedup_window_s: float = 600.0
    max_in_flight: int = 1000
    claim_batch: int = 200
    poll_interval_s: float = 0.5
    lease_grace_s: float = 60.0
    events_max_len: int = 100_000
    response_body_max_bytes: int = 256 * 1024
    max_body_bytes: int = 1024 * 1024


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TIERQ_", env_nested_delimiter="__", extra="ignore"
    )

    redis_url: str | None = None
    data_dir: Path = Path(".tierq")

    qstash_url: str | None = Field(
        default=None, validation_alias=AliasChoices("QSTASH_URL", "TIERQ_QSTASH_URL")
    )
    qstash_token: str | None = Field(
        default=None, validation_alias=AliasChoices("QSTASH_TOKEN", "TIERQ_QSTASH_TOKEN")
    )
    qstash_current_signing_key: str | None = Field(
        default=None,
        validation_alias=AliasChoices(
            "QSTASH_CURRENT_SIGNING_KEY", "TIERQ_QSTASH_CURRENT_SIGNING_KEY"
        ),
    )
    qstash_next_signing_key: str | None = Field(
        default=None,
        validation_alias=AliasChoices("QSTASH_NEXT_SIGNING_KEY", "TIERQ_QSTASH_NEXT_SIGNING_KEY"),
    )

    broker: BrokerSettings = Field(default_factory=BrokerSettings)
