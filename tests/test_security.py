"""What a key holder (or no key at all) can make the service do: worker-side files, regexes, spending, quotas,
deadlines, memory and file modes. The hostile corpus in `test_hostile_input.py` holds the one-request cases
(on SQLite and PostgreSQL); this file holds the cases that need settings, several requests or a live process.
"""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from fastapi.testclient import TestClient
from stack import Services, start_api, start_worker, wait_until
from test_api import JSONL, TINY

from service.app import create_app
from service.references import RefusedReference, resolve_dataset, resolve_model
from service.settings import Settings, get_settings
from service.spec import parse_spec
from service.store import JobStatus
from workers.tasks import run_train


@pytest.fixture
def server(tmp_path, monkeypatch):
    """`server(**settings)`: a TestClient on a fresh embedded API with these `QAA_*` settings, and alice's key."""
    clients = []

    def make(**env: str):
        for key in [k for k in os.environ if k.startswith("QAA_")]:
            monkeypatch.delenv(key)
        monkeypatch.setenv("QAA_HOME", str(tmp_path / "home"))
        for key, value in env.items():
            monkeypatch.setenv(f"QAA_{key.upper()}", str(value))
        get_settings.cache_clear()
        client = TestClient(create_app(get_settings()), raise_server_exceptions=False).__enter__()
        clients.append(client)
        _, key = client.app.state.store.create_api_key("alice")
        return client, {"Authorization": f"Bearer {key}"}

    yield make
    for client in clients:
        client.__exit__(None, None, None)
    get_settings.cache_clear()


def test_a_refused_path_reads_the_same_whether_it_exists_or_not(server, tmp_path):
    client, alice = server()
    (tmp_path / "exists.jsonl").write_text('{"prompt": "secret-row", "completion": "x"}\n')
    details = []
    for ref in (str(tmp_path / "exists.jsonl"), str(tmp_path / "missing.jsonl")):
        answer = client.post("/v1/jobs", json={**TINY, "dataset": ref}, headers=alice)
        assert answer.status_code == 422 and answer.json()["errors"][0]["path"] == "dataset"
        details.append(answer.json()["detail"])
    assert details[0] == details[1] and "secret-row" not in details[0]
    assert "POST /v1/datasets" in details[0] and "QAA_LOCAL_DATASET_DIRS" in details[0]
    model = client.post("/v1/jobs", json={**TINY, "model": str(tmp_path)}, headers=alice).json()
    assert model["errors"][0]["path"] == "model" and "QAA_LOCAL_MODEL_DIRS" in model["detail"]
    assert client.app.state.store.count_active_jobs("alice") == 0


def test_allowed_folders_admit_only_what_resolves_inside_them(tmp_path):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir(), outside.mkdir()
    (allowed / "data.jsonl").write_text("{}\n")
    (outside / "secret.jsonl").write_text("{}\n")
    (allowed / "link.jsonl").symlink_to(outside / "secret.jsonl")
    (allowed / "models").symlink_to(outside)
    settings = Settings(home=tmp_path / "home", local_dataset_dirs=[str(allowed)], local_model_dirs=str(allowed),
                        hub_models="org/model")  # fmt: skip

    assert resolve_dataset(str(allowed / "data.jsonl"), settings) == str(allowed / "data.jsonl")
    assert resolve_model(str(allowed), settings) == str(allowed)
    assert resolve_model("org/model", settings) == "org/model" and resolve_model("builtin:x", settings) == "builtin:x"
    for ref in (allowed / "link.jsonl", allowed / ".." / "outside" / "secret.jsonl", outside / "secret.jsonl"):
        with pytest.raises(RefusedReference, match="^dataset: files on the server are not read"):
            resolve_dataset(str(ref), settings)
    with pytest.raises(RefusedReference, match="^model: local paths are not accepted"):
        resolve_model(str(allowed / "models"), settings)  # a symlink to a folder outside
    with pytest.raises(RefusedReference, match="not a model this server offers.*org/model"):
        resolve_model("other/model", settings)


def test_the_worker_refuses_a_path_the_api_never_saw(tmp_path, caplog):
    """A job row written straight into the store (an older API, another tool) is checked again by the worker,
    which fails it before opening anything."""
    settings = Settings(home=tmp_path / "home")
    from service.store import Store

    store = Store.from_settings(settings, migrate=True)
    job = store.create_job("alice", parse_spec({**TINY, "dataset": "/etc/passwd"}))
    assert run_train(job.id, store, settings, "w1") == "failed"
    error = store.load_job(job.id).error
    assert error.startswith("dataset: files on the server are not read") and "root:" not in error
    assert "root:" not in caplog.text


