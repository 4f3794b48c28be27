"""The dashboard in headless Chromium against a live API process: the loss curve has every metric point, a
`#key=` link never swaps the stored key without a click, and the pages run under the API's Content-Security-Policy
with no violation."""

from __future__ import annotations

import math
import os
import re
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


# Recorded before any script of the page runs (playwright's init scripts are not subject to the page's CSP).
CSP_LISTENER = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", (e) => {
  window.__cspViolations.push(
    `${e.effectiveDirective}: ${e.blockedURI || "inline"} at ${e.sourceFile}:${e.lineNumber} ${e.sample}`);
}, true);
"""


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


@pytest.fixture
def browser():
    """Debian's Chromium through playwright; skipped where either is missing (but failed in CI)."""
    if not chromium_available():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{CHROMIUM} or the playwright package is missing")
        pytest.skip(f"{CHROMIUM} or the playwright package is missing")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def stored_key(page) -> str | None:
    return page.evaluate("() => localStorage.getItem('qaa_api_key')")


def store_key(page, url: str, key: str) -> None:
    """Put `key` in the dashboard's local storage from another page of its origin, before the dashboard loads."""
    page.goto(f"{url}/healthz")
    page.evaluate("k => localStorage.setItem('qaa_api_key', k)", key)


def csp_violations(page) -> list[str]:
    page.evaluate("() => new Promise((r) => setTimeout(r, 100))")  # violation events are queued as tasks
    return page.evaluate("() => window.__cspViolations")


def test_dashboard_draws_every_loss_point_and_follows_a_running_job(live_api, browser, tmp_path):
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

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{url}/#key={key}")  # as `qaa up` prints it: the key dialog opens filled in
    page.click("#key-dialog button[type=submit]")
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
    shots = os.environ.get("QAA_TEST_SCREENSHOTS")
    if shots:  # keep them for a person to look at
        for name in ("dashboard-jobs.png", "dashboard-job.png", "dashboard-finished.png"):
            shutil.copy(tmp_path / name, Path(shots) / name)


def test_a_link_key_is_saved_only_when_the_user_clicks_save(live_api, browser):
    url, store = live_api
    _, key = store.create_api_key("alice")
    job = store.create_job("alice", parse_spec(SPEC))
    page = browser.new_page()
    page.add_init_script(CSP_LISTENER)
    page.goto(f"{url}/#key={key}")
    page.wait_for_selector("#key-dialog[open]")
    assert page.input_value("#key-input") == key  # filled in, not yet saved
    assert key[:8] in page.inner_text("#key-note") and key[:9] not in page.inner_text("#key-dialog")
    assert stored_key(page) is None
    assert page.evaluate("location.hash") == "" and "key=" not in page.url
    page.click("#key-dialog button[type=submit]")
    page.wait_for_selector(f"tr.job-row[data-job='{job.id}']")
    assert stored_key(page) == key
    assert csp_violations(page) == []


def test_a_link_key_replaces_the_stored_key_only_when_the_user_says_so(live_api, browser):
    url, store = live_api
    _, mine = store.create_api_key("alice")
    _, theirs = store.create_api_key("bob")
    alice_job = store.create_job("alice", parse_spec({**SPEC, "name": "alice-job"}))
    bob_job = store.create_job("bob", parse_spec({**SPEC, "name": "bob-job"}))
    page = browser.new_page()
    page.add_init_script(CSP_LISTENER)
    store_key(page, url, mine)

    def offered(link: str, fresh: bool) -> None:
        page.goto(link)
        page.wait_for_selector("#link-key-dialog[open]")
        text = page.inner_text("#link-key-dialog")
        assert "a link wants to set an api key" in text.lower()
        assert theirs[:8] in text and theirs[:9] not in text and theirs not in page.content()
        assert stored_key(page) == mine  # nothing changes before the click
        assert page.evaluate("location.hash") == "" and "key=" not in page.url
        if fresh:  # nothing is fetched with either key while the question is open
            assert page.locator("tr.job-row").count() == 0

    offered(f"{url}/#key={theirs}", fresh=True)  # a fresh load
    page.get_by_role("button", name="Keep my key").click()
    page.wait_for_selector(f"tr.job-row[data-job='{alice_job.id}']")
    assert stored_key(page) == mine and not page.is_visible("#link-key-dialog")
    assert page.locator("tr.job-row").count() == 1

    offered(f"{url}/#key={theirs}", fresh=False)  # the same page, only the fragment changes (a hashchange)
    page.get_by_role("button", name="Use this key").click()
    page.wait_for_selector(f"tr.job-row[data-job='{bob_job.id}']")
    assert stored_key(page) == theirs and page.locator("tr.job-row").count() == 1

    store_key(page, url, mine)
    page.goto(f"{url}/#key={mine}")  # the key it already holds: nothing to ask
    page.wait_for_selector(f"tr.job-row[data-job='{alice_job.id}']")
    assert not page.is_visible("#link-key-dialog") and not page.is_visible("#key-dialog")
    assert stored_key(page) == mine and page.evaluate("location.hash") == ""
    assert csp_violations(page) == []


