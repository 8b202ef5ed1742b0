"""redis-py's blocking pool and TCP connection, minus their per-command overhead.

Measured with redis-py 8.1 on this project's 2-core machine (``GET`` from 50 tasks, hiredis,
uvloop): the stock ``BlockingConnectionPool`` + ``Connection`` cost ~59 µs of CPU per command,
these ~36 µs. Where it went, per command:

- the pool: an ``asyncio.Condition`` and an ``asyncio.timeout`` around every checkout, a
  no-op async context manager, observability hooks awaited on checkout and release, and a
  probe read (``can_read``, itself under ``asyncio.timeout(0)``) of a connection that was idle
  an instant ago;
- the connection: with a ``socket_timeout`` every send runs under ``asyncio.wait_for``, which
  wraps the write in a new Task, although a socket write only waits when the kernel's buffer
  is full; and redis-py packs commands in Python, growing one bytes object argument by
  argument (1.4 ms for the 1,500 arguments of one delta flush of 500 jobs; hiredis's C
  packer, byte for byte the same output, 0.11 ms).

:class:`LeanPool` hands out an idle connection directly when one is connected and nobody waits
for a connection (asyncio runs one task at a time, so the lists need no lock); otherwise, and
whenever redis-py's maintenance mode is on, it is the stock pool. :class:`LeanConnection` writes
at once and waits (bounded by ``socket_timeout``) only when the kernel did not take everything.
Behaviour kept: at most ``max_connections``, callers wait up to ``timeout`` for one; a cancelled
or failed command drops its connection (redis-py disconnects it). One thing is better than the
stock pool: a connection Redis closed while it sat in the pool (a restart, ``CLIENT KILL``, an
idle timeout) or that holds unread bytes is disconnected and connected again before use, where
redis-py 8's pool hands it out and the next command fails ("Connection closed by server").

:class:`LeanRedis` is ``redis.asyncio.Redis`` whose pipelines (:class:`LeanPipeline`), on a
:class:`LeanPool`, skip what a plain batch of commands does not use: redis-py 8.1 shields the
connection's release in a new Task, looks for ``HIMPORT`` fieldsets to prepare and awaits its
observability hooks (a pipeline of two commands ~80-100 -> ~60 µs of CPU measured). Kept: the
same wire bytes, replies through the client's response callbacks, an error reply in its place
(raised first with ``raise_on_error``), the connection's retry policy on connection errors and
timeouts, each reply bounded by ``socket_timeout`` (read by the connection's ``read_response``),
a connection dropped (not pooled) when a batch is cut off mid-way. Transactions, ``WATCH``,
pinned connections and pipelines with scripts to load take redis-py's own path.

Each reply is still bounded by ``socket_timeout``, but not by an ``asyncio.timeout`` per read
(a loop timer made and cancelled for every reply): :class:`ReadDeadlines` keeps every read's
deadline on one timer per event loop, armed at the earliest deadline it knows of, and cancels a
read past its deadline as ``asyncio.timeout`` would (redis-py's ``TimeoutError``, the connection
dropped; a cancel from outside stays a cancel; redis-py's maintenance notifications can move a
read's deadline). A ``GET`` from 50 tasks: ~29 -> ~24.5 µs of CPU, a pipeline of five
``GET`` commands ~66-94 -> ~45-72 µs (medians of 6 alternating rounds, in two states of the
machine; with no timeout at all ~21 and ~34-54 µs).

Tested: ``tests/integration/test_redis_pool.py``.
"""

from __future__ import annotations

import asyncio
import inspect
import math
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar, cast

import redis
from hiredis import pack_command as _pack
from redis.asyncio.client import Pipeline, Redis
from redis.asyncio.connection import AbstractConnection, BlockingConnectionPool, Connection
from redis.client import EMPTY_RESPONSE, NEVER_DECODE
from redis.commands.core import AsyncScript
from redis.driver_info import DriverInfo
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.maint_notifications import MaintenanceState
from redis.typing import ScriptTextT

from tierq.aio import TIMER_SLACK_S, PerLoop

T = TypeVar("T")
DRIVER_INFO = DriverInfo(name="redis-py", lib_version=redis.__version__)


class _ReadWatch:
    """The deadline of the one read in flight on a connection (see :class:`ReadDeadlines`).
    ``reschedule`` is what redis-py's maintenance notifications call to relax or restore an
    active read's timeout (as on an ``asyncio.timeout``)."""

    __slots__ = ("cancelling", "deadline", "expired", "task")

    def __init__(self) -> None:
        self.deadline: float | None = None
        self.task: asyncio.Task[Any] | None = None
        self.cancelling = 0
        self.expired = False

    def reschedule(self, deadline: float | None) -> None:
        self.deadline = deadline
        if deadline is not None:
            _deadlines().due(deadline)


