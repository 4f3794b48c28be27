"""qaa-client against a live API (`qaa api` subprocess) and a real Celery worker (`qaa worker` subprocess).

The stack is embedded (SQLite store, no-server broker) and shared by the module. The client finds the
server the way a user's does: `QAA_HOME/credentials`, written by the API on its first start. Every number
the client prints is checked against the API's own JSON.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from stack import Services, free_port, start_api, start_worker, wait_until
from typer.testing import CliRunner

from client import render
from client.cli import app

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "examples/tiny.yaml")
FAKE_MANILA = str(REPO / "examples/fake-manila.yaml")
UPLOAD = str(REPO / "examples/uploaded-dataset.yaml")

#: The metrics of the compared jobs: all three, so the BERTScore column is checked against the API too.
COMPARE_METRICS = "[bleu, rouge, bertscore]"

needs_trainer = pytest.mark.skipif(
    importlib.util.find_spec("workers.trainer") is None, reason="workers.trainer is not in this checkout yet"
)


@dataclass
class Live:
    services: Services
    url: str
    http: httpx.Client  # the API itself, with the same key, to check what the client says

    @property
    def env(self) -> dict[str, str | None]:
        """The client's environment: only QAA_HOME, so the URL and key come from the credentials file."""
        return {"QAA_HOME": str(self.services.home), "QAA_URL": None, "QAA_API_KEY": None, "COLUMNS": "250"}

    def cli(self, *args: str, env: dict[str, str | None] | None = None):
        return CliRunner().invoke(app, list(args), env={**self.env, **(env or {})})

    def json(self, *args: str):
        result = self.cli(*args, "--output", "json")
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("client-live")
    port = free_port()
    services = Services.embedded(root)
    proc, url = start_api(services, port=port)  # `qaa api --port`: the credentials file must name that port
    with proc:
        credentials = json.loads((services.home / "credentials").read_text())
        assert credentials["url"] == url
        headers = {"Authorization": f"Bearer {credentials['api_key']}"}
        with httpx.Client(base_url=url, headers=headers, timeout=180) as http:
            yield Live(services, url, http)
    services.close()


@pytest.fixture(scope="module")
def worker(live):
    with start_worker(live.services) as proc:
        yield proc


# --- exit codes and messages (API only) --------------------------------------------------------------------


def test_a_closed_port_is_exit_3_with_a_clear_message(live):
    closed = f"http://127.0.0.1:{free_port()}"
    result = live.cli("list", "--url", closed)
    assert result.exit_code == 3
    assert f"cannot reach the QAA server at {closed}" in result.stderr and "Connection refused" in result.stderr
    assert live.cli("status", "job_x", env={"QAA_URL": closed}).exit_code == 3


def test_a_refused_key_is_exit_4_naming_where_the_key_came_from(live):
    result = live.cli("list", "--api-key", "qaa_not_a_key")
    assert result.exit_code == 4
    assert f"the server at {live.url} refused the API key (--api-key)" in result.stderr
    assert "unknown, revoked or expired" in result.stderr
    from_env = live.cli("list", "--output", "json", env={"QAA_API_KEY": "qaa_not_a_key"})
    assert from_env.exit_code == 4 and "(QAA_API_KEY)" in from_env.stderr
    assert json.loads(from_env.stdout)["error"]["status"] == 401


def test_an_invalid_spec_shows_the_servers_field_level_messages(live):
    overrides = ["--set", "method.qubits=99", "--set", "training.learning_rte=0.1"]
    result = live.cli("submit", TINY, *overrides)
    assert result.exit_code == 2
    assert "method.qubits: qubits must be 'auto' or an integer between 1 and 16, got 99" in result.stderr
    assert "training.learning_rte: unknown key 'learning_rte'; did you mean 'learning_rate'?" in result.stderr

    spec = yaml.safe_load(Path(TINY).read_text())
    spec["method"]["qubits"] = 99
    spec["training"]["learning_rte"] = 0.1
    server = live.http.post("/v1/jobs", json=spec)
    as_json = live.cli("submit", TINY, *overrides, "--output", "json")
    assert as_json.exit_code == 2 and server.status_code == 422
    assert json.loads(as_json.stdout)["error"]["errors"] == server.json()["errors"]
    assert json.loads(as_json.stdout)["error"]["status"] == 422


