"""The job spec: what users write in `job.yaml`, validated once here and nowhere else.

Every model forbids unknown keys, so a typo (`learning_rte`) is a 422 naming the field rather than a
silently ignored option. Bounds carry the bound in the message. `model` and `dataset` are checked for syntax
only: whether a model exists is known to the worker, which fails the job with a readable message if not.

This module must stay light: it imports `circuits.config` (pure pydantic), never torch, transformers or
qiskit.

Example:
    >>> spec = JobSpec.model_validate({"model": "builtin:tiny-llama", "dataset": "builtin:restaurants",
    ...                                "method": {"kind": "qaa"}})
    >>> spec.quantum.backend, spec.queue, spec.training.steps
    ('exact', 'cpu', 200)
    >>> spec.qaa_config().layers
    2
"""

from __future__ import annotations

import re
import typing
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from circuits.config import (
    EXECUTION_FIELDS,
    Gradient,
    Mitigation,
    QAAConfig,
    QAAShape,
    check_target_modules,
)

MAX_STEPS = 100_000
MAX_BATCH_SIZE = 512
MAX_LENGTH = 4096
MAX_NEW_TOKENS = 1024
MAX_EVAL_SAMPLES = 10_000
MAX_NAME_LENGTH = 200
MAX_REF_LENGTH = 1000

METHOD_KINDS = ("qaa", "lora", "prefix", "sora", "full")
#: What evaluation runs, part of what a job is (the trainer runs it, the estimate prices it): `eval_loss` is the
#: loss over the first 200 validation examples, in batches this many times `batch_size` (no activations are kept
#: for a backward pass); generation runs in batches of the same size.
EVAL_LOSS_EXAMPLES = 200
EVAL_BATCH_FACTOR = 4
Queue = Literal["cpu", "gpu", "qpu"]
Metric = Literal["bleu", "rouge", "bertscore"]
AerMethod = Literal[
    "automatic",
    "statevector",
    "density_matrix",
    "stabilizer",
    "extended_stabilizer",
    "matrix_product_state",
    "unitary",
    "superop",
    "tensor_network",
]

_BUILTIN = re.compile(r"builtin:[a-z0-9][a-z0-9._-]*")
_HF_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
_DATASET_ID = re.compile(r"ds_[0-9a-f]{8,64}")
_FAKE_BACKEND = re.compile(r"fake:Fake[A-Za-z0-9_]+")
_IBM_BACKEND = re.compile(r"ibm:[A-Za-z0-9][A-Za-z0-9_-]*")
_FAKE_NAME = re.compile(r"Fake[A-Za-z0-9_]+")


