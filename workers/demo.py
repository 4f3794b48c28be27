"""`qaa demo`: what a newcomer sees first, end to end through the real service.

It uses a running server when the client's configuration reaches one (`qaa up` in another terminal), and
otherwise starts the stack itself for the demo's length. It then acts as a user would, over HTTP with the
client library: submits the main job (SmolLM2-135M with QAA on the exact engine), follows it with the
client's progress bar, prints its evaluation and saves its loss curve; then a short job on a fake IBM device
(`fake:FakeManilaV2`: its coupling map and noise, run locally) whose circuit, shot and transpile-cache
counters show the hardware path. The exit code is 0 only if both jobs succeed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from client import compare, render
from client.api import ApiClient, ClientError
from client.config import Connection, resolve
from client.spec_file import SpecFileError, load_spec
from client.watch import watch_live
from service.settings import get_settings
from workers.stack import Stack, StackError

POLL_S = 1.0


def run_demo(spec_path: Path, hardware_path: Path, plot_path: Path) -> int:
    out = render.console()
    try:
        specs = [load_spec(spec_path), load_spec(hardware_path)]
    except SpecFileError as exc:
        out.print(f"qaa demo: {exc}", markup=False)
        return 2
    stack = None
    conn = _running_server()
    try:
        if conn is None:
            out.print("No QAA server answers here: starting one (API + 1 worker) for the demo ...")
            stack = Stack(get_settings())
            stack.start()
            conn = resolve()
        out.print(f"Server: {conn.url}   dashboard: {conn.url}/")
        with ApiClient(conn.url, conn.api_key) as api:
            main = _run(api, specs[0], out)
            if main["status"] == "succeeded":
                compare.plot({main.get("name") or main["id"]: api.metrics(main["id"])}, plot_path)
                out.print(f"loss curve saved to {plot_path}")
            hardware = _run(api, specs[1], out)
        out.print(f"\nSee both jobs on the dashboard: {conn.url}/#/jobs/{main['id']}")
        failed = [job for job in (main, hardware) if job["status"] != "succeeded"]
        for job in failed:
            out.print(f"job {job['id']} {job['status']}: {job.get('error') or ''}", markup=False)
        return 1 if failed else 0
    except (ClientError, StackError) as exc:
        out.print(f"qaa demo: {exc}", markup=False)
        return 1
    except KeyboardInterrupt:
        out.print("qaa demo: interrupted")
        return 130
    finally:
        if stack is not None:
            out.print("stopping the demo's server ...")
            stack.stop()


def _running_server() -> Connection | None:
    """The configured server if it answers `/healthz`, else None."""
    conn = resolve()
    try:
        return conn if httpx.get(conn.url + "/healthz", timeout=2).status_code == 200 else None
    except httpx.HTTPError:
        return None


def _run(api: ApiClient, spec: dict[str, Any], out) -> dict[str, Any]:
    """Submit, follow with the progress bar, print the job's tables (usage and evaluation among them)."""
    job = api.submit_job(spec)
    out.print(f"\nsubmitted {job['id']} ({job.get('name') or render.method_label(spec)}) to queue {job['queue']}")
    job, _ = watch_live(api, job["id"], render.console(stderr=True), interval=POLL_S)
    for table in render.job_tables(job):
        out.print(table)
    return job
