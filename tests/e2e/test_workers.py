"""``tierq serve --workers N``: N app processes on one port under one parent.

Real processes only: ``tierq serve`` as a subprocess with production-style settings, the broker
(in this process) and the suite's Redis. Every wait is on a condition with a deadline."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from qstash import QStash

from helpers import clean_env, tierq_dev, wait_until
from system import DEV, FREE, PAID
from tierq.embedded_redis import free_port
from tierq.keys import AppKeys

HOST = "127.0.0.1"
ADMIN = "workers-admin-token"
EVENTS_SECRET = "workers-events-secret"
USERS = {PAID: ("w-paid", "paid"), FREE: ("w-free", "free")}
TERMINAL = {"completed", "failed", "cancelled"}
START_S = 60.0
STOP_S = 45.0  # the drain (shutdown_grace_s, 10 here) and the app's shutdown, with room


def serve_env(redis_url: str, prefix: str, public_url: str, qstash_url: str,
              **extra: str) -> dict[str, str]:  # fmt: skip
    """``tierq serve``'s environment: production-style secrets, the broker's dev account."""
    keys = {key: {"id": user, "plan": plan} for key, (user, plan) in USERS.items()}
    return {
        **clean_env(),
        "TIERQ_REDIS_URL": redis_url,
        "TIERQ_KEY_PREFIX": prefix,
        "TIERQ_PUBLIC_URL": public_url,
        "TIERQ_API_KEYS": json.dumps(keys),
        "TIERQ_ADMIN_TOKEN": ADMIN,
        "TIERQ_EVENTS_SECRET": EVENTS_SECRET,
        "TIERQ_SHUTDOWN_GRACE_S": "10",
        "TIERQ_QSTASH_RETRY_DELAY": "200",
        "QSTASH_URL": qstash_url,
        "QSTASH_TOKEN": DEV.token,
        "QSTASH_CURRENT_SIGNING_KEY": DEV.current_key,
        "QSTASH_NEXT_SIGNING_KEY": DEV.next_key,
        **extra,
    }


def secrets_of(env: dict[str, str]) -> list[str]:
    return [ADMIN, EVENTS_SECRET, PAID, FREE, env["QSTASH_TOKEN"],
            env["QSTASH_CURRENT_SIGNING_KEY"], env["QSTASH_NEXT_SIGNING_KEY"]]  # fmt: skip


def children_of(pid: int) -> set[int]:
    """Live processes whose parent is ``pid`` (from /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((HOST, port)) == 0


def answering_pid(url: str, path: str = "/healthz") -> int | None:
    """The pid that answers ``path`` on a fresh connection (so the kernel picks a process)."""
    try:
        res = httpx.get(url + path, timeout=5)
    except httpx.HTTPError:
        return None
    return int(res.json()["pid"]) if res.status_code == 200 else None


def answering_pids(url: str, expected: set[int], timeout: float = 30) -> set[int]:
    """Ask on fresh connections until every pid of ``expected`` answered; all pids that did."""
    seen: set[int] = set()

    def all_seen() -> bool:
        pid = answering_pid(url)
        if pid is not None:
            seen.add(pid)
        return expected <= seen

    wait_until(all_seen, timeout=timeout)
    return seen


class ServeProcess:
    """``tierq serve`` in a subprocess (``workers`` processes on ``port``), logging to a file."""

    def __init__(self, env: dict[str, str], port: int, log: Path, workers: int = 2) -> None:
        self.env, self.port, self.log, self.workers = env, port, log, workers
        self.url = f"http://{HOST}:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def spawn(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tierq", "serve", "--host", HOST, "--port", str(self.port),
                 "--workers", str(self.workers)],
                env=self.env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def start(self) -> list[int]:
        """Spawn and wait until all workers said ready; their pids."""
        self.spawn()
        if self.workers == 1:
            wait_until(lambda: self._exited() or answering_pid(self.url), timeout=START_S)
            return [self.pid]
        ready = wait_until(lambda: self._exited() or self.lines("serve.ready"), timeout=START_S)
        pids: list[int] = ready[-1]["worker_pids"]
        return pids

    def _exited(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"tierq serve exited: {self.text()[-3000:]}")
        return False

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def lines(self, event: str | None = None) -> list[dict[str, Any]]:
        """The JSON log lines (uvicorn's own plain lines left out), of ``event`` if given."""
        out = []
        for line in self.text().splitlines():
            if line.startswith("{"):
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if event is None or entry.get("event") == event:
                    out.append(entry)
        return out

    def started_jobs(self) -> dict[str, int | None]:
        """Job id → the pid (``None`` when one process serves) of each ``started`` logged."""
        return {
            e["job_id"]: e.get("pid") for e in self.lines("job.event") if e.get("type") == "started"
        }

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float = STOP_S) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        """Whatever happened: nothing of this server is left running."""
        if self.proc is None:
            return
        kids = children_of(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=STOP_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in kids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def submit(url: str, key: str = PAID, **simulate: Any) -> dict[str, Any]:
    job = {"service": "chat", "experience": "stream", "mode": "auto", "model": "sim",
           "input": {"prompt": "workers", "simulate": simulate}}  # fmt: skip
    res = httpx.post(f"{url}/api/jobs", json=job, headers={"Authorization": f"Bearer {key}"},
                     timeout=30)  # fmt: skip
    assert res.status_code == 202, res.text
    reply: dict[str, Any] = res.json()
    return reply


def iter_sse(url: str, job: dict[str, Any],
             last_event_id: str | None = None) -> Iterator[tuple[str, dict[str, Any]]]:  # fmt: skip
    """(entry id, event) of the job's SSE stream from ``url``, as they arrive, to its end."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    stream_url = f"{url}{job['eventsUrl']}?token={job['eventsToken']}"
    with httpx.stream("GET", stream_url, headers=headers, timeout=30) as res:
        assert res.status_code == 200, res.read()
        entry_id = ""
        for line in res.iter_lines():
            if line.startswith("id:"):
                entry_id = line[3:].strip()
            elif line.startswith("data:"):
                yield entry_id, json.loads(line[5:])


def sse(url: str, job: dict[str, Any],
        last_event_id: str | None = None) -> list[tuple[str, dict[str, Any]]]:  # fmt: skip
    return list(iter_sse(url, job, last_event_id))


def log_events(client: redis.Redis, keys: AppKeys, job_id: str) -> list[dict[str, Any]]:
    return [json.loads(f[b"e"]) for _, f in client.xrange(keys.job_events(job_id))]


def ran_once(events: list[dict[str, Any]]) -> bool:
    """One run, one terminal event (completed), seq dense from 1."""
    kinds = [e["type"] for e in events]
    return (
        [e["seq"] for e in events] == list(range(1, len(events) + 1))
        and kinds.count("started") == 1
        and sum(k in TERMINAL for k in kinds) == 1
        and kinds[-1] == "completed"
    )


@pytest.fixture
def redis_sync(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


_runs = iter(range(1_000_000))


@pytest.fixture
def make_serve(redis_url: str, broker_url: str, tmp_path: Path) -> Iterator[Any]:
    """``make(workers=2, **env)``: a ``tierq serve`` on a free port, its own key prefix."""
    started: list[ServeProcess] = []

    def make(workers: int = 2, **extra: str) -> ServeProcess:
        n = next(_runs)
        port = free_port()
        prefix = f"wk{os.getpid()}x{n}"
        env = serve_env(redis_url, prefix, f"http://{HOST}:{port}", broker_url, **extra)
        server = ServeProcess(env, port, tmp_path / f"serve{n}.log", workers)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_workers_share_one_port_run_jobs_and_stop_cleanly(
    make_serve: Any, redis_sync: redis.Redis, stop_signal: signal.Signals
) -> None:
    server: ServeProcess = make_serve(workers=2)
    pids = server.start()
    assert len(set(pids)) == 2
    assert children_of(server.pid) == set(pids)  # the parent's own children, nothing else
    # the kernel spreads fresh connections over both; each process says which it is
    assert answering_pids(server.url, set(pids)) == set(pids)
    ready_pids: set[int] = set()

    def both_ready() -> bool:
        res = httpx.get(f"{server.url}/readyz", timeout=10)
        assert res.status_code == 200, res.text
        assert res.json()["ready"] is True
        ready_pids.add(res.json()["pid"])
        return ready_pids == set(pids)

    wait_until(both_ready, timeout=30)

    # the six queues were synced by both processes at once: present, as configured
    admin = {"Authorization": f"Bearer {ADMIN}"}
    queues = httpx.get(f"{server.url}/api/admin/queues", headers=admin, timeout=30).json()
    parallelism = {q["queueId"]: q["parallelism"] for q in queues["queues"]}
    assert parallelism == {"q_paid_stream": 16, "q_free_stream": 4, "q_paid_batch": 8,
                           "q_free_batch": 2, "q_paid_vision": 4, "q_free_vision": 1}  # fmt: skip

    jobs = [submit(server.url, PAID if i % 2 else FREE, tokens=3) for i in range(12)]
    for job in jobs:  # each stream from whichever process the connection reached
        events = [e for _, e in sse(server.url, job)]
        assert events[0]["type"] == "queued"
        assert events[-1]["type"] == "completed", events
    keys = AppKeys(server.env["TIERQ_KEY_PREFIX"])
    for job in jobs:
        assert ran_once(log_events(redis_sync, keys, job["jobId"]))
    runners = server.started_jobs()
    assert set(runners) == {job["jobId"] for job in jobs}
    assert set(runners.values()) <= set(pids)
    # every line of a child says which worker wrote it
    workers = {(e.get("worker"), e.get("pid")) for e in server.lines("job.event")}
    assert workers <= {(0, pids[0]), (1, pids[1])}

    server.signal(stop_signal)
    assert server.wait() == 0, server.text()[-3000:]
    wait_until(lambda: not any(alive(pid) for pid in pids), timeout=10)
    assert not listening(server.port)
    stopped = {e["worker_pid"]: e["exit"] for e in server.lines("serve.worker_stopped")}
    assert stopped == dict.fromkeys(pids, "exit code 0")
    text = server.text()
    for secret in secrets_of(server.env):
        assert secret not in text, f"secret in the logs: {secret[:6]}…"


@pytest.mark.timeout(180)
def test_runs_in_flight_finish_before_the_workers_exit(
    make_serve: Any, redis_sync: redis.Redis
) -> None:
    server: ServeProcess = make_serve(workers=2)
    server.start()
    # the process that ran it drained: the run ended normally before it exited
    stop_while_running(server, redis_sync, tokens=20)  # about 2 s of tokens


def stop_while_running(server: ServeProcess, redis_sync: redis.Redis, tokens: int) -> str:
    """Submit a job of ``tokens`` tokens 100 ms apart, SIGTERM the server once it runs, and
    check the run completed, once, before the server exited 0. Returns the job's record key."""
    keys = AppKeys(server.env["TIERQ_KEY_PREFIX"])
    job = submit(server.url, tokens=tokens, token_latency_ms=100)
    state = keys.job(job["jobId"])
    wait_until(lambda: redis_sync.hget(state, "status") == b"running", timeout=30)
    server.signal(signal.SIGTERM)
    assert server.wait() == 0, server.text()[-3000:]
    assert redis_sync.hget(state, "status") == b"completed"
    assert ran_once(log_events(redis_sync, keys, job["jobId"]))
    return state


def test_a_local_run_finishes_before_its_process_exits_though_no_delivery_waits_for_it(
    make_serve: Any, redis_sync: redis.Redis, broker_url: str
) -> None:
    """A job started where it was dispatched, its QStash delivery held (the broker's queue
    paused behind tierq's back): no request is in flight for it, yet the stopping process lets
    the run finish within its grace, as it would a delivery's."""
    server: ServeProcess = make_serve(workers=1)
    server.start()
    qstash = QStash(DEV.token, base_url=broker_url)
    qstash.queue.pause("q_paid_stream")
    try:
        state = stop_while_running(server, redis_sync, tokens=10)  # about 1 s of tokens
        message_id = redis_sync.hget(state, "messageId")
        assert message_id is not None
        qstash.message.cancel(message_id.decode())  # its delivery has nowhere to go now
    finally:
        qstash.queue.resume("q_paid_stream")
        qstash.http._client.close()  # type: ignore[attr-defined]


@pytest.mark.timeout(180)
def test_what_outlasts_the_grace_is_cut_and_the_workers_still_exit_0(
    make_serve: Any, redis_sync: redis.Redis
) -> None:
    server: ServeProcess = make_serve(workers=2, TIERQ_SHUTDOWN_GRACE_S="1")
    pids = server.start()
    keys = AppKeys(server.env["TIERQ_KEY_PREFIX"])
    job = submit(server.url, tokens=300, token_latency_ms=100)  # 30 s: longer than the grace
    wait_until(lambda: redis_sync.hget(keys.job(job["jobId"]), "status") == b"running",
               timeout=30)  # fmt: skip
    received: list[dict[str, Any]] = []

    def follow() -> None:
        for _, event in iter_sse(server.url, job):
            received.append(event)
            if event["type"] == "delta" and len(received) == 3:
                server.signal(signal.SIGTERM)

    # an SSE stream open at the signal: cut after the grace (a client resumes elsewhere)
    with pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"):
        follow()
    assert all(event["type"] not in TERMINAL for event in received)
    assert server.wait(timeout=STOP_S) == 0, server.text()[-3000:]
    assert not any(alive(pid) for pid in pids)
    assert "timeout graceful shutdown exceeded" in server.text()


@pytest.mark.timeout(180)
def test_a_worker_that_dies_is_restarted(make_serve: Any, redis_sync: redis.Redis) -> None:
    server: ServeProcess = make_serve(workers=2)
    first, second = server.start()
    os.kill(first, signal.SIGKILL)
    restarted = wait_until(lambda: server.lines("serve.worker_restarted"), timeout=30)
    assert restarted[0]["worker"] == 0
    new = restarted[0]["worker_pid"]
    assert new not in (first, second)
    wait_until(lambda: any(e["worker_pid"] == new for e in server.lines("serve.worker_ready")),
               timeout=START_S)  # fmt: skip
    assert children_of(server.pid) == {new, second}
    exited = server.lines("serve.worker_exited")
    assert [(e["worker_pid"], e["exit"]) for e in exited] == [(first, "signal SIGKILL")]
    assert answering_pids(server.url, {new, second}) == {new, second}
    job = submit(server.url, tokens=2)
    assert [e for _, e in sse(server.url, job)][-1]["type"] == "completed"
    server.signal(signal.SIGTERM)
    assert server.wait() == 0, server.text()[-3000:]
    assert not any(alive(pid) for pid in (new, second))


@pytest.mark.timeout(180)
def test_workers_die_with_their_parent(make_serve: Any) -> None:
    server: ServeProcess = make_serve(workers=2)
    pids = server.start()
    server.signal(signal.SIGKILL)  # no chance to stop anything itself
    server.wait()
    # the kernel tells each child (PR_SET_PDEATHSIG): each stops; none is left serving
    wait_until(lambda: not any(alive(pid) for pid in pids), timeout=STOP_S)
    wait_until(lambda: not listening(server.port), timeout=10)


@pytest.mark.timeout(180)
def test_a_worker_that_cannot_start_stops_them_all(make_serve: Any) -> None:
    nowhere = f"redis://{HOST}:{free_port()}/0"  # nothing listens there
    server: ServeProcess = make_serve(workers=2, TIERQ_REDIS_URL=nowhere,
                                      TIERQ_REDIS_SOCKET_TIMEOUT_S="1")  # fmt: skip
    server.spawn()
    assert server.wait(timeout=120) == 1, server.text()[-3000:]
    assert server.lines("serve.worker_failed_to_start")
    assert not server.lines("serve.ready")
    pids = {e["worker_pid"] for e in server.lines("serve.worker_started")}
    assert len(pids) == 2
    assert not any(alive(pid) for pid in pids)


@pytest.mark.timeout(60)
def test_a_port_in_use_fails_at_once(make_serve: Any) -> None:
    server: ServeProcess = make_serve(workers=2)
    with socket.socket() as taken:
        taken.bind((HOST, server.port))
        taken.listen()
        server.spawn()
        assert server.wait(timeout=30) == 1
    [failed] = server.lines("serve.bind_failed")
    assert failed["port"] == server.port
    assert not server.lines("serve.worker_started")


@pytest.mark.timeout(180)
def test_tierq_dev_with_workers(tmp_path: Path) -> None:
    """``tierq dev --workers 2``: Redis and the broker in the parent, the app in 2 processes."""
    with tierq_dev(tmp_path, "--workers", "2", stop_s=STOP_S) as dev:
        banner = wait_until(lambda: "app processes" in dev.text() and dev.text(),
                            timeout=START_S)  # fmt: skip
        assert f"tierq is running at http://{HOST}:{dev.port}" in banner
        pids = {int(p) for p in banner.split("(pids ")[1].split(")")[0].split(", ")}
        assert pids <= children_of(dev.proc.pid)  # (with the embedded Redis)
        url = f"http://{HOST}:{dev.port}"
        assert answering_pids(url, pids) == pids
        job = submit(url, "tq_dev_free", tokens=3)
        assert job["queueId"] == "q_free_stream"
        assert [e for _, e in sse(url, job)][-1]["type"] == "completed"
    assert dev.code == 0, dev.text()[-3000:]
    assert not any(alive(pid) for pid in pids)
    redis_pid = dev.redis_pid()
    assert redis_pid is None or not alive(redis_pid)
