"""The job store on SQLite and PostgreSQL: schema, leases, cancel, pagination, metrics, datasets, keys.

Every store test runs twice, on a SQLite file and on PostgreSQL. PostgreSQL comes from
`QAA_TEST_DATABASE_URL` (default: the local `test` database); each session creates its own throwaway
database next to it and drops it at the end, so parallel runs never collide. Without a reachable server the
PostgreSQL cases skip, except under `CI=true`, where they fail.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.pool import NullPool
from stack import postgres_database

from service.settings import Settings
from service.spec import parse_spec
from service.store import (
    Base,
    JobStatus,
    MetricPoint,
    Store,
    alembic_config,
    decode_cursor,
    hash_api_key,
    make_engine,
    migrate,
    normalize_url,
    schema_is_current,
)

DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
TABLES = ("metric_points", "artifacts", "jobs", "datasets", "api_keys", "credentials")
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


class Clock:
    """A hand-driven clock, so lease expiry is tested without sleeping."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for this test session, dropped afterwards."""
    with postgres_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A migrated, empty database: a new SQLite file per test, or the session's PostgreSQL, emptied."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'qaa.db'}"
        migrate(url)
        return url
    url = request.getfixturevalue("postgres_url")
    engine = make_engine(url, poolclass=NullPool)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"TRUNCATE {', '.join(TABLES)} CASCADE")
    engine.dispose()
    return url


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(db_url: str, clock: Clock) -> Iterator[Store]:
    s = Store(make_engine(db_url), lease_seconds=60, max_attempts=3, clock=clock)
    yield s
    s.close()


def make_spec(steps: int = 100, **overrides: object):
    return parse_spec(
        {
            "model": "builtin:tiny-llama",
            "dataset": "builtin:restaurants",
            "training": {"steps": steps},
            **overrides,
        }
    )


# --- schema -------------------------------------------------------------------------------------------------


def test_models_match_migrated_schema(store: Store) -> None:
    with store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
        # The comparison must be able to see a difference, or the check above proves nothing.
        changed = sa.MetaData()
        for table in Base.metadata.tables.values():
            table.to_metadata(changed)
        changed.tables["jobs"].append_column(sa.Column("extra", sa.Integer))
        assert compare_metadata(context, changed) != []
    assert schema_is_current(store.engine)


def test_migrate_twice_is_a_no_op(db_url: str) -> None:
    migrate(db_url)
    engine = make_engine(db_url)
    assert schema_is_current(engine)
    engine.dispose()


def test_schema_is_not_current_before_migration(tmp_path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'empty' / 'qaa.db'}")  # parent directory is created
    assert not schema_is_current(engine)
    engine.dispose()


def test_keys_made_before_expiry_existed_stay_live_across_the_upgrade(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'qaa.db'}"
    migrate(url, "0002")
    engine = make_engine(url)
    with engine.begin() as conn:  # a key as 0002 stored it, without the column
        conn.execute(
            sa.text(
                "INSERT INTO api_keys (id, owner, key_hash, prefix, created_at) "
                "VALUES ('key_1', 'alice', :h, 'qaa_', :t)"
            ),
            {"h": hash_api_key("qaa_old"), "t": T0.replace(tzinfo=None)},
        )
    migrate(url)
    store = Store(engine)
    assert store.verify_api_key("qaa_old") == "alice"
    assert [k.expires_at for k in store.list_api_keys()] == [None]
    command.downgrade(alembic_config(url), "0002")
    assert not schema_is_current(engine)
    store.close()


def test_sqlite_pragmas(tmp_path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'qaa.db'}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000
    engine.dispose()


def test_urls_from_settings(tmp_path) -> None:
    assert Settings(home=tmp_path).sqlalchemy_url == f"sqlite:///{tmp_path / 'qaa.db'}"
    assert Settings(database_url="postgresql://u@h/db").sqlalchemy_url == "postgresql://u@h/db"
    assert normalize_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    with pytest.raises(ValueError, match="heartbeat_seconds"):
        Settings(lease_seconds=10, heartbeat_seconds=8)


def test_store_from_settings_migrates(tmp_path) -> None:
    store = Store.from_settings(Settings(home=tmp_path, lease_seconds=30, heartbeat_seconds=10), migrate=True)
    try:
        assert schema_is_current(store.engine) and store.lease == timedelta(seconds=30)
        assert (tmp_path / "qaa.db").exists()
    finally:
        store.close()


# --- jobs ---------------------------------------------------------------------------------------------------


