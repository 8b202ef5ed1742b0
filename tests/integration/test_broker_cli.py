"""`tierq broker` as users run it: banner like the official dev server's, configured token.

Issue 10, findings 10 and 11: the public dev tokens publish only while no private token is
configured (or when told to), and the banner and logs never show a secret.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from qstash import QStash

from helpers import wait_until
from tierq.broker.server.credentials import DEV_ACCOUNTS, build_accounts, user_of_token
from tierq.embedded_redis import free_port


def test_configured_token_and_keys_are_an_account() -> None:
    accounts = build_accounts(
        dev_accounts=False, token="my-token", current_key="sig_cur", next_key="sig_next"
    )
    assert list(accounts) == ["my-token"]
    assert accounts["my-token"].current_key == "sig_cur"
    assert user_of_token(DEV_ACCOUNTS[1].token) == "testUser1"


@pytest.mark.parametrize(
    ("flag", "token", "dev_accepted"),
    [
        (None, None, True),  # nothing configured: the dev server's tokens
        (None, DEV_ACCOUNTS[0].token, True),  # the dev token configured is no private one
        (None, "private", False),  # a private token: the public ones are refused
        (True, "private", True),  # unless explicitly accepted
        (False, None, False),
    ],
)
def test_dev_tokens_only_without_a_private_token(
    flag: bool | None, token: str | None, dev_accepted: bool
) -> None:
    accounts = build_accounts(dev_accounts=flag, token=token, current_key=None, next_key=None)
    assert (DEV_ACCOUNTS[1].token in accounts) is dev_accepted
    if token:
        assert token in accounts


SECRET_TOKEN = "tierq-ci-token-not-for-printing"
SECRET_CURRENT = "sig_ci_current_key_0123456789ab"
SECRET_NEXT = "sig_ci_next_key_0123456789abcdef"


@contextlib.contextmanager
def broker_command(redis_url: str, tmp_path: Path, **env: str) -> Iterator[tuple[str, Path]]:
    """``tierq broker`` as a user runs it; yields its URL and its output file (banner shown)."""
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TIERQ_", "QSTASH_"))}
    out = tmp_path / f"broker-{port}.out"
    with out.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tierq", "broker", "--port", str(port),
             "--redis-url", redis_url, "--key-prefix", f"cli{port}"],
            env={**clean, "TIERQ_DATA_DIR": str(tmp_path), **env},
            stdout=sink, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_until(lambda: "Deliveries allowed to" in out.read_text(), timeout=30)
        yield f"http://127.0.0.1:{port}", out
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def status_with(url: str, token: str) -> int:
    with httpx.Client() as raw:
        return raw.get(url + "/v2/queues", headers={"Authorization": f"Bearer {token}"}).status_code


def test_broker_command_with_private_token_prints_no_secret_and_refuses_dev_tokens(
    redis_url: str, tmp_path: Path
) -> None:
    secrets = {
        "QSTASH_TOKEN": SECRET_TOKEN,
        "QSTASH_CURRENT_SIGNING_KEY": SECRET_CURRENT,
        "QSTASH_NEXT_SIGNING_KEY": SECRET_NEXT,
    }
    with broker_command(redis_url, tmp_path, **secrets) as (url, out):
        banner = out.read_text()
        assert re.search(r"runn+ing( at|\.)", banner, re.IGNORECASE)
        assert f"QSTASH_URL={url}" in banner
        client = QStash(SECRET_TOKEN, base_url=url)
        try:
            keys = client.signing_key.get()
            assert keys.current == SECRET_CURRENT
            client.queue.upsert("cli-q", parallelism=2)
            assert client.queue.get("cli-q").parallelism == 2
        finally:
            client.http._client.close()
        assert status_with(url, "nope") == 401
        for dev in DEV_ACCOUNTS:  # public tokens publish nothing beside a private one
            assert status_with(url, dev.token) == 401
    output = out.read_text()  # everything the process wrote, banner and logs
    for secret in secrets.values():
        assert secret not in output
    assert "QSTASH_TOKEN=<as configured; not shown>" in output


def test_broker_command_shows_the_public_dev_credentials(redis_url: str, tmp_path: Path) -> None:
    dev = DEV_ACCOUNTS[0]
    with broker_command(redis_url, tmp_path) as (url, out):
        banner = out.read_text()
        assert f"QSTASH_TOKEN={dev.token}" in banner
        assert f"QSTASH_CURRENT_SIGNING_KEY={dev.current_key}" in banner
        assert f"QSTASH_NEXT_SIGNING_KEY={dev.next_key}" in banner
        assert "Deliveries allowed to: localhost, 127.0.0.1, [::1]" in banner
        assert status_with(url, dev.token) == 200


def test_broker_command_accepts_dev_tokens_when_told(redis_url: str, tmp_path: Path) -> None:
    env = {"QSTASH_TOKEN": SECRET_TOKEN, "TIERQ_BROKER__ACCEPT_DEV_TOKENS": "true"}
    with broker_command(redis_url, tmp_path, **env) as (url, out):
        assert status_with(url, DEV_ACCOUNTS[0].token) == 200
        assert status_with(url, SECRET_TOKEN) == 200
        assert "public tokens are accepted too" in out.read_text()
    assert SECRET_TOKEN not in out.read_text()
