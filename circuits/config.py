"""`QAAConfig`: the one typed description of a QAA adapter, shared by every engine and backend.

Kept free of torch and qiskit so that the API process can validate specs and estimate costs without them.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Literal

import re2
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Entangler = Literal["ring", "linear", "none"]
Readout = Literal["expval", "expval+zz", "probs"]
Compress = Literal["none", "fixed", "learned"]
Gradient = Literal["exact", "parameter-shift", "spsa"]

#: Shots per circuit on `fake:` and `ibm:` when `shots` is null: those backends only sample.
DEFAULT_SAMPLER_SHOTS = 4096

#: Largest register the exact engine accepts: a 2^16-amplitude state per token is 512 KiB in complex64.
MAX_EXACT_QUBITS = 16
#: Bounds on `target_modules`: a regex's length, a list's length and each name's.
MAX_TARGET_PATTERN = 256
MAX_TARGET_NAMES = 256
MAX_TARGET_NAME = 200


#: The fields that say where and how circuits run, not what an adapter is: a run sets them (`circuits.execution`),
#: a saved adapter leaves them out.
EXECUTION_FIELDS = (
    "backend",
    "gradient",
    "seed",
    "shots",
    "input_grad",
    "embedding",
    "optimization_level",
    "device",
    "aer_method",
    "noise",
    "spsa_samples",
    "ibm_mode",
    "primitive_options",
    "mitigation",
    "job_timeout_s",
    "max_circuits",
    "max_shots",
    "max_qpu_seconds",
    "min_esp",
)


Extrapolator = Literal["exponential", "linear", "double_exponential", "polynomial_degree_2", "fallback"]


class ZNE(BaseModel):
    """Zero-noise extrapolation by 2-qubit gate folding (qiskit-ibm-runtime's client-side Estimator): every circuit
    runs once per noise factor, and the expectations are extrapolated to zero noise."""

    model_config = ConfigDict(extra="forbid")

    noise_factors: list[float] = Field(
        default_factory=lambda: [1.0, 3.0, 5.0],
        min_length=2,
        max_length=8,
        description="Noise amplification factors (each >= 1, at least two); each one multiplies circuits and shots.",
    )
    extrapolator: Extrapolator | list[Extrapolator] = Field(
        default_factory=lambda: ["exponential", "linear"],
        description="Fit(s) to zero noise, tried in order (the runtime's ZneOptions.extrapolator).",
    )

    @field_validator("noise_factors")
    @classmethod
    def _factors_amplify(cls, v: list[float]) -> list[float]:
        if any(not (1 <= f <= 9) for f in v) or len(set(v)) != len(v):
            raise ValueError(f"noise_factors are distinct values between 1 and 9, got {v}")
        return v


class Mitigation(BaseModel):
    """Error mitigation on `fake:` and `ibm:` backends, by the field's implementations.

    `readout: m3` corrects each circuit's counts with mthree (calibrated once per run and qubit set) and keeps the
    Sampler; `readout: trex`, `twirling` and `zne` run the circuits through qiskit-ibm-runtime's executor-based
    Estimator, which twirls, folds and post-processes on the client, so the same lines act on a fake backend
    locally and on a device. M3 and the Estimator's options do not combine (M3 corrects counts the Estimator
    never returns): pair `zne` with `readout: trex`. `dynamical_decoupling` pads each qubit's idle windows with
    the named pulse sequence, by the primitives' own client-side pass, with either primitive.
    """

    model_config = ConfigDict(extra="forbid")

    readout: Literal["none", "m3", "trex"] = Field(
        "none", description="Readout-error mitigation: none, m3 (mthree on the counts) or trex (twirled readout)."
    )
    twirling: bool = Field(False, description="Pauli-twirl the 2-qubit gates (each randomization is a circuit).")
    randomizations: Literal["auto"] | int = Field(
        "auto",
        description="Twirling randomizations per parameter set; auto = the runtime's rule (shots / max(64, shots/32)).",
    )
    zne: ZNE | None = Field(None, description="Zero-noise extrapolation; null for none.")
    dynamical_decoupling: Literal["none", "XX", "XpXm", "XY4"] = Field(
        "none", description="Dynamical decoupling: the pulse sequence put in each qubit's idle windows, or none."
    )
    calibration_shots: int = Field(
        4096, ge=64, le=100_000, description="m3: shots of the readout calibration (balanced, once per qubit set)."
    )

    @field_validator("randomizations")
    @classmethod
    def _randomizations_bounded(cls, v: Literal["auto"] | int) -> Literal["auto"] | int:
        if v != "auto" and not 1 <= v <= 1024:
            raise ValueError(f"randomizations must be 'auto' or between 1 and 1024, got {v}")
        return v

    @model_validator(mode="after")
    def _one_primitive(self) -> Mitigation:
        if self.readout == "m3" and self.zne is not None:
            raise ValueError(
                "readout m3 corrects a Sampler's counts and zne runs in the Estimator: use readout trex with zne"
            )
        return self

    @property
    def estimator(self) -> bool:
        """Whether circuits run through the executor-based Estimator (else the Sampler)."""
        return self.readout == "trex" or self.zne is not None or (self.twirling and self.readout != "m3")

    @property
    def active(self) -> bool:
        return self.readout != "none" or self.twirling or self.zne is not None or self.dynamical_decoupling != "none"


class QAAShape(BaseModel):
    """What a QAA adapter is: the shape and meaning of its weights, not where its circuits run.

    One model, used as the job spec's `method` block (`service.spec.QAAMethod`), as QAA's PEFT config
    (`circuits.tuner.QAAPeftConfig`, whose fields are generated from these) and as the first half of
    `QAAConfig`: one set of fields, defaults, bounds and error messages.
    """

    model_config = ConfigDict(extra="forbid")

    target_modules: list[str] | str = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        description="Module-name suffixes, or one regex (RE2 syntax) matched against the full name (as in PEFT).",
    )
    qubits: Literal["auto"] | int = Field(
        "auto", description=f"Register size n: ceil(log2 d_in) with `auto`, or 1..{MAX_EXACT_QUBITS}."
    )
    layers: int = Field(2, ge=1, le=32, description="Ansatz layers L (each: RY and RZ on every qubit, then CNOTs).")
    entangler: Entangler = Field("ring", description="CNOT pattern of each layer: ring, linear or none.")
    readout: Readout = Field(
        "expval", description="What is measured: <Z_i> (n values), plus <Z_i Z_i+1> (expval+zz), or all 2^n probs."
    )
    compress: Compress = Field(
        "none",
        description="How d_in maps onto 2^n amplitudes when 2^n < d_in: a fixed orthonormal map or a learned one.",
    )
    alpha: float = Field(1.0, gt=0, le=1e6, allow_inf_nan=False, description="Fixed scale of the adapter's update.")

    @field_validator("qubits", mode="before")
    @classmethod
    def _qubits_auto_or_bounded(cls, v: Any) -> Any:
        # One readable message instead of pydantic's two-branch union error.
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_EXACT_QUBITS):
            return v
        raise ValueError(f"qubits must be 'auto' or an integer between 1 and {MAX_EXACT_QUBITS}, got {v!r}")

    @field_validator("target_modules")
    @classmethod
    def _targets_valid(cls, v: list[str] | str) -> list[str] | str:
        return check_target_modules(v)


class QAAConfig(QAAShape):
    """An adapter's shape (`QAAShape`) and where and how its circuits run: what engines and runners take.

    The execution fields (`EXECUTION_FIELDS`) belong to a run (`circuits.execution`), never to a saved adapter.

    Example:
        >>> cfg = QAAConfig(target_modules=["q_proj", "v_proj"], layers=2)
        >>> cfg.num_qubits(576)
        10
        >>> cfg.num_params(10)
        50
    """

    backend: str = Field("exact", description="exact | aer | fake:<FakeBackend> | ibm:<backend>.")
    gradient: Gradient = "exact"
    seed: int = Field(0, ge=0, description="Seeds theta's initialisation and the fixed compression matrix.")

    # Circuit-backend options (ignored by `exact`).
    shots: int | None = Field(None, ge=1, le=1_000_000, description="None = exact expectations where allowed.")
    input_grad: Literal["shift", "none"] = Field(
        "shift",
        description="Input gradients through the data angles by parameter-shift, or none (frozen input).",
    )
    embedding: Literal["gates", "direct"] = Field(
        "gates",
        description="`gates` runs the preparation circuit; `direct` (simulators) sets the ideal state.",
    )
    optimization_level: int = Field(1, ge=0, le=3)
    device: Literal["CPU", "GPU"] = "CPU"
    aer_method: str | None = Field(None, description="Aer simulation method; chosen by cost when unset.")
    noise: str | None = Field(None, description="Name of a fake IBM backend whose noise model Aer applies.")
    spsa_samples: int = Field(1, ge=1, le=100)
    ibm_mode: Literal["batch", "session", "job"] = Field(
        "batch", description="How `ibm:` jobs are grouped: a runtime Batch, a Session, or plain jobs."
    )
    primitive_options: dict = Field(
        default_factory=dict,
        description="Passed through to the runtime Sampler options on `fake:`/`ibm:` (dynamical decoupling, "
        "twirling, ...), e.g. {'twirling': {'enable_gates': True}}.",
    )
    mitigation: Mitigation | None = Field(None, description="fake:/ibm: error mitigation (see `Mitigation`).")
    job_timeout_s: float | None = Field(
        3600, gt=0, description="fake:/ibm: a runtime job still running after this long is cancelled."
    )
    max_circuits: int | None = Field(None, ge=1, description="Budget: a job estimated above it is refused up front.")
    max_shots: int | None = Field(None, ge=1, description="Budget on total shots, checked like max_circuits.")
    max_qpu_seconds: float | None = Field(None, gt=0, description="Budget on the estimated QPU seconds (high end).")
    min_esp: float | None = Field(None, gt=0, le=1, description="Refuse a run whose circuits' ESP is lower.")

    @model_validator(mode="after")
    def _gradient_fits_backend(self) -> QAAConfig:
        if self.gradient == "exact" and self.backend != "exact":
            raise ValueError(
                f"gradient 'exact' needs backend 'exact'; backend {self.backend!r} takes 'parameter-shift' or 'spsa'"
            )
        return self

    @model_validator(mode="after")
    def _embedding_fits_backend(self) -> QAAConfig:
        if self.embedding == "direct" and self.backend.startswith(("fake:", "ibm:")):
            raise ValueError(
                f"embedding 'direct' sets an ideal state and exists only on simulators (exact, aer); "
                f"backend {self.backend!r} needs embedding 'gates'"
            )
        return self

    @model_validator(mode="after")
    def _mitigation_needs_device(self) -> QAAConfig:
        if self.mitigation is not None and self.mitigation.active and not self.backend.startswith(("fake:", "ibm:")):
            raise ValueError(f"mitigation applies to fake: and ibm: backends only, not {self.backend!r}")
        return self

    def effective_shots(self) -> int | None:
        """Shots per circuit: `shots`, or on sampling-only backends (`fake:`, `ibm:`) the default."""
        if self.shots is None and self.backend.startswith(("fake:", "ibm:")):
            return DEFAULT_SAMPLER_SHOTS
        return self.shots

    def num_qubits(self, d_in: int) -> int:
        """Register size for an input of width `d_in`, with the bounds checked."""
        if d_in < 1:
            raise ValueError(f"input width must be positive, got {d_in}")
        auto = max(1, math.ceil(math.log2(d_in)))
        n = auto if self.qubits == "auto" else self.qubits
        if n > MAX_EXACT_QUBITS:
            raise ValueError(
                f"d_in={d_in} needs {n} qubits, more than the {MAX_EXACT_QUBITS} allowed; "
                f"set qubits <= {MAX_EXACT_QUBITS} with compress: fixed or learned"
            )
        if 2**n < d_in and self.compress == "none":
            raise ValueError(
                f"{n} qubits hold {2**n} amplitudes but d_in={d_in}; set compress: fixed or learned, or qubits: auto"
            )
        return n

    def num_params(self, n: int) -> int:
        """P = 2Ln + n trainable angles."""
        return 2 * self.layers * n + n

    def num_outputs(self, n: int) -> int:
        """k, the readout width."""
        if self.readout == "expval":
            return n
        if self.readout == "expval+zz":
            return n + len(zz_pairs(n))
        return 2**n


def check_target_modules(targets: list[str] | str) -> list[str] | str:
    """Validate `target_modules` (ValueError with the bound or the regex error): a non-empty list of names, or
    one regex in RE2 syntax, which matches in time linear in the name, so no pattern can stall whoever
    matches it (the API pricing a spec, a worker injecting adapters)."""
    if isinstance(targets, str):
        if not targets:
            raise ValueError("target_modules must name at least one module")
        if len(targets) > MAX_TARGET_PATTERN:
            raise ValueError(f"a target_modules regex is at most {MAX_TARGET_PATTERN} characters, got {len(targets)}")
        try:
            _compiled(targets)
        except re2.error as exc:
            reason = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
            raise ValueError(
                f"target_modules is not a valid regex ({reason}); RE2 syntax, without backreferences or "
                "lookaround, or give a list of module-name suffixes"
            ) from None
        return targets
    if not targets or not all(targets):
        raise ValueError("target_modules must name at least one module, and no name may be empty")
    if len(targets) > MAX_TARGET_NAMES:
        raise ValueError(f"target_modules lists at most {MAX_TARGET_NAMES} names, got {len(targets)}")
    if any(len(t) > MAX_TARGET_NAME for t in targets):
        raise ValueError(f"each target_modules name is at most {MAX_TARGET_NAME} characters")
    return targets


_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # an invalid pattern is the caller's 422, not a line in the server log


@lru_cache(maxsize=256)
def _compiled(pattern: str):
    return re2.compile(pattern, _RE2_OPTIONS)


def matches_target(name: str, targets: list[str] | str) -> bool:
    """PEFT's rule: a list matches a full module name or its dotted suffix; a string is a regex over the full name
    (matched by RE2: linear time)."""
    if isinstance(targets, str):
        return _compiled(targets).fullmatch(name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def resolve_targets(names: list[str], targets: list[str] | str) -> list[str]:
    """The module names (of `names`) that `targets` matches, as an explicit list: what to hand a library (PEFT)
    whose own matcher would run a user's regex with Python's backtracking engine."""
    return [name for name in names if name and matches_target(name, targets)]


def zz_pairs(n: int) -> list[tuple[int, int]]:
    """The ring pairs (i, (i+1) mod n) read by `expval+zz`: n = 2 has the single pair (0, 1), n = 1 none."""
    if n == 1:
        return []
    if n == 2:
        return [(0, 1)]
    return [(i, (i + 1) % n) for i in range(n)]
