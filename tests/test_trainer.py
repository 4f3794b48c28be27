"""The training job end to end on tiny models: every method learns and saves a loadable adapter; resume after a
stop or a crash reproduces an uninterrupted run bitwise; cancel keeps the checkpoint; bad input is a JobError."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from service.spec import parse_spec
from workers.artifacts import load_adapter
from workers.datasets import restaurants
from workers.evaluation import eval_loss, generate
from workers.trainer import JobError, TrainingHooks, batch_indices, lr_factor, train

ARTIFACTS = ["adapter_config.json", "adapter_model.safetensors", "loss_curve.png", "metrics.json", "samples.jsonl"]
TIMING = ("step_time_s", "tokens_per_s")


def job(method: dict, *, model: str = "builtin:tiny-llama", dataset: str = "builtin:restaurants", **training):
    return parse_spec(
        {
            "model": model,
            "dataset": dataset,
            "method": method,
            "training": {
                "steps": 30,
                "batch_size": 4,
                "max_length": 64,
                "learning_rate": 1e-2,
                "eval_every": 0,
                "checkpoint_every": 0,
                **training,
            },  # fmt: skip
            "evaluation": {"metrics": ["bleu", "rouge"], "samples": 3, "max_new_tokens": 8},
        }
    )


class Recorder:
    """Hooks that keep every recorded point and stop at `stop_at` (a cancel) or raise there (a crash)."""

    def __init__(self, stop_at: int | None = None, crash_at: int | None = None):
        self.points: list[dict] = []
        self.asked: list[int] = []
        self.stop_at, self.crash_at = stop_at, crash_at

    def record(self, points: list[dict]) -> None:
        if self.crash_at is not None and points[0]["step"] == self.crash_at:
            raise KeyboardInterrupt("the worker dies before its step-7 checkpoint")
        self.points.extend(points)

    def go_on(self, step: int) -> bool:
        self.asked.append(step)
        return step != self.stop_at

    @property
    def hooks(self) -> TrainingHooks:
        return TrainingHooks(self.record, self.go_on)


def without_timing(points: list[dict]) -> list[dict]:
    return [{k: v for k, v in p.items() if k not in TIMING} for p in points]


# Margins on the final eval loss below the first step's loss (the adapted model starts as its base, so the
# first loss is the base model's): a random-init tiny model mostly learns the byte distribution, so adapters
# on q/v move it far less than full fine-tuning does.
METHODS = [
    pytest.param({"kind": "qaa"}, 3e-2, 0.15, id="qaa"),
    pytest.param({"kind": "lora", "r": 4}, 1e-2, 0.15, id="lora"),
    pytest.param({"kind": "prefix", "num_virtual_tokens": 8}, 1e-1, 0.1, id="prefix"),
    pytest.param({"kind": "sora", "r": 4, "sparse_lambda": 0.0}, 1e-2, 0.15, id="sora"),
    pytest.param({"kind": "full"}, 1e-3, 1.0, id="full"),
]


@pytest.mark.parametrize(("method", "lr", "margin"), METHODS)
def test_each_method_learns_and_its_adapter_loads_back(tmp_path, method, lr, margin):
    spec = job(method, learning_rate=lr, eval_every=15, checkpoint_every=10)
    recorder = Recorder()
    result = train(spec, tmp_path, recorder.hooks)

    assert result.status == "succeeded" and result.usage == {}
    assert [p["step"] for p in recorder.points] == list(range(1, 31)) == recorder.asked
    assert [p["step"] for p in recorder.points if "eval_loss" in p] == [15, 30]
    first = recorder.points[0]
    assert set(first) == {"step", "loss", "lr", "grad_norm", "tokens_per_s", "step_time_s"}
    ev = result.evaluation
    assert ev["eval_loss"] < first["loss"] - margin, (first["loss"], ev["eval_loss"])
    assert ev["final_train_loss"] == recorder.points[-1]["loss"]
    assert ev["eval_loss"] == recorder.points[-1]["eval_loss"]
    assert 0 < ev["trainable_share"] <= 1 and ev["trainable_params"] > 0
    assert ev["peak_memory_mb"] > 0 and ev["seconds_per_step"] > 0
    assert {"bleu", "rouge1", "rouge2", "rougeL"} <= ev.keys() and "bertscore_f1" not in ev

    artifacts = tmp_path / "artifacts"
    assert [p.name for p in result.artifacts] == ARTIFACTS and all(p.parent == artifacts for p in result.artifacts)
    metrics = json.loads((artifacts / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps({"points": recorder.points, "evaluation": ev}))
    assert (artifacts / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    samples = [json.loads(line) for line in (artifacts / "samples.jsonl").read_text().splitlines()]
    test = restaurants().test[:3]
    assert [(s["prompt"], s["reference"]) for s in samples] == [(e.prompt, e.completion) for e in test]

    # The adapter alone, on a freshly loaded base model, is the trained model: same validation loss (same
    # logits on 200 examples), same greedy generations.
    loaded = load_adapter(spec.model, artifacts)
    kwargs = {"chat": loaded.chat, "max_length": 64, "device": torch.device("cpu")}
    again = eval_loss(loaded.model, loaded.tokenizer, restaurants().validation, batch_size=16, **kwargs)
    assert again == pytest.approx(ev["eval_loss"], abs=1e-5)
    prompts = [e.prompt for e in test]
    assert generate(loaded.model, loaded.tokenizer, prompts, batch_size=16, max_new_tokens=8, **kwargs) == [
        s["generation"] for s in samples
    ]


def test_sora_gates_reach_exact_zeros_with_a_large_lambda(tmp_path):
    result = train(job({"kind": "sora", "r": 4, "sparse_lambda": 30.0}, steps=6), tmp_path, Recorder().hooks)
    tensors = load_file(tmp_path / "artifacts" / "adapter_model.safetensors")
    gates = torch.cat([t for name, t in tensors.items() if name.endswith("sora_gate")])
    assert gates.numel() == 2 * 2 * 4 and int((gates == 0).sum()) >= gates.numel() // 2, gates
    assert result.status == "succeeded"
    dense = train(job({"kind": "sora", "r": 4, "sparse_lambda": 0.0}, steps=6), tmp_path / "dense", Recorder().hooks)
    dense_gates = load_file(tmp_path / "dense" / "artifacts" / "adapter_model.safetensors")
    assert dense.status == "succeeded"
    assert all((t != 0).all() for name, t in dense_gates.items() if name.endswith("sora_gate"))


@pytest.mark.parametrize("method", [{"kind": "qaa"}, {"kind": "lora", "r": 4}], ids=["qaa", "lora-dropout"])
def test_resume_after_stop_or_crash_equals_an_uninterrupted_run_bitwise(tmp_path, method):
    spec = job(method, steps=10, checkpoint_every=5, eval_every=4)
    reference = Recorder()
    train(spec, tmp_path / "reference", reference.hooks)
    want = load_file(tmp_path / "reference" / "artifacts" / "adapter_model.safetensors")

    stopped = Recorder(stop_at=7)
    result = train(spec, tmp_path / "stopped", stopped.hooks)
    assert (result.status, result.evaluation, result.artifacts) == ("cancelled", None, [])
    assert sorted(p.name for p in (tmp_path / "stopped" / "checkpoints").iterdir()) == ["step-000005", "step-000007"]
    crashed = Recorder(crash_at=7)
    with pytest.raises(KeyboardInterrupt):
        train(spec, tmp_path / "crashed", crashed.hooks)
    assert [p["step"] for p in crashed.points] == [1, 2, 3, 4, 5, 6]

    for name, first in (("stopped", stopped), ("crashed", crashed)):
        resumed = Recorder()
        assert train(spec, tmp_path / name, resumed.hooks).status == "succeeded"
        # Stopped: continues after its step-7 checkpoint. Crashed: recomputes 6 from the step-5 checkpoint.
        assert resumed.points[0]["step"] == (8 if name == "stopped" else 6)
        by_step: dict[int, dict] = {}
        for point in without_timing(first.points + resumed.points):
            assert by_step.setdefault(point["step"], point) == point, "a step recorded again has the same values"
        assert list(by_step.values()) == without_timing(reference.points)  # bitwise: floats compared with ==
        got = load_file(tmp_path / name / "artifacts" / "adapter_model.safetensors")
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_cancel_returns_cancelled_and_keeps_the_last_checkpoint(tmp_path):
    recorder = Recorder(stop_at=3)
    result = train(job({"kind": "qaa"}, steps=50, checkpoint_every=0), tmp_path, recorder.hooks)
    assert (result.status, result.evaluation, result.usage, result.artifacts) == ("cancelled", None, {}, [])
    assert recorder.asked == [1, 2, 3] and [p["step"] for p in recorder.points] == [1, 2, 3]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000003"]
    assert not (tmp_path / "artifacts").exists()


def test_a_finished_run_resumed_again_only_evaluates(tmp_path):
    spec = job({"kind": "sora", "r": 2}, steps=4)
    first = train(spec, tmp_path, Recorder().hooks)
    again = Recorder()
    second = train(spec, tmp_path, again.hooks)
    assert again.points == [] and second.status == "succeeded"
    first.evaluation.pop("peak_memory_mb"), second.evaluation.pop("peak_memory_mb")  # the process's high-water mark
    assert second.evaluation == first.evaluation


def test_bad_inputs_are_job_errors_naming_the_cause(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "no completion"}\n')
    with pytest.raises(JobError, match="line 3: 'completion'"):
        train(job({"kind": "qaa"}, dataset=str(bad)), tmp_path / "a", Recorder().hooks)
    with pytest.raises(JobError, match="line 3"):
        train(job({"kind": "qaa"}, dataset="ds_00000000"), tmp_path / "b", Recorder().hooks,
              resolve_dataset=lambda ref: bad)  # fmt: skip
    with pytest.raises(JobError, match="builtin:nope"):
        train(job({"kind": "qaa"}, model="builtin:nope"), tmp_path / "c", Recorder().hooks)
    with pytest.raises(JobError, match=r"'lora' does not fit model 'builtin:tiny-gpt2'.*c_attn"):
        train(job({"kind": "lora"}, model="builtin:tiny-gpt2"), tmp_path / "d", Recorder().hooks)


def test_qaa_on_tiny_gpt2_with_the_exact_engine(tmp_path):
    recorder = Recorder()
    spec = job({"kind": "qaa", "target_modules": ["c_attn"], "layers": 1}, model="builtin:tiny-gpt2", steps=4)
    result = train(spec, tmp_path, recorder.hooks)
    assert result.status == "succeeded" and result.usage == {}
    assert len(recorder.points) == 4 and recorder.points[0]["grad_norm"] > 0
    config = json.loads((tmp_path / "artifacts" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["c_attn"] and "backend" not in config  # the backend is a run's, not saved
    loaded = load_adapter(spec.model, tmp_path / "artifacts")
    kwargs = {"chat": True, "max_length": 64, "device": torch.device("cpu")}
    assert eval_loss(loaded.model, loaded.tokenizer, restaurants().validation, batch_size=16, **kwargs) == (
        pytest.approx(result.evaluation["eval_loss"], abs=1e-5)
    )


def test_schedule_and_data_order():
    factor = lr_factor(steps=10, warmup=2)
    assert [round(factor(i), 4) for i in range(10)] == [0.5, 1.0, 1.0, 0.9619, 0.8536, 0.6913, 0.5, 0.3087,
                                                         0.1464, 0.0381]  # fmt: skip
    epoch = [i for step in range(1, 6) for i in batch_indices(10, 2, seed=0, step=step)]
    assert sorted(epoch) == list(range(10)) and epoch != list(range(10))
    assert batch_indices(10, 4, seed=0, step=3) == epoch[8:10] + batch_indices(10, 2, seed=0, step=6)
    assert batch_indices(10, 2, seed=1, step=1) != batch_indices(10, 2, seed=0, step=1)


def test_the_training_device_is_honoured_and_cuda_without_a_gpu_is_refused(tmp_path):
    spec = job({"kind": "qaa", "layers": 1}, steps=2, device="cpu")
    assert train(spec, tmp_path / "cpu", Recorder().hooks).status == "succeeded"
    if torch.cuda.is_available():
        pytest.skip("this worker has CUDA: the refusal needs a CPU-only worker")
    with pytest.raises(JobError, match="training.device is 'cuda' but this worker has no CUDA device"):
        train(job({"kind": "qaa", "layers": 1}, steps=2, device="cuda"), tmp_path / "cuda", Recorder().hooks)


def test_report_to_exports_the_jobs_metrics_to_tensorboard_and_mlflow(tmp_path):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recorder = Recorder()
    spec = job({"kind": "lora", "r": 2}, steps=6, eval_every=3, report_to=["tensorboard", "mlflow", "tensorboard"])
    assert spec.training.report_to == ["tensorboard", "mlflow"]
    result = train(spec, tmp_path, recorder.hooks)
    assert result.status == "succeeded"
    artifacts = tmp_path / "artifacts"
    losses = [(p["step"], p["loss"]) for p in recorder.points]
    evals = [(p["step"], p["eval_loss"]) for p in recorder.points if "eval_loss" in p]
    assert len(losses) == 6 and [s for s, _ in evals] == [3, 6]

    events = EventAccumulator(str(artifacts / "tensorboard"))
    events.Reload()
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("loss")] == losses
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("eval_loss")] == evals
    assert events.Scalars("evaluation/bleu")[0].value == pytest.approx(result.evaluation["bleu"])

    client = MlflowClient(tracking_uri=f"sqlite:///{artifacts / 'mlflow' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("qaa").experiment_id])
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
    assert history == [(s, pytest.approx(v)) for s, v in losses]
    assert run.data.params["method.kind"] == "lora" and run.data.params["training.steps"] == "6"
    assert run.data.metrics["evaluation.eval_loss"] == pytest.approx(result.evaluation["eval_loss"])
    names = {p.relative_to(tmp_path).as_posix() for p in result.artifacts}
    assert "artifacts/mlflow/mlflow.db" in names and any(n.startswith("artifacts/tensorboard/events.") for n in names)
