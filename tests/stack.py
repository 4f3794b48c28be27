"""Real service processes for tests: `qaa worker` and `qaa api` subprocesses on a chosen store and broker.

    services = Services.embedded(tmp_path)              # SQLite store + embedded broker under tmp_path
    services = Services.production(tmp_path, pg_url, redis_url)
    with start_worker(services) as worker:              # waits until Celery says "ready"
        job = submit_job(services.store(), "alice", spec)
        wait_until(lambda: services.store().load_job(job.id).status == "succeeded", 60)
        worker.kill()                                   # SIGKILL

Redis and PostgreSQL come from `QAA_TEST_REDIS_URL` / `QAA_TEST_DATABASE_URL`; `redis_url()` and
`postgres_database()` skip the test when they are unreachable, or fail it under `CI=true`.
Processes are started with `python -m workers.cli` (the `qaa` script without needing it installed), their
output goes to a log file (`Proc.log()`), and they are killed when the `with` block ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/5"
DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
#: Short leases so crash tests take seconds: a dead worker's job is claimable 4 s after its last heartbeat.
FAST_LEASES = {"QAA_LEASE_SECONDS": "4", "QAA_HEARTBEAT_SECONDS": "1", "QAA_RESEND_AFTER_SECONDS": "2"}


def unavailable(message: str) -> None:
    """Skip a test whose service is missing, or fail it under `CI=true`, where every service must be there."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def wait_until(predicate: Callable[[], Any], timeout: float, *, interval: float = 0.1, what: str = "") -> Any:
    """Poll `predicate` until it returns something truthy (returned); AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what or predicate}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_url() -> str:
    """The test Redis URL (a dedicated db number), flushed; skips/fails when Redis is unreachable."""
    import redis

    url = os.environ.get("QAA_TEST_REDIS_URL", DEFAULT_REDIS_URL)
    client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
    try:
        client.flushdb()
    except redis.RedisError as exc:
        unavailable(f"Redis not reachable at {url}: {exc}")
    finally:
        client.close()
    return url


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A new, migrated PostgreSQL database next to `QAA_TEST_DATABASE_URL`, dropped afterwards."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import OperationalError
    from sqlalchemy.pool import NullPool

    from service.store import make_engine, migrate, normalize_url

    base = normalize_url(os.environ.get("QAA_TEST_DATABASE_URL", DEFAULT_PG_URL))
    admin = make_engine(base, isolation_level="AUTOCOMMIT", poolclass=NullPool, connect_args={"connect_timeout": 5})
    try:
        with admin.connect():
            pass
    except OperationalError as exc:
        admin.dispose()
        unavailable(f"PostgreSQL not reachable at {make_url(base)!r}: {exc.orig}")
    name = f"qaa_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = make_url(base).set(database=name).render_as_string(hide_password=False)
    try:
        migrate(url)
        yield url
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def truncate_store(url: str) -> None:
    from sqlalchemy.pool import NullPool

    from service.store import make_engine

    engine = make_engine(url, poolclass=NullPool)
    with engine.begin() as conn:
        conn.exec_driver_sql("TRUNCATE metric_points, artifacts, jobs, datasets, api_keys, credentials CASCADE")
    engine.dispose()


@dataclass
class Services:
    """Where a stack's processes keep their state: `QAA_HOME`, and store/broker URLs (None = embedded)."""

    home: Path
    database_url: str | None = None
    broker_url: str | None = None
    extra_env: dict[str, str] = field(default_factory=lambda: dict(FAST_LEASES))
    _store: Any = None

    @classmethod
    def embedded(cls, root: Path, **extra: str) -> Services:
        return cls(root / "qaa-home", extra_env={**FAST_LEASES, **extra})

    @classmethod
    def production(cls, root: Path, database_url: str, broker_url: str, **extra: str) -> Services:
        return cls(root / "qaa-home", database_url, broker_url, {**FAST_LEASES, **extra})

    @property
    def name(self) -> str:
        return "redis+postgresql" if self.broker_url else "embedded"

    def env(self) -> dict[str, str]:
        """This process's environment without any `QAA_*`, plus this stack's."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("QAA_")}
        env.update({"QAA_HOME": str(self.home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
        env.update({"PYTHONUNBUFFERED": "1", **self.extra_env})
        if self.database_url:
            env["QAA_DATABASE_URL"] = self.database_url
        if self.broker_url:
            env["QAA_BROKER_URL"] = self.broker_url
        return env

    def settings(self):
        from service.settings import Settings

        qaa = {k[4:].lower(): v for k, v in self.env().items() if k.startswith("QAA_")}
        return Settings(**qaa)

    def store(self):
        """A store on this stack's database (migrated; one per `Services`)."""
        if self._store is None:
            from service.store import Store

            self._store = Store.from_settings(self.settings(), migrate=True)
        return self._store

    @contextlib.contextmanager
    def active(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
        """Point this process's settings (`get_settings()`, hence `service.queueing`) at this stack."""
        from service.settings import get_settings

        for key in [k for k in os.environ if k.startswith("QAA_")]:
            monkeypatch.delenv(key)
        for key, value in self.env().items():
            if key.startswith("QAA_"):
                monkeypatch.setenv(key, value)
        get_settings.cache_clear()
        try:
            yield
        finally:
            get_settings.cache_clear()

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None


class Proc:
    """A service subprocess with its output in a log file; a context manager that kills it on exit."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path):
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.popen = subprocess.Popen(
            args, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float) -> None:
        def seen() -> bool:
            if self.popen.poll() is not None:
                raise AssertionError(f"process exited ({self.popen.returncode}) before {text!r}:\n{self.log()}")
            return text in self.log()

        wait_until(seen, timeout, interval=0.2, what=f"{text!r} in {self.log_path}")

    def kill(self) -> None:
        """SIGKILL the process (its children, if any, are left to their own fate, as in a real crash)."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=30)

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM, then SIGKILL the whole process group if it has not exited within `timeout`."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)  # leftovers of its process group
        self._log.close()

    def __enter__(self) -> Proc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(timeout=5)


def spawn_worker(
    services: Services, *, queues: str = "cpu,gpu,qpu", concurrency: int = 1, name: str = "worker"
) -> Proc:
    """`qaa worker` on `services`, returned at once: it takes seconds to be ready, and a test that watches a running
    job meanwhile must not stop watching for that long."""
    log_path = services.home.parent / f"{name}-{uuid.uuid4().hex[:6]}.log"
    services.home.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "workers.cli", "worker", f"--queues={queues}", f"--concurrency={concurrency}"]
    return Proc(args, services.env(), log_path)


