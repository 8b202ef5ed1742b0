"""``tierq queues|dlq|jobs``: operator commands over the admin API (docs/admin-api.md).

Thin, like the rest of the CLI: each command parses its options, calls one function of this
module (which talks HTTP through :class:`AdminClient`) and prints — a table for people, or
``--json`` for programs. Errors are one line on stderr and a named exit code (:class:`Code`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import json
from collections.abc import Callable, Generator, Iterable, Iterator
from types import TracebackType
from typing import Annotated, Any

import httpx
import typer

from tierq.errors import TierqError

DEFAULT_URL = "http://127.0.0.1:8000"
RETRY_BATCH = 100  # the admin API's limit of ids per request
_TIMEOUT = httpx.Timeout(30.0)
# The events stream sends a ping every ``sse_ping_s``; silence this long means it is dead.
_STREAM_TIMEOUT = httpx.Timeout(30.0, read=120.0)


class Code(enum.IntEnum):
    """Exit codes of the operator commands (the first four match ``tierq.cli.Exit``)."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    UNAVAILABLE = 3
    NOT_FOUND = 4
    AUTH = 5


class CliError(TierqError):
    """A CLI command failed; ``code`` is the process's exit code."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def code_for_status(status: int) -> Code:
    if status in (401, 403):
        return Code.AUTH
    if status == 404:
        return Code.NOT_FOUND
    if status in (502, 503, 504):
        return Code.UNAVAILABLE
    if 400 <= status < 500:
        return Code.USAGE
    return Code.FAILURE


def error_message(res: httpx.Response) -> str:
    try:
        detail = res.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        detail = res.text.strip()[:200] or res.reason_phrase
    return f"{res.status_code}: {detail}"


class AdminClient:
    """The admin API over HTTP. Every failure is a :class:`CliError` with its exit code."""

    def __init__(self, url: str, token: str | None) -> None:
        if not token:
            raise CliError(Code.AUTH, "no admin token: pass --token or set TIERQ_ADMIN_TOKEN")
        self.url = url.rstrip("/")
        self.auth = {"Authorization": f"Bearer {token}"}
        self.http = httpx.Client(base_url=self.url, timeout=_TIMEOUT)

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.http.close()

    @contextlib.contextmanager
    def _transport(self) -> Iterator[None]:
        try:
            yield
        except httpx.TransportError as exc:
            raise CliError(Code.UNAVAILABLE, f"cannot reach tierq at {self.url}: {exc}") from exc

    def call(self, method: str, path: str, *, body: Any = None, params: Any = None) -> Any:
        with self._transport():
            res = self.http.request(
                method, "/api/admin" + path, json=body, params=params, headers=self.auth
            )
        if res.status_code >= 300:
            raise CliError(code_for_status(res.status_code), error_message(res))
        try:
            return res.json()
        except ValueError as exc:
            raise CliError(Code.FAILURE, f"not JSON from {self.url}: {res.text[:200]}") from exc

    def events(self, job_id: str, token: str) -> Generator[dict[str, Any], None, None]:
        """The job's events from its SSE stream (replay, then live) until the stream ends."""
        path = f"/api/jobs/{job_id}/events"
        with (
            self._transport(),
            self.http.stream("GET", path, params={"token": token}, timeout=_STREAM_TIMEOUT) as res,
        ):
            if res.status_code >= 300:
                res.read()
                raise CliError(code_for_status(res.status_code), error_message(res))
            yield from sse_data(res.iter_lines())


