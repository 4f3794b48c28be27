"""The Celery side of the API: one Celery app configured from the settings, and how jobs reach a worker.

The API process only sends (`enqueue`, `submit_job`) and probes (`broker_ping`, `queue_depths`); the worker
(`workers.app`) registers the tasks on the same app. Tasks are sent by name, so this module imports
nothing of `workers` and stays light (Celery and kombu only; no torch).

Brokers:
- Redis (`QAA_BROKER_URL=redis://...`) in production.
- Embedded (no `QAA_BROKER_URL`): kombu's SQLAlchemy transport on `QAA_HOME/broker.db`, no server needed.
  Its transport options all go to `create_engine`, so its polling period cannot be set there; a subclass
  (`EmbeddedTransport`) sets it instead, 0.25 s rather than kombu's 1 s.

Delivery is at least once, and that is enough: the job row and its lease in the store decide what runs, so a
duplicate message is a no-op (`Store.claim_job` says no), and a lost one is re-sent by the reconciler
(`workers.reconciler`). Messages are acknowledged after the task returns (`acks_late`) and one at a time
(prefetch 1), so a killed worker's message is never acknowledged. No result backend: results live in the store.

Example:
    >>> job = submit_job(store, "alice", spec)       # doctest: +SKIP
    >>> queue_depths()                                # doctest: +SKIP
    {'cpu': 1, 'gpu': 0, 'qpu': 0}
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from functools import lru_cache
from typing import TYPE_CHECKING

from celery import Celery
from kombu import Exchange, Queue
from kombu.transport import sqlalchemy as kombu_sqlalchemy

from service.settings import Settings, get_settings

if TYPE_CHECKING:
    from service.spec import JobSpec
    from service.store import Job, Spend, Store

log = logging.getLogger(__name__)

QUEUES = ("cpu", "gpu", "qpu")
TRAIN_TASK = "workers.train"

#: Redis re-delivers a message left unacknowledged this long. A job's message stays unacknowledged while it
#: runs, so this is longer than most jobs; correctness never depends on it (see the module docstring).
VISIBILITY_TIMEOUT_S = 2 * 3600
#: How long a probe (`broker_ping`, `queue_depths`) or a connection attempt may take before giving up.
PROBE_TIMEOUT_S = 3.0
#: Publishing retries briefly, then fails: the job row already exists, and the reconciler sends it later.
PUBLISH_RETRY_POLICY = {"max_retries": 2, "interval_start": 0.0, "interval_step": 0.5, "interval_max": 1.0}
#: A probe tries to connect twice, quickly: a failed probe is an answer too.
PROBE_CONNECT = {"max_retries": 1, "interval_start": 0.0, "interval_step": 0.2, "interval_max": 0.2}
#: SQLite lock wait (seconds) for the embedded broker, shared by the API and the workers.
EMBEDDED_LOCK_TIMEOUT_S = 30

_probes = ThreadPoolExecutor(max_workers=2, thread_name_prefix="qaa-broker-probe")


class EmbeddedTransport(kombu_sqlalchemy.Transport):
    """kombu's SQLAlchemy transport, polling every 0.25 s instead of every second."""

    polling_interval = 0.25


def broker_url(settings: Settings | None = None) -> str:
    """`QAA_BROKER_URL`, or the embedded broker's SQLite file under `QAA_HOME`."""
    settings = settings or get_settings()
    return settings.broker_url or f"sqlite:///{settings.home_dir / 'broker.db'}"


def celery_app(settings: Settings | None = None) -> Celery:
    """The Celery app for the settings' broker (one per broker URL per process)."""
    settings = settings or get_settings()
    if settings.broker_url is None:
        settings.home_dir.mkdir(parents=True, exist_ok=True)
    return _app_for(broker_url(settings), embedded=settings.broker_url is None)


@lru_cache(maxsize=8)
def _app_for(url: str, *, embedded: bool) -> Celery:
    app = Celery("qaa", set_as_current=False)
    if embedded:
        transport = f"{__name__}:EmbeddedTransport"
        options: dict = {"connect_args": {"timeout": EMBEDDED_LOCK_TIMEOUT_S}}
    else:
        transport = None
        # socket_timeout must exceed kombu's 1 s BRPOP wait; it bounds a publish on a dead connection.
        options = {
            "visibility_timeout": VISIBILITY_TIMEOUT_S,
            "socket_connect_timeout": PROBE_TIMEOUT_S,
            "socket_timeout": 10.0,
        }
    app.conf.update(
        broker_url=url,
        broker_transport=transport,
        broker_transport_options=options,
        broker_connection_timeout=PROBE_TIMEOUT_S,
        broker_connection_retry_on_startup=True,
        task_queues=[Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES],
        task_default_queue="cpu",
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        task_publish_retry=True,
        task_publish_retry_policy=PUBLISH_RETRY_POLICY,
        worker_prefetch_multiplier=1,
        # A broker hiccup must not stop a running job: its lease is in the store, not in the connection.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # Events and remote control need fanout exchanges, which the embedded broker lacks; nothing uses them.
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_enable_remote_control=False,
    )
    return app


def enqueue(job_id: str, queue: str) -> None:
    """Send `workers.train(job_id)` to `queue`; raises if the broker cannot take it (after brief retries)."""
    if queue not in QUEUES:
        raise ValueError(f"unknown queue {queue!r}; queues are {', '.join(QUEUES)}")
    celery_app().send_task(TRAIN_TASK, args=[job_id], queue=queue)


def submit_job(store: Store, owner: str, spec: JobSpec, estimate: Spend | None = None) -> Job:
    """Store the job, then send its message: the API's 201.

    The row comes first, so there is never a message without a job. If the broker cannot take the message,
    the job is still accepted (`queued`, whole, and visible to its owner): it has no `enqueued_at`, and the
    reconciler sends it once the broker answers. Answering 503 instead would leave a stored job behind an
    error, and a client that retried would get two jobs.
    """
    job = store.create_job(owner, spec, estimate)
    try:
        enqueue(job.id, job.queue)
    except Exception as exc:  # any send failure: the row is whole, the reconciler sends it later
        log.warning("job %s stored but not sent (%s: %s); the reconciler will send it", job.id, type(exc).__name__, exc)
        return job
    store.mark_enqueued(job.id)
    return job


def _probe(fn, timeout: float):
    """Run `fn` in a helper thread and give up after `timeout`: a probe must never hang a request."""
    return _probes.submit(fn).result(timeout=timeout)


def _depths() -> dict[str, int]:
    with celery_app().connection_for_read(transport_options=PROBE_CONNECT) as conn:
        channel = conn.default_channel
        return {name: int(channel.queue_declare(queue=name).message_count) for name in QUEUES}


def queue_depths(timeout: float = PROBE_TIMEOUT_S) -> dict[str, int]:
    """Messages waiting (not yet delivered) in each queue; raises if the broker does not answer in time."""
    try:
        return _probe(_depths, timeout)
    except FutureTimeout as exc:
        raise TimeoutError(f"the broker did not answer within {timeout:g} s") from exc


def broker_ping(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """True when the broker answers a queue query within `timeout`; never raises, never hangs."""
    try:
        queue_depths(timeout)
    except Exception as exc:  # unreachable in any way: not ready
        log.info("broker ping failed: %s: %s", type(exc).__name__, exc)
        return False
    return True
