"""A trained adapter on another backend (`kind: evaluate`) and training that starts from one (`init_from`): the
same weights on the exact engine and on a fake device's noise, the gap reported per adapter and in scores, priced
like training; the source adapter checked for owner, state, shape and integrity."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from circuits.backends import environment
from service.admission import ADAPTER_FILES, Refused, SourceAdapter, check_source
from service.api.cost import spec_cost
from service.spec import parse_spec
from workers.artifacts import load_adapter
from workers.datasets import restaurants
from workers.evaluation import eval_loss
from workers.trainer import JobError, TrainingHooks, train

METHOD = {"kind": "qaa", "target_modules": ["q_proj"], "qubits": 3, "compress": "fixed", "layers": 1}
BASE = {
    "model": "builtin:tiny-llama",
    "dataset": "builtin:restaurants",
    "method": METHOD,
    "training": {
        "steps": 6,
        "batch_size": 2,
        "max_length": 24,
        "learning_rate": 5e-2,
        "eval_every": 0,
        "checkpoint_every": 0,
    },  # fmt: skip
    "evaluation": {"metrics": ["bleu"], "samples": 2, "max_new_tokens": 3},
}
SOURCE_ID = "job_" + "ab" * 12


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory):
    environment.configure(cache_dir=tmp_path_factory.getbasetemp() / "qaa-cache")


def hooks(points: list | None = None) -> TrainingHooks:
    return TrainingHooks(lambda p: points.extend(p) if points is not None else None, lambda step: True)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> SourceAdapter:
    """An adapter trained on the exact engine, as the store would describe its files."""
    run_dir = tmp_path_factory.mktemp("source")
    result = train(parse_spec(BASE), run_dir, hooks())
    assert result.status == "succeeded"
    files = {}
    for name in ADAPTER_FILES:
        path = run_dir / name
        files[name] = (str(path), hashlib.sha256(path.read_bytes()).hexdigest())
    return SourceAdapter(SOURCE_ID, files)


def evaluate_spec(**quantum):
    return parse_spec(
        {**BASE, "kind": "evaluate", "adapter_from": SOURCE_ID, "quantum": {"backend": "fake:FakeManilaV2", **quantum}}
    )


@pytest.fixture(scope="module")
def unmitigated(source, tmp_path_factory):
    spec = evaluate_spec(shots=2048)
    return spec, train(spec, tmp_path_factory.mktemp("gap"), hooks(), source=source)


def test_evaluate_reports_the_gap_of_the_same_weights(source, unmitigated):
    spec, result = unmitigated
    report = result.evaluation
    # the exact half is the trained adapter itself: the same eval loss as loading it and scoring the examples
    loaded = load_adapter("builtin:tiny-llama", source.files[ADAPTER_FILES[0]][0].rsplit("/", 1)[0])
    test = restaurants().test[:2]
    expected = eval_loss(loaded.model, loaded.tokenizer, test, chat=loaded.chat, max_length=24, batch_size=8,
                         device=torch.device("cpu"))  # fmt: skip
    assert report["exact"]["eval_loss"] == pytest.approx(expected, rel=1e-5)
    gap = report["gap"]
    assert 0.005 < gap["readout_mean_abs"] <= gap["readout_max_abs"] <= 2.0  # device noise shows, bounded
    assert gap["eval_loss"] == pytest.approx(report["on_backend"]["eval_loss"] - report["exact"]["eval_loss"])
    assert (report["backend"], report["shots"], report["mitigation"]) == ("fake:FakeManilaV2", 2048, None)
    adapters = json.loads(next(p for p in result.artifacts if p.name == "hardware_gap.json").read_text())["adapters"]
    assert len(adapters) == 2 and all(a["inputs"] > 0 and a["qubits"] == 3 for a in adapters)  # q_proj x 2 blocks
    # inference only, priced as such: no shifted rows, at most the estimate (an upper bound: no padding)
    usage, est = result.usage, spec_cost(spec).evaluation
    assert 0 < usage["circuits"] <= est.circuits and usage["shots"] == usage["circuits"] * 2048
    assert usage["circuits"] >= sum(a["inputs"] for a in adapters) and spec_cost(spec).estimate.circuits == 0
    assert usage["runtime_job_ids"] and usage["sessions_closed"] == 1


def test_mitigation_narrows_the_gap_and_its_calibration_is_counted(source, unmitigated, tmp_path):
    _, plain = unmitigated
    result = train(
        evaluate_spec(shots=2048, mitigation={"readout": "m3", "calibration_shots": 1000}),
        tmp_path,
        hooks(),
        source=source,
    )
    assert result.evaluation["mitigation"]["readout"] == "m3"
    assert result.evaluation["gap"]["readout_mean_abs"] < plain.evaluation["gap"]["readout_mean_abs"]
    # M3's balanced calibration of 3 qubits: 4 circuits sharing 2 x 1000 shots, once for the run
    assert result.usage["shots"] == (result.usage["circuits"] - 4) * 2048 + 2000


def test_init_from_starts_training_from_the_saved_adapter(source, tmp_path):
    spec = parse_spec({**BASE, "init_from": SOURCE_ID, "training": {**BASE["training"], "steps": 1,
                                                                    "learning_rate": 1e-9}})  # fmt: skip
    train(spec, tmp_path / "init", hooks(), source=source)
    saved = load_file(tmp_path / "init" / "artifacts" / "adapter_model.safetensors")
    original = load_file(source.files[ADAPTER_FILES[1]][0])
    assert saved.keys() == original.keys()
    assert all(torch.allclose(saved[k], original[k], atol=1e-6) for k in saved)
    assert any(original[k].abs().sum() > 0 for k in original if "up" in k)  # the trained update, not a zero init


def test_a_changed_adapter_file_is_not_loaded(source, tmp_path):
    name, (path, _) = next(iter(source.files.items()))
    tampered = SourceAdapter(source.job_id, {**source.files, name: (path, "0" * 64)})
    with pytest.raises(JobError, match="sha256 mismatch"):
        train(evaluate_spec(shots=256), tmp_path, hooks(), source=tampered)


def test_the_source_job_must_be_the_owners_succeeded_qaa_job_with_its_adapter(api, tmp_path):
    from service import queueing
    from service.store import JobStatus

    store = api.app.state.store
    trained = queueing.submit_job(store, "alice", parse_spec(BASE), None)
    spec = parse_spec({**BASE, "kind": "evaluate", "adapter_from": trained.id, "quantum": {"backend": "exact"}})

    def refusal(owner="alice", s=spec) -> str:
        with pytest.raises(Refused) as info:
            check_source(s, store, owner)
        return f"{info.value.path}: {info.value.message}"

    assert "is queued" in refusal()
    assert refusal("bob").startswith("adapter_from: no job")  # another owner's job does not exist for bob
    store.claim_job(trained.id, "w1")
    store.finish_job(trained.id, "w1", JobStatus.SUCCEEDED, step=6)
    assert "no saved adapter" in refusal()
    for name in ADAPTER_FILES:
        path = tmp_path / name.rsplit("/", 1)[1]
        path.write_bytes(b"x")
        store.add_artifact(trained.id, name, str(path), 1, hashlib.sha256(b"x").hexdigest())
    assert check_source(spec, store, "alice").job_id == trained.id
    other = parse_spec({**BASE, "method": {**METHOD, "layers": 2}, "init_from": trained.id})
    assert refusal(s=other).startswith("method: job")
    with pytest.raises(ValidationError, match="kind evaluate needs adapter_from"):
        parse_spec({**BASE, "kind": "evaluate"})