class _Strict(BaseModel):
    """Base of every spec model: unknown keys are errors, and a stored spec round-trips unchanged."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


def looks_like_path(ref: str) -> bool:
    """A reference written as a path (absolute, `./`, `../`, `~`); anything else is a name or an id."""
    return ref.startswith(("/", "./", "../", "~")) or ref in (".", "..")


def _check_ref_text(ref: str, what: str) -> None:
    if not ref:
        raise ValueError(f"{what} must not be empty")
    if len(ref) > MAX_REF_LENGTH:
        raise ValueError(f"{what} must be at most {MAX_REF_LENGTH} characters, got {len(ref)}")
    if not ref.isprintable():  # line breaks, tabs, NULs: never part of a model id or a sane path
        raise ValueError(f"{what} must not contain control characters or line breaks")
    if "://" in ref:
        raise ValueError(f"{what} must not be a URL, got {ref!r}")


def check_model_ref(ref: str) -> str:
    """`builtin:<name>`, a Hugging Face id (`org/name`, `name`), or a local path (`/..`, `./..`, `~/..`)."""
    _check_ref_text(ref, "model")
    if ref.startswith("builtin:"):
        if not _BUILTIN.fullmatch(ref):
            raise ValueError(f"builtin names are lowercase letters, digits, '.', '_' or '-', got {ref!r}")
        return ref
    if looks_like_path(ref) or _HF_ID.fullmatch(ref):
        return ref
    raise ValueError(
        f"model must be builtin:<name>, a Hugging Face id like 'org/name', or a path starting with "
        f"'/', './' or '~', got {ref!r}"
    )


def check_dataset_ref(ref: str) -> str:
    """`builtin:<name>`, `ds_<id>` from `POST /v1/datasets`, or a path (the client uploads local files)."""
    _check_ref_text(ref, "dataset")
    if ref.startswith("builtin:"):
        if not _BUILTIN.fullmatch(ref):
            raise ValueError(f"builtin names are lowercase letters, digits, '.', '_' or '-', got {ref!r}")
        return ref
    if ref.startswith("ds_"):
        if not _DATASET_ID.fullmatch(ref):
            raise ValueError(f"dataset ids look like ds_<hex> as returned by POST /v1/datasets, got {ref!r}")
        return ref
    if ":" in ref.split("/", 1)[0] and not looks_like_path(ref):
        raise ValueError(f"dataset must be builtin:<name>, ds_<id> or a path, got {ref!r}")
    return ref


def check_backend_name(name: str) -> str:
    """exact | aer | fake:Fake<Name> | ibm:<backend>."""
    if name in ("exact", "aer") or _FAKE_BACKEND.fullmatch(name) or _IBM_BACKEND.fullmatch(name):
        return name
    if name.startswith("fake:"):
        raise ValueError(f"fake backends are named like fake:FakeManilaV2, got {name!r}")
    raise ValueError(f"backend must be exact, aer, fake:<FakeBackend> or ibm:<backend>, got {name!r}")


# --- method ------------------------------------------------------------------------------------------------


TargetModules = Annotated[
    list[str] | str,
    AfterValidator(check_target_modules),
    Field(description="Module-name suffixes, or one regex (RE2 syntax) matched against the full name (as in PEFT)."),
]


class QAAMethod(QAAShape):
    """QAA adapters. The fields, defaults and validators are `circuits.config.QAAShape`'s: the same model QAA's
    PEFT config is generated from, so the spec's method block is the adapter's config."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    kind: Literal["qaa"] = Field("qaa", description="qaa")


class LoRAMethod(_Strict):
    """PEFT LoRA baseline."""

    kind: Literal["lora"] = Field(description="lora")
    r: int = Field(8, ge=1, le=1024, description="Rank of the update B A.")
    lora_alpha: float = Field(
        16.0, gt=0, le=1e6, allow_inf_nan=False, description="Scale: the update is alpha / r B A x."
    )
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: TargetModules = Field(default_factory=lambda: ["q_proj", "v_proj"])


class PrefixMethod(_Strict):
    """PEFT prefix tuning baseline."""

    kind: Literal["prefix"] = Field(description="prefix")
    num_virtual_tokens: int = Field(20, ge=1, le=512, description="Trained key/value vectors put before every layer.")


class SoRAMethod(_Strict):
    """SoRA: LoRA with a sparse, L1-regularised gate whose strength is `sparse_lambda`."""

    kind: Literal["sora"] = Field(description="sora")
    r: int = Field(8, ge=1, le=1024, description="Largest rank; the gate's L1 step zeroes ranks while training.")
    lora_alpha: float = Field(16.0, gt=0, le=1e6, allow_inf_nan=False, description="Scale, as LoRA's.")
    sparse_lambda: float = Field(
        1e-3, ge=0, le=1e3, allow_inf_nan=False, description="Strength of the gate's L1 penalty (proximal step)."
    )
    target_modules: TargetModules = Field(default_factory=lambda: ["q_proj", "v_proj"])


class FullMethod(_Strict):
    """Full fine-tuning: every weight trains; no options."""

    kind: Literal["full"] = Field(description="full")


Method = Annotated[
    QAAMethod | LoRAMethod | PrefixMethod | SoRAMethod | FullMethod,
    Field(discriminator="kind"),
]


# --- quantum -----------------------------------------------------------------------------------------------


class DynamicalDecouplingOptions(_Strict):
    """qiskit-ibm-runtime's dynamical decoupling: pulse sequences in the idle windows of each qubit."""

    enable: bool = Field(False, description="Pad idle windows with the sequence.")
    sequence_type: Literal["XX", "XpXm", "XY4"] = Field("XX", description="The pulse sequence.")
    extra_slack_distribution: Literal["middle", "edges"] = Field("middle", description="Where leftover time goes.")
    scheduling_method: Literal["alap", "asap"] = Field("alap", description="How the circuit is scheduled first.")
    skip_reset_qubits: bool = Field(False, description="No pulses on qubits just reset.")


