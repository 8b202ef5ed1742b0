"""LocalRuns' bookkeeping: what a delivery finds for a job while its publish is in flight, while
its local run runs, and after (the run itself is stood in for: the pipeline is tested end to end
in tests/e2e/test_local_start.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tierq.dispatch import local as local_module
from tierq.dispatch.local import LocalRuns
from tierq.observability.metrics import Metrics
from tierq.worker.result import Reply, done

DATA = {"experience": "stream", "service": "chat"}


@pytest.fixture
def runs() -> tuple[LocalRuns, dict[str, asyncio.Future[Reply]]]:
    """LocalRuns whose runs end when the test says (``ends[job id]``)."""
    ends: dict[str, asyncio.Future[Reply]] = {}

    async def run(raw: bytes, *args: Any) -> Reply:
        job_id = raw.decode()
        ends[job_id] = asyncio.get_running_loop().create_future()
        return await ends[job_id]

    local = LocalRuns()
    local.bind(run, Metrics())
    return local, ends


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


def begun(local: LocalRuns, job_id: str) -> asyncio.Future[None]:
    """``job_id`` starts here as its publish is sent: what a delivery of it finds meanwhile
    (to wait for)."""
    assert local.begin(job_id, job_id, DATA)
    pending = local.find(job_id, "m1")
    assert isinstance(pending, asyncio.Future)
    assert not pending.done()
    return pending


def start(local: LocalRuns, job_id: str, message_id: str) -> None:
    """``job_id`` started here, and its publish answered ``message_id``."""
    assert local.begin(job_id, job_id, DATA)
    local.published(job_id, message_id)


async def test_a_run_starts_with_its_publish_and_a_delivery_meanwhile_waits_for_its_answer(
    runs: tuple[LocalRuns, dict[str, asyncio.Future[Reply]]],
) -> None:
    local, ends = runs
    pending = begun(local, "j1")
    assert local.started == 1
    await settle()
    assert "j1" in ends  # running before its publish answered
    local.published("j1", "m1")
    assert pending.done()
    task = local.find("j1", "m1")
    assert isinstance(task, asyncio.Task)
    assert local.find("j1", "m-other") is None  # another message of the job: not this run
    ends["j1"].set_result(Reply(200, {"status": "completed"}, ran=True))
    assert (await task).status == 200
    await settle()
    assert local.find("j1", "m1") is None  # its answer went to the delivery that waited
    assert len(local) == 0


async def test_the_run_learns_its_message_id_when_the_publish_answers(
    runs: tuple[LocalRuns, dict[str, asyncio.Future[Reply]]],
) -> None:
    local, _ = runs
    assert local.begin("j1", "j1", DATA)
    assert local.message_now("j1") == ""
    asked = asyncio.ensure_future(local.message_of("j1"))
    await settle()
    assert not asked.done()  # waits for the publish
    local.published("j1", "m1")
    assert await asked == "m1"
    assert local.message_now("j1") == "m1"
    assert await local.message_of("no-such-job") == ""


async def test_a_failed_publish_leaves_the_run_going_and_deliveries_alone(
    runs: tuple[LocalRuns, dict[str, asyncio.Future[Reply]]],
) -> None:
    local, ends = runs
    pending = begun(local, "j1")
    local.published("j1", "")
    assert pending.done()
    assert local.find("j1", "m1") is None
    assert await local.message_of("j1") == ""  # the run puts the job back itself
    await settle()
    assert "j1" in ends
    ends["j1"].set_result(Reply(200, {"status": "completed"}, ran=True))
    await settle()
    assert local.find("j1", "") is None  # an answer without a message is kept for nobody
    assert len(local) == 0


async def test_an_ended_run_keeps_its_answer_for_its_delivery_once(
    runs: tuple[LocalRuns, dict[str, asyncio.Future[Reply]]],
) -> None:
    local, ends = runs
    start(local, "j1", "m1")
    start(local, "j2", "m2")
    assert not local.begin("j1", "j1", DATA)  # published again while it runs: not a second run
    assert local.started == 2
    await settle()
    answer = Reply(489, {"error": {"code": "fatal"}}, ran=True)
    ends["j1"].set_result(answer)
    ends["j2"].set_result(done("running_elsewhere"))  # it did not run the job: nothing kept
    await settle()
    assert local.find("j1", "m-other") is None
    assert local.find("j1", "m1") is answer
    assert local.find("j1", "m1") is None  # given once
    assert local.find("j2", "m2") is None


async def test_answers_are_kept_for_a_while_and_a_bounded_number(
    runs: tuple[LocalRuns, dict[str, asyncio.Future[Reply]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    local, ends = runs
    monkeypatch.setattr(local_module, "KEEP_MAX", 2)
    for i in range(3):
        start(local, f"j{i}", f"m{i}")
    await settle()
    for i in range(3):
        ends[f"j{i}"].set_result(Reply(200, {"status": "completed"}, ran=True))
        await settle()
    assert local.find("j0", "m0") is None  # the oldest went first
    assert local.find("j2", "m2") is not None
    assert local.find("j1", "m1") is not None
    monkeypatch.setattr(local_module, "KEEP_S", 0.0)  # answers now outlive nothing
    start(local, "j3", "m3")
    await settle()
    ends["j3"].set_result(Reply(200, {"status": "completed"}, ran=True))
    await settle()
    assert local.find("j3", "m3") is None  # too old


async def test_stop_cancels_the_runs_still_going(
    runs: tuple[LocalRuns, dict[str, asyncio.Future[Reply]]],
) -> None:
    local, _ = runs
    start(local, "j1", "m1")
    task = local.find("j1", "m1")
    assert isinstance(task, asyncio.Task)
    await settle()
    await local.stop()
    assert task.cancelled()
    assert len(local) == 0
