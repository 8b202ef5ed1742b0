"""Settings: one module, env over tierq.toml over defaults; dev conveniences only on request."""

from __future__ import annotations

from pathlib import Path

import pytest

from tierq.config import DEV_PAID_KEY, Settings
from tierq.queues import QueueId


def test_defaults_hold_every_limit() -> None:
    s = Settings()
    assert {q: c.parallelism for q, c in s.queues.items()} == {
        QueueId.PAID_STREAM: 16, QueueId.FREE_STREAM: 4, QueueId.PAID_BATCH: 8,
        QueueId.FREE_BATCH: 2, QueueId.PAID_VISION: 4, QueueId.FREE_VISION: 1,
    }  # fmt: skip
    assert s.user_limits.paid > s.user_limits.free
    assert s.models["sim"].limits.free >= 1
    assert s.api_keys == {}
    assert s.admin_token is None


def test_toml_file_then_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "tierq.toml"
    toml.write_text(
        "dispatch_reconcile_s = 3.5\nlease_ttl_s = 12\n"
        "[queues.q_free_batch]\nparallelism = 5\nadmission_depth = 7\n"
        "[user_limits]\npaid = 9\nfree = 4\n"
    )
    monkeypatch.setenv("TIERQ_CONFIG", str(toml))
    monkeypatch.setenv("TIERQ_USER_LIMITS__FREE", "1")
    monkeypatch.setattr(Settings, "model_config", {**Settings.model_config, "toml_file": toml})
    s = Settings()
    assert s.dispatch_reconcile_s == 3.5
    assert s.lease_ttl_s == 12
    assert s.queues[QueueId.FREE_BATCH].parallelism == 5
    assert s.queues[QueueId.FREE_BATCH].admission_depth == 7
    assert s.user_limits.paid == 9
    assert s.user_limits.free == 1  # the environment wins over the file


def test_qstash_variables_keep_upstash_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QSTASH_URL", "https://qstash.example")
    monkeypatch.setenv("QSTASH_TOKEN", "tok")
    s = Settings()
    assert s.qstash_url == "https://qstash.example"
    assert s.qstash_token == "tok"


def test_dev_defaults_only_when_asked() -> None:
    s = Settings()
    assert DEV_PAID_KEY not in s.api_keys
    dev = s.with_dev_defaults()
    assert dev.api_keys[DEV_PAID_KEY].plan == "paid"
    assert dev.admin_token
    assert set(s.missing_production_secrets()) >= {"TIERQ_API_KEYS", "TIERQ_ADMIN_TOKEN"}


def test_heartbeat_must_be_shorter_than_the_lease() -> None:
    with pytest.raises(ValueError, match="heartbeat_s"):
        Settings(lease_ttl_s=5, heartbeat_s=5)
