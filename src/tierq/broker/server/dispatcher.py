"""The scheduler: claims due messages, delivers them over HTTP, records each outcome.

One loop claims batches of due messages (one Redis round trip per batch) and starts a task per
delivery, never more than ``max_in_flight`` at once. Each claim is an attempt holding its
message under a short lease (``attempt_lease_s``); a keeper task renews the leases of the
attempts running here, all in one round trip, and makes lapsed leases due again. Each delivery
ends with one script that records its outcome, retried with backoff across a Redis outage
(``finish_retry_s``). So a message whose attempt ended without being recorded, or whose broker
lost track of it, is delivered again within a lease of Redis being reachable (at-least-once).
A delivery task never raises: whatever breaks during the HTTP attempt is a failed attempt.
Shutdown cancels deliveries still running; they are delivered again at the next start.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import itertools
import json
import time
from collections.abc import Awaitable, Callable

import structlog
from redis.exceptions import RedisError

from tierq.aio import Alarm
from tierq.broker.server.backoff import next_delay_s, storage_retry_delay_s
from tierq.broker.server.delivery_http import DeliveryClient
from tierq.broker.server.durations import headers_wait
from tierq.broker.server.keyring import KeyRing
from tierq.broker.server.model import AttemptResponse, FollowUp, StoredMessage, log_event
from tierq.broker.server.signing import random_id, sign
from tierq.broker.server.store import BrokerStore, Claimed, FollowUpMessage
from tierq.config import BrokerSettings

REDIS_RETRY_S = 1.0
LEASE_RETRY_S = 0.25
log = structlog.get_logger("tierq.broker")


def now_ms() -> int:
    return int(time.time() * 1000)


def response_wait_s(response: AttemptResponse, now_s: float) -> float | None:
    """The first usable wait a failed response asks for (Retry-After and friends)."""
    return headers_wait(response.headers, now_s)


def classify(response: AttemptResponse, retried: int, max_retries: int) -> str:
    """``delivered``, ``retry`` or ``failed`` for one attempt's response."""
    if 200 <= response.status < 300:
        return "delivered"
    non_retryable = response.status == 489 and any(
        v.strip().lower() == "true"
        for k, vs in response.headers.items()
        if k.lower() == "upstash-nonretryable-error"
        for v in vs
    )
    if non_retryable or retried >= max_retries:
        return "failed"
    return "retry"


def callback_body(
    msg: StoredMessage, body: bytes, response: AttemptResponse, retried: int, dlq_id: str | None
) -> bytes:
    """The JSON QStash sends to a callback / failure callback about one attempt."""
    payload: dict[str, object] = {
        "status": response.status,
        "header": response.headers,
        "body": base64.b64encode(response.body).decode(),
        "retried": retried,
        "maxRetries": msg.max_retries,
        "sourceMessageId": msg.id,
        "topicName": "",
        "endpointName": "",
        "url": msg.url,
        "method": msg.method,
        "sourceHeader": msg.headers,
        "sourceBody": base64.b64encode(body).decode(),
        "notBefore": msg.not_before_ms,
        "createdAt": msg.created_at_ms,
        "scheduleId": "",
        "callerIP": msg.caller_ip or "",
    }
    if dlq_id is not None:
        payload["dlqId"] = dlq_id
    return json.dumps(payload).encode()


def followup_messages(
    msg: StoredMessage,
    body: bytes,
    response: AttemptResponse,
    retried: int,
    outcome: str,
    dlq_id: str,
    at_ms: int,
) -> list[FollowUpMessage]:
    """Callback after every attempt; failure callback once retries are exhausted."""
    if msg.kind != "message":
        return []
    targets: list[tuple[str, FollowUp | None, str | None]] = [("callback", msg.callback, None)]
    if outcome == "failed":
        targets.append(("failure_callback", msg.failure_callback, dlq_id))
    out = []
    for kind, target, dlq in targets:
        if target is None:
            continue
        follow = StoredMessage(
            id=random_id("msg_"),
            user=msg.user,
            url=target.url,
            method=target.method,
            headers=target.headers,
            content_type="application/json",
            max_retries=msg.max_retries if target.retries is None else target.retries,
            retry_delay=target.retry_delay or msg.retry_delay,
            timeout_s=target.timeout_s,
            not_before_ms=at_ms + int((target.delay_s or 0) * 1000),
            created_at_ms=at_ms,
            kind="callback" if kind == "callback" else "failure_callback",
            source_message_id=msg.id,
            caller_ip=msg.caller_ip,
        )
        payload = callback_body(msg, body, response, retried, dlq)
        out.append(FollowUpMessage(follow, payload, follow.not_before_ms))
    return out


