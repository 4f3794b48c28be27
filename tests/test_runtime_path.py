"""The IBM path, driven whole on fake backends in the runtime's local testing mode: the runner that hardware uses
(`RuntimeRunner`) binds every adapter of a model to one run, splits a step into several runtime jobs at the
10-million-execution limit, collects, counts, retries a failed job once, times out, cancels and closes."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from torch import nn

import circuits
from circuits import QAAConfig
from circuits.backends import ExactEngine, environment, make_runner
from circuits.backends.fake import fake_backend
from circuits.backends.runtime import RuntimeRunner
from circuits.cost_estimate import MAX_EXECUTIONS_PER_JOB
from circuits.execution import ExecutionCancelled, RuntimeJobFailed, RuntimeJobTimeout

D_IN = 8  # 3 qubits
TOKENS = 5


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory):
    environment.configure(cache_dir=tmp_path_factory.getbasetemp() / "qaa-cache")


def two_adapter_model(config: QAAConfig) -> nn.Module:
    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(D_IN, D_IN))
    model.add_module("v_proj", nn.Linear(D_IN, D_IN))
    circuits.inject_qaa(model, config)
    for layer in circuits.qaa_adapters(model).values():
        nn.init.normal_(layer.up.weight)  # a non-zero update, so the readout reaches the loss
    return model


def step(model: nn.Module) -> torch.Tensor:
    x = torch.randn(TOKENS, D_IN, generator=torch.Generator().manual_seed(3))
    loss = model(x).square().sum()
    loss.backward()
    return loss


def fake_config(**options) -> QAAConfig:
    return QAAConfig(layers=1, backend="fake:FakeManilaV2", gradient="parameter-shift", input_grad="none", **options)


def test_fake_and_ibm_backends_run_the_same_runner():
    runner = make_runner(fake_config())
    assert type(runner) is RuntimeRunner and runner.local and runner.name == "fake:fake_manila"
    # ibm: builds the very same class around the signed-in device (`backends.make_runner`); only `local` differs
    hardware = RuntimeRunner(fake_config(), environment.environment(), fake_backend("FakeTorino"), local=False)
    assert (hardware.compact, hardware.max_bindings) == (False, MAX_EXECUTIONS_PER_JOB // 4096)


@pytest.mark.slow
def test_a_step_splits_into_runtime_jobs_of_one_batch_counted_like_the_estimate():
    # 120,000 shots: at most 83 parameter sets per runtime job, so each adapter's 5 x 19 rows take 2 jobs (a
    # split needs more than 10^7 executions per adapter: 23 M shots are simulated here, about 15 s)
    config = fake_config(shots=120_000)
    model = two_adapter_model(config)
    with circuits.execution(model) as run:
        step(model)
        runner = run.runner
        assert runner.modes_opened == 1 and runner.modes_closed == 0  # one Batch for both adapters
    est = circuits.estimate(config, tokens_per_step=TOKENS, steps=1, d_in=D_IN, adapters=2)
    assert runner.max_bindings == 83
    assert run.usage.circuits == est.circuits_per_step == 2 * TOKENS * 19
    assert run.usage.primitive_calls == est.runtime_jobs == 4
    assert run.usage.shots == est.shots
    assert len(set(run.runtime_job_ids)) == 4 and run.describe()["sessions_closed"] == 1
    # the run over, the adapters are back on the exact engine (the backend was the run's, not theirs)
    assert all(isinstance(layer.engine, ExactEngine) for layer in circuits.qaa_adapters(model).values())


def test_the_same_weights_rebind_to_another_backend():
    model = two_adapter_model(fake_config(shots=20_000))
    x = torch.randn(TOKENS, D_IN, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        with circuits.execution(model, QAAConfig(layers=1)) as exact:
            on_exact = model(x)
        aer = QAAConfig(layers=1, backend="aer", gradient="parameter-shift")
        with circuits.execution(model, aer):
            on_aer = model(x)
        with circuits.execution(model) as fake:
            on_fake = model(x)
    assert exact.usage.circuits == 0 and torch.allclose(on_exact, on_aer, atol=1e-4)
    assert fake.usage.circuits == 2 * TOKENS and (on_fake - on_exact).abs().max() > 1e-3  # device noise shows


class FlakyRunner(RuntimeRunner):
    """A fake backend whose simulator fails the executions numbered in `fail_on` (1-based) and takes `delay` s
    for each run: the same runner, faults injected into what it runs on."""

    def __init__(self, *args, fail_on: set[int] = frozenset(), delay: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.fail_on, self.delay, self.calls = fail_on, delay, 0

    def local_simulator(self, **options):
        simulator = super().local_simulator(**options)
        original = simulator.run

        def run(*args, **kwargs):
            self.calls += 1
            if self.calls in self.fail_on:
                raise RuntimeError("injected device failure")
            time.sleep(self.delay)
            return original(*args, **kwargs)

        simulator.run = run
        simulator.__deepcopy__ = lambda memo: simulator  # local mode copies its backend for every job
        return simulator

    def shares_prefix(self, isa) -> bool:
        return False  # every simulator run is then a runtime job's, so the faults hit runtime jobs only


def flaky(config: QAAConfig, **faults) -> FlakyRunner:
    return FlakyRunner(config, environment.environment(), fake_backend("FakeManilaV2"), local=True, **faults)


def test_a_failed_runtime_job_is_retried_once_and_counted_once():
    config = fake_config(shots=100)
    model = two_adapter_model(config)
    runner = flaky(config, fail_on={2})
    with circuits.execution(model, runner=runner) as run:
        step(model)
    assert runner.retries == 1 and len(set(run.runtime_job_ids)) == 3  # 2 jobs, the second submitted twice
    assert run.usage.primitive_calls == 2 and run.usage.circuits == 2 * TOKENS * 19
    assert run.usage.shots == 100 * 2 * TOKENS * 19


def test_a_runtime_job_that_fails_twice_fails_the_step():
    config = fake_config(shots=100)
    model = two_adapter_model(config)
    with circuits.execution(model, runner=flaky(config, fail_on={1, 2})) as run:
        with pytest.raises(RuntimeJobFailed, match=r"runtime job \S+ on fake:fake_manila failed: .*injected"):
            step(model)
    assert run.usage.circuits == 0 and run.runner.modes_closed == 1


def test_a_runtime_job_past_its_timeout_is_cancelled_and_fails_the_step():
    config = fake_config(shots=100, job_timeout_s=0.2)
    model = two_adapter_model(config)
    with circuits.execution(model, runner=flaky(config, delay=2.0)):
        started = time.monotonic()
        with pytest.raises(RuntimeJobTimeout, match="ran past quantum.job_timeout_s=0.2 s"):
            step(model)
    assert time.monotonic() - started < 1.5


def test_cancelling_the_run_stops_the_job_in_flight_and_refuses_new_ones():
    config = fake_config(shots=100)
    model = two_adapter_model(config)
    with circuits.execution(model, runner=flaky(config, delay=3.0)) as run:
        threading.Timer(0.3, run.cancel).start()
        started = time.monotonic()
        with pytest.raises(ExecutionCancelled):
            step(model)
        assert time.monotonic() - started < 2
        with pytest.raises(ExecutionCancelled):
            step(model)
    assert run.runner.modes_closed == 1
