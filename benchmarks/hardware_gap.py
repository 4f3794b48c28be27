"""A QAA adapter a device can run, on SmolLM2: what it keeps of the default's quality, and its hardware gap.

One adapter (one set of weights) follows the path a user with a device takes, through the worker's own code
(`workers.trainer.train`, the function a Celery worker runs for a job):

1. train `examples/qaa-hardware.yaml` (n = 4 qubits, L = 1, q and v projections of all 30 blocks), with learned
   and with fixed compression, on the exact engine with the method bench's budget and seed 0, so their eval loss
   and BLEU sit beside the default QAA row (n = 10) of `benchmarks/results/methods.json`;
2. evaluate that adapter (`kind: evaluate`) on FakeManilaV2 and FakeTorino noise, without mitigation, with M3 and
   with ZNE: the readout error against the exact engine on the same inputs (mean |delta r|), the eval loss of the
   same weights on exact and on the device, and the shots it took;
3. fine-tune it a few steps on FakeManilaV2 (`init_from`, parameter-shift, noise-aware) and evaluate it there again.

    python benchmarks/hardware_gap.py        # writes benchmarks/results/hardware_gap.json

About 100 minutes on 2 cores; an interrupted run resumes from the rows it finished (`.bench-hardware-gap/`).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from client.spec_file import evaluate_spec, load_spec  # noqa: E402
from service.admission import ADAPTER_FILES, SourceAdapter  # noqa: E402
from service.spec import parse_spec  # noqa: E402
from workers.bench import PUBLISHED  # noqa: E402
from workers.tasks import file_digest  # noqa: E402
from workers.trainer import TrainingHooks, train  # noqa: E402

SPEC = ROOT / "examples" / "qaa-hardware.yaml"
OUT = ROOT / "benchmarks" / "results" / "hardware_gap.json"
WORK = ROOT / ".bench-hardware-gap"
DEVICES = ("FakeManilaV2", "FakeTorino")
MITIGATIONS = {"none": [], "m3": ["m3"], "zne": ["zne"]}
#: The two ways a 4-qubit register takes a 576-wide input, trained alike; the gap is measured on the one with
#: the lower eval loss, which `examples/qaa-hardware.yaml` ships.
CANDIDATES = {"learned": {"compress": "learned"}, "fixed": {"compress": "fixed"}}
#: The gap is measured on this many test examples, with one generated token (a prefill): each forward runs all
#: 60 adapters' circuits on the device's noise (about 10 ms per circuit here), so longer generations cost hours.
GAP_SAMPLES, GAP_NEW_TOKENS = 4, 1
#: Noise-aware fine-tuning: a few parameter-shift steps on the device's noise (input gradients off), on the first
#: `TUNE_EXAMPLES` training examples (a JSONL, so the job's closing eval-loss pass holds a tenth of them, not 200).
TUNE_DEVICE, TUNE_STEPS, TUNE_BATCH, TUNE_LENGTH, TUNE_LR, TUNE_SHOTS = "FakeManilaV2", 2, 1, 8, 2e-3, 1024
TUNE_EXAMPLES = 40


def _cached(name: str, compute, *args):
    """`compute(*args)`, or its result from an earlier, interrupted run of this script (`WORK/results.json`)."""
    path = WORK / "results.json"
    done = json.loads(path.read_text()) if path.exists() else {}
    if name not in done:
        done[name] = compute(*args)
        WORK.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(done, indent=1))
    print(json.dumps({name: done[name]}), flush=True)
    return done[name]


def _hooks() -> TrainingHooks:
    return TrainingHooks(lambda points: None, lambda step: True)


def _source(job_id: str, run_dir: Path) -> SourceAdapter:
    return SourceAdapter(
        job_id, {name: (str(run_dir / name), file_digest(run_dir / name)[1]) for name in ADAPTER_FILES}
    )


def _trained_spec(overrides: dict) -> dict:
    spec = load_spec(SPEC)
    spec["method"] |= overrides
    b = PUBLISHED
    spec["training"] |= {"steps": b.steps, "batch_size": b.batch_size, "max_length": b.max_length, "seed": 0,
                         "eval_every": b.eval_every, "checkpoint_every": 0}  # fmt: skip
    spec["evaluation"] = {"metrics": list(b.metrics), "max_new_tokens": b.max_new_tokens, "samples": b.samples}
    return spec


def _gap(trained: dict, job_id: str, source: SourceAdapter, device: str, words: list[str], name: str) -> dict:
    spec = evaluate_spec(trained, job_id, f"fake:{device}", shots=None, mitigation=words, samples=GAP_SAMPLES)
    spec["evaluation"] |= {"metrics": [], "max_new_tokens": GAP_NEW_TOKENS}
    started = time.perf_counter()
    result = train(parse_spec(spec), WORK / name, _hooks(), source=source)
    report = result.evaluation
    return {
        "backend": device,
        "mitigation": "+".join(words) or "none",
        "readout_mean_abs": round(report["gap"]["readout_mean_abs"], 4),
        "readout_max_abs": round(report["gap"]["readout_max_abs"], 4),
        "eval_loss_exact": round(report["exact"]["eval_loss"], 4),
        "eval_loss_device": round(report["on_backend"]["eval_loss"], 4),
        "circuits": result.usage["circuits"],
        "shots": result.usage["shots"],
        "seconds": round(time.perf_counter() - started, 1),
    }


def default_row() -> dict:
    """The default QAA row (n = 10) of the published method table: means over its seeds."""
    rows = json.loads((ROOT / "benchmarks" / "results" / "methods.json").read_text())
    row = next(r for r in rows if r["method"] == "qaa" and "(default)" in r["variant"])
    keys = ("variant", "seeds", "trainable_params", "eval_loss", "eval_loss_std", "bleu", "bleu_std")
    return {k: row[k] for k in keys}


def _train_candidate(spec: dict, label: str) -> dict:
    result = train(parse_spec(spec), WORK / f"trained-{label}", _hooks())
    keys = ("eval_loss", "bleu", "rougeL", "bertscore_f1", "trainable_params", "trainable_share", "seconds_per_step")
    return {"compress": label, **{k: result.evaluation[k] for k in keys}}


def _tune(trained: dict, job_id: str, source: SourceAdapter) -> float:
    """Fine-tune the adapter a few noise-aware steps on the device; its seconds."""
    from workers.datasets import restaurants

    data = WORK / "tune.jsonl"
    rows = restaurants().train[:TUNE_EXAMPLES]
    data.write_text("".join(json.dumps({"prompt": r.prompt, "completion": r.completion}) + "\n" for r in rows))
    tune = {**trained, "dataset": str(data), "init_from": job_id,
            "quantum": {"backend": f"fake:{TUNE_DEVICE}", "shots": TUNE_SHOTS, "input_grad": "none"}}  # fmt: skip
    tune["training"] = {**trained["training"], "steps": TUNE_STEPS, "batch_size": TUNE_BATCH,
                        "max_length": TUNE_LENGTH, "learning_rate": TUNE_LR, "eval_every": 0}  # fmt: skip
    tune["evaluation"] = {"metrics": [], "samples": 1, "max_new_tokens": 1}
    started = time.perf_counter()
    train(parse_spec(tune), WORK / "tuned", _hooks(), source=source)
    return round(time.perf_counter() - started, 1)


def main() -> None:
    started = time.perf_counter()
    trained_rows, sources = [], {}
    for label, overrides in CANDIDATES.items():
        sources[label] = _trained_spec(overrides)
        trained_rows.append(_cached(f"trained-{label}", _train_candidate, sources[label], label))
    chosen = min(trained_rows, key=lambda r: r["eval_loss"])["compress"]
    trained = sources[chosen]
    job_id = "job_" + "0" * 23 + "1"  # the script's own id for the trained adapter (no store involved)
    source = _source(job_id, WORK / f"trained-{chosen}")
    rows = []
    for device in DEVICES:
        for label, words in MITIGATIONS.items():
            name = f"{device}-{label}"
            rows.append({"adapter": "trained on exact",
                         **_cached(name, _gap, trained, job_id, source, device, words, name)})  # fmt: skip
    tune_seconds = _cached("tuning", _tune, trained, job_id, source)
    tuned_id = "job_" + "0" * 23 + "2"
    tuned = _cached("tuned-gap", _gap, trained, tuned_id, _source(tuned_id, WORK / "tuned"), TUNE_DEVICE, [],
                    "tuned-gap")  # fmt: skip
    rows.append({"adapter": f"+{TUNE_STEPS} noise-aware steps on {TUNE_DEVICE}", **tuned})
    record = {
        "spec": str(SPEC.relative_to(ROOT)),
        "trained": trained_rows,
        "chosen": chosen,
        "method": trained["method"],
        "default": default_row(),
        "gap_samples": GAP_SAMPLES,
        "gap_new_tokens": GAP_NEW_TOKENS,
        "tuning": {
            "device": TUNE_DEVICE,
            "steps": TUNE_STEPS,
            "batch_size": TUNE_BATCH,
            "max_length": TUNE_LENGTH,
            "learning_rate": TUNE_LR,
            "shots": TUNE_SHOTS,
            "examples": TUNE_EXAMPLES,
            "seconds": tune_seconds,
        },  # fmt: skip
        "wall_seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
    OUT.write_text(json.dumps(record, indent=2) + "\n")
    print(markdown(record))


def markdown(record: dict) -> str:
    """The README's tables of a run (tests/test_readme.py checks the README holds exactly this)."""
    d = record["default"]
    lines = [
        "| adapter | trainable params | eval loss | BLEU | ROUGE-L | BERTScore F1 |",
        "|---|---|---|---|---|---|",
        f"| default QAA (n = 10, L = 2), mean of seeds {d['seeds']} | {d['trainable_params']:,} | "
        f"{d['eval_loss']:.3f} | {d['bleu']:.2f} | | |",
    ]
    for t in record["trained"]:
        lines.append(
            f"| n = 4, L = 1, compress {t['compress']}, seed 0 | {t['trainable_params']:,} | {t['eval_loss']:.3f} | "
            f"{t['bleu']:.2f} | {t['rougeL']:.3f} | {t['bertscore_f1']:.4f} |"
        )
    lines += [
        "",
        "| adapter | device | mitigation | mean abs readout error | max | eval loss exact / device | shots |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in record["rows"]:
        lines.append(
            f"| {r['adapter']} | {r['backend']} | {r['mitigation']} | {r['readout_mean_abs']:.4f} | "
            f"{r['readout_max_abs']:.3f} | {r['eval_loss_exact']:.3f} / {r['eval_loss_device']:.3f} | {r['shots']:,} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
