"""The dashboard in headless Chromium against a live API process: the loss curve has every metric point."""

from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service.settings import Settings
from service.spec import parse_spec
from service.store import Store

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SPEC = {
    "name": "tiny-qaa-aer",
    "model": "builtin:tiny-llama",
    "dataset": "builtin:restaurants",
    "method": {"kind": "qaa", "layers": 2},
    "quantum": {"backend": "aer", "shots": 1024},
    "training": {"steps": 120, "eval_every": 20, "learning_rate": 0.002, "warmup_steps": 10},
}


def chromium_available() -> bool:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return Path(CHROMIUM).exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def points(start: int, stop: int, steps: int = 120) -> list[dict]:
    """A plausible run: warmup then cosine decay of the rate, a noisy falling loss, eval every 20 steps."""
    out = []
    for step in range(start, stop + 1):
        lr = 0.002 * min(1.0, step / 10) * 0.5 * (1 + math.cos(math.pi * step / steps))
        point = {"step": step, "loss": 1.2 + 2.4 * math.exp(-step / 25) + 0.08 * math.sin(step * 1.7), "lr": lr}
        if step % 20 == 0:
            point["eval_loss"] = 1.35 + 2.2 * math.exp(-step / 28)
        out.append(point)
    return out


@pytest.fixture
def live_api(tmp_path):
    """A uvicorn process serving `service.app:app` on a store this test fills directly."""
    home = tmp_path / "home"
    settings = Settings(home=home)
    store = Store.from_settings(settings, migrate=True)
    port = free_port()
    env = {**os.environ, "QAA_HOME": str(home), "QAA_PORT": str(port)}
    for name in ("QAA_DATABASE_URL", "QAA_BROKER_URL"):
        env.pop(name, None)
    log = (tmp_path / "uvicorn.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "service.app:app", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, (tmp_path / "uvicorn.log").read_text()
            time.sleep(0.1)
        yield url, store
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        store.close()
        log.close()


def test_dashboard_draws_every_loss_point_and_follows_a_running_job(live_api, tmp_path):
    if not chromium_available():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{CHROMIUM} or the playwright package is missing")
        pytest.skip(f"{CHROMIUM} or the playwright package is missing")
    from playwright.sync_api import sync_playwright

    url, store = live_api
    _, key = store.create_api_key("alice")
    done = store.create_job(
        "alice",
        parse_spec(
            {**SPEC, "name": "tiny-lora", "method": {"kind": "lora"}, "quantum": None, "training": {"steps": 40}}
        ),
    )
    store.claim_job(done.id, "w0")
    store.record_metrics(done.id, points(1, 40, steps=40))
    store.finish_job(
        done.id, "w0", "succeeded", step=40, evaluation={"bleu": 31.4, "rouge_l": 0.52, "bertscore_f1": 0.87}
    )
    job = store.create_job("alice", parse_spec(SPEC))
    store.claim_job(job.id, "w1")
    store.record_metrics(job.id, points(1, 60))
    usage = {
        "primitive_calls": 240,
        "circuits": 1_953_120,
        "shots": 2_000_000_000,
        "transpile_hits": 3,
        "transpile_misses": 1,
        "qpu_seconds": 0.0,
    }
    store.heartbeat(job.id, "w1", step=60, usage=usage)
    artifact = tmp_path / "checkpoint.safetensors"
    artifact.write_bytes(b"\0" * 4096)
    store.add_artifact(job.id, "checkpoints/step-50/adapter_model.safetensors", str(artifact), 4096, "0" * 64)

    def api_points() -> list[dict]:
        headers = {"Authorization": f"Bearer {key}"}
        return httpx.get(f"{url}/v1/jobs/{job.id}/metrics", headers=headers).json()["points"]

    def drawn(page, series: str) -> int:
        return page.eval_on_selector(
            f"#loss-chart polyline[data-series={series}]", "e => e.getAttribute('points').trim().split(/\\s+/).length"
        )

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{url}/#key={key}")
            page.wait_for_selector(f"tr.job-row[data-job='{job.id}'] svg.sparkline polyline")
            page.screenshot(path=str(tmp_path / "dashboard-jobs.png"), full_page=True)

            page.goto(f"{url}/#/jobs/{job.id}")
            page.wait_for_selector("#loss-chart polyline[data-series=loss]")
            expected = api_points()
            assert drawn(page, "loss") == len([p for p in expected if "loss" in p]) == 60
            assert drawn(page, "eval_loss") == len([p for p in expected if "eval_loss" in p]) == 3
            assert page.locator("#loss-chart circle").count() == 3
            assert "1,953,120" in page.inner_text("#usage")

            store.record_metrics(job.id, points(61, 80))  # the job moves on; the page polls
            store.heartbeat(job.id, "w1", step=80)
            page.wait_for_function(
                "n => document.querySelector('#loss-chart polyline[data-series=loss]').dataset.count == n",
                arg=str(80),
                timeout=15_000,
            )
            assert drawn(page, "loss") == len(api_points()) == 80
            page.screenshot(path=str(tmp_path / "dashboard-job.png"), full_page=True)

            page.goto(f"{url}/#/jobs/{done.id}")
            page.wait_for_selector("#evaluation table")
            assert "31.4" in page.inner_text("#evaluation") and drawn(page, "loss") == 40
            page.screenshot(path=str(tmp_path / "dashboard-finished.png"), full_page=True)
        finally:
            browser.close()
    shots = os.environ.get("QAA_TEST_SCREENSHOTS")
    if shots:  # keep them for a person to look at
        for name in ("dashboard-jobs.png", "dashboard-job.png", "dashboard-finished.png"):
            shutil.copy(tmp_path / name, Path(shots) / name)