class TwirlingOptions(_Strict):
    """qiskit-ibm-runtime's Pauli twirling of gates and measurements (each randomization is another circuit)."""

    enable_gates: bool | None = Field(None, description="Twirl the 2-qubit gates.")
    enable_measure: bool | None = Field(None, description="Twirl the measurements (TREX).")
    group: Literal["pauli", "balanced_pauli", "local_c1", "local_pauli"] = Field(
        "pauli", description="The twirling group."
    )
    num_randomizations: Literal["auto"] | int = Field("auto", description="Randomized circuits per parameter set.")
    shots_per_randomization: Literal["auto"] | int = Field("auto", description="Shots of each randomized circuit.")
    strategy: Literal["active", "active-accum", "active-circuit", "all"] = Field(
        "active-accum", description="Which qubits are twirled in each layer."
    )

    @field_validator("num_randomizations", "shots_per_randomization", mode="before")
    @classmethod
    def _auto_or_bounded(cls, v: Any, info: ValidationInfo) -> Any:
        top = 1024 if info.field_name == "num_randomizations" else 1_000_000
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= top):
            return v
        raise ValueError(f"{info.field_name} must be 'auto' or an integer between 1 and {top}, got {v!r}")


class ExecutionOptions(_Strict):
    """What the device does between shots; `rep_delay` bounded by IBM devices' own range (up to 500 us)."""

    init_qubits: bool = Field(True, description="Reset the qubits before each shot.")
    rep_delay: float | None = Field(
        None, ge=0, le=5e-4, allow_inf_nan=False, description="Seconds between shots; the device's default if null."
    )


class PrimitiveOptions(_Strict):
    """The runtime Sampler options a spec may set (an allowlist with bounded values: anything else is a 422)."""

    dynamical_decoupling: DynamicalDecouplingOptions | None = Field(None, description="Dynamical decoupling.")
    twirling: TwirlingOptions | None = Field(None, description="Pauli twirling of gates and measurements.")
    execution: ExecutionOptions | None = Field(None, description="What the device does between shots.")
    max_execution_time: int | None = Field(None, ge=1, le=10_800, description="Seconds of QPU time per runtime job.")