def test_create_job_stores_spec_queue_and_utc_times(store: Store) -> None:
    spec = make_spec(steps=42, name="run-1", quantum={"backend": "ibm:ibm_torino"})
    job = store.create_job("alice", spec)
    assert job.id.startswith("job_") and job.status == JobStatus.QUEUED
    loaded = store.get_job(job.id, "alice")
    assert loaded is not None
    assert loaded.name == "run-1" and loaded.queue == "qpu" and loaded.progress == {"step": 0, "steps": 42}
    assert parse_spec(loaded.spec) == spec
    assert loaded.created_at == T0 and loaded.created_at.tzinfo is not None
    assert loaded.attempts == 0 and loaded.usage is None and loaded.evaluation is None


def test_jobs_are_owner_scoped(store: Store) -> None:
    job = store.create_job("alice", make_spec())
    assert store.get_job(job.id, "mallory") is None
    assert store.request_cancel(job.id, "mallory") is None
    assert store.get_job(job.id, "alice").status == JobStatus.QUEUED  # untouched by mallory
    assert store.list_jobs("mallory").jobs == []
    assert store.load_job(job.id).owner == "alice"  # workers' unscoped lookup
    assert store.get_job("job_missing", "alice") is None


def test_pagination_returns_every_job_exactly_once(store: Store, clock: Clock) -> None:
    ids = []
    for i in range(23):
        if i % 3 == 0:  # groups of three share a created_at: ties are broken by id
            clock.advance(1)
        ids.append(store.create_job("alice", make_spec()).id)
    store.create_job("bob", make_spec())
    seen, cursor, pages = [], None, 0
    while True:
        page = store.list_jobs("alice", limit=5, cursor=cursor)
        seen += [j.id for j in page.jobs]
        pages += 1
        if pages == 2:  # a job created mid-walk is newer than the cursor: not repeated, not skipped
            store.create_job("alice", make_spec())
        cursor = page.next_cursor
        if cursor is None:
            break
    assert pages == 5
    assert sorted(seen) == sorted(ids) and len(seen) == len(set(seen))
    created = [store.get_job(i, "alice").created_at for i in seen]
    assert created == sorted(created, reverse=True)


def test_list_jobs_filters_by_status(store: Store) -> None:
    a = store.create_job("alice", make_spec())
    b = store.create_job("alice", make_spec())
    store.request_cancel(b.id, "alice")
    assert [j.id for j in store.list_jobs("alice", status="queued").jobs] == [a.id]
    assert [j.id for j in store.list_jobs("alice", status=[JobStatus.CANCELLED]).jobs] == [b.id]
    assert len(store.list_jobs("alice", status=["queued", "cancelled"]).jobs) == 2
    with pytest.raises(ValueError, match="unknown job status"):
        store.list_jobs("alice", status="done")


@pytest.mark.parametrize("cursor", ["garbage", "", "bm90aGluZw"])
def test_bad_cursor_is_a_value_error(store: Store, cursor: str) -> None:
    with pytest.raises(ValueError, match="invalid cursor"):
        store.list_jobs("alice", cursor=cursor)


def test_cursor_names_the_last_job_of_the_page(store: Store) -> None:
    store.create_job("alice", make_spec())
    page = store.list_jobs("alice", limit=1)
    assert page.next_cursor is None  # one job, one page
    store.create_job("alice", make_spec())
    page = store.list_jobs("alice", limit=1)
    assert decode_cursor(page.next_cursor) == (page.jobs[0].created_at, page.jobs[0].id)
    with pytest.raises(ValueError, match="limit"):
        store.list_jobs("alice", limit=0)


def test_claim_is_exclusive_under_concurrency(store: Store) -> None:
    jobs = [store.create_job("alice", make_spec()).id for _ in range(12)]
    store.clock = lambda: datetime.now(UTC)
    workers = 8
    barrier = threading.Barrier(workers)
    wins: Counter[str] = Counter()
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work(worker: str) -> None:
        try:
            barrier.wait()
            for job_id in jobs:
                if store.claim_job(job_id, worker) is not None:
                    with lock:
                        wins[job_id] += 1
        except BaseException as exc:  # surfaced below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert wins == Counter({job_id: 1 for job_id in jobs})
    for job_id in jobs:
        job = store.load_job(job_id)
        assert job.status == JobStatus.RUNNING and job.attempts == 1


def _claim_all(url: str, worker: str, job_ids: list[str], start: float) -> list[str]:
    """Run in a separate process: claim every job it can, starting at wall-clock `start`."""
    import time

    store = Store(make_engine(url), lease_seconds=60)
    time.sleep(max(0.0, start - time.time()))
    try:
        return [job_id for job_id in job_ids if store.claim_job(job_id, worker) is not None]
    finally:
        store.close()


