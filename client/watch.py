"""`watch`: follow a job to its end, polling `/v1/jobs/{id}` and `/v1/jobs/{id}/metrics?after_step=`.

Only new metric points are fetched on each poll, so watching a long job costs the same per poll at step 10
as at step 10,000. The live bar shows step/steps, the latest loss, the ETA and the quantum counters; when
the job ends its evaluation table follows.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from client.api import FINAL_STATES, METRICS_PAGE, ApiClient
from client.render import fmt

JSONDict = dict[str, Any]


class Counters:
    """The latest loss and the quantum counters, from metric points as they arrive and the job's `usage`.

    Circuits and shots in metric points are per step, so they are summed; the job's `usage` (the worker's
    own totals) wins once it is there.
    """

    def __init__(self) -> None:
        self.loss: float | None = None
        self.circuits = 0
        self.shots = 0
        self.points: list[JSONDict] = []

    def add(self, points: list[JSONDict]) -> None:
        for point in points:
            self.points.append(point)
            if isinstance(point.get("loss"), int | float):
                self.loss = point["loss"]
            self.circuits += _number(point.get("circuits"))
            self.shots += _number(point.get("shots"))

    def fields(self, job: Mapping[str, Any]) -> dict[str, str]:
        """`loss` and `counters` for the bar; no counters for jobs that run no circuits."""
        usage = job.get("usage") or {}
        circuits = usage.get("circuits", self.circuits)
        shots = usage.get("shots", self.shots)
        counters = f"{compact(circuits)} circuits {compact(shots)} shots " if circuits or shots else ""
        return {"loss": fmt(self.loss), "counters": counters}


def compact(n: float) -> str:
    """`608`, `622.6k`, `3.3M`: counters that fit a progress line."""
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= size:
            return f"{n / size:.1f}{suffix}"
    return f"{n:g}"


def _number(value: Any) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def follow(
    api: ApiClient,
    job_id: str,
    *,
    interval: float,
    on_poll: Callable[[JSONDict, Counters], None] = lambda job, counters: None,
) -> tuple[JSONDict, Counters]:
    """Poll until the job is in a final state; returns the final job and what was seen."""
    counters = Counters()
    after = -1
    while True:
        job = api.get_job(job_id)  # read the state first: points written before it ended are all fetched below
        while True:
            page = api.metrics_page(job_id, after)
            counters.add(page["points"])
            after = page["next_after_step"]
            if len(page["points"]) < METRICS_PAGE:
                break
        on_poll(job, counters)
        if job["status"] in FINAL_STATES:
            return job, counters
        time.sleep(interval)


def watch_live(api: ApiClient, job_id: str, console: Console, *, interval: float) -> tuple[JSONDict, Counters]:
    """`follow` with a rich progress bar on `console`."""
    progress = Progress(
        BarColumn(bar_width=12),
        TextColumn("{task.completed:.0f}/{task.total:.0f}"),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("ETA"),
        TimeRemainingColumn(compact=True),
        TextColumn("{task.fields[counters]}{task.fields[status]}"),
        console=console,
        transient=False,
    )
    task = None

    def update(job: JSONDict, counters: Counters) -> None:
        nonlocal task
        steps = (job.get("progress") or {}).get("steps") or 1
        step = (job.get("progress") or {}).get("step") or 0
        status = "" if job["status"] == "running" else f"[dim]{job['status']}"
        fields = {**counters.fields(job), "status": status}
        if task is None:
            name = f" ({job['name']})" if job.get("name") else ""
            progress.console.print(f"watching job {job['id']}{name}", markup=False, highlight=False)
            task = progress.add_task(job["id"], total=steps, completed=step, **fields)
        else:
            progress.update(task, total=steps, completed=step, **fields)

    with progress:
        return follow(api, job_id, interval=interval, on_poll=update)
