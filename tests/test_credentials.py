"""Stored IBM Quantum tokens: write-only over the API, encrypted at rest, owner-scoped, never logged, and what an
owner's `ibm:` jobs sign in with."""

from __future__ import annotations

import logging
import os
import secrets
import stat
import threading
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from stack import Services, postgres_database, start_api, start_worker, wait_until

from circuits.backends import environment
from service.app import create_app
from service.settings import Settings
from service.spec import parse_spec
from service.store import Store
from service.vault import SecretUnreadable, key_path, secret_box
from workers.tasks import ibm_credentials, run_train
from workers.trainer import JobError

IBM_JOB = {
    "model": "builtin:tiny-llama",
    "dataset": "builtin:restaurants",
    "method": {"kind": "qaa"},
    "quantum": {"backend": "ibm:ibm_torino", "gradient": "spsa", "shots": 256},
    "training": {"steps": 1, "batch_size": 1, "max_length": 8},
    "evaluation": {"samples": 0},  # with the eval-loss pass, about 1,100 QPU seconds: within the job ceiling
}
NO_TOKEN = "needs an IBM Quantum API token"
NOT_NAMED = "serves only the owners"
ROUTES = [("PUT", "/v1/credentials/ibm"), ("GET", "/v1/credentials"), ("DELETE", "/v1/credentials/ibm")]


@pytest.fixture(autouse=True)
def _no_qaa_environment(monkeypatch):
    """Settings built here see only what each test passes, not the machine's `QAA_*` variables."""
    for name in [k for k in os.environ if k.startswith("QAA_")]:
        monkeypatch.delenv(name)


def new_token() -> str:
    return "ibmtok-" + secrets.token_hex(20)


def db_bytes(home: Path) -> bytes:
    """Every byte SQLite keeps for the embedded store (the file and its write-ahead log)."""
    return b"".join(p.read_bytes() for p in home.glob("qaa.db*"))


def test_put_then_get_says_set_and_never_shows_the_token(api, auth_for, caplog):
    alice = auth_for("alice")
    token, instance = new_token(), "crn:v1:bluemix:public:quantum-computing:us-east:a/1234::"
    home = api.app.state.settings.home_dir
    with caplog.at_level(logging.DEBUG):
        first = api.put("/v1/credentials/ibm", json={"token": token, "instance": instance}, headers=alice)
        listed = api.get("/v1/credentials", headers=alice)
        replacement = new_token()
        second = api.put("/v1/credentials/ibm", json={"token": f"  {replacement}\n"}, headers=alice)
        relisted = api.get("/v1/credentials", headers=alice)

    assert first.status_code == 200, first.text
    assert first.json()["kind"] == "ibm" and first.json()["set"] is True and first.json()["instance"] == instance
    assert set(first.json()) == {"kind", "instance", "set", "created_at", "updated_at"}  # no token field at all
    assert listed.json() == [first.json()]
    assert second.status_code == 200 and second.json()["instance"] is None  # a PUT replaces the whole credential
    assert second.json()["created_at"] == first.json()["created_at"]
    assert second.json()["updated_at"] >= first.json()["updated_at"]
    assert relisted.json() == [second.json()]
    for secret in (token, replacement):
        assert all(secret not in r.text for r in (first, listed, second, relisted))
        assert secret not in caplog.text
        assert secret.encode() not in db_bytes(home)

    store = api.app.state.store
    with store.engine.connect() as conn:
        (column,) = conn.execute(text("SELECT encrypted_token FROM credentials WHERE owner = 'alice'")).one()
    assert replacement not in column and token not in column and column.startswith("gAAAAA")  # a Fernet token
    stored = store.get_credential("alice", "ibm", secret_box(api.app.state.settings, create=False))
    assert stored.token == replacement  # trimmed, and recoverable only through the key
    assert replacement not in repr(stored)
    assert stat.S_IMODE(key_path(api.app.state.settings).stat().st_mode) == 0o600


def test_another_owner_can_neither_see_nor_delete_it(api, auth_for):
    alice, bob = auth_for("alice"), auth_for("bob")
    assert api.put("/v1/credentials/ibm", json={"token": new_token()}, headers=alice).status_code == 200

    assert api.get("/v1/credentials", headers=bob).json() == []
    gone = api.delete("/v1/credentials/ibm", headers=bob)
    assert gone.status_code == 404 and gone.headers["content-type"] == "application/problem+json"
    assert [c["kind"] for c in api.get("/v1/credentials", headers=alice).json()] == ["ibm"]

    assert api.delete("/v1/credentials/ibm", headers=alice).status_code == 204
    assert api.get("/v1/credentials", headers=alice).json() == []
    assert api.delete("/v1/credentials/ibm", headers=alice).status_code == 404


