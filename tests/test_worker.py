"""Real `qaa worker` processes on both stacks: the embedded broker + SQLite, and Redis + PostgreSQL.

Leases are short here (`stack.FAST_LEASES`: 4 s lease, 1 s heartbeat, re-send after 2 s), so a killed
worker's job is picked up by another within seconds. Jobs are tiny (`builtin:tiny-llama`, a few steps).
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil
import pytest
from stack import Services, postgres_database, redis_url, start_api, start_worker, truncate_store, wait_until
from typer.testing import CliRunner

from service import queueing
from service.spec import parse_spec
from service.store import JobStatus, Store, make_engine

JOB_TIMEOUT = 120

#: Worker processes import the trainer (`workers.trainer`), which another part of issue 4 delivers.
needs_trainer = pytest.mark.skipif(
    importlib.util.find_spec("workers.trainer") is None, reason="workers.trainer is not in this checkout yet"
)


def tiny_spec(steps: int = 4, **training) -> dict:
    return {
        "model": "builtin:tiny-llama",
        "dataset": "builtin:restaurants",
        "method": {"kind": "qaa", "target_modules": ["q_proj", "v_proj"]},
        "quantum": {"backend": "exact"},
        "training": {
            "steps": steps,
            "batch_size": 2,
            "max_length": 48,
            "eval_every": 0,
            "checkpoint_every": 2,
            **training,
        },
        "evaluation": {"metrics": ["bleu"], "samples": 2, "max_new_tokens": 4},
    }


@pytest.fixture(scope="module")
def pg_url():
    with postgres_database() as url:
        yield url


@pytest.fixture(params=["embedded", "redis+postgresql"])
def services(request, tmp_path, monkeypatch):
    if request.param == "embedded":
        stack = Services.embedded(tmp_path)
    else:
        url = request.getfixturevalue("pg_url")
        truncate_store(url)
        stack = Services.production(tmp_path, url, redis_url())
    with stack.active(monkeypatch):
        yield stack
    stack.close()


def submit(services: Services, spec: dict, owner: str = "alice"):
    return queueing.submit_job(services.store(), owner, parse_spec(spec))


def wait_status(services: Services, job_id: str, *statuses: str, timeout: float = JOB_TIMEOUT):
    store = services.store()
    return wait_until(
        lambda: (job := store.load_job(job_id)).status in statuses and job, timeout, what=f"{job_id} {statuses}"
    )


def metric_steps(services: Services, job_id: str) -> list[int]:
    return [p["step"] for p in services.store().metrics_after(job_id) if "loss" in p]


@needs_trainer
@pytest.mark.slow
def test_jobs_succeed_fail_readably_and_run_once(services, tmp_path):
    store = services.store()
    bad_rows = tmp_path / "bad.jsonl"
    bad_rows.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "no completion"\n')
    dataset = store.create_dataset("alice", "bad.jsonl", rows=2, size=bad_rows.stat().st_size, path=str(bad_rows))

    with start_worker(services) as worker:
        unknown_model = submit(services, {**tiny_spec(), "model": "builtin:nope"})
        malformed = submit(services, {**tiny_spec(), "dataset": dataset.id})
        good = submit(services, tiny_spec(steps=4))
        queueing.enqueue(good.id, good.queue)  # a duplicated message

        seen = [good.status]

        def finished() -> bool:
            status = store.load_job(good.id).status
            if status != seen[-1]:
                seen.append(status)
            return status.is_terminal

        wait_until(finished, JOB_TIMEOUT, interval=0.05, what="the good job")
        worker.wait_for_log(f"job {good.id}: not claimable", 30)

    assert seen == [JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.SUCCEEDED]
    job = store.load_job(good.id)
    assert (job.attempts, job.step, job.error) == (1, 4, None)
    assert job.evaluation and "bleu" in job.evaluation
    points = store.metrics_after(good.id)
    assert [p["step"] for p in points if "loss" in p] == [1, 2, 3, 4]
    assert all(math.isfinite(p["loss"]) for p in points if "loss" in p)
    artifacts = store.list_artifacts(good.id)
    assert artifacts, "a succeeded job registers its files"
    for artifact in artifacts:
        data = Path(artifact.path).read_bytes()
        assert (artifact.size, artifact.sha256) == (len(data), hashlib.sha256(data).hexdigest())

    failed = store.load_job(unknown_model.id)
    assert failed.status == JobStatus.FAILED and "builtin:nope" in failed.error
    failed = store.load_job(malformed.id)
    assert failed.status == JobStatus.FAILED and "line 2" in failed.error, failed.error
    assert "Traceback" not in failed.error


@needs_trainer
@pytest.mark.slow
def test_cancel_lands_within_one_step_and_keeps_the_checkpoint(services):
    store = services.store()
    with start_worker(services):
        job = submit(services, tiny_spec(steps=500, checkpoint_every=2))
        wait_until(lambda: len(metric_steps(services, job.id)) >= 3, JOB_TIMEOUT, what="3 steps")
        assert store.request_cancel(job.id, "alice").status == JobStatus.CANCELLING
        at_request = max(metric_steps(services, job.id))
        done = wait_status(services, job.id, "cancelled", timeout=30)

    steps = metric_steps(services, job.id)
    assert max(steps) <= at_request + 1, (steps, at_request)
    assert steps == list(range(1, max(steps) + 1))
    assert done.error is None and done.finished_at is not None
    checkpoints = services.settings().artifacts_dir / job.id / "checkpoints"
    assert any(checkpoints.iterdir()), "the last checkpoint is kept"


@needs_trainer
@pytest.mark.slow
def test_the_reconciler_sends_a_job_whose_message_was_lost(services):
    store = services.store()
    job = store.create_job("alice", parse_spec(tiny_spec(steps=2)))  # stored, never sent
    with start_worker(services) as worker:
        done = wait_status(services, job.id, "succeeded", "failed")
        assert f"re-sent ['{job.id}']" in worker.log()
    assert (done.status, done.attempts) == (JobStatus.SUCCEEDED, 1)
    assert metric_steps(services, job.id) == [1, 2]


def adapter_tensors(services: Services, job_id: str) -> dict:
    from safetensors.torch import load_file

    artifacts = services.store().list_artifacts(job_id)
    (artifact,) = [a for a in artifacts if a.name.endswith("adapter_model.safetensors")]
    return load_file(artifact.path)


@needs_trainer
@pytest.mark.slow
def test_sigkill_mid_job_resumes_from_the_checkpoint_and_matches_an_uninterrupted_run(services):
    store = services.store()
    spec = tiny_spec(steps=12, checkpoint_every=3)
    checkpoints = services.settings().artifacts_dir
    with start_worker(services, name="doomed") as doomed:
        job = submit(services, spec)
        # Past the step-3 checkpoint, before the step-6 one.
        wait_until(lambda: max(metric_steps(services, job.id), default=0) >= 4, JOB_TIMEOUT, interval=0.02)
        doomed.kill()
    killed_at = max(metric_steps(services, job.id))
    assert killed_at < 12 and any((checkpoints / job.id / "checkpoints").iterdir())

    with start_worker(services, name="rescuer") as rescuer:
        resumed = wait_status(services, job.id, "succeeded", "failed")
        reference = submit(services, spec)
        wait_status(services, reference.id, "succeeded", "failed")
        assert f"re-sent ['{job.id}']" in rescuer.log()

    assert (resumed.status, resumed.attempts, resumed.error) == (JobStatus.SUCCEEDED, 2, None)
    assert metric_steps(services, job.id) == list(range(1, 13))  # each step once, none missing
    # Same seed, same data order, restored optimizer and RNG states: the resumed run is the same run.
    losses = {p["step"]: p["loss"] for p in store.metrics_after(job.id) if "loss" in p}
    ref_losses = {p["step"]: p["loss"] for p in store.metrics_after(reference.id) if "loss" in p}
    assert losses == pytest.approx(ref_losses, abs=1e-6)
    got, want = adapter_tensors(services, job.id), adapter_tensors(services, reference.id)
    assert got.keys() == want.keys()
    for name in want:
        assert (got[name] - want[name]).abs().max().item() <= 1e-6, name


@needs_trainer
@pytest.mark.slow
def test_prefork_children_die_with_a_killed_worker_even_mid_job(tmp_path, monkeypatch):
    services = Services.embedded(tmp_path)
    with services.active(monkeypatch), start_worker(services, concurrency=2) as worker:
        job = submit(services, tiny_spec(steps=500))
        wait_until(lambda: len(metric_steps(services, job.id)) >= 2, JOB_TIMEOUT, what="the job running")
        children = psutil.Process(worker.pid).children()
        assert len(children) == 2
        worker.kill()
        # An orphaned child would go on training (and holding the lease) for hundreds of steps.
        gone, alive = psutil.wait_procs(children, timeout=20)
    assert alive == []
    assert services.store().load_job(job.id).step < 500
    services.close()


@needs_trainer
@pytest.mark.slow
def test_a_job_submitted_over_http_runs_on_a_worker(services):
    import httpx

    api, url = start_api(services)
    with api, start_worker(services):
        _, key = services.store().create_api_key("alice")
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=10)
        created = client.post("/v1/jobs", json=tiny_spec(steps=2))
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]
        body = wait_until(
            lambda: (b := client.get(f"/v1/jobs/{job_id}").json())["status"] in ("succeeded", "failed") and b,
            JOB_TIMEOUT,
        )
        assert (body["status"], body["progress"]) == ("succeeded", {"step": 2, "steps": 2})
        assert [p["step"] for p in client.get(f"/v1/jobs/{job_id}/metrics").json()["points"]] == [1, 2]
        assert client.get("/readyz").json()["checks"] == {"store": "ok", "broker": "ok"}


def test_the_reconciler_resends_only_messages_that_are_lost(services):
    from workers.reconciler import reconcile_once

    settings = services.settings()
    services.store()  # migrated
    now = [datetime.now(UTC)]
    store = Store(make_engine(settings.sqlalchemy_url), lease_seconds=4, clock=lambda: now[0])
    spec = parse_spec(tiny_spec())
    waiting = queueing.submit_job(store, "alice", spec)  # its message sits in the cpu queue
    lost = store.create_job("alice", spec)  # stored, never sent
    orphan = store.create_job("alice", spec)
    store.claim_job(orphan.id, "a-worker-that-died")
    abandoned = store.create_job("alice", spec)
    store.claim_job(abandoned.id, "another-dead-worker")
    store.request_cancel(abandoned.id, "alice")
    now[0] += timedelta(seconds=settings.resend_after_seconds + 5)

    first = reconcile_once(store, settings)
    # A queued job waits while its queue holds messages; a dead worker's job goes out at once.
    assert (first.settled, first.resent) == (1, [orphan.id])
    assert store.load_job(abandoned.id).status == JobStatus.CANCELLED
    assert queueing.queue_depths()["cpu"] == 2

    with queueing.celery_app().connection_for_write() as conn:
        conn.default_channel.queue_purge("cpu")  # the broker forgets everything (a restart without persistence)
    # Now the queued jobs have no message; the orphan was sent moments ago and waits its turn.
    assert sorted(reconcile_once(store, settings).resent) == sorted([waiting.id, lost.id])
    assert queueing.queue_depths()["cpu"] == 2
    store.close()


def test_qaa_keys_create_list_revoke(tmp_path, monkeypatch):
    from workers.cli import app

    with Services.embedded(tmp_path).active(monkeypatch):
        runner = CliRunner()
        created = runner.invoke(app, ["keys", "create", "alice", "--label", "laptop"])
        assert created.exit_code == 0, created.output
        plaintext = created.stdout.strip().splitlines()[-1]
        assert plaintext.startswith("qaa_")
        listed = runner.invoke(app, ["keys", "list"])
        key_id, owner, prefix, label = listed.stdout.split("\t")[:4]
        assert (owner, label, prefix) == ("alice", "laptop", plaintext[:12] + "...")
        assert plaintext not in listed.stdout
        assert runner.invoke(app, ["keys", "revoke", key_id]).exit_code == 0
        again = runner.invoke(app, ["keys", "revoke", key_id])
        assert again.exit_code == 1 and f"no live key '{key_id}'" in again.output
        assert "revoked: 20" in runner.invoke(app, ["keys", "list", "--owner", "alice"]).stdout

        created = runner.invoke(app, ["keys", "create", "bob", "--expires-in", "2w"])
        assert created.exit_code == 0 and "expires 20" in created.stderr, created.output
        key_id, owner, _, _, state, created_at, expires, revoked = (
            runner.invoke(app, ["keys", "list", "--owner", "bob"]).stdout.strip().split("\t")
        )
        lifetime = datetime.fromisoformat(expires.removeprefix("expires: ")) - datetime.fromisoformat(created_at)
        assert (owner, state, revoked, lifetime) == ("bob", "live", "revoked: -", timedelta(weeks=2))
        for bad in ("0d", "soon", "-3d", "12y"):
            refused = runner.invoke(app, ["keys", "create", "bob", "--expires-in", bad])
            assert refused.exit_code == 2 and "such as 90d or 12h" in refused.output, (bad, refused.output)
        assert len(runner.invoke(app, ["keys", "list", "--owner", "bob"]).stdout.strip().splitlines()) == 1


def test_qaa_worker_rejects_unknown_queues():
    from workers.cli import app

    result = CliRunner().invoke(app, ["worker", "--queues", "cpu,tpu"])
    assert result.exit_code == 2 and "subset of cpu,gpu,qpu" in result.output
