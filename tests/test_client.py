"""qaa-client without a server: spec files and overrides, URL/key resolution, rendering, the examples, and
that the client imports nothing of the server side."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from client import compare, config, render
from client.cli import app
from client.spec_file import MITIGATION_FLAGS, SpecFileError, apply_overrides, evaluate_spec, load_spec, local_dataset
from service.spec import parse_spec

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


# --- examples ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_is_a_valid_spec(path):
    spec = parse_spec(load_spec(path))
    assert spec.name


def test_examples_cover_every_method_and_backend():
    specs = [parse_spec(load_spec(p)) for p in EXAMPLES]
    assert {s.method.kind for s in specs} == {"qaa", "lora", "prefix", "sora", "full"}
    assert {s.quantum.backend for s in specs if s.quantum} == {"exact", "aer", "fake:FakeManilaV2"}
    tiny = parse_spec(load_spec(REPO / "examples/tiny.yaml"))
    assert (tiny.model, tiny.dataset, tiny.method.kind, tiny.quantum.backend, tiny.training.steps) == (
        "builtin:tiny-llama",
        "builtin:restaurants",
        "qaa",
        "exact",
        5,
    )
    assert tiny.evaluation.samples <= 8


def test_the_upload_example_names_a_dataset_file_next_to_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repo: the file is found beside the spec
    path = REPO / "examples/uploaded-dataset.yaml"
    found = local_dataset(load_spec(path), path)
    assert found == REPO / "examples/cafes.jsonl"
    rows = [json.loads(line) for line in found.read_text().splitlines()]
    assert all(set(r) == {"prompt", "completion"} for r in rows) and len(rows) == 4


# --- spec files and overrides ------------------------------------------------------------------------------


def test_yaml_and_json_files_load_the_same(tmp_path):
    doc = {"model": "builtin:tiny-llama", "dataset": "builtin:restaurants", "training": {"steps": 5}}
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(doc))
    (tmp_path / "a.json").write_text(json.dumps(doc))
    assert load_spec(tmp_path / "a.yaml") == load_spec(tmp_path / "a.json") == doc


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model: [unclosed\n", "not valid YAML/JSON at line 2 column 1"),
        ("- a\n- b\n", "must hold a mapping (model: ..., dataset: ...), got a list"),
        ("", "got an empty file"),
    ],
)
def test_unusable_spec_files_are_refused_with_the_reason(tmp_path, text, message):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(SpecFileError) as err:
        load_spec(path)
    assert message in str(err.value)
    with pytest.raises(SpecFileError, match="does not exist"):
        load_spec(tmp_path / "missing.yaml")


def test_overrides_are_yaml_typed_and_create_mappings():
    spec = {"training": {"steps": 200}, "quantum": {"shots": 100}}
    out = apply_overrides(
        spec,
        [
            "training.steps=50",
            "training.learning_rate=1e-3",
            "quantum.shots=null",
            "method.target_modules=[q_proj, v_proj]",
            "name='007'",
            "evaluation.metrics=[bleu]",
            "training.steps=60",
        ],
    )
    assert out == {
        "training": {"steps": 60, "learning_rate": 1e-3},
        "quantum": {"shots": None},
        "method": {"target_modules": ["q_proj", "v_proj"]},
        "name": "007",
        "evaluation": {"metrics": ["bleu"]},
    }
    assert isinstance(out["training"]["steps"], int) and isinstance(out["training"]["learning_rate"], float)


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("training", "--set expects dotted.path=value"),
        ("training..steps=3", "--set expects dotted.path=value"),
        ("=3", "--set expects dotted.path=value"),
        ("training.steps.x=3", "training.steps is 200, not a mapping"),
        ("name=[unclosed", "the value is not valid YAML"),
    ],
)
def test_malformed_overrides_name_the_problem(assignment, message):
    with pytest.raises(SpecFileError) as err:
        apply_overrides({"training": {"steps": 200}}, [assignment])
    assert message in str(err.value)


def test_each_mitigation_flag_makes_a_valid_evaluate_spec():
    trained = load_spec(REPO / "examples" / "qaa-hardware.yaml")
    for word in MITIGATION_FLAGS:
        spec = evaluate_spec(trained, "job_" + "a" * 32, "fake:FakeTorino", shots=512, mitigation=[word], samples=2)
        assert parse_spec(spec).quantum.mitigation.active, word
    spec = evaluate_spec(
        trained, "job_" + "a" * 32, "fake:FakeTorino", shots=None, mitigation=["m3", "dd"], samples=None
    )
    assert spec["quantum"]["mitigation"] == {"readout": "m3", "dynamical_decoupling": "XY4"}
    with pytest.raises(SpecFileError, match="m3, trex, twirling, zne, dd; got 'pec'"):
        evaluate_spec(trained, "job_x", "fake:FakeTorino", shots=None, mitigation=["pec"], samples=None)


def test_local_dataset_only_for_existing_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "here.jsonl").write_text("{}\n")
    spec_dir = tmp_path / "specs"
    spec_dir.mkdir()
    (spec_dir / "beside.jsonl").write_text("{}\n")
    spec_path = spec_dir / "job.yaml"
    assert local_dataset({"dataset": "here.jsonl"}, spec_path) == Path("here.jsonl")
    assert local_dataset({"dataset": "beside.jsonl"}, spec_path) == spec_dir / "beside.jsonl"
    assert local_dataset({"dataset": str(tmp_path / "here.jsonl")}, None) == tmp_path / "here.jsonl"
    for ref in ("builtin:restaurants", "ds_0123456789abcdef", "/srv/data/on-the-worker.jsonl", "missing.jsonl", 3):
        assert local_dataset({"dataset": ref}, spec_path) is None


# --- server URL and key ------------------------------------------------------------------------------------


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    for name in ("QAA_URL", "QAA_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("QAA_HOME", str(tmp_path / "home"))
    return tmp_path / "home" / "credentials"


def test_resolution_order_flags_then_environment_then_credentials_file(clean_env, monkeypatch):
    assert config.resolve() == config.Connection("http://127.0.0.1:8000", None, config.resolve().key_source)
    assert "none found" in config.resolve().key_source

    clean_env.parent.mkdir(parents=True)
    clean_env.write_text(json.dumps({"url": "http://10.0.0.5:8000/", "api_key": "from-file"}))
    assert config.resolve() == config.Connection("http://10.0.0.5:8000", "from-file", str(clean_env))

    monkeypatch.setenv("QAA_URL", "http://env:1")
    assert config.resolve() == config.Connection("http://env:1", "from-file", str(clean_env))
    monkeypatch.setenv("QAA_API_KEY", "from-env")
    assert config.resolve() == config.Connection("http://env:1", "from-env", "QAA_API_KEY")

    assert config.resolve("http://flag:2", "from-flag") == config.Connection("http://flag:2", "from-flag", "--api-key")


def test_a_malformed_credentials_file_is_a_usage_error(clean_env):
    clean_env.parent.mkdir(parents=True)
    clean_env.write_text("url=http://x\n")
    result = CliRunner().invoke(app, ["list"])
    assert result.exit_code == 2
    assert f"the credentials file {clean_env} is not JSON" in result.stderr


def test_bad_flags_are_usage_errors(clean_env, tmp_path):
    runner = CliRunner()
    assert runner.invoke(app, ["list", "--no-such-flag"]).exit_code == 2
    assert runner.invoke(app, ["metrics", "job_x", "--format", "xml"]).exit_code == 2
    result = runner.invoke(app, ["submit", str(tmp_path / "nope.yaml"), "--output", "json"])
    assert result.exit_code == 2
    assert json.loads(result.stdout)["error"]["exit_code"] == 2
    assert "does not exist" in json.loads(result.stdout)["error"]["message"]


# --- rendering and comparison ------------------------------------------------------------------------------


def test_method_labels_name_the_size_setting():
    assert render.method_label({"method": {"kind": "qaa", "layers": 4, "readout": "expval+zz"}}) == "qaa L=4 expval+zz"
    assert render.method_label({"method": {"kind": "qaa", "qubits": 3}}) == "qaa L=2 expval n=3"
    assert render.method_label({"method": {"kind": "lora", "r": 16}}) == "lora r=16"
    assert render.method_label({"method": {"kind": "prefix"}}) == "prefix 20 tokens"
    assert render.method_label({"method": {"kind": "full"}}) == "full"


def test_numbers_are_formatted_for_reading():
    assert [render.fmt(v) for v in (None, 3, 1234567, 0.5, 31.4159265, 0.000123456, 0.0, True)] == [
        "-",
        "3",
        "1,234,567",
        "0.5",
        "31.4159",
        "0.0001235",
        "0",
        "true",
    ]


CIRCUIT = {"qubits": 3, "two_qubit_gates": 15, "depth": 45, "duration_s": 1.1125e-05, "physical_qubits": [2, 3, 4],
           "esp": 0.75461, "readout_errors": [0.0964, 0.0186, 0.0144], "median_two_qubit_error": 0.011354}  # fmt: skip


def shown(*tables) -> str:
    from rich.console import Console

    out = Console(record=True, width=200, file=io.StringIO())
    for table in tables:
        out.print(table)
    return out.export_text()


def test_a_device_jobs_usage_counts_its_runtime_jobs_and_tables_its_circuits():
    ids = [f"{i:08x}-7d37-418c-b750-44db859b768a" for i in range(56)]
    usage = {"circuits": 608, "shots": 622592, "runtime_job_ids": ids, "sessions_closed": 1,
             "circuits_on_backend": [CIRCUIT]}  # fmt: skip
    text = shown(*render.job_tables({"id": "job_1", "status": "succeeded", "usage": usage}))
    assert not any(i in text for i in ids) and max(map(len, text.splitlines())) <= 120  # no wall of ids
    assert re.search(r"runtime_jobs\s+│\s+56 │", text) and re.search(r"circuits\s+│\s+608 │", text)
    assert re.search(r"│ 3 +│ 2, 3, 4 +│ 15 +│ 45 +│ 11.125 µs │ 0.755 │ 0.096 +│ 0.011 +│", text), text


def test_a_device_estimate_shows_qpu_time_evaluation_warnings_and_each_circuits_esp():
    est = {"backend": "fake:FakeManilaV2", "adapters": 2, "d_in": [64], "tokens_per_step": 8, "circuits_per_step": 304,
           "circuits": 608, "shots": 622592, "primitive_calls": 4, "runtime_jobs": 4,
           "evaluation": {"circuits": 3244, "shots": 3321856, "runtime_jobs": 108},
           "qpu_seconds": {"low": 1210.112, "high": 2149.9953}, "seconds": {"low": 2.66, "high": 420.18},
           "circuits_on_backend": [CIRCUIT], "warnings": ["ESP 0.02 on ibm_x: the readout is mostly noise"],
           "within_budget": False, "note": ""}  # fmt: skip
    text = shown(*render.estimate_tables(est))
    for row in ("runtime jobs +│ 4 ", "evaluation, at most │ 3,244 circuits, 3,321,856 shots, 108 runtime jobs",
                "QPU time +│ 1,210.11 - 2,150 s", "within budget +│ NO", "warning +│ ESP 0.02 on ibm_x"):  # fmt: skip
        assert re.search(row, text), row
    assert "0.755" in text and "note" not in text
    exact = {**est, "backend": "exact", "circuits": 0, "shots": 0, "runtime_jobs": 0, "qpu_seconds": None,
             "evaluation": {"circuits": 0, "shots": 0, "runtime_jobs": 0}, "circuits_on_backend": None,
             "warnings": [], "within_budget": True}  # fmt: skip
    text = shown(*render.estimate_tables(exact))
    assert not re.search("QPU|runtime jobs|evaluation|ESP", text) and re.search(r"within budget +│ yes", text)


def test_compare_rows_read_scores_whatever_the_nesting():
    job = {
        "id": "job_a",
        "status": "succeeded",
        "spec": {"method": {"kind": "lora", "r": 8}},
        "progress": {"step": 4, "steps": 4},
        "started_at": "2026-01-01T00:00:00Z",
        "finished_at": "2026-01-01T00:00:10Z",
        "usage": {"circuits": 0},
        "evaluation": {
            "bleu": 12.5,
            "rouge": {"rouge1": 0.4, "rougeL": 0.35},
            "bertscore_f1": 0.81,
            "trainable": {"params": 1024, "share": 0.002},
            "peak_rss_mb": 900.0,
        },
    }
    points = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5, "eval_loss": 2.6}, {"step": 3, "lr": 1e-3}]
    got = compare.row(job, points)
    assert got["rouge_l"] == 0.35 and got["bleu"] == 12.5 and got["bertscore_f1"] == 0.81
    assert got["peak_memory_mb"] == 900.0 and got["final_loss"] == 2.5
    assert got["seconds_per_step"] == 2.5  # no step times in the points: wall time over 4 steps
    assert got["trainable_share"] == 0.002  # "trainable.share" reads as trainable_share
    timed = compare.row({**job, "evaluation": {"trainable_share": 0.01}}, [{"step": 1, "step_time": 0.5}])
    assert timed["seconds_per_step"] == 0.5 and timed["trainable_share"] == 0.01 and timed["final_loss"] is None


def test_plot_writes_a_png_of_all_curves(tmp_path):
    path = tmp_path / "curves.png"
    compare.plot({"a": [{"step": s, "loss": 3 / s} for s in range(1, 6)], "b": [{"step": 5, "eval_loss": 1.0}]}, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


# --- layering ----------------------------------------------------------------------------------------------


def test_importing_the_client_loads_nothing_of_the_server_side():
    code = (
        "import sys, client.cli\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('service', 'workers', 'circuits', 'torch', 'transformers', 'qiskit', 'qiskit_aer', 'matplotlib'))\n"
        "print(','.join(bad))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert done.stdout.strip() == ""


def test_help_texts_keep_their_defaults():
    """Square brackets in a help text are Rich markup to typer: the defaults used to vanish ("Server URL .")."""
    from typer.testing import CliRunner

    from client.cli import app

    submit = CliRunner().invoke(app, ["submit", "--help"], env={"COLUMNS": "200"})
    assert submit.exit_code == 0 and "QAA_URL, the credentials file" in submit.output
    assert "default: QAA_API_KEY" in submit.output
    metrics = CliRunner().invoke(app, ["metrics", "--help"], env={"COLUMNS": "200"})
    download = CliRunner().invoke(app, ["download", "--help"], env={"COLUMNS": "200"})
    assert "default: table; json with -o json" in metrics.output and "default: ./JOB_ID" in download.output


def test_both_clis_print_the_package_version():
    from importlib import metadata

    from typer.testing import CliRunner

    from client.cli import app as client_app
    from workers.cli import app as server_app

    version = metadata.version("qaa-service")
    for cli, prog in ((client_app, "qaa-client"), (server_app, "qaa")):
        result = CliRunner().invoke(cli, ["--version"])
        assert result.exit_code == 0 and result.output.strip() == f"{prog} {version}"


def test_the_licence_file_is_the_one_pyproject_names():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    licence = (REPO / "LICENSE").read_text()
    assert project["license"] == {"text": "Apache-2.0"}
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence
    assert "END OF TERMS AND CONDITIONS" in licence


# --- the spec reference, offline validation and starters ---------------------------------------------------------


def test_the_spec_reference_and_the_json_schema_are_the_generated_ones():
    from service import spec_reference

    assert (REPO / "docs" / "spec.md").read_text() == spec_reference.markdown()
    assert json.loads((REPO / "jobspec.schema.json").read_text()) == spec_reference.json_schema()
    schema = spec_reference.json_schema()
    blocks = [schema, *schema["$defs"].values()]
    undocumented = [k for b in blocks for k, p in b.get("properties", {}).items() if not p.get("description")]
    assert undocumented == []  # every key says what it means


@pytest.mark.parametrize("kind", ["qaa", "lora", "prefix", "sora", "full"])
def test_spec_init_writes_a_commented_starter_that_is_the_defaults(kind, tmp_path):
    from workers.cli import app as qaa

    runner = CliRunner()
    result = runner.invoke(qaa, ["spec", "init", "--method", kind])
    assert result.exit_code == 0, result.output
    assert result.output.count("# ") >= 10  # commented, line by line
    started = parse_spec(yaml.safe_load(result.output))
    defaults = parse_spec({"name": f"my-{kind}-job", "model": "builtin:smollm2-135m", "dataset": "builtin:e2e",
                           "method": {"kind": kind}})  # fmt: skip
    assert started == defaults
    path = tmp_path / "job.yaml"
    assert runner.invoke(qaa, ["spec", "init", "--method", kind, "--out", str(path)]).exit_code == 0
    assert runner.invoke(qaa, ["spec", "init", "--out", str(path)]).exit_code == 2  # never overwritten
    valid = runner.invoke(qaa, ["spec", "validate", str(path)])
    assert valid.exit_code == 0 and f"valid (train, method {kind}" in valid.output


def test_spec_validate_gives_the_servers_messages_offline(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("model: builtin:tiny-llama\ndataset: builtin:e2e\nmethod: {kind: qaa, qubits: 99}\n"
                    "training: {stepz: 3}\n")  # fmt: skip
    from workers.cli import app as qaa

    result = CliRunner().invoke(qaa, ["spec", "validate", str(path), "--json"])
    assert result.exit_code == 2
    errors = {e["path"]: e["message"] for e in json.loads(result.output)["errors"]}
    assert errors["method.qubits"] == "qubits must be 'auto' or an integer between 1 and 16, got 99"
    assert errors["training.stepz"].startswith("unknown key 'stepz'; did you mean 'steps'?")


def test_both_clis_complete_their_commands_in_the_shell():
    for prog, words, expected in (("qaa-client", "qaa-client data", {"datasets"}),
                                  ("qaa", "qaa spec ", {"init", "validate"})):  # fmt: skip
        script = Path(sys.executable).parent / prog
        cword = len(words.split()) - (0 if words.endswith(" ") else 1)  # the word being completed
        env = {"PATH": "/usr/bin:/bin", f"_{prog.upper().replace('-', '_')}_COMPLETE": "complete_bash",
               "COMP_WORDS": words, "COMP_CWORD": str(cword)}  # fmt: skip
        done = subprocess.run([str(script)], env=env, capture_output=True, text=True, timeout=60)
        assert set(done.stdout.split()) >= expected, (prog, done.stdout, done.stderr)
        # Typer otherwise detects the shell from the process tree (`sh` under a `sh -c` runner) and ignores "bash"
        named = {"PATH": "/usr/bin:/bin", "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
        shown = subprocess.run([str(script), "--show-completion", "bash"], capture_output=True, text=True, timeout=60,
                               env=named)  # fmt: skip
        assert f"complete -o default -F _{prog.replace('-', '_')}_completion {prog}" in shown.stdout