class ReadDeadlines:
    """Every read's ``socket_timeout`` on one event loop, kept by one timer: an
    ``asyncio.timeout`` per read made and cancelled a loop timer for every reply (15 to 25 %
    of a command's or a pipeline's CPU, measured; see the module doc). The timer fires at the
    earliest deadline it knows of and then cancels the reads that are past theirs, as
    ``asyncio.timeout`` would (the read raises ``TimeoutError`` unless the task was also
    cancelled from outside)."""

    __slots__ = ("_armed", "_at", "watches")

    def __init__(self) -> None:
        self.watches: set[_ReadWatch] = set()
        self._at = math.inf  # when the armed timer fires (none armed: never)
        self._armed = 0  # which timer is the armed one (one replaced by an earlier fires idle)

    def begin(self, watch: _ReadWatch, task: asyncio.Task[Any], deadline: float) -> None:
        """``watch`` is ``task``'s read, due by loop time ``deadline``."""
        watch.task = task
        watch.cancelling = task.cancelling()
        watch.expired = False
        watch.deadline = deadline
        self.watches.add(watch)
        self.due(deadline)

    def end(self, watch: _ReadWatch) -> None:
        self.watches.discard(watch)
        watch.task = None

    def due(self, deadline: float) -> None:
        """Make sure the timer fires by ``deadline``. (No timer handle is kept: it holds its
        loop, and so would keep a closed loop alive through :class:`PerLoop`.)"""
        if deadline < self._at:
            self._at = deadline
            self._armed += 1
            asyncio.get_running_loop().call_at(deadline, self._fire, self._armed)

    def _fire(self, armed: int) -> None:
        if armed != self._armed:
            return  # replaced by a timer for an earlier deadline
        self._at = math.inf
        now = asyncio.get_running_loop().time() + TIMER_SLACK_S  # timers fire to the ms
        later = None
        for watch in self.watches:
            deadline = watch.deadline
            if deadline is None or watch.expired:
                continue
            if deadline <= now:
                watch.expired = True
                if watch.task is not None:
                    watch.task.cancel()
            elif later is None or deadline < later:
                later = deadline
        if later is not None:
            self.due(later)


def _read_error(exc: BaseException, watch: _ReadWatch, host_error: str) -> Exception | None:
    """The error redis-py raises for ``exc`` ending a read (``None``: ``exc`` itself): its
    ``TimeoutError`` when the read's deadline passed (the cancel was ours alone, as
    ``asyncio.timeout`` tells it) or the socket timed out, its ``ConnectionError`` for any
    other ``OSError``."""
    if isinstance(exc, asyncio.CancelledError):
        task = watch.task
        if watch.expired and task is not None and task.uncancel() <= watch.cancelling:
            return RedisTimeoutError(f"Timeout reading from {host_error}")
        return None
    if isinstance(exc, TimeoutError):  # ETIMEDOUT from the socket is an OSError too
        return RedisTimeoutError(f"Timeout reading from {host_error}")
    if isinstance(exc, OSError):
        return RedisConnectionError(f"Error while reading from {host_error} : {exc.args}")
    return None


_deadlines = PerLoop(ReadDeadlines)


