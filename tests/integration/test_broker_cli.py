"""`tierq broker` as users run it: banner like the official dev server's, configured token."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
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


def test_broker_command_prints_banner_and_accepts_configured_token(
    redis_url: str, tmp_path: Path
) -> None:
    port = free_port()
    env = {
        **os.environ,
        "QSTASH_TOKEN": "tierq-ci-token",
        "QSTASH_CURRENT_SIGNING_KEY": "sig_ci_current_key_0123456789ab",
        "QSTASH_NEXT_SIGNING_KEY": "sig_ci_next_key_0123456789abcdef",
        "TIERQ_DATA_DIR": str(tmp_path),
    }
    out = tmp_path / "broker.out"
    with out.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tierq", "broker", "--port", str(port),
             "--redis-url", redis_url, "--key-prefix", f"cli{port}"],
            env=env, stdout=sink, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        banner = wait_until(
            lambda: "QSTASH_NEXT_SIGNING_KEY" in out.read_text() and out.read_text(), timeout=30
        )
        assert re.search(r"runn+ing( at|\.)", banner, re.IGNORECASE)
        assert f"http://127.0.0.1:{port}" in banner
        assert "QSTASH_TOKEN=tierq-ci-token" in banner
        assert "QSTASH_CURRENT_SIGNING_KEY=sig_ci_current_key_0123456789ab" in banner
        client = QStash("tierq-ci-token", base_url=f"http://127.0.0.1:{port}")
        try:
            keys = client.signing_key.get()
            assert keys.current == "sig_ci_current_key_0123456789ab"
            client.queue.upsert("cli-q", parallelism=2)
            assert client.queue.get("cli-q").parallelism == 2
        finally:
            client.http._client.close()
        with httpx.Client() as raw:
            bad = raw.get(
                f"http://127.0.0.1:{port}/v2/queues", headers={"Authorization": "Bearer nope"}
            )
        assert bad.status_code == 401
        assert "error" in bad.json()
    finally:
        proc.terminate()
        proc.wait(timeout=15)