def start_worker(
    services: Services,
    *,
    queues: str = "cpu,gpu,qpu",
    concurrency: int = 1,
    name: str = "worker",
    ready_timeout: float = 120,
) -> Proc:
    """`qaa worker` on `services`, returned once Celery reports it ready to consume."""
    proc = spawn_worker(services, queues=queues, concurrency=concurrency, name=name)
    try:
        proc.wait_for_log(" ready.", ready_timeout)
    except BaseException:
        proc.stop(timeout=5)
        raise
    return proc


def start_api(services: Services, *, port: int | None = None, ready_timeout: float = 60) -> tuple[Proc, str]:
    """`qaa api` on `services` and a free port; returns the process and its base URL once /healthz answers."""
    import httpx

    port = port or free_port()
    log_path = services.home.parent / f"api-{uuid.uuid4().hex[:6]}.log"
    services.home.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "workers.cli", "api", "--host=127.0.0.1", f"--port={port}"]
    proc = Proc(args, services.env(), log_path)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if proc.popen.poll() is not None:
            raise AssertionError(f"API exited ({proc.popen.returncode}):\n{proc.log()}")
        try:
            return httpx.get(url + "/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(healthy, ready_timeout, interval=0.2, what=f"{url}/healthz")
    except BaseException:
        proc.stop(timeout=5)
        raise
    return proc, url
