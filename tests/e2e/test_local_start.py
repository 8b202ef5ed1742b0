"""Local start: the process that dispatches a job runs it at once; its QStash delivery, reaching
that process, takes the run's answer (``tierq.dispatch.local``). Real broker, real HTTP, real Redis.

The causal lever in each test is the broker's queue: paused behind tierq's back, QStash holds the
job's message, so whatever runs the job meanwhile cannot be its delivery.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from qstash import QStash

from helpers import ServerThread, wait_until
from system import DEV, PAID, System, sample
from tierq.app import create_app
from tierq.config import ModelSettings, TierLimits
from tierq.dispatch import dispatcher as dispatcher_module
from tierq.embedded_redis import free_port

QUEUE = "q_paid_stream"


@contextmanager
def qstash(system: System) -> Iterator[QStash]:
    client = QStash(DEV.token, base_url=system.broker.url)
    try:
        yield client
    finally:
        client.http._client.close()  # type: ignore[attr-defined]


def submit(system: System, simulate: dict[str, Any]) -> str:
    res = system.submit(PAID, input={"prompt": "local start", "simulate": simulate})
    assert res.status_code == 202, res.text
    job_id: str = res.json()["jobId"]
    return job_id


def types(system: System, job_id: str) -> list[str]:
    return [e["type"] for e in system.log_events(job_id)]


def message_of(system: System, job_id: str) -> str:
    """The id of the job's QStash message (recorded once published)."""
    raw = system.redis.hget(system.keys.job(job_id), "messageId")
    assert raw is not None
    return str(raw.decode())


def message_gone(client: QStash, message_id: str) -> Callable[[], bool]:
    """The broker no longer holds the message: its delivery was answered 2xx."""

    def gone() -> bool:
        try:
            client.message.get(message_id)
        except Exception:  # the SDK raises on 404
            return True
        return False

    return gone


def test_a_job_runs_where_it_was_dispatched_while_qstash_still_holds_its_message(
    make_system: Callable[..., System],
) -> None:
    system = make_system()
    rt = system.runtime
    with qstash(system) as client:
        client.queue.pause(QUEUE)  # the delivery cannot come: only a local run can run the job
        job_id = submit(system, {"tokens": 3, "token_latency_ms": 5})
        wait_until(lambda: system.job(job_id)["status"] == "completed", timeout=10)
        message_id = message_of(system, job_id)
        client.message.get(message_id)  # still held by QStash: not how the job ran
        assert rt.local.started == 1
        client.queue.resume(QUEUE)  # the delivery now finds the job completed: answered 200
        wait_until(message_gone(client, message_id), timeout=10)
    assert types(system, job_id).count("started") == 1
    assert types(system, job_id).count("completed") == 1
    assert rt.local.adopted == 1  # it came after the run ended and took the answer it left
    assert len(rt.local) == 0


def test_a_delivery_that_arrives_during_the_local_run_takes_its_answer(
    make_system: Callable[..., System],
) -> None:
    system = make_system()
    rt = system.runtime
    with qstash(system) as client:
        client.queue.pause(QUEUE)
        job_id = submit(system, {"fail": "hang"})  # runs until cancelled
        wait_until(lambda: system.job(job_id)["status"] == "running", timeout=10)
        client.queue.resume(QUEUE)
        wait_until(lambda: rt.local.waiting == 1, timeout=10)  # the delivery waits for the run
        assert types(system, job_id).count("started") == 1  # it did not start another
        res = system.http.delete(f"/api/jobs/{job_id}", headers={"Authorization": f"Bearer {PAID}"})
        assert res.status_code == 200, res.text
        wait_until(lambda: rt.local.adopted == 1, timeout=10)
        wait_until(message_gone(client, message_of(system, job_id)), timeout=10)  # answered 2xx
    assert system.job(job_id)["status"] == "cancelled"
    assert types(system, job_id).count("cancelled") == 1
    assert rt.local.waiting == 0
    assert system.metric("tierq_local_runs_total", '{event="adopted"}') == 1


