"""The reconciler: finishes jobs nobody will finish, and re-sends jobs whose message was lost.

It runs as a daemon thread inside every worker process (`qaa worker` starts it), so the embedded stack and
production need nothing extra: no beat scheduler, no separate service. Several workers reconciling at once is
safe: a job re-sent twice runs once (the lease), and settling is a conditional UPDATE.

What it re-sends (`Store.jobs_to_resend` picks jobs older than `resend_after_seconds` since their last send):
- a `running` job whose worker's lease expired (the worker died; its message is unacknowledged or gone):
  at once, the first time, so another worker resumes it from its checkpoint;
- a `queued` job, or an orphan already re-sent since its lease expired, only while its queue holds no
  waiting message. A message still waiting behind others is not lost, and re-sending every waiting job each
  period would flood a long queue with duplicates (an orphan behind 100 jobs was sent 166 times in a soak
  run before this rule covered orphans too); once the queue drains, whatever is still waiting has no
  message (lost in a broker restart, or never sent because the broker was down) and is sent.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import timedelta

from service import queueing
from service.settings import Settings
from service.store import Job, JobStatus, Store

log = logging.getLogger(__name__)


@dataclass
class Reconciled:
    settled: int = 0
    resent: list[str] = field(default_factory=list)


def reconcile_once(store: Store, settings: Settings) -> Reconciled:
    """One pass: settle abandoned jobs, re-send lost messages. Raises if the store or broker is down."""
    done = Reconciled(settled=store.settle_abandoned())
    candidates = store.jobs_to_resend(timedelta(seconds=settings.resend_after_seconds))
    if not candidates:
        return done
    depths = queueing.queue_depths()
    for job in candidates:
        if _has_waiting_message(job) and depths.get(job.queue, 0) > 0:
            continue
        queueing.enqueue(job.id, job.queue)
        store.mark_enqueued(job.id)
        done.resent.append(job.id)
    if done.settled or done.resent:
        log.info("reconciler: settled %d job(s), re-sent %s", done.settled, done.resent or "none")
    return done


def _has_waiting_message(job: Job) -> bool:
    """Queued, or orphaned and re-sent after its lease expired: its message, if any, waits in the queue."""
    if job.status == JobStatus.QUEUED:
        return True
    return job.enqueued_at is not None and job.lease_expires_at is not None and job.enqueued_at > job.lease_expires_at


class Reconciler(threading.Thread):
    """Runs `reconcile_once` now and then every `interval` seconds until `stop()`; errors are logged."""

    def __init__(self, store: Store, settings: Settings, interval: float | None = None):
        super().__init__(name="qaa-reconciler", daemon=True)
        self.store, self.settings = store, settings
        # A heartbeat period: a dead worker's job is re-sent about as soon as its lease could expire.
        self.interval = interval if interval is not None else float(settings.heartbeat_seconds)
        self._stop_event = threading.Event()

    def run(self) -> None:
        while True:
            try:
                reconcile_once(self.store, self.settings)
            except Exception as exc:  # store or broker down: try again next period
                log.warning("reconciler pass failed: %s: %s", type(exc).__name__, exc)
            if self._stop_event.wait(self.interval):
                return

    def stop(self) -> None:
        self._stop_event.set()
