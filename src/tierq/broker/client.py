"""tierq's side of QStash, every call in one gateway: publish jobs to the named queues, read and
set the queues, cancel and look up messages, the dead-letter queue, closing.

Goes through the official ``qstash`` async SDK (the DLQ over QStash's REST API on the SDK's HTTP
client: the SDK cannot retry a DLQ entry), so the same code drives Upstash and the embedded
broker. SDK and transport errors never leave the gateway: they become :class:`UpstreamError`, or
:class:`ClientError` where QStash judged the caller's input (see :mod:`tierq.broker.qstash_api`).
Which queue state wins (configuration, QStash, an operator's change) is decided above, in
:mod:`tierq.ops.queue_state`; here are only the calls.
"""

from __future__ import annotations

import asyncio
import urllib.request
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import httpx
import orjson
from qstash import AsyncQStash
from qstash.errors import QStashError
from qstash.http import raise_for_non_ok_status
from qstash.message import BatchRequest, parse_batch_response, prepare_batch_message_body

from tierq.broker.qstash_api import (
    DLQ_PAGE_MAX,
    REFUSED,
    UPSTASH_URL,
    DlqPage,
    QStashRefused,
    checked_dlq_id,
    dlq_path,
    sdk_error,
    sdk_status,
)
from tierq.config import QueueSettings, Settings
from tierq.contracts import WorkerBody
from tierq.errors import ClientError, UpstreamError
from tierq.queues import QueueId


@dataclass(frozen=True)
class QueueStatus:
    name: str
    parallelism: int
    paused: bool
    lag: int


MAX_BATCH = 100
"""Messages per QStash batch request at most."""
MAX_SENDERS = 4
"""Batch requests in flight at once; publishes beyond them wait and go out together."""
_FAILURES = (QStashError, httpx.HTTPError, aiohttp.ClientError, TimeoutError)
_DECODED = frozenset({"content-encoding", "content-length", "transfer-encoding"})


def qstash_client(settings: Settings) -> AsyncQStash:
    """The SDK client tierq uses: no SDK-side retries (a failed publish goes back to its line
    and dispatch tries again; an API call fails fast instead of backing off for half a minute)
    and a ``qstash_timeout_s`` timeout on every request."""
    client = AsyncQStash(settings.qstash_token or "", base_url=settings.qstash_url, retry=False)
    client.http._client.timeout = httpx.Timeout(settings.qstash_timeout_s)
    return client


def _env_proxy(url: str) -> str | None:
    """The proxy the environment names for ``url`` (``HTTPS_PROXY``/``HTTP_PROXY``, not for
    hosts in ``NO_PROXY``), as httpx would use it; ``None`` for none."""
    parts = urlsplit(url)
    if urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return urllib.request.getproxies().get(parts.scheme)


