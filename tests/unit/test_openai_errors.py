"""provider_error: every SDK failure → code and retryability, as a table."""

from __future__ import annotations

import json

import httpx2
import openai
import pytest

from tierq.contracts import JobInput
from tierq.providers.base import ProviderRequest
from tierq.providers.openai_compat import MESSAGE_MAX_CHARS, chat_messages, provider_error
from tierq.queues import Experience

REQUEST = httpx2.Request("POST", "http://upstream/v1/chat/completions")


def status_error(status: int, body: object = None) -> openai.APIStatusError:
    response = httpx2.Response(status, request=REQUEST)
    return openai.APIStatusError(f"Error code: {status}", response=response, body=body)


def connection_error() -> openai.APIConnectionError:
    try:
        raise openai.APIConnectionError(request=REQUEST) from httpx2.ConnectError("refused")
    except openai.APIConnectionError as exc:
        return exc


@pytest.mark.parametrize(
    ("exc", "code", "retryable"),
    [
        (openai.APITimeoutError(request=REQUEST), "upstream_timeout", True),
        (connection_error(), "upstream_unreachable", True),
        (status_error(429), "upstream_429", True),
        (status_error(500), "upstream_5xx", True),
        (status_error(502), "upstream_5xx", True),
        (status_error(408), "upstream_4xx", True),
        (status_error(409), "upstream_4xx", True),
        (status_error(400), "upstream_4xx", False),
        (status_error(401), "upstream_4xx", False),
        (status_error(404), "upstream_4xx", False),
        (status_error(422), "upstream_4xx", False),
        (openai.APIError("boom", REQUEST, body=None), "upstream_error", True),
        (json.JSONDecodeError("bad", "x", 0), "upstream_bad_response", True),
        (openai.OpenAIError("no credentials"), "upstream_error", False),
    ],
)
def test_codes_and_retryability(exc: Exception, code: str, retryable: bool) -> None:
    error = provider_error(exc, "gpt")
    assert (error.code, error.retryable) == (code, retryable)
    assert error.message.startswith("model 'gpt': ")


def test_status_message_carries_status_and_upstream_message() -> None:
    error = provider_error(status_error(400, {"message": "bad image", "type": "x"}), "gpt")
    assert error.message == "model 'gpt': the upstream answered 400: bad image"


def test_status_without_a_json_body_falls_back_to_the_sdk_message() -> None:
    error = provider_error(status_error(502, "<html>bad gateway</html>"), "gpt")
    assert error.message == "model 'gpt': the upstream answered 502: Error code: 502"


def test_connection_error_names_its_cause() -> None:
    assert provider_error(connection_error(), "m").message.endswith("unreachable (ConnectError)")


def test_secret_is_redacted_before_clipping() -> None:
    secret = "sk-" + "s" * 40
    padding = "x" * (MESSAGE_MAX_CHARS - 60)
    body = {"message": f"{padding} key {secret} rejected {secret}"}
    error = provider_error(status_error(401, body), "gpt", secret)
    assert secret not in error.message
    assert secret[:12] not in error.message
    assert "[redacted]" in error.message
    assert len(error.message) <= MESSAGE_MAX_CHARS


def test_long_messages_are_clipped() -> None:
    error = provider_error(status_error(400, {"message": "y" * 5000}), "gpt")
    assert len(error.message) == MESSAGE_MAX_CHARS
    assert error.message.endswith("…")


@pytest.mark.parametrize("experience", ["stream", "batch"])
def test_text_jobs_send_one_plain_user_message(experience: Experience) -> None:
    request = ProviderRequest("j", "gpt", "up", experience, JobInput(prompt="hi"))
    assert chat_messages(request) == [{"role": "user", "content": "hi"}]


def test_vision_jobs_send_text_then_image_parts() -> None:
    job = JobInput(prompt="what?", images=["https://x/a.png", "data:image/png;base64,AA=="])
    request = ProviderRequest("j", "gpt", "up", "vision", job)
    assert chat_messages(request) == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what?"},
                {"type": "image_url", "image_url": {"url": "https://x/a.png"}},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
            ],
        }
    ]