class QuantumOptions(_Strict):
    """Where and how the QAA circuits run (only with `method.kind: qaa`).

    `gradient` defaults to `exact` on the exact engine and `parameter-shift` on circuit backends, so a spec
    that only names a backend is valid. Aer options (`device`, `method`, `noise`) are errors on other
    backends rather than silently ignored.
    """

    backend: str = Field("exact", description="exact | aer | fake:<FakeBackend> | ibm:<backend>.")
    shots: int | None = Field(
        None, ge=1, le=1_000_000, description="Shots per circuit; null = exact expectations where the backend allows."
    )
    gradient: Gradient | None = Field(
        None,
        validate_default=True,
        description="exact (exact backend only) | parameter-shift | spsa; by backend when unset.",
    )
    input_grad: Literal["shift", "none"] = Field(
        "shift", description="Gradients into the layer input by parameter-shift, or none (a frozen input)."
    )
    embedding: Literal["gates", "direct"] = Field(
        "gates", description="gates: the preparation circuit; direct (simulators): the ideal state."
    )
    optimization_level: int = Field(1, ge=0, le=3, description="Qiskit transpiler optimization level.")
    spsa_samples: int = Field(1, ge=1, le=100, description="spsa: perturbations averaged per step.")
    max_circuits: int = Field(10_000_000, ge=1, le=10**12, description="Budget; the job is refused above it.")
    max_shots: int = Field(10**9, ge=1, le=10**15, description="Budget; the job is refused above it.")
    max_qpu_seconds: float | None = Field(
        None, gt=0, le=10**7, allow_inf_nan=False, description="fake:/ibm: budget on the estimated QPU seconds."
    )
    min_esp: float | None = Field(
        None, gt=0, le=1, allow_inf_nan=False, description="fake:/ibm: refuse the job if a circuit's ESP is lower."
    )
    job_timeout_s: float | None = Field(
        None, gt=0, le=86_400, allow_inf_nan=False, description="fake:/ibm: cancel a runtime job running longer."
    )
    ibm_mode: Literal["batch", "session", "job"] | None = Field(
        None, description="ibm: only; how runtime jobs are grouped (batch when unset)."
    )
    primitive_options: PrimitiveOptions | None = Field(
        None,
        description="fake:/ibm: only; runtime primitive options (twirling, dynamical decoupling, execution): the "
        "Sampler's, or the Estimator's when quantum.mitigation runs it.",
    )
    mitigation: Mitigation | None = Field(
        None,
        description="fake:/ibm: only; error mitigation: readout (m3 | trex), twirling, zne, dynamical decoupling, "
        "priced in the estimate.",
    )
    device: Literal["CPU", "GPU"] | None = Field(None, description="Aer only; CPU when unset.")
    aer_method: AerMethod | None = Field(
        None,
        validation_alias=AliasChoices("aer_method", "method"),  # `method` in specs written before the rename
        description="Aer only: the simulation method; chosen by cost when unset.",
    )
    noise: str | None = Field(None, description="Aer only: a fake IBM backend whose noise model Aer applies.")

    @field_validator("backend")
    @classmethod
    def _backend_syntax(cls, v: str) -> str:
        return check_backend_name(v)

    @field_validator("shots")
    @classmethod
    def _shots_need_circuits(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and info.data.get("backend") == "exact":
            raise ValueError("shots needs a circuit backend (aer, fake:, ibm:); 'exact' has no shot noise")
        return v

    @field_validator("gradient")
    @classmethod
    def _gradient_fits_backend(cls, v: Gradient | None, info: ValidationInfo) -> Gradient | None:
        backend = info.data.get("backend")
        if backend is None:  # the backend itself was invalid; that error is enough
            return v
        if v is None:
            return "exact" if backend == "exact" else "parameter-shift"
        if v == "exact" and backend != "exact":
            raise ValueError(f"gradient 'exact' needs backend 'exact'; {backend!r} takes 'parameter-shift' or 'spsa'")
        return v

    @field_validator("embedding")
    @classmethod
    def _direct_needs_simulator(cls, v: str, info: ValidationInfo) -> str:
        backend = info.data.get("backend") or ""
        if v == "direct" and backend.startswith(("fake:", "ibm:")):
            raise ValueError(
                f"embedding 'direct' sets an ideal state and exists only on exact and aer; "
                f"backend {backend!r} needs embedding 'gates'"
            )
        return v

    @field_validator("ibm_mode")
    @classmethod
    def _ibm_only(cls, v: str | None, info: ValidationInfo) -> str | None:
        backend = info.data.get("backend")
        if v is not None and backend is not None and not backend.startswith("ibm:"):
            raise ValueError(f"ibm_mode applies to ibm: backends only, not {backend!r}")
        return v

    @field_validator("primitive_options")
    @classmethod
    def _runtime_only(cls, v: PrimitiveOptions | None, info: ValidationInfo) -> PrimitiveOptions | None:
        backend = info.data.get("backend")
        if v is not None and backend is not None and not backend.startswith(("fake:", "ibm:")):
            raise ValueError(f"primitive_options apply to fake: and ibm: backends only, not {backend!r}")
        return v

    @field_validator("mitigation")
    @classmethod
    def _mitigation_alone(cls, v: Mitigation | None, info: ValidationInfo) -> Mitigation | None:
        options = info.data.get("primitive_options")
        if v is not None and (v.twirling or v.estimator) and options is not None and options.twirling is not None:
            raise ValueError(
                "this mitigation sets the twirling options itself: set twirling in quantum.mitigation, "
                "not both there and in primitive_options.twirling"
            )
        if v is not None and v.dynamical_decoupling != "none" and options and options.dynamical_decoupling:
            raise ValueError(
                "dynamical decoupling is set in quantum.mitigation: not both there and in "
                "primitive_options.dynamical_decoupling"
            )
        return v

    @field_validator("max_qpu_seconds", "min_esp", "job_timeout_s", "mitigation")
    @classmethod
    def _device_only(cls, v: Any, info: ValidationInfo) -> Any:
        backend = info.data.get("backend")
        if v is not None and backend is not None and not backend.startswith(("fake:", "ibm:")):
            raise ValueError(f"{info.field_name} applies to fake: and ibm: backends only, not {backend!r}")
        return v

    @field_validator("device", "aer_method", "noise")
    @classmethod
    def _aer_only(cls, v: Any, info: ValidationInfo) -> Any:
        backend = info.data.get("backend")
        if v is not None and backend is not None and backend != "aer":
            raise ValueError(f"{info.field_name} applies to backend 'aer' only, not {backend!r}")
        return v

    @field_validator("noise")
    @classmethod
    def _noise_names_fake_backend(cls, v: str | None) -> str | None:
        if v is not None and not _FAKE_NAME.fullmatch(v):
            raise ValueError(f"noise names a fake IBM backend like FakeManilaV2, got {v!r}")
        return v


# --- training and evaluation -------------------------------------------------------------------------------


class TrainingOptions(_Strict):
    """The optimisation loop. `eval_every` and `checkpoint_every` of 0 mean "only at the end"."""

    steps: int = Field(200, ge=1, le=MAX_STEPS, description="Optimizer steps.")
    batch_size: int = Field(8, ge=1, le=MAX_BATCH_SIZE, description="Examples per step.")
    max_length: int = Field(
        64,
        ge=8,
        le=MAX_LENGTH,
        description="Tokens per example, prompt and completion (the prompt's start is cut first).",
    )
    learning_rate: float = Field(
        2e-3, gt=0, le=1.0, allow_inf_nan=False, description="AdamW's peak rate (cosine decay to zero after warmup)."
    )
    seed: int = Field(
        0, ge=0, le=2**32 - 1, description="Seeds the data order, dropout and the adapter's initial weights."
    )
    eval_every: int = Field(
        50,
        ge=0,
        le=MAX_STEPS,
        description="Steps between eval-loss passes over the validation split; 0 = at the end only.",
    )
    checkpoint_every: int = Field(
        25, ge=0, le=MAX_STEPS, description="Steps between checkpoints a stopped job resumes from; 0 = none."
    )
    warmup_steps: int = Field(0, ge=0, le=MAX_STEPS, description="Linear warmup of the learning rate.")
    weight_decay: float = Field(0.0, ge=0, le=1.0, allow_inf_nan=False, description="AdamW weight decay.")
    grad_clip: float | None = Field(
        1.0, gt=0, le=1e6, allow_inf_nan=False, description="Gradient-norm clip; null = no clipping."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="Where the model (and the exact engine) trains: `cuda` goes to the gpu queue and needs a GPU "
        "worker; `auto` uses CUDA on a worker that has it.",
    )
    report_to: list[Literal["tensorboard", "mlflow"]] = Field(
        default_factory=list,
        description="Export the job's metrics, offline, into its artifacts: TensorBoard event files (tensorboard/), "
        "an MLflow run (mlflow/mlflow.db).",
    )

    @field_validator("report_to")
    @classmethod
    def _unique_trackers(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(v))

    @field_validator("warmup_steps")
    @classmethod
    def _warmup_within_steps(cls, v: int, info: ValidationInfo) -> int:
        steps = info.data.get("steps")
        if steps is not None and v > steps:
            raise ValueError(f"warmup_steps must be at most training.steps ({steps}), got {v}")
        return v


class EvaluationOptions(_Strict):
    """Generation-based evaluation after training; `samples: 0` skips it."""

    metrics: list[Metric] = Field(
        default_factory=lambda: ["bleu", "rouge", "bertscore"],
        description="Scores of the generations against every reference of their prompt: bleu, rouge, bertscore.",
    )
    max_new_tokens: int = Field(48, ge=1, le=MAX_NEW_TOKENS, description="Greedy tokens generated per test prompt.")
    samples: int = Field(
        100, ge=0, le=MAX_EVAL_SAMPLES, description="Test prompts generated and scored after training; 0 = none."
    )

    @field_validator("metrics")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(v))


