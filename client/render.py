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
        usage = job["usage"]
        tables.append(key_value_table("quantum usage", _counted(usage)))
        if usage.get("circuits_on_backend"):
            tables.append(circuits_table(usage["circuits_on_backend"]))
    if job.get("evaluation"):
        tables.append(evaluation_table(job["evaluation"]))
    return tables


def _counted(usage: Mapping[str, Any]) -> dict[str, Any]:
    """The usage counters, with the runtime job ids as their count (`--output json` keeps the ids) and the
    circuits left to `circuits_table`: a list of 50 ids in a cell makes the table unreadable."""
    shown: dict[str, Any] = {}
    for key, value in usage.items():
        if key == "runtime_job_ids":
            shown["runtime_jobs"] = len(value)
        elif key != "circuits_on_backend":
            shown[key] = value
    return shown


def circuits_table(circuits: Iterable[Mapping[str, Any]]) -> Table:
    """Each distinct adapter circuit as transpiled for the device: where it runs, how deep, and its estimated
    success probability (the product of (1 - error) over its gates and measurements)."""
    table = Table("qubits", "physical qubits", "2q gates", "depth", "duration", "ESP", "worst readout error",
                  "median 2q error", title="circuits on the device", title_justify="left")  # fmt: skip
    for c in circuits:
        table.add_row(
            fmt(c["qubits"]),
            ", ".join(map(str, c["physical_qubits"])),
            fmt(c["two_qubit_gates"]),
            fmt(c["depth"]),
            f"{fmt(c['duration_s'] * 1e6, 3)} µs",
            fmt(c["esp"], 3),
            fmt(max(c["readout_errors"], default=None), 3),
            fmt(c.get("median_two_qubit_error"), 3),
        )
    return table


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


def _span(seconds: Mapping[str, float]) -> str:
    return f"{fmt(seconds['low'], 2)} - {fmt(seconds['high'], 2)} s"


def estimate_tables(est: Mapping[str, Any]) -> list[Table]:
    """The estimate's figures, and on a device each circuit as it will run there (its ESP says whether it
    survives the noise) before any QPU time is spent."""
    seconds, qpu, evaluation = est.get("seconds"), est.get("qpu_seconds"), est.get("evaluation") or {}
    shown = {
        "backend": est["backend"],
        "adapters": est["adapters"],
        "input widths": ", ".join(map(str, est["d_in"])) or "-",
        "tokens per step": est["tokens_per_step"],
        "circuits per step": est["circuits_per_step"],
        "circuits": est["circuits"],
        "shots": est["shots"],
        "primitive calls": est["primitive_calls"],
    }
    if est.get("runtime_jobs"):
        shown["runtime jobs"] = est["runtime_jobs"]
    if evaluation.get("circuits"):
        shown["evaluation, at most"] = (f"{fmt(evaluation['circuits'])} circuits, {fmt(evaluation['shots'])} shots, "
                                        f"{fmt(evaluation['runtime_jobs'])} runtime jobs")  # fmt: skip
    if qpu is not None:
        shown["QPU time"] = _span(qpu)
    shown["time"] = _span(seconds) if seconds else "unknown for this model"
    shown["within budget"] = "yes" if est["within_budget"] else "NO"
    table = key_value_table("estimate", shown, justify="left")
    for warning in est.get("warnings") or []:
        table.add_row("warning", warning)
    if est.get("note"):
        table.add_row("note", est["note"])
    tables = [table]
    if est.get("circuits_on_backend"):
        tables.append(circuits_table(est["circuits_on_backend"]))
    return tables