def test_quotas_on_jobs_datasets_estimates_and_uploads(server):
    client, alice = server(max_active_jobs_per_owner=2, max_datasets_per_owner=2,
                           max_dataset_bytes_per_owner=len(JSONL) * 2 + 10, estimate_rate_per_minute=60,
                           estimate_burst=2, upload_rate_per_minute=60, upload_burst=4)  # fmt: skip
    jobs = [client.post("/v1/jobs", json=TINY, headers=alice) for _ in range(3)]
    assert [j.status_code for j in jobs] == [201, 201, 429]
    assert "QAA_MAX_ACTIVE_JOBS_PER_OWNER=2" in jobs[2].json()["detail"]
    client.post(f"/v1/jobs/{jobs[0].json()['id']}/cancel", headers=alice)  # cancelled: a slot frees up
    assert client.post("/v1/jobs", json=TINY, headers=alice).status_code == 201

    estimates = [client.post("/v1/estimate", json=TINY, headers=alice).status_code for _ in range(3)]
    assert estimates == [200, 200, 429]

    uploads = [client.post("/v1/datasets", content=JSONL, headers=alice) for _ in range(3)]
    assert [u.status_code for u in uploads] == [201, 201, 422]
    assert "QAA_MAX_DATASETS_PER_OWNER=2" in uploads[2].json()["detail"]
    first, second = (u.json()["id"] for u in uploads[:2])
    assert client.delete(f"/v1/datasets/{first}", headers=alice).status_code == 204
    big = client.post("/v1/datasets", content=JSONL * 3, headers=alice)  # count fits, bytes do not
    assert big.status_code == 422 and "QAA_MAX_DATASET_BYTES_PER_OWNER" in big.json()["detail"]
    assert client.post("/v1/datasets", content=JSONL, headers=alice).status_code == 429  # the 5th upload
    datasets_dir = client.app.state.settings.datasets_dir
    assert sorted(p.name for p in datasets_dir.iterdir()) == [f"{second}.jsonl"]  # refused uploads left nothing


def test_a_dataset_in_use_cannot_be_deleted_and_finished_artifacts_can(server, tmp_path):
    client, alice = server()
    dataset = client.post("/v1/datasets", content=JSONL, headers=alice).json()["id"]
    job = client.post("/v1/jobs", json={**TINY, "dataset": dataset}, headers=alice).json()
    busy = client.delete(f"/v1/datasets/{dataset}", headers=alice)
    assert busy.status_code == 409 and job["id"] in busy.json()["detail"]

    store = client.app.state.store
    artifact = tmp_path / "adapter.safetensors"
    artifact.write_bytes(b"x")
    store.add_artifact(job["id"], "adapter.safetensors", str(artifact), 1, "0" * 64)
    assert store.claim_job(job["id"], "w1") and store.finish_job(job["id"], "w1", "succeeded")
    assert client.delete(f"/v1/jobs/{job['id']}/artifacts", headers=alice).status_code == 204
    assert not artifact.exists() and client.get(f"/v1/jobs/{job['id']}/artifacts", headers=alice).json() == []
    assert client.delete(f"/v1/datasets/{dataset}", headers=alice).status_code == 204
    assert client.get("/v1/datasets", headers=alice).json() == []