# --- the job -----------------------------------------------------------------------------------------------


JOB_ID = r"^job_[0-9a-f]{8,64}$"


class JobSpec(_Strict):
    """A job as submitted: the single source of truth for what a worker runs.

    `kind: train` (the default) fine-tunes, from scratch or from a succeeded job's QAA adapter (`init_from`).
    `kind: evaluate` trains nothing: it loads a succeeded job's QAA adapter (`adapter_from`), runs `evaluation.
    samples` test examples through it on the exact engine and on `quantum.backend` (with its mitigation) and
    reports the hardware gap. Its `model`, `dataset` and `method` are the source job's (`qaa-client evaluate`
    copies them).
    """

    name: str | None = Field(None, max_length=MAX_NAME_LENGTH, description="Optional label.")
    kind: Literal["train", "evaluate"] = Field("train", description="train, or evaluate a trained adapter.")
    model: str = Field(
        description="builtin:<name>, a Hugging Face id the server offers, or a path inside a folder it allows.",
        json_schema_extra={"pattern": r"^(builtin:[a-z0-9][a-z0-9._-]*|[A-Za-z0-9][A-Za-z0-9._/-]*|/.+)$"},
    )
    dataset: str = Field(
        description="builtin:<name>, ds_<id> from POST /v1/datasets, or a path inside a folder the server allows.",
        json_schema_extra={"pattern": r"^(builtin:[a-z0-9][a-z0-9._-]*|ds_[0-9a-f]{8,64}|/.+)$"},
    )
    method: Method = Field(
        default_factory=QAAMethod, description="The adaptation method (`kind`) and its options; QAA by default."
    )
    quantum: QuantumOptions | None = Field(None, validate_default=True, description="Only for kind qaa.")
    training: TrainingOptions = Field(default_factory=TrainingOptions, description="The training loop.")
    evaluation: EvaluationOptions = Field(
        default_factory=EvaluationOptions, description="Generation and scoring after training."
    )
    adapter_from: str | None = Field(
        None,
        pattern=JOB_ID,
        validate_default=True,
        description="kind evaluate: the succeeded QAA job whose adapter is evaluated.",
    )
    init_from: str | None = Field(
        None,
        pattern=JOB_ID,
        description="kind train, QAA: start from this succeeded job's adapter (e.g. trained on exact, then "
        "fine-tuned a few steps on a noisy backend).",
    )

    @field_validator("model")
    @classmethod
    def _model_syntax(cls, v: str) -> str:
        return check_model_ref(v)

    @field_validator("name")
    @classmethod
    def _printable_name(cls, v: str | None) -> str | None:
        if v is not None and not v.isprintable():  # a label shown in tables and logs: no NULs or line breaks
            raise ValueError("name must not contain control characters or line breaks")
        return v

    @field_validator("dataset")
    @classmethod
    def _dataset_syntax(cls, v: str) -> str:
        return check_dataset_ref(v)

    @field_validator("quantum")
    @classmethod
    def _quantum_only_for_qaa(cls, v: QuantumOptions | None, info: ValidationInfo) -> QuantumOptions | None:
        method = info.data.get("method")
        if method is None:  # method itself was invalid
            return v
        if method.kind != "qaa":
            if v is not None:
                raise ValueError(f"quantum applies to method.kind 'qaa' only, not {method.kind!r}; remove it")
            return None
        return v if v is not None else QuantumOptions()

    @field_validator("adapter_from")
    @classmethod
    def _evaluate_loads_an_adapter(cls, v: str | None, info: ValidationInfo) -> str | None:
        kind = info.data.get("kind")
        if kind == "evaluate" and v is None:
            raise ValueError("kind evaluate needs adapter_from: the id of a succeeded QAA job")
        if kind == "train" and v is not None:
            raise ValueError("adapter_from applies to kind evaluate; to start training from a job, use init_from")
        return _loads_qaa(v, info)

    @field_validator("init_from")
    @classmethod
    def _init_from_trains(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None and info.data.get("kind") == "evaluate":
            raise ValueError("init_from applies to kind train; kind evaluate loads adapter_from")
        return _loads_qaa(v, info)

    @property
    def source_job(self) -> str | None:
        """The job whose adapter this one loads (`adapter_from` or `init_from`)."""
        return self.adapter_from or self.init_from

    @property
    def queue(self) -> Queue:
        """The Celery queue: `qpu` for IBM hardware, `gpu` for training on CUDA or Aer on GPU, `cpu` otherwise."""
        q = self.quantum
        if q is not None and q.backend.startswith("ibm:"):
            return "qpu"
        if self.training.device == "cuda" or (q is not None and q.backend == "aer" and q.device == "GPU"):
            return "gpu"
        return "cpu"

    def qaa_config(self) -> QAAConfig:
        """The `QAAConfig` a worker builds adapters from; ValueError for non-QAA methods."""
        if not isinstance(self.method, QAAMethod) or self.quantum is None:
            raise ValueError(f"method.kind {self.method.kind!r} has no QAA config")
        return to_qaa_config(self.method, self.quantum, seed=self.training.seed)


def _loads_qaa(v: str | None, info: ValidationInfo) -> str | None:
    method = info.data.get("method")
    if v is not None and method is not None and method.kind != "qaa":
        raise ValueError(f"{info.field_name} loads a QAA adapter; method.kind is {method.kind!r}")
    return v


def to_qaa_config(method: QAAMethod, quantum: QuantumOptions, *, seed: int = 0) -> QAAConfig:
    """The adapter's shape (`method`, a `QAAShape`) and the execution path (`quantum`) as one `QAAConfig`; what the
    spec leaves unset takes QAAConfig's defaults."""
    execution = quantum.model_dump(include=set(EXECUTION_FIELDS), exclude_none=True)
    if quantum.primitive_options is not None:  # what the user set, not every sub-option's default
        execution["primitive_options"] = quantum.primitive_options.model_dump(exclude_unset=True)
    return QAAConfig(**method.model_dump(include=set(QAAShape.model_fields)), **execution, seed=seed)


def parse_spec(data: Any) -> JobSpec:
    """Validate a decoded YAML/JSON document; raises `pydantic.ValidationError`."""
    return JobSpec.model_validate(data)


def _unknown_key(loc: tuple[int | str, ...]) -> str | None:
    """'unknown key ...' with the nearest allowed key and the allowed keys of the block at `loc[:-1]`."""
    import difflib

    model = _model_at(loc[:-1])
    if model is None or not isinstance(loc[-1], str):
        return None
    allowed = list(model.model_fields)
    near = difflib.get_close_matches(loc[-1], allowed, n=1, cutoff=0.6)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    return f"unknown key {loc[-1]!r}{hint} Allowed here: {', '.join(allowed)}"


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation can hold (through Optional, unions and Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The spec model of the block at a pydantic error location (a tagged union's tag picks its member)."""
    model: type[BaseModel] = JobSpec
    parts = list(loc)
    while parts:
        field = model.model_fields.get(parts.pop(0)) if isinstance(parts[0], str) else None
        candidates = _models_in(field.annotation) if field is not None else []
        if len(candidates) > 1 and parts:  # `method`: the next part is the member's `kind`
            tag = parts.pop(0)
            candidates = [m for m in candidates if "kind" in m.model_fields
                          and tag in typing.get_args(m.model_fields["kind"].annotation)]  # fmt: skip
        if len(candidates) != 1:
            return None
        model = candidates[0]
    return model


def error_path(loc: tuple[int | str, ...]) -> str:
    """`('method', 'qaa', 'qubits')` -> `method.qubits`: drop pydantic's union tag, index lists as `[i]`."""
    parts: list[str] = []
    for i, item in enumerate(loc):
        if i == 1 and loc[0] == "method" and item in METHOD_KINDS:
            continue
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts)


def validation_errors(exc: ValidationError) -> list[dict[str, str]]:
    """The errors of a failed `parse_spec` as `{"path", "message", "type"}`, ready for a 422 body."""
    out = []
    for err in exc.errors(include_url=False):
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        elif err["type"] == "union_tag_not_found":  # pydantic's wording hides which key is missing
            msg = f"'kind' is required: one of {', '.join(METHOD_KINDS)}"
        elif err["type"] == "extra_forbidden":
            msg = _unknown_key(tuple(err["loc"])) or msg
        out.append({"path": error_path(tuple(err["loc"])), "message": msg, "type": err["type"]})
    return out
