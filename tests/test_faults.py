"""Faults against real processes: killed workers and API, restarted Redis and PostgreSQL, duplicate messages,
jobs that raise or run out of memory. Each test asserts that nothing is lost and nothing runs twice.

Leases are short (`stack.FAST_LEASES`: 4 s lease, 1 s heartbeat, re-send after 2 s). The Redis and PostgreSQL
tests stop the machine's servers (`QAA_TEST_REDIS_URL` / `QAA_TEST_DATABASE_URL`, which must be local) and
always start them again in a `finally`, as `../notes/common.md` asks; other tests running at that moment see
a few seconds of outage.

What `tests/test_worker.py` already proves is not repeated here: one SIGKILL resumes from the checkpoint (here:
three in one job), a duplicate message after the job ended is dropped (here: duplicates while it runs, on two
workers), bad input fails readably (here: out of memory, and the worker keeps its process).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from urllib.parse import urlparse

import httpx
import pytest
import redis
from stack import (
    DEFAULT_PG_URL,
    DEFAULT_REDIS_URL,
    Services,
    postgres_database,
    redis_url,
    spawn_worker,
    start_api,
    start_worker,
    truncate_store,
    unavailable,
    wait_until,
)
from test_worker import adapter_tensors, metric_steps, submit, tiny_spec, wait_status

from service import queueing
from service.spec import parse_spec
from service.store import JobStatus, Store, make_engine

pytestmark = pytest.mark.slow

JOB_TIMEOUT = 120
#: Loss and adapter tensors of a resumed run against an uninterrupted one (the trainer restores optimizer and
#: RNG state and the data order is a function of (seed, step), so on CPU they are in fact bitwise equal).
RESUME_TOLERANCE = 1e-6


def quick_spec(**training) -> dict:
    """A one-step job with no generation: for tests that need many jobs, not long ones."""
    spec = tiny_spec(steps=1, **training)
    spec["evaluation"] = {"metrics": ["bleu"], "samples": 0}
    return spec


# --- the machine's Redis and PostgreSQL, stopped and started ------------------------------------------------


def _local(url: str, what: str):
    parsed = urlparse(url.replace("postgresql+psycopg", "postgresql"))
    if parsed.hostname not in ("127.0.0.1", "localhost"):
        unavailable(f"restarting {what} needs it on this machine, not {parsed.hostname}")
    return parsed


@contextlib.contextmanager
def redis_stopped() -> Iterator[None]:
    """Shut Redis down without saving (it keeps nothing: `--save "" --appendonly no`), start it on exit."""
    parsed = _local(os.environ.get("QAA_TEST_REDIS_URL", DEFAULT_REDIS_URL), "Redis")
    port = str(parsed.port or 6379)
    if shutil.which("redis-server") is None:
        unavailable("redis-server is not installed here")
    subprocess.run(["redis-cli", "-p", port, "shutdown", "nosave"], capture_output=True, timeout=30)
    try:
        yield
    finally:
        started = subprocess.run(
            ["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "--port", port]
            + ["--save", "", "--appendonly", "no"],
            capture_output=True,
            timeout=30,
        )
        client = redis.Redis(host="127.0.0.1", port=int(port), socket_connect_timeout=1)

        def answers() -> bool:
            with contextlib.suppress(redis.RedisError):
                return client.ping()
            return False

        wait_until(answers, 30, what=f"Redis back on port {port} ({started.stderr!r})")
        client.close()


def _pg_cluster() -> list[str]:
    versions = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
    if not versions or shutil.which("pg_ctlcluster") is None:
        unavailable("no local PostgreSQL cluster to restart (pg_ctlcluster)")
    return ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main"]


@contextlib.contextmanager
def postgres_stopped() -> Iterator[None]:
    """Stop PostgreSQL (fast mode: sessions are cut, as in a crash or failover), start it on exit."""
    _local(os.environ.get("QAA_TEST_DATABASE_URL", DEFAULT_PG_URL), "PostgreSQL")
    cluster = _pg_cluster()
    subprocess.run([*cluster, "stop", "-m", "fast"], check=True, capture_output=True, timeout=60)
    try:
        yield
    finally:
        subprocess.run([*cluster, "start"], capture_output=True, timeout=60)
        wait_until(lambda: subprocess.run(["pg_isready", "-h", "127.0.0.1"]).returncode == 0, 60, interval=0.3)


# --- fixtures ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pg_url():
    with postgres_database() as url:
        yield url


@pytest.fixture
def production(pg_url, tmp_path, monkeypatch):
    """`production(**env)`: the Redis + PostgreSQL stack (emptied), active, with these extra `QAA_*` variables."""
    with contextlib.ExitStack() as cleanup:

        def make(**extra: str) -> Services:
            truncate_store(pg_url)
            services = Services.production(tmp_path, pg_url, redis_url(), **extra)
            cleanup.enter_context(services.active(monkeypatch))
            cleanup.callback(services.close)
            return services

        yield make


def worker_pid(services: Services, job_id: str) -> int:
    owner = services.store().load_job(job_id).lease_owner
    return int(owner.rsplit(":", 1)[1])


def claims(log: str, job_id: str) -> int:
    return log.count(f"job {job_id}: claimed by")


# --- workers killed -------------------------------------------------------------------------------------------


def test_three_sigkills_mid_step_lose_nothing_and_match_an_uninterrupted_run(production, tmp_path):
    services = production(QAA_MAX_ATTEMPTS="5")  # 3 kills + the finishing run
    spec = tiny_spec(steps=18, checkpoint_every=3)
    # The reference runs meanwhile on its own stack (embedded), so no worker here ever takes it.
    reference_stack = Services.embedded(tmp_path / "reference")
    with start_worker(reference_stack, name="reference"):
        reference = queueing.submit_job(reference_stack.store(), "alice", parse_spec(spec))
        workers = {p.pid: p for p in (start_worker(services, name="w0"), start_worker(services, name="w1"))}
        try:
            job = submit(services, spec)
            killed_at = []
            for n, target in enumerate((4, 8, 13), start=2):  # none on a checkpoint: steps are redone each time
                # Held by a live worker (after a kill the lease names the dead one until another claims the job;
                # on a fast machine the dead one may already have recorded the next target's steps).
                wait_until(
                    lambda t=target: (
                        max(metric_steps(services, job.id), default=0) >= t and worker_pid(services, job.id) in workers
                    ),
                    JOB_TIMEOUT,
                    interval=0.02,
                )
                holder = workers.pop(worker_pid(services, job.id))
                holder.kill()  # SIGKILL while the next step is under way
                holder.stop()  # only closes its log
                killed_at.append(max(metric_steps(services, job.id)))
                # Not waited for: the surviving worker resumes the job meanwhile, and a replacement takes seconds
                # to be ready (on a slow machine the survivor ran past every later target while the test waited).
                replacement = spawn_worker(services, name=f"w{n}")
                workers[replacement.pid] = replacement
            done = wait_status(services, job.id, "succeeded", "failed", timeout=JOB_TIMEOUT)
            reference_done = wait_status(reference_stack, reference.id, "succeeded", "failed", timeout=JOB_TIMEOUT)
        finally:
            for proc in workers.values():
                proc.stop(timeout=5)

    assert all(k < 18 for k in killed_at), killed_at
    assert (done.status, done.attempts, done.error) == (JobStatus.SUCCEEDED, 4, None)
    assert reference_done.status == JobStatus.SUCCEEDED
    assert metric_steps(services, job.id) == list(range(1, 19))  # every step once, none missing
    losses = {p["step"]: p["loss"] for p in services.store().metrics_after(job.id) if "loss" in p}
    want = {p["step"]: p["loss"] for p in reference_stack.store().metrics_after(reference.id) if "loss" in p}
    assert losses == pytest.approx(want, abs=RESUME_TOLERANCE)
    got, ref = adapter_tensors(services, job.id), adapter_tensors(reference_stack, reference.id)
    assert got.keys() == ref.keys()
    for name in ref:
        assert (got[name] - ref[name]).abs().max().item() <= RESUME_TOLERANCE, name
    reference_stack.close()


def test_a_message_delivered_three_more_times_runs_the_job_once(production):
    services = production()
    with start_worker(services, name="a") as a, start_worker(services, name="b") as b:
        job = submit(services, tiny_spec(steps=4))
        wait_until(lambda: metric_steps(services, job.id), JOB_TIMEOUT, what="the job running")
        for _ in range(3):  # a duplicate send, or Redis re-delivering after the visibility timeout
            queueing.enqueue(job.id, job.queue)
        done = wait_status(services, job.id, "succeeded", "failed")
        dropped = f"job {job.id}: not claimable"
        wait_until(lambda: (a.log() + b.log()).count(dropped) >= 3, 30, what="the duplicates dropped")
        logs = a.log() + b.log()

    assert (done.status, done.attempts) == (JobStatus.SUCCEEDED, 1)
    assert claims(logs, job.id) == 1
    assert logs.count(dropped) == 3
    assert metric_steps(services, job.id) == list(range(1, 5))


def test_an_orphan_is_re_sent_once_not_every_period_while_its_queue_is_long(production):
    """Found by `benchmarks/soak.py`: an orphan (its worker killed) behind a long queue was re-sent every
    period until its message came up, 166 copies for one job; now it is re-sent once, then waits like a
    queued job, and is sent again only if the queue drains without it (the broker lost it)."""
    from workers.reconciler import reconcile_once

    services = production()
    settings = services.settings()
    services.store()  # migrated
    now = [datetime.now(UTC)]
    store = Store(make_engine(settings.sqlalchemy_url), lease_seconds=4, clock=lambda: now[0])
    spec = parse_spec(tiny_spec())
    for _ in range(3):
        queueing.submit_job(store, "alice", spec)  # the backlog
    orphan = store.create_job("alice", spec)
    store.claim_job(orphan.id, "a-worker-that-was-killed")
    period = timedelta(seconds=max(4, settings.resend_after_seconds) + 1)  # past the lease and the spacing

    now[0] += period
    assert reconcile_once(store, settings).resent == [orphan.id]  # at once: its worker is gone
    for _ in range(5):
        now[0] += period
        assert reconcile_once(store, settings).resent == []  # its message waits behind the backlog
    assert queueing.queue_depths()["cpu"] == 4

    with queueing.celery_app().connection_for_write() as conn:
        conn.default_channel.queue_purge("cpu")  # the broker forgets (a restart without persistence)
    now[0] += period
    assert orphan.id in reconcile_once(store, settings).resent
    store.close()


def test_a_job_that_raises_or_exhausts_its_memory_fails_alone_and_the_worker_serves_on(tmp_path, monkeypatch):
    # The engine-state cap would refuse this job before it allocates (tests/test_security.py); lifted here so
    # the allocation itself runs into the memory bound.
    services = Services.embedded(tmp_path, QAA_WORKER_MEMORY_MB="3072", QAA_MAX_ENGINE_STATE_MB="100000000")
    hog_spec = tiny_spec(steps=2, batch_size=512, max_length=512)
    hog_spec["method"]["qubits"] = 16  # 2**16 amplitudes for each of ~10**5 tokens: tens of GB
    with services.active(monkeypatch), start_worker(services) as worker:
        hog = submit(services, hog_spec)
        broken = submit(services, {**tiny_spec(), "model": "builtin:nope"})
        good = submit(services, quick_spec())
        for job in (hog, broken, good):
            wait_status(services, job.id, "succeeded", "failed")
        alive = worker.popen.poll() is None
        log = worker.log()

    store = services.store()
    hog, broken, good = (store.load_job(j.id) for j in (hog, broken, good))
    assert hog.status == JobStatus.FAILED and hog.error.startswith("out of memory (bound: QAA_WORKER_MEMORY_MB=3072)")
    assert "can't allocate memory" in hog.error and "Traceback" not in hog.error
    assert broken.status == JobStatus.FAILED and "builtin:nope" in broken.error
    assert (good.status, good.attempts, metric_steps(services, good.id)) == (JobStatus.SUCCEEDED, 1, [1])
    # One worker process served all three: none was killed by the kernel or restarted.
    me = f"{socket.gethostname()}:{worker.pid}"
    assert alive and all(log.count(f"job {j.id}: claimed by {me} (attempt 1)") == 1 for j in (hog, broken, good))
    services.close()


# --- the broker and the store restarted -------------------------------------------------------------------


def test_redis_restarted_with_jobs_queued_and_running_loses_nothing(production):
    # Long enough to run through the outage: a job that ends while Redis is down cannot ack its message, and the
    # worker then hung in Celery's ack handling in CI (seen twice with 24 steps; see the session 6 note).
    steps = 80
    services = production()
    with start_worker(services) as worker:
        running = submit(services, tiny_spec(steps=steps))
        wait_until(lambda: len(metric_steps(services, running.id)) >= 2, JOB_TIMEOUT, what="the job running")
        waiting = [submit(services, quick_spec(seed=s)) for s in range(2)]
        assert queueing.queue_depths()["cpu"] == 2
        # Running when the broker goes, and still running when it is back.
        assert services.store().load_job(running.id).status == JobStatus.RUNNING
        assert len(metric_steps(services, running.id)) < steps
        broker = redis.Redis.from_url(services.broker_url)
        broker.set("qaa-test:before-restart", 1)
        with redis_stopped():
            time.sleep(1)
        assert services.store().load_job(running.id).status == JobStatus.RUNNING  # it ran through the outage
        # The broker forgot everything it held: the two queued messages and the running one's. (Its queue may
        # already hold the reconciler's re-sends, so the queue depth proves nothing here.)
        assert broker.exists("qaa-test:before-restart") == 0
        broker.close()
        for job in (running, *waiting):
            try:
                wait_status(services, job.id, "succeeded", "failed", timeout=JOB_TIMEOUT)
            except AssertionError as exc:  # show where the job waited (seen once in CI, not reproduced)
                raise AssertionError(f"{exc}; the end of the worker log:\n{worker.log()[-4000:]}") from None
        log = worker.log()

    store = services.store()
    assert (store.load_job(running.id).status, store.load_job(running.id).attempts) == (JobStatus.SUCCEEDED, 1)
    assert metric_steps(services, running.id) == list(range(1, steps + 1))
    for job in waiting:
        row = store.load_job(job.id)
        assert (row.status, row.attempts, claims(log, job.id)) == (JobStatus.SUCCEEDED, 1, 1)
        assert job.id in log.split("re-sent", 1)[1], "the reconciler re-sent what the broker forgot"
    assert metric_steps(services, waiting[0].id) == [1]


def test_postgres_restarted_readyz_503_then_recovers_and_the_worker_retries_its_writes(production):
    # A lease longer than the outage: the worker keeps the job and retries its writes instead of giving it up,
    # those of its steps and those that end it (the outage lasts until training is over).
    services = production(QAA_LEASE_SECONDS="40", QAA_HEARTBEAT_SECONDS="2")
    api, url = start_api(services)
    with api, start_worker(services) as worker:
        _, key = services.store().create_api_key("alice")
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=10)
        created = client.post("/v1/jobs", json=tiny_spec(steps=16))
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]
        wait_until(lambda: len(metric_steps(services, job_id)) >= 2, JOB_TIMEOUT, what="the job running")

        with postgres_stopped():
            down = wait_until(lambda: (r := client.get("/readyz")).status_code == 503 and r, 20)
            assert down.json()["checks"]["store"].startswith("unreachable")
            during = client.get(f"/v1/jobs/{job_id}")
            assert (during.status_code, during.headers["retry-after"]) == (503, "5"), during.text
            assert during.headers["content-type"] == "application/problem+json"
            worker.wait_for_log("metric points not written yet", 30)  # steps go on; their writes wait
            worker.wait_for_log("waits for the store", 60)  # training ended in the outage: its last writes wait

        wait_until(lambda: client.get("/readyz").status_code == 200, 30, what="/readyz back to 200")
        body = wait_until(
            lambda: (b := client.get(f"/v1/jobs/{job_id}").json())["status"] in ("succeeded", "failed") and b,
            JOB_TIMEOUT,
        )

    assert (body["status"], body["attempts"], body["error"]) == ("succeeded", 1, None)
    assert metric_steps(services, job_id) == list(range(1, 17))
    assert "Internal Server Error" not in api.log()


# --- the API killed mid-submission ----------------------------------------------------------------------------


def test_api_killed_during_submissions_leaves_whole_jobs_only(production):
    services = production(QAA_SUBMIT_RATE_PER_MINUTE="0")
    api, url = start_api(services)
    _, key = services.store().create_api_key("alice")
    acknowledged: list[str] = []
    errors: list[str] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=10) as http:
            while not stop.is_set():
                try:
                    response = http.post("/v1/jobs", json=quick_spec())
                except httpx.HTTPError as exc:
                    errors.append(type(exc).__name__)
                    return
                if response.status_code != 201:
                    errors.append(str(response.status_code))
                    return
                acknowledged.append(response.json()["id"])

    with api:
        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        wait_until(lambda: len(acknowledged) >= 4, 60, interval=0.005, what="4 submissions")
        api.kill()  # SIGKILL with requests in flight
        stop.set()
        for t in threads:
            t.join(30)

    store = services.store()
    stored = {j.id: j for j in store.list_jobs("alice", limit=500).jobs}
    assert errors, "some requests were in flight when the API died"
    assert set(acknowledged) <= set(stored), "every 201 names a stored job"
    for job in stored.values():  # whole: queued, its spec intact, nothing half-written
        assert (job.status, job.step, job.steps, job.attempts) == (JobStatus.QUEUED, 0, 1, 0)
        assert parse_spec(job.spec).model_dump(mode="json") == job.spec
    # Each stored job runs: its message was sent, or the reconciler sends it (never sent, or sent but unmarked).
    with start_worker(services):  # one worker runs them in turn: the first wait covers the whole queue
        for job_id in stored:
            wait_status(services, job_id, "succeeded", "failed", timeout=JOB_TIMEOUT + 20 * len(stored))
    assert all(store.load_job(i).status == JobStatus.SUCCEEDED for i in stored)
    assert all(metric_steps(services, i) == [1] for i in stored)


def test_a_worker_killed_during_a_circuit_step_leaves_no_session_open_after_resume(tmp_path):
    """A fake-backend job (its steps are runtime jobs in one Batch): SIGKILL of its worker mid-run, then another
    worker resumes it from its checkpoint. The resumed attempt opens one Batch and closes it; the runtime job ids
    of the attempt before the checkpoint are kept; every step is recorded once. (Local testing mode keeps no
    session on a server, so what it can show is that the run the worker owns is closed on its way out.)"""
    services = Services.embedded(tmp_path)
    spec = {
        **tiny_spec(steps=8, checkpoint_every=2),
        "method": {"kind": "qaa", "target_modules": ["q_proj"], "qubits": 3, "compress": "fixed", "layers": 1},
        "quantum": {"backend": "fake:FakeManilaV2", "shots": 512, "input_grad": "none"},
        "training": {"steps": 8, "batch_size": 1, "max_length": 8, "eval_every": 0, "checkpoint_every": 2},
        "evaluation": {"metrics": ["bleu"], "samples": 1, "max_new_tokens": 2},
    }
    first = start_worker(services, name="first")
    try:
        job = submit(services, spec)
        wait_until(lambda: max(metric_steps(services, job.id), default=0) >= 3, JOB_TIMEOUT, interval=0.02)
        first.kill()  # during step 4's circuits (nearly all of a step is spent in them)
    finally:
        first.stop()
    with start_worker(services, name="second"):
        done = wait_status(services, job.id, "succeeded", "failed", timeout=JOB_TIMEOUT)
    assert (done.status, done.attempts, done.error) == (JobStatus.SUCCEEDED, 2, None)
    assert metric_steps(services, job.id) == list(range(1, 9))
    usage = done.usage
    assert (usage["sessions_opened"], usage["sessions_closed"]) == (1, 1)
    # one runtime job per adapter and step: the first attempt's up to its last checkpoint, the second's after
    # it (steps it redid count once), then evaluation's
    assert usage["primitive_calls"] == 8 * 2
    assert len(set(usage["runtime_job_ids"])) == len(usage["runtime_job_ids"]) == 16 + usage["eval_primitive_calls"]
