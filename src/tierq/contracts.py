"""Pydantic models on the wire: the job request, the worker body, the event union, errors."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from tierq.queues import Experience, Mode, Plan, QueueId, Tier

JobStatus = Literal["queued", "waiting", "running", "completed", "failed", "cancelled"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"completed", "failed", "cancelled"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Simulate(_Strict):
    """Knobs of the simulated model, for tests and demos (ignored by real providers)."""

    fail: Literal["error", "fatal", "exception", "hang"] | None = None
    fail_attempts: int | None = Field(
        default=None, ge=1, description="fail only the first N attempts, then succeed"
    )
    tokens: int | None = Field(default=None, ge=0, le=10_000)
    token_latency_ms: float | None = Field(default=None, ge=0, le=60_000)


class JobInput(_Strict):
    prompt: str = Field(min_length=1)
    images: list[str] = Field(default_factory=list)
    simulate: Simulate | None = None


class JobRequest(_Strict):
    service: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    experience: Experience
    mode: Mode = "auto"
    model: str = Field(min_length=1, max_length=128)
    input: JobInput


class WorkerBody(_Strict):
    """What the producer publishes and the worker receives (also kept for audit)."""

    v: Literal[1] = 1
    job_id: str = Field(alias="jobId")
    user_id: str = Field(alias="userId")
    plan: Plan
    tier: Tier
    queue_id: QueueId = Field(alias="queueId")
    model_id: str = Field(alias="modelId")
    service: str
    experience: Experience
    input: JobInput
    submitted_at_ms: int = Field(alias="submittedAt")
    max_retries: int = Field(alias="maxRetries", ge=0)
    # tokens the job was estimated to use at submit (rate quotas), corrected when it ends
    estimated_tokens: int = Field(default=0, alias="estimatedTokens", ge=0)
    # the submit's trace (W3C), for dispatch to publish the job in it (absent: not traced)
    traceparent: str | None = Field(
        default=None, pattern=r"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"
    )


class SubmitResponse(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    job_id: str = Field(serialization_alias="jobId")
    queue_id: QueueId = Field(serialization_alias="queueId")
    tier: Tier
    events_url: str = Field(serialization_alias="eventsUrl")
    events_token: str = Field(serialization_alias="eventsToken")
    # OpenAI's x-ratelimit-* headers for the caller's rate quotas (not in the body)
    rate_headers: dict[str, str] = Field(default_factory=dict, exclude=True)


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0


# -- events ---------------------------------------------------------------------------------


class _Event(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    job_id: str = Field(alias="jobId")
    seq: int = 0
    ts: int = 0


class Queued(_Event):
    type: Literal["queued"] = "queued"
    queue_id: QueueId = Field(alias="queueId")
    tier: Tier


Hold = Literal["model", "user", "queue", "paused", "rate"]


class Waiting(_Event):
    """The job is parked: ``guard`` says what holds it (its user's running limit, its model's,
    the queue's slots or fair turn, or a paused queue); ``position``: jobs dispatched first."""

    type: Literal["waiting"] = "waiting"
    guard: Hold
    position: int | None = None


class Started(_Event):
    type: Literal["started"] = "started"
    attempt: int = 0


class Delta(_Event):
    type: Literal["delta"] = "delta"
    text: str


class Progress(_Event):
    type: Literal["progress"] = "progress"
    value: float = Field(ge=0, le=1)


class Completed(_Event):
    type: Literal["completed"] = "completed"
    result: str
    usage: Usage = Field(default_factory=Usage)


class Failed(_Event):
    type: Literal["failed"] = "failed"
    code: str
    message: str
    retryable: bool


class Cancelled(_Event):
    type: Literal["cancelled"] = "cancelled"


WorkerEvent = Annotated[
    Queued | Waiting | Started | Delta | Progress | Completed | Failed | Cancelled,
    Field(discriminator="type"),
]
EVENT_ADAPTER: TypeAdapter[WorkerEvent] = TypeAdapter(WorkerEvent)
TERMINAL_EVENTS: frozenset[str] = frozenset({"completed", "failed", "cancelled"})


def ends_job(kind: str, retryable: bool | None) -> bool:
    """Whether an event of type ``kind`` ends its job: ``failed`` only when QStash will not
    deliver the job again (``retryable`` false)."""
    if kind == "failed":
        return retryable is False
    return kind in TERMINAL_EVENTS


def is_terminal(event: WorkerEvent) -> bool:
    return ends_job(event.type, event.retryable if isinstance(event, Failed) else None)


def event_json(event: WorkerEvent) -> str:
    return event.model_dump_json(by_alias=True)


def parse_event(raw: str | bytes) -> WorkerEvent:
    return EVENT_ADAPTER.validate_json(raw)


# -- errors ---------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


def error_body(code: str, message: str) -> dict[str, Any]:
    return ErrorBody(error=ErrorDetail(code=code, message=message)).model_dump()
