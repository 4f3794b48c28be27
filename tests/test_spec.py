"""The job spec: defaults, bounds, unknown keys, cross-field rules, queue routing, QAAConfig conversion."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from pydantic import ValidationError

from circuits.config import QAAConfig
from service.spec import (
    FullMethod,
    JobSpec,
    LoRAMethod,
    QAAMethod,
    QuantumOptions,
    parse_spec,
    validation_errors,
)

BASE = {"model": "builtin:tiny-llama", "dataset": "builtin:restaurants"}

# The annotated job spec of the design notes (long comments shortened).
DESIGN_EXAMPLE = """
name: smollm2-qaa-restaurants          # optional label
model: builtin:smollm2-135m            # builtin:<name> | a Hugging Face id | a local path
dataset: builtin:restaurants           # or ds_<id> from POST /v1/datasets
method:
  kind: qaa                            # qaa | lora | prefix | sora | full
  target_modules: [q_proj, v_proj]
  qubits: auto                         # ceil(log2 d_in), or an int with compress: fixed | learned
  layers: 2
  entangler: ring
  readout: expval
  alpha: 1.0
quantum:                               # only for kind: qaa
  backend: exact                       # exact | aer | fake:FakeManilaV2 | ibm:ibm_torino
  shots: null                          # null = exact expectations where the backend allows
  gradient: exact                      # exact (exact backend only) | parameter-shift | spsa
  input_grad: shift                    # shift | none
  embedding: gates                     # gates | direct (simulators: ideal state)
  optimization_level: 1
  max_circuits: 10000000               # budget: refused up front if the estimate is larger
training: {steps: 200, batch_size: 8, max_length: 64, learning_rate: 2.0e-3, seed: 0,
           eval_every: 50, checkpoint_every: 25}