class LeanConnection(Connection):
    """A TCP connection whose sends do not start a Task each, and whose commands are packed by
    hiredis (see the module doc)."""

    def __init__(self, **kwargs: Any) -> None:
        # what CLIENT SETINFO reports, made once: redis-py looks its own version up in the
        # installed packages' metadata for every new connection (files read, parsed)
        kwargs.setdefault("driver_info", DRIVER_INFO)
        super().__init__(**kwargs)
        # hiredis encodes text as UTF-8, strictly: the stock packer does the same only then
        encoder = self.encoder
        self._hiredis_packs = (
            encoder.encoding.replace("-", "").lower() == "utf8"
            and encoder.encoding_errors == "strict"
        )
        self._watch = _ReadWatch()

    async def read_response(
        self,
        disable_decoding: bool = False,
        timeout: float | None = None,  # noqa: ASYNC109 # redis-py's signature
        *,
        disconnect_on_error: bool = True,
        push_request: bool | None = False,
    ) -> Any:
        """redis-py's ``read_response`` for the common case (the connection's own
        ``socket_timeout``, no maintenance under way), the timeout kept by
        :class:`ReadDeadlines` instead of an ``asyncio.timeout`` per reply; the same errors,
        the same disconnects. Anything else is redis-py's own."""
        read_timeout = self.socket_timeout
        task = asyncio.current_task()
        if (
            timeout is not None
            or read_timeout is None
            or task is None
            or self.maintenance_state != MaintenanceState.NONE
        ):
            return await super().read_response(
                disable_decoding, timeout, disconnect_on_error=disconnect_on_error,
                push_request=push_request,
            )  # fmt: skip
        watch = self._watch
        deadlines = _deadlines()
        loop = asyncio.get_running_loop()
        deadlines.begin(watch, task, loop.time() + read_timeout)
        self._active_read_timeout = watch  # type: ignore[assignment] # notifications move it
        try:
            response = await self._read_response_from_parser(
                disable_decoding=disable_decoding, push_request=push_request
            )
        except BaseException as exc:
            if disconnect_on_error:
                await self.disconnect(nowait=True)
            error = _read_error(exc, watch, self._host_error())
            if error is None:
                raise
            raise error from None
        finally:
            self._active_read_timeout = None
            deadlines.end(watch)
        if self.health_check_interval:
            self.next_health_check = loop.time() + self.health_check_interval
        if isinstance(response, ResponseError):
            raise response from None
        return response

    def pack_command(self, *args: Any) -> list[bytes]:
        name = args[0] if args else None
        simple = (isinstance(name, str) and " " not in name) or (
            isinstance(name, bytes) and b" " not in name
        )  # redis-py splits a name like "CONFIG GET" into two arguments; hiredis would not
        if simple and self._hiredis_packs:
            try:
                return [_pack(args)]
            except TypeError:  # e.g. a bool: the stock packer raises redis-py's own error
                pass
        return super().pack_command(*args)

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        writer = self._writer
        if writer is None or (check_health and self.health_check_interval):
            await super().send_packed_command(command, check_health)
            return
        if isinstance(command, str):
            command = command.encode()
        if isinstance(command, bytes):
            command = [command]
        try:
            writer.writelines(command)
            if writer.transport.get_write_buffer_size():  # the kernel did not take it all
                await asyncio.wait_for(writer.drain(), self.socket_timeout)
        except TimeoutError:
            await self.disconnect(nowait=True)
            raise RedisTimeoutError("Timeout writing to socket") from None
        except OSError as exc:
            await self.disconnect(nowait=True)
            raise RedisConnectionError(f"Error while writing to socket: {exc}") from exc
        except BaseException:
            await self.disconnect(nowait=True)  # a half-written command: the socket is unusable
            raise


def _clean(connection: AbstractConnection) -> bool:
    """Connected, and nothing arrived while it sat idle: no bytes (a stray reply would be read
    as the next command's), no end of stream (Redis closed it: restarted, or killed the client),
    no error. What the stock pool's probe read finds out, read off the stream's state instead
    (the event loop has fed it everything that arrived while the connection was idle)."""
    reader = connection._reader
    return (
        reader is not None
        and connection._writer is not None
        and not reader._buffer  # type: ignore[attr-defined] # asyncio.StreamReader's buffer
        and not reader.at_eof()
        and reader.exception() is None
    )


