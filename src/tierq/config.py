"""All settings and limits of tierq, in one place (pydantic-settings; units in names).

Sources, strongest first: constructor arguments, environment (``TIERQ_`` prefix, nested with
``__``, e.g. ``TIERQ_USER_LIMITS__FREE=1``), an optional ``tierq.toml`` (path in
``TIERQ_CONFIG``), defaults. The QStash variables keep the names Upstash documents
(``QSTASH_URL``, ``QSTASH_TOKEN``, ``QSTASH_CURRENT_SIGNING_KEY``, ``QSTASH_NEXT_SIGNING_KEY``).
Nothing else in tierq reads a limit from anywhere but here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, BaseModel, Field, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from tierq.queues import EXPERIENCES, Experience, Plan, QueueId, Tier

DEV_PAID_KEY = "tq_dev_paid"
DEV_FREE_KEY = "tq_dev_free"
# Dev-only conveniences: `tierq dev` uses them, `tierq serve` refuses to run without real ones.
DEV_ADMIN_TOKEN = "tq_dev_admin"  # noqa: S105 - public dev credential by design
DEV_EVENTS_SECRET = "tq-dev-events-secret-not-for-production"  # noqa: S105 - same


class BrokerSettings(BaseModel):
    """The embedded QStash-compatible broker."""

    host: str = "127.0.0.1"
    port: int = 8080
    key_prefix: str = "tqb"
    # The official dev server's public tokens: None (auto) accepts them only while no private
    # QSTASH_TOKEN is configured; True / False force either way.
    accept_dev_tokens: bool | None = None
    # Where deliveries and callbacks may go: hosts ("example.com", "*.example.com",
    # "10.0.0.5:8000", "[::1]"), URL prefixes ("https://app.example.com/api/"), or "*" for
    # anywhere. The default keeps a standalone broker to this machine.
    allowed_destinations: list[str] = Field(
        default_factory=lambda: ["localhost", "127.0.0.1", "[::1]"]
    )
    # A callback reports the destination's response; its body and headers are left out when
    # the destination answered from a private address (loopback, LAN, link-local), unless True.
    callback_private_bodies: bool = False
    default_retries: int = 3
    max_retries: int = 20
    max_timeout_s: float = 900.0
    max_parallelism: int = 1000
    max_queues: int = 1000
    dedup_window_s: float = 600.0
    max_in_flight: int = 1000
    redis_max_connections: int = 128
    redis_pool_timeout_s: float = 30.0
    redis_socket_timeout_s: float = 10.0
    claim_batch: int = 200
    poll_interval_s: float = 0.5
    # An attempt holds its message under a lease this long, renewed (every third of it) while
    # its HTTP request runs; a lease nobody renews lapses and the message is delivered again.
    attempt_lease_s: float = Field(default=10.0, gt=0)
    # Recording an attempt's outcome is retried (with backoff) for this long across a Redis
    # outage; after that the lease lapses and the message is delivered again.
    finish_retry_s: float = Field(default=30.0, ge=0)
    events_max_len: int = 100_000
    response_body_max_bytes: int = 256 * 1024
    max_body_bytes: int = 1024 * 1024
    # Request bodies of /v2/batch (others: max_body_bytes), messages per batch, JSON nesting.
    max_request_bytes: int = 64 * 1024 * 1024
    max_batch_messages: int = 1000
    max_json_depth: int = 32


class QueueSettings(BaseModel):
    parallelism: int = Field(ge=1)
    admission_depth: int = Field(ge=1, description="jobs admitted but not finished")
    paused: bool = False


def _default_queues() -> dict[QueueId, QueueSettings]:
    parallelism = {
        QueueId.PAID_STREAM: 16,
        QueueId.FREE_STREAM: 4,
        QueueId.PAID_BATCH: 8,
        QueueId.FREE_BATCH: 2,
        QueueId.PAID_VISION: 4,
        QueueId.FREE_VISION: 1,
    }
    return {q: QueueSettings(parallelism=p, admission_depth=p * 50) for q, p in parallelism.items()}


class TierLimits(BaseModel):
    paid: int = Field(default=8, ge=1)
    free: int = Field(default=2, ge=1)

    def for_tier(self, tier: Tier) -> int:
        return self.paid if tier == "paid" else self.free


class PlanWeights(BaseModel):
    """Fair-dispatch weight by plan: in its queue, a user of weight 3 gets three jobs
    dispatched for every one of a user of weight 1 while both have jobs waiting."""

    paid: int = Field(default=1, ge=1, le=1000)
    free: int = Field(default=1, ge=1, le=1000)

    def for_tier(self, tier: Tier) -> int:
        return self.paid if tier == "paid" else self.free


class Rate(BaseModel):
    """A rate quota: requests and (estimated, then real) tokens per minute; unset: no quota."""

    rpm: int | None = Field(default=None, ge=1, description="requests per minute")
    tpm: int | None = Field(default=None, ge=1, description="tokens per minute")


class TierRates(BaseModel):
    """Rate quotas by plan (users) or by tier (a model's upstream account)."""

    paid: Rate = Field(default_factory=Rate)
    free: Rate = Field(default_factory=Rate)

    def for_tier(self, tier: Tier) -> Rate:
        return self.paid if tier == "paid" else self.free


class Adaptive(BaseModel):
    """Adaptive concurrency of a model (AIMD): an upstream 429, or its rate-limit headers
    running low, lowers the model's effective limit (x ``decrease``; x ``slow_down`` for low
    headers); every success raises it by 1/limit, back up to the configured limit, never under
    ``min_limit``."""

    enabled: bool = False
    min_limit: int = Field(default=1, ge=1)
    decrease: float = Field(default=0.5, gt=0, lt=1)
    slow_down: float = Field(default=0.8, gt=0, lt=1)
    low_remaining: float = Field(
        default=0.05, ge=0, lt=1, description="remaining / limit under which headers are 'low'"
    )


class UserOverride(BaseModel):
    """One user's own limits, over those of their plan (unset: the plan's)."""

    weight: int | None = Field(default=None, ge=1, le=1000)
    running: int | None = Field(default=None, ge=1, description="running jobs (user guard)")
    queued: int | None = Field(default=None, ge=1, description="jobs admitted per queue")
    rpm: int | None = Field(default=None, ge=1, description="requests per minute")
    tpm: int | None = Field(default=None, ge=1, description="tokens per minute")


class ModelSettings(BaseModel):
    """One entry of the model registry."""

    provider: Literal["simulated", "openai"] = "simulated"
    upstream: str = ""
    base_url: str = ""
    api_key_env: str = ""
    experiences: list[Experience] = Field(default_factory=lambda: list(EXPERIENCES))
    limits: TierLimits = Field(default_factory=lambda: TierLimits(paid=8, free=2))
    # the upstream account's own rate limits, per tier: jobs over them wait, parked
    rates: TierRates = Field(default_factory=TierRates)
    adaptive: Adaptive = Field(default_factory=Adaptive)
    timeout_s: float = 120.0
    # openai provider only
    max_tokens: int | None = Field(default=None, ge=1, description="None: the upstream decides")
    extra_headers: dict[str, str] = Field(default_factory=dict)
    # simulated provider only
    token_latency_ms: float = 20.0
    tokens: int = 12


class ServiceSettings(BaseModel):
    experiences: list[Experience]
    models: list[str]


class UserSettings(BaseModel):
    id: str
    plan: Plan


def _dev_models() -> dict[str, ModelSettings]:
    return {"sim": ModelSettings()}


def _dev_services() -> dict[str, ServiceSettings]:
    return {
        "chat": ServiceSettings(experiences=["stream", "batch"], models=["sim"]),
        "describe": ServiceSettings(experiences=["vision"], models=["sim"]),
    }


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TIERQ_",
        env_nested_delimiter="__",
        extra="ignore",
        populate_by_name=True,
        toml_file=os.environ.get("TIERQ_CONFIG", "tierq.toml"),
    )

    # where things are
    redis_url: str | None = None
    # redis_url is a node of a Redis Cluster (the others are discovered); the embedded broker
    # keeps a single node of its own (README "Redis Cluster")
    redis_cluster: bool = False
    key_prefix: str = "tq"
    # Commands share a bounded pool (callers wait up to redis_pool_timeout_s for a connection);
    # SSE streams hold none: one tail hub per process reads for all of them.
    redis_max_connections: int = 64
    # The name every connection of this process gives itself (CLIENT SETNAME): how CLIENT LIST
    # tells tierq's connections apart, e.g. one name per replica
    redis_client_name: str = "tierq-app"
    # Job admission round trips in flight per process (a submit's admission, a delivery's claim
    # and start); the others wait their turn. A burst of submits and job starts then cannot
    # crowd the event loop so that the streams already running (their ticks, their SSE writes)
    # wait behind it; the work is the same, only its order changes.
    admission_concurrency: int = Field(default=16, ge=1)
    redis_pool_timeout_s: float = 10.0
    redis_socket_timeout_s: float = 10.0
    data_dir: Path = Path(".tierq")
    public_url: str = Field(
        default="http://127.0.0.1:8000",
        description="base URL QStash delivers to (this app, as QStash reaches it)",
    )
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

    # QStash API calls fail after this long (and are not retried by the SDK: dispatch retries)
    qstash_timeout_s: float = Field(default=5.0, gt=0)
    # per-queue gauges and the admin/dashboard queue lists come from one shared snapshot
    # (QStash + Redis), taken by one process of all at most every queue_metrics_s
    queue_metrics_s: float = Field(default=5.0, gt=0)

    # secrets and identities
    dev_mode: bool = False
    api_keys: dict[str, UserSettings] = Field(default_factory=dict)
    admin_token: str | None = None
    events_secret: str | None = None
    # Production surfaces (README "Production surfaces"). "auto": open under `tierq dev`; under
    # `tierq serve` /metrics and the API docs need a token and the pages are off. "token":
    # /metrics takes metrics_token or the admin token, the docs and pages the admin token
    # (Bearer, or as the password of HTTP Basic, which a browser asks for); "off": not served.
    metrics_access: Literal["auto", "open", "token", "off"] = "auto"
    metrics_token: str | None = Field(default=None, description="unset: the admin token only")
    docs_access: Literal["auto", "open", "token", "off"] = "auto"
    pages_access: Literal["auto", "open", "token", "off"] = "auto"

    # the six queues: parallelism (QStash) and admission depth (producer backpressure)
    queues: dict[QueueId, QueueSettings] = Field(default_factory=_default_queues)
    # the model and service registry; model limits per tier live on each model
    models: dict[str, ModelSettings] = Field(default_factory=_dev_models)
    services: dict[str, ServiceSettings] = Field(default_factory=_dev_services)
    # user guard: running jobs per user, by plan
    user_limits: TierLimits = Field(default_factory=lambda: TierLimits(paid=8, free=2))
    # per user and queue: jobs admitted and not finished, by plan, so that one user cannot
    # take a whole queue's admission depth (over it: 429 user_queue_full, for that user only)
    user_queue_limits: TierLimits = Field(default_factory=lambda: TierLimits(paid=1000, free=100))
    # fair dispatch: each user's weight in the round robin of a queue, by plan; per-user
    # overrides of weight and limits by user id
    user_weights: PlanWeights = Field(default_factory=PlanWeights)
    user_overrides: dict[str, UserOverride] = Field(default_factory=dict)
    # rate quotas per user, by plan (user_overrides.<id>.rpm/tpm over them): over one, a
    # submit gets 429 rate_limited; tokens are estimated at submit (prompt, max_tokens) and
    # corrected with the real usage when the job ends
    user_rates: TierRates = Field(default_factory=TierRates)
    # a job's completion tokens as estimated when the model sets no max_tokens
    estimated_completion_tokens: int = Field(default=512, ge=0)
    # the usage ledger (per user and model, per UTC day): on or off, and the days it keeps
    usage_ledger: bool = True
    usage_retention_days: int = Field(default=400, ge=1)

    # leases and dispatch
    lease_ttl_s: float = 30.0
    heartbeat_s: float = 10.0
    guard_retry_after_s: int = 5
    # a dispatched job's publish must be confirmed within this, or it goes back to its line
    dispatch_confirm_s: float = Field(default=60.0, gt=0)
    dispatch_batch: int = Field(default=100, ge=1, le=1000, description="jobs per dispatch call")
    dispatch_lookahead: int = Field(default=8, ge=1, le=100)
    dispatch_max_scan: int = Field(default=256, ge=1)
    dispatch_reconcile_s: float = Field(default=2.0, gt=0)
    # the process that dispatches a job starts running it as soon as it is published; its
    # QStash delivery, reaching that process, takes the run's answer (tierq.dispatch.local). Off
    # when the worker routes are served by another deployment than the one that dispatches
    local_start: bool = True
    # a parked job hears where it stands again at most this often (when it moved meaningfully)
    waiting_update_s: float = Field(default=5.0, gt=0)
    # an admission lease lives while its job does: every admission_sweep_s one process renews
    # the leases of jobs that exist unfinished and drops the others; admission_ttl_s is only
    # the safety net for a job whose record vanished
    admission_ttl_s: float = 3600.0
    admission_sweep_s: float = Field(default=60.0, gt=0)
    admission_retry_after_s: int = 2

    # jobs and events
    job_timeout_s: float = 300.0
    qstash_retries: int = 3
    qstash_retry_delay: str | None = None
    event_retention_s: float = 3600.0
    sse_ping_s: float = 15.0
    # an SSE client whose unsent backlog grows past this is dropped (it resumes with
    # Last-Event-ID); a write that cannot complete within sse_send_timeout_s ends the stream
    sse_client_buffer_bytes: int = Field(default=256 * 1024, ge=1024)
    sse_send_timeout_s: float = Field(default=30.0, gt=0)
    # SSE streams one app process serves at once per job and per user (429 over the cap)
    sse_max_per_job: int = Field(default=16, ge=1)
    sse_max_per_user: int = Field(default=64, ge=1)
    # streamed text: a job's chunks are coalesced into one delta event per flush tick
    # (its first chunk is written at once); a buffer this large is flushed early
    delta_flush_ms: float = Field(default=25.0, ge=0, le=1000)
    delta_flush_max_chars: int = Field(default=4096, ge=1)
    # the six old per-tier worker routes: "forward" (served like the unified ones), "redirect"
    # (308 to the unified route), "hint" (410 naming it) or "off" (not mounted)
    legacy_routes: Literal["forward", "redirect", "hint", "off"] = "forward"
    # gradual rollout: the share of jobs (0-100 %, chosen per job id, deterministically) whose
    # deliveries go to the unified routes; the others go to their legacy route (which must then
    # be "forward"). 100: everything on the unified routes
    unified_share: int = Field(default=100, ge=0, le=100)
    max_prompt_chars: int = 100_000
    max_images: int = 8
    # request bodies nested deeper than this (arrays and objects) are refused with 400
    # before they are parsed (a deep body made the JSON parser recurse until it failed)
    max_json_depth: int = Field(default=64, ge=2, le=256)
    # request bodies larger than this are refused with 413: a job is published as one QStash
    # message, and QStash (Upstash's free plan, the embedded broker) takes 1 MiB at most
    max_body_bytes: int = Field(default=1_000_000, ge=1024)

    # `tierq serve`: app processes sharing its port (1: the app runs in the serve process
    # itself; "auto": one per usable CPU core), and how long a stopping process lets requests
    # in flight (worker deliveries, SSE streams) finish before it cancels them
    workers: Annotated[int, Field(ge=1)] | Literal["auto"] = 1
    shutdown_grace_s: float = Field(default=25.0, ge=0)

    # logs: level, JSON (production) or console (dev), sampling rate per job event type
    # OpenTelemetry: spans are exported by OTLP (http/protobuf) to this endpoint, or to the
    # standard OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT; with neither, nothing is traced
    otel_endpoint: str | None = None
    otel_service_name: str = "tierq"
    log_level: str = "info"
    log_json: bool = True
    log_sample_rates: dict[str, float] = Field(default_factory=dict)

    broker: BrokerSettings = Field(default_factory=BrokerSettings)

    @model_validator(mode="after")
    def _heartbeat_inside_ttl(self) -> Settings:
        if not 0 < self.heartbeat_s < self.lease_ttl_s:
            raise ValueError("heartbeat_s must be positive and shorter than lease_ttl_s")
        return self

    @model_validator(mode="after")
    def _legacy_share_served(self) -> Settings:
        if self.unified_share < 100 and self.legacy_routes != "forward":
            raise ValueError(
                f"unified_share {self.unified_share} sends some deliveries to the legacy routes: "
                f'legacy_routes must be "forward" (it is "{self.legacy_routes}")'
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))

    def user_running_limit(self, user_id: str, plan: Plan) -> int:
        own = self.user_overrides.get(user_id)
        return (own and own.running) or self.user_limits.for_tier(plan)

    def user_queue_limit(self, user_id: str, plan: Plan) -> int:
        own = self.user_overrides.get(user_id)
        return (own and own.queued) or self.user_queue_limits.for_tier(plan)

    def user_rate(self, user_id: str, plan: Plan) -> Rate:
        """The user's rate quotas: their own where set, else their plan's."""
        plan_rate = self.user_rates.for_tier(plan)
        own = self.user_overrides.get(user_id)
        if own is None or (own.rpm is None and own.tpm is None):
            return plan_rate
        return Rate(rpm=own.rpm or plan_rate.rpm, tpm=own.tpm or plan_rate.tpm)

    def user_weight(self, user_id: str, plan: Plan) -> int:
        own = self.user_overrides.get(user_id)
        return (own and own.weight) or self.user_weights.for_tier(plan)

    def with_dev_defaults(self) -> Settings:
        """What ``tierq dev`` adds: fixed API keys, admin token and events secret."""
        keys = {
            DEV_PAID_KEY: UserSettings(id="dev-paid", plan="paid"),
            DEV_FREE_KEY: UserSettings(id="dev-free", plan="free"),
            **self.api_keys,
        }
        return self.model_copy(
            update={
                "dev_mode": True,
                "api_keys": keys,
                "admin_token": self.admin_token or DEV_ADMIN_TOKEN,
                "events_secret": self.events_secret or DEV_EVENTS_SECRET,
            }
        )

    def secret_values(self) -> list[str]:
        """Every secret this configuration holds (so logs can mask them)."""
        values = [
            self.admin_token, self.metrics_token, self.events_secret, self.qstash_token,
            self.qstash_current_signing_key, self.qstash_next_signing_key, *self.api_keys,
        ]  # fmt: skip
        return [v for v in values if v]

    def missing_production_secrets(self) -> list[str]:
        """What ``tierq serve`` refuses to start without."""
        needed = {
            "TIERQ_API_KEYS": bool(self.api_keys),
            "TIERQ_ADMIN_TOKEN": bool(self.admin_token),
            "TIERQ_EVENTS_SECRET": bool(self.events_secret),
            "QSTASH_TOKEN": bool(self.qstash_token),
            "QSTASH_CURRENT_SIGNING_KEY": bool(self.qstash_current_signing_key),
            "QSTASH_NEXT_SIGNING_KEY": bool(self.qstash_next_signing_key),
        }
        return [name for name, present in needed.items() if not present]
