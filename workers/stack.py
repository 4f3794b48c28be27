"""`qaa up`: the API and its Celery workers as child processes of one command, supervised and stopped together.

Each child is `python -m workers.cli api|worker` in its own session, so a Ctrl-C in the terminal reaches
only this supervisor, which then stops the children in order: workers first (SIGTERM, a warm shutdown: a
running job stops at its next step, checkpoints, and goes back to its queue; see `workers.tasks`), then the
API. Whatever has not exited after `grace` seconds is killed with its whole process group, so nothing is
left behind; a job cut off that way still resumes, from its last checkpoint, once its lease expires.

While it runs, the supervisor does what a service manager would (`supervise`): a child that dies (a SIGKILL,
the OOM killer) is logged and started again after a backoff that doubles up to `MAX_BACKOFF_S`, while the
others serve on; its job resumes from its checkpoint once the lease passes. It gives up, saying why, only when
a child keeps dying within `FAST_DEATH_S` of its start. And the children die with the supervisor
(`PR_SET_PDEATHSIG`): a `qaa up` killed hard leaves no API or worker holding the port.

The settings decide the store and the broker: the embedded SQLite store and broker under `QAA_HOME` by
default, PostgreSQL and Redis when `QAA_DATABASE_URL` and `QAA_BROKER_URL` are set. Logs go to
`QAA_HOME/logs/`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from service.settings import Settings

#: How often the supervisor checks its children and how long one readiness probe may take.
POLL_S = 0.25
#: A child dead within this long of its start counts as failing to start; this many in a row and we give up.
FAST_DEATH_S, MAX_FAST_DEATHS = 15.0, 5
#: Restart backoff: 1 s, doubling per restart in a row, at most this.
MAX_BACKOFF_S = 30.0
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: the kernel sends it SIGKILL when the supervisor dies, however it dies."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class StackError(RuntimeError):
    """A child process failed to start or died; the message carries the end of its log."""


@dataclass
class Child:
    name: str
    args: list[str]
    log_path: Path
    popen: subprocess.Popen | None = field(default=None, repr=False)
    started_at: float = 0.0
    restarts: int = 0  # restarts in a row (reset once the child outlives FAST_DEATH_S)
    fast_deaths: int = 0
    restart_at: float | None = None

    def start(self, env: dict[str, str]) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                self.args,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self.started_at = time.monotonic()

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def signal(self, signum: int) -> None:
        if self.alive:
            self.popen.send_signal(signum)

    def kill_group(self) -> None:
        """SIGKILL the child's whole session (it and anything it started)."""
        if self.popen is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()


class Stack:
    """The API and `workers` worker processes on `settings`; a context manager that stops them on exit."""

    def __init__(self, settings: Settings, *, workers: int = 1, queues: str = "cpu,gpu,qpu"):
        self.settings = settings
        self.log_dir = settings.home_dir / "logs"
        python = [sys.executable, "-m", "workers.cli"]
        address = [f"--host={settings.host}", f"--port={settings.port}"]
        self.api = Child("api", [*python, "api", *address], self.log_dir / "api.log")
        self.workers = [
            Child(
                f"worker-{i}",
                [*python, "worker", f"--queues={queues}", f"--name=worker{i}@%h"],
                self.log_dir / f"worker-{i}.log",
            )
            for i in range(1, workers + 1)
        ]

    @property
    def url(self) -> str:
        return self.settings.url

    @property
    def children(self) -> list[Child]:
        return [self.api, *self.workers]

    def start(self, timeout: float = 180) -> None:
        """Migrate the store, start every child and return once the API is ready and every worker consumes.

        The schema is migrated here, once, so the children never race to migrate the same database.
        """
        from service.settings import private_home
        from service.store import migrate

        private_home(self.settings)
        migrate(self.settings.sqlalchemy_url)
        env = self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        offsets = {}
        for child in self.children:
            offsets[child.name] = child.log_path.stat().st_size if child.log_path.exists() else 0
            child.start(env)
        deadline = time.monotonic() + timeout
        waiting = {child.name for child in self.children}
        while waiting:
            self.check()
            for child in self.children:
                if child.name in waiting and self._ready(child, offsets[child.name]):
                    waiting.discard(child.name)
            if time.monotonic() > deadline:
                self.stop(grace=5)
                raise StackError(
                    f"not ready after {timeout:g} s: {', '.join(sorted(waiting))} (logs in {self.log_dir})"
                )
            time.sleep(POLL_S)

    def _ready(self, child: Child, offset: int) -> bool:
        if child is self.api:
            try:
                return httpx.get(self.url + "/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False
        with child.log_path.open("rb") as log:  # Celery logs "<name> ready." once it consumes
            log.seek(offset)
            return b" ready." in log.read()

    def check(self) -> None:
        """Raise `StackError` if a child has exited (the others are stopped first)."""
        for child in self.children:
            if child.popen is not None and not child.alive:
                code = child.popen.returncode
                self.stop(grace=10)
                raise StackError(
                    f"{child.name} exited with code {code}; the end of {child.log_path}:\n{child.log_tail()}"
                )

    def supervise(self, say=lambda line: print(line, file=sys.stderr, flush=True)) -> None:
        """One round of supervision (call every `POLL_S`): restart dead children after their backoff; raise
        `StackError` (everything stopped first) for a child that keeps dying at start."""
        now = time.monotonic()
        for child in self.children:
            if child.restart_at is not None:
                if now >= child.restart_at:
                    child.restart_at = None
                    child.start(self.env)
                    say(f"qaa up: {child.name} restarted (restart {child.restarts} in a row)")
                continue
            if child.popen is None or child.alive:
                if child.alive and now - child.started_at > FAST_DEATH_S:
                    child.restarts = child.fast_deaths = 0
                continue
            code = child.popen.returncode
            child.fast_deaths = child.fast_deaths + 1 if now - child.started_at < FAST_DEATH_S else 0
            if child.fast_deaths >= MAX_FAST_DEATHS:
                self.stop(grace=10)
                raise StackError(
                    f"{child.name} died {child.fast_deaths} times within {FAST_DEATH_S:g} s of starting (last exit "
                    f"code {code}); giving up. The end of {child.log_path}:\n{child.log_tail()}"
                )
            backoff = min(2.0**child.restarts, MAX_BACKOFF_S)
            child.restarts += 1
            child.restart_at = now + backoff
            say(f"qaa up: {child.name} exited with code {code}; restarting it in {backoff:g} s (the API and the "
                "other workers keep serving; its job resumes from its checkpoint)")  # fmt: skip

    def stop(self, grace: float = 60) -> None:
        """Workers first (warm shutdown: running jobs are released), then the API; kill what lingers."""
        for group in (self.workers, [self.api]):
            for child in group:
                child.signal(signal.SIGTERM)
            deadline = time.monotonic() + grace
            for child in group:
                if child.popen is not None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        child.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
                child.kill_group()

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def describe(settings: Settings) -> dict[str, str]:
    """Where the stack keeps its state, passwords hidden: for `qaa up`'s banner."""
    from kombu.utils.url import maybe_sanitize_url

    from service.queueing import broker_url

    return {
        "store": maybe_sanitize_url(settings.sqlalchemy_url),
        "broker": maybe_sanitize_url(broker_url(settings)),
        "logs": str(settings.home_dir / "logs"),
    }