class QStashGateway:
    """Publishing is a group commit through QStash's ``/v2/batch``: a publish goes out at once
    (no added latency) while fewer than :data:`MAX_SENDERS` requests are in flight; publishes
    that arrive while all are busy wait for one and then go out together in one request, each
    to its own queue. Under load that is one HTTP request (and one signed round trip in the
    broker) for many jobs instead of one each. A publish whose answer may wait (``linger_s``:
    a job already running here) waits that long for company first.

    The batch request is the SDK's own (its body, its error for a refused request, its reading
    of the answer) sent over aiohttp instead of the SDK's httpx client: with a few requests in
    flight httpx took ~1.2 ms of CPU per request on this project's 2-core machine, aiohttp
    ~0.4 ms, and the publish is on every job's path. Everything else goes through the SDK."""

    def __init__(self, qstash: AsyncQStash, settings: Settings) -> None:
        self._qstash = qstash
        # the SDK's own pool (timeout set by qstash_client), reused for the DLQ's REST calls
        self._http: httpx.AsyncClient = qstash.http._client
        self._base_url = (settings.qstash_url or UPSTASH_URL).rstrip("/")
        self._auth = {"Authorization": f"Bearer {settings.qstash_token or ''}"}
        self.settings = settings
        self._waiting: list[tuple[BatchRequest, asyncio.Future[str]]] = []
        self._senders: set[asyncio.Task[None]] = set()
        self._lingering: asyncio.TimerHandle | None = None  # a later send of what waits
        self.requests = 0  # publish HTTP requests made (for tests and metrics)
        self._batch_url = self._base_url + "/v2/batch"
        self._proxy = _env_proxy(self._batch_url)
        self._session: aiohttp.ClientSession | None = None  # made on first use, in the loop
        self._closed = False

    async def publish(self, body: WorkerBody, url: str) -> str:
        """Enqueue one job into its named queue; returns the QStash message id."""
        return await self.publish_raw(
            body.queue_id.value, url, body.model_dump_json(by_alias=True), body.max_retries
        )

    async def publish_raw(
        self,
        queue: str,
        url: str,
        body: str,
        retries: int,
        dedup_id: str | None = None,
        headers: dict[str, str] | None = None,
        linger_s: float = 0.0,
    ) -> str:
        """Enqueue a worker body (JSON) into ``queue``; returns the QStash message id. With
        ``dedup_id``, QStash accepts one message per id within its deduplication window (a
        second publish gets the first one's id back). ``linger_s``: whoever waits for the
        answer can wait that long too, so the publish goes out with those made meanwhile (or
        with the next one that cannot wait)."""
        request: BatchRequest = {
            "queue": queue,
            "url": url,
            "body": body,
            "content_type": "application/json",
            "retries": retries,
        }
        if dedup_id:
            request["deduplication_id"] = dedup_id
        if headers:  # forwarded with the message (the SDK adds Upstash-Forward-)
            request["headers"] = headers
        if self.settings.qstash_retry_delay is not None:
            request["retry_delay"] = self.settings.qstash_retry_delay
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str] = loop.create_future()
        self._waiting.append((request, future))
        if linger_s <= 0:
            self._send_soon()
        else:  # the soonest of the lingering publishes' deadlines
            due = loop.time() + linger_s
            if self._lingering is None or due < self._lingering.when():
                if self._lingering is not None:
                    self._lingering.cancel()
                self._lingering = loop.call_at(due, self._send_soon)
        return await future

    def _send_soon(self) -> None:
        """A sender for what waits, unless :data:`MAX_SENDERS` are busy (one of them takes it
        when it is done)."""
        if self._lingering is not None:
            self._lingering.cancel()
            self._lingering = None
        if self._waiting and len(self._senders) < MAX_SENDERS:
            sender = asyncio.create_task(self._send_waiting(), name="tierq-publish")
            self._senders.add(sender)
            sender.add_done_callback(self._senders.discard)

    async def _send_waiting(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting[:MAX_BATCH], self._waiting[MAX_BATCH:]
            if not self._waiting and self._lingering is not None:  # nothing left to linger for
                self._lingering.cancel()
                self._lingering = None
            try:
                ids = await self._send([request for request, _ in batch])
            except Exception as exc:  # every waiting submit gets an answer, whatever failed
                failure = (
                    UpstreamError(f"qstash publish failed: {exc}")
                    if isinstance(exc, _FAILURES)
                    else exc
                )
                for _, future in batch:
                    if not future.done():
                        future.set_exception(failure)
                continue
            for (_, future), message_id in zip(batch, ids, strict=True):
                if not future.done():
                    future.set_result(message_id)

    async def _send(self, requests: list[BatchRequest]) -> list[str]:
        self.requests += 1
        if self._closed:
            raise UpstreamError("qstash publish failed: the gateway is closed")
        session = self._session
        if session is None or session.closed:
            session = self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=2 * MAX_SENDERS, ssl=httpx.create_ssl_context()
                ),
                timeout=aiohttp.ClientTimeout(total=self.settings.qstash_timeout_s),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        async with session.post(
            self._batch_url,
            data=prepare_batch_message_body(requests).encode(),
            headers={**self._auth, "Content-Type": "application/json"},
            proxy=self._proxy,
            allow_redirects=False,  # as the SDK's client: a redirect is an error, not a GET
        ) as res:
            content = await res.read()
            if not 200 <= res.status < 300:  # the SDK's own error (429s told apart)
                headers = [  # the body is decoded already: httpx must not decode it again
                    (k, v) for k, v in res.headers.items() if k.lower() not in _DECODED
                ]
                raise_for_non_ok_status(
                    httpx.Response(res.status, headers=headers, content=content)
                )
        replies = parse_batch_response(orjson.loads(content))
        return [str(reply.message_id) for reply in replies]  # type: ignore[union-attr]

    async def cancel(self, message_id: str) -> None:
        try:
            await self._qstash.message.cancel(message_id)
        except _FAILURES as exc:
            raise UpstreamError(f"qstash cancel failed: {exc}") from exc

    async def carries_job(self, message_id: str, job_id: str) -> bool:
        """Whether QStash holds message ``message_id`` and it carries job ``job_id`` (for the
        rare decisions that must not rest on an unsigned message id). ``False`` when QStash
        does not know the message; :class:`UpstreamError` when it cannot be asked."""
        try:
            message = await self._qstash.message.get(message_id)
        except QStashError as exc:
            if "status: 404" in str(exc):  # the SDK keeps the status only in its message
                return False
            raise UpstreamError(f"qstash message get failed: {exc}") from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(f"qstash message get failed: {exc}") from exc
        try:
            return bool(orjson.loads(message.body or "{}").get("jobId") == job_id)
        except (orjson.JSONDecodeError, AttributeError):
            return False

    async def upsert_queue(self, queue: str, *, parallelism: int, paused: bool) -> None:
        """Create ``queue`` or set both its fields (QStash's upsert always sets both)."""
        try:
            await self._qstash.queue.upsert(queue, parallelism=parallelism, paused=paused)
        except _FAILURES as exc:
            raise UpstreamError(f"qstash queue upsert failed for {queue}: {exc}") from exc

    async def sync_queue(self, queue: QueueId, conf: QueueSettings) -> None:
        await self.upsert_queue(queue.value, parallelism=conf.parallelism, paused=conf.paused)

    async def sync_queues(self) -> None:
        """Create/update the six queues (parallelism, paused) from configuration, whatever
        they hold now (``tierq queues sync``)."""
        for queue, conf in self.settings.queues.items():
            await self.sync_queue(queue, conf)

    async def queue_status(self, queue: str) -> QueueStatus:
        try:
            q = await self._qstash.queue.get(queue)
        except _FAILURES as exc:
            raise UpstreamError(f"qstash queue get failed for {queue}: {exc}") from exc
        return QueueStatus(q.name, q.parallelism, q.paused, q.lag)

    async def find_queue(self, queue: str) -> QueueStatus | None:
        """QStash's record of ``queue``; ``None`` when QStash does not have it."""
        try:
            return await self.queue_status(queue)
        except UpstreamError as exc:
            cause = exc.__cause__
            if isinstance(cause, QStashError) and sdk_status(cause) == 404:
                return None
            raise

    async def list_queues(self) -> dict[str, QueueStatus]:
        """Every queue of the account, by name, in one call."""
        try:
            found = await self._qstash.queue.list()
        except _FAILURES as exc:
            raise UpstreamError(f"qstash queue list failed: {exc}") from exc
        return {q.name: QueueStatus(q.name, q.parallelism, q.paused, q.lag) for q in found}

    async def set_paused(self, queue: str, paused: bool, *, what: str) -> None:
        """Pause or resume ``queue``; QStash's verdicts as :func:`sdk_error` maps them (a
        missing queue: not synced), ``what`` naming the action in the message."""
        try:
            if paused:
                await self._qstash.queue.pause(queue)
            else:
                await self._qstash.queue.resume(queue)
        except QStashError as exc:
            raise sdk_error(exc, what) from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(f"{what}: {exc}") from exc

    async def set_parallelism(
        self, queue: str, parallelism: int, *, paused: bool, what: str
    ) -> None:
        """Upsert ``queue`` with both fields (QStash's upsert sets both), errors as
        :meth:`set_paused`."""
        try:
            await self._qstash.queue.upsert(queue, parallelism=parallelism, paused=paused)
        except QStashError as exc:
            raise sdk_error(exc, what) from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(f"{what}: {exc}") from exc

    async def aclose(self) -> None:
        """Close the HTTP clients (the SDK never closes its own); later publishes fail."""
        self._closed = True
        self._send_soon()  # what lingers gets its answer: the gateway is closed
        if self._session is not None:
            await self._session.close()
        await self._http.aclose()

    # -- the dead-letter queue (QStash's REST API) -------------------------------------------
    # A missing entry is ``None``/``False``, never an exception; a DLQ id that is not one is a
    # ClientError (422) before any request, and QStash's 400 or 422 on what we sent (a cursor it
    # does not know) is one too; every transport failure or other unexpected answer becomes
    # UpstreamError.

    async def _dlq_call(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
    ) -> httpx.Response:
        try:
            res = await self._http.request(
                method, self._base_url + path, params=params, json=body, headers=self._auth
            )
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise UpstreamError(f"qstash {method} {path}: {exc}") from exc
        if res.status_code in REFUSED:
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

    async def dlq_page(
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
            res = await self._dlq_call("GET", "/v2/dlq", params=params)
        except QStashRefused as exc:
            if cursor is None:
                raise
            raise ClientError(
                f"invalid cursor {cursor!r}: not one QStash gave ({exc.message})",
                code="invalid_cursor",
            ) from None
        data = self._json(res)
        return DlqPage(list(data.get("messages") or []), data.get("cursor") or None)

    async def dlq_all(self, *, queue: str | None = None) -> list[dict[str, Any]]:
        """Every raw DLQ message (following cursors until there is none)."""
        out: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            page = await self.dlq_page(cursor=cursor, queue=queue)
            out.extend(page.messages)
            if not page.cursor or page.cursor == cursor or not page.messages:
                return out
            cursor = page.cursor

    async def dlq_get(self, dlq_id: str) -> dict[str, Any] | None:
        res = await self._dlq_call("GET", dlq_path(dlq_id))
        if res.status_code == 404:
            return None
        data: dict[str, Any] = self._json(res)
        data.setdefault("dlqId", dlq_id)
        return data

    async def dlq_delete(self, dlq_id: str) -> bool:
        """``False`` when the entry was already gone."""
        res = await self._dlq_call("DELETE", dlq_path(dlq_id))
        return res.status_code != 404

    async def dlq_delete_many(self, dlq_ids: list[str]) -> int:
        """How many of ``dlq_ids`` were deleted (missing ones are skipped)."""
        if not dlq_ids:
            return 0
        ids = [checked_dlq_id(d) for d in dlq_ids]
        res = await self._dlq_call("DELETE", "/v2/dlq", body={"dlqIds": ids})
        if res.status_code == 404:
            return 0
        return int(self._json(res).get("deleted", 0))

    async def dlq_retry(self, dlq_id: str) -> str | None:
        """Publish the entry again as a new message (consuming the entry); its new message id,
        or ``None`` when the entry was gone."""
        res = await self._dlq_call("POST", dlq_path(dlq_id, "/v2/dlq/retry/"))
        if res.status_code == 404:
            return None
        return str(self._json(res)["messageId"])
