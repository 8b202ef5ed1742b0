"""Destinations are checked as they will be requested: every URL the broker accepts reads the
same (scheme, host, port) to httpx, whose rules decide validity, and to yarl, the parser of the
aiohttp client that delivers. A URL the two would read differently is refused at publish."""

from __future__ import annotations

import itertools

import pytest
import yarl

from tierq.broker.server.destinations import InvalidDestinationError, parse_url

HOSTS = ["allowed.com", "127.0.0.1", "[::1]", "evil.com", "0x7f.1", "2130706433",
         "xn--nxasmq6b.com", "ALLOWED.com.", "allowed.com:80"]  # fmt: skip
JOINS = ["", "\\", "@", "#", "?", "/", "%40", "%5C", ":", "\\@", "@@", ":@", "/@", "\u3002"]
SCHEMES = ["http://", "HTTPS://", "http:/", "http:\\\\", "http:///"]
TAILS = ["", "/x", ":8080/x", "?q=1#f"]


def corpus() -> list[str]:
    """Authorities glued from two hosts with the usual URL-parser-confusion tricks."""
    urls = []
    for scheme, a, join, b, tail in itertools.product(SCHEMES, HOSTS, JOINS, HOSTS, TAILS):
        urls.append(f"{scheme}{a}{join}{b}{tail}")
        urls.append(f"{scheme}u:p@{a}{join}{b}{tail}")
    return urls


def delivered(url: str) -> tuple[str, str, int]:
    sent = yarl.URL(url)
    assert sent.raw_host is not None
    assert sent.port is not None
    return sent.scheme, sent.raw_host.lower().strip("[]").removesuffix("."), sent.port


def test_every_accepted_url_is_requested_where_it_was_checked() -> None:
    accepted = 0
    for url in corpus():
        try:
            checked = parse_url(url)
        except InvalidDestinationError:
            continue
        accepted += 1
        port = checked.port or {"http": 80, "https": 443}[checked.scheme]
        host = checked.raw_host.decode().lower().strip("[]").removesuffix(".")
        assert delivered(url) == (checked.scheme, host, port), url
    assert accepted > 1000  # the corpus does reach the check


@pytest.mark.parametrize(
    "url",
    [
        "http://evil.com\\@allowed.com/",  # httpx: host allowed.com; yarl: refused
        "https://u:p@10.0.0.1\\@evil.com/x",
        "http://u:p@[::1]@127.0.0.1/",
        "https://[::1]@@127.0.0.1",
    ],
)
def test_an_ambiguous_authority_is_refused(url: str) -> None:
    with pytest.raises(InvalidDestinationError, match="ambiguous host"):
        parse_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000/api/worker/batch/chat?x=1",
        "https://user:pass@example.com/path#frag",
        "http://[::1]:9000/",
        "https://EXAMPLE.com./a%2Fb",
    ],
)
def test_plain_urls_still_pass(url: str) -> None:
    assert parse_url(url).scheme in {"http", "https"}
