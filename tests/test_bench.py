"""`qaa bench --quick` end to end: every row a real job of a real embedded stack, and the published files.

It proves that the bench runs the issue's rows through the service (the job ids it records are succeeded jobs
in the stack's store, run with the spec the row names), and that methods.json carries the issue's keys with
numbers in range: shares in (0, 1] with full fine-tuning at 1 and every QAA row below LoRA, finite losses,
scores in their ranges, and the hardware rows one adapter: trained on exact, evaluated on the device with each
mitigation, tuned there from the same weights and evaluated again.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from stack import Proc, Services, free_port

BENCH_TIMEOUT = 900
ISSUE_KEYS = ["method", "variant", "group", "dataset", "learning_rate", "trainable_params", "trainable_share",
              "bleu", "rouge1", "rouge2", "rougeL", "bertscore_f1", "final_train_loss", "eval_loss", "readout_error",
              "seconds_per_step", "peak_memory_mb", "seeds"]  # fmt: skip
SCORES = ["bleu", "rouge1", "rouge2", "rougeL", "bertscore_f1", "final_train_loss", "eval_loss"]
SIZE = "n=4 L=1 expval, 1 module"
TRAINED = f"{SIZE}, trained on exact"
TUNED = f"{SIZE}, +2 noise-aware steps on FakeManilaV2"
EVALUATED = [f"{SIZE}, same weights on FakeManilaV2, {m}" for m in
             ("no mitigation", "M3", "TREX", "twirling + TREX", "ZNE", "ZNE + TREX")]  # fmt: skip
EVALUATED.append(f"{SIZE}, tuned weights on FakeManilaV2, no mitigation")
HEADLINE = {
    ("full", "all weights"): 5e-5,
    ("lora", "r=8"): 2e-3,
    ("prefix", "20 virtual tokens"): 1e-2,
    ("sora", "r=8, gate lambda=0.001"): 2e-3,
    ("qaa", "exact L=2 expval (default)"): 2e-3,
}  # the examples' rates: --quick's grid is those rates alone
GRID = {(method, f"{variant}, lr={lr:.2g} (grid)") for (method, variant), lr in HEADLINE.items()}
ROWS = {
    *HEADLINE,
    *GRID,
    ("qaa", "exact L=1 expval"),
    ("qaa", "exact L=4 expval"),
    ("qaa", "exact L=2 expval+zz"),
    ("qaa", "exact L=2 expval, every other layer"),
    ("qaa", TRAINED),
    ("qaa", TUNED),
    *(("qaa", v) for v in EVALUATED),
}


@pytest.mark.slow
@pytest.mark.timeout(BENCH_TIMEOUT + 600)  # the bench (23 jobs, ~10 min on a slow 2-core VM), then its --resume
def test_quick_bench_runs_every_row_as_a_job_and_writes_the_table(tmp_path):
    services = Services.embedded(tmp_path, QAA_PORT=str(free_port()))
    services.home.mkdir(parents=True)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "workers.cli", "bench", "--quick", f"--out={out}"]
    bench = Proc(args, services.env(), tmp_path / "bench.log")
    try:
        code = bench.popen.wait(timeout=BENCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        bench.stop(timeout=90)  # SIGTERM: the bench cancels its job and stops its stack
        raise
    bench.stop()
    assert code == 0, bench.log()[-4000:]

    rows = json.loads((out / "methods.json").read_text())
    record = json.loads((out / "methods_budget.json").read_text())
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "methods.md").read_text()

    assert isinstance(rows, list) and {(r["method"], r["variant"]) for r in rows} == ROWS and len(rows) == len(ROWS)
    expected_keys = {*ISSUE_KEYS, *(f"{k}_std" for k in SCORES), "config"}
    by = {(r["method"], r["variant"]): r for r in rows}
    for r in rows:
        assert set(r) == expected_keys, r["variant"]
        assert r["seeds"] == [0]
        assert all(r[f"{k}_std"] is None for k in SCORES)  # one seed: no spread
        assert f"| {r['method']} | {r['variant']} |" in table
        config = r["config"]
        assert (config["model"], config["dataset"]) == ("builtin:tiny-llama", "builtin:restaurants")
        assert "seed" not in config["training"]
        assert math.isfinite(r["eval_loss"]) and r["eval_loss"] > 0
        if r["group"] == "grid":  # validation loss only: no test example is generated for the choice
            assert config["evaluation"]["samples"] == 0 and config["training"]["steps"] == 2
            assert r["bleu"] is None and r["bertscore_f1"] is None and r["seconds_per_step"] > 0
            continue
        assert 0 <= r["bleu"] <= 100
        if r["variant"] in EVALUATED:  # inference on the device: its scores and readout error, no training figures
            assert config["kind"] == "evaluate" and config["quantum"]["backend"] == "fake:FakeManilaV2"
            assert config["evaluation"] == {"metrics": ["bleu", "rouge", "bertscore"], "max_new_tokens": 2,
                                            "samples": 2}  # fmt: skip
            assert 0 < r["readout_error"] < 1
            assert r["trainable_params"] is None and r["final_train_loss"] is None and r["seconds_per_step"] is None
            continue
        assert r["readout_error"] is None
        assert isinstance(r["trainable_params"], int) and r["trainable_params"] > 0
        assert 0 < r["trainable_share"] <= 1
        assert math.isfinite(r["final_train_loss"])
        assert all(0 <= r[k] <= 1 for k in ("rouge1", "rouge2", "rougeL", "bertscore_f1"))
        assert r["seconds_per_step"] > 0 and r["peak_memory_mb"] > 100
        assert config["training"]["steps"] == (2 if r["variant"] == TUNED else 6)

    lora = by[("lora", "r=8")]
    assert by[("full", "all weights")]["trainable_share"] == 1.0
    for r in rows:
        if r["method"] == "qaa" and r["trainable_share"] is not None:
            assert r["trainable_share"] < lora["trainable_share"], r["variant"]
    trained, tuned = by[("qaa", TRAINED)], by[("qaa", TUNED)]
    assert trained["trainable_params"] == tuned["trainable_params"]
    assert tuned["config"]["quantum"] == {"backend": "fake:FakeManilaV2", "shots": 256,
                                          "gradient": "parameter-shift", "input_grad": "none"}  # fmt: skip
    assert tuned["seconds_per_step"] > trained["seconds_per_step"]
    mitigations = [by[("qaa", v)]["config"]["quantum"].get("mitigation") for v in EVALUATED]
    assert mitigations[0] is None and mitigations[4] == {"zne": {}} and mitigations[-1] is None

    assert record["learning_rates"] == {method: lr for (method, _), lr in HEADLINE.items()}
    for r in rows:  # every headline and QAA row at its method's chosen rate
        if r["group"] in ("headline", "variant"):
            assert r["learning_rate"] == record["learning_rates"][r["method"]], r["variant"]
    assert record["budget"]["model"] == "builtin:tiny-llama" and record["budget"]["steps"] == 6
    assert record["command"] == f"qaa bench --quick --out {out}"
    assert record["failures"] == [] and record["wall_seconds"] > 0
    assert record["targets"]["qaa_over_lora_params"] < 0.5 and record["targets"]["qaa_minus_prefix_bleu"] is not None
    assert set(record["targets"]["met"]) >= {"bleu_within_1_of_lora", "at_most_half_lora_params"}
    store = services.store()
    try:
        for entry in record["rows"]:
            (job_id,) = entry["jobs"]
            job = store.load_job(job_id)
            assert job.status == "succeeded"
            config = by[(entry["method"], entry["variant"])]["config"]
            assert job.spec["training"]["seed"] == 0
            for part in ("method", "training", "evaluation"):  # the stored spec adds the defaults
                assert {k: job.spec[part][k] for k in config[part]} == config[part]
        # one adapter: every evaluate row loads the trained or the tuned job's, and the tuning starts from the first
        ids = {(e["method"], e["variant"]): e["jobs"][0] for e in record["rows"]}
        for variant in EVALUATED:
            source = TUNED if "tuned" in variant else TRAINED
            assert store.load_job(ids[("qaa", variant)]).spec["adapter_from"] == ids[("qaa", source)]
        assert store.load_job(ids[("qaa", TUNED)]).spec["init_from"] == ids[("qaa", TRAINED)]
    finally:
        services.close()

    # --resume takes every job the run finished (by id, from the store) and runs none again
    again = Proc([*args, "--resume"], services.env(), tmp_path / "resume.log")
    try:
        assert again.popen.wait(timeout=300) == 0, again.log()[-4000:]
    finally:
        again.stop()
    resumed = json.loads((out / "methods_budget.json").read_text())
    assert resumed["rows"] == record["rows"] and resumed["learning_rates"] == record["learning_rates"]
    assert resumed["started_at"] == record["started_at"] and resumed["wall_seconds"] >= record["wall_seconds"]
    assert again.log().count("finished before") == len(ROWS) and "submitted" not in again.log()


def test_a_row_of_three_seeds_reports_means_spreads_the_fastest_step_and_the_highest_peak():
    from workers.bench import Row, summarize

    def job(seed: int, status: str, bleu: float, step_s: float, peak: float) -> dict:
        evaluation = {"bleu": bleu, "eval_loss": 1.0 + seed, "seconds_per_step": step_s, "peak_memory_mb": peak,
                      "trainable_params": 10, "trainable_share": 0.5}  # fmt: skip
        return {"status": status, "evaluation": evaluation, "spec": {"training": {"seed": seed}}}

    row = Row("lora", "r=8", {"dataset": "builtin:e2e", "training": {"steps": 5, "seed": 0, "learning_rate": 0.002}},
              [0, 1, 2, 3], "headline")  # fmt: skip
    row.jobs = [job(0, "succeeded", 30.0, 1.5, 900), job(1, "succeeded", 34.0, 1.0, 1000),
                job(2, "succeeded", 35.0, 3.0, 950), job(3, "failed", 99.0, 0.1, 5000)]  # fmt: skip
    out = summarize(row)
    assert out["seeds"] == [0, 1, 2]  # the failed seed counts nowhere
    assert out["bleu"] == pytest.approx(33.0) and out["bleu_std"] == pytest.approx(2.6457513)
    assert (out["eval_loss"], out["eval_loss_std"]) == (2.0, 1.0)
    assert (out["seconds_per_step"], out["peak_memory_mb"]) == (1.0, 1000)
    assert out["rouge1"] is None and out["rouge1_std"] is None  # not measured: no number invented
    assert out["config"] == {"dataset": "builtin:e2e", "training": {"steps": 5, "learning_rate": 0.002}}
    assert (out["group"], out["dataset"], out["learning_rate"]) == ("headline", "builtin:e2e", 0.002)


def test_the_grid_chooses_each_methods_rate_by_validation_loss_and_resume_reruns_changed_specs():
    from workers.bench import BenchError, Row, _same_run, apply_rates, choose_rates

    def grid(method: str, lr: float, status: str, loss: float | None) -> Row:
        row = Row(method, f"lr={lr}", {"dataset": "d", "training": {"learning_rate": lr}}, [0], "grid")
        row.jobs = [{"status": status, "evaluation": {"eval_loss": loss} if loss is not None else None}]
        return row

    rows = [grid("lora", 1e-3, "succeeded", 2.0), grid("lora", 2e-3, "succeeded", 1.5),
            grid("lora", 4e-3, "failed", 0.1), grid("qaa", 1e-3, "succeeded", 1.9),
            grid("qaa", 2e-3, "succeeded", float("nan"))]  # fmt: skip
    assert choose_rates(rows) == {"lora": 2e-3, "qaa": 1e-3}  # the failed run's lower loss does not count
    headline = Row("lora", "r=8", {"dataset": "d", "training": {"learning_rate": 9.0}}, [0], "headline")
    hardware = Row("qaa", "n=4", {"dataset": "d", "training": {"learning_rate": 9.0}}, [0], "hardware")
    apply_rates([headline, hardware], {"lora": 2e-3, "qaa": 1e-3})
    assert (headline.learning_rate, hardware.learning_rate) == (2e-3, 9.0)  # the hardware rows keep their own
    with pytest.raises(BenchError, match="no learning rate of the grid succeeded for prefix"):
        choose_rates([*rows, grid("prefix", 1e-2, "failed", None)])

    mitigation = {"readout": "m3", "twirling": False}
    stored = {"name": "x", "training": {"steps": 6, "learning_rate": 2e-3, "warmup_steps": 0},
              "quantum": {"backend": "fake:FakeManilaV2", "mitigation": mitigation}}  # fmt: skip
    assert _same_run(
        stored,
        {"name": "x", "training": {"steps": 6, "learning_rate": 2e-3}, "quantum": {"mitigation": {"readout": "m3"}}},
    )  # fmt: skip  (defaults added: the same)
    assert not _same_run(stored, {"name": "x", "training": {"steps": 6, "learning_rate": 4e-3}})  # another rate
