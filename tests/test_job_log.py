"""A job's own log: what its worker process logged while it ran, with every secret redacted."""

from __future__ import annotations

import logging

from workers import job_log


def test_records_are_kept_while_the_job_runs_and_secrets_never_reach_the_file(tmp_path):
    logger = logging.getLogger("qaa.test.job")
    logger.info("before the job: not its line")
    with job_log.captured(tmp_path) as formatter:
        formatter.secrets.add("ibm-secret-token-0123456789")
        logger.info("signed in with ibm-secret-token-0123456789 as instance crn:v1")
        logger.warning("the client sent Authorization: Bearer abc.def.ghi")
        logger.error("key qaa_live_0123456789abcdef refused")
    logger.info("after the job: not its line either")
    text = (tmp_path / job_log.LOG_NAME).read_text()
    lines = text.splitlines()
    assert "INFO qaa.test.job: signed in with [redacted] as instance crn:v1" in lines[0]
    assert "Bearer [redacted]" in lines[1] and "key [redacted] refused" in lines[2]
    assert len(lines) == 3
    assert "before the job" not in text and "after the job" not in text
    for secret in ("ibm-secret-token", "abc.def.ghi", "qaa_live_"):
        assert secret not in text
    with job_log.captured(tmp_path):  # a retried attempt appends
        logger.info("second attempt")
    assert (tmp_path / job_log.LOG_NAME).read_text().startswith(text) and "second attempt" in (
        tmp_path / job_log.LOG_NAME
    ).read_text()
