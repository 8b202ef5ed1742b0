"""Gradual rollout from the per-tier routes to the unified ones, and back: ``unified_share``
picks each job's delivery route by its id; the ``redirect`` legacy mode answers 308 to the
unified route, which then accepts the delivery signed for the legacy one."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from pydantic import ValidationError
from qstash import QStash
from test_worker_routes import (
    BATCH_ROUTE,
    LEGACY_ROUTE,
    STREAM_ROUTE,
    assert_error,
    deliver,
    paused_delivery,
    signed_headers,
    snapshot,
)

from helpers import wait_until
from system import DEV, PAID, System
from tierq.config import ModelSettings, Settings, TierLimits
from tierq.queues import delivery_path, legacy_path, unified_bucket, worker_path

pytestmark = pytest.mark.timeout(120)


def delivery_urls(system: System, count: int) -> dict[str, str]:
    """Submit ``count`` streamed jobs while their queue is paused, and read where QStash will
    deliver each: job id → path."""
    client = QStash(DEV.token, base_url=system.broker.url)
    base = system.settings.public_url.rstrip("/")
    try:
        client.queue.pause("q_paid_stream")
        urls: dict[str, str] = {}
        for i in range(count):
            res = system.submit(PAID, input={"prompt": f"r{i}", "simulate": {"tokens": 2}})
            assert res.status_code == 202, res.text
            job_id = res.json()["jobId"]
            message_id = system.redis.hget(system.keys.job(job_id), "messageId")
            assert message_id is not None
            url = client.message.get(message_id.decode()).url
            assert url.startswith(base)
            urls[job_id] = url[len(base) :]
        client.queue.resume("q_paid_stream")
    finally:
        client.http._client.close()  # type: ignore[attr-defined]
    return urls


def test_share_zero_sends_every_delivery_to_its_legacy_route(
    make_system: Callable[..., System],
) -> None:
    system = make_system(unified_share=0)
    urls = delivery_urls(system, 3)
    assert set(urls.values()) == {legacy_path("paid", "stream", "chat")}
    for job_id in urls:  # served there (legacy_routes = "forward")
        wait_until(lambda j=job_id: system.job(j)["status"] == "completed")


def test_share_splits_jobs_by_id_and_both_routes_complete(
    make_system: Callable[..., System],
) -> None:
    limits = TierLimits(paid=16, free=2)  # 16 jobs dispatched at once (the queue's parallelism)
    system = make_system(
        unified_share=50, user_limits=limits, models={"sim": ModelSettings(limits=limits)}
    )
    urls = delivery_urls(system, 16)
    for job_id, path in urls.items():
        assert path == delivery_path(job_id, "paid", "stream", "chat", 50)
        unified = unified_bucket(job_id) < 50
        assert path == (worker_path("stream", "chat") if unified else LEGACY_ROUTE)
    assert len(set(urls.values())) == 2, urls  # 16 random ids all on one side: p = 3e-5
    for job_id in urls:
        wait_until(lambda j=job_id: system.job(j)["status"] == "completed")


def test_share_100_is_every_job_on_the_unified_routes(make_system: Callable[..., System]) -> None:
    system = make_system()  # the default
    assert set(delivery_urls(system, 3).values()) == {STREAM_ROUTE}


def test_bucket_is_stable_and_spread() -> None:
    ids = [f"job_{i}" for i in range(2000)]
    assert [unified_bucket(i) for i in ids] == [unified_bucket(i) for i in ids]
    under = sum(unified_bucket(i) < 30 for i in ids)
    assert 0.25 < under / len(ids) < 0.35
    # raising the share only moves jobs to the unified routes, never back
    for job_id in ids[:200]:
        paths = [delivery_path(job_id, "free", "batch", "chat", s) for s in range(0, 101, 10)]
        first_unified = next((k for k, p in enumerate(paths) if p == BATCH_ROUTE), len(paths))
        assert all(p == BATCH_ROUTE for p in paths[first_unified:])


def test_a_share_below_100_needs_forwarding_legacy_routes() -> None:
    for mode in ("redirect", "hint", "off"):
        with pytest.raises(ValidationError, match="legacy_routes must be"):
            Settings(unified_share=90, legacy_routes=mode)
    assert Settings(unified_share=90, legacy_routes="forward").unified_share == 90
    for bad in (-1, 101):
        with pytest.raises(ValidationError):
            Settings(unified_share=bad)


def test_redirect_mode_answers_308_and_the_unified_route_takes_the_delivery(
    make_system: Callable[..., System],
) -> None:
    system = make_system(legacy_routes="redirect", local_start=False)
    d = paused_delivery(system, input={"prompt": "x", "simulate": {"tokens": 2}})
    before = snapshot(system, d.job_id)
    legacy_signed = signed_headers(system, LEGACY_ROUTE, d.body, d.message_id)
    res = deliver(system, LEGACY_ROUTE, d.body, legacy_signed)
    error = assert_error(res, 308, "route_moved")
    assert res.headers["location"] == STREAM_ROUTE
    assert STREAM_ROUTE in error["message"]
    assert snapshot(system, d.job_id) == before  # nothing ran on the legacy route
    # the caller follows it with the same request: signed for the legacy URL, accepted here
    res = deliver(system, res.headers["location"], d.body, legacy_signed)
    assert res.status_code == 200, res.text
    assert system.job(d.job_id)["status"] == "completed"


def test_redirect_mode_checks_signatures_on_both_routes(make_system: Callable[..., System]) -> None:
    system = make_system(legacy_routes="redirect", local_start=False)
    d = paused_delivery(system)
    before = snapshot(system, d.job_id)
    other_kind = signed_headers(system, "/api/worker/paid/batch/chat", d.body, d.message_id)
    tampered = signed_headers(system, LEGACY_ROUTE, b"{}", d.message_id)
    assert_error(deliver(system, LEGACY_ROUTE, d.body, tampered), 401, "bad_signature")
    # a legacy route of the other kind does not lead to this unified route
    assert_error(deliver(system, STREAM_ROUTE, d.body, other_kind), 401, "bad_signature")
    assert_error(deliver(system, STREAM_ROUTE, d.body, tampered), 401, "bad_signature")
    assert snapshot(system, d.job_id) == before
    batch_signed = signed_headers(system, LEGACY_ROUTE, d.body, d.message_id)
    assert_error(deliver(system, BATCH_ROUTE, d.body, batch_signed), 401, "bad_signature")


def test_forward_mode_does_not_take_legacy_signatures_on_unified_routes(
    make_system: Callable[..., System],
) -> None:
    system = make_system(legacy_routes="forward", local_start=False)
    d = paused_delivery(system)
    before = snapshot(system, d.job_id)
    legacy_signed = signed_headers(system, LEGACY_ROUTE, d.body, d.message_id)
    assert_error(deliver(system, STREAM_ROUTE, d.body, legacy_signed), 401, "bad_signature")
    assert snapshot(system, d.job_id) == before
