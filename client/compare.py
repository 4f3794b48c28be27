"""`compare`: one row per finished job with the figures the QAA literature compares methods on.

Scores are read from the job's `evaluation` (and `usage`) by name, whatever nesting the worker used:
`rougeL`, `rouge_l` and `rouge.rougeL` are all ROUGE-L. Final loss and time per step come from the metric
points; a job that recorded no step times gets its wall time divided by its steps.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.table import Table

from client.render import backend_label, flatten, fmt, method_label

#: Column -> accepted metric names, compared without case, `_`, `-` or `.`.
ALIASES: dict[str, tuple[str, ...]] = {
    "trainable_share": ("trainableshare", "trainablefraction"),
    "bleu": ("bleu", "sacrebleu"),
    "rouge_l": ("rougel", "rougelf", "rougelfmeasure", "rougelf1"),
    "bertscore_f1": ("bertscoref1", "bertscore", "bertscoref"),
    "peak_memory_mb": ("peakmemorymb", "peakrssmb", "peakmemory", "peakrss"),
}
STEP_TIME_KEYS = ("steptime", "stepseconds", "secondsperstep", "steptimes", "stepdurations")
COLUMNS = (
    ("id", "id"),
    ("method", "method"),
    ("backend", "backend"),
    ("trainable_share", "trainable share"),
    ("bleu", "BLEU"),
    ("rouge_l", "ROUGE-L"),
    ("bertscore_f1", "BERTScore F1"),
    ("final_loss", "final loss"),
    ("seconds_per_step", "s/step"),
    ("peak_memory_mb", "peak MB"),
)


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _lookup(values: Mapping[str, Any], aliases: tuple[str, ...]) -> float | None:
    """The first numeric value whose full dotted name, or last part, matches an alias (in alias order)."""
    by_name: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            by_name.setdefault(_norm(key), value)
            by_name.setdefault(_norm(key.rsplit(".", 1)[-1]), value)
    return next((by_name[a] for a in aliases if a in by_name), None)


def _seconds_per_step(job: Mapping[str, Any], points: Sequence[Mapping[str, Any]]) -> float | None:
    times = [t for t in (_lookup(p, STEP_TIME_KEYS) for p in points) if t is not None]
    if times:
        return sum(times) / len(times)
    started, finished = job.get("started_at"), job.get("finished_at")
    steps = (job.get("progress") or {}).get("step") or 0
    if started and finished and steps:
        return (datetime.fromisoformat(finished) - datetime.fromisoformat(started)).total_seconds() / steps
    return None


def row(job: Mapping[str, Any], points: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The comparison figures of one job (None where the job did not record them)."""
    values = {**flatten(job.get("usage")), **flatten(job.get("evaluation"))}
    losses = [p["loss"] for p in points if isinstance(p.get("loss"), int | float)]
    out: dict[str, Any] = {
        "id": job["id"],
        "name": job.get("name"),
        "status": job["status"],
        "method": method_label(job),
        "backend": backend_label(job),
    }
    out.update({column: _lookup(values, aliases) for column, aliases in ALIASES.items()})
    out["final_loss"] = losses[-1] if losses else None
    out["seconds_per_step"] = _seconds_per_step(job, points)
    return out


def table(rows: Sequence[Mapping[str, Any]]) -> Table:
    out = Table(*(title for _, title in COLUMNS))
    digits = {"seconds_per_step": 3, "peak_memory_mb": 1}
    for r in rows:
        share = r["trainable_share"]
        cells = [fmt(r[key], digits.get(key, 4)) for key, _ in COLUMNS]
        cells[3] = "-" if share is None else f"{share:.4%}"
        out.add_row(*cells)
    return out


def plot(series: Mapping[str, Sequence[Mapping[str, Any]]], path: Path) -> None:
    """Overlay the train loss curves (solid) and eval losses (dots) of several jobs in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    try:
        for label, points in series.items():
            train = [(p["step"], p["loss"]) for p in points if isinstance(p.get("loss"), int | float)]
            line = ax.plot(*zip(*train, strict=True), label=label)[0] if train else None
            evals = [(p["step"], p["eval_loss"]) for p in points if isinstance(p.get("eval_loss"), int | float)]
            if evals:
                color = line.get_color() if line else None
                ax.plot(*zip(*evals, strict=True), "o--", color=color, label=f"{label} (eval)")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