def sse_data(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """The JSON ``data`` of each SSE event in ``lines`` (pings and comments skipped)."""
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield json.loads("\n".join(data))
            data = []
            continue
        name, _, value = line.partition(":")
        if name == "data":
            data.append(value[1:] if value.startswith(" ") else value)


# -- operations: one function per command --------------------------------------------------


def list_queues(admin: AdminClient) -> dict[str, Any]:
    reply: dict[str, Any] = admin.call("GET", "/queues")
    return reply


def queue_action(admin: AdminClient, queue: str, action: str) -> dict[str, Any]:
    reply: dict[str, Any] = admin.call("POST", f"/queues/{queue}/{action}")
    return reply


def set_parallelism(admin: AdminClient, queue: str, parallelism: int) -> dict[str, Any]:
    body = {"parallelism": parallelism}
    reply: dict[str, Any] = admin.call("PUT", f"/queues/{queue}/parallelism", body=body)
    return reply


def sync_queues(admin: AdminClient) -> dict[str, Any]:
    reply: dict[str, Any] = admin.call("POST", "/queues/sync")
    return reply


def list_dlq(admin: AdminClient, queue: str | None) -> dict[str, Any]:
    """Every DLQ entry (all pages), optionally of one queue."""
    messages: list[dict[str, Any]] = []
    params: dict[str, str] = {"queueId": queue} if queue else {}
    while True:
        page = admin.call("GET", "/dlq", params=params)
        messages.extend(page["messages"])
        if not page.get("cursor") or not page["messages"]:
            return {"messages": messages}
        params = {**params, "cursor": page["cursor"]}


def show_dlq(admin: AdminClient, dlq_id: str) -> dict[str, Any]:
    reply: dict[str, Any] = admin.call("GET", f"/dlq/{dlq_id}")
    return reply


def retry_dlq(
    admin: AdminClient, dlq_ids: list[str], progress: Callable[[int, int], None]
) -> dict[str, Any]:
    """Retry in batches, calling ``progress(done, total)`` after each."""
    retried: list[dict[str, str]] = []
    missing: list[str] = []
    progress(0, len(dlq_ids))
    for start in range(0, len(dlq_ids), RETRY_BATCH):
        batch = dlq_ids[start : start + RETRY_BATCH]
        reply = admin.call("POST", "/dlq/retry", body={"dlqIds": batch})
        retried += reply["retried"]
        missing += reply["missing"]
        progress(start + len(batch), len(dlq_ids))
    return {"retried": retried, "missing": missing}


def delete_dlq(admin: AdminClient, dlq_ids: list[str]) -> dict[str, Any]:
    deleted = 0
    for start in range(0, len(dlq_ids), RETRY_BATCH):
        batch = dlq_ids[start : start + RETRY_BATCH]
        deleted += admin.call("DELETE", "/dlq", body={"dlqIds": batch})["deleted"]
    return {"deleted": deleted, "requested": len(dlq_ids)}


def show_job(admin: AdminClient, job_id: str) -> dict[str, Any]:
    reply: dict[str, Any] = admin.call("GET", f"/jobs/{job_id}")
    return reply


def cancel_job(admin: AdminClient, job_id: str) -> dict[str, Any]:
    reply: dict[str, Any] = admin.call("DELETE", f"/jobs/{job_id}")
    return reply


def is_terminal(event: dict[str, Any]) -> bool:
    kind = event.get("type")
    return kind in ("completed", "cancelled") or (kind == "failed" and not event.get("retryable"))


def tail_job(
    admin: AdminClient, job_id: str, on_event: Callable[[dict[str, Any]], None]
) -> dict[str, Any] | None:
    """Hand every event of the job to ``on_event`` until its terminal one, which is returned
    (``None`` if the stream ended first)."""
    token = show_job(admin, job_id)["eventsToken"]
    with contextlib.closing(admin.events(job_id, token)) as events:
        for event in events:
            on_event(event)
            if is_terminal(event):
                return event
    return None


# -- rendering (pure) ----------------------------------------------------------------------


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def when(ms: Any) -> str:
    if not isinstance(ms, int):
        return cell(ms)
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """A plain, aligned text table (no wrapping, so ids stay whole and greppable)."""
    grid = [[title for _, title in columns]]
    grid += [[cell(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(r[i]) for r in grid) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
                     for r in grid)  # fmt: skip


def fields(obj: dict[str, Any], hide: Iterable[str] = ()) -> str:
    """``key: value`` lines of one object."""
    shown = {k: v for k, v in obj.items() if k not in set(hide)}
    width = max((len(k) for k in shown), default=0)
    return "\n".join(
        f"{k.ljust(width)}  {json.dumps(v) if isinstance(v, dict | list) else cell(v)}"
        for k, v in shown.items()
    )


QUEUE_COLUMNS = [
    ("queueId", "QUEUE"), ("parallelism", "PARALLEL"), ("paused", "PAUSED"), ("lag", "LAG"),
    ("inFlight", "IN-FLIGHT"), ("parked", "PARKED"), ("topParked", "TOP-PARKED"),
    ("admitted", "ADMITTED"), ("admissionDepth", "DEPTH"), ("dlq", "DLQ"),
]  # fmt: skip
DLQ_COLUMNS = [
    ("dlqId", "DLQ ID"), ("queueId", "QUEUE"), ("jobId", "JOB"), ("responseStatus", "STATUS"),
    ("created", "CREATED"),
]  # fmt: skip


def dlq_rows(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**m, "created": when(m.get("createdAt"))} for m in messages]


def event_line(event: dict[str, Any]) -> str:
    kind = str(event.get("type"))
    detail = {
        "queued": lambda e: f"{e.get('queueId')} ({e.get('tier')})",
        "waiting": lambda e: f"{e.get('guard')} guard full",
        "started": lambda e: f"attempt {e.get('attempt')}",
        "delta": lambda e: json.dumps(e.get("text")),
        "progress": lambda e: f"{e.get('value')}",
        "completed": lambda e: str(e.get("result")),
        "failed": lambda e: (
            f"{e.get('code')}: {e.get('message')}" + (" (will retry)" if e.get("retryable") else "")
        ),
    }.get(kind, lambda e: "")(event)
    return f"{event.get('seq', ''):>4}  {kind:<9}  {detail}".rstrip()


# -- typer commands -------------------------------------------------------------------------

Url = Annotated[str, typer.Option("--url", envvar="TIERQ_URL", help="Base URL of the tierq app.")]
Token = Annotated[
    str | None,
    typer.Option("--token", envvar="TIERQ_ADMIN_TOKEN", help="Admin token.", show_default=False),
]
Json = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]

