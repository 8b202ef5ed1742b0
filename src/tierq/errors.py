"""The one exception tree of tierq.

Client errors (bad input, auth, limits) are kept apart from upstream failures (Redis, HTTP
destinations) so callers can answer 4xx or 5xx without inspecting messages.
"""

from __future__ import annotations


class TierqError(Exception):
    """Root of every error tierq raises on purpose."""


class ClientError(TierqError):
    """The caller sent something wrong; answer 4xx with ``status`` and ``code``."""

    status: int = 400
    code: str = "bad_request"

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code


class NotFound(ClientError):
    status = 404
    code = "not_found"


class Unauthorized(ClientError):
    status = 401
    code = "unauthorized"


class Forbidden(ClientError):
    status = 403
    code = "forbidden"


class LimitExceeded(ClientError):
    status = 412
    code = "limit_exceeded"


class NotSupported(ClientError):
    status = 501
    code = "not_supported"


class UpstreamError(TierqError):
    """A dependency (Redis, a destination, QStash) failed; usually worth retrying."""


class EmbeddedRedisError(UpstreamError):
    """The embedded redis-server could not be started."""


class Busy(ClientError):
    """A limit is full right now; retry after ``retry_after_s`` seconds."""

    status = 429
    code = "busy"

    def __init__(self, message: str, *, retry_after_s: int, code: str | None = None):
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s