evaluation: {metrics: [bleu, rouge, bertscore], max_new_tokens: 48, samples: 100}
"""


def spec(**overrides: object) -> JobSpec:
    return parse_spec({**BASE, **overrides})


def errors(data: dict) -> list[dict[str, str]]:
    with pytest.raises(ValidationError) as info:
        parse_spec(data)
    return validation_errors(info.value)


def error_at(data: dict, path: str) -> str:
    """The message of the error at `path`; fails listing all errors if there is none there."""
    errs = errors(data)
    by_path = {e["path"]: e["message"] for e in errs}
    assert path in by_path, errs
    return by_path[path]


def test_design_example_parses() -> None:
    s = parse_spec(yaml.safe_load(DESIGN_EXAMPLE))
    assert s.name == "smollm2-qaa-restaurants"
    assert isinstance(s.method, QAAMethod) and s.method.target_modules == ["q_proj", "v_proj"]
    assert s.quantum is not None and s.quantum.max_circuits == 10_000_000
    assert s.training.learning_rate == pytest.approx(2e-3)
    assert s.evaluation.metrics == ["bleu", "rouge", "bertscore"]


def test_minimal_spec_defaults() -> None:
    s = spec()
    assert s.name is None
    assert isinstance(s.method, QAAMethod) and s.method.qubits == "auto" and s.method.layers == 2
    assert s.quantum == QuantumOptions(backend="exact", gradient="exact")
    assert (s.training.steps, s.training.batch_size, s.training.max_length) == (200, 8, 64)
    assert (s.training.eval_every, s.training.checkpoint_every, s.training.grad_clip) == (50, 25, 1.0)
    assert s.evaluation.max_new_tokens == 48 and s.evaluation.samples == 100
    assert s.queue == "cpu"


def test_spec_round_trips_through_json() -> None:
    s = spec(method={"kind": "qaa", "qubits": 4, "compress": "learned"}, quantum={"backend": "aer", "shots": 1024})
    again = parse_spec(s.model_dump(mode="json"))
    assert again == s


@pytest.mark.parametrize(
    ("data", "path", "message"),
    [
        ({**BASE, "bogus": 1}, "bogus", "unknown key 'bogus' Allowed here: name, kind, model, dataset, method,"),
        ({**BASE, "method": {"kind": "qaa", "qbits": 4}}, "method.qbits", "did you mean 'qubits'? Allowed here: "
         "target_modules, qubits, layers, entangler, readout, compress, alpha, kind"),
        ({**BASE, "method": {"kind": "full", "r": 8}}, "method.r", "unknown key 'r' Allowed here: kind"),
        ({**BASE, "quantum": {"backend": "exact", "shot": 10}}, "quantum.shot", "did you mean 'shots'?"),
        ({**BASE, "training": {"learning_rte": 0.1}}, "training.learning_rte", "did you mean 'learning_rate'?"),
        ({**BASE, "evaluation": {"metric": ["bleu"]}}, "evaluation.metric", "did you mean 'metrics'?"),
        ({**BASE, "quantum": {"backend": "fake:FakeManilaV2", "mitigation": {"readot": "m3"}}},
         "quantum.mitigation.readot", "did you mean 'readout'?"),
    ],
)  # fmt: skip
def test_unknown_keys_are_rejected_with_their_path_the_nearest_key_and_the_allowed_ones(data, path, message):
    assert message in error_at(data, path)


@pytest.mark.parametrize(
    ("section", "field", "value", "bound"),
    [
        ("training", "steps", 100_001, "100000"),
        ("training", "steps", 0, "1"),
        ("training", "max_length", 4097, "4096"),
        ("training", "batch_size", 513, "512"),
        ("training", "learning_rate", 0, "0"),
        ("evaluation", "max_new_tokens", 5000, "1024"),
        ("method", "layers", 33, "32"),
    ],
)
def test_bounds_name_field_and_bound(section: str, field: str, value: int, bound: str) -> None:
    body = {"kind": "qaa", field: value} if section == "method" else {field: value}
    message = error_at({**BASE, section: body}, f"{section}.{field}")
    assert bound in message


@pytest.mark.parametrize("qubits", [0, 17, "many", True, 2.5])
def test_qubits_bounds(qubits: object) -> None:
    message = error_at({**BASE, "method": {"kind": "qaa", "qubits": qubits}}, "method.qubits")
    assert "between 1 and 16" in message


@pytest.mark.parametrize("qubits", ["auto", 1, 16])
def test_qubits_accepted(qubits: object) -> None:
    assert spec(method={"kind": "qaa", "qubits": qubits}).method.qubits == qubits


def test_method_kind_required_and_known() -> None:
    assert "'kind' is required" in error_at({**BASE, "method": {"layers": 2}}, "method")
    assert "qaa" in error_at({**BASE, "method": {"kind": "adapter"}}, "method")


@pytest.mark.parametrize(
    "method",
    [
        {"kind": "lora", "r": 16, "lora_alpha": 32, "lora_dropout": 0.1, "target_modules": ["q_proj"]},
        {"kind": "prefix", "num_virtual_tokens": 10},
        {"kind": "sora", "r": 8, "lora_alpha": 16, "sparse_lambda": 0.01, "target_modules": "^.*proj$"},
        {"kind": "full"},
    ],
)
def test_classical_methods_parse_and_take_no_quantum(method: dict) -> None:
    s = spec(method=method)
    assert s.method.kind == method["kind"]
    assert s.quantum is None and s.queue == "cpu"
    assert "qaa" in error_at({**BASE, "method": method, "quantum": {"backend": "exact"}}, "quantum")
    with pytest.raises(ValueError, match="no QAA config"):
        s.qaa_config()


def test_method_defaults() -> None:
    lora = spec(method={"kind": "lora"}).method
    assert isinstance(lora, LoRAMethod) and (lora.r, lora.lora_alpha, lora.lora_dropout) == (8, 16.0, 0.05)
    assert isinstance(spec(method={"kind": "full"}).method, FullMethod)


@pytest.mark.parametrize("targets", [[], "", ["q_proj", ""]])
def test_target_modules_not_empty(targets: object) -> None:
    assert "target_modules" in error_at(
        {**BASE, "method": {"kind": "lora", "target_modules": targets}}, "method.target_modules"
    )


@pytest.mark.parametrize(
    "model",
    [
        "builtin:smollm2-135m",
        "builtin:tiny-gpt2",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "gpt2",
        "/models/my model",
        "./local",
        "~/models/x",
        "../up",
    ],
)
def test_model_forms_accepted(model: str) -> None:
    assert spec(model=model).model == model


@pytest.mark.parametrize(
    "model",
    [
        "",
        "builtin:",
        "builtin:Tiny Llama",
        "https://huggingface.co/gpt2",
        "a b",
        "org/name/extra",
        "s3:bucket/x",
        "x\ny",
    ],
)
def test_model_forms_rejected(model: str) -> None:
    assert error_at({**BASE, "model": model}, "model")


@pytest.mark.parametrize(
    "dataset", ["builtin:restaurants", "ds_0123456789abcdef", "/data/x.jsonl", "./x.jsonl", "data/x.jsonl"]
)
def test_dataset_forms_accepted(dataset: str) -> None:
    assert spec(dataset=dataset).dataset == dataset


@pytest.mark.parametrize("dataset", ["", "ds_XYZ", "ds_", "builtin:", "http://x/y.jsonl", "s3:bucket"])
def test_dataset_forms_rejected(dataset: str) -> None:
    assert error_at({**BASE, "dataset": dataset}, "dataset")


@pytest.mark.parametrize("backend", ["exact", "aer", "fake:FakeManilaV2", "fake:FakeTorino", "ibm:ibm_torino"])
def test_backend_names_accepted(backend: str) -> None:
    assert spec(quantum={"backend": backend}).quantum.backend == backend


@pytest.mark.parametrize("backend", ["Exact", "aer:gpu", "fake:Manila", "fake:", "ibm:", "ibm", "qpu"])
def test_backend_names_rejected(backend: str) -> None:
    assert "backend" in error_at({**BASE, "quantum": {"backend": backend}}, "quantum.backend")


def test_gradient_rules() -> None:
    assert spec(quantum={"backend": "aer"}).quantum.gradient == "parameter-shift"
    assert spec(quantum={"backend": "aer", "gradient": "spsa"}).quantum.gradient == "spsa"
    assert spec(quantum={"backend": "exact", "gradient": "parameter-shift"}).quantum.gradient == "parameter-shift"
    message = error_at({**BASE, "quantum": {"backend": "fake:FakeManilaV2", "gradient": "exact"}}, "quantum.gradient")
    assert "needs backend 'exact'" in message


@pytest.mark.parametrize("option", [{"device": "GPU"}, {"aer_method": "statevector"}, {"noise": "FakeManilaV2"}])
def test_aer_options_only_on_aer(option: dict) -> None:
    (field,) = option
    assert spec(quantum={"backend": "aer", **option}).quantum.model_dump()[field] == option[field]
    message = error_at({**BASE, "quantum": {"backend": "fake:FakeManilaV2", **option}}, f"quantum.{field}")
    assert "aer" in message


def test_other_quantum_rules() -> None:
    assert "circuit backend" in error_at({**BASE, "quantum": {"shots": 100}}, "quantum.shots")
    for backend in ("ibm:ibm_torino", "fake:FakeManilaV2"):
        message = error_at({**BASE, "quantum": {"backend": backend, "embedding": "direct"}}, "quantum.embedding")
        assert "needs embedding 'gates'" in message
    assert spec(quantum={"backend": "aer", "embedding": "direct"}).quantum.embedding == "direct"
    assert "FakeManilaV2" in error_at({**BASE, "quantum": {"backend": "aer", "noise": "manila"}}, "quantum.noise")
    assert "1000000" in error_at({**BASE, "quantum": {"backend": "aer", "shots": 10**7}}, "quantum.shots")


def test_training_and_evaluation_rules() -> None:
    assert "training.steps (10)" in error_at(
        {**BASE, "training": {"steps": 10, "warmup_steps": 11}}, "training.warmup_steps"
    )
    assert error_at({**BASE, "evaluation": {"metrics": ["bleu", "meteor"]}}, "evaluation.metrics[1]")
    assert spec(evaluation={"metrics": ["rouge", "rouge", "bleu"]}).evaluation.metrics == ["rouge", "bleu"]
    assert spec(training={"grad_clip": None}).training.grad_clip is None


def test_errors_are_collected_not_first_only() -> None:
    paths = {e["path"] for e in errors({**BASE, "training": {"steps": -1, "batch_size": 0}, "x": 1})}
    assert {"training.steps", "training.batch_size", "x"} <= paths


@pytest.mark.parametrize(
    ("quantum", "method", "queue"),
    [
        (None, {"kind": "lora"}, "cpu"),
        ({"backend": "exact"}, {"kind": "qaa"}, "cpu"),
        ({"backend": "aer"}, {"kind": "qaa"}, "cpu"),
        ({"backend": "aer", "device": "CPU"}, {"kind": "qaa"}, "cpu"),
        ({"backend": "aer", "device": "GPU"}, {"kind": "qaa"}, "gpu"),
        ({"backend": "fake:FakeManilaV2"}, {"kind": "qaa"}, "cpu"),
        ({"backend": "ibm:ibm_torino"}, {"kind": "qaa"}, "qpu"),
    ],
)
def test_queue_routing(quantum: dict | None, method: dict, queue: str) -> None:
    data = {**BASE, "method": method}
    if quantum is not None:
        data["quantum"] = quantum
    assert parse_spec(data).queue == queue


@pytest.mark.parametrize(
    ("device", "quantum", "method", "queue"),
    [
        ("cuda", {"backend": "exact"}, {"kind": "qaa"}, "gpu"),  # the exact engine on the GPU worker
        ("cuda", None, {"kind": "lora"}, "gpu"),
        ("auto", {"backend": "exact"}, {"kind": "qaa"}, "cpu"),  # a CPU worker; CUDA if it has one
        ("cpu", {"backend": "aer", "device": "GPU"}, {"kind": "qaa"}, "gpu"),  # Aer on the GPU needs its worker
        ("cuda", {"backend": "ibm:ibm_torino"}, {"kind": "qaa"}, "qpu"),  # hardware jobs stay on their queue
    ],
)
def test_training_device_routes_to_the_gpu_queue(device: str, quantum: dict | None, method: dict, queue: str):
    data = {**BASE, "method": method, "training": {"device": device}}
    if quantum is not None:
        data["quantum"] = quantum
    assert parse_spec(data).queue == queue
    assert "cpu" in error_at({**BASE, "training": {"device": "tpu"}}, "training.device")


def test_default_spec_gives_default_qaa_config() -> None:
    # The spec's defaults and QAAConfig's must agree: one adapter, whichever way it is described. Only the
    # budgets differ on purpose: the service refuses runaway jobs by default.
    assert spec().qaa_config() == QAAConfig(max_circuits=10_000_000, max_shots=10**9)


def test_qaa_config_carries_every_option() -> None:
    s = spec(
        method={
            "kind": "qaa",
            "target_modules": ["c_attn"],
            "qubits": 6,
            "layers": 3,
            "entangler": "linear",
            "readout": "expval+zz",
            "compress": "fixed",
            "alpha": 0.5,
        },
        quantum={
            "backend": "aer",
            "shots": 4096,
            "gradient": "spsa",
            "input_grad": "none",
            "embedding": "direct",
            "optimization_level": 3,
            "spsa_samples": 4,
            "device": "GPU",
            "aer_method": "statevector",
            "noise": "FakeManilaV2",
        },
        training={"seed": 7},
    )
    cfg = s.qaa_config()
    assert cfg == QAAConfig(
        target_modules=["c_attn"],
        qubits=6,
        layers=3,
        entangler="linear",
        readout="expval+zz",
        compress="fixed",
        alpha=0.5,
        backend="aer",
        gradient="spsa",
        seed=7,
        shots=4096,
        input_grad="none",
        embedding="direct",
        optimization_level=3,
        device="GPU",
        aer_method="statevector",
        noise="FakeManilaV2",
        spsa_samples=4,
        max_circuits=10_000_000,
        max_shots=10**9,
    )
    assert cfg.num_params(6) == 2 * 3 * 6 + 6

    ibm = spec(
        quantum={
            "backend": "ibm:ibm_torino",
            "ibm_mode": "session",
            "primitive_options": {"twirling": {"enable_gates": True}},
            "max_circuits": 5000,
            "max_shots": 10**6,
            "max_qpu_seconds": 120,
            "min_esp": 0.2,
            "job_timeout_s": 600,
            "mitigation": {"readout": "m3", "calibration_shots": 2000},
        }
    ).qaa_config()
    assert (ibm.max_qpu_seconds, ibm.min_esp, ibm.job_timeout_s) == (120, 0.2, 600)
    assert (ibm.mitigation.readout, ibm.mitigation.calibration_shots) == ("m3", 2000)
    assert (ibm.ibm_mode, ibm.primitive_options) == ("session", {"twirling": {"enable_gates": True}})
    assert (ibm.max_circuits, ibm.max_shots, ibm.gradient) == (5000, 10**6, "parameter-shift")
    # Every QAAConfig field can be set from a spec: a field added to QAAConfig fails here until the
    # spec offers it.
    assert cfg.model_fields_set | ibm.model_fields_set == set(QAAConfig.model_fields)


@pytest.mark.parametrize(
    ("backend", "option", "value"),
    [
        ("aer", "ibm_mode", "batch"),
        ("fake:FakeManilaV2", "ibm_mode", "session"),
        ("exact", "primitive_options", {}),
        ("aer", "primitive_options", {"twirling": {"enable_gates": True}}),
    ],
)
def test_runtime_options_only_where_they_apply(backend: str, option: str, value: object) -> None:
    assert "only" in error_at({**BASE, "quantum": {"backend": backend, option: value}}, f"quantum.{option}")


@pytest.mark.parametrize(
    ("options", "path", "words"),
    [
        ({"resilience_level": 2}, "quantum.primitive_options.resilience_level", "unknown key 'resilience_level'"),
        ({"environment": {"image": "evil:latest"}}, "quantum.primitive_options.environment", "unknown key"),
        ({"twirling": {"num_randomizations": 5000}}, "quantum.primitive_options.twirling.num_randomizations", "1024"),
        ({"execution": {"rep_delay": 1.0}}, "quantum.primitive_options.execution.rep_delay", "0.0005"),
        ({"max_execution_time": 10**6}, "quantum.primitive_options.max_execution_time", "10800"),
        (
            {"dynamical_decoupling": {"sequence_type": "ZZ"}},
            "quantum.primitive_options.dynamical_decoupling.sequence_type",
            "XY4",
        ),
    ],
)
def test_primitive_options_are_an_allowlist_with_bounded_values(options: dict, path: str, words: str) -> None:
    assert words in error_at({**BASE, "quantum": {"backend": "ibm:ibm_torino", "primitive_options": options}}, path)


def test_spec_and_store_import_no_heavy_libraries() -> None:
    code = (
        "import sys, service.spec, service.store, service.settings; "
        "heavy = [m for m in ('torch', 'transformers', 'qiskit') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
