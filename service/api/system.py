"""Service-level endpoints: health, readiness, Prometheus metrics, backends and cost estimates.

`/v1/backends` asks `circuits.backends.list_backends` in a child process: listing them loads qiskit, which the
API process never imports (it stays small and starts fast). The answer is cached for the app's lifetime.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from circuits.cost_estimate import combined
from service import queueing
from service.admission import Refused, check_spend, ibm_credentials, per_width_executions, spend_of
from service.api import hardware
from service.api.body import SPEC_BODY, read_spec
from service.api.cost import EstimateError, spec_cost
from service.auth import owner_for_authorization
from service.deps import CurrentOwner, SettingsDep, StoreDep
from service.problems import Problem, field_problem, problem_responses
from service.ratelimit import EstimateRateLimited
from service.schemas import (
    BackendOut,
    CircuitOnBackend,
    EstimateOut,
    EvaluationCost,
    Health,
    Readiness,
    SecondsRange,
)

router = APIRouter()

BACKENDS_TIMEOUT_S = 120
#: A caller's IBM devices (and their pending jobs) are listed again after this long.
DEVICES_TTL_S = 60
_backends_lock = threading.Lock()


@router.get("/healthz", tags=["system"], summary="The process is up")
def healthz() -> Health:
    return Health(status="ok")


def _check(probe) -> str:
    try:
        return "ok" if probe() else "unreachable"
    except Exception as exc:  # any failure of a dependency means "not ready", never a 500
        return f"unreachable: {type(exc).__name__}"


@router.get("/readyz", tags=["system"], responses=problem_responses(503), summary="The store and broker answer")
def readyz(store: StoreDep) -> Readiness:
    checks = {
        "store": _check(lambda: isinstance(store.count_jobs_by_status(), dict)),
        "broker": _check(queueing.broker_ping),
    }
    if any(v != "ok" for v in checks.values()):
        failing = ", ".join(k for k, v in checks.items() if v != "ok")
        raise Problem(503, f"not ready: {failing} unreachable", checks=checks)
    return Readiness(status="ok", checks=checks)


@router.get(
    "/metrics",
    tags=["system"],
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}, **problem_responses(401)},
    summary="Prometheus text exposition (needs an API key unless QAA_METRICS_PUBLIC)",
)
def metrics(request: Request, store: StoreDep, settings: SettingsDep) -> Response:
    if not settings.metrics_public:  # the gauges read the whole store: not for anyone who can reach the port
        owner_for_authorization(store, request.headers.get("authorization"))
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)


def _list_backends(token: str | None = None, instance: str | None = None) -> list[dict]:
    """`python -m circuits.backends` in a child process; with a token, the IBM devices it can use too."""
    request = json.dumps({"ibm_token": token, "ibm_instance": instance} if token else {})
    env = {k: v for k, v in os.environ.items() if k not in ("QAA_IBM_TOKEN", "QAA_SECRET_KEY")}
    done = subprocess.run([sys.executable, "-m", "circuits.backends"], input=request, capture_output=True, text=True,
                          timeout=BACKENDS_TIMEOUT_S, env=env)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "no output")
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    if isinstance(answer, dict):  # the IBM listing failed: 503 if unreachable, 502 if IBM refused
        raise Problem(
            503 if answer["unreachable"] else 502, f"listing your IBM Quantum devices failed: {answer['error']}"
        )
    return answer


@router.get(
    "/v1/backends",
    tags=["system"],
    responses=problem_responses(401, 502, 503),
    summary="Execution backends: simulators, fake IBM devices and the IBM devices your token can use",
)
def backends(request: Request, store: StoreDep, settings: SettingsDep, owner: CurrentOwner) -> list[BackendOut]:
    state = request.app.state
    with _backends_lock:
        if state.backends is None:
            try:
                state.backends = [BackendOut.model_validate(b) for b in _list_backends()]
            except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
                raise Problem(503, f"listing backends failed: {exc}") from exc
    try:
        token, instance = ibm_credentials(store, owner, settings)
    except Refused:  # no token of one's own and not allowed the workers': the local backends only
        return state.backends
    if not token:
        return state.backends
    cached = state.devices.get(owner)
    if cached is None or time.monotonic() - cached[0] > DEVICES_TTL_S:
        try:
            rows = [row for row in _list_backends(token, instance) if row["kind"] == "hardware"]
        except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
            raise Problem(503, f"listing your IBM Quantum devices failed: {exc}") from exc
        cached = state.devices[owner] = (time.monotonic(), [BackendOut.model_validate(b) for b in rows])
    return [*state.backends, *cached[1]]


@router.post(
    "/v1/estimate",
    tags=["system"],
    openapi_extra=SPEC_BODY,
    responses=problem_responses(400, 401, 413, 422, 429),
    summary="Circuits, shots, primitive calls and a time range for a spec; nothing runs",
)
async def estimate(
    request: Request,
    store: StoreDep,
    settings: SettingsDep,
    owner: CurrentOwner,
    _rate: EstimateRateLimited,
    d_in: Annotated[int | None, Query(ge=1, le=1 << 20, description="Adapted modules' input width.")] = None,
    adapters: Annotated[int | None, Query(ge=1, le=100_000, description="How many modules are adapted.")] = None,
    device_figures: Annotated[
        bool, Query(description="fake:/ibm: also transpile for the device (seconds when cold); false: static only.")
    ] = True,
) -> EstimateOut:
    spec = await read_spec(request)
    try:
        cost = await run_in_threadpool(spec_cost, spec, d_in=d_in, adapters=adapters)
    except EstimateError as exc:
        raise field_problem(422, exc.path, str(exc)) from exc
    est, evaluation = cost.estimate, cost.evaluation
    notes = [est.note, cost.over_budget]
    try:  # the operator's per-job ceilings bind as the spec's budgets do
        check_spend(spend_of(spec, combined(est, evaluation)), cost.engine_state_bytes, settings)
        over_ceiling = None
    except Refused as exc:
        over_ceiling = exc.message
    notes.append(over_ceiling)
    device = spec.quantum is not None and spec.quantum.backend.startswith(("fake:", "ibm:"))
    figures, qpu, warnings = None, None, []
    if device:
        qpu = (combined(est, evaluation).qpu_seconds, None)
    if device and device_figures:
        try:
            figures, qpu = await run_in_threadpool(_device_figures, spec, cost, store, owner, settings)
            warnings = hardware.warnings_for(figures)
        except (hardware.HardwareUnavailable, Refused) as exc:
            notes.append(f"device figures unavailable: {exc}")
    return EstimateOut(
        backend=spec.quantum.backend if spec.quantum else "none",
        circuits_per_step=est.circuits_per_step,
        circuits=est.circuits,
        shots=est.shots,
        primitive_calls=est.primitive_calls,
        runtime_jobs=est.runtime_jobs,
        evaluation=EvaluationCost(
            circuits=evaluation.circuits, shots=evaluation.shots, runtime_jobs=evaluation.runtime_jobs
        ),
        qpu_seconds=SecondsRange(low=qpu[0], high=qpu[1] if qpu[1] is not None else qpu[0]) if qpu else None,
        circuits_on_backend=[CircuitOnBackend.model_validate(row) for row in figures] if figures else None,
        warnings=warnings,
        seconds=SecondsRange(low=cost.seconds[0], high=cost.seconds[1]) if cost.seconds else None,
        within_budget=cost.over_budget is None and over_ceiling is None,
        adapters=cost.adapters,
        d_in=cost.d_in,
        tokens_per_step=cost.tokens_per_step,
        note="; ".join(n for n in notes if n),
    )


def _device_figures(spec, cost, store, owner: str, settings) -> tuple[list[dict], tuple[float, float]]:
    """The circuits on the device (child process, cached) and the QPU-seconds range they give."""
    config = spec.qaa_config()
    token = instance = None
    if config.backend.startswith("ibm:"):
        token, instance = ibm_credentials(store, owner, settings)
    figures = hardware.circuits_on_backend(config, hardware.register_sizes(config, cost.widths), settings, token,
                                           instance)  # fmt: skip
    return figures, hardware.qpu_range(config, per_width_executions(spec, cost.widths), figures)