queues_app = typer.Typer(no_args_is_help=True, help="Inspect and change the six queues.")
dlq_app = typer.Typer(no_args_is_help=True, help="The dead-letter queue: list, retry, delete.")
jobs_app = typer.Typer(no_args_is_help=True, help="Look at, cancel and follow one job.")


@contextlib.contextmanager
def admin_session(url: str, token: str | None) -> Iterator[AdminClient]:
    """An admin client; any :class:`CliError` becomes one stderr line and its exit code."""
    try:
        with AdminClient(url, token) as admin:
            yield admin
    except CliError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(exc.code) from None


def fail(code: Code, message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def emit(data: Any, as_json: bool, human: Callable[[], str]) -> None:
    typer.echo(json.dumps(data, indent=2) if as_json else human())


def queue_row(q: dict[str, Any]) -> dict[str, Any]:
    """A queue view as a table row: the users with most parked jobs as ``user:n`` (top 3)."""
    top = " ".join(f"{u['userId']}:{u['parked']}" for u in q.get("topParked", [])[:3])
    return {**q, "topParked": top or "-"}


def _queues(data: dict[str, Any], as_json: bool) -> None:
    emit(data, as_json, lambda: table([queue_row(q) for q in data["queues"]], QUEUE_COLUMNS))


def _queue(data: dict[str, Any], as_json: bool) -> None:
    emit(data, as_json, lambda: table([queue_row(data)], QUEUE_COLUMNS))


@queues_app.command("list")
def queues_list(url: Url = DEFAULT_URL, token: Token = None, as_json: Json = False) -> None:
    """The six queues: QStash's parallelism, paused and lag; tierq's in-flight, parked (and the
    users with most parked jobs) and admitted."""
    with admin_session(url, token) as admin:
        _queues(list_queues(admin), as_json)


@queues_app.command("pause")
def queues_pause(
    queue: str, url: Url = DEFAULT_URL, token: Token = None, as_json: Json = False
) -> None:
    """Pause a queue: QStash holds its messages until it is resumed."""
    with admin_session(url, token) as admin:
        _queue(queue_action(admin, queue, "pause"), as_json)


@queues_app.command("resume")
def queues_resume(
    queue: str, url: Url = DEFAULT_URL, token: Token = None, as_json: Json = False
) -> None:
    """Resume a paused queue."""
    with admin_session(url, token) as admin:
        _queue(queue_action(admin, queue, "resume"), as_json)


@queues_app.command("set-parallelism")
def queues_set_parallelism(
    queue: str,
    parallelism: Annotated[int, typer.Argument(min=1)],
    url: Url = DEFAULT_URL,
    token: Token = None,
    as_json: Json = False,
) -> None:
    """Change a queue's parallelism in QStash (until the next `queues sync`)."""
    with admin_session(url, token) as admin:
        _queue(set_parallelism(admin, queue, parallelism), as_json)


@queues_app.command("sync")
def queues_sync(url: Url = DEFAULT_URL, token: Token = None, as_json: Json = False) -> None:
    """Upsert all six queues from configuration (parallelism, paused)."""
    with admin_session(url, token) as admin:
        _queues(sync_queues(admin), as_json)


@dlq_app.command("list")
def dlq_list(
    queue: Annotated[str | None, typer.Option(help="Only this queue's entries.")] = None,
    url: Url = DEFAULT_URL,
    token: Token = None,
    as_json: Json = False,
) -> None:
    """Every DLQ entry, oldest first."""
    with admin_session(url, token) as admin:
        data = list_dlq(admin, queue)
    emit(data, as_json, lambda: table(dlq_rows(data["messages"]), DLQ_COLUMNS))


@dlq_app.command("show")
def dlq_show(
    dlq_id: str, url: Url = DEFAULT_URL, token: Token = None, as_json: Json = False
) -> None:
    """One DLQ entry, with the last response it got."""
    with admin_session(url, token) as admin:
        data = show_dlq(admin, dlq_id)
    emit(data, as_json, lambda: fields(data))


def _progress(done: int, total: int) -> None:
    typer.echo(f"\rretrying {done}/{total}", err=True, nl=done == total)


@dlq_app.command("retry")
def dlq_retry(
    dlq_ids: Annotated[list[str] | None, typer.Argument(show_default=False)] = None,
    retry_all: Annotated[bool, typer.Option("--all", help="Retry every entry.")] = False,
    queue: Annotated[str | None, typer.Option(help="With --all: only this queue's.")] = None,
    url: Url = DEFAULT_URL,
    token: Token = None,
    as_json: Json = False,
) -> None:
    """Publish DLQ entries again (each becomes a new message). Exit 4 if a named one is gone."""
    if bool(dlq_ids) == retry_all:
        raise fail(Code.USAGE, "name the DLQ ids to retry, or pass --all (not both)")
    if queue and not retry_all:
        raise fail(Code.USAGE, "--queue only goes with --all")
    with admin_session(url, token) as admin:
        ids = dlq_ids or [m["dlqId"] for m in list_dlq(admin, queue)["messages"]]
        data = retry_dlq(admin, ids, _progress)
    emit(data, as_json, lambda: f"retried {len(data['retried'])}, missing {len(data['missing'])}")
    if data["missing"] and not retry_all:
        raise fail(Code.NOT_FOUND, f"not in the DLQ: {', '.join(data['missing'])}")


@dlq_app.command("delete")
def dlq_delete(
    dlq_ids: list[str], url: Url = DEFAULT_URL, token: Token = None, as_json: Json = False
) -> None:
    """Delete DLQ entries for good. Exit 4 if some were already gone."""
    with admin_session(url, token) as admin:
        data = delete_dlq(admin, dlq_ids)
    emit(data, as_json, lambda: f"deleted {data['deleted']} of {data['requested']}")
    if data["deleted"] < data["requested"]:
        raise fail(Code.NOT_FOUND, f"{data['requested'] - data['deleted']} were not in the DLQ")


@jobs_app.command("show")
def jobs_show(
    job_id: str, url: Url = DEFAULT_URL, token: Token = None, as_json: Json = False
) -> None:
    """A job's status, queue, owner, message and result."""
    with admin_session(url, token) as admin:
        data = show_job(admin, job_id)
    emit(data, as_json, lambda: fields(data, hide=("eventsToken",)))


@jobs_app.command("cancel")
def jobs_cancel(
    job_id: str, url: Url = DEFAULT_URL, token: Token = None, as_json: Json = False
) -> None:
    """Cancel a queued or running job, as its owner would."""
    with admin_session(url, token) as admin:
        data = cancel_job(admin, job_id)
    emit(data, as_json, lambda: f"{data['jobId']}: {data['status']}")


@jobs_app.command("tail")
def jobs_tail(
    job_id: str, url: Url = DEFAULT_URL, token: Token = None, as_json: Json = False
) -> None:
    """Print a job's events (past, then live) until it ends; --json: one object per line.
    Exit 0 when it completed, 1 when it failed or was cancelled."""

    def show(event: dict[str, Any]) -> None:
        typer.echo(json.dumps(event) if as_json else event_line(event))

    with admin_session(url, token) as admin:
        last = tail_job(admin, job_id, show)
    if last is None:
        raise fail(Code.FAILURE, "the event stream ended before the job finished")
    if last["type"] != "completed":
        raise typer.Exit(Code.FAILURE)


USAGE_COLUMNS = [
    ("period", "PERIOD"), ("userId", "USER"), ("modelId", "MODEL"), ("jobs", "JOBS"),
    ("promptTokens", "PROMPT"), ("completionTokens", "COMPLETION"),
    ("runSeconds", "RUN_S"), ("failures", "FAILED"),
]  # fmt: skip


def usage(
    url: Url = DEFAULT_URL,
    token: Token = None,
    as_json: Json = False,
    start: Annotated[
        str | None, typer.Option("--from", help="First UTC day, YYYY-MM-DD (default: 30 days ago).")
    ] = None,
    end: Annotated[str | None, typer.Option("--to", help="Last UTC day (default: today).")] = None,
    by: Annotated[str, typer.Option(help="Rows per 'day' or per 'month'.")] = "day",
    user: Annotated[list[str] | None, typer.Option(help="Only these users (repeat).")] = None,
    model: Annotated[list[str] | None, typer.Option(help="Only these models (repeat).")] = None,
) -> None:
    """The usage ledger: jobs, tokens, run seconds and failures per user and model."""
    if by not in ("day", "month"):
        raise fail(Code.USAGE, "--by is 'day' or 'month'")
    params: dict[str, Any] = {"by": by, "user": user or [], "model": model or []}
    if start:
        params["from"] = start
    if end:
        params["to"] = end
    with admin_session(url, token) as admin:
        data = admin.call("GET", "/usage", params=params)
    rows = [*data["rows"], {"period": "total", "userId": "", "modelId": "", **data["total"]}]
    emit(data, as_json, lambda: table(rows, USAGE_COLUMNS))


def register(app: typer.Typer) -> None:
    """Add ``queues``, ``dlq``, ``jobs`` and ``usage`` to the ``tierq`` command."""
    app.command("usage")(usage)
    app.add_typer(queues_app, name="queues")
    app.add_typer(dlq_app, name="dlq")
    app.add_typer(jobs_app, name="jobs")
