"""Usage and rate quotas: per-user quotas at submit (429 rate_limited, OpenAI's x-ratelimit-*
headers), estimates corrected by real usage, per-model quotas that hold jobs parked at dispatch,
adaptive model limits (AIMD) against the suite's own OpenAI-compatible upstream, and the usage
ledger (``/api/usage``, ``/api/admin/usage``, ``tierq usage``)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_workers import HOST, ServeProcess, serve_env

from helpers import wait_until
from openai_upstream import UPSTREAM_KEY, UPSTREAM_KEY_ENV, FakeOpenAI
from system import DEV, PAID, System
from tierq.config import (
    Adaptive,
    ModelSettings,
    Rate,
    ServiceSettings,
    TierLimits,
    TierRates,
)
from tierq.embedded_redis import free_port

pytestmark = pytest.mark.timeout(120)


def user_rpm(rpm: int) -> TierRates:
    return TierRates(paid=Rate(rpm=rpm))


def submit(system: System, prompt: str = "hi", key: str = PAID, **job: Any) -> Any:
    return system.submit(key, input={"prompt": prompt, "simulate": {"tokens": 2}}, **job)


def test_a_users_request_quota_refuses_then_recovers(make_system: Callable[..., System]) -> None:
    system = make_system(user_rates=user_rpm(12))
    accepted = [submit(system, f"q{i}") for i in range(12)]
    assert [r.status_code for r in accepted] == [202] * 12
    remaining = [int(r.headers["x-ratelimit-remaining-requests"]) for r in accepted]
    assert remaining[0] == 11
    assert remaining == sorted(remaining, reverse=True)  # each one takes one
    assert {r.headers["x-ratelimit-limit-requests"] for r in accepted} == {"12"}
    jobs_before = set(system.redis.scan_iter(system.keys.job("*")))
    refused = submit(system, "over")
    assert refused.status_code == 429, refused.text
    error = refused.json()["error"]
    assert error["code"] == "rate_limited"
    assert "12 requests per minute" in error["message"]
    retry_after = int(refused.headers["retry-after"])
    assert 1 <= retry_after <= 5  # one request back every 5 s
    assert set(system.redis.scan_iter(system.keys.job("*"))) == jobs_before  # nothing written
    # it comes back: a request's worth refills within 5 s
    again = wait_until(lambda: (r := submit(system, "later")).status_code == 202 and r, 8, 0.25)
    assert int(again.headers["x-ratelimit-remaining-requests"]) == 0


def test_rate_headers_follow_openai(make_system: Callable[..., System]) -> None:
    system = make_system(user_rates=TierRates(paid=Rate(rpm=600, tpm=90_000)))
    res = submit(system, "x" * 40)
    assert res.status_code == 202
    h = res.headers
    assert (h["x-ratelimit-limit-requests"], h["x-ratelimit-remaining-requests"]) == ("600", "599")
    assert h["x-ratelimit-limit-tokens"] == "90000"
    estimate = 10 + 12  # 40 characters of prompt, and the simulated model's 12 tokens
    assert int(h["x-ratelimit-remaining-tokens"]) == 90_000 - estimate
    assert h["x-ratelimit-reset-requests"] == "100ms"  # 1 of 600 a minute
    assert h["x-ratelimit-reset-tokens"].endswith("ms")
    # without quotas, no headers
    plain = make_system()
    assert "x-ratelimit-limit-requests" not in submit(plain).headers


def test_the_token_estimate_is_corrected_by_real_usage(make_system: Callable[..., System]) -> None:
    tpm = 6000  # 100 a second come back
    sim = ModelSettings(max_tokens=1000)  # estimate: the prompt + 1000; real: 2 tokens
    system = make_system(user_rates=TierRates(paid=Rate(tpm=tpm)), models={"sim": sim})
    first = submit(system, "abcd")
    assert first.status_code == 202
    estimate = 1 + 1000
    left_after_first = int(first.headers["x-ratelimit-remaining-tokens"])
    assert left_after_first == tpm - estimate
    t0 = time.monotonic()
    wait_until(lambda: system.job(first.json()["jobId"])["status"] == "completed")
    usage = system.job(first.json()["jobId"])["usage"]
    used = usage["prompt_tokens"] + usage["completion_tokens"]
    second = submit(system, "abcd")
    elapsed = time.monotonic() - t0
    left = int(second.headers["x-ratelimit-remaining-tokens"])
    refill = math.ceil((elapsed + 0.2) * tpm / 60)
    # without the correction: left_after_first + refill - estimate at most
    assert left > left_after_first + refill - estimate
    assert left >= min(tpm, left_after_first + (estimate - used)) - estimate - 1


def test_concurrent_submits_never_exceed_the_quota(make_system: Callable[..., System]) -> None:
    system = make_system(user_rates=user_rpm(20), user_queue_limits=TierLimits(paid=1000, free=100))
    statuses: list[int] = []
    lock = threading.Lock()
    t0 = time.monotonic()

    def one(i: int) -> None:
        code = submit(system, f"c{i}").status_code
        with lock:
            statuses.append(code)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(60)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    elapsed = time.monotonic() - t0
    assert set(statuses) <= {202, 429}
    accepted = statuses.count(202)
    assert 20 <= accepted <= 20 + math.ceil(elapsed * 20 / 60), (accepted, elapsed)


def test_two_app_instances_share_one_quota(make_system: Callable[..., System]) -> None:
    prefix = f"shared{time.monotonic_ns()}"
    a = make_system(user_rates=user_rpm(6), key_prefix=prefix)
    b = make_system(user_rates=user_rpm(6), key_prefix=prefix)
    codes = [submit(s, f"s{i}").status_code for i, s in enumerate([a, b] * 5)]
    assert codes[:6] == [202] * 6
    assert codes[6:] == [429] * 4  # one bucket in Redis for both


@pytest.mark.timeout(180)
def test_two_serve_processes_share_one_quota(
    redis_url: str, broker_url: str, tmp_path: Path
) -> None:
    """Two ``tierq serve`` processes on one Redis: 8 requests a minute between them."""
    prefix = f"quota2p{time.monotonic_ns()}"
    rates = json.dumps({"paid": {"rpm": 8}, "free": {}})
    servers = []
    try:
        for i in range(2):
            port = free_port()
            env = serve_env(redis_url, prefix, f"http://{HOST}:{port}", broker_url,
                            TIERQ_USER_RATES=rates)  # fmt: skip
            server = ServeProcess(env, port, tmp_path / f"quota{i}.log", workers=1)
            servers.append(server)
            server.start()
        job = {"service": "chat", "experience": "batch", "mode": "auto", "model": "sim",
               "input": {"prompt": "two", "simulate": {"tokens": 1}}}  # fmt: skip
        codes = []
        for i in range(12):
            url = servers[i % 2].url
            auth = {"Authorization": f"Bearer {PAID}"}
            res = httpx.post(f"{url}/api/jobs", json=job, headers=auth, timeout=30)
            codes.append(res.status_code)
        assert codes.count(202) == 8, codes  # (8 a minute: none comes back within the test)
        assert codes[8:] == [429] * 4
    finally:
        for server in servers:
            server.stop()


def test_the_front_door_sends_the_rate_headers(
    fake: FakeOpenAI, make_system: Callable[..., System], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(UPSTREAM_KEY_ENV, UPSTREAM_KEY)
    gpt = ModelSettings(provider="openai", base_url=fake.url, upstream="fake-model",
                        api_key_env=UPSTREAM_KEY_ENV, timeout_s=5)  # fmt: skip
    system = make_system(
        models={"gpt": gpt},
        services={"chat": ServiceSettings(experiences=["stream", "batch"], models=["gpt"])},
        user_rates=TierRates(paid=Rate(rpm=2, tpm=100_000)),
    )
    body = {"model": "gpt", "messages": [{"role": "user", "content": "hi [[tokens:2]]"}]}
    auth = {"Authorization": f"Bearer {PAID}"}
    for stream in (False, True):
        res = system.http.post("/v1/chat/completions", json={**body, "stream": stream},
                               headers=auth)  # fmt: skip
        assert res.status_code == 200, res.text
        assert res.headers["x-ratelimit-limit-requests"] == "2"
        assert res.headers["x-ratelimit-remaining-requests"] == ("1" if not stream else "0")
        assert res.headers["x-ratelimit-limit-tokens"] == "100000"
    refused = system.http.post("/v1/chat/completions", json=body, headers=auth)
    assert refused.status_code == 429  # in OpenAI's shape
    assert refused.json()["error"]["type"] == "rate_limit_error" or refused.json()["error"]
    assert int(refused.headers["retry-after"]) >= 1


def test_a_models_quota_holds_its_jobs_parked_and_not_others(
    make_system: Callable[..., System],
) -> None:
    limited = ModelSettings(rates=TierRates(paid=Rate(rpm=6)), tokens=2, token_latency_ms=1)
    system = make_system(
        models={"sim": limited, "sim2": ModelSettings(tokens=2, token_latency_ms=1)},
        services={"chat": ServiceSettings(experiences=["stream", "batch"], models=["sim", "sim2"])},
        dispatch_reconcile_s=0.2,
        user_limits=TierLimits(paid=50, free=2),
    )
    held = [submit(system, f"m{i}").json()["jobId"] for i in range(8)]
    wait_until(lambda: sum(system.job(j)["status"] == "completed" for j in held) == 6)
    waiting = [j for j in held if system.job(j)["status"] == "queued"]
    assert len(waiting) == 2  # the model's quota: 6 a minute
    for job_id in waiting:  # parked, with what holds them, never sent upstream (not started)
        events = system.log_events(job_id)
        assert {e["type"] for e in events} == {"queued", "waiting"}
        assert events[-1]["guard"] == "rate"
    other = submit(system, "other model", model="sim2").json()["jobId"]
    wait_until(lambda: system.job(other)["status"] == "completed")  # not blocked by them
    # one request a minute per 10 s comes back: the first held job goes then
    wait_until(lambda: system.job(waiting[0])["status"] == "completed", 15, 0.1)


def adaptive_system(
    fake: FakeOpenAI,
    make_system: Callable[..., System],
    monkeypatch: pytest.MonkeyPatch,
) -> System:
    monkeypatch.setenv(UPSTREAM_KEY_ENV, UPSTREAM_KEY)
    gpt = ModelSettings(
        provider="openai", base_url=fake.url, upstream="fake-model", api_key_env=UPSTREAM_KEY_ENV,
        timeout_s=5, limits=TierLimits(paid=8, free=2),
        adaptive=Adaptive(enabled=True, min_limit=2),
    )  # fmt: skip
    return make_system(
        models={"gpt": gpt},
        services={"chat": ServiceSettings(experiences=["stream", "batch"], models=["gpt"])},
        dispatch_reconcile_s=0.2,
        user_limits=TierLimits(paid=50, free=2),
    )


def effective(system: System) -> float | None:
    raw = system.redis.hget(f"{system.keys.sched}:aimd", system.keys.model_guard("gpt", "paid"))
    return None if raw is None else float(raw)


def test_adaptive_limit_goes_down_on_upstream_429s_and_back_up(
    fake: FakeOpenAI, make_system: Callable[..., System], monkeypatch: pytest.MonkeyPatch
) -> None:
    system = adaptive_system(fake, make_system, monkeypatch)
    assert effective(system) is None  # at the configured limit
    failing = system.submit(PAID, model="gpt", input={"prompt": "busy [[status:429:2]]"}).json()
    wait_until(lambda: system.job(failing["jobId"])["status"] == "completed", 30)
    # two 429s halved it twice (8 -> 4 -> 2), then the success added 1/2
    assert effective(system) == pytest.approx(2.5)
    assert len(fake.chat_requests("busy")) == 3  # two 429s, then the answer
    admin = {"Authorization": f"Bearer {system.settings.admin_token}"}
    guards = system.http.get("/api/admin/guards", headers=admin).json()["models"]
    [row] = [g for g in guards if (g["modelId"], g["tier"]) == ("gpt", "paid")]
    assert (row["limit"], row["effectiveLimit"]) == (8, 2)
    wait_until(
        lambda: system.metric("tierq_model_effective_limit", '{model="gpt",tier="paid"}') == 2
    )
    # successes raise it back by 1/limit each, to the configured 8 (then nothing is kept)
    for i in range(40):
        job = system.submit(PAID, model="gpt", input={"prompt": f"ok {i}"}).json()
        wait_until(lambda j=job["jobId"]: system.job(j)["status"] == "completed")
        if effective(system) is None:
            break
    assert effective(system) is None
    wait_until(
        lambda: system.metric("tierq_model_effective_limit", '{model="gpt",tier="paid"}') == 8
    )


def test_adaptive_limit_slows_down_when_the_upstreams_quota_runs_low(
    fake: FakeOpenAI, make_system: Callable[..., System], monkeypatch: pytest.MonkeyPatch
) -> None:
    system = adaptive_system(fake, make_system, monkeypatch)
    job = system.submit(PAID, model="gpt", input={"prompt": "low [[ratelimit:2/100]]"}).json()
    wait_until(lambda: system.job(job["jobId"])["status"] == "completed")
    assert effective(system) == pytest.approx(8 * 0.8)
    plenty = system.submit(PAID, model="gpt", input={"prompt": "fine [[ratelimit:90/100]]"})
    wait_until(lambda: system.job(plenty.json()["jobId"])["status"] == "completed")
    assert effective(system) == pytest.approx(8 * 0.8 + 1 / (8 * 0.8))


def test_ledger_totals_equal_the_jobs_usage(make_system: Callable[..., System]) -> None:
    system = make_system(user_limits=TierLimits(paid=50, free=2))
    ok = [submit(system, f"ledger {i} " * (i + 1)).json()["jobId"] for i in range(5)]
    failed = system.submit(PAID, input={"prompt": "no", "simulate": {"fail": "fatal"}}).json()
    every = [*ok, failed["jobId"]]
    wait_until(lambda: all(system.job(j)["status"] in ("completed", "failed") for j in every))
    usages = [system.job(j).get("usage") or {} for j in ok]
    prompt = sum(u["prompt_tokens"] for u in usages)
    completion = sum(u["completion_tokens"] for u in usages)

    def own() -> dict[str, Any]:
        res = system.http.get("/api/usage", headers={"Authorization": f"Bearer {PAID}"})
        assert res.status_code == 200, res.text
        data: dict[str, Any] = res.json()
        return data

    data = wait_until(lambda: (d := own())["total"]["jobs"] == 6 and d)
    assert data["userId"] == "dev-paid"
    total = data["total"]
    assert (total["promptTokens"], total["completionTokens"]) == (prompt, completion)
    assert total["failures"] == 1
    assert total["runSeconds"] >= 0
    [row] = data["rows"]
    assert (row["modelId"], row["jobs"]) == ("sim", 6)
    # the day's hash is forgotten after the retention (its expiry set once, not per job)
    [day] = system.redis.keys(f"{system.keys.prefix}:usage:*")
    ttl_days = system.redis.pttl(day) / 86_400_000
    assert (
        system.settings.usage_retention_days < ttl_days <= system.settings.usage_retention_days + 1
    )
    # the admin view, filtered; by month
    admin = {"Authorization": f"Bearer {system.settings.admin_token}"}
    res = system.http.get(
        "/api/admin/usage", params={"user": "dev-paid", "model": "sim", "by": "month"},
        headers=admin,
    )  # fmt: skip
    assert res.status_code == 200, res.text
    [month] = res.json()["rows"]
    assert month["period"] == data["rows"][0]["period"][:7]
    assert (month["jobs"], month["promptTokens"]) == (6, prompt)
    nobody = system.http.get("/api/admin/usage", params={"user": "nobody"}, headers=admin).json()
    assert nobody["rows"] == []
    assert nobody["total"]["jobs"] == 0
    # the CLI reads the same
    out = subprocess.run(
        [sys.executable, "-m", "tierq", "usage", "--json", "--url", system.app.url,
         "--token", str(system.settings.admin_token), "--user", "dev-paid"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert json.loads(out.stdout)["total"]["completionTokens"] == completion
    # Prometheus has the tokens by model and tier (not by user)
    metric = system.metric(
        "tierq_usage_tokens_total", '{kind="completion",model="sim",tier="paid"}'
    )
    assert metric == completion


def test_usage_requests_are_checked(system: System) -> None:
    auth = {"Authorization": f"Bearer {PAID}"}
    for params in ({"from": "2026-13-01"}, {"from": "2026-12-02", "to": "2026-12-01"},
                   {"from": "2024-01-01", "to": "2026-01-01"}, {"by": "year"}):  # fmt: skip
        res = system.http.get("/api/usage", params=params, headers=auth)
        assert 400 <= res.status_code < 500, (params, res.text)
        assert res.json()["error"]["code"]
    assert system.http.get("/api/usage").status_code == 401
    assert system.http.get("/api/admin/usage", headers=auth).status_code == 403
    assert DEV.token  # (the dev QStash token is not an admin token either)
