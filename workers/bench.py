"""`qaa bench`: full fine-tuning, LoRA, prefix tuning, SoRA and QAA side by side, each row a real job of the service.

Every job goes over HTTP through `client.api.ApiClient`, on one model, dataset, step count, seed set and
evaluation, so the table measures the product itself. The published run is on `builtin:e2e` (the E2E NLG
Challenge's human references; each generation scored against every reference of its MR); `--quick` runs the same
rows on the synthetic `builtin:restaurants`. Rows:

- the learning-rate grid: each headline method at `lr_factors` times its example's rate, seed 0, `grid_steps`
  steps, scored by eval loss on the validation MRs only (no test MR is generated for it); each method then runs
  at the rate with the lowest validation loss;
- the five headline methods, whose method options are those of `examples/full.yaml`, `lora.yaml`, `prefix.yaml`,
  `sora.yaml` and `qaa-smollm2.yaml` (the default QAA row), at their chosen rates, with `seeds` seeds;
- QAA variants on the exact engine (`QAA_VARIANTS`), and QAA at the survey's share of trainable parameters
  (`SHARE_TARGETS`: at most 0.09 % of SmolLM2's), first seed only, at QAA's chosen rate;
- the hardware rows, one adapter (one set of weights): QAA compressed to 4 qubits on one module, trained on the
  exact engine; the same weights evaluated (`kind: evaluate`) on `hardware_device`'s noise without and with each
  mitigation; then fine-tuned `hardware_steps` noise-aware steps of `hardware_batch_size` rows on that device
  (`init_from`, parameter-shift: each token costs 2P + 1 circuits) and evaluated there again. An evaluate row
  reports the device's scores, its eval loss and the readout error against the exact engine on the same inputs
  (`readout_error`), on `hardware_samples` test examples with `hardware_new_tokens` new tokens.

Jobs run one at a time. Without `url`, each job gets a fresh embedded stack (API + one worker): on CPU a job's
`peak_memory_mb` is its worker's RSS high-water mark, which would otherwise be the highest of every job before.

Outputs in `out`:
- `methods.json`: a list of rows with the keys `ROW_KEYS`. Scores and losses are means over the row's seeds,
  with `<key>_std` beside each (sample standard deviation; null with one seed); `config` is the job spec every
  seed of the row ran, seed and name aside, so a row says exactly what produced it.
- `methods_budget.json`: the run as a whole (budget, command, service, machine, wall time, job ids per row,
  failures) and the issue's targets checked on the measured numbers.
- `methods.md`: the table and the targets; `loss_curves.png`: each row's first seed, train loss as a moving
  average and eval loss as dots.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import socket
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from client import render
from client.api import ApiClient, ClientError
from client.config import resolve
from client.spec_file import load_spec
from client.watch import watch_live
from service.settings import get_settings
from workers.stack import Stack, StackError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
HEADLINE_SPECS = {"full": "full.yaml", "lora": "lora.yaml", "prefix": "prefix.yaml", "sora": "sora.yaml",
                  "qaa": "qaa-smollm2.yaml"}  # fmt: skip
#: QAA variants beside the default (L = 2, expval): (layers, readout).
QAA_VARIANTS = ((1, "expval"), (4, "expval"), (2, "expval+zz"))
#: QAA at the survey's share (about 0.09 % trainable): the default adapter on q_proj and v_proj of every other
#: layer, half the adapters (SmolLM2: 15 x 7,780 = 116,700 of 134.5 M parameters, 0.087 %). Fewer modules rather
#: than a smaller readout or a shared `Up`: each adapter keeps the default's shape, so the row isolates how many
#: layers QAA needs.
SHARE_TARGETS = r".*layers\.\d*[02468]\.self_attn\.(q|v)_proj"
#: Means over seeds with a `_std` beside them.
SCORES = ("bleu", "rouge1", "rouge2", "rougeL", "bertscore_f1", "final_train_loss", "eval_loss")
ROW_KEYS = ("method", "variant", "group", "dataset", "learning_rate", "trainable_params", "trainable_share", *SCORES,
            "readout_error", "seconds_per_step", "peak_memory_mb", "seeds")  # fmt: skip
#: The hardware rows' evaluations on the device, by label: `quantum.mitigation` of each (None: unmitigated).
HARDWARE_MITIGATIONS = {
    "no mitigation": None,
    "M3": {"readout": "m3"},
    "TREX": {"readout": "trex"},
    "twirling + TREX": {"readout": "trex", "twirling": True},
    "ZNE": {"zne": {}},
    "ZNE + TREX": {"readout": "trex", "zne": {}},
}
POLL_S = 2.0
#: What `peak_memory_mb` means, by whether the bench started the service (False) or was given a URL (True).
PEAK_MEMORY = {
    False: "on CPU the peak RSS of the job's own worker process, on CUDA torch's peak allocation",
    True: "on CPU the worker's RSS high-water mark (earlier jobs of that worker included), on CUDA torch's peak",
}


def eval_every(steps: int) -> int:
    """Eval loss halfway and at the end: two points of convergence for 200 validation examples' cost."""
    return max(1, steps // 2)


@dataclass(frozen=True)
class Budget:
    """What every row shares. `seeds` applies to the headline rows; variants and the hardware rows run seed 0."""

    model: str = "builtin:smollm2-135m"
    dataset: str = "builtin:e2e"
    steps: int = 60
    batch_size: int = 4
    #: E2E with SmolLM2's chat template: 97 tokens at the median, the prompt's start (the template's system line)
    #: is cut first, so the reference itself is kept whole in nearly every row.
    max_length: int = 96
    seeds: int = 3
    #: Test MRs scored (a fixed random sample of E2E's 630; `--samples 630` scores them all).
    samples: int = 50
    max_new_tokens: int = 48
    #: The learning-rate grid: these multiples of each method's example rate, `grid_steps` steps each.
    lr_factors: tuple[float, ...] = (0.5, 1.0, 2.0)
    grid_steps: int = 30
    metrics: tuple[str, ...] = ("bleu", "rouge", "bertscore")
    hardware_steps: int = 5
    hardware_batch_size: int = 2
    hardware_shots: int = 1024
    hardware_qubits: int = 4
    hardware_device: str = "FakeManilaV2"
    hardware_samples: int = 10
    hardware_new_tokens: int = 16
    #: One module (a suffix every Llama-style model has), so the noisy Aer row stays minutes long.
    hardware_target: str = "layers.0.self_attn.v_proj"

    @property
    def eval_every(self) -> int:
        return eval_every(self.steps)


#: The published table: 15 grid jobs, 5 headline rows x 3 seeds, 4 one-seed QAA rows and 9 hardware jobs, sized to
#: about 100 minutes on a 2-core CPU; the wall time of the published run is in benchmarks/results/methods_budget.json.
PUBLISHED = Budget()
#: `--quick`: the same rows in a few minutes, on the random-init tiny Llama and the synthetic set.
QUICK = replace(PUBLISHED, model="builtin:tiny-llama", dataset="builtin:restaurants", steps=6, batch_size=2,
                max_length=32, seeds=1, samples=4, max_new_tokens=8, lr_factors=(1.0,), grid_steps=2,
                hardware_steps=2, hardware_batch_size=1, hardware_shots=256, hardware_samples=2,
                hardware_new_tokens=2)  # fmt: skip


@dataclass
class Row:
    """One line of the table: a spec (seed left to `spec_for`) and the seeds it runs."""

    method: str
    variant: str
    spec: dict[str, Any]
    seeds: list[int]
    group: str  # grid | headline | variant | hardware
    #: The row whose adapter this one loads (its first job): `adapter_from` for an evaluate row, else `init_from`.
    source: Row | None = None
    jobs: list[dict[str, Any]] = field(default_factory=list)
    points: dict[int, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.method} {self.variant}"

    @property
    def learning_rate(self) -> float:
        return self.spec["training"]["learning_rate"]

    @property
    def tuned(self) -> bool:
        """Trains at its method's rate from the grid (the hardware rows keep their own)."""
        return self.group in ("headline", "variant")

    def spec_for(self, seed: int) -> dict[str, Any]:
        slug = "-".join("".join(c if c.isalnum() else " " for c in self.label).split())
        spec = json.loads(json.dumps(self.spec))
        spec["training"]["seed"] = seed
        if self.source is not None:
            if not self.source.jobs or self.source.jobs[0]["status"] != "succeeded":
                raise BenchError(f"{self.label} loads the adapter of {self.source.label}, which did not succeed")
            spec["adapter_from" if spec.get("kind") == "evaluate" else "init_from"] = self.source.jobs[0]["id"]
        return {"name": f"bench-{slug}-seed{seed}", **spec}


# --- the plan ---------------------------------------------------------------------------------------------------


def _job(budget: Budget, method: dict, learning_rate: float, quantum: dict | None = None, *,
         steps: int | None = None, batch_size: int | None = None) -> dict[str, Any]:  # fmt: skip
    steps = steps or budget.steps
    spec = {
        "model": budget.model,
        "dataset": budget.dataset,
        "method": method,
        "training": {"steps": steps, "batch_size": batch_size or budget.batch_size, "max_length": budget.max_length,
                     "learning_rate": learning_rate, "eval_every": eval_every(steps), "checkpoint_every": 0},
        "evaluation": {"metrics": list(budget.metrics), "max_new_tokens": budget.max_new_tokens,
                       "samples": budget.samples},
    }  # fmt: skip
    if quantum is not None:
        spec["quantum"] = quantum
    return spec


def _variant(method: dict) -> str:
    kind = method["kind"]
    if kind == "full":
        return "all weights"
    if kind == "lora":
        return f"r={method.get('r', 8)}"
    if kind == "prefix":
        return f"{method.get('num_virtual_tokens', 20)} virtual tokens"
    if kind == "sora":
        return f"r={method.get('r', 8)}, gate lambda={method.get('sparse_lambda', 1e-3):g}"
    return f"L={method.get('layers', 2)} {method.get('readout', 'expval')}"


def plan(budget: Budget) -> list[Row]:
    """Every row of the bench: the rate grid, the headline rows, the QAA variants and share row, the hardware rows.
    The headline and QAA rows carry their example's rate until `apply_rates` sets the one the grid chose."""
    headline_seeds = list(range(budget.seeds))
    grid, rows, default_qaa, qaa_lr = [], [], None, None
    for kind, name in HEADLINE_SPECS.items():
        example = load_spec(EXAMPLES / name)
        method, lr = example["method"], example["training"]["learning_rate"]
        quantum = {"backend": "exact"} if kind == "qaa" else None
        variant = f"exact {_variant(method)} (default)" if kind == "qaa" else _variant(method)
        for factor in budget.lr_factors:
            job = _job(budget, method, lr * factor, quantum, steps=budget.grid_steps)
            job["evaluation"]["samples"] = 0  # the grid is scored on the validation MRs alone
            grid.append(Row(kind, f"{variant}, lr={lr * factor:.2g} (grid)", job, [0], "grid"))
        rows.append(Row(kind, variant, _job(budget, method, lr, quantum), headline_seeds, "headline"))
        if kind == "qaa":
            default_qaa, qaa_lr = method, lr
    for layers, readout in QAA_VARIANTS:
        method = {**default_qaa, "layers": layers, "readout": readout}
        rows.append(Row("qaa", f"exact {_variant(method)}", _job(budget, method, qaa_lr, {"backend": "exact"}), [0],
                        "variant"))  # fmt: skip
    share = {**default_qaa, "target_modules": SHARE_TARGETS}
    rows.append(Row("qaa", f"exact {_variant(share)}, every other layer",
                    _job(budget, share, qaa_lr, {"backend": "exact"}), [0], "variant"))  # fmt: skip
    return grid + rows + hardware_rows(budget, default_qaa)


def choose_rates(rows: Sequence[Row]) -> dict[str, float]:
    """Per method, the grid rate whose job ended with the lowest validation eval loss (failed jobs excluded)."""
    best: dict[str, tuple[float, float]] = {}
    for row in rows:
        if row.group != "grid":
            continue
        for job in row.jobs:
            loss = (job.get("evaluation") or {}).get("eval_loss")
            if job["status"] == "succeeded" and isinstance(loss, int | float) and math.isfinite(loss):
                if row.method not in best or loss < best[row.method][0]:
                    best[row.method] = (loss, row.learning_rate)
    missing = {row.method for row in rows if row.group == "grid"} - set(best)
    if missing:
        raise BenchError(f"no learning rate of the grid succeeded for {', '.join(sorted(missing))}")
    return {method: lr for method, (_, lr) in best.items()}


def apply_rates(rows: Sequence[Row], rates: dict[str, float]) -> None:
    """Every headline and QAA row trains at its method's chosen rate."""
    for row in rows:
        if row.tuned:
            row.spec["training"]["learning_rate"] = rates[row.method]


def hardware_rows(budget: Budget, default_qaa: dict) -> list[Row]:
    """One adapter on the exact engine, on the device with each mitigation, fine-tuned there, evaluated again."""
    small = {**default_qaa, "target_modules": [budget.hardware_target], "qubits": budget.hardware_qubits,
             "compress": "fixed", "layers": 1, "readout": "expval"}  # fmt: skip
    size = f"n={budget.hardware_qubits} L=1 expval, 1 module"
    device = f"fake:{budget.hardware_device}"
    # A larger rate than the default row's: one 4-qubit adapter trains few parameters.
    lr = 1e-2
    trained = Row("qaa", f"{size}, trained on exact", _job(budget, small, lr, {"backend": "exact"}), [0], "hardware")

    def evaluated(source: Row, label: str, mitigation: dict | None) -> Row:
        quantum = {
            "backend": device,
            "shots": budget.hardware_shots,
            **({"mitigation": mitigation} if mitigation else {}),
        }
        spec = {**_job(budget, small, lr, quantum), "kind": "evaluate"}
        spec["evaluation"] |= {"samples": budget.hardware_samples, "max_new_tokens": budget.hardware_new_tokens}
        return Row("qaa", f"{size}, {label}", spec, [0], "hardware", source)

    rows = [trained]
    for label, mitigation in HARDWARE_MITIGATIONS.items():
        rows.append(evaluated(trained, f"same weights on {budget.hardware_device}, {label}", mitigation))
    noisy = {"backend": device, "shots": budget.hardware_shots, "gradient": "parameter-shift", "input_grad": "none"}
    tune = _job(budget, small, lr, noisy, steps=budget.hardware_steps, batch_size=budget.hardware_batch_size)
    tune["evaluation"] |= {"samples": budget.hardware_samples, "max_new_tokens": budget.hardware_new_tokens}
    tuned = Row("qaa", f"{size}, +{budget.hardware_steps} noise-aware steps on {budget.hardware_device}", tune, [0],
                "hardware", trained)  # fmt: skip
    rows.append(tuned)
    rows.append(evaluated(tuned, f"tuned weights on {budget.hardware_device}, no mitigation", None))
    return rows


# --- running --------------------------------------------------------------------------------------------------


class BenchError(Exception):
    """The bench cannot run as asked (the port of the embedded stack is taken, ...)."""


@contextlib.contextmanager
def _service(url: str | None) -> Iterator[ApiClient]:
    """A client of the service at `url`, or of a fresh embedded stack (API + one worker) stopped afterwards."""
    if url:
        conn = resolve(url)
        with ApiClient(conn.url, conn.api_key) as api:
            yield api
        return
    settings = get_settings()
    with socket.socket() as probe:
        try:
            probe.bind((settings.host, settings.port))
        except OSError as exc:
            raise BenchError(
                f"port {settings.port} on {settings.host} is taken ({exc.strerror}): set QAA_PORT for the bench's "
                "own stack, or pass --url to use the server that listens there"
            ) from None
    stack = Stack(settings, workers=1)
    try:
        stack.start()
        conn = resolve(stack.url)
        with ApiClient(conn.url, conn.api_key) as api:
            yield api
    finally:
        stack.stop()


def _run_job(url: str | None, spec: dict[str, Any], out) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Submit one job, follow it to its end; (the final job, its metric points). Cancelled if interrupted."""
    with _service(url) as api:
        job = api.submit_job(spec)
        out.print(f"{datetime.now():%H:%M:%S} submitted {job['id']} {spec['name']}", markup=False)
        try:
            job, counters = watch_live(api, job["id"], render.console(stderr=True), interval=POLL_S)
        except BaseException:
            with contextlib.suppress(ClientError):
                api.cancel_job(job["id"])
            raise
        return job, counters.points


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _scores(job: dict[str, Any]) -> dict[str, Any]:
    """A job's evaluation as a row reads it: an evaluate job's scores are those on the device, with its readout
    error against the exact engine beside them."""
    e = job["evaluation"]
    if job["spec"].get("kind") != "evaluate":
        return e
    return {**e["on_backend"], "readout_error": e["gap"]["readout_mean_abs"]}


def summarize(row: Row) -> dict[str, Any]:
    """The row's methods.json entry from its succeeded jobs' evaluations."""
    evals = [_scores(job) for job in row.jobs if job["status"] == "succeeded" and job.get("evaluation")]

    def values(key: str) -> list[float]:
        return [e[key] for e in evals if isinstance(e.get(key), int | float) and math.isfinite(e[key])]

    out: dict[str, Any] = {"method": row.method, "variant": row.variant, "group": row.group,
                           "dataset": row.spec["dataset"], "learning_rate": row.learning_rate}  # fmt: skip
    out["trainable_params"] = next(iter(values("trainable_params")), None)
    out["trainable_share"] = next(iter(values("trainable_share")), None)
    for key in SCORES:
        out[key], out[f"{key}_std"] = _mean_std(values(key))
    # Timing: the fastest seed, as timeit reports (other load on the machine only ever adds time); memory: the
    # highest peak.
    out["readout_error"] = next(iter(values("readout_error")), None)
    out["seconds_per_step"] = min(values("seconds_per_step"), default=None)
    out["peak_memory_mb"] = max(values("peak_memory_mb"), default=None)
    out["seeds"] = [job["spec"]["training"]["seed"] for job in row.jobs if job["status"] == "succeeded"]
    training = {k: v for k, v in row.spec["training"].items() if k != "seed"}
    out["config"] = {**row.spec, "training": training}  # what every seed ran, the seed aside
    return out


def targets(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets on the measured means: QAA (default row) within 1.0 BLEU and 0.01 BERTScore F1 of
    LoRA r=8 with at most half its trainable parameters, and above prefix tuning."""
    by = {m: next((r for r in rows if r["method"] == m and r["group"] == "headline"), None)
          for m in ("qaa", "lora", "prefix")}  # fmt: skip
    qaa, lora, prefix = by["qaa"], by["lora"], by["prefix"]

    def diff(a: dict | None, b: dict | None, key: str) -> float | None:
        return a[key] - b[key] if a and b and a.get(key) is not None and b.get(key) is not None else None

    out: dict[str, Any] = {
        "qaa_minus_lora_bleu": diff(qaa, lora, "bleu"),
        "qaa_minus_lora_bertscore_f1": diff(qaa, lora, "bertscore_f1"),
        "qaa_over_lora_params": (
            qaa["trainable_params"] / lora["trainable_params"]
            if qaa and lora and qaa["trainable_params"] and lora["trainable_params"]
            else None
        ),  # fmt: skip
    }
    for key in ("bleu", "rougeL", "bertscore_f1"):
        out[f"qaa_minus_prefix_{key}"] = diff(qaa, prefix, key)

    def holds(value: float | None, ok) -> bool | None:
        return None if value is None else bool(ok(value))

    out["met"] = {
        "bleu_within_1_of_lora": holds(out["qaa_minus_lora_bleu"], lambda d: d >= -1.0),
        "bertscore_within_0.01_of_lora": holds(out["qaa_minus_lora_bertscore_f1"], lambda d: d >= -0.01),
        "at_most_half_lora_params": holds(out["qaa_over_lora_params"], lambda r: r <= 0.5),
        "above_prefix_bleu": holds(out["qaa_minus_prefix_bleu"], lambda d: d > 0),
        "above_prefix_rougeL": holds(out["qaa_minus_prefix_rougeL"], lambda d: d > 0),
        "above_prefix_bertscore_f1": holds(out["qaa_minus_prefix_bertscore_f1"], lambda d: d > 0),
    }
    return out


# --- writing --------------------------------------------------------------------------------------------------


def _cell(row: dict[str, Any], key: str, digits: int) -> str:
    value, std = row.get(key), row.get(f"{key}_std")
    if value is None:
        return "-"
    return f"{value:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


TABLE = (
    ("method", "method"), ("variant", "variant"), ("trainable_params", "trainable params"),
    ("trainable_share", "share"), ("bleu", "BLEU"), ("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"),
    ("rougeL", "ROUGE-L"), ("bertscore_f1", "BERTScore F1"), ("final_train_loss", "final train loss"),
    ("eval_loss", "eval loss"), ("readout_error", "readout error"), ("seconds_per_step", "s/step"),
    ("peak_memory_mb", "peak MB"), ("seeds", "seeds"),
)  # fmt: skip


def markdown(rows: Sequence[dict[str, Any]], record: dict[str, Any]) -> str:
    """methods.md: how it was run, the table, and the targets."""
    b = record["budget"]
    lines = [
        "# Method comparison (`qaa bench`)",
        "",
        f"`{record['command']}` on {record['machine']['cpus']} CPU cores ({record['machine']['device']}), "
        f"{record['started_at'][:16].replace('T', ' ')} UTC, {record['wall_seconds'] / 60:.1f} min.",
        f"Model `{b['model']}`, data `{b['dataset']}`, {b['steps']} steps of {b['batch_size']} x {b['max_length']} "
        f"tokens, eval loss every {b['eval_every']} steps on 200 validation examples, BLEU/ROUGE/BERTScore on "
        f"{b['samples']} test examples (greedy, {b['max_new_tokens']} new tokens). Hardware rows: one adapter, its "
        f"evaluations on {b['hardware_samples']} test examples ({b['hardware_new_tokens']} new tokens, "
        f"{b['hardware_shots']} shots; readout error: mean |r_device - r_exact| on the same inputs), its "
        f"noise-aware tuning {b['hardware_steps']} steps of {b['hardware_batch_size']} x {b['max_length']}. "
        "Scores are means over "
        "the seeds listed, ± the sample standard deviation. s/step: the mean training step time of the fastest "
        f"seed; peak MB: the highest over the seeds, {record['peak_memory']}.",
        "",
        "| " + " | ".join(title for _, title in TABLE) + " |",
        "|" + "---|" * len(TABLE),
    ]
    digits = {"bleu": 2, "bertscore_f1": 4, "readout_error": 4, "seconds_per_step": 3, "peak_memory_mb": 0}
    for r in rows:
        cells = []
        for key, _ in TABLE:
            if key in ("method", "variant"):
                cells.append(r[key])
            elif key == "trainable_params":
                cells.append("-" if r[key] is None else f"{r[key]:,}")
            elif key == "trainable_share":
                cells.append("-" if r[key] is None else f"{r[key]:.4%}")
            elif key == "seeds":
                cells.append(",".join(map(str, r[key])) or "none")
            else:
                cells.append(_cell(r, key, digits.get(key, 3)))
        lines.append("| " + " | ".join(cells) + " |")
    t = record["targets"]
    lines += ["", "Targets (QAA default row against LoRA r=8 and prefix tuning):", ""]
    for name, met in t["met"].items():
        lines.append(f"- {name}: {'-' if met is None else ('met' if met else 'NOT met')}")
    numbers = {k: v for k, v in t.items() if k != "met"}
    lines += ["", "```json", json.dumps(numbers, indent=1), "```", ""]
    if record["failures"]:
        lines += ["Failed jobs:", ""] + [f"- {f['name']} ({f['id']}): {f['status']} {f['error']}" for f in
                                        record["failures"]] + [""]  # fmt: skip
    return "\n".join(lines)


def _smoothed(points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Train loss as a trailing moving average over a twentieth of the run (batches of a few rows are noisy)."""
    losses = [p["loss"] for p in points if isinstance(p.get("loss"), int | float)]
    window = max(1, len(losses) // 20)
    out, recent = [], []
    for p in points:
        q = dict(p)
        if isinstance(p.get("loss"), int | float):
            recent = [*recent[-(window - 1) :], p["loss"]] if window > 1 else [p["loss"]]
            q["loss"] = statistics.fmean(recent)
        out.append(q)
    return out


STYLES = {"headline": {"linewidth": 1.8}, "variant": {"linewidth": 1.0, "linestyle": "--"},
          "hardware": {"linewidth": 1.5}}  # fmt: skip


def plot_curves(plan_rows: Sequence[Row], path: Path) -> None:
    """Each row's first seed: smoothed train loss (lines) and eval loss (dots of the same colour). The hardware
    rows, which train fewer and smaller steps, get their own panel; one legend of a dozen rows stays readable."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 5.5), dpi=110)
    main, hardware = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
    for row in plan_rows:
        if not row.points or row.group == "grid":  # the rate grid is in the table; the plot shows the rows it chose
            continue
        points = _smoothed(row.points[min(row.points)])
        ax = hardware if row.group == "hardware" else main
        train = [(p["step"], p["loss"]) for p in points if isinstance(p.get("loss"), int | float)]
        if not train:  # an evaluate row trains nothing
            continue
        (line,) = ax.plot(*zip(*train, strict=True), label=row.label, **STYLES[row.group])
        evals = [(p["step"], p["eval_loss"]) for p in points if isinstance(p.get("eval_loss"), int | float)]
        if evals:
            ax.plot(*zip(*evals, strict=True), "o", color=line.get_color(), markersize=5)
    main.set_title("methods and QAA variants (dashed): train loss (moving average), eval loss (dots)", fontsize=9)
    hardware.set_title("hardware rows: QAA n=4 on the exact engine, then tuned on the device's noise", fontsize=9)
    for ax in (main, hardware):
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def write_results(out_dir: Path, plan_rows: Sequence[Row], record: dict[str, Any]) -> list[dict[str, Any]]:
    """methods.json, methods_budget.json, methods.md and loss_curves.png from the jobs run so far."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [summarize(r) for r in plan_rows if r.jobs]
    record["targets"] = targets(rows)
    record["rows"] = [{"method": r.method, "variant": r.variant, "jobs": [j["id"] for j in r.jobs]}
                      for r in plan_rows if r.jobs]  # fmt: skip
    (out_dir / "methods.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out_dir / "methods_budget.json").write_text(json.dumps(record, indent=1) + "\n")
    (out_dir / "methods.md").write_text(markdown(rows, record))
    plot_curves(plan_rows, out_dir / "loss_curves.png")
    return rows


def _machine() -> dict[str, Any]:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "CPU"
    return {"cpus": os.cpu_count(), "device": device, "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__}  # fmt: skip


def _command(url: str | None, quick: bool, seeds: int | None, steps: int | None, samples: int | None,
             out: Path) -> str:  # fmt: skip
    """The `qaa bench` line that reruns this run (the server aside, which `--url` names; `--resume` aside, which
    changes how it ran, not what)."""
    flags = [("--url", url), ("--seeds", seeds), ("--steps", steps), ("--samples", samples), ("--out", out)]
    return " ".join(["qaa bench", *(["--quick"] if quick else []), *(f"{k} {v}" for k, v in flags if v)])


def finished_jobs(url: str | None, out: Path) -> dict[tuple[str, int], tuple[dict[str, Any], list[dict[str, Any]]]]:
    """(row label, seed) -> (job, metric points) for every job a previous run in `out` recorded that the store
    holds as succeeded: what `--resume` does not run again."""
    path = out / "methods_budget.json"
    if not path.is_file():
        return {}
    entries = json.loads(path.read_text()).get("rows", [])
    done: dict[tuple[str, int], tuple[dict[str, Any], list[dict[str, Any]]]] = {}
    with _service(url) as api:
        for entry in entries:
            for job_id in entry["jobs"]:
                try:
                    job = api.get_job(job_id)
                except ClientError:  # not in this store (another machine, a wiped QAA_HOME): run it again
                    continue
                if job["status"] == "succeeded":
                    label = f"{entry['method']} {entry['variant']}"
                    done[(label, job["spec"]["training"]["seed"])] = (job, api.metrics(job_id))
    return done


def run_bench(*, url: str | None = None, quick: bool = False, seeds: int | None = None, steps: int | None = None,
              samples: int | None = None, out: Path = Path("benchmarks/results"),
              resume: bool = False) -> int:  # fmt: skip
    """Run every row of `plan` as jobs, one at a time, writing the results after each; 0 if all succeeded.

    The rate grid runs first; every other row then trains at its method's chosen rate, the headline rows first.
    With `resume`, jobs an earlier run in `out` finished (and the store still holds) are taken as they are, and
    the wall time adds up the sittings."""
    console = render.console()
    budget = QUICK if quick else PUBLISHED
    budget = replace(budget, **{k: v for k, v in (("seeds", seeds), ("steps", steps), ("samples", samples)) if v})
    rows = plan(budget)
    record: dict[str, Any] = {
        "command": _command(url, quick, seeds, steps, samples, out),
        "service": url or "embedded stack, a fresh API + 1 worker per job",
        "budget": asdict(budget) | {"eval_every": budget.eval_every},
        "peak_memory": PEAK_MEMORY[bool(url)],
        "machine": _machine(),
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "wall_seconds": 0.0,
        "failures": [],
    }
    if not url:  # a builtin model is exported once per QAA_HOME: not inside the first job's time and memory
        from workers.models import load_model

        load_model(budget.model, models_dir=get_settings().models_dir)
    started, before = time.monotonic(), 0.0
    try:
        done = finished_jobs(url, out) if resume else {}
        if done:  # the run goes on: its start and wall time count the earlier sittings
            earlier = json.loads((out / "methods_budget.json").read_text())
            record["started_at"], before = earlier["started_at"], earlier["wall_seconds"]
        jobs = [(row, seed) for seed in range(budget.seeds) for row in rows if seed in row.seeds]
        grid = [(row, seed) for row, seed in jobs if row.group == "grid"]
        # The rows the targets are measured on come first, so an interrupted run has them; then variants, hardware.
        rest = sorted(
            ((row, seed) for row, seed in jobs if row.group != "grid"), key=lambda j: j[0].group != "headline"
        )
        console.print(f"qaa bench: {len(rows)} rows, {len(jobs)} jobs ({len(done)} kept from an earlier run); "
                      f"results in {out}/", markup=False)  # fmt: skip
        for phase in (grid, rest):
            if phase is rest:
                record["learning_rates"] = choose_rates(rows)
                apply_rates(rows, record["learning_rates"])
                console.print(f"  chosen learning rates: {record['learning_rates']}", markup=False)
            # Jobs finished before are taken first: the results written after each new job then hold every one
            # of them, so a resumed run interrupted again loses none.
            for row, seed in sorted(phase, key=lambda job: not _finished_before(*job, done)):
                _one(url, row, seed, done, record, console)
                record["wall_seconds"] = round(before + time.monotonic() - started, 1)
                write_results(out, rows, record)
    except (ClientError, BenchError, StackError) as exc:
        console.print(f"qaa bench: {exc}", markup=False)
        return 1
    except KeyboardInterrupt:
        console.print("qaa bench: interrupted; the results so far are written (--resume picks them up)", markup=False)
        return 130
    console.print((out / "methods.md").read_text(), markup=False)
    return 1 if record["failures"] else 0


def _finished_before(row: Row, seed: int, done: dict) -> bool:
    """Whether an earlier run finished this job and every job it loads from (known before any of them runs)."""
    return (row.label, seed) in done and (row.source is None or _finished_before(row.source, 0, done))


def _kept(row: Row, seed: int, done: dict) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
    """The (job, points) an earlier run finished for `row` and `seed` with the spec it would run now, or None."""
    previous = done.get((row.label, seed))
    return previous if previous is not None and _same_run(previous[0]["spec"], row.spec_for(seed)) else None


def _one(url: str | None, row: Row, seed: int, done: dict, record: dict[str, Any], console) -> None:
    """Run (or, finished before with the same spec, take) one job of `row`."""
    previous = _kept(row, seed, done)
    if previous is not None:
        job, points = previous
        console.print(f"  {row.label} seed {seed}: {job['id']} finished before", markup=False)
    else:
        job, points = _run_job(url, row.spec_for(seed), console)
    row.jobs.append(job)
    row.points[seed] = points
    if job["status"] != "succeeded":
        record["failures"].append({k: job.get(k) for k in ("id", "name", "status", "error")})
    e = job.get("evaluation") or {}
    console.print(f"  {row.label} seed {seed}: {job['status']}, BLEU {render.fmt(e.get('bleu'))}, "
                  f"eval loss {render.fmt(e.get('eval_loss'))}, "
                  f"{render.fmt(e.get('seconds_per_step'))} s/step", markup=False)  # fmt: skip


def _same_run(stored: Any, wanted: Any) -> bool:
    """Whether a stored spec ran `wanted` (the store adds defaults at every level; a changed budget or rate means
    run again)."""
    if isinstance(wanted, dict):
        return isinstance(stored, dict) and all(_same_run(stored.get(k), v) for k, v in wanted.items())
    return stored == wanted
