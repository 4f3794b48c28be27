"""Error mitigation on the runtime path, driven on FakeManilaV2 in local testing mode: every option the spec
accepts changes what the runner returns (and, where it is meant to, brings it closer to the exact engine), is
counted in the run's usage exactly as the estimate priced it, and is refused where it cannot act."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

import circuits
from circuits import QAAConfig
from circuits.backends import ExactEngine, environment, get_engine, make_runner
from circuits.config import Mitigation
from circuits.cost_estimate import overhead, twirl_shape
from circuits.embedding import data_angles
from circuits.mitigation import estimator_options
from service.spec import parse_spec

N = 3
INPUTS, SHOTS = 24, 4096


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory):
    environment.configure(cache_dir=tmp_path_factory.getbasetemp() / "qaa-cache")


def config(mitigation: dict | None = None, **options) -> QAAConfig:
    options = {"layers": 2, "backend": "fake:FakeManilaV2", "gradient": "parameter-shift", "shots": SHOTS, **options}
    return QAAConfig(mitigation=Mitigation(**mitigation) if mitigation is not None else None, **options)


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(11)
    z = torch.randn(INPUTS, 2**N, generator=gen, dtype=torch.float64)
    theta = torch.rand(QAAConfig(layers=2).num_params(N), generator=gen, dtype=torch.float64) * (2 * np.pi)
    z = z / z.norm(dim=-1, keepdim=True)
    exact = ExactEngine(QAAConfig(layers=2), N)(z.float(), theta.float()).double().numpy()
    return z, theta, exact


def readout(cfg: QAAConfig, inputs) -> tuple[np.ndarray, object]:
    z, theta, _ = inputs
    runner = make_runner(cfg)
    engine = get_engine(cfg, N, runner)
    values, _, _ = engine.evaluate(data_angles(z, N).numpy(), theta.numpy(), False, False)
    return values, engine.usage + runner.extra_usage


@pytest.fixture(scope="module")
def unmitigated(inputs):
    values, _ = readout(config(), inputs)
    return values, float(np.abs(values - inputs[2]).mean())


@pytest.mark.parametrize(
    ("mitigation", "at_most"),
    [
        ({"readout": "m3"}, 0.9),  # readout error corrected: the device's error shrinks
        ({"zne": {}}, 0.7),  # gate noise extrapolated away
        ({"readout": "trex", "zne": {"noise_factors": [1, 2, 3], "extrapolator": "linear"}}, 0.7),
        ({"readout": "trex"}, None),
        ({"twirling": True}, None),
        ({"readout": "m3", "twirling": True}, None),
    ],
    ids=["m3", "zne", "zne+trex", "trex", "twirling", "m3+twirling"],
)
def test_each_option_changes_the_readout_and_is_counted_as_priced(inputs, unmitigated, mitigation, at_most):
    cfg = config(mitigation)
    values, usage = readout(cfg, inputs)
    base_values, base_error = unmitigated
    error = float(np.abs(values - inputs[2]).mean())
    # something changed beyond what a reseeded run would: 4096 shots move a readout by about 0.016
    assert np.abs(values - base_values).mean() > 0.004
    if at_most is not None:
        assert error <= at_most * base_error, (error, base_error)
    else:  # the twirled and TREX runs still read the same circuit: no worse than the shot noise allows
        assert error <= base_error + 0.02
    cost = overhead(cfg, N)
    assert usage.circuits == INPUTS * cost.circuits_per_row + cost.circuits_per_call + cost.circuits_per_run
    assert usage.shots == INPUTS * cost.shots_per_row + cost.shots_per_call + cost.shots_per_run


@pytest.mark.parametrize(
    "mitigation", [{"dynamical_decoupling": "XY4"}, {"readout": "trex", "dynamical_decoupling": "XX"}]
)
def test_dynamical_decoupling_pads_the_schedule_on_the_device_durations(inputs, unmitigated, mitigation):
    """The primitives' client-side DD pass schedules the circuit with the physical qubits' durations (the compact
    simulator's target carries them) and the noise model relaxes the qubits during the delays it inserts: the
    readout moves. Aer's relaxation is Markovian, which no pulse sequence refocuses, so locally DD is not expected
    to help; on a device it also acts on coherent idle errors (crosstalk), which fake noise models lack."""
    cfg = config(mitigation)
    values, usage = readout(cfg, inputs)
    base_values, base_error = unmitigated
    assert np.abs(values - base_values).mean() > 0.01  # the seeded shots are the same: the circuit changed
    assert float(np.abs(values - inputs[2]).mean()) <= base_error + 0.05  # idle relaxation, not a broken circuit
    cost = overhead(cfg, N)
    assert usage.circuits == INPUTS * cost.circuits_per_row + cost.circuits_per_call  # DD adds no circuit
    if "readout" not in mitigation:  # the same pass through primitive_options: the same result
        sequence = mitigation["dynamical_decoupling"]
        options = {"dynamical_decoupling": {"enable": True, "sequence_type": sequence}}
        passed_through, _ = readout(config(None, primitive_options=options), inputs)
        np.testing.assert_allclose(passed_through, values)


def test_the_compact_simulator_keeps_the_device_durations_of_its_qubits():
    from qiskit_ibm_runtime.fake_provider import FakeManilaV2

    from circuits.noise_cache import compact_target

    device = FakeManilaV2()
    target = compact_target(device.target, [3, 1, 2])
    assert target.num_qubits == 3 and target.dt == device.target.dt
    assert target["sx"][(0,)] == device.target["sx"][(3,)]
    assert set(target["cx"]) == {(1, 2), (2, 1), (2, 0), (0, 2)}  # 1-2 and 2-3 of the device, renumbered
    assert target["cx"][(2, 0)].duration == device.target["cx"][(2, 3)].duration


def test_the_estimate_prices_each_option_and_the_training_step_costs_what_it_said():
    # twirling: each parameter set runs as its randomizations (4096 shots: 32 x 128 by the runtime's rule)
    assert twirl_shape(4096, "auto") == (32, 128) and twirl_shape(1000, 8) == (8, 125)
    plain = overhead(config(), N)
    zne = overhead(config({"zne": {"noise_factors": [1, 3, 5]}}), N)
    assert (zne.circuits_per_row, zne.shots_per_row) == (3, 3 * plain.shots_per_row)
    m3 = overhead(config({"readout": "m3", "calibration_shots": 1000}), N)
    assert (m3.circuits_per_run, m3.shots_per_run, m3.jobs_per_run) == (4, 2000, 1)  # balanced: 4 circuits for 3
    # a whole training step (forward and parameter shifts) through one run, against the estimate
    cfg = config({"readout": "trex"}, shots=256, input_grad="none", layers=1)
    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(8, 8))
    circuits.inject_qaa(model, cfg)
    nn.init.normal_(circuits.qaa_adapters(model)["q_proj"].up.weight)
    with circuits.execution(model) as run:
        model(torch.randn(2, 8, generator=torch.Generator().manual_seed(1))).square().sum().backward()
    est = circuits.estimate(cfg, tokens_per_step=2, steps=1, d_in=8)
    assert run.usage.circuits == est.circuits and run.usage.shots == est.shots
    assert run.usage.primitive_calls == est.runtime_jobs
    assert circuits.qaa_adapters(model)["q_proj"].theta.grad.abs().sum() > 0


def test_budgets_apply_to_the_mitigated_figures():
    from service.api.cost import spec_cost

    base = {
        "model": "builtin:tiny-llama",
        "dataset": "builtin:restaurants",
        "method": {"kind": "qaa", "target_modules": ["q_proj"], "qubits": 3, "compress": "fixed"},
        "quantum": {"backend": "fake:FakeManilaV2", "shots": 1024},
        "training": {"steps": 1, "batch_size": 1, "max_length": 8},
    }
    plain = spec_cost(parse_spec(base))
    base["quantum"]["mitigation"] = {"zne": {"noise_factors": [1, 2, 3, 4]}}
    folded = spec_cost(parse_spec(base))
    assert folded.estimate.shots == 4 * plain.estimate.shots and folded.estimate.circuits == 4 * plain.estimate.circuits
    assert folded.evaluation.shots == 4 * plain.evaluation.shots
    assert plain.over_budget is None and folded.over_budget is None
    base["quantum"]["max_shots"] = 2 * (plain.estimate.shots + plain.evaluation.shots)
    assert spec_cost(parse_spec({**base, "quantum": {**base["quantum"], "mitigation": None}})).over_budget is None
    assert "exceed max_shots" in spec_cost(parse_spec(base)).over_budget  # the same job, folded: refused


@pytest.mark.parametrize(
    ("quantum", "message"),
    [
        ({"backend": "exact", "mitigation": {"readout": "m3"}}, "fake: and ibm: backends only"),
        ({"backend": "aer", "mitigation": {"zne": {}}}, "fake: and ibm: backends only"),
        ({"backend": "fake:FakeManilaV2", "mitigation": {"readout": "m3", "zne": {}}}, "use readout trex with zne"),
        ({"backend": "fake:FakeManilaV2", "mitigation": {"zne": {"noise_factors": [1]}}}, "at least 2"),
        ({"backend": "fake:FakeManilaV2", "mitigation": {"zne": {"noise_factors": [0.5, 1]}}}, "between 1 and 9"),
        ({"backend": "fake:FakeManilaV2", "mitigation": {"randomizations": 0}}, "between 1 and 1024"),
        ({"backend": "fake:FakeManilaV2", "mitigation": {"readout": "pec"}}, "'none', 'm3' or 'trex'"),
        (
            {
                "backend": "fake:FakeManilaV2",
                "mitigation": {"twirling": True},
                "primitive_options": {"twirling": {"enable_gates": True}},
            },
            "not both",
        ),
        (
            {
                "backend": "fake:FakeManilaV2",
                "mitigation": {"dynamical_decoupling": "XX"},
                "primitive_options": {"dynamical_decoupling": {"enable": True}},
            },
            "not both",
        ),
        ({"backend": "fake:FakeManilaV2", "mitigation": {"dynamical_decoupling": "CPMG"}}, "'XpXm' or 'XY4'"),
    ],
)
def test_mitigation_that_cannot_act_is_refused(quantum, message):
    spec = {"model": "builtin:tiny-llama", "dataset": "builtin:restaurants", "method": {"kind": "qaa"}}
    with pytest.raises(ValidationError, match=message):
        parse_spec({**spec, "quantum": quantum})


def test_on_ibm_the_options_are_the_runtime_estimators_own():
    from qiskit_ibm_runtime.options_models import EstimatorOptions

    m = Mitigation(readout="trex", twirling=True, randomizations=16, zne={"extrapolator": "linear"})
    options = EstimatorOptions(**estimator_options(m, {"dynamical_decoupling": {"enable": True}}))
    assert options.resilience.measure_mitigation and options.resilience.zne_mitigation
    assert list(options.resilience.zne.noise_factors) == [1.0, 3.0, 5.0]
    assert options.twirling.enable_gates and options.twirling.num_randomizations == 16
    assert options.dynamical_decoupling.enable  # pass-through options stay