class LeanPool(BlockingConnectionPool):
    """``BlockingConnectionPool`` with a lock-free fast path (see the module doc)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("connection_class", LeanConnection)
        super().__init__(**kwargs)

    async def get_connection(self, *args: Any, **options: Any) -> AbstractConnection:
        idle = self._available_connections
        if idle and not self._in_maintenance:
            connection = idle.pop()
            clean = _clean(connection)
            if clean and not connection.should_reconnect():  # type: ignore[no-untyped-call] # redis-py leaves it untyped
                self._in_use_connections.add(connection)
                return connection
            if not clean and connection.is_connected:
                # The stock pool would hand it out (its probe is skipped with maintenance
                # notifications on, the default) and the command would fail: reconnect instead.
                await connection.disconnect()
            idle.append(connection)  # the stock path connects it again
        connection = await super().get_connection()  # type: ignore[no-untyped-call] # as above
        return cast(AbstractConnection, connection)

    async def release(self, connection: AbstractConnection) -> None:
        if not self.release_now(connection):
            await super().release(connection)

    def release_now(self, connection: AbstractConnection) -> bool:
        """Put ``connection`` back at once, without awaiting (``False``: it takes the stock
        path, :meth:`release`, e.g. to wake a caller waiting for a connection)."""
        if (
            self._in_maintenance
            or connection.should_reconnect()  # type: ignore[no-untyped-call] # as above
            or self._condition._waiters  # someone waits: the stock path notifies them
            or connection not in self._in_use_connections
        ):
            return False
        self._in_use_connections.remove(connection)
        self._available_connections.append(connection)
        return True


class LeanPipeline(Pipeline):
    """A non-transactional pipeline with a lean round trip (see the module doc)."""

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        stack = self.command_stack
        pool = self.connection_pool
        if (
            not stack
            or self.scripts
            or self.watching
            or self.is_transaction
            or self.explicit_transaction
            or self.connection is not None
            or not isinstance(pool, LeanPool)
            or any(args[0] in _STATEFUL for args, _ in stack)
            or _himport_in_use(pool)
        ):
            return await super().execute(raise_on_error)
        try:
            return await _on_connection(
                pool, lambda connection: self._round_trip(connection, stack, raise_on_error)
            )
        finally:
            self.command_stack = []
            self.scripts = set()

    async def _round_trip(
        self, connection: LeanConnection, stack: list[Any], raise_on_error: bool
    ) -> list[Any]:
        packed = connection.pack_commands([args for args, _ in stack])
        try:
            await connection.send_packed_command(packed, check_health=False)
            response: list[Any] = []
            for args, options in stack:
                try:  # each reply bounded by socket_timeout, as redis-py reads them
                    reply = await connection.read_response(disable_decoding=NEVER_DECODE in options)
                except ResponseError as exc:
                    response.append(options.get(EMPTY_RESPONSE, exc))
                    continue
                parsed = self._parsed(args[0], reply, options)
                response.append(await parsed if inspect.isawaitable(parsed) else parsed)
        except BaseException:
            await connection.disconnect(nowait=True)  # replies left unread: never reuse it
            raise
        if raise_on_error:
            self.raise_first_error(stack, response)
        return response

    def _parsed(self, name: Any, reply: Any, options: dict[str, Any]) -> Any:
        if EMPTY_RESPONSE in options or NEVER_DECODE in options or "keys" in options:
            options = {k: v for k, v in options.items() if k not in _NOT_FOR_CALLBACKS}
        callback = self.response_callbacks.get(name)
        return reply if callback is None else callback(reply, **options)


async def _on_connection(pool: LeanPool, do: Callable[[LeanConnection], Awaitable[T]]) -> T:
    """``do(connection)`` on a connection of ``pool``, under the connection's retry policy (a
    failed try drops the connection; the next one connects again), the connection back in the
    pool whatever happens."""
    connection = cast(LeanConnection, await pool.get_connection())

    async def failed(error: Exception) -> None:
        await connection.disconnect()

    try:
        return await connection.retry.call_with_retry(lambda: do(connection), failed)
    finally:
        if not pool.release_now(connection):
            # as redis-py's pipelines do: a second cancel must not split the pool's bookkeeping
            await asyncio.shield(pool.release(connection))


def _himport_in_use(pool: LeanPool) -> bool:
    """Whether an ``HIMPORT`` fieldset was ever prepared on ``pool``: redis-py's own path
    then (it prepares fieldsets per connection)."""
    registry = getattr(pool, "himport_registry", None)
    return registry is not None and bool(registry.revision)


_NOT_FOR_CALLBACKS = frozenset({EMPTY_RESPONSE, NEVER_DECODE, "keys"})
_STATEFUL = frozenset({"WATCH", "UNWATCH", "MULTI", "EXEC", "DISCARD"})
"""Commands that change a connection's state: redis-py's own path tracks them."""


class LeanRedis(Redis):
    """``redis.asyncio.Redis`` whose non-transactional pipelines are :class:`LeanPipeline`, and
    whose single commands on a :class:`LeanPool` skip the same per-call extras (the retry
    policy, the reply callbacks and the bounded read stay)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._registered_scripts: dict[str, AsyncScript] = {}  # by sha: one each, however often

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        pool = self.connection_pool
        name = args[0]
        if (
            self.connection is not None
            or self.single_connection_client
            or not isinstance(pool, LeanPool)
            or (isinstance(name, str) and name.upper().startswith("HIMPORT"))
        ):
            return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]

        async def once(connection: LeanConnection) -> Any:
            await connection.send_packed_command(connection.pack_command(*args), check_health=False)
            return await self.parse_response(connection, name, **options)

        return await _on_connection(pool, once)

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> Pipeline:
        cls = Pipeline if transaction else LeanPipeline
        return cls(self.connection_pool, self.response_callbacks, transaction, shard_hint)

    def register_script(self, script: ScriptTextT) -> AsyncScript:  # type: ignore[override]
        """redis-py's script object, kept in this client's list (see :meth:`load_scripts`)."""
        registered = super().register_script(script)
        self._registered_scripts[registered.sha] = registered
        return registered

    async def load_scripts(self) -> None:
        """Load every script registered with this client, in one round trip. At start: else
        the first requests meet a server that has none of them, and every caller answered
        ``NOSCRIPT`` loads them and calls again (the Redis slow log at the start of
        ``bench/dispatch.py``: ~250 loads for its first 16 jobs, each caller's a round trip
        apiece)."""
        scripts = list(self._registered_scripts.values())
        if not scripts:
            return
        pipe = self.pipeline(transaction=False)
        for script in scripts:  # each keeps its sha: the one Redis gives back for its text
            pipe.script_load(script.script)
        await pipe.execute()