def test_no_bad_or_revoked_key_gets_401_and_stores_nothing(api):
    store = api.app.state.store
    key, plaintext = store.create_api_key("alice")
    assert store.revoke_api_key(key.id)
    token = new_token()
    for headers in ({}, {"Authorization": "Bearer qaa_not-a-key"}, {"Authorization": f"Bearer {plaintext}"}):
        for method, url in ROUTES:
            response = api.request(method, url, headers=headers, json={"token": token} if method == "PUT" else None)
            assert response.status_code == 401, (method, headers)
            assert response.headers["www-authenticate"] == "Bearer" and token not in response.text
    assert store.describe_credentials("alice") == []


@pytest.mark.parametrize(
    "body",
    [
        lambda t: {"token": t, "instance": "crn", "extra": 1},
        lambda t: {"token": t + "\x00"},
        lambda t: {"token": t * 200},
        lambda t: {"token": [t]},
        lambda t: {"token": t, "instance": "a\nb"},
        lambda t: {"secret": t},
        lambda t: f'{{"token": "{t}"',
    ],
    ids=["extra-field", "control-char", "too-long", "wrong-type", "bad-instance", "missing-token", "malformed-json"],
)
def test_invalid_bodies_are_422_without_the_token(api, auth_for, caplog, body):
    token = new_token()
    payload = body(token)
    with caplog.at_level(logging.DEBUG):
        if isinstance(payload, str):
            headers = {**auth_for("alice"), "Content-Type": "application/json"}
            response = api.put("/v1/credentials/ibm", content=payload, headers=headers)
        else:
            response = api.put("/v1/credentials/ibm", json=payload, headers=auth_for("alice"))
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["errors"] and response.json()["detail"]
    assert token not in response.text and token not in caplog.text
    assert api.app.state.store.describe_credentials("alice") == []


def test_production_without_a_secret_key_refuses_to_store(tmp_path):
    token = new_token()
    production = Settings(home=tmp_path / "home", database_url=f"sqlite:///{tmp_path / 'prod.db'}")
    with TestClient(create_app(production)) as client:
        _, key = client.app.state.store.create_api_key("alice")
        headers = {"Authorization": f"Bearer {key}"}
        refused = client.put("/v1/credentials/ibm", json={"token": token}, headers=headers)
        listed = client.get("/v1/credentials", headers=headers)
    assert refused.status_code == 503 and "QAA_SECRET_KEY" in refused.json()["detail"]
    assert refused.headers["content-type"] == "application/problem+json" and token not in refused.text
    assert listed.json() == []
    assert token.encode() not in (tmp_path / "prod.db").read_bytes()
    assert not key_path(production).exists()  # no key is made up in production

    keyed = Settings(home=tmp_path / "home", database_url=production.database_url, secret_key=secrets.token_hex(32))
    with TestClient(create_app(keyed)) as client:
        _, key = client.app.state.store.create_api_key("alice")
        stored = client.put("/v1/credentials/ibm", json={"token": token}, headers={"Authorization": f"Bearer {key}"})
        store = client.app.state.store
        assert stored.status_code == 200
        assert store.get_credential("alice", "ibm", secret_box(keyed, create=False)).token == token
        other = Settings(home=keyed.home, database_url=keyed.database_url, secret_key=secrets.token_hex(32))
        with pytest.raises(SecretUnreadable, match="QAA_SECRET_KEY") as info:
            store.get_credential("alice", "ibm", secret_box(other, create=False))
        assert token not in str(info.value)


