"""`qaa up` as a user runs it: one command, a tiny job through it, Ctrl-C, nothing left behind, nothing lost.

The stack is the embedded default (SQLite store, no-server broker under a temporary `QAA_HOME`); the test
reaches it the way `qaa-client` does, through the credentials file the API writes.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys

import httpx
import psutil
import pytest
from stack import REPO, Services, free_port, wait_until

from service.auth import LOCAL_OWNER

UP_TIMEOUT = 180


def tiny_spec(steps: int) -> dict:
    return {
        "name": "tiny-up",
        "model": "builtin:tiny-llama",
        "dataset": "builtin:restaurants",
        "method": {"kind": "qaa", "target_modules": ["q_proj", "v_proj"]},
        "training": {"steps": steps, "batch_size": 2, "max_length": 32, "eval_every": 0, "checkpoint_every": 5},
        "evaluation": {"metrics": ["bleu"], "samples": 2, "max_new_tokens": 4},
    }


class Up:
    """`qaa up` in the foreground of its own process group, as in a terminal."""

    def __init__(self, services: Services, port: int, log_name: str):
        self.log_path = services.home.parent / log_name
        services.home.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        args = [sys.executable, "-m", "workers.cli", "up", f"--port={port}", "--grace=60"]
        self.popen = subprocess.Popen(args, cwd=REPO, env=services.env(), stdout=self._log, stderr=subprocess.STDOUT)
        self.descendants: list[psutil.Process] = []

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_up(self) -> dict:
        def up() -> bool:
            if self.popen.poll() is not None:
                raise AssertionError(f"qaa up exited ({self.popen.returncode}):\n{self.output()}")
            return "QAA is up" in self.output()

        wait_until(up, UP_TIMEOUT, interval=0.2, what="qaa up")
        self.descendants = psutil.Process(self.popen.pid).children(recursive=True)
        return json.loads((self.log_path.parent / "qaa-home" / "credentials").read_text())

    def interrupt(self) -> int:
        """Ctrl-C, then the exit code once `qaa up` has stopped everything."""
        self.popen.send_signal(signal.SIGINT)
        try:
            return self.popen.wait(timeout=90)
        finally:
            self._log.close()

    def kill(self) -> None:
        for proc in [*self.descendants, psutil.Process(self.popen.pid)] if self.popen.poll() is None else []:
            proc.kill()
        self._log.close()


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    return [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.slow
def test_qaa_up_serves_runs_a_job_and_stops_cleanly_resuming_the_interrupted_job(tmp_path):
    services = Services.embedded(tmp_path)
    port = free_port()
    steps = 150
    first = Up(services, port, "up-1.log")
    try:
        creds = first.wait_up()
        assert creds["url"] == f"http://127.0.0.1:{port}"
        assert "dashboard http://127.0.0.1:" in first.output() and "credentials" in first.output()
        assert len(first.descendants) >= 2  # the API and a worker
        http = httpx.Client(base_url=creds["url"], headers={"Authorization": f"Bearer {creds['api_key']}"})
        assert http.get("/readyz").status_code == 200

        quick = http.post("/v1/jobs", json=tiny_spec(steps=3)).json()
        wait_until(lambda: http.get(f"/v1/jobs/{quick['id']}").json()["status"] == "succeeded", 120, what="tiny job")

        job = http.post("/v1/jobs", json=tiny_spec(steps=steps)).json()
        wait_until(lambda: http.get(f"/v1/jobs/{job['id']}").json()["progress"]["step"] >= 12, 120, what="12 steps")
        assert first.interrupt() == 0, first.output()
    finally:
        first.kill()
    assert alive(first.descendants) == [], "processes left behind after Ctrl-C"
    assert "stopped" in first.output()

    released = services.store().load_job(job["id"])
    assert released.status == "queued" and released.attempts == 0  # handed back, the clean stop not counted
    interrupted_at = max(p["step"] for p in services.store().metrics_after(job["id"]))
    assert 12 <= interrupted_at < steps

    second = Up(services, port, "up-2.log")
    try:
        creds = second.wait_up()
        http = httpx.Client(base_url=creds["url"], headers={"Authorization": f"Bearer {creds['api_key']}"})
        done = wait_until(
            lambda: (body := http.get(f"/v1/jobs/{job['id']}").json())["status"] in ("succeeded", "failed") and body,
            180,
            what="the resumed job",
        )
        assert second.interrupt() == 0
    finally:
        second.kill()
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 1 and done["progress"] == {"step": steps, "steps": steps}
    loss_steps = [p["step"] for p in services.store().metrics_after(job["id"]) if "loss" in p]
    assert loss_steps == list(range(1, steps + 1))  # every step once, none lost
    worker_log = (services.home / "logs" / "worker-1.log").read_text()
    resumed = [int(n) for n in re.findall(r"resuming from the checkpoint at step (\d+)", worker_log)]
    assert resumed == [interrupted_at]  # from the checkpoint the stop wrote, not from scratch
    services.close()


@pytest.mark.slow
def test_qaa_demo_starts_a_stack_runs_both_jobs_and_leaves_nothing_behind(tmp_path):
    """`qaa demo` (what `make demo` runs) with small jobs in place of the five-minute SmolLM2 one."""
    services = Services.embedded(tmp_path)
    services.home.mkdir(parents=True)
    env = {**services.env(), "QAA_PORT": str(free_port())}
    plot = tmp_path / "loss.png"
    args = ["--spec=examples/tiny.yaml", "--hardware-spec=examples/fake-manila.yaml", f"--plot={plot}"]
    demo = subprocess.Popen(
        [sys.executable, "-m", "workers.cli", "demo", *args], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )
    children: list[psutil.Process] = []
    wait_until(lambda: children.extend(psutil.Process(demo.pid).children(recursive=True)) or children, 60)
    out, _ = demo.communicate(timeout=400)
    assert demo.returncode == 0, out
    assert "starting one" in out and "evaluation" in out and "bleu" in out
    usage = out[out.index("quantum usage") :]
    assert re.search(r"circuits\s+│\s+[1-9]", usage) and re.search(r"shots\s+│\s+[1-9]", usage), usage
    assert plot.stat().st_size > 10_000  # a PNG with a curve on it
    assert alive(children) == []
    jobs = services.store().list_jobs(LOCAL_OWNER).jobs
    assert sorted(j.status for j in jobs) == ["succeeded", "succeeded"]
    services.close()


@pytest.mark.slow
def test_qaa_up_restarts_a_killed_worker_keeps_serving_and_leaves_no_orphans_when_killed(tmp_path):
    """SIGKILL of the one worker at step 25 of a 120-step job: the API answers throughout, the worker comes back,
    the same job succeeds with every step recorded once. Then a SIGKILL of `qaa up` itself: no child lives on."""
    services = Services.embedded(tmp_path)
    port = free_port()
    up = Up(services, port, "up-supervised.log")
    credentials = up.wait_up()
    base = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {credentials['api_key']}"}, timeout=10)
    spec = tiny_spec(120)
    spec["training"] |= {"checkpoint_every": 10, "max_length": 48}
    job_id = client.post("/v1/jobs", json=spec).json()["id"]
    wait_until(lambda: client.get(f"/v1/jobs/{job_id}").json()["progress"]["step"] >= 25, 120, interval=0.05)
    (worker,) = [p for p in up.descendants if "worker" in p.cmdline()]
    worker.kill()

    def done() -> bool:
        assert httpx.get(base + "/healthz", timeout=5).status_code == 200  # the API never went away
        return client.get(f"/v1/jobs/{job_id}").json()["status"] in ("succeeded", "failed")

    wait_until(done, 180, interval=0.5, what="the job to end after its worker was killed")
    job = client.get(f"/v1/jobs/{job_id}").json()
    steps = [p["step"] for p in client.get(f"/v1/jobs/{job_id}/metrics").json()["points"]]
    assert job["status"] == "succeeded" and job["attempts"] >= 2, job
    assert steps == list(range(1, 121))
    assert "worker-1 exited with code -9; restarting it" in up.output() and "worker-1 restarted" in up.output()

    family = psutil.Process(up.popen.pid).children(recursive=True)
    assert family
    up.popen.send_signal(signal.SIGKILL)
    up.popen.wait(timeout=10)
    wait_until(lambda: not alive(family), 15, what="the children to die with qaa up")
    up.kill()


def test_the_supervisor_gives_up_on_a_child_that_keeps_dying_at_start(tmp_path, monkeypatch):
    import os
    import time

    from service.settings import Settings
    from workers import stack as stack_module

    monkeypatch.setattr(stack_module, "MAX_BACKOFF_S", 0.05)  # restart at once: the test is about the count
    stack = stack_module.Stack(Settings(home=tmp_path / "home"), workers=1)
    stack.env = dict(os.environ)
    stack.api.args = [sys.executable, "-c", "import time; time.sleep(120)"]
    stack.workers[0].args = [sys.executable, "-c", "import sys; sys.exit(3)"]
    for child in stack.children:
        child.start(stack.env)
    said: list[str] = []
    deadline = time.monotonic() + 60
    with pytest.raises(stack_module.StackError, match=r"worker-1 died 5 times within 15 s of starting \(last exit"):
        while time.monotonic() < deadline:
            stack.supervise(said.append)
            time.sleep(0.05)
    assert sum("restarting it in" in line for line in said) == 4 and not stack.api.alive  # everything stopped