def test_claim_is_exclusive_across_processes(store: Store, db_url: str) -> None:
    import multiprocessing
    import time

    jobs = [store.create_job("alice", make_spec()).id for _ in range(10)]
    start = time.time() + 1.5  # let every process finish importing before the race
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        results = pool.starmap(_claim_all, [(db_url, f"p{i}", jobs, start) for i in range(4)], chunksize=1)
    wins = Counter(job_id for won in results for job_id in won)
    assert wins == Counter({job_id: 1 for job_id in jobs})
    assert {store.load_job(j).lease_owner for j in jobs} <= {f"p{i}" for i in range(4)}


def test_expired_lease_is_reclaimed_and_attempts_count(store: Store, clock: Clock) -> None:
    job = store.create_job("alice", make_spec())
    first = store.claim_job(job.id, "w1")
    assert first is not None and first.attempts == 1 and first.lease_owner == "w1"
    assert first.started_at == T0 and first.lease_expires_at == T0 + timedelta(seconds=60)
    assert store.claim_job(job.id, "w2") is None  # live lease
    assert store.claim_job(job.id, "w1") is None  # a redelivered message to the same worker, too
    clock.advance(61)
    second = store.claim_job(job.id, "w2")
    assert second is not None and second.attempts == 2 and second.lease_owner == "w2"
    assert second.started_at == T0  # first start is kept
    # The first worker woke up: it has lost the job and cannot write its outcome.
    assert store.heartbeat(job.id, "w1").ours is False
    assert store.finish_job(job.id, "w1", "succeeded") is False
    assert store.finish_job(job.id, "w2", "succeeded") is True
    assert store.load_job(job.id).status == JobStatus.SUCCEEDED


def test_heartbeat_keeps_the_lease_and_reports_progress(store: Store, clock: Clock) -> None:
    job = store.create_job("alice", make_spec())
    store.claim_job(job.id, "w1")
    for step in (10, 20, 30):
        clock.advance(50)
        beat = store.heartbeat(job.id, "w1", step=step, usage={"circuits": step * 3})
        assert beat.ours and not beat.cancel_requested
        assert store.claim_job(job.id, "w2") is None
    loaded = store.get_job(job.id, "alice")
    assert loaded.progress == {"step": 30, "steps": 100} and loaded.usage == {"circuits": 90}
    assert store.heartbeat(job.id, "stranger").ours is False


def test_job_out_of_attempts_fails(store: Store, clock: Clock) -> None:
    job = store.create_job("alice", make_spec())
    for attempt in range(3):
        assert store.claim_job(job.id, f"w{attempt}") is not None
        clock.advance(61)
    assert store.claim_job(job.id, "w9") is None
    failed = store.load_job(job.id)
    assert failed.status == JobStatus.FAILED and "3 attempts" in failed.error
    assert failed.finished_at == clock.now


def test_cancel_queued_job_is_immediate(store: Store) -> None:
    job = store.create_job("alice", make_spec())
    cancelled = store.request_cancel(job.id, "alice")
    assert cancelled.status == JobStatus.CANCELLED and cancelled.finished_at == T0
    assert store.claim_job(job.id, "w1") is None  # a late message does not start it


def test_cancel_running_job_is_cooperative(store: Store) -> None:
    job = store.create_job("alice", make_spec())
    store.claim_job(job.id, "w1")
    assert store.request_cancel(job.id, "alice").status == JobStatus.CANCELLING
    assert store.request_cancel(job.id, "alice").status == JobStatus.CANCELLING  # idempotent
    beat = store.heartbeat(job.id, "w1", step=5)
    assert beat.ours and beat.cancel_requested
    assert store.finish_job(job.id, "w1", JobStatus.CANCELLED, step=5)
    done = store.get_job(job.id, "alice")
    assert done.status == JobStatus.CANCELLED and done.step == 5 and done.lease_expires_at is None
    assert store.request_cancel(job.id, "alice").status == JobStatus.CANCELLED  # finished: unchanged


def test_abandoned_cancel_is_settled(store: Store, clock: Clock) -> None:
    job = store.create_job("alice", make_spec())
    store.claim_job(job.id, "w1")
    store.request_cancel(job.id, "alice")
    assert store.settle_abandoned() == 0  # the worker may still stop it
    clock.advance(61)
    assert store.settle_abandoned() == 1
    assert store.load_job(job.id).status == JobStatus.CANCELLED


