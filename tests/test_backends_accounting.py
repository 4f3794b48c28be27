"""Accounting: counted circuits equal `circuits.estimate`, one primitive call per step, and transpilation
happens
once per key: a second layer, or a second process with the disk cache, transpiles nothing."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import circuits
from circuits import QAAConfig, QAALayer
from circuits.backends import environment


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory):
    environment.configure(cache_dir=tmp_path_factory.getbasetemp() / "qaa-cache")


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"input_grad": "none"},
        {"embedding": "direct"},
        {"gradient": "spsa", "spsa_samples": 3},
        {"shots": 100, "readout": "expval+zz"},
    ],
)
def test_counted_circuits_equal_estimate(options):
    config = QAAConfig(layers=1, backend="aer", **{"gradient": "parameter-shift", **options})
    model = nn.Sequential()
    model.add_module("q_proj", nn.Linear(8, 4))
    model.add_module("v_proj", nn.Linear(8, 8))
    circuits.inject_qaa(model, config)
    x = torch.randn(5, 8, requires_grad=True)  # as inside a model: every adapter input needs a gradient
    with circuits.execution(model) as run:
        model.v_proj(model.q_proj(x) @ torch.ones(4, 8)).sum().backward()
    used = run.usage
    est = circuits.estimate(config, tokens_per_step=5, steps=1, d_in=8, adapters=2)
    assert used.circuits == est.circuits_per_step
    assert used.shots == est.shots
    assert used.primitive_calls == est.primitive_calls == 2


def test_second_layer_transpiles_nothing():
    config = QAAConfig(layers=1, backend="aer", gradient="parameter-shift", seed=11)
    first = QAALayer(nn.Linear(8, 2), config, name="a")
    second = QAALayer(nn.Linear(8, 2), config, name="b")
    assert first.adapter().engine.usage.transpile_misses + first.adapter().engine.usage.transpile_hits == 1
    assert (second.adapter().engine.usage.transpile_misses, second.adapter().engine.usage.transpile_hits) == (0, 1)


_CHILD = """
import json
from torch import nn
from circuits import QAAConfig, QAALayer
layer = QAALayer(nn.Linear(16, 2), QAAConfig(layers=2, backend="fake:FakeManilaV2",
gradient="parameter-shift",
                                                shots=10, seed=5))
print(json.dumps(layer.adapter().engine.usage.as_dict()))
"""


def test_new_process_reuses_the_disk_cache(tmp_path):
    env = {**os.environ, "QAA_HOME": str(tmp_path)}
    runs = [
        json.loads(
            subprocess.run(
                [sys.executable, "-c", _CHILD],
                env=env,
                capture_output=True,
                text=True,
                check=True,
                timeout=120,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        for _ in range(2)
    ]
    assert runs[0]["transpile_misses"] == 1
    assert (runs[1]["transpile_misses"], runs[1]["transpile_hits"]) == (0, 1)
    assert list((tmp_path / "cache" / "transpile").glob("*.qpy")) and list((tmp_path / "cache" / "noise").glob("*"))


def test_estimate_and_backend_listing_import_no_torch_or_qiskit():
    code = (
        "import sys, circuits; from circuits.backends import list_backends; "
        "cfg = circuits.QAAConfig(backend='aer', gradient='parameter-shift'); "
        "e = circuits.estimate(cfg, 32, 10, d_in=64); "
        "assert e.circuits_per_step == 32 * 61 + 32 * 126, e; "
        "assert not {'torch', 'qiskit'} & set(sys.modules), sorted(m for m in sys.modules if 'qiskit' in m)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_list_backends_and_budget():
    rows = {row["name"]: row for row in circuits.list_backends()}
    assert rows["aer"]["kind"] == "simulator" and rows["fake:FakeManilaV2"]["qubits"] == 5
    assert rows["fake:FakeBrisbane"]["kind"] == "fake" and "ecr" in rows["fake:FakeBrisbane"]["basis_gates"]
    config = QAAConfig(backend="aer", gradient="parameter-shift", max_circuits=1000)
    with pytest.raises(ValueError, match="exceed max_circuits=1000"):
        circuits.check_budget(config, circuits.estimate(config, 32, 10, d_in=64))
