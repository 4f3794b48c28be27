"""The REST API in-process: jobs, metrics, artifacts, datasets, estimates, health and Prometheus metrics."""

from __future__ import annotations

import hashlib
import json
import os
import stat

from fastapi.testclient import TestClient

from circuits import QAAConfig, estimate
from service.app import create_app
from service.auth import credentials_path
from service.store import Store

TINY = {
    "name": "tiny",
    "model": "builtin:tiny-llama",
    "dataset": "builtin:restaurants",
    "method": {"kind": "qaa"},
    "training": {"steps": 5},
}
JSONL = b'{"prompt": "name[Aromi]", "completion": "Aromi is a cafe."}\n\n{"prompt": "a", "completion": "b"}\n'


def submit(api, headers, spec=TINY):
    response = api.post("/v1/jobs", json=spec, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()


def test_submit_get_list_and_cancel(api, auth_for):
    alice = auth_for("alice")
    job = submit(api, alice)
    assert job["status"] == "queued" and job["progress"] == {"step": 0, "steps": 5}
    assert job["spec"]["method"]["kind"] == "qaa" and job["spec"]["quantum"]["backend"] == "exact"
    assert {"attempts", "created_at", "started_at", "finished_at", "error", "usage", "evaluation"} <= job.keys()
    fetched = api.get(f"/v1/jobs/{job['id']}", headers=alice).json()
    assert {**fetched, "updated_at": None} == {**job, "updated_at": None}  # sending the message touches updated_at

    listed = api.get("/v1/jobs", headers=alice).json()
    assert [j["id"] for j in listed["jobs"]] == [job["id"]] and listed["next_cursor"] is None
    assert api.get("/v1/jobs?status=running", headers=alice).json()["jobs"] == []

    cancelled = api.post(f"/v1/jobs/{job['id']}/cancel", headers=alice).json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"] is not None
    again = api.post(f"/v1/jobs/{job['id']}/cancel", headers=alice).json()
    assert again["status"] == "cancelled"  # idempotent
    only = api.get("/v1/jobs?status=cancelled&status=queued", headers=alice).json()["jobs"]
    assert [j["id"] for j in only] == [job["id"]]


def test_submit_answers_location_of_the_job(api, auth_for):
    response = api.post("/v1/jobs", json=TINY, headers=auth_for("alice"))
    assert response.headers["location"] == f"/v1/jobs/{response.json()['id']}"


def test_list_pages_with_a_cursor_newest_first(api, auth_for):
    alice = auth_for("alice")
    made = [submit(api, alice)["id"] for _ in range(5)]
    seen, cursor, pages = [], None, 0
    while True:
        url = "/v1/jobs?limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = api.get(url, headers=alice).json()
        seen += [j["id"] for j in page["jobs"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert seen == made[::-1]


def test_metrics_come_incrementally_after_a_step(api, auth_for):
    alice = auth_for("alice")
    job = submit(api, alice)
    store = api.app.state.store
    store.record_metrics(job["id"], [{"step": s, "loss": 3.0 - 0.1 * s, "lr": 1e-3} for s in range(1, 11)])
    store.record_metrics(job["id"], [{"step": 5, "eval_loss": 2.7}, {"step": 10, "eval_loss": 2.2}])
    url = f"/v1/jobs/{job['id']}/metrics"

    first = api.get(url, params={"limit": 4}, headers=alice).json()
    assert [p["step"] for p in first["points"]] == [1, 2, 3, 4] and first["next_after_step"] == 4
    rest = api.get(url, params={"after_step": 4}, headers=alice).json()
    assert [p["step"] for p in rest["points"]] == [5, 6, 7, 8, 9, 10] and rest["next_after_step"] == 10
    assert rest["points"][0] == {"step": 5, "loss": 2.5, "lr": 1e-3, "eval_loss": 2.7}
    assert api.get(url, params={"after_step": 10}, headers=alice).json() == {"points": [], "next_after_step": 10}


def test_artifacts_are_listed_and_streamed(api, auth_for, tmp_path):
    alice = auth_for("alice")
    job = submit(api, alice)
    data = os.urandom(300_000)
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    api.app.state.store.add_artifact(job["id"], "adapter/adapter_model.safetensors", str(path), len(data), digest)

    listed = api.get(f"/v1/jobs/{job['id']}/artifacts", headers=alice).json()
    assert [(a["name"], a["size"], a["sha256"]) for a in listed] == [
        ("adapter/adapter_model.safetensors", len(data), digest)
    ]
    download = api.get(listed[0]["url"], headers=alice)
    assert download.status_code == 200 and download.content == data
    assert download.headers["content-type"] == "application/octet-stream"
    missing = api.get(f"/v1/jobs/{job['id']}/artifacts/metrics.json", headers=alice)
    assert missing.status_code == 404 and "metrics.json" in missing.json()["detail"]


def test_dataset_upload_list_and_use_in_a_spec(api, auth_for):
    alice = auth_for("alice")
    response = api.post("/v1/datasets?name=cafes.jsonl", content=JSONL, headers=alice)
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert dataset["id"].startswith("ds_") and (dataset["name"], dataset["rows"], dataset["size"]) == (
        "cafes.jsonl",
        2,
        len(JSONL),
    )
    assert api.get("/v1/datasets", headers=alice).json() == [dataset]
    home = api.app.state.settings.datasets_dir
    assert sorted(p.name for p in home.iterdir()) == [f"{dataset['id']}.jsonl"]
    assert (home / f"{dataset['id']}.jsonl").read_bytes() == JSONL

    job = submit(api, alice, {**TINY, "dataset": dataset["id"]})
    assert job["spec"]["dataset"] == dataset["id"]


def test_estimate_matches_circuits_estimate(api, auth_for):
    alice = auth_for("alice")
    spec = {
        **TINY,
        "method": {"kind": "qaa", "target_modules": ["q_proj", "v_proj"], "layers": 2},
        "quantum": {"backend": "aer", "input_grad": "none"},
        "training": {"steps": 3, "batch_size": 2, "max_length": 8},
    }
    got = api.post("/v1/estimate", json=spec, headers=alice).json()
    # tiny-llama: 2 blocks x (q_proj, v_proj) of width 64 -> 4 adapters on 6 qubits; 2 x 8 tokens per step.
    cfg = QAAConfig(backend="aer", gradient="parameter-shift", layers=2, input_grad="none")
    expected = estimate(cfg, tokens_per_step=16, steps=3, d_in=64, adapters=4)
    assert (got["adapters"], got["d_in"], got["tokens_per_step"]) == (4, [64], 16)
    assert got["circuits_per_step"] == expected.circuits_per_step == 4 * 16 * (2 * 30 + 1)
    assert (got["circuits"], got["shots"], got["primitive_calls"]) == (3 * 3904, 0, 12)
    assert got["within_budget"] and 0 < got["seconds"]["low"] < got["seconds"]["high"]

    exact = api.post("/v1/estimate", json=TINY, headers=alice).json()
    assert (exact["backend"], exact["circuits"], exact["shots"]) == ("exact", 0, 0)

    hub_model = {**spec, "model": "HuggingFaceTB/SmolLM2-360M"}
    unknown = api.post("/v1/estimate", json=hub_model, headers=alice)
    assert unknown.status_code == 422 and unknown.json()["errors"][0]["path"] == "d_in"
    given = api.post("/v1/estimate?d_in=64&adapters=4", json=hub_model, headers=alice).json()
    assert given["circuits"] == got["circuits"] and given["seconds"] is None


def test_a_job_over_its_circuit_budget_is_refused_up_front(api, auth_for):
    alice = auth_for("alice")
    spec = {**TINY, "quantum": {"backend": "aer", "max_circuits": 1000}, "training": {"steps": 2}}
    priced = api.post("/v1/estimate", json=spec, headers=alice).json()
    assert not priced["within_budget"] and "max_circuits=1000" in priced["note"]
    refused = api.post("/v1/jobs", json=spec, headers=alice)
    assert refused.status_code == 422
    assert refused.json()["errors"][0]["path"] == "quantum.max_circuits"
    assert str(priced["circuits"] + priced["evaluation"]["circuits"]) in refused.json()["detail"]
    assert api.app.state.store.count_jobs_by_status()["queued"] == 0


def test_health_readiness_and_prometheus_metrics(api, auth_for):
    alice = auth_for("alice")
    assert api.get("/healthz").json() == {"status": "ok"}
    ready = api.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"store": "ok", "broker": "ok"}

    store = api.app.state.store
    done, queued = submit(api, alice), submit(api, alice)
    api.get(f"/v1/jobs/{queued['id']}", headers=alice)
    assert store.claim_job(done["id"], "w1") is not None
    assert store.finish_job(done["id"], "w1", "succeeded", usage={"circuits": 1234, "shots": 0})

    refused = api.get("/metrics")  # the gauges read every owner's jobs: not without a key
    assert refused.status_code == 401 and refused.headers["content-type"] == "application/problem+json"
    text = api.get("/metrics", headers=alice).text
    assert 'qaa_jobs{state="queued"} 1.0' in text and 'qaa_jobs{state="succeeded"} 1.0' in text
    assert "qaa_circuits_executed_total 1234.0" in text
    assert 'qaa_queue_depth{queue="cpu"}' in text
    assert 'route="/v1/jobs/{job_id}",status="200"' in text  # labelled by template, not by id
    assert queued["id"] not in text


def test_first_start_writes_a_private_credentials_file_once(api):
    settings = api.app.state.settings
    path = credentials_path(settings)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    creds = json.loads(path.read_text())
    assert creds["url"] == f"http://127.0.0.1:{settings.port}"
    headers = {"Authorization": f"Bearer {creds['api_key']}"}
    assert api.get("/v1/jobs", headers=headers).status_code == 200
    assert [k.owner for k in api.app.state.store.list_api_keys()] == ["local"]

    with TestClient(create_app(settings)) as again:  # a restart finds the key and leaves the file alone
        assert [k.owner for k in again.app.state.store.list_api_keys()] == ["local"]
    assert json.loads(path.read_text()) == creds

    moved = settings.model_copy(update={"port": settings.port + 1})
    with TestClient(create_app(moved)):  # a restart on another port keeps the key and names the new port
        pass
    assert json.loads(path.read_text()) == {**creds, "url": f"http://127.0.0.1:{settings.port + 1}"}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_dashboard_is_served_without_any_cdn(api):
    page = api.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for asset in ("app.js", "chart.js", "style.css"):
        assert f"/dashboard/{asset}" in page.text or asset == "chart.js"
        body = api.get(f"/dashboard/{asset}").text
        assert "https://" not in body and "http://" not in body.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in page.text


def test_backends_list_simulators_and_fake_devices(api, auth_for):
    got = api.get("/v1/backends", headers=auth_for("alice")).json()
    names = [b["name"] for b in got]
    assert names[:2] == ["exact", "aer"] and "fake:FakeManilaV2" in names
    manila = next(b for b in got if b["name"] == "fake:FakeManilaV2")
    assert (manila["kind"], manila["qubits"], manila["noise"], manila["pending_jobs"]) == ("fake", 5, True, 0)
    assert 1e-3 < manila["median_two_qubit_error"] < 0.1 and 1e-3 < manila["median_readout_error"] < 0.2


def test_your_ibm_devices_are_listed_with_your_token_and_a_failed_listing_is_a_clear_problem(api, auth_for):
    """No IBM service is reachable from here: the listing with a stored token fails as a 502/503 problem naming
    IBM, never a 500 and never the token; an owner without a token gets the local backends."""
    alice, bob = auth_for("alice"), auth_for("bob")
    token = "tok-" + "x" * 40
    assert api.put("/v1/credentials/ibm", json={"token": token}, headers=alice).status_code == 200
    refused = api.get("/v1/backends", headers=alice)
    assert refused.status_code in (502, 503) and "IBM Quantum" in refused.json()["detail"], refused.text
    assert token not in refused.text and refused.headers["content-type"] == "application/problem+json"
    local = api.get("/v1/backends", headers=bob)
    assert local.status_code == 200 and {b["kind"] for b in local.json()} == {"simulator", "fake"}


def test_readyz_is_503_naming_an_unreachable_store(api):
    from service.store import make_engine

    settings = api.app.state.settings.model_copy(update={"database_url": "postgresql://postgres@127.0.0.1:1/none"})
    down = Store(make_engine(settings.database_url, connect_args={"connect_timeout": 2}))
    with TestClient(create_app(settings, store=down)) as client:
        response = client.get("/readyz")
    assert response.status_code == 503 and response.headers["content-type"] == "application/problem+json"
    assert response.json()["checks"]["store"].startswith("unreachable")
    assert "store" in response.json()["detail"]


def test_readyz_is_503_naming_an_unreachable_broker(api, monkeypatch):
    from service.settings import get_settings

    monkeypatch.setenv("QAA_BROKER_URL", "redis://127.0.0.1:1/0")  # nothing listens on port 1
    get_settings.cache_clear()
    response = api.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"] == {"store": "ok", "broker": "unreachable"}