def delivery_headers(msg: StoredMessage, retried: int, signature: str) -> list[tuple[str, str]]:
    headers = [(name, value) for name, values in msg.headers.items() for value in values]
    present = {name.lower() for name, _ in headers}
    if msg.content_type and "content-type" not in present:
        headers.append(("Content-Type", msg.content_type))
    if "user-agent" not in present:
        headers.append(("User-Agent", "Upstash-QStash"))
    headers += [
        ("Upstash-Signature", signature),
        ("Upstash-Message-Id", msg.id),
        ("Upstash-Retried", str(retried)),
    ]
    if msg.caller_ip:
        headers.append(("Upstash-Caller-Ip", msg.caller_ip))
    return headers


class Dispatcher:
    def __init__(
        self,
        store: BrokerStore,
        keyring: KeyRing,
        settings: BrokerSettings,
        http: DeliveryClient,
        on_attempt: Callable[[StoredMessage, str], None] | None = None,
    ) -> None:
        self.store = store
        self.keyring = keyring
        self.settings = settings
        self._http = http
        self._on_attempt = on_attempt
        self._woken = False  # something became due since the loop last looked
        self._alarm = Alarm()  # the loop's sleep in progress
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._running: set[tuple[str, int]] = set()  # (message id, attempt) leases held here
        self._stopping = False
        self._started = False

    def wake(self) -> None:
        """Something became due now (a publish, a freed queue slot): look at once."""
        self._woken = True
        self._alarm.wake()

    @property
    def lease_ms(self) -> int:
        return int(self.settings.attempt_lease_s * 1000)

    async def run(self) -> None:
        """Deliver until stopped; a Redis outage pauses the loop instead of ending it."""
        keeper = asyncio.create_task(self._keep_leases(), name="tierq-broker-leases")
        try:
            while not self._stopping:
                try:
                    await self._loop()
                except RedisError as exc:
                    log.warning("broker.redis_unavailable", error=str(exc))
                    await self._pause(REDIS_RETRY_S)
        finally:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)

    async def _loop(self) -> None:
        if not self._started:
            # One broker process owns a key prefix: what is in flight now, a previous run of
            # it left behind, so it is due again at once rather than when its lease lapses.
            await self.store.reclaim(None, now_ms())
            self._started = True
        while not self._stopping:
            free = self.settings.max_in_flight - len(self._tasks)
            claimed: list[Claimed] = []
            if free > 0:
                self._woken = False
                limit = min(free, self.settings.claim_batch)
                claimed = await self.store.claim(now_ms(), limit, self.lease_ms)
                for item in claimed:
                    self._running.add((item.msg.id, item.attempt))
                    task = asyncio.create_task(self._deliver(item))
                    self._tasks.add(task)
                    task.add_done_callback(self._delivered)
                if len(claimed) == limit:
                    continue
            await self._sleep(free > 0)

    async def _sleep(self, can_claim: bool) -> None:
        timeout = self.settings.poll_interval_s
        if can_claim:
            due = await self.store.next_due_ms()
            if due is not None:
                timeout = min(timeout, max(0.0, (due - now_ms()) / 1000))
        if self._woken:
            if can_claim:
                return
            self._woken = False  # nothing to claim into until a delivery ends (it wakes us)
        # woken by each publish and each finished delivery (see tierq.aio.Alarm)
        await self._alarm.until(asyncio.get_running_loop().time() + timeout)

    async def _pause(self, seconds: float) -> None:
        """Sleep, or less when the dispatcher is stopped meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def _keep_leases(self) -> None:
        """Every third of a lease (and as soon as Redis answers again after an outage): renew
        the leases of attempts running here, then make lapsed leases due again."""
        period = self.settings.attempt_lease_s / 3
        while not self._stopping:
            try:
                now = now_ms()
                await self.store.renew(sorted(self._running), now + self.lease_ms)
                if await self.store.reclaim(now, now):
                    self.wake()
                wait = period
            except RedisError as exc:
                log.warning("broker.lease_renewal_failed", error=str(exc))
                wait = min(period, LEASE_RETRY_S)
            await self._pause(wait)

    async def stop(self, grace_s: float = 5.0) -> None:
        self._stopping = True
        self._stop.set()
        self.wake()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _attempt(self, item: Claimed) -> AttemptResponse:
        """One HTTP attempt. Whatever fails in it (no answer, a timeout, a URL the client
        refuses) is an attempt with status 0: it takes the retry/DLQ path like any other."""
        timeout = item.msg.timeout_s or self.settings.max_timeout_s
        try:
            async with asyncio.timeout(timeout):
                return await self._request(item)
        except TimeoutError:
            return AttemptResponse(status=0, error=f"timeout after {timeout:g}s")
        except Exception as exc:  # aiohttp.ClientError, InvalidURL, ...: all are outcomes
            return AttemptResponse(status=0, error=f"{type(exc).__name__}: {exc}")

    async def _request(self, item: Claimed) -> AttemptResponse:
        msg = item.msg
        signature = sign(self.keyring.current(msg.user), msg.url, item.body, int(time.time()))
        return await self._http.send(
            msg.method,
            msg.url,
            item.body or None,
            delivery_headers(msg, item.retried, signature),
            self.settings.response_body_max_bytes,
        )

    async def _deliver(self, item: Claimed) -> None:
        """Attempt, then record; never raises (nobody awaits this task)."""
        try:
            response = await self._attempt(item)
            await self._record(item, response)
        except Exception:  # a bug, not an outcome: the lease lapses, the message comes again
            log.exception("broker.delivery_crashed", message_id=item.msg.id)
        finally:
            self._running.discard((item.msg.id, item.attempt))

    def _delivered(self, task: asyncio.Task[None]) -> None:
        """A delivery task ended: its slot is free (gone from ``_tasks``), look again."""
        self._tasks.discard(task)
        self.wake()

    async def _record(self, item: Claimed, response: AttemptResponse) -> None:
        msg = item.msg
        at = now_ms()
        outcome = classify(response, item.retried, msg.max_retries)
        if self._on_attempt is not None:
            self._on_attempt(msg, outcome)
        dlq_id = self.store.new_dlq_id(at) if outcome == "failed" else ""
        reported = response
        if response.private_peer and not self.settings.callback_private_bodies:
            reported = response.without_content()
        followups = followup_messages(msg, item.body, reported, item.retried, outcome, dlq_id, at)
        next_due = 0
        if outcome == "retry":
            wait = next_delay_s(
                retried=item.retried,
                expression=msg.retry_delay,
                response_wait_s=response_wait_s(response, at / 1000),
            )
            next_due = at + int(wait * 1000)
            events = [
                log_event(msg, "ERROR", at, response=response, next_delivery_ms=next_due),
                log_event(msg, "RETRY", at, next_delivery_ms=next_due),
            ]
        else:
            state = "DELIVERED" if outcome == "delivered" else "FAILED"
            events = [log_event(msg, state, at, response=response)]
        await self._finish_durably(
            item,
            functools.partial(
                self.store.finish,
                item,
                outcome=outcome,
                now_ms=at,
                next_due_ms=next_due,
                events=events,
                response=response,
                dlq_id=dlq_id,
                followups=followups,
            ),
        )

    async def _finish_durably(self, item: Claimed, write: Callable[[], Awaitable[bool]]) -> None:
        """Record the outcome, retrying across a Redis outage for up to ``finish_retry_s``
        (the write is idempotent: a retry after a lost reply changes nothing)."""
        deadline = time.monotonic() + self.settings.finish_retry_s
        for failures in itertools.count(1):
            try:
                if not await write():
                    log.info("broker.finish_stale", message_id=item.msg.id)
                return
            except RedisError as exc:
                wait = storage_retry_delay_s(failures)
                if time.monotonic() + wait > deadline:
                    # The lease lapses now that nothing renews it: delivered again.
                    log.warning(
                        "broker.finish_failed",
                        message_id=item.msg.id,
                        tries=failures,
                        error=str(exc),
                    )
                    return
                await asyncio.sleep(wait)