def test_finish_job_records_outcome(store: Store) -> None:
    job = store.create_job("alice", make_spec())
    store.claim_job(job.id, "w1")
    with pytest.raises(ValueError, match="final status"):
        store.finish_job(job.id, "w1", "running")
    with pytest.raises(ValueError, match="error message"):
        store.finish_job(job.id, "w1", "failed")
    assert store.finish_job(job.id, "w1", "failed", error="model 'x' not found", usage={"circuits": 7})
    failed = store.load_job(job.id)
    assert failed.status == JobStatus.FAILED and failed.error == "model 'x' not found"
    assert failed.usage == {"circuits": 7}
    assert store.finish_job(job.id, "w1", "succeeded") is False  # already final

    other = store.create_job("alice", make_spec())
    store.claim_job(other.id, "w1")
    assert store.finish_job(other.id, "w1", "succeeded", evaluation={"bleu": 12.5, "rouge_l": 0.3})
    assert store.load_job(other.id).evaluation == {"bleu": 12.5, "rouge_l": 0.3}


def test_jobs_to_resend(store: Store, clock: Clock) -> None:
    queued = store.create_job("alice", make_spec())
    store.mark_enqueued(queued.id)
    running = store.create_job("alice", make_spec())
    store.claim_job(running.id, "w1")
    finished = store.create_job("alice", make_spec())
    store.request_cancel(finished.id, "alice")
    window = timedelta(seconds=300)
    assert store.jobs_to_resend(window) == []  # every message is recent
    clock.advance(301)
    store.heartbeat(running.id, "w1")  # the worker is alive
    assert [j.id for j in store.jobs_to_resend(window)] == [queued.id]
    store.mark_enqueued(queued.id)  # the reconciler re-sent it
    assert store.jobs_to_resend(window) == []
    clock.advance(301)  # running's lease has now expired too, and its message is old
    assert {j.id for j in store.jobs_to_resend(window)} == {queued.id, running.id}


def test_count_jobs_by_status(store: Store) -> None:
    a = store.create_job("alice", make_spec())
    store.create_job("alice", make_spec())
    store.create_job("bob", make_spec())
    store.claim_job(a.id, "w1")
    counts = store.count_jobs_by_status()
    assert counts == {"queued": 2, "running": 1, "cancelling": 0, "succeeded": 0, "failed": 0, "cancelled": 0}
    assert store.count_jobs_by_status("bob")["queued"] == 1


# --- metrics, artifacts, datasets, keys ---------------------------------------------------------------------


def _metric_rows(store: Store, job_id: str) -> int:
    with store.engine.connect() as conn:
        query = sa.select(sa.func.count()).select_from(MetricPoint).where(MetricPoint.job_id == job_id)
        return conn.execute(query).scalar_one()


def test_metrics_upsert_is_idempotent(store: Store) -> None:
    job = store.create_job("alice", make_spec())
    points = [{"step": 1, "loss": 2.5, "lr": 1e-3}, {"step": 2, "loss": 2.0, "lr": 1e-3}]
    assert store.record_metrics(job.id, points) == 2
    assert store.record_metrics(job.id, points) == 2  # a redelivered task writes the same steps again
    assert _metric_rows(store, job.id) == 2
    store.record_metrics(job.id, [{"step": 2, "eval_loss": 2.2}])  # eval point at a training step: merged
    store.record_metrics(job.id, [{"step": 1, "loss": 2.4}])  # resumed run rewrote step 1: newest wins
    assert _metric_rows(store, job.id) == 2
    assert store.metrics_after(job.id) == [
        {"step": 1, "loss": 2.4, "lr": 1e-3},
        {"step": 2, "loss": 2.0, "lr": 1e-3, "eval_loss": 2.2},
    ]
    assert store.record_metrics(job.id, []) == 0


def test_metrics_after_pages_in_step_order(store: Store) -> None:
    job = store.create_job("alice", make_spec())
    store.record_metrics(job.id, [{"step": s, "loss": 1.0 / s} for s in range(10, 0, -1)])
    assert [p["step"] for p in store.metrics_after(job.id, after_step=3, limit=4)] == [4, 5, 6, 7]
    assert store.metrics_after(job.id, after_step=10) == []
    assert store.metrics_after("job_other") == []


