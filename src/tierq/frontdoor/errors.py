"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` with its statuses.

Everything the front door answers goes through :class:`OpenAIError`, so a client built on the
official ``openai`` SDK raises the exception class it expects (``AuthenticationError``,
``NotFoundError``, ``RateLimitError``, ``BadRequestError``, ``InternalServerError`` …).

How a job that *ended* badly is answered (:func:`from_failed`):

- ``model_busy``, ``user_busy`` (a guard's wait ran out), ``upstream_429`` (still rate limited
  after tierq's retries) → 429 + ``Retry-After``, type ``requests``, code ``rate_limit_exceeded``;
- ``upstream_4xx`` when the upstream answered 400/413/422 or anything but 401/403/404 (it
  rejected the request itself) → 400 ``invalid_request_error`` with the upstream's message;
- ``upstream_4xx`` when the upstream answered 401/403/404 (tierq's upstream key or model name is
  wrong: nothing the caller can fix) → 502 ``server_error``;
- ``upstream_5xx``, ``upstream_timeout``, ``upstream_unreachable`` and the other ``upstream_*``
  (after tierq's retries) → 502 ``server_error``;
- ``timeout`` (the job's own time limit) → 504 ``server_error``;
- anything else (``internal_error``, ``no_result``, ``upstream_key_missing`` …) → 500
  ``server_error``. The ``code`` is tierq's failure code except for 429s.

Failures that come after tierq already retried (every 5xx/504 above) carry
``x-should-retry: false`` — the ``openai`` SDK obeys it, so one request does not become
``max_retries`` more jobs; 429 keeps the SDK's usual back-off-and-retry.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi.responses import JSONResponse

from tierq.contracts import Failed
from tierq.errors import Busy, ClientError, Forbidden, NotFound, TierqError, Unauthorized

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"
RATE_LIMIT_TYPE = "requests"
RATE_LIMIT_CODE = "rate_limit_exceeded"
_UPSTREAM_STATUS = re.compile(r"answered (\d{3})")
_CONFIG_4XX = frozenset({401, 403, 404})
_BUSY_CODES = frozenset({"model_busy", "user_busy", "upstream_429"})


class OpenAIError(TierqError):
    """An answer in OpenAI's error shape (raised inside the front door, rendered once)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = INVALID_REQUEST,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def invalid_request(
    message: str, *, param: str | None = None, code: str | None = None
) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def rate_limited(message: str, retry_after_s: int) -> OpenAIError:
    return OpenAIError(
        429,
        message,
        type_=RATE_LIMIT_TYPE,
        code=RATE_LIMIT_CODE,
        headers={"Retry-After": str(retry_after_s)},
    )


def model_not_found(model: str) -> OpenAIError:
    return OpenAIError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


def masked(key: str) -> str:
    """A key as OpenAI quotes it back: its ends only."""
    return f"{key[:4]}{'*' * 8}{key[-4:]}" if len(key) > 12 else "*" * 8


def invalid_api_key(key: str | None) -> OpenAIError:
    if not key:
        message = (
            "You didn't provide an API key. You need to provide your tierq API key in an "
            "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
        )
    else:
        message = f"Incorrect API key provided: {masked(key)}."
    return OpenAIError(401, message, code="invalid_api_key")


def unavailable() -> OpenAIError:
    return OpenAIError(
        503,
        "tierq cannot reach one of its dependencies right now; retry shortly.",
        type_=SERVER_ERROR,
        code="service_unavailable",
    )


def from_client_error(exc: ClientError) -> OpenAIError:
    """What ``submit`` refused, in OpenAI's terms."""
    if isinstance(exc, Busy):
        return rate_limited(exc.message, exc.retry_after_s)
    if isinstance(exc, Unauthorized):
        return OpenAIError(401, exc.message, code="invalid_api_key")
    if isinstance(exc, Forbidden):
        return OpenAIError(403, exc.message, type_="permission_error", code=exc.code)
    if isinstance(exc, NotFound):
        return OpenAIError(404, exc.message, param="model", code="model_not_found")
    status = exc.status if 400 <= exc.status < 500 else 400
    return OpenAIError(status, exc.message, code=exc.code)


def _final(status: int, message: str, code: str) -> OpenAIError:
    """A server-side failure tierq already retried: the SDK must not retry it again."""
    return OpenAIError(
        status, message, type_=SERVER_ERROR, code=code, headers={"x-should-retry": "false"}
    )


def from_failed(event: Failed, retry_after_s: int) -> OpenAIError:
    """A job that ended ``failed`` (see the module's table)."""
    code, message = event.code, event.message
    if code in _BUSY_CODES:
        return rate_limited(message, retry_after_s)
    if code == "upstream_4xx":
        found = _UPSTREAM_STATUS.search(message)
        if found and int(found.group(1)) in _CONFIG_4XX:
            return _final(502, message, code)
        return OpenAIError(400, message, code=code)
    if code.startswith("upstream_") and code != "upstream_key_missing":
        return _final(502, message, code)
    if code == "timeout":
        return _final(504, message, code)
    return _final(500, message, code)


def cancelled(job_id: str) -> OpenAIError:
    """The job was cancelled by someone else (``DELETE /api/jobs/{id}``, an admin)."""
    return OpenAIError(
        409,
        f"job {job_id} was cancelled before it finished",
        code="job_cancelled",
        headers={"x-should-retry": "false"},
    )


def gone(job_id: str) -> OpenAIError:
    return _final(500, f"job {job_id} disappeared before it finished", "job_gone")
