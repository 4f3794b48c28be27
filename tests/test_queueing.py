"""`service.queueing` on the embedded broker and on Redis: configuration, routing, probes, submission."""

from __future__ import annotations

import socket

import pytest
from stack import Services, free_port, redis_url

from service import queueing
from service.spec import parse_spec
from service.store import JobStatus

SPEC = {"model": "builtin:tiny-llama", "dataset": "builtin:restaurants", "method": {"kind": "lora"}}
IBM_SPEC = {**SPEC, "method": {"kind": "qaa"}, "quantum": {"backend": "ibm:ibm_torino", "gradient": "spsa"}}


@pytest.fixture(params=["embedded", "redis"])
def services(request, tmp_path, monkeypatch):
    if request.param == "embedded":
        stack = Services.embedded(tmp_path)
    else:  # the store stays SQLite here: these tests are about the broker
        stack = Services(tmp_path / "qaa-home", broker_url=redis_url())
    with stack.active(monkeypatch):
        yield stack
    stack.close()


def test_the_app_is_configured_for_at_least_once_delivery(services):
    conf = queueing.celery_app().conf
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.task_ignore_result is True
    assert {q.name: (q.exchange.name, q.routing_key) for q in conf.task_queues} == {
        "cpu": ("cpu", "cpu"),
        "gpu": ("gpu", "gpu"),
        "qpu": ("qpu", "qpu"),
    }
    if services.broker_url:
        assert conf.broker_transport_options["visibility_timeout"] == queueing.VISIBILITY_TIMEOUT_S
    else:
        assert conf.broker_url == f"sqlite:///{services.home / 'broker.db'}"
        assert conf.broker_transport.endswith(":EmbeddedTransport")


def test_messages_land_in_their_queue_and_are_counted(services):
    assert queueing.broker_ping() is True
    assert queueing.queue_depths() == {"cpu": 0, "gpu": 0, "qpu": 0}
    for queue in ("qpu", "gpu", "qpu"):
        queueing.enqueue("job_x", queue)
    assert queueing.queue_depths() == {"cpu": 0, "gpu": 1, "qpu": 2}
    with pytest.raises(ValueError, match="unknown queue 'tpu'; queues are cpu, gpu, qpu"):
        queueing.enqueue("job_x", "tpu")


def test_submit_writes_the_row_then_sends_to_the_spec_queue(services):
    store = services.store()
    job = queueing.submit_job(store, "alice", parse_spec(IBM_SPEC))
    row = store.load_job(job.id)
    assert (row.status, row.queue, row.owner) == (JobStatus.QUEUED, "qpu", "alice")
    assert row.enqueued_at is not None
    assert queueing.queue_depths() == {"cpu": 0, "gpu": 0, "qpu": 1}


@pytest.mark.timeout(60)
def test_a_dead_broker_fails_probes_fast_and_submission_keeps_the_job(tmp_path, monkeypatch):
    dead = Services(tmp_path / "qaa-home", broker_url=f"redis://127.0.0.1:{free_port()}/0")
    with dead.active(monkeypatch):
        assert queueing.broker_ping() is False
        with pytest.raises(Exception, match="Connection refused"):
            queueing.queue_depths()
        job = queueing.submit_job(dead.store(), "alice", parse_spec(SPEC))
        row = dead.store().load_job(job.id)
        # Accepted whole: queued, never marked as sent, so the reconciler sends it once the broker is back.
        assert (row.status, row.enqueued_at) == (JobStatus.QUEUED, None)
    dead.close()


@pytest.mark.timeout(60)
def test_a_broker_that_accepts_but_never_answers_fails_the_probe_within_its_timeout(tmp_path, monkeypatch):
    with socket.socket() as silent:  # the kernel completes connections to a listening socket; nobody replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        with Services(tmp_path / "qaa-home", broker_url=f"redis://127.0.0.1:{port}/0").active(monkeypatch):
            assert queueing.broker_ping(timeout=0.5) is False
            with pytest.raises(TimeoutError, match="did not answer within 0.5 s"):
                queueing.queue_depths(timeout=0.5)