def test_a_retryable_failure_of_the_local_run_is_retried_through_its_delivery(
    make_system: Callable[..., System],
) -> None:
    system = make_system()
    with qstash(system) as client:
        client.queue.pause(QUEUE)
        # the first attempt fails with an upstream 5xx after half its tokens
        job_id = submit(system, {"tokens": 4, "token_latency_ms": 5, "fail": "error",
                                 "fail_attempts": 1})  # fmt: skip
        wait_until(lambda: "failed" in types(system, job_id), timeout=10)
        assert system.job(job_id)["status"] != "completed"  # nothing ran it again yet
        client.queue.resume(QUEUE)  # its delivery (or, if it came late, QStash's retry) runs it
        wait_until(lambda: system.job(job_id)["status"] == "completed", timeout=15)
    kinds = types(system, job_id)
    assert kinds.count("started") == 2
    assert kinds.count("completed") == 1
    assert system.job(job_id)["attempts"] == 2


def test_with_local_start_off_the_job_waits_for_its_delivery(
    make_system: Callable[..., System],
) -> None:
    system = make_system(local_start=False)
    with qstash(system) as client:
        client.queue.pause(QUEUE)
        job_id = submit(system, {"tokens": 2, "token_latency_ms": 5})
        assert message_of(system, job_id)  # published
        client.queue.resume(QUEUE)
        wait_until(lambda: system.job(job_id)["status"] == "completed", timeout=10)
    assert system.runtime.local.started == 0


def test_a_delivery_that_reaches_another_process_waits_for_the_local_run(
    make_system: Callable[..., System],
) -> None:
    """Two app processes on one Redis and one broker (as replicas): A dispatches and runs the
    job, QStash delivers it to B. B does not answer 429 (a retry spent, and a long job could
    reach the DLQ while it runs): it waits for A's run, then answers as the job ended."""
    port_b = free_port()
    a = make_system(public_url=f"http://127.0.0.1:{port_b}")  # A's deliveries go to B
    b = ServerThread(create_app(a.settings), port=port_b).start()  # same Redis, keys, broker
    try:
        rt_b = b.server.config.app.state.runtime
        with qstash(a) as client:
            client.queue.pause(QUEUE)
            job_id = submit(a, {"fail": "hang"})  # runs until cancelled
            wait_until(lambda: a.job(job_id)["status"] == "running", timeout=10)
            assert a.runtime.local.started == 1
            client.queue.resume(QUEUE)
            wait_until(lambda: rt_b.local.awaiting_elsewhere == 1, timeout=10)
            res = a.http.delete(f"/api/jobs/{job_id}", headers={"Authorization": f"Bearer {PAID}"})
            assert res.status_code == 200, res.text
            wait_until(message_gone(client, message_of(a, job_id)), timeout=15)  # answered 2xx
        text = httpx.get(f"{b.url}/metrics").text
        assert sample(text, "tierq_worker_deliveries_total", '{route="unified",status="200"}') == 1
        assert sample(text, "tierq_worker_deliveries_total", '{route="unified",status="429"}') == 0
        assert rt_b.local.started == 0
        assert rt_b.local.awaiting_elsewhere == 0
        assert types(a, job_id).count("started") == 1
        assert a.job(job_id)["status"] == "cancelled"
    finally:
        b.stop()


def test_jobs_parked_behind_a_model_limit_all_run_when_slots_free(
    make_system: Callable[..., System],
) -> None:
    """No-op jobs end faster than their publish is confirmed: each release dispatches the next
    parked one, and every job runs once, also when Redis forgot the scripts meanwhile."""
    system = make_system(models={"sim": ModelSettings(limits=TierLimits(paid=2, free=2))})
    system.redis.script_flush()  # the first end of a run then meets scripts Redis forgot
    with ThreadPoolExecutor(8) as pool:  # submits in flight together, as a client's burst
        jobs = list(pool.map(lambda _: submit(system, {"tokens": 0}), range(16)))
    wait_until(lambda: all(system.job(j)["status"] == "completed" for j in jobs), timeout=20)
    for job_id in jobs:
        assert types(system, job_id).count("started") == 1


