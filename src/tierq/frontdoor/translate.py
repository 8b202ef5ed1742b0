"""An OpenAI chat-completions request → a tierq :class:`~tierq.contracts.JobRequest`.

- **tier**: the key's plan (mode ``auto``), exactly as ``POST /api/jobs`` with ``mode: auto``.
- **experience**: any ``image_url`` part → ``vision``; else ``stream: true`` → ``stream``,
  ``stream: false`` → ``batch``.
- **service**: the first configured service (in configuration order) that offers that
  experience with the requested model (and whose model supports it).
- **prompt** (tierq jobs carry one prompt): a conversation of a single ``user`` message is sent
  as that message's text, verbatim. Anything longer (a system prompt, earlier turns) is
  flattened into a transcript, one block per message, ``"<Role>: <text>"``, blocks separated by
  a blank line, roles ``System`` (``system`` and ``developer``), ``User``, ``Assistant``; so
  the model keeps the instructions and the history, not only the last question.
- **images**: the ``image_url.url`` of every ``image_url`` part, in order (URLs or data URIs).

Accepted and ignored (a tierq job has no slot for them; the model registry's ``max_tokens``
applies): ``temperature``, ``top_p``, ``max_tokens``, ``max_completion_tokens``, ``stop``,
``seed``, ``user``, penalties, ``logit_bias``, ``metadata`` and any other field. Refused with
400: ``n`` > 1, ``tools`` / ``functions`` (tierq does not run tools), ``tool`` / ``function``
messages, and content parts other than ``text`` and ``image_url``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tierq.config import Settings
from tierq.contracts import JobInput, JobRequest
from tierq.frontdoor.errors import OpenAIError, invalid_request, model_not_found
from tierq.queues import Experience

ROLE_LABELS = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ChatMessage(_Open):
    role: str
    content: str | list[dict[str, Any]] | None = None


class StreamOptions(_Open):
    include_usage: bool | None = False


class ChatRequest(_Open):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


@dataclass(frozen=True)
class Content:
    prompt: str
    images: list[str]


def _param(loc: tuple[int | str, ...]) -> str:
    """``("messages", 0, "content")`` → ``messages[0].content`` (union branch names dropped)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in part or part.lower() in _TYPE_NAMES:
            continue
        else:
            out += f".{part}" if out else part
    return out


def parse_request(data: object) -> ChatRequest:
    """Validate the JSON body; every problem is an OpenAI 400 naming the bad parameter."""
    try:
        req = ChatRequest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = _param(tuple(first.get("loc", ())))
        raise invalid_request(
            f"{param or 'body'}: {first.get('msg')}", param=param or None
        ) from None
    if req.n is not None and req.n != 1:
        raise invalid_request("tierq answers with one choice; n must be 1", param="n")
    if req.tools or req.functions:
        param = "tools" if req.tools else "functions"
        raise invalid_request("tierq does not run tools or functions", param=param)
    return req


def _part_text(index: int, position: int, part: dict[str, Any], images: list[str]) -> str | None:
    where = f"messages[{index}].content[{position}]"
    kind = part.get("type")
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise invalid_request(f"{where}.text must be a string", param=f"{where}.text")
        return text
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if not isinstance(url, str) or not url:
            raise invalid_request(f"{where}.image_url.url must be a URL or a data URI",
                                  param=f"{where}.image_url.url")  # fmt: skip
        images.append(url)
        return None
    raise invalid_request(
        f"{where}: unsupported content part type {kind!r} (tierq takes 'text' and 'image_url')",
        param=f"{where}.type",
    )


def message_text(index: int, message: ChatMessage, images: list[str]) -> str:
    """The message's text (its text parts joined by newlines); collects its images."""
    if message.role not in ROLE_LABELS:
        raise invalid_request(
            f"messages[{index}].role {message.role!r} is not supported (tierq does not run "
            "tools); use system, developer, user or assistant",
            param=f"messages[{index}].role",
        )
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    texts = [_part_text(index, i, part, images) for i, part in enumerate(message.content)]
    return "\n".join(t for t in texts if t is not None)


def flatten(messages: list[ChatMessage]) -> Content:
    """The job's prompt and images (see the module's doc for the rule)."""
    images: list[str] = []
    texts = [message_text(i, m, images) for i, m in enumerate(messages)]
    if len(messages) == 1 and messages[0].role == "user":
        prompt = texts[0]
    else:
        prompt = "\n\n".join(
            f"{ROLE_LABELS[m.role]}: {text}"
            for m, text in zip(messages, texts, strict=True)
            if text
        )
    if not prompt.strip():
        raise invalid_request(
            "the messages carry no text; a tierq job needs a prompt (images alone are not enough)",
            param="messages",
        )
    return Content(prompt=prompt, images=images)


def experience_of(req: ChatRequest, content: Content) -> Experience:
    if content.images:
        return "vision"
    return "stream" if req.stream else "batch"


def served_models(settings: Settings) -> list[str]:
    """Registry models some service offers with an experience the model supports, in registry
    order: what any tierq key may call (no plan restricts models; limits differ by tier)."""
    return [
        model_id
        for model_id, model in settings.models.items()
        if any(
            model_id in service.models and set(service.experiences) & set(model.experiences)
            for service in settings.services.values()
        )
    ]


def service_for(settings: Settings, model_id: str, experience: Experience) -> str:
    """The first service offering ``experience`` with ``model_id``.

    404 ``model_not_found`` when no service serves the model at all; 400
    ``model_not_supported`` when some do, but none for this experience (e.g. images sent to a
    model without vision) — as OpenAI answers images sent to a text-only model.
    """
    if model_id not in served_models(settings):
        raise model_not_found(model_id)
    model = settings.models[model_id]
    for name, service in settings.services.items():
        if (
            model_id in service.models
            and experience in service.experiences
            and (experience in model.experiences)
        ):
            return name
    what = {
        "vision": ("image inputs", "messages"),
        "stream": ("streaming", "stream"),
        "batch": ("non-streamed answers", "stream"),
    }[experience]
    raise OpenAIError(
        400,
        f"The model `{model_id}` does not support {what[0]} here.",
        param=what[1],
        code="model_not_supported",
    )


def job_request(settings: Settings, req: ChatRequest) -> JobRequest:
    content = flatten(req.messages)
    experience = experience_of(req, content)
    service = service_for(settings, req.model, experience)
    try:
        return JobRequest(
            service=service,
            experience=experience,
            mode="auto",
            model=req.model,
            input=JobInput(prompt=content.prompt, images=content.images),
        )
    except ValidationError as exc:  # e.g. a lone surrogate (``"\udfff"``) in the text
        first = exc.errors()[0]
        raise invalid_request(f"messages: {first.get('msg')}", param="messages") from None