def test_jobs_list_and_job_page_render_without_csp_violations(live_api, browser):
    url, store = live_api
    _, key = store.create_api_key("alice")
    job = store.create_job("alice", parse_spec(SPEC))
    store.claim_job(job.id, "w1")
    store.record_metrics(job.id, points(1, 60))
    store.heartbeat(job.id, "w1", step=60, usage={"circuits": 1200, "shots": 1_228_800})
    lora = store.create_job(
        "alice",
        parse_spec(
            {**SPEC, "name": "tiny-lora", "method": {"kind": "lora"}, "quantum": None, "training": {"steps": 40}}
        ),
    )
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.add_init_script(CSP_LISTENER)
    store_key(page, url, key)
    errors: list[str] = []

    def console(message) -> None:  # Chromium asks /healthz's page (JSON, no icon) for /favicon.ico: not ours
        if message.type == "error" and not message.location.get("url", "").endswith("/favicon.ico"):
            errors.append(f"{message.text} at {message.location}")

    page.on("console", console)
    page.on("pageerror", lambda e: errors.append(str(e)))

    page.goto(f"{url}/")
    page.wait_for_selector(f"tr.job-row[data-job='{job.id}'] svg.sparkline polyline")
    row = page.locator(f"tr.job-row[data-job='{job.id}']")
    assert row.locator("td.method").inner_text() == "qaa" and row.locator("td.backend").inner_text() == "aer"
    assert row.locator("td.model").inner_text().split() == ["builtin:tiny-llama", "builtin:restaurants"]
    other = page.locator(f"tr.job-row[data-job='{lora.id}']")
    assert other.locator("td.method").inner_text() == "lora" and other.locator("td.backend").inner_text() == "–"
    assert page.eval_on_selector(f"tr.job-row[data-job='{job.id}'] .progress .bar", "e => e.style.width") == "50%"
    assert csp_violations(page) == []

    page.goto(f"{url}/#/jobs/{job.id}")
    page.wait_for_selector("#loss-chart .legend i")  # two series: the legend's swatches are drawn too
    facts = page.eval_on_selector_all(
        ".facts .fact",
        "els => Object.fromEntries(els.map((e) => [e.querySelector('label').textContent, e.lastChild.textContent]))",
    )
    assert {k: facts[k] for k in ("Method", "Backend", "Model", "Dataset")} == {
        "Method": "qaa",
        "Backend": "aer",
        "Model": "builtin:tiny-llama",
        "Dataset": "builtin:restaurants",
    }
    assert "1,200" in page.inner_text("#usage")
    assert csp_violations(page) == []
    assert page.eval_on_selector("#loss-chart .legend i", "e => e.style.background") != ""  # applied, not blocked
    assert errors == []


def test_an_evaluate_job_shows_its_hardware_gap_beside_the_exact_engine(live_api, browser):
    url, store = live_api
    _, key = store.create_api_key("alice")
    source = "job_" + "c" * 24
    spec = {**SPEC, "kind": "evaluate", "adapter_from": source, "quantum": {"backend": "fake:FakeManilaV2"}}
    job = store.create_job("alice", parse_spec(spec))
    store.claim_job(job.id, "w1")
    report = {
        "adapter_from": source, "backend": "fake:FakeManilaV2", "shots": 4096, "mitigation": {"readout": "m3"},
        "examples": 8, "exact": {"eval_loss": 1.25, "bleu": 30.5}, "on_backend": {"eval_loss": 1.5, "bleu": 27.25},
        "gap": {"readout_mean_abs": 0.0625, "readout_max_abs": 0.5, "eval_loss": 0.25, "bleu": -3.25},
    }  # fmt: skip
    store.finish_job(job.id, "w1", "succeeded", step=0, evaluation=report)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.add_init_script(CSP_LISTENER)
    store_key(page, url, key)
    page.goto(f"{url}/#/jobs/{job.id}")
    page.wait_for_selector("#hardware-gap table")
    card = page.text_content("#hardware-gap")  # the heading is upper-cased by CSS, not in the text
    assert "Hardware gap: fake:FakeManilaV2" in card and source in card and "mean 0.0625" in card and "max 0.5" in card
    cells = page.eval_on_selector_all(
        "#hardware-gap tbody tr",
        "rows => Object.fromEntries(rows.map((r) => [r.dataset.metric, [...r.querySelectorAll('td')]"
        ".map((c) => c.textContent)]))",
    )
    assert cells == {"eval_loss": ["1.25", "1.5", "+0.25"], "bleu": ["30.5", "27.25", "-3.25"]}
    assert csp_violations(page) == []


