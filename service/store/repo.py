"""`Store`: the only code that reads or writes the job store; the API and the workers call its methods."""

from __future__ import annotations

from service.store.credentials import CredentialRepo
from service.store.jobs import JobRepo
from service.store.records import RecordRepo


class Store(JobRepo, RecordRepo, CredentialRepo):
    """The job store.

    Example:
        >>> store = Store.from_settings(migrate=True)            # doctest: +SKIP
        >>> job = store.create_job("alice", spec)                 # doctest: +SKIP
        >>> store.claim_job(job.id, "worker-1").status            # doctest: +SKIP
        <JobStatus.RUNNING: 'running'>
    """
