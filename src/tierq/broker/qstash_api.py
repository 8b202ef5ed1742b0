"""What QStash's REST API looks like from tierq's side: DLQ ids and cursors, and how QStash's
answers become tierq's errors (pure; the calls are in :mod:`tierq.broker.client`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from qstash.errors import QStashError

from tierq.errors import ClientError, UpstreamError

UPSTASH_URL = "https://qstash.upstash.io"
DLQ_PAGE_MAX = 100
# What a DLQ id may be: it goes into a URL path, so no "/", "?", "#", "%", whitespace or control
# characters, and no leading "." (a "." or ".." segment would name another path).
DLQ_ID_PATTERN = r"^[A-Za-z0-9_~+=:-][A-Za-z0-9_.~+=:-]{0,199}$"
# A cursor is QStash's, opaque: printable ASCII without spaces (empty: the first page).
CURSOR_PATTERN = r"^[!-~]{0,1024}$"
_DLQ_ID = re.compile(DLQ_ID_PATTERN)
_STATUS = re.compile(r"status: (\d{3})")
REFUSED = frozenset({400, 422})
"""QStash's answers that mean what we sent (from the caller) was wrong."""


@dataclass(frozen=True)
class DlqPage:
    messages: list[dict[str, Any]]
    cursor: str | None


class QStashRefused(ClientError):
    """QStash answered 400 or 422: what we sent it (from the caller) was wrong."""

    code = "qstash_rejected"


def sdk_status(exc: QStashError) -> int | None:
    """The HTTP status inside a QStash SDK error (the SDK keeps it only in the message)."""
    found = _STATUS.search(str(exc))
    return int(found.group(1)) if found else None


def not_synced(what: str) -> ClientError:
    return ClientError(
        f"{what}: the queue does not exist in QStash; run `tierq queues sync`",
        status=409,
        code="queue_not_synced",
    )


def sdk_error(exc: QStashError, what: str) -> Exception:
    """A QStash SDK error as tierq's: QStash's 4xx verdicts on our input stay client errors,
    a missing queue means the six were never synced, anything else is upstream."""
    status = sdk_status(exc)
    if status == 404:
        return not_synced(what)
    if status in (400, 412, 422):
        return ClientError(f"{what}: QStash refused: {exc}", status=status, code="qstash_rejected")
    return UpstreamError(f"{what}: {exc}")


def checked_dlq_id(dlq_id: str) -> str:
    """``dlq_id``, or a :class:`ClientError` (422) when it is not a DLQ id."""
    if not _DLQ_ID.fullmatch(dlq_id):
        raise ClientError(f"invalid DLQ id {dlq_id!r}", status=422, code="invalid_dlq_id")
    return dlq_id


def dlq_path(dlq_id: str, prefix: str = "/v2/dlq/") -> str:
    """The URL path of one DLQ entry (the id checked, and escaped all the same)."""
    return prefix + quote(checked_dlq_id(dlq_id), safe="")
