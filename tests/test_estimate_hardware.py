"""The estimate a user can trust: training and evaluation, runtime jobs after splitting, each circuit on the
device (2-qubit gates, depth, duration, qubits, ESP) from the transpilation the job will use, QPU seconds from a
stated model, and budgets (min_esp, max_qpu_seconds) that refuse a job up front and again in the worker."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from circuits.backends import environment
from service.api.cost import spec_cost
from service.spec import parse_spec
from workers.trainer import JobError, TrainingHooks, train

REPO = Path(__file__).resolve().parent.parent
MANILA = yaml.safe_load((REPO / "examples" / "fake-manila.yaml").read_text())


def test_the_estimate_prices_training_evaluation_and_the_device(api, auth_for):
    alice = auth_for("alice")
    started = time.monotonic()
    cold = api.post("/v1/estimate", json=MANILA, headers=alice)
    cold_s = time.monotonic() - started
    started = time.monotonic()
    warm = api.post("/v1/estimate", json=MANILA, headers=alice).json()
    warm_s = time.monotonic() - started
    assert cold.status_code == 200 and cold.json() == warm
    assert cold_s < 30 and warm_s < 1, (cold_s, warm_s)
    # 2 adapters (q_proj of both blocks) x 2 steps x 8 tokens x (2 x 9 + 1) circuits; one runtime job each
    assert (warm["circuits"], warm["shots"], warm["runtime_jobs"]) == (2 * 2 * 8 * 19, 2 * 2 * 8 * 19 * 1024, 4)
    # at most, per adapter: one eval-loss pass over 200 examples x 8 tokens, and 2 prompts x (8 + 3) tokens
    assert warm["evaluation"]["circuits"] == 2 * (200 * 8 + 2 * (8 + 3))
    assert warm["evaluation"]["shots"] == warm["evaluation"]["circuits"] * 1024
    (circuit,) = warm["circuits_on_backend"]
    assert circuit["qubits"] == 3 and len(circuit["physical_qubits"]) == 3 and circuit["two_qubit_gates"] > 3
    assert 0 < circuit["esp"] < 1 and 0 < circuit["duration_s"] < 1e-3 and circuit["depth"] > 10
    low, high = warm["qpu_seconds"]["low"], warm["qpu_seconds"]["high"]
    executions = warm["shots"] + warm["evaluation"]["shots"]
    assert executions * 250e-6 < low < high and high > executions * (250e-6 + circuit["duration_s"])
    assert warm["warnings"] == []  # ESP 0.75 at n = 3 on Manila: fine


def test_the_static_figures_answer_at_once_without_the_device(api, auth_for):
    alice = auth_for("alice")
    api.post("/v1/estimate?device_figures=false", json=MANILA, headers=alice)  # the app's first request
    started = time.monotonic()
    static = api.post("/v1/estimate?device_figures=false", json=MANILA, headers=alice).json()
    assert time.monotonic() - started < 0.2
    assert static["circuits_on_backend"] is None and static["runtime_jobs"] == 4
    floor = (static["shots"] + static["evaluation"]["shots"]) * 250e-6
    assert static["qpu_seconds"]["low"] == static["qpu_seconds"]["high"] > floor  # no durations without the device


def test_a_noisy_circuit_warns_and_min_esp_and_max_qpu_seconds_refuse_it(api, auth_for):
    alice = auth_for("alice")
    deep = {**MANILA, "method": {**MANILA["method"], "qubits": 4, "layers": 3}}
    priced = api.post("/v1/estimate", json=deep, headers=alice).json()
    (circuit,) = priced["circuits_on_backend"]
    assert circuit["esp"] < 0.5 and "mostly noise" in priced["warnings"][0]
    for option, value, path in (
        ("min_esp", 0.5, "quantum.min_esp"),
        ("max_qpu_seconds", priced["qpu_seconds"]["high"] * 0.9, "quantum.max_qpu_seconds"),
    ):
        spec = {**deep, "quantum": {**deep["quantum"], option: value}}
        refused = api.post("/v1/jobs", json=spec, headers=alice)
        assert refused.status_code == 422 and refused.json()["errors"][0]["path"] == path, refused.text
    within = {**deep, "quantum": {**deep["quantum"], "min_esp": circuit["esp"] / 2}}
    assert api.post("/v1/jobs", json=within, headers=alice).status_code == 201


def test_the_worker_checks_min_esp_again_before_the_first_step(tmp_path):
    """A job row the API never priced (written straight into the store) meets the same budget in the worker."""
    environment.configure(cache_dir=tmp_path / "cache")
    from service.settings import Settings
    from service.store import Store
    from workers.tasks import run_train

    settings = Settings(home=tmp_path / "home")
    store = Store.from_settings(settings, migrate=True)
    deep = {**MANILA, "method": {**MANILA["method"], "qubits": 4, "layers": 3}}
    job = store.create_job("alice", parse_spec({**deep, "quantum": {**deep["quantum"], "min_esp": 0.5}}))
    assert run_train(job.id, store, settings, "w1") == "failed"
    assert "below min_esp=0.5" in store.load_job(job.id).error and store.load_job(job.id).step == 0


@pytest.mark.slow
def test_a_fake_job_that_splits_counts_what_the_estimate_said(tmp_path):
    """One adapter, 8 tokens x 19 circuits = 152 rows per step at 70,000 shots: at most 142 rows per runtime job,
    so each step is 2 runtime jobs (10.6 M shots simulated per step). The job stops after 2 of its 3 steps, before
    any evaluation."""
    environment.configure(cache_dir=tmp_path / "cache")
    spec = parse_spec(
        {
            **MANILA,
            "method": {**MANILA["method"], "target_modules": r"model\.layers\.0\.self_attn\.q_proj"},
            "quantum": {**MANILA["quantum"], "shots": 70_000, "max_circuits": 10**8, "max_shots": 10**15},
            "training": {**MANILA["training"], "steps": 3},
        }
    )
    points = []
    hooks = TrainingHooks(points.extend, lambda step: step < 2)
    result = train(spec, tmp_path / "run", hooks)
    est = spec_cost(spec).estimate  # 3 steps
    assert result.status == "cancelled" and len(points) == 2
    assert sum(p["circuits"] for p in points) == 2 * est.circuits_per_step == 2 * 152
    assert sum(p["shots"] for p in points) == est.shots * 2 // 3
    assert sum(p["primitive_calls"] for p in points) == est.runtime_jobs * 2 // 3 == 4
    assert len(result.usage["runtime_job_ids"]) == 4 and result.usage["sessions_closed"] == 1
    (circuit,) = result.usage["circuits_on_backend"]  # the job says which qubits it ran on, as the estimate did
    assert circuit["physical_qubits"] == spec_cost_figures(spec)[0]["physical_qubits"]


def spec_cost_figures(spec) -> list[dict]:
    from circuits.hardware import report

    return report(spec.qaa_config(), [3])


def test_a_runtime_job_past_its_timeout_fails_the_job_with_that_cause(tmp_path):
    environment.configure(cache_dir=tmp_path / "cache")
    spec = parse_spec({**MANILA, "quantum": {**MANILA["quantum"], "job_timeout_s": 0.001}})
    with pytest.raises(JobError, match=r"ran past quantum.job_timeout_s=0.001 s on fake:fake_manila"):
        train(spec, tmp_path / "run", TrainingHooks(lambda points: None, lambda step: True))
