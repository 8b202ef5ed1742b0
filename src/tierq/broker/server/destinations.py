"""Which URLs the broker delivers to: syntax, the allow-list, and what counts as private.

Pure: no I/O. A destination is parsed with httpx (its rules decide what is valid) and must
read the same — scheme, host and port — to yarl, the parser of aiohttp, which delivers: so what
is checked here (allow-list, private addresses) is exactly what will be requested. The two
disagree only on URLs whose authority is ambiguous (a backslash or a second ``@`` in it, a
bracketed address in the user part...), where httpx picks a host and yarl refuses the URL;
such a URL is refused at publish (tested over a generated corpus of such tricks:
``tests/unit/test_destinations.py``).
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import unquote

import httpx
import yarl

from tierq.errors import TierqError

_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_DEFAULT_PORTS = {"http": 80, "https": 443}


class InvalidDestinationError(TierqError, ValueError):
    """Why a URL cannot be delivered to (the text after ``invalid destination url:``)."""


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def valid_host(host: str) -> bool:
    """An IP address, or a DNS name of letters, digits, '-' and '_' (IDNA already applied)."""
    if _ip(host) is not None:
        return True
    name = host.removesuffix(".")
    return 0 < len(name) <= 253 and all(_LABEL.fullmatch(label) for label in name.split("."))


@functools.lru_cache(maxsize=4096)
def parse_url(url: str) -> httpx.URL:
    """The URL as httpx reads it; :class:`InvalidDestinationError` when it cannot be delivered
    to. Cached (a publish checks its URL twice: syntax, then the allow-list; a URL is immutable,
    and a refused one is not cached)."""
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        raise InvalidDestinationError("control characters or spaces in the url")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, UnicodeError, ValueError) as exc:
        raise InvalidDestinationError(str(exc) or type(exc).__name__) from None
    if parsed.scheme not in _DEFAULT_PORTS:
        raise InvalidDestinationError("endpoint has invalid scheme, add http:// or https://")
    host = parsed.raw_host.decode("ascii", "replace")
    if not valid_host(host):
        raise InvalidDestinationError(f"invalid host {host!r}")
    if parsed.port is not None and not 0 < parsed.port < 65536:
        raise InvalidDestinationError(f"invalid port {parsed.port}")
    if _as_delivered(url) != (parsed.scheme, _normal_host(host), _port(parsed)):
        raise InvalidDestinationError("ambiguous host: HTTP clients read this url differently")
    return parsed


def _as_delivered(url: str) -> tuple[str, str, int] | None:
    """Scheme, host and port as aiohttp (yarl) reads ``url``; ``None`` when it refuses it."""
    try:
        sent = yarl.URL(url)
    except ValueError:
        return None
    host = sent.raw_host
    if host is None or sent.port is None:
        return None
    return sent.scheme, _normal_host(host), sent.port


def _port(url: httpx.URL) -> int:
    return url.port or _DEFAULT_PORTS.get(url.scheme, 0)


def _host(url: httpx.URL) -> str:
    return _normal_host(url.raw_host.decode("ascii", "replace"))


def _normal_host(host: str) -> str:
    ip = _ip(host.strip("[]"))
    return str(ip) if ip is not None else host.lower().removesuffix(".")


def _has_dot_segment(raw_path: str) -> bool:
    """``..`` or ``.`` hidden behind percent-encoding (httpx resolves the plain ones)."""
    return any(part in {".", ".."} for part in unquote(raw_path).split("/"))


@dataclass(frozen=True)
class _Rule:
    """One allow-list entry: a host (``*.`` = any subdomain) with an optional port, or a URL
    prefix (scheme, host and port equal, path under the prefix's path)."""

    host: str
    port: int | None = None
    scheme: str | None = None
    path: str = ""

    def allows(self, url: httpx.URL) -> bool:
        host = _host(url)
        wildcard = self.host.startswith("*.")
        host_ok = host.endswith(self.host[1:]) if wildcard else host == self.host
        if not host_ok or (self.port is not None and _port(url) != self.port):
            return False
        if self.scheme is not None and url.scheme != self.scheme:
            return False
        if self.path in {"", "/"}:
            return True
        path = url.raw_path.decode("ascii", "replace").split("?", 1)[0]
        under = self.path if self.path.endswith("/") else self.path + "/"
        return (path == self.path or path.startswith(under)) and not _has_dot_segment(path)


def _rule(entry: str) -> _Rule:
    entry = entry.strip()
    if "://" in entry:
        try:
            url = parse_url(entry)
        except InvalidDestinationError as exc:
            raise ValueError(f"allowed destination {entry!r}: {exc}") from None
        path = url.raw_path.decode("ascii").split("?", 1)[0]
        return _Rule(_host(url), _port(url), url.scheme, path)
    host, port = entry, None
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    elif entry.count(":") == 1:
        host, _, raw_port = entry.partition(":")
        if not raw_port.isdigit():
            raise ValueError(f"allowed destination {entry!r}: invalid port")
        port = int(raw_port)
    bare = host.removeprefix("*.")
    if not valid_host(bare):
        raise ValueError(f"allowed destination {entry!r}: not a host, host:port or URL prefix")
    return _Rule(("*." if host.startswith("*.") else "") + _normal_host(bare), port)


class AllowList:
    """Destinations the broker may deliver to (see ``BrokerSettings.allowed_destinations``)."""

    def __init__(self, entries: Iterable[str]) -> None:
        entries = [e for e in entries if e.strip()]
        self.anywhere = any(e.strip() == "*" for e in entries)
        self._rules = [_rule(e) for e in entries if e.strip() != "*"]

    def allows(self, url: httpx.URL) -> bool:
        return self.anywhere or any(rule.allows(url) for rule in self._rules)


def is_private_address(host: str) -> bool:
    """True for any address that is not globally routable (loopback, private, link-local,
    shared, unspecified, reserved), IPv4-mapped IPv6 judged by its IPv4; names count as private
    (an address could not be told)."""
    ip = _ip(host.strip("[]"))
    if ip is None:
        return True
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global
