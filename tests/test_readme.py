"""The README's commands are the ones that work: this test reads them out of the README and runs them.

- The two set-up commands at the top are `make` targets (`make test` is what CI runs; `make demo` runs
  `qaa demo`, whose behaviour `tests/test_up.py` checks with small jobs).
- The quick start block runs line by line, as written, in a temporary `QAA_HOME`: `qaa up &` in the
  background, then each client command must exit 0.
- The published method table is the one `qaa bench` wrote to `benchmarks/results/`, with its wall time and the
  target figures the README states.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess

import pytest
from stack import REPO, free_port, wait_until

README = (REPO / "README.md").read_text()


def block_after(heading: str) -> list[str]:
    """The commands of the first ```bash block after `heading`, comments stripped."""
    section = README.split(heading, 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S)
    assert block, f"no bash block after {heading!r}"
    lines = [line.split("  #", 1)[0].strip() for line in block.group(1).splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_the_two_set_up_commands_are_make_targets_that_do_what_the_readme_says():
    assert block_after("# QAA training service") == ["make demo", "make test"]
    for target, runs in (("demo", ".venv/bin/qaa demo"), ("test", ".venv/bin/python -m pytest")):
        dry = subprocess.run(["make", "-n", "-W", "pyproject.toml", target], cwd=REPO, capture_output=True, text=True)
        assert dry.returncode == 0, dry.stderr
        assert runs in dry.stdout and "pip install -q torch==2.13.0" in dry.stdout  # creates the venv first
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in ci


@pytest.mark.slow
def test_the_quick_start_runs_as_written(tmp_path):
    commands = block_after("## Quick start")
    assert commands[0] == "make install" and commands[1].endswith("qaa up &"), commands
    env = {k: v for k, v in os.environ.items() if not k.startswith("QAA_")}
    env.update(QAA_HOME=str(tmp_path / "home"), QAA_PORT=str(free_port()), HF_HUB_OFFLINE="1")
    log = (tmp_path / "up.log").open("wb")
    up = subprocess.Popen(shlex.split(commands[1].rstrip("& ")), cwd=REPO, env=env, stdout=log, stderr=log)
    try:
        wait_until(lambda: "QAA is up" in (tmp_path / "up.log").read_text(), 180, interval=0.3, what="qaa up")
        for command in commands[2:]:
            done = subprocess.run(command, shell=True, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
    finally:
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=90) == 0
        log.close()


def test_the_method_table_is_the_one_the_bench_wrote():
    results = REPO / "benchmarks" / "results"
    table = [line for line in (results / "methods.md").read_text().splitlines() if line.startswith("|")]
    section = README.split("### Methods compared", 1)[1].split("\n## ", 1)[0]
    assert [line for line in section.splitlines() if line.startswith("|")] == table
    record = json.loads((results / "methods_budget.json").read_text())
    assert f"**{record['wall_seconds'] / 60:.0f} min**" in section
    targets = record["targets"]
    assert f"({targets['qaa_minus_lora_bleu']:.2f})" in section
    assert f"({targets['qaa_over_lora_params']:.4f})" in section
    assert f"({targets['qaa_minus_lora_bertscore_f1']:+.3f})" in section


def benchmark(name: str):
    """`benchmarks/<name>.py` as a module (the folder is scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_mitigation_table_is_the_one_the_benchmark_wrote():
    bench = benchmark("mitigation")
    result = json.loads((REPO / "benchmarks" / "results" / "mitigation.json").read_text())
    assert bench.markdown(result) in README
    assert result["target_met"] == bench.target_met(result["rows"])
    # the README states the target as measured: met on FakeTorino, not on FakeManilaV2
    assert result["target_met"] == {"FakeManilaV2": False, "FakeTorino": True}
    rows = {(r["backend"], r["qubits"], r["mitigation"]) for r in result["rows"]}
    assert {"none", "m3", "twirling+trex", "zne", "zne+trex"} <= {m for _, _, m in rows}


def test_the_hardware_gap_tables_are_the_ones_the_study_wrote():
    import yaml

    study = benchmark("hardware_gap")
    record = json.loads((REPO / "benchmarks" / "results" / "hardware_gap.json").read_text())
    assert study.markdown(record) in README
    # the example a user starts from is the configuration the study chose and measured
    example = yaml.safe_load((REPO / record["spec"]).read_text())
    assert example["method"] == record["method"]
    assert {r["backend"] for r in record["rows"]} == {"FakeManilaV2", "FakeTorino"}
    assert {r["mitigation"] for r in record["rows"]} == {"none", "m3", "zne"}


def test_the_hardware_table_is_the_one_the_benchmark_wrote():
    bench = benchmark("hardware")
    result = json.loads((REPO / "benchmarks" / "results" / "hardware.json").read_text())
    assert bench.markdown(result) in README
