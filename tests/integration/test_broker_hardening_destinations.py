"""Issue 10, the pure rules behind the broker's hardening, as input → output tables:
destination syntax, the allow-list, private addresses, JSON depth, retry backoff, printing."""

from __future__ import annotations

import pytest

from tierq.broker.server.backoff import storage_retry_delay_s
from tierq.broker.server.context import json_depth, parse_json
from tierq.broker.server.credentials import DEV_ACCOUNTS, printable
from tierq.broker.server.destinations import (
    AllowList,
    InvalidDestinationError,
    is_private_address,
    parse_url,
)
from tierq.errors import ClientError


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000/api/worker/stream/chat",
        "https://example.com",
        "https://user:pw@example.com:8443/p?q=1",
        "http://[::1]:9000/x",
        "http://my_service.internal/x",
        "https://bücher.example/x",  # IDNA
        "http://example.com./x",
    ],
)
def test_parse_url_accepts(url: str) -> None:
    parse_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "http://[::1",  # unclosed IPv6 literal (httpx.InvalidURL when delivered)
        "http://a%00b/",  # percent-encoded NUL in the host
        "http://a%41b/",
        "http://xn--/",  # IDNA error
        "http://-bad-.example/",
        "http://a..b/",
        "http://h:0/",
        "http://host/\x00",
        "http://host/a\nb",
        "ftp://example.com/",
    ],
)
def test_parse_url_rejects(url: str) -> None:
    with pytest.raises(InvalidDestinationError):
        parse_url(url)


ALLOW = [
    "localhost",
    "127.0.0.1",
    "[::1]",
    "api.example.com:8443",
    "*.hooks.example.org",
    "https://app.example.net/api/worker/",
    "http://10.0.0.5:8000/cb",
]


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("http://localhost:3000/x", True),
        ("http://LOCALHOST./x", True),
        ("http://127.0.0.1/x", True),
        ("http://127.0.0.2/x", False),
        ("http://[::1]:8080/x", True),
        ("http://[0:0:0:0:0:0:0:1]/x", True),
        ("http://[::ffff:127.0.0.1]/x", False),  # only what is listed
        ("https://api.example.com:8443/x", True),
        ("https://api.example.com/x", False),  # port 443, not 8443
        ("https://a.hooks.example.org/x", True),
        ("https://hooks.example.org/x", False),  # *. means subdomains
        ("https://evilhooks.example.org/x", False),
        ("https://app.example.net/api/worker/stream/chat", True),
        ("https://app.example.net/api/worker/", True),
        ("https://app.example.net/api/worker", False),
        ("https://app.example.net/api/workers/x", False),
        ("https://app.example.net/metrics", False),
        ("https://app.example.net/api/worker/../../metrics", False),  # resolved by httpx
        ("https://app.example.net/api/worker/%2e%2e/%2E%2E/metrics", False),
        ("http://app.example.net/api/worker/x", False),  # scheme differs
        ("https://app.example.net:444/api/worker/x", False),
        ("https://app.example.net@evil.example/api/worker/x", False),  # userinfo trick
        ("http://10.0.0.5:8000/cb", True),
        ("http://10.0.0.5:8000/cb/more", True),
        ("http://10.0.0.5:8000/cbx", False),
        ("http://169.254.169.254/latest/meta-data", False),
    ],
)
def test_allow_list(url: str, allowed: bool) -> None:
    assert AllowList(ALLOW).allows(parse_url(url)) is allowed


def test_allow_list_star_and_empty() -> None:
    assert AllowList(["*"]).allows(parse_url("https://anything.example/x"))
    assert not AllowList([]).allows(parse_url("http://127.0.0.1/x"))


@pytest.mark.parametrize("entry", ["http://[::1", "ftp://x/", "bad host", "h:port", "a..b"])
def test_allow_list_rejects_bad_entries(entry: str) -> None:
    with pytest.raises(ValueError, match="allowed destination"):
        AllowList([entry])


@pytest.mark.parametrize(
    ("host", "private"),
    [
        ("127.0.0.1", True),
        ("10.1.2.3", True),
        ("172.16.0.1", True),
        ("192.168.1.1", True),
        ("169.254.169.254", True),
        ("100.64.0.1", True),  # shared address space
        ("0.0.0.0", True),
        ("::1", True),
        ("fd00::1", True),
        ("fe80::1", True),
        ("::ffff:127.0.0.1", True),
        ("::ffff:8.8.8.8", False),
        ("8.8.8.8", False),
        ("2001:4860:4860::8888", False),
        ("example.com", True),  # no address known: assume the worst
    ],
)
def test_is_private_address(host: str, private: bool) -> None:
    assert is_private_address(host) is private


@pytest.mark.parametrize(
    ("raw", "depth"),
    [
        (b"", None),
        (b"  ", None),
        (b"1", 0),
        (b"[]", 1),
        (b'{"a": [1, {"b": []}]}', 4),
        (b"[" * 32 + b"]" * 32, 32),
    ],
)
def test_parse_json_within_depth(raw: bytes, depth: int | None) -> None:
    value = parse_json(raw, max_depth=32)
    assert (None if value is None and not raw.strip() else json_depth(value)) == depth


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 33 + b"]" * 33,
        b"[" * 200_000 + b"]" * 200_000,  # past the interpreter's recursion limit
        b'{"messageIds": ' + b"[" * 32 + b"]" * 32 + b"}",  # 33 levels with the object
        b"{not json",
    ],
)
def test_parse_json_rejects_with_400(raw: bytes) -> None:
    with pytest.raises(ClientError) as info:
        parse_json(raw, max_depth=32)
    assert info.value.status == 400


def test_storage_retry_backoff() -> None:
    assert [storage_retry_delay_s(n) for n in range(1, 8)] == [
        0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0,
    ]  # fmt: skip


def test_printable_shows_only_published_credentials() -> None:
    dev = DEV_ACCOUNTS[2]
    assert printable(dev.token) == dev.token
    assert printable(dev.next_key) == dev.next_key
    assert "secret" not in printable("my-secret-token")
