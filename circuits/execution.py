"""A run: every QAA adapter of a model bound to one backend and one execution context, for as long as it lasts.

A trained adapter's weights do not depend on where its circuits run, so the backend is chosen per run, not
when an adapter is built. `execution(model, config)` binds each adapter to an engine on `config`'s backend
(its execution fields: backend, shots, gradient, embedding, mode, options ...), all on one runner: one
sign-in, one Batch or Session for the whole model. Leaving the block closes it on every exit path (success,
error, cancel) and gives the adapters back the engines they had, so the same weights can be bound to another
backend next (evaluate on `exact`, then on `fake:FakeTorino`).

Example:
    >>> from torch import nn
    >>> import circuits
    >>> model = nn.Sequential(); model.add_module("q_proj", nn.Linear(8, 8))
    >>> model = circuits.inject_qaa(model, circuits.QAAConfig(target_modules=["q_proj"], layers=1))
    >>> aer = model.qaa_config.model_copy(update={"backend": "aer", "gradient": "parameter-shift"})
    >>> with circuits.execution(model, aer) as run:   # doctest: +SKIP
    ...     model(x).sum().backward()
    >>> run.usage.circuits                               # doctest: +SKIP
    4

This module imports neither torch nor qiskit, so the runtime's errors below can be caught without loading them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .accounting import Usage
from .config import EXECUTION_FIELDS, QAAConfig

if TYPE_CHECKING:
    from torch import nn


class RuntimeJobFailed(RuntimeError):
    """A runtime job failed twice (or could not be submitted); the message names its id and the cause."""


class RuntimeJobTimeout(RuntimeError):
    """A runtime job ran past `quantum.job_timeout_s` and was cancelled."""


class ExecutionCancelled(RuntimeError):
    """The run was cancelled (its job was cancelled) while a runtime job was in flight."""


def run_config(layer_config: QAAConfig, run: QAAConfig) -> QAAConfig:
    """An adapter's shape (`layer_config`) with the execution fields of `run`."""
    return layer_config.model_copy(update={name: getattr(run, name) for name in EXECUTION_FIELDS})


class Execution:
    """The context `execution()` returns: `usage` (what the run sent), `runtime_job_ids`, `cancel()`."""

    def __init__(self, model: nn.Module, config: QAAConfig | None = None, runner=None):
        from .inject import qaa_adapters

        self.layers = qaa_adapters(model)
        if not self.layers:
            raise ValueError("the model has no QAA adapters to bind (inject_qaa or load_qaa first)")
        # `inject_qaa` keeps the config it was given; a PEFT model's adapters run on the exact engine by default
        self.config = config or getattr(model, "qaa_config", None) or QAAConfig()
        self.runner = runner  # None: made from `config` on entry
        self._previous: dict[str, object] = {}
        self._engines: list[object] = []

    def __enter__(self) -> Execution:
        from .backends import get_engine, make_runner

        if self.runner is None:
            self.runner = make_runner(self.config)
        try:
            for name, layer in self.layers.items():
                self._previous[name] = layer.engine
                layer.engine = get_engine(run_config(layer.config, self.config), layer.n_qubits, self.runner)
                self._engines.append(layer.engine)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.runner is not None:
                self.runner.close()
        finally:
            for name, engine in self._previous.items():
                self.layers[name].engine = engine

    def cancel(self) -> None:
        """Cancel the runtime jobs in flight and refuse new ones (from any thread, e.g. a lease heartbeat)."""
        if self.runner is not None:
            self.runner.cancel()

    @property
    def usage(self) -> Usage:
        total = Usage()
        for engine in self._engines:
            counters = getattr(engine, "usage", None)
            if isinstance(counters, Usage):
                total = total + counters
        extra = getattr(self.runner, "extra_usage", None)  # mitigation's calibrations belong to the run
        return total + extra if isinstance(extra, Usage) else total

    @property
    def runtime_job_ids(self) -> list[str]:
        return list(getattr(self.runner, "job_ids", []))

    def describe(self) -> dict:
        """What the run opened and retried, for the job's usage (`runtime` backends; empty otherwise)."""
        runner = self.runner
        if runner is None or not hasattr(runner, "job_ids"):
            return {}
        from .hardware import figures_of

        isas = {id(engine.isa): (engine.isa, engine.n) for engine in self._engines if hasattr(engine, "isa")}
        return {
            "runtime_job_ids": self.runtime_job_ids,
            "runtime_retries": runner.retries,
            "sessions_opened": runner.modes_opened,
            "sessions_closed": runner.modes_closed,
            # the qubits the layout chose and their errors, as the estimate reported them
            "circuits_on_backend": [
                figures_of(isa, runner.device, runner.name, n).as_dict() for isa, n in isas.values()
            ],
        }


def execution(model: nn.Module, config: QAAConfig | None = None, runner=None) -> Execution:
    """Bind every adapter of `model` to `config`'s backend (default: the config it was injected with) for a
    `with` block, on `runner` if given (else one made for `config`); see the module docstring."""
    return Execution(model, config, runner)
