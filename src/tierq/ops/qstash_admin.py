"""QStash's dead-letter queue over its REST API (the Python SDK cannot retry a DLQ entry).

One small client, ``QStashDlq``, over an ``httpx.AsyncClient``: list (one page or all pages),
get, delete, retry. A missing entry is ``None``/``False``, never an exception; a DLQ id that is
not one (:data:`DLQ_ID_PATTERN`) is a :class:`ClientError` before any request, and QStash's 400
or 422 on what we sent (a cursor it does not know) is one too; every transport failure or other
unexpected answer becomes :class:`UpstreamError`. The same calls work against Upstash and the
embedded broker. ``dlq_entry`` turns QStash's DLQ message into the admin API's
``DlqEntry`` (pure).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
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
_REFUSED = frozenset({400, 422})
_STATUS = re.compile(r"status: (\d{3})")


@dataclass(frozen=True)
class DlqPage:
    messages: list[dict[str, Any]]
    cursor: str | None


def _text(raw: dict[str, Any], name: str) -> str | None:
    """A body field as text, whether QStash sent it plain or base64-encoded."""
    if isinstance(raw.get(name), str):
        return str(raw[name])
    encoded = raw.get(f"{name}Base64")
    if not isinstance(encoded, str):
        return None
    try:
        return base64.b64decode(encoded).decode("utf-8", errors="replace")
    except (binascii.Error, ValueError):
        return None


def _job_fields(body: str | None) -> dict[str, Any]:
    try:
        parsed = json.loads(body) if body else None
    except ValueError:
        parsed = None
    return parsed if isinstance(parsed, dict) else {}


def dlq_entry(raw: dict[str, Any]) -> dict[str, Any]:
    """The admin API's ``DlqEntry`` for one QStash DLQ message; ``jobId``/``userId`` are
    ``None`` when the message is not a tierq job."""
    job = _job_fields(_text(raw, "body"))
    return {
        "dlqId": raw.get("dlqId"),
        "messageId": raw.get("messageId"),
        "queueId": raw.get("queueName") or job.get("queueId"),
        "jobId": job.get("jobId"),
        "userId": job.get("userId"),
        "url": raw.get("url"),
        "responseStatus": raw.get("responseStatus"),
        "responseBody": _text(raw, "responseBody"),
        "createdAt": raw.get("createdAt"),
    }


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


class QStashRefused(ClientError):
    """QStash answered 400 or 422: what we sent it (from the caller) was wrong."""

    code = "qstash_rejected"


def checked_dlq_id(dlq_id: str) -> str:
    """``dlq_id``, or a :class:`ClientError` (422) when it is not a DLQ id."""
    if not _DLQ_ID.fullmatch(dlq_id):
        raise ClientError(f"invalid DLQ id {dlq_id!r}", status=422, code="invalid_dlq_id")
    return dlq_id


def dlq_path(dlq_id: str, prefix: str = "/v2/dlq/") -> str:
    """The URL path of one DLQ entry (the id checked, and escaped all the same)."""
    return prefix + quote(checked_dlq_id(dlq_id), safe="")


class QStashDlq:
    """The DLQ of one QStash account. ``client`` is owned by the caller."""

    def __init__(self, client: httpx.AsyncClient, base_url: str | None, token: str) -> None:
        self.client = client
        self.base_url = (base_url or UPSTASH_URL).rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"}

    async def _call(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
    ) -> httpx.Response:
        try:
            res = await self.client.request(
                method, self.base_url + path, params=params, json=body, headers=self.headers
            )
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise UpstreamError(f"qstash {method} {path}: {exc}") from exc
        if res.status_code in _REFUSED:
            raise QStashRefused(f"qstash refused {method} {path}: {res.text[:200]}")
        if res.status_code >= 300 and res.status_code != 404:
            raise UpstreamError(f"qstash {method} {path}: {res.status_code} {res.text[:200]}")
        return res

    @staticmethod
    def _json(res: httpx.Response) -> Any:
        try:
            return res.json()
        except ValueError as exc:
            raise UpstreamError(f"qstash answered non-JSON: {res.text[:200]}") from exc

    async def page(
        self,
        *,
        cursor: str | None = None,
        count: int = DLQ_PAGE_MAX,
        queue: str | None = None,
        response_status: int | None = None,
    ) -> DlqPage:
        """One page of raw DLQ messages, oldest first, and the cursor of the next page."""
        params = {"count": str(count)}
        for name, value in (
            ("cursor", cursor),
            ("queueName", queue),
            ("responseStatus", response_status),
        ):
            if value is not None:
                params[name] = str(value)
        try:
            res = await self._call("GET", "/v2/dlq", params=params)
        except QStashRefused as exc:
            if cursor is None:
                raise
            raise ClientError(
                f"invalid cursor {cursor!r}: not one QStash gave ({exc.message})",
                code="invalid_cursor",
            ) from None
        data = self._json(res)
        return DlqPage(list(data.get("messages") or []), data.get("cursor") or None)

    async def all(self, *, queue: str | None = None) -> list[dict[str, Any]]:
        """Every raw DLQ message (following cursors until there is none)."""
        out: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            page = await self.page(cursor=cursor, queue=queue)
            out.extend(page.messages)
            if not page.cursor or page.cursor == cursor or not page.messages:
                return out
            cursor = page.cursor

    async def get(self, dlq_id: str) -> dict[str, Any] | None:
        res = await self._call("GET", dlq_path(dlq_id))
        if res.status_code == 404:
            return None
        data: dict[str, Any] = self._json(res)
        data.setdefault("dlqId", dlq_id)
        return data

    async def delete(self, dlq_id: str) -> bool:
        """``False`` when the entry was already gone."""
        res = await self._call("DELETE", dlq_path(dlq_id))
        return res.status_code != 404

    async def delete_many(self, dlq_ids: list[str]) -> int:
        """How many of ``dlq_ids`` were deleted (missing ones are skipped)."""
        if not dlq_ids:
            return 0
        ids = [checked_dlq_id(d) for d in dlq_ids]
        res = await self._call("DELETE", "/v2/dlq", body={"dlqIds": ids})
        if res.status_code == 404:
            return 0
        return int(self._json(res).get("deleted", 0))

    async def retry(self, dlq_id: str) -> str | None:
        """Publish the entry again as a new message (consuming the entry); its new message id,
        or ``None`` when the entry was gone."""
        res = await self._call("POST", dlq_path(dlq_id, "/v2/dlq/retry/"))
        if res.status_code == 404:
            return None
        return str(self._json(res)["messageId"])