def test_daily_ceilings_count_every_job_of_the_day(server):
    aer = {**TINY, "quantum": {"backend": "aer", "gradient": "spsa"}, "training": {"steps": 2}}
    client, alice = server()
    priced = client.post("/v1/estimate", json=aer, headers=alice).json()
    per_job = priced["circuits"] + priced["evaluation"]["circuits"]  # training and evaluation both count
    client, alice = server(max_owner_daily_circuits=per_job * 2 + per_job // 2)  # two jobs a day, not three
    answers = [client.post("/v1/jobs", json=aer, headers=alice) for _ in range(3)]
    assert [a.status_code for a in answers] == [201, 201, 429]
    assert "QAA_MAX_OWNER_DAILY_CIRCUITS" in answers[2].json()["detail"]
    day_ago = datetime.now(UTC) - timedelta(days=1)
    assert client.app.state.store.spend_since("alice", day_ago).circuits == 2 * per_job


def test_the_job_list_leaves_the_spec_out(server):
    client, alice = server()
    spec = {**TINY, "name": "x" * 200}
    job = client.post("/v1/jobs", json=spec, headers=alice).json()
    listed = client.get("/v1/jobs?limit=500", headers=alice).json()["jobs"]
    assert [j["id"] for j in listed] == [job["id"]] and "spec" not in listed[0]
    assert listed[0]["method"] == job["spec"]["method"] and listed[0]["model"] == "builtin:tiny-llama"
    assert client.get(f"/v1/jobs/{job['id']}", headers=alice).json()["spec"]["name"] == "x" * 200


def test_a_job_past_its_deadline_fails_with_that_cause(tmp_path):
    settings = Settings(home=tmp_path / "home", job_deadline_seconds=1)
    from service.store import Store

    store = Store.from_settings(settings, migrate=True)
    spec = {**TINY, "training": {"steps": 100_000, "batch_size": 1, "max_length": 16, "checkpoint_every": 0}}
    job = store.create_job("alice", parse_spec(spec))
    started = time.monotonic()
    assert run_train(job.id, store, settings, "w1") == "failed"
    done = store.load_job(job.id)
    assert done.error.startswith("the job ran past its deadline of 1 s") and "QAA_JOB_DEADLINE_SECONDS" in done.error
    assert 0 < done.step < 100_000 and time.monotonic() - started < 60


def test_workers_have_a_memory_bound_by_default(tmp_path):
    total_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    assert abs(Settings(home=tmp_path).worker_memory_bound_mb - 0.8 * total_mb) <= 1
    assert Settings(home=tmp_path, worker_memory_mb=0).worker_memory_bound_mb is None
    assert Settings(home=tmp_path, worker_memory_mb=3072).worker_memory_bound_mb == 3072


def test_qaa_home_and_what_is_written_there_are_private(server):
    client, alice = server()
    client.post("/v1/datasets", content=JSONL, headers=alice)
    home = client.app.state.settings.home_dir
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    for path in [home / "qaa.db", *home.joinpath("datasets").iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path


@pytest.mark.slow
def test_a_hostile_regex_never_stalls_the_api_and_an_allowed_job_still_trains(tmp_path):
    """A real API process and worker. While the pattern that takes `re` minutes on a module name is priced
    and submitted, /healthz answers at once; a job with an allowed dataset path and a regex target trains."""
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "train.jsonl").write_bytes(JSONL * 20)
    services = Services.embedded(tmp_path, QAA_LOCAL_DATASET_DIRS=str(allowed))
    _, key = services.store().create_api_key("alice")
    api, url = start_api(services)
    hostile = {**TINY, "method": {"kind": "qaa", "target_modules": "(.*.*)*z"}}
    allowed_spec = {
        **TINY,
        "dataset": str(allowed / "train.jsonl"),
        "method": {"kind": "qaa", "target_modules": r"model\.layers\.\d+\.self_attn\.(q|v)_proj"},
        "training": {"steps": 3, "batch_size": 2, "max_length": 32, "eval_every": 0},
        "evaluation": {"metrics": ["bleu"], "samples": 2, "max_new_tokens": 2},
    }
    with api, start_worker(services):
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        health: list[float] = []
        stop = threading.Event()

        def probe():
            while not stop.is_set():
                started = time.monotonic()
                assert httpx.get(url + "/healthz", timeout=5).status_code == 200
                health.append(time.monotonic() - started)

        thread = threading.Thread(target=probe)
        thread.start()
        try:
            refused = [client.post(path, json=hostile) for path in ("/v1/estimate", "/v1/jobs") for _ in range(5)]
        finally:
            stop.set()
            thread.join()
        job = client.post("/v1/jobs", json=allowed_spec)
        assert job.status_code == 201, job.text
        done = wait_until(
            lambda: (j := client.get(f"/v1/jobs/{job.json()['id']}").json())["status"] in ("succeeded", "failed") and j,
            180,
            what="the allowed job ends",
        )
    services.close()
    assert {r.status_code for r in refused} == {422} and all("match no module" in r.text for r in refused)
    assert health and max(health) < 1.0, health
    assert done["status"] == JobStatus.SUCCEEDED, done["error"]
    assert done["progress"]["step"] == 3 and json.loads(json.dumps(done["evaluation"]))["bleu"] >= 0