def test_metrics_values_are_checked(store: Store) -> None:
    job = store.create_job("alice", make_spec())
    store.record_metrics(job.id, [{"step": 0, "loss": float("nan"), "grad": float("inf"), "note": "warmup"}])
    assert store.metrics_after(job.id) == [{"step": 0, "loss": None, "grad": None, "note": "warmup"}]
    for bad in ({"loss": 1.0}, {"step": -1}, {"step": "3"}, {"step": 1, "v": [1, 2]}):
        with pytest.raises(ValueError):
            store.record_metrics(job.id, [bad])


def test_artifacts_upsert_by_name(store: Store, clock: Clock) -> None:
    job = store.create_job("alice", make_spec())
    store.add_artifact(job.id, "adapter", "/a/1", 10, "0" * 64)
    clock.advance(5)
    again = store.add_artifact(job.id, "adapter", "/a/2", 20, "1" * 64)
    store.add_artifact(job.id, "loss.png", "/a/loss.png", 5, "2" * 64)
    assert (again.path, again.size, again.created_at) == ("/a/2", 20, T0 + timedelta(seconds=5))
    assert [a.name for a in store.list_artifacts(job.id)] == ["adapter", "loss.png"]
    assert store.get_artifact(job.id, "adapter").sha256 == "1" * 64
    assert store.get_artifact(job.id, "missing") is None


def test_datasets_are_owner_scoped(store: Store, clock: Clock) -> None:
    first = store.create_dataset("alice", "restaurants.jsonl", rows=120, size=4096, path="/d/1.jsonl")
    clock.advance(1)
    second = store.create_dataset("alice", "b.jsonl", rows=3, size=90, path="/d/2.jsonl", dataset_id="ds_00ff")
    assert first.id.startswith("ds_") and second.id == "ds_00ff"
    assert store.get_dataset(first.id, "alice").rows == 120
    assert store.get_dataset(first.id, "bob") is None
    assert [d.id for d in store.list_datasets("alice")] == [second.id, first.id]
    assert store.list_datasets("bob") == []


def test_api_keys(store: Store) -> None:
    key, plaintext = store.create_api_key("alice", label="laptop")
    other, _ = store.create_api_key("bob")
    assert plaintext.startswith("qaa_") and len(plaintext) > 40
    assert key.key_hash == hash_api_key(plaintext) and plaintext.startswith(key.prefix)
    assert store.verify_api_key(plaintext) == "alice"
    for wrong in ("", plaintext + "x", plaintext[:-1], key.key_hash, "x" * 10_000):
        assert store.verify_api_key(wrong) is None
    # The plaintext is stored nowhere.
    with store.engine.connect() as conn:
        for row in conn.execute(sa.text("SELECT * FROM api_keys")):
            assert all(plaintext not in str(value) for value in row)
    assert [k.id for k in store.list_api_keys("alice")] == [key.id]
    assert len(store.list_api_keys()) == 2
    assert store.revoke_api_key(key.id, owner="bob") is False  # not bob's
    assert store.revoke_api_key(key.id) is True
    assert store.revoke_api_key(key.id) is False  # already revoked
    assert store.verify_api_key(plaintext) is None
    assert store.list_api_keys("alice")[0].revoked_at == T0
    assert store.revoke_api_key(other.id, owner="bob") is True


def test_api_keys_expire_at_their_lifetime_and_not_before(store: Store) -> None:
    now = T0
    store.clock = lambda: now
    key, plaintext = store.create_api_key("alice", expires_in=timedelta(days=1))
    forever, forever_plaintext = store.create_api_key("alice")
    assert (key.expires_at, forever.expires_at) == (T0 + timedelta(days=1), None)
    now = T0 + timedelta(days=1) - timedelta(seconds=1)
    assert store.verify_api_key(plaintext) == "alice"
    now = T0 + timedelta(days=1)  # the expiry instant itself is past the key's life
    assert store.verify_api_key(plaintext) is None
    assert store.verify_api_key(forever_plaintext) == "alice"
    now = T0 + timedelta(days=10_000)
    assert store.verify_api_key(forever_plaintext) == "alice"
    listed = {k.id: k.expires_at for k in store.list_api_keys("alice")}
    assert listed == {key.id: T0 + timedelta(days=1), forever.id: None}  # read back aware, in UTC
    for lifetime in (timedelta(0), timedelta(seconds=-1)):
        with pytest.raises(ValueError, match="lifetime must be positive"):
            store.create_api_key("alice", expires_in=lifetime)
    assert len(store.list_api_keys("alice")) == 2  # nothing made by the refused calls


def test_naive_datetimes_are_refused(store: Store) -> None:
    store.clock = lambda: datetime(2026, 1, 1)
    with pytest.raises(ValueError, match="timezone-aware"):
        store.create_job("alice", make_spec())
