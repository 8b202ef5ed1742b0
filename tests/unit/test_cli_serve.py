"""`tierq serve` refuses to start without real secrets (dev conveniences are `tierq dev` only)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from tierq.cli import app


def test_serve_refuses_to_start_without_real_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    secrets = [
        "TIERQ_API_KEYS", "TIERQ_ADMIN_TOKEN", "TIERQ_EVENTS_SECRET", "TIERQ_REDIS_URL",
        "QSTASH_TOKEN", "QSTASH_CURRENT_SIGNING_KEY", "QSTASH_NEXT_SIGNING_KEY",
    ]  # fmt: skip
    for name in secrets:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TIERQ_ADMIN_TOKEN", "set-but-not-enough")
    result = CliRunner().invoke(app, ["serve", "--port", "1"])
    assert result.exit_code == 2
    for missing in ("TIERQ_API_KEYS", "TIERQ_EVENTS_SECRET", "QSTASH_TOKEN", "TIERQ_REDIS_URL"):
        assert missing in result.output
    assert "TIERQ_ADMIN_TOKEN" not in result.output.split("missing:")[1]
