"""A job's own log: every log record its worker process emits while the job runs, in `run_dir/job.log`.

A worker process runs one job at a time (Celery's prefork children), so the records emitted between claim and
end (the trainer's, the runtime's, the lease's) are that job's. Secrets are redacted before a line is
written: API keys (`qaa_...`), bearer tokens, and the exact secrets the worker handles for the job (the owner's
IBM token). The file is registered as the artifact `job.log` however the job ends, appended to by every attempt,
and `qaa-client logs JOB` prints it.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from pathlib import Path

LOG_NAME = "job.log"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
REDACTED = "[redacted]"
#: Shapes of secret that never reach the file, whoever logs them.
PATTERNS = (re.compile(r"qaa_[A-Za-z0-9_-]{8,}"), re.compile(r"(?i)(bearer\s+)\S+"))


class Redacting(logging.Formatter):
    """The standard format, with secrets replaced by `[redacted]` (the known ones first, then by shape)."""

    def __init__(self) -> None:
        super().__init__(FORMAT)
        self.secrets: set[str] = set()

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        for secret in sorted(self.secrets, key=len, reverse=True):
            text = text.replace(secret, REDACTED)
        text = PATTERNS[0].sub(REDACTED, text)
        return PATTERNS[1].sub(lambda m: m.group(1) + REDACTED, text)


@contextlib.contextmanager
def captured(run_dir: Path) -> Iterator[Redacting]:
    """Append every record (INFO and up) emitted in this process to `run_dir/job.log` while the block runs;
    yields the formatter, whose `secrets` the caller adds the job's secrets to."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / LOG_NAME, encoding="utf-8")
    handler.setLevel(logging.INFO)
    formatter = Redacting()
    handler.setFormatter(formatter)
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    try:
        yield formatter
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)
        handler.close()