def test_a_handed_off_job_that_ends_before_its_confirm_has_its_message_id(
    make_system: Callable[..., System], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A release's publishes are confirmed a moment later, together; a job that ran in less
    than that gets its message id on its record with its own release (nothing waits for the
    deferred confirm, held back here for the whole test)."""
    monkeypatch.setattr(dispatcher_module, "CONFIRM_AFTER_S", 60.0)
    system = make_system(models={"sim": ModelSettings(limits=TierLimits(paid=1, free=1))})
    first = submit(system, {"fail": "hang"})  # holds the model's one slot until cancelled
    wait_until(lambda: system.job(first)["status"] == "running", timeout=10)
    second = submit(system, {"tokens": 0})  # parked behind it; ends at once when it runs
    cancel(system, first)  # its release dispatches the second: published, then confirmed later
    wait_until(lambda: system.job(second)["status"] == "completed", timeout=10)
    assert message_of(system, second)  # written by its release, not by the deferred confirm
    assert system.redis.zscore(system.keys.dispatching, second) is None
    assert types(system, second).count("started") == 1


def count_claims(rt: Any) -> list[str]:
    """The job ids the dispatcher's ``claim_with_state`` is called for, from now on."""
    claimed: list[str] = []
    real = rt.dispatcher.claim_with_state

    async def counted(body: Any) -> Any:
        claimed.append(body.job_id)
        return await real(body)

    rt.dispatcher.claim_with_state = counted
    return claimed


def on_app_loop(system: System, coro: Any) -> Any:
    assert system.app.loop is not None
    return asyncio.run_coroutine_threadsafe(coro, system.app.loop).result(timeout=10)


def cancel(system: System, job_id: str) -> None:
    res = system.http.delete(f"/api/jobs/{job_id}", headers={"Authorization": f"Bearer {PAID}"})
    assert res.status_code == 200, res.text


def test_a_parked_job_starts_in_the_freed_slot_without_waiting_at_a_full_admission_bound(
    make_system: Callable[..., System],
) -> None:
    """With nothing waiting at the admission bound, a local start neither reads the job nor
    claims its leases (its dispatch took them a moment ago). A job that waited parked and
    starts in the slot a release freed does the same even when the bound is full: it does
    not wait behind its user's submits (a limited slot would stay empty meanwhile)."""
    system = make_system(
        models={"sim": ModelSettings(limits=TierLimits(paid=1, free=1))},
        admission_concurrency=2,
    )
    rt = system.runtime
    claimed = count_claims(rt)
    with qstash(system) as client:
        client.queue.pause(QUEUE)  # deliveries cannot come: only local starts run the jobs
        first = submit(system, {"fail": "hang"})  # holds the model's one slot until cancelled
        wait_until(lambda: system.job(first)["status"] == "running", timeout=10)
        second = submit(system, {"tokens": 2, "token_latency_ms": 5})  # parked behind it
        assert system.job(second)["status"] == "queued"
        assert claimed == []  # the first started without a claim: nobody was in line

        async def fill() -> None:  # both places of the bound taken, as by a burst
            await rt.admission.acquire("someone")
            await rt.admission.acquire("someone")

        on_app_loop(system, fill())
        try:
            cancel(system, first)  # its release dispatches the second: it starts at once
            wait_until(lambda: system.job(second)["status"] == "completed", timeout=10)
            assert rt.admission.waiting == 0
        finally:

            async def free() -> None:
                rt.admission.release()
                rt.admission.release()

            on_app_loop(system, free())
    assert claimed == []
    assert rt.local.started == 2
    assert types(system, second).count("started") == 1


@contextmanager
def bound_full_once_published(rt: Any) -> Iterator[None]:
    """Each publish, once answered, takes the one place of the admission bound, as a burst of
    submits would (the submit's admission has given its place back by then)."""
    gateway = rt.dispatcher.gateway
    publish = gateway.publish_raw

    async def publish_then_fill(*args: Any, **kwargs: Any) -> Any:
        message_id = await publish(*args, **kwargs)
        await rt.admission.acquire("someone")
        return message_id

    gateway.publish_raw = publish_then_fill
    try:
        yield
    finally:
        gateway.publish_raw = publish


def test_a_submitted_job_starts_in_line_and_claims_when_the_admission_bound_is_full(
    make_system: Callable[..., System],
) -> None:
    """The local start of a job its submit has just published waits in its user's line at a
    full admission bound, and reads and claims there like a delivery: the line paces a
    burst's starts against its submits."""
    system = make_system(admission_concurrency=1)
    rt = system.runtime
    claimed = count_claims(rt)
    with bound_full_once_published(rt), qstash(system) as client:
        client.queue.pause(QUEUE)  # deliveries cannot come: only the local start runs it
        job = submit(system, {"tokens": 2, "token_latency_ms": 5})
        wait_until(lambda: rt.admission.waiting == 1, timeout=10)  # the start, in line
        assert system.job(job)["status"] == "queued"
        assert claimed == []
        on_app_loop(system, _release(rt))
        wait_until(lambda: system.job(job)["status"] == "completed", timeout=10)
    assert claimed == [job]
    assert rt.local.started == 1
    assert types(system, job).count("started") == 1


def test_a_submitted_batch_job_starts_at_once_when_the_admission_bound_is_full(
    make_system: Callable[..., System],
) -> None:
    """A batch job its submit has just published starts without a place at the bound and
    without reading or claiming (its dispatch took the leases): nobody streams it, so its
    start is not paced against the burst's submits."""
    system = make_system(admission_concurrency=1)
    rt = system.runtime
    claimed = count_claims(rt)
    try:
        with bound_full_once_published(rt), qstash(system) as client:
            client.queue.pause("q_paid_batch")  # only the local start can run it
            res = system.submit(
                PAID, experience="batch",
                input={"prompt": "local start", "simulate": {"tokens": 2, "token_latency_ms": 5}},
            )  # fmt: skip
            assert res.status_code == 202, res.text
            job = res.json()["jobId"]
            wait_until(lambda: system.job(job)["status"] == "completed", timeout=10)
            assert rt.admission.waiting == 0
    finally:
        on_app_loop(system, _release(rt))
    assert claimed == []
    assert rt.local.started == 1
    assert types(system, job).count("started") == 1


async def _release(rt: Any) -> None:
    rt.admission.release()


@contextmanager
def parked_behind_a_hang(
    make_system: Callable[..., System], simulate: dict[str, Any]
) -> Iterator[tuple[System, str, str]]:
    """A model with one slot, taken by a job that hangs until cancelled, and a job (``simulate``)
    parked behind it; QStash holds their messages: only local starts run them."""
    system = make_system(models={"sim": ModelSettings(limits=TierLimits(paid=1, free=1))})
    with qstash(system) as client:
        client.queue.pause(QUEUE)
        first = submit(system, {"fail": "hang"})
        wait_until(lambda: system.job(first)["status"] == "running", timeout=10)
        yield system, first, submit(system, simulate)


def test_a_local_start_that_read_nothing_does_not_run_a_job_whose_cancel_was_requested(
    make_system: Callable[..., System],
) -> None:
    with parked_behind_a_hang(make_system, {"tokens": 2, "token_latency_ms": 5}) as parked:
        system, first, second = parked
        # as a cancel leaves a job a delivery parked again (status waiting): marked, not ended
        system.redis.hset(
            system.keys.job(second), mapping={"status": "waiting", "cancelRequested": "1"}
        )
        cancel(system, first)  # its release dispatches the second: it starts here
        wait_until(lambda: system.job(second)["status"] == "cancelled", timeout=10)
    assert "started" not in types(system, second)
    assert types(system, second).count("cancelled") == 1
    assert system.slot_count(system.keys.model_guard("sim", "paid")) == 0


@contextmanager
def publishes_refused(system: System) -> Iterator[None]:
    """The app's publishes meet a closed port (a real connection refused), until the end."""
    gateway = system.runtime.gateway
    real = gateway._batch_url
    gateway._batch_url = f"http://127.0.0.1:{free_port()}/v2/batch"
    try:
        yield
    finally:
        gateway._batch_url = real


def test_a_job_whose_publish_failed_as_it_started_runs_once_and_is_forgotten(
    make_system: Callable[..., System],
) -> None:
    """A job dispatched by a release starts here as its publish goes out. The publish fails:
    the run goes on (no QStash message will bring the job), and when it ends, dispatch
    forgets the job instead of sending it out again."""
    system = make_system(models={"sim": ModelSettings(limits=TierLimits(paid=1, free=1))})
    rt = system.runtime
    first = submit(system, {"fail": "hang"})  # holds the model's one slot until cancelled
    wait_until(lambda: system.job(first)["status"] == "running", timeout=10)
    second = submit(system, {"tokens": 3, "token_latency_ms": 5})  # parked behind it
    with publishes_refused(system):
        cancel(system, first)  # its release dispatches the second; its publish is refused
        wait_until(lambda: system.job(second)["status"] == "completed", timeout=10)
    assert types(system, second).count("started") == 1
    assert system.redis.hget(system.keys.job(second), "messageId") is None  # never published
    assert system.redis.zscore(system.keys.dispatching, second) is None  # not sent again
    assert system.redis.hget(f"{system.keys.sched}:jobs", second) is None  # dispatch forgot it
    assert system.slot_count(system.keys.model_guard("sim", "paid")) == 0
    assert rt.local.started == 2
    assert system.metric("tierq_dispatch_publish_failures_total") == 1


def test_a_retryable_failure_of_a_run_whose_publish_failed_puts_the_job_back_first(
    make_system: Callable[..., System],
) -> None:
    """The same, but the run fails and may be retried: with no QStash message to retry it,
    the job goes back to the front of its line and out again, to run a second time."""
    system = make_system(models={"sim": ModelSettings(limits=TierLimits(paid=1, free=1))})
    first = submit(system, {"fail": "hang"})
    wait_until(lambda: system.job(first)["status"] == "running", timeout=10)
    second = submit(system, {"tokens": 4, "token_latency_ms": 5, "fail": "error",
                             "fail_attempts": 1})  # fmt: skip
    with publishes_refused(system):
        cancel(system, first)
        # back at the front of its line, out again at once (its slot is free), where it
        # starts here again as its publish goes out (and fails again)
        wait_until(lambda: system.job(second)["status"] == "completed", timeout=15)
    kinds = types(system, second)
    assert kinds.count("started") == 2
    assert kinds.count("completed") == 1
    assert system.job(second)["attempts"] == 2
    assert system.slot_count(system.keys.model_guard("sim", "paid")) == 0
    assert system.redis.zscore(system.keys.dispatching, second) is None
    assert system.metric("tierq_dispatch_publish_failures_total") == 2


def test_a_delivery_reaching_another_process_waits_for_a_run_whose_publish_was_pending(
    make_system: Callable[..., System],
) -> None:
    """A job dispatched by a release starts on A as its publish goes out; its record says
    ``localRun: "pending"`` until the publish answers. QStash delivers it to B: B waits for
    A's run, as for a local run of its own message, and answers as the job ended (no 429)."""
    port_b = free_port()
    a = make_system(
        public_url=f"http://127.0.0.1:{port_b}",  # A's deliveries go to B
        models={"sim": ModelSettings(limits=TierLimits(paid=1, free=1))},
    )
    b = ServerThread(create_app(a.settings), port=port_b).start()
    try:
        rt_b = b.server.config.app.state.runtime
        with qstash(a) as client:
            client.queue.pause(QUEUE)
            first = submit(a, {"fail": "hang"})
            wait_until(lambda: a.job(first)["status"] == "running", timeout=10)
            second = submit(a, {"fail": "hang"})  # parked behind it
            cancel(a, first)  # the release dispatches the second: it starts on A
            wait_until(lambda: a.job(second)["status"] == "running", timeout=10)
            # as a run that started before its publish answered has it (the answer usually
            # comes a moment after the start; here, whichever came first)
            a.redis.hset(a.keys.job(second), "localRun", "pending")
            client.queue.resume(QUEUE)
            wait_until(lambda: rt_b.local.awaiting_elsewhere == 1, timeout=10)
            cancel(a, second)
            wait_until(message_gone(client, message_of(a, second)), timeout=15)  # 2xx
        text = httpx.get(f"{b.url}/metrics").text
        assert sample(text, "tierq_worker_deliveries_total", '{route="unified",status="429"}') == 0
        assert rt_b.local.started == 0
        assert types(a, second).count("started") == 1
        assert a.job(second)["status"] == "cancelled"
    finally:
        b.stop()


@contextmanager
def starts_held(system: System) -> Iterator[tuple[Callable[[], None], list[str]]]:
    """Every ``started`` write waits until the first yielded lets them go; the list records each
    model run's first item (the job id) as the provider yields it."""
    rt = system.runtime
    held = on_app_loop(system, _event())
    loop = system.app.loop
    assert loop is not None

    def let_go() -> None:
        loop.call_soon_threadsafe(held.set)

    first_items: list[str] = []
    start, provider = rt.jobs.start, rt.providers.get("sim")
    run = provider.run

    async def held_start(*args: Any, **kwargs: Any) -> Any:
        await held.wait()
        return await start(*args, **kwargs)

    async def observed(request: Any) -> Any:
        first = True
        async for item in run(request):
            if first:
                first_items.append(request.job_id)
                first = False
            yield item

    rt.jobs.start, provider.run = held_start, observed
    try:
        yield let_go, first_items
    finally:
        rt.jobs.start, provider.run = start, run
        let_go()


async def _event() -> asyncio.Event:
    return asyncio.Event()


def test_a_handed_off_job_runs_its_model_while_its_start_is_written(
    make_system: Callable[..., System],
) -> None:
    """A job started in the slot a release freed (nothing read) runs its model as its
    ``started`` is written, not one round trip later; its text waits for that write, so the
    log still reads started, deltas, completed."""
    with parked_behind_a_hang(make_system, {"tokens": 3, "token_latency_ms": 5}) as parked:
        system, first, second = parked
        with starts_held(system) as (let_go, first_items):
            cancel(system, first)  # its release hands the slot to the second
            wait_until(lambda: second in first_items, timeout=10)  # its model runs...
            assert system.job(second)["status"] == "queued"  # ...its start not yet written
            assert types(system, second) == ["queued", "waiting"]  # nor any of its text
            let_go()
            wait_until(lambda: system.job(second)["status"] == "completed", timeout=10)
    logged = types(system, second)
    assert logged[:3] == ["queued", "waiting", "started"]
    assert "delta" in logged
    assert logged[-1] == "completed"
    assert set(logged[3:-1]) == {"delta"}


def test_a_handed_off_job_whose_start_is_refused_writes_nothing_of_its_run(
    make_system: Callable[..., System],
) -> None:
    """The model already produced text when the start is refused (its cancel was requested
    meanwhile): the run stops, none of its text is written, and the job ends cancelled once."""
    with parked_behind_a_hang(make_system, {"tokens": 50, "token_latency_ms": 5}) as parked:
        system, first, second = parked
        with starts_held(system) as (let_go, first_items):
            cancel(system, first)
            wait_until(lambda: second in first_items, timeout=10)
            system.redis.hset(system.keys.job(second), "cancelRequested", "1")
            let_go()
            wait_until(lambda: system.job(second)["status"] == "cancelled", timeout=10)
    logged = types(system, second)
    assert "started" not in logged
    assert "delta" not in logged
    assert logged.count("cancelled") == 1
    assert system.slot_count(system.keys.model_guard("sim", "paid")) == 0
