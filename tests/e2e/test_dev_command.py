"""`tierq dev` (what `make dev` runs): one command brings up Redis, the broker and the app."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest

from helpers import tierq_dev, wait_until


@pytest.mark.timeout(120)
def test_tierq_dev_runs_a_job_end_to_end(tmp_path: Path) -> None:
    with tierq_dev(tmp_path, stop_s=20) as dev:
        banner = wait_until(lambda: "tq_dev_free" in dev.text() and dev.text(), timeout=60)
        assert f"tierq is running at http://127.0.0.1:{dev.port}" in banner
        assert "tq_dev_admin" in banner
        with httpx.Client(base_url=f"http://127.0.0.1:{dev.port}", timeout=30) as http:
            job = {"service": "chat", "experience": "stream", "mode": "auto", "model": "sim",
                   "input": {"prompt": "hello dev"}}  # fmt: skip
            res = http.post("/api/jobs", json=job, headers={"Authorization": "Bearer tq_dev_free"})
            assert res.status_code == 202, res.text
            reply = res.json()
            assert reply["queueId"] == "q_free_stream"
            url = f"{reply['eventsUrl']}?token={reply['eventsToken']}"
            with http.stream("GET", url) as stream:
                kinds = [json.loads(line[5:])["type"] for line in stream.iter_lines()
                         if line.startswith("data:")]  # fmt: skip
            assert kinds[0] == "queued"
            assert kinds[-1] == "completed"
            ready = http.get("/readyz")
            assert ready.status_code == 200, ready.text
            metrics = http.get("/metrics").text
            assert 'tierq_jobs_completed_total{queue="q_free_stream"} 1.0' in metrics
            assert "tierq_broker_deliveries_total" in metrics
    redis_pid = dev.redis_pid()
    assert redis_pid is None or not _alive(redis_pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