def test_usage_errors_are_exit_2_and_submit_nothing(live, tmp_path):
    before = len(live.http.get("/v1/jobs", params={"limit": 200}).json()["jobs"])
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: builtin:tiny-llama\ntraining: {steps: 5\n")
    cases = [
        ("submit", TINY, "--set", "training"),  # a malformed --set
        ("submit", TINY, "--set", "training.steps.x=1"),
        ("submit", str(broken)),
        ("submit", str(tmp_path / "missing.yaml")),
        ("estimate", TINY, "--set", "=5"),
        ("submit", TINY, "--frobnicate"),
        ("status", "job_does_not_exist"),  # a 404 is the caller's mistake too
    ]
    for args in cases:
        result = live.cli(*args)
        assert result.exit_code == 2, (args, result.output)
    assert "is not valid YAML/JSON at line 3" in live.cli("submit", str(broken)).stderr
    assert "no job 'job_does_not_exist'" in live.cli("status", "job_does_not_exist").stderr
    assert len(live.http.get("/v1/jobs", params={"limit": 200}).json()["jobs"]) == before


def test_a_local_dataset_is_uploaded_and_replaced_by_its_id(live, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the file is found beside the spec
    result = live.cli("submit", UPLOAD)
    assert result.exit_code == 0, result.output
    job_id = result.stdout.strip()
    assert "uploaded" in result.stderr and "(4 examples)" in result.stderr
    job = live.http.get(f"/v1/jobs/{job_id}").json()
    datasets = {d["id"]: d for d in live.http.get("/v1/datasets").json()}
    assert job["spec"]["dataset"] in datasets
    assert datasets[job["spec"]["dataset"]]["rows"] == 4
    assert datasets[job["spec"]["dataset"]]["size"] == (REPO / "examples/cafes.jsonl").stat().st_size

    cancelled = live.json("cancel", job_id)
    assert cancelled["id"] == job_id and cancelled["status"] in ("cancelled", "cancelling")
    listed = live.json("list", "--state", "cancelled", "--state", "cancelling")
    assert job_id in [j["id"] for j in listed]
    assert job_id not in [j["id"] for j in live.json("list", "--state", "running")]
    text = live.cli("list")
    assert text.exit_code == 0 and job_id in text.stdout and "tiny-qaa-own-data" in text.stdout


def test_estimate_prints_the_servers_figures(live):
    ours = live.json("estimate", FAKE_MANILA, "--set", "training.steps=3")
    spec = yaml.safe_load(Path(FAKE_MANILA).read_text())
    spec["training"]["steps"] = 3
    assert ours == live.http.post("/v1/estimate", json=spec).json()
    # 2 adapters (q_proj of 2 blocks) x 8 tokens x (2P + 1) circuits, P = 2 * 1 * 3 + 3 = 9 angles.
    assert (ours["adapters"], ours["circuits_per_step"], ours["circuits"]) == (2, 2 * 8 * 19, 3 * 2 * 8 * 19)
    text = live.cli("estimate", FAKE_MANILA, "--set", "training.steps=3")
    assert text.exit_code == 0
    assert "fake:FakeManilaV2" in text.stdout and render.fmt(ours["circuits"]) in text.stdout
    qpu, (circuit,) = ours["qpu_seconds"], ours["circuits_on_backend"]  # what a device run costs, and its ESP
    assert re.search(rf"QPU time +│ {render.fmt(qpu['low'], 2)} - {render.fmt(qpu['high'], 2)} s", text.stdout)
    assert f"│ {render.fmt(circuit['esp'], 3)} │" in text.stdout and 0 < circuit["esp"] < 1
    exact = live.json("estimate", TINY)
    assert (exact["backend"], exact["circuits"], exact["shots"], exact["primitive_calls"]) == ("exact", 0, 0, 0)


@pytest.mark.slow
def test_backends_lists_what_the_server_offers(live):
    ours = live.json("backends")
    assert ours == live.http.get("/v1/backends").json()
    names = {b["name"] for b in ours}
    assert {"exact", "aer", "fake:FakeManilaV2"} <= names
    text = live.cli("backends")
    assert text.exit_code == 0 and "fake:FakeManilaV2" in text.stdout


# --- jobs on the real worker -------------------------------------------------------------------------------


def last_job(stdout: str) -> dict:
    """The final job of a followed job's JSON Lines (one `{"job", "points"}` object per poll)."""
    return json.loads(stdout.strip().splitlines()[-1])["job"]


def run_to_end(live: Live, *args: str) -> dict:
    """`submit ... --watch --output json`: the finished job."""
    result = live.cli("submit", *args, "--watch", "--interval", "0.3", "--output", "json")
    assert result.exit_code in (0, 1), result.output
    return last_job(result.stdout)


@needs_trainer
@pytest.mark.slow
def test_submit_and_watch_the_tiny_job_to_the_end(live, worker):
    env = {k: v for k, v in live.env.items() if v is not None}
    env.update({"PATH": "/usr/bin:/bin", "HOME": str(live.services.home.parent)})
    done = subprocess.run(
        [sys.executable, "-m", "client.cli", "submit", TINY, "--watch", "--interval", "0.3"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    job_id = done.stdout.splitlines()[0].strip()
    job = live.http.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["progress"] == {"step": 5, "steps": 5}
    assert f"watching job {job_id} (tiny-qaa-exact)" in done.stderr
    assert " 5/5 " in done.stderr and "succeeded" in done.stderr  # the live bar's last state
    last_loss = [p["loss"] for p in live.http.get(f"/v1/jobs/{job_id}/metrics").json()["points"] if "loss" in p]
    assert f"loss {render.fmt(last_loss[-1])}" in done.stderr
    assert "evaluation" in done.stdout
    for key, value in render.flatten(job["evaluation"]).items():
        assert key in done.stdout and render.fmt(value) in done.stdout

    status = live.cli("status", job_id)
    assert status.exit_code == 0 and "succeeded" in status.stdout and "5/5" in status.stdout
    lines = live.json("logs", job_id)["lines"]
    assert any("step 5/5: loss" in line for line in lines) and any(f"job {job_id}: succeeded" in line for line in lines)
    watched = live.cli("watch", job_id, "--output", "json")
    assert watched.exit_code == 0 and last_job(watched.stdout) == job  # a finished job: one line, at once
    assert len(watched.stdout.strip().splitlines()) == 1


@needs_trainer
@pytest.mark.slow
def test_metrics_and_download_match_the_api(live, worker, tmp_path):
    followed = live.cli("submit", TINY, "--set", "training.steps=3", "--watch", "--interval", "0.3", "-o", "json")
    lines = [json.loads(line) for line in followed.stdout.strip().splitlines()]  # JSON Lines, one per poll
    job = lines[-1]["job"]
    assert job["status"] == "succeeded" and all(line["job"]["id"] == job["id"] for line in lines)
    points = live.http.get(f"/v1/jobs/{job['id']}/metrics").json()["points"]
    streamed = [p["step"] for line in lines for p in line["points"]]
    assert streamed == [p["step"] for p in points]  # every step once, in order, as it came
    assert live.json("metrics", job["id"]) == points
    rows = list(csv.DictReader(io.StringIO(live.cli("metrics", job["id"], "--format", "csv").stdout)))
    assert [int(r["step"]) for r in rows] == [p["step"] for p in points]
    assert [float(r["loss"]) for r in rows if r["loss"]] == [p["loss"] for p in points if "loss" in p]

    artifacts = live.http.get(f"/v1/jobs/{job['id']}/artifacts").json()
    assert artifacts
    written = live.json("download", job["id"], "--dest", str(tmp_path / "out"))
    assert sorted(w["name"] for w in written) == sorted(a["name"] for a in artifacts)
    for artifact in artifacts:
        path = tmp_path / "out" / artifact["name"]
        assert path.stat().st_size == artifact["size"]
        assert path.read_bytes() == live.http.get(artifact["url"]).content
    assert not list((tmp_path / "out").rglob("*.part"))

    # a file changed on the server after the job recorded its digest: exit 5, and the bad copy is not kept
    stored = next(a for a in artifacts if a["name"].endswith("metrics.json"))
    on_disk = next(live.services.home.rglob(f"{job['id']}/{stored['name']}"))
    on_disk.write_bytes(on_disk.read_bytes() + b" ")
    result = live.cli("download", job["id"], "--dest", str(tmp_path / "again"))
    assert result.exit_code == 5 and "differs from the" in result.stderr
    assert not (tmp_path / "again" / stored["name"]).exists()


@needs_trainer
@pytest.mark.slow
def test_a_failed_job_is_exit_1_with_its_error(live, worker):
    result = live.cli("submit", TINY, "--set", "model=builtin:no-such-model", "--watch", "--interval", "0.3")
    assert result.exit_code == 1, result.output
    job_id = result.stdout.splitlines()[0].strip()
    job = live.http.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "failed" and "no-such-model" in job["error"]
    assert "failed" in result.stdout and "no-such-model" in result.stdout
    assert f"job {job_id} failed: {job['error']}" in result.stderr
    status = live.cli("status", job_id, "--output", "json")
    assert status.exit_code == 1 and json.loads(status.stdout) == job
    logs = live.cli("logs", job_id)  # the job's own log lines, stored however it ended
    assert logs.exit_code == 0 and f"job {job_id}: claimed by" in logs.stdout and "no-such-model" in logs.stdout
    key = json.loads((live.services.home / "credentials").read_text())["api_key"]
    assert key not in logs.stdout


@needs_trainer
@pytest.mark.slow
def test_compare_two_finished_jobs_row_by_row(live, worker, tmp_path):
    qaa = run_to_end(live, TINY, "--set", f"evaluation.metrics={COMPARE_METRICS}")
    lora = run_to_end(live, TINY, "--set", "method={kind: lora, r: 4}", "--set", "quantum=null")
    assert qaa["status"] == lora["status"] == "succeeded"

    plot = tmp_path / "curves.png"
    result = live.cli("compare", qaa["id"], lora["id"], "--plot", str(plot), "--output", "json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["id"] for r in rows] == [qaa["id"], lora["id"]]
    assert [r["method"] for r in rows] == ["qaa L=1 expval", "lora r=4"]
    for row, job in zip(rows, (qaa, lora), strict=True):
        evaluation = render.flatten(job["evaluation"])
        points = live.http.get(f"/v1/jobs/{job['id']}/metrics").json()["points"]
        assert row["final_loss"] == [p["loss"] for p in points if "loss" in p][-1]
        assert row["bleu"] == next(v for k, v in evaluation.items() if k.lower().endswith("bleu"))
        assert row["rouge_l"] == next(v for k, v in evaluation.items() if k.lower().replace("_", "").endswith("rougel"))
        assert 0 < row["trainable_share"] < 1 and row["seconds_per_step"] > 0
    if "bertscore" in COMPARE_METRICS:
        assert rows[0]["bertscore_f1"] == qaa["evaluation"]["bertscore_f1"]
    assert rows[1]["bertscore_f1"] is None  # not asked for
    assert plot.read_bytes()[:4] == b"\x89PNG"

    text = live.cli("compare", qaa["id"], lora["id"]).stdout
    lines = {r["id"]: next(line for line in text.splitlines() if r["id"] in line) for r in rows}
    for row in rows:
        for key in ("bleu", "rouge_l", "final_loss"):
            assert render.fmt(row[key]) in lines[row["id"]]
        assert render.fmt(row["peak_memory_mb"], 1) in lines[row["id"]]
        assert f"{row['trainable_share']:.4%}" in lines[row["id"]]


@needs_trainer
@pytest.mark.slow
def test_estimate_matches_what_the_fake_backend_job_counted(live, worker):
    est = live.json("estimate", FAKE_MANILA)
    job = run_to_end(live, FAKE_MANILA)
    assert job["status"] == "succeeded", job["error"]
    usage = job["usage"]
    assert (usage["circuits"], usage["shots"], usage["primitive_calls"]) == (
        est["circuits"],
        est["shots"],
        est["primitive_calls"],
    )
    assert est["circuits"] == 2 * 2 * 8 * 19 and est["shots"] == est["circuits"] * 1024
    assert usage["eval_circuits"] > 0  # generation ran circuits too, counted apart from training


@needs_trainer
@pytest.mark.slow
def test_cancelling_a_running_job_ends_the_watch_with_exit_1(live, worker):
    job_id = live.cli("submit", TINY, "--set", "training.steps=5000").stdout.strip()
    wait_until(lambda: live.json("status", job_id)["progress"]["step"] > 0, 120, interval=0.3, what="a step")
    assert live.json("cancel", job_id)["status"] in ("cancelling", "cancelled")
    result = live.cli("watch", job_id, "--interval", "0.3")
    assert result.exit_code == 1, result.output
    job = live.http.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "cancelled" and job["progress"]["step"] < 5000
    assert f"job {job_id} cancelled" in result.stderr


@needs_trainer
@pytest.mark.slow
def test_evaluate_a_trained_adapter_on_a_fake_device_then_fine_tune_from_it(live, worker):
    small = ("--set", "method.qubits=3", "--set", "method.compress=fixed", "--set", "evaluation.max_new_tokens=2")
    trained = run_to_end(live, TINY, *small)
    assert trained["status"] == "succeeded", trained["error"]
    result = live.cli(
        "evaluate", trained["id"], "--backend", "fake:FakeManilaV2", "--mitigation", "m3", "--shots", "512",
        "--samples", "1", "--watch", "--interval", "0.3", "--output", "json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    job = last_job(result.stdout)
    assert job["status"] == "succeeded", job["error"]
    assert (job["spec"]["kind"], job["spec"]["adapter_from"]) == ("evaluate", trained["id"])
    report = job["evaluation"]
    assert report["backend"] == "fake:FakeManilaV2" and report["mitigation"]["readout"] == "m3"
    assert 0 < report["gap"]["readout_mean_abs"] <= report["gap"]["readout_max_abs"]
    assert report["exact"]["eval_loss"] > 0 and job["usage"]["circuits"] > 0 and job["usage"]["runtime_job_ids"]
    # a second job starts training from the same adapter; another owner's or an unfinished job is refused
    tuned = run_to_end(live, TINY, *small, "--set", f"init_from={trained['id']}", "--set", "training.steps=1")
    assert tuned["status"] == "succeeded", tuned["error"]
    refused = live.cli("submit", TINY, "--set", "init_from=job_" + "0" * 24)
    assert refused.exit_code == 2 and "init_from: no job" in refused.stderr


def test_datasets_credentials_and_resubmit_have_their_commands(live, tmp_path):
    upload = tmp_path / "cafes.jsonl"
    upload.write_bytes((REPO / "examples" / "cafes.jsonl").read_bytes())
    dataset = live.json("datasets", "upload", str(upload))
    assert dataset["rows"] == 4 and dataset["id"].startswith("ds_")
    assert dataset["id"] in [d["id"] for d in live.json("datasets", "list")]
    assert dataset["id"] in live.cli("datasets", "list").stdout

    token = "ibm-token-not-for-any-log-1234567890"
    stored = CliRunner().invoke(app, ["credentials", "set-ibm"], input=token + "\n", env=live.env)
    assert stored.exit_code == 0, stored.output
    assert token not in stored.output  # stdin in, nothing echoed
    shown = live.json("credentials", "show")
    assert [c["kind"] for c in shown] == ["ibm"] and token not in json.dumps(shown)
    assert live.cli("credentials", "delete").exit_code == 0 and live.json("credentials", "show") == []
    assert live.cli("credentials", "delete").exit_code == 2  # nothing left to delete: the server's 404

    first = live.json("submit", TINY, "--set", "training.steps=2")
    again = live.json("resubmit", first["id"], "--set", "training.steps=3", "--set", f"dataset={dataset['id']}")
    assert again["id"] != first["id"]
    spec = live.http.get(f"/v1/jobs/{again['id']}").json()["spec"]
    assert spec["training"]["steps"] == 3 and spec["dataset"] == dataset["id"]
    assert spec["method"] == live.http.get(f"/v1/jobs/{first['id']}").json()["spec"]["method"]
    for job in (first, again):
        live.cli("cancel", job["id"])
    deadline = time.monotonic() + 120  # a running job takes its worker's next check to end: until then, 409
    while any(live.http.get(f"/v1/jobs/{j['id']}").json()["status"] == "cancelling" for j in (first, again)):
        assert time.monotonic() < deadline, "a cancelled job never ended"
        time.sleep(0.2)
    assert live.cli("datasets", "delete", dataset["id"]).exit_code == 0
    assert dataset["id"] not in [d["id"] for d in live.json("datasets", "list")]
