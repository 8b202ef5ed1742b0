"""Turn a publish/enqueue/batch request (headers, query, destination) into a StoredMessage.

Pure: no I/O, every rule table-tested. Settings come as ``Upstash-*`` headers or the same names
as lower-case query parameters; a query parameter wins over a header of the same name.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

from tierq.broker.server.backoff import compile_expression
from tierq.broker.server.destinations import AllowList, InvalidDestinationError, parse_url
from tierq.broker.server.durations import parse_duration
from tierq.broker.server.model import FollowUp, StoredMessage
from tierq.config import BrokerSettings
from tierq.errors import ClientError, NotSupported

METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
QUEUE_NAME = re.compile(r"[A-Za-z0-9._-]{1,100}")
_URL = re.compile(r"https?://[^/\s?#]+(?:[/?#]\S*)?")
_GROUP_NAME = re.compile(r"[A-Za-z0-9._-]+")
_FOLLOWUP_SETTINGS = ("retries", "timeout", "retry-delay", "method", "delay")
# Headers never forwarded by Upstash-Header-Forward: transport, auth and our own settings.
_NOT_FORWARDED = frozenset(
    {"host", "authorization", "content-length", "connection", "transfer-encoding",
     "accept-encoding", "keep-alive", "upgrade", "expect"}
)  # fmt: skip
_FORWARD = "upstash-forward-"


def canonical_header(name: str) -> str:
    """Go's canonical MIME header form (``x-a-b`` → ``X-A-B``), as QStash shows names."""
    return "-".join(part[:1].upper() + part[1:].lower() for part in name.split("-"))


def destination_from_raw(raw_rest: str, raw_query: str) -> str:
    """The destination URL from the raw path after the route prefix, plus its own query.

    The SDKs do not URL-encode the destination, so its query arrives as ours; QStash's own
    settings (``upstash-*``, ``qstash_token``) are taken out, the rest belongs to the URL.
    """
    dest = re.sub(r"^(https?):/(?!/)", r"\1://", raw_rest)
    kept = [
        part
        for part in raw_query.split("&")
        if part and not _is_setting_param(part.split("=", 1)[0])
    ]
    return dest + ("?" + "&".join(kept) if kept else "")


def _is_setting_param(name: str) -> bool:
    lowered = name.lower()
    return lowered.startswith("upstash-") or lowered == "qstash_token"


def check_destination(dest: str) -> None:
    if _URL.fullmatch(dest):
        try:
            parse_url(dest)
        except InvalidDestinationError as exc:
            raise ClientError(f"invalid destination url: {exc}") from None
        return
    if _GROUP_NAME.fullmatch(dest) and "." not in dest:
        raise NotSupported("URL groups (topics) are not supported by the tierq broker yet")
    raise ClientError(
        "invalid destination url: endpoint has invalid scheme, add http:// or https://"
    )


def check_queue_name(name: str) -> None:
    if not QUEUE_NAME.fullmatch(name):
        raise ClientError(
            f"invalid queue name {name!r}: use 1-100 letters, digits, '-', '.' or '_'"
        )


def check_allowed(msg: StoredMessage, allow: AllowList) -> None:
    """400 unless the destination and any callback URL are on the broker's allow-list."""
    targets = [("destination url", msg.url)]
    if msg.callback is not None:
        targets.append(("Upstash-Callback header", msg.callback.url))
    if msg.failure_callback is not None:
        targets.append(("Upstash-Failure-Callback header", msg.failure_callback.url))
    for what, url in targets:
        if not allow.allows(parse_url(url)):
            raise ClientError(
                f"invalid {what}: {url} is not among the broker's allowed destinations "
                "(BrokerSettings.allowed_destinations)"
            )


@dataclass
class Incoming:
    """One publish as received: settings (lower-case names) and forwarded headers."""

    settings: dict[str, str]
    forwarded: dict[str, list[str]]


def split_headers(
    headers: Iterable[tuple[str, str]], query: Iterable[tuple[str, str]] = ()
) -> Incoming:
    settings: dict[str, str] = {}
    forwarded: dict[str, list[str]] = {}
    everything: list[tuple[str, str]] = []
    for name, value in headers:
        lowered = name.lower()
        if lowered.startswith(_FORWARD):
            forwarded.setdefault(canonical_header(lowered[len(_FORWARD) :]), []).append(value)
        elif lowered.startswith("upstash-") or lowered == "content-type":
            settings[lowered] = value
        else:
            everything.append((lowered, value))
    for name, value in query:
        lowered = name.lower()
        if lowered.startswith(_FORWARD):
            forwarded.setdefault(canonical_header(lowered[len(_FORWARD) :]), []).append(value)
        elif lowered.startswith("upstash-"):
            settings[lowered] = value
    if settings.get("upstash-header-forward", "").lower() == "true":
        for lowered, value in everything:
            if lowered not in _NOT_FORWARDED:
                forwarded.setdefault(canonical_header(lowered), []).append(value)
    return Incoming(settings, forwarded)


def _int_setting(settings: dict[str, str], name: str) -> int | None:
    raw = settings.get(name)
    if raw is None:
        return None
    try:
        return int(raw.strip())
    except ValueError:
        raise ClientError(
            f"invalid {canonical_header(name)} header: {raw!r} is not an integer"
        ) from None


def _duration_setting(settings: dict[str, str], name: str) -> float | None:
    raw = settings.get(name)
    if raw is None:
        return None
    try:
        return parse_duration(raw)
    except ValueError as exc:
        raise ClientError(f"invalid {canonical_header(name)} header: {exc}") from None