def test_the_dashboard_is_served_with_a_content_security_policy(live_api):
    url, _ = live_api
    for path in ("/", "/dashboard/app.js", "/dashboard/chart.js", "/dashboard/style.css"):
        res = httpx.get(f"{url}{path}")
        assert res.status_code == 200, path
        csp = res.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp, path
        assert res.headers["x-content-type-options"] == "nosniff", path
    assert "javascript" in httpx.get(f"{url}/dashboard/app.js").headers["content-type"]  # nosniff: a module needs it
    html = httpx.get(f"{url}/").text
    assert re.findall(r"<script\b(?![^>]*\bsrc=)", html) == []  # no inline script
    assert re.findall(r"\son[a-z]+\s*=", html) == [] and "style=" not in html  # no inline handler nor style


def test_picked_jobs_are_compared_with_their_curves_overlaid_and_their_scores_side_by_side(live_api, browser):
    url, store = live_api
    _, key = store.create_api_key("alice")
    finished = {}
    for name, method, steps, bleu in (("e2e-lora", {"kind": "lora"}, 40, 31.4), ("e2e-qaa", {"kind": "qaa"}, 30, 30.9)):
        quantum = {"backend": "exact"} if method["kind"] == "qaa" else None
        spec = {**SPEC, "name": name, "method": method, "quantum": quantum, "training": {"steps": steps}}
        job = store.create_job("alice", parse_spec(spec))
        store.claim_job(job.id, "w0")
        store.record_metrics(job.id, points(1, steps, steps=steps))
        evaluation = {"bleu": bleu, "rougeL": 0.52, "bertscore_f1": 0.871, "eval_loss": 1.42,
                      "trainable_share": 0.0034 if method["kind"] == "lora" else 0.0017}  # fmt: skip
        store.finish_job(job.id, "w0", "succeeded", step=steps, evaluation=evaluation)
        finished[name] = job
    other = store.create_job("alice", parse_spec({**SPEC, "name": "not-picked"}))

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.add_init_script(CSP_LISTENER)
    store_key(page, url, key)
    page.goto(url)
    page.wait_for_selector(f"tr.job-row[data-job='{other.id}']")
    assert page.is_disabled("#compare-button")  # nothing picked yet
    for job in finished.values():
        page.check(f"input.pick[data-job='{job.id}']")
    assert page.evaluate("location.hash") in ("", "#/")  # picking a job does not open it
    assert page.inner_text("#compare-button") == "Compare 2 jobs"
    page.click("#compare-button")
    page.wait_for_selector("#compare-chart polyline[data-series=loss-1]")
    count = "s => document.querySelector(`#compare-chart polyline[data-series=${s}]`).dataset.count"
    assert [page.evaluate(count, f"loss-{i}") for i in range(2)] == ["40", "30"]  # every point of each job
    assert page.locator("#compare-chart circle").count() == 2 + 1  # eval at steps 20, 40 and 20
    rows = page.locator("#compare-scores tbody tr")
    assert rows.count() == 2
    texts = {job.id: page.inner_text(f"#compare-scores tr[data-job='{job.id}']") for job in finished.values()}
    assert "31.4" in texts[finished["e2e-lora"].id] and "30.9" in texts[finished["e2e-qaa"].id]
    assert "0.3400%" in texts[finished["e2e-lora"].id] and "0.1700%" in texts[finished["e2e-qaa"].id]
    assert other.id not in page.inner_text("#compare-scores")
    assert csp_violations(page) == []
