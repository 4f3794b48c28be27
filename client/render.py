"""How the client shows things to a person: rich tables for jobs, metrics, backends, estimates, comparisons.

Scripts use `--output json` instead, which prints the API's JSON unchanged (`print_json`).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from rich.console import Console
from rich.table import Table

_WIDE = 200  # piped output is not cut at 80 columns: a table row stays one line for grep and diff


def console(*, stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    wide = not stream.isatty() and "COLUMNS" not in os.environ
    return Console(stderr=stderr, width=_WIDE if wide else None, highlight=False)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def fmt(value: Any, digits: int = 4) -> str:
    """Numbers rounded for reading (`0.001235`, `31.42`, `1,234`), None as a dash."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return str(value)
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value else f"{value:,.{digits}f}".rstrip("0").rstrip(".")
    return str(value)


def flatten(data: Mapping[str, Any] | None, prefix: str = "") -> dict[str, Any]:
    """`{"rouge": {"rougeL": 0.5}}` -> `{"rouge.rougeL": 0.5}`; lists stay whole."""
    out: dict[str, Any] = {}
    for key, value in (data or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def method_label(job: Mapping[str, Any]) -> str:
    """`qaa L=2 expval`, `lora r=8`, `prefix 20 tokens`: the method and the option that sets its size."""
    method = job.get("method") or {}
    kind = method.get("kind", "qaa")
    if kind == "qaa":
        qubits = method.get("qubits", "auto")
        parts = [f"L={method.get('layers', 2)}", method.get("readout", "expval")]
        if qubits != "auto":
            parts.append(f"n={qubits}")
        return "qaa " + " ".join(parts)
    if kind in ("lora", "sora"):
        return f"{kind} r={method.get('r', 8)}"
    if kind == "prefix":
        return f"prefix {method.get('num_virtual_tokens', 20)} tokens"
    return kind


def backend_label(job: Mapping[str, Any]) -> str:
    return job.get("backend") or "-"


def jobs_table(jobs: Iterable[Mapping[str, Any]]) -> Table:
    table = Table("id", "name", "status", "method", "backend", "progress", "created")
    for job in jobs:
        progress = job.get("progress") or {}
        table.add_row(
            job["id"],
            job.get("name") or "-",
            job["status"],
            method_label(job),
            backend_label(job),
            f"{progress.get('step', 0)}/{progress.get('steps', '?')}",
            str(job.get("created_at", "-"))[:19].replace("T", " "),
        )
    return table


def key_value_table(title: str, data: Mapping[str, Any], *, justify: str = "right") -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify=justify)
    for key, value in flatten(data).items():
        table.add_row(key, fmt(value))
    return table


def job_tables(job: Mapping[str, Any]) -> list[Table]:
    """The job's summary, then its quantum counters and its evaluation when it has them."""
    progress = job.get("progress") or {}
    summary = {
        "id": job["id"],
        "name": job.get("name") or "-",
        "status": job["status"],
        "model": job.get("model", "-"),
        "dataset": job.get("dataset", "-"),
        "method": method_label(job),
        "backend": backend_label(job),
        "progress": f"{progress.get('step', 0)}/{progress.get('steps', '?')}",
        "attempts": job.get("attempts", 0),
        "created": job.get("created_at"),
        "started": job.get("started_at"),
        "finished": job.get("finished_at"),
    }
    if job.get("error"):
        summary["error"] = job["error"]
    tables = [key_value_table("job", summary, justify="left")]
    if job.get("usage"):
        tables.append(key_value_table("quantum usage", job["usage"]))
    if job.get("evaluation"):
        tables.append(evaluation_table(job["evaluation"]))
    return tables


def evaluation_table(evaluation: Mapping[str, Any]) -> Table:
    table = Table("metric", "value", title="evaluation", title_justify="left")
    for key, value in flatten(evaluation).items():
        table.add_row(key, fmt(value))
    return table


def metrics_table(points: list[Mapping[str, Any]]) -> Table:
    columns = metric_columns(points)
    table = Table(*columns)
    for point in points:
        table.add_row(*(fmt(point.get(c)) for c in columns))
    return table


def metric_columns(points: Iterable[Mapping[str, Any]]) -> list[str]:
    """`step` first, then every other key in the order first seen."""
    seen: dict[str, None] = {"step": None}
    for point in points:
        seen.update(dict.fromkeys(point))
    return list(seen)


def backends_table(backends: Iterable[Mapping[str, Any]]) -> Table:
    table = Table("name", "kind", "qubits", "basis gates", "noise", "max shots")
    for b in backends:
        table.add_row(
            b["name"], b["kind"], fmt(b["qubits"]), ", ".join(b["basis_gates"]), fmt(b["noise"]), fmt(b["max_shots"])
        )
    return table


def estimate_table(est: Mapping[str, Any]) -> Table:
    seconds = est.get("seconds")
    shown = {
        "backend": est["backend"],
        "adapters": est["adapters"],
        "input widths": ", ".join(map(str, est["d_in"])) or "-",
        "tokens per step": est["tokens_per_step"],
        "circuits per step": est["circuits_per_step"],
        "circuits": est["circuits"],
        "shots": est["shots"],
        "primitive calls": est["primitive_calls"],
        "time": f"{fmt(seconds['low'], 2)} - {fmt(seconds['high'], 2)} s" if seconds else "unknown for this model",
        "within budget": "yes" if est["within_budget"] else "NO",
    }
    if est.get("note"):
        shown["note"] = est["note"]
    return key_value_table("estimate", shown)
