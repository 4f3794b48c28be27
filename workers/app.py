"""The worker's Celery app: the API's app (`service.queueing`) with the tasks registered, and the worker
process's life: the store migrated at start, one store per process, the reconciler thread in the main process.

Start one with `qaa worker` (or `celery -A workers.app worker`, with the same options as `workers.cli`).

With the prefork pool (`--concurrency` > 1) a SIGKILL reaches only the main process; an orphaned child would
go on training and renewing its lease. Celery's prefork initializer sets `PR_SET_PDEATHSIG` (SIGKILL) in every
child, so children die with their parent; `tests/test_worker.py` checks that this stays true.
"""

from __future__ import annotations

import logging
import os
import socket

from celery.exceptions import Reject
from celery.signals import worker_init, worker_process_init, worker_ready, worker_shutdown, worker_shutting_down

from service import queueing
from service.settings import get_settings, private_home
from service.store import Store, migrate
from workers.reconciler import Reconciler
from workers.tasks import RELEASED, SHUTTING_DOWN, run_train

log = logging.getLogger(__name__)

app = queueing.celery_app()

_stores: dict[int, Store] = {}
_reconciler: Reconciler | None = None


def worker_store() -> Store:
    """This process's store (opened on first use, so a forked child never shares its parent's connections)."""
    store = _stores.get(os.getpid())
    if store is None:
        store = _stores[os.getpid()] = Store.from_settings(get_settings())
    return store


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@app.task(name=queueing.TRAIN_TASK, ignore_result=True)
def train(job_id: str) -> str:
    """Run job `job_id` (see `workers.tasks.run_train`); never raises, so the worker keeps serving.

    A worker shutting down takes no new job, and a job it handed back: either way the message is requeued
    (`Reject`, with `acks_late`) for the next worker, instead of being acknowledged and lost.
    """
    if SHUTTING_DOWN.is_set():
        raise Reject("this worker is shutting down", requeue=True)
    try:
        outcome = run_train(job_id, worker_store(), get_settings(), worker_id())
    except Exception:  # e.g. the store is down at claim time: the job stays queued and is re-sent later
        log.exception("job %s: the task failed before the job could be ended", job_id)
        return "error"
    if outcome == RELEASED:
        raise Reject("job handed back at shutdown", requeue=True)
    return outcome


@worker_init.connect
def _migrate(**_: object) -> None:
    private_home(get_settings())
    migrate(get_settings().sqlalchemy_url)


@worker_ready.connect
def _start_reconciler(**_: object) -> None:
    global _reconciler
    _reconciler = Reconciler(worker_store(), get_settings())
    _reconciler.start()


@worker_shutting_down.connect
def _release_running_job(**_: object) -> None:
    """SIGTERM/SIGINT (warm shutdown): the running job stops at its next step and goes back to its queue,
    instead of the worker waiting for it to finish. With `--concurrency` > 1 the children finish their jobs."""
    SHUTTING_DOWN.set()


@worker_shutdown.connect
def _stop_reconciler(**_: object) -> None:
    if _reconciler is not None:
        _reconciler.stop()


@worker_process_init.connect
def _child_start(**_: object) -> None:
    for store in _stores.values():  # inherited through fork: drop without closing the parent's sockets
        store.engine.dispose(close=False)
    _stores.clear()
