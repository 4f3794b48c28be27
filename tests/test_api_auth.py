"""Authentication and isolation: keys are required and checked; another owner's ids answer 404."""

from __future__ import annotations

import logging

import pytest
from test_api import JSONL, TINY, submit


@pytest.mark.parametrize(
    "header",
    [None, "Bearer qaa_not-a-real-key", "Basic YWxpY2U6c2VjcmV0", "Bearer ", "qaa_missing-scheme"],
    ids=["missing", "unknown", "basic", "empty", "no-scheme"],
)
def test_requests_without_a_valid_key_get_401(api, header):
    headers = {"Authorization": header} if header else {}
    for method, url in [("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", "/v1/datasets"), ("GET", "/v1/backends")]:
        response = api.request(method, url, headers=headers, json=TINY if method == "POST" else None)
        assert response.status_code == 401, (method, url)
        assert response.headers["content-type"] == "application/problem+json"
        assert response.headers["www-authenticate"] == "Bearer"
        assert "key" in response.json()["detail"]
    assert api.app.state.store.count_jobs_by_status()["queued"] == 0


def test_a_revoked_key_gets_401(api):
    store = api.app.state.store
    key, plaintext = store.create_api_key("alice")
    headers = {"Authorization": f"Bearer {plaintext}"}
    assert api.get("/v1/jobs", headers=headers).status_code == 200
    assert store.revoke_api_key(key.id)
    assert api.get("/v1/jobs", headers=headers).status_code == 401


def test_another_owners_jobs_and_datasets_are_not_found(api, auth_for, tmp_path):
    alice, bob = auth_for("alice"), auth_for("bob")
    job = submit(api, alice)
    store = api.app.state.store
    store.record_metrics(job["id"], [{"step": 1, "loss": 2.0}])
    (tmp_path / "metrics.json").write_text("{}")
    store.add_artifact(job["id"], "metrics.json", str(tmp_path / "metrics.json"), 2, "0" * 64)
    dataset = api.post("/v1/datasets", content=JSONL, headers=alice).json()

    for method, url in [
        ("GET", f"/v1/jobs/{job['id']}"),
        ("POST", f"/v1/jobs/{job['id']}/cancel"),
        ("GET", f"/v1/jobs/{job['id']}/metrics"),
        ("GET", f"/v1/jobs/{job['id']}/artifacts"),
        ("GET", f"/v1/jobs/{job['id']}/artifacts/metrics.json"),
    ]:
        response = api.request(method, url, headers=bob)
        assert response.status_code == 404, url
        assert response.json()["detail"] == f"no job {job['id']!r}"  # the same words as a job that never existed
    assert api.get("/v1/jobs", headers=bob).json()["jobs"] == []
    assert api.get("/v1/datasets", headers=bob).json() == []
    stolen = api.post("/v1/jobs", json={**TINY, "dataset": dataset["id"]}, headers=bob)
    assert stolen.status_code == 422 and stolen.json()["errors"][0]["path"] == "dataset"

    assert api.get(f"/v1/jobs/{job['id']}", headers=alice).json()["status"] == "queued"  # bob's cancel did nothing
    assert [d["id"] for d in api.get("/v1/datasets", headers=alice).json()] == [dataset["id"]]


def test_keys_never_appear_in_answers_or_logs(api, caplog):
    _, plaintext = api.app.state.store.create_api_key("alice")
    headers = {"Authorization": f"Bearer {plaintext}"}
    with caplog.at_level(logging.DEBUG):
        answers = [
            api.post("/v1/jobs", json=TINY, headers=headers),
            api.get("/v1/jobs", headers=headers),
            api.get("/v1/jobs", headers={"Authorization": f"Bearer {plaintext}x"}),
            api.get("/metrics"),
        ]
    assert all(plaintext not in r.text for r in answers)
    assert plaintext not in caplog.text
