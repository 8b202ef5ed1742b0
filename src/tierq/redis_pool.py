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
Tested: ``tests/integration/test_redis_pool.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any, cast

import redis
from hiredis import pack_command as _pack
from redis.asyncio.connection import AbstractConnection, BlockingConnectionPool, Connection
from redis.driver_info import DriverInfo
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

DRIVER_INFO = DriverInfo(name="redis-py", lib_version=redis.__version__)


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
        if (
            self._in_maintenance
            or connection.should_reconnect()  # type: ignore[no-untyped-call] # as above
            or self._condition._waiters  # someone waits: the stock path notifies them
            or connection not in self._in_use_connections
        ):
            await super().release(connection)
            return
        self._in_use_connections.remove(connection)
        self._available_connections.append(connection)