def test_the_embedded_key_is_made_once_even_by_racing_first_starts(tmp_path):
    settings = Settings(home=tmp_path / "home")
    boxes, barrier = [], threading.Barrier(8)

    def first_start() -> None:
        barrier.wait()
        boxes.append(secret_box(settings, create=True))

    threads = [threading.Thread(target=first_start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sealed = boxes[0].encrypt("x")
    assert [box.decrypt(sealed) for box in boxes] == ["x"] * 8  # one key shared by all
    assert [p.name for p in key_path(settings).parent.iterdir()] == ["secret_key"]  # no temporary file left
    assert stat.S_IMODE(os.stat(key_path(settings)).st_mode) == 0o600


@pytest.fixture
def store(tmp_path):
    settings = Settings(home=tmp_path / "home")
    s = Store.from_settings(settings, migrate=True)
    yield s
    s.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def any_store(request, tmp_path):
    """A migrated store on a SQLite file, or on a throwaway PostgreSQL database."""
    if request.param == "sqlite":
        s = Store.from_settings(Settings(home=tmp_path / "home"), migrate=True)
        yield s
        s.close()
        return
    with postgres_database() as url:
        s = Store.from_settings(Settings(home=tmp_path / "home", database_url=url))
        yield s
        s.close()


def test_set_replaces_get_decrypts_delete_forgets(any_store, tmp_path):
    box = secret_box(Settings(home=tmp_path / "home"), create=True)
    first = any_store.set_credential("alice", "ibm", "t-1", box, instance="crn:1")
    second = any_store.set_credential("alice", "ibm", "t-2", box)
    any_store.set_credential("bob", "ibm", "t-bob", box, instance="crn:bob")

    assert second.created_at == first.created_at and second.updated_at >= first.updated_at
    assert any_store.describe_credentials("alice") == [second] and second.instance is None
    assert any_store.get_credential("alice", "ibm", box).token == "t-2"
    assert any_store.get_credential("bob", "ibm", box).token == "t-bob"
    with any_store.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM credentials")).scalar() == 2  # one row per owner and kind
    assert any_store.delete_credential("alice", "ibm") and not any_store.delete_credential("alice", "ibm")
    assert any_store.get_credential("alice", "ibm", box) is None
    assert [c.instance for c in any_store.describe_credentials("bob")] == ["crn:bob"]
    with pytest.raises(ValueError, match="unknown credential kind"):
        any_store.set_credential("alice", "aws", "t", box)


def test_an_owners_stored_token_wins_over_the_workers(store, tmp_path):
    operator = Settings(
        home=tmp_path / "home",
        ibm_token="operator-" + secrets.token_hex(8),
        ibm_instance="crn:op",
        ibm_token_owners=["bob"],
    )
    alice_token = new_token()
    store.set_credential("alice", "ibm", alice_token, secret_box(operator, create=True), instance="crn:alice")

    assert ibm_credentials(store, "alice", operator) == (alice_token, "crn:alice")
    assert ibm_credentials(store, "bob", operator) == (operator.ibm_token.get_secret_value(), "crn:op")
    with pytest.raises(JobError, match=NOT_NAMED):  # the operator's token pays only for the owners it names
        ibm_credentials(store, "carol", operator)
    assert ibm_credentials(store, "bob", Settings(home=tmp_path / "home", ibm_token_owners="*")) == (None, None)

    moved = Settings(home=tmp_path / "elsewhere")  # a worker whose QAA_HOME holds no (or another) key
    with pytest.raises(JobError, match="cannot be used here.*does not exist"):
        ibm_credentials(store, "alice", moved)
    unkeyed = Settings(home=tmp_path / "home", database_url=f"sqlite:///{tmp_path / 'home' / 'qaa.db'}")
    with pytest.raises(JobError, match="cannot be used here.*set QAA_SECRET_KEY"):
        ibm_credentials(store, "alice", unkeyed)  # production: the embedded key file is never a fallback
    rekeyed = Settings(home=tmp_path / "home", secret_key=secrets.token_hex(32))
    with pytest.raises(JobError, match="another key.*QAA_SECRET_KEY") as info:
        ibm_credentials(store, "alice", rekeyed)
    assert alice_token not in str(info.value)

    assert store.delete_credential("alice", "ibm")
    with pytest.raises(JobError, match=NOT_NAMED):  # deleted: alice is not one of the operator's owners
        ibm_credentials(store, "alice", operator)


def test_an_ibm_job_signs_in_with_its_owners_token(store, tmp_path, caplog):
    settings = Settings(home=tmp_path / "home")  # the worker itself has no IBM token
    token = new_token()
    store.set_credential("alice", "ibm", token, secret_box(settings, create=True))
    before = environment.environment()
    jobs = {owner: store.create_job(owner, parse_spec(IBM_JOB)) for owner in ("alice", "bob")}
    with caplog.at_level(logging.DEBUG):
        outcomes = {owner: run_train(job.id, store, settings, "test-worker") for owner, job in jobs.items()}
    errors = {owner: store.load_job(job.id).error for owner, job in jobs.items()}

    assert outcomes == {"alice": "failed", "bob": "failed"}  # no IBM Quantum reachable from here
    assert NOT_NAMED in errors["bob"]  # without a stored token, bob may not use the workers' (none named)
    assert NO_TOKEN not in errors["alice"] and "IBM Quantum" in errors["alice"], errors["alice"]  # it tried to sign in
    assert token not in errors["alice"] and token not in caplog.text
    assert environment.environment() == before  # the job's token does not outlive the job


@pytest.mark.slow
def test_stored_over_http_used_by_a_live_worker_and_in_no_log(tmp_path):
    services = Services.embedded(tmp_path)  # no QAA_IBM_TOKEN anywhere
    _, key = services.store().create_api_key("alice")
    token = new_token()
    api, url = start_api(services)
    with api, start_worker(services, queues="qpu") as worker:
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        answers = [client.put("/v1/credentials/ibm", json={"token": token, "instance": "crn:live"})]
        answers.append(client.post("/v1/jobs", json=IBM_JOB))
        job_id = answers[-1].json()["id"]
        wait_until(lambda: client.get(f"/v1/jobs/{job_id}").json()["status"] == "failed", 120, what="job failed")
        answers += [client.get(f"/v1/jobs/{job_id}"), client.get("/v1/credentials")]
        logs = api.log() + worker.log()
    services.close()

    assert [a.status_code for a in answers] == [200, 201, 200, 200]
    error = answers[2].json()["error"]
    assert NO_TOKEN not in error and "IBM Quantum" in error, error
    assert answers[3].json()[0]["set"] is True
    assert all(token not in a.text for a in answers)
    assert token not in logs and "PUT /v1/credentials/ibm" in logs  # the API did log the request, not the token
    assert token.encode() not in db_bytes(services.home)
