"""The broker's HTTP client for deliveries (aiohttp).

Why not httpx, which the rest of tierq uses: a delivery is one small POST on a kept-alive
connection, and the broker makes hundreds per second. Measured on this project's 2-core machine
(64 requests in flight to a trivial uvicorn app, client CPU per request): httpx with one pool of
64 connections ~2.5 ms (httpcore checks every idle connection of its pool on every request),
httpx split over 64 small clients ~0.7 ms, aiohttp with one pool 0.10-0.15 ms. Deliveries were
most of the broker's CPU per job (``bench/jobs.py``).

What a delivery keeps from before: no cookies kept between deliveries (different users share
this client), redirects not followed (QStash does not), the response body read up to a cap (the
rest never read), no ``Content-Type`` made up for a message published without one, certificates
checked against certifi's bundle, and whether the answer came from a non-global address
(``private_peer``: such bodies are not passed on to callbacks unless configured).

One thing changed on purpose: deliveries go direct, never through a proxy named by
``HTTP(S)_PROXY``. aiohttp with ``trust_env`` looks the environment and ``~/.netrc`` up again
for every request, in a worker thread (measured: a tenth of the broker's CPU), and the broker is
local tooling whose destinations are this machine's app or allow-listed hosts; with httpx a
proxy in the environment would have carried deliveries to ``127.0.0.1`` too (no ``NO_PROXY``
default).
"""

from __future__ import annotations

from collections.abc import Sequence

import aiohttp
import httpx

from tierq.broker.server.destinations import is_private_address
from tierq.broker.server.model import AttemptResponse
from tierq.broker.server.requests import canonical_header

_NO_AUTO = frozenset({"Content-Type"})
"""aiohttp labels a bytes body ``application/octet-stream`` unless told not to; a message's
own ``Content-Type`` (a header it was published with) still goes out."""
MAX_HEADER_BYTES = 128 * 1024
"""Longest response header line or field accepted (aiohttp's default, 8,190, would fail an
attempt the destination accepted, e.g. with a long ``Content-Security-Policy``: the message
would be delivered again; httpx took ~100 KiB)."""


class ConnectTimeout(Exception):
    """No connection within the connect timeout (told apart from the message's own timeout)."""


class DeliveryClient:
    """One connection pool for every delivery of the process (``max_connections`` at most)."""

    def __init__(self, max_connections: int, connect_timeout_s: float = 10.0) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=max_connections,
                limit_per_host=0,
                ssl=httpx.create_ssl_context(),  # certifi's bundle, as httpx verified before
            ),
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s),
            max_line_size=MAX_HEADER_BYTES,
            max_field_size=MAX_HEADER_BYTES,
            trust_env=False,  # see the module doc
            auto_decompress=True,
        )

    async def send(
        self,
        method: str,
        url: str,
        body: bytes | None,
        headers: Sequence[tuple[str, str]],
        cap: int,
    ) -> AttemptResponse:
        """One attempt: the answer's status, headers and at most ``cap`` bytes of its body.
        Raises what aiohttp raises (no answer, a refused URL): the caller records it as an
        attempt without an answer."""
        try:
            async with self._session.request(
                method,
                url,
                data=body or None,
                headers=list(headers),
                allow_redirects=False,
                skip_auto_headers=_NO_AUTO,
            ) as resp:
                private = _peer_is_private(resp)
                content = await _read_capped(resp.content, cap)
                out: dict[str, list[str]] = {}
                for raw_name, raw_value in resp.raw_headers:
                    name = canonical_header(raw_name.decode("latin-1"))
                    out.setdefault(name, []).append(_header_value(raw_value))
                return AttemptResponse(
                    status=resp.status, headers=out, body=content, private_peer=private
                )
        except aiohttp.ServerTimeoutError as exc:  # the connect timeout, not the message's own
            raise ConnectTimeout(str(exc) or "no connection in time") from None

    async def close(self) -> None:
        await self._session.close()


def _header_value(raw: bytes) -> str:
    """A response header value as httpx decoded it: UTF-8 when it is, else Latin-1."""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _peer_is_private(resp: aiohttp.ClientResponse) -> bool:
    """Whether the answer came from a non-global address; unknown counts as private. Read off
    the response's protocol: aiohttp hands the connection back to its pool (``resp.connection``
    is ``None``) as soon as a small body has arrived, but the protocol keeps its transport."""
    protocol = getattr(resp, "_protocol", None)
    transport = getattr(protocol, "transport", None)
    if transport is None and resp.connection is not None:
        transport = resp.connection.transport
    addr = transport.get_extra_info("peername") if transport is not None else None
    if not isinstance(addr, tuple) or not addr:
        return True
    return is_private_address(str(addr[0]))


async def _read_capped(stream: aiohttp.StreamReader, cap: int) -> bytes:
    """At most ``cap`` bytes of the body; the rest is never read (the connection is closed
    rather than reused when some is left)."""
    body = bytearray()
    while len(body) < cap:
        chunk = await stream.read(cap - len(body))
        if not chunk:
            break
        body += chunk
    return bytes(body)