def _retries(settings: dict[str, str], name: str, limits: BrokerSettings) -> int | None:
    retries = _int_setting(settings, name)
    if retries is not None and not 0 <= retries <= limits.max_retries:
        raise ClientError(
            f"invalid {canonical_header(name)} header: must be between 0 and {limits.max_retries}"
        )
    return retries


def _retry_delay(settings: dict[str, str], name: str) -> str | None:
    expr = settings.get(name)
    if expr is None:
        return None
    try:
        compile_expression(expr)
    except ValueError as exc:
        raise ClientError(f"invalid {canonical_header(name)} header: {exc}") from None
    return expr


def _method(settings: dict[str, str], name: str) -> str:
    method = settings.get(name, "POST").strip().upper()
    if method not in METHODS:
        raise ClientError(f"invalid {canonical_header(name)} header: {method!r}")
    return method


def _timeout(settings: dict[str, str], name: str, limits: BrokerSettings) -> float | None:
    timeout = _duration_setting(settings, name)
    if timeout is not None and timeout <= 0:
        raise ClientError(f"invalid {canonical_header(name)} header: must be positive")
    return None if timeout is None else min(timeout, limits.max_timeout_s)


def _followup(settings: dict[str, str], kind: str, limits: BrokerSettings) -> FollowUp | None:
    prefix = f"upstash-{kind}"
    url = settings.get(prefix)
    if url is None:
        return None
    if not _URL.fullmatch(url):
        raise ClientError(
            f"invalid {canonical_header(prefix)} header: {url!r} is not an http(s) URL"
        )
    try:
        parse_url(url)
    except InvalidDestinationError as exc:
        raise ClientError(f"invalid {canonical_header(prefix)} header: {exc}") from None
    headers: dict[str, list[str]] = {}
    for name, value in settings.items():
        if not name.startswith(prefix + "-"):
            continue
        rest = name[len(prefix) + 1 :]
        if rest.startswith("forward-"):
            headers.setdefault(canonical_header(rest[len("forward-") :]), []).append(value)
        elif rest not in _FOLLOWUP_SETTINGS:
            # The Python SDK sends callback_headers as Upstash-Callback-<Name>: forward them.
            headers.setdefault(canonical_header(rest), []).append(value)
    return FollowUp(
        url=url,
        method=_method(settings, prefix + "-method"),
        headers=headers,
        retries=_retries(settings, prefix + "-retries", limits),
        timeout_s=_timeout(settings, prefix + "-timeout", limits),
        retry_delay=_retry_delay(settings, prefix + "-retry-delay"),
        delay_s=_duration_setting(settings, prefix + "-delay"),
    )


def _not_before_ms(settings: dict[str, str], now_ms: int, queued: bool) -> int:
    not_before = _int_setting(settings, "upstash-not-before")
    delay_s = _duration_setting(settings, "upstash-delay")
    if queued and (not_before is not None or (delay_s or 0) > 0):
        raise ClientError("delay and notBefore are not supported when enqueueing to a queue")
    if not_before is not None:
        return max(now_ms, not_before * 1000)
    return now_ms + int((delay_s or 0) * 1000)


def content_dedup_key(dest: str, body: bytes, incoming: Incoming) -> str:
    digest = hashlib.sha256()
    digest.update(dest.encode())
    digest.update(b"\0" + body + b"\0")
    digest.update(incoming.settings.get("content-type", "").encode())
    for name in sorted(incoming.forwarded):
        digest.update(f"\0{name}:{','.join(incoming.forwarded[name])}".encode())
    return "content:" + digest.hexdigest()


def _redact(settings: dict[str, str]) -> list[str]:
    raw = settings.get("upstash-redact-fields", "")
    fields = [f.strip() for f in raw.split(",") if f.strip()]
    return [f.replace("headers", "header", 1) if f.startswith("headers") else f for f in fields]


def build_message(
    *,
    message_id: str,
    user: str,
    dest: str,
    body: bytes,
    incoming: Incoming,
    queue: str | None,
    now_ms: int,
    caller_ip: str | None,
    limits: BrokerSettings,
) -> tuple[StoredMessage, str | None]:
    """The message to store and its deduplication key (``None`` when not deduplicated)."""
    check_destination(dest)
    if queue is not None:
        check_queue_name(queue)
    settings = incoming.settings
    if "upstash-flow-control-key" in settings:
        raise NotSupported("flow control is not supported by the tierq broker yet")
    if len(body) > limits.max_body_bytes:
        raise ClientError(f"message body is larger than {limits.max_body_bytes} bytes", status=413)
    retries = _retries(settings, "upstash-retries", limits)
    labels = [x.strip() for x in settings.get("upstash-label", "").split(",") if x.strip()]
    msg = StoredMessage(
        id=message_id,
        user=user,
        url=dest,
        method=_method(settings, "upstash-method"),
        headers=incoming.forwarded,
        content_type=settings.get("content-type"),
        max_retries=limits.default_retries if retries is None else retries,
        retry_delay=_retry_delay(settings, "upstash-retry-delay"),
        timeout_s=_timeout(settings, "upstash-timeout", limits),
        not_before_ms=_not_before_ms(settings, now_ms, queued=queue is not None),
        created_at_ms=now_ms,
        callback=_followup(settings, "callback", limits),
        failure_callback=_followup(settings, "failure-callback", limits),
        queue=queue,
        labels=labels,
        caller_ip=caller_ip,
        redact=_redact(settings),
        config=settings,
    )
    dedup: str | None = settings.get("upstash-deduplication-id")
    if dedup is not None:
        dedup = "id:" + dedup
    elif settings.get("upstash-content-based-deduplication", "").strip().lower() == "true":
        dedup = content_dedup_key(dest, body, incoming)
    msg.dedup_id = dedup
    return msg, dedup
