"""Whether a job may run, decided once for the API (before the job is stored) and again by the worker (before it
opens anything or runs a step): the references it names, whose IBM token pays, the owner's quotas, and what the
estimate may spend under the spec's budgets and the operator's ceilings.

The rules are the operator's (`Settings`), and no spec can raise them:
- `model` and `dataset` resolve under `service.references` (builtins, the owner's uploads, allowed folders).
- An `ibm:` job signs in with its owner's stored token; the workers' own `QAA_IBM_TOKEN` serves only the owners
  in `QAA_IBM_TOKEN_OWNERS`.
- Queued + running jobs per owner are capped (429).
- The estimate must fit the spec's `max_circuits`/`max_shots`, the per-job ceilings (`QAA_MAX_JOB_*`), the
  owner's 24-hour ceilings (`QAA_MAX_OWNER_DAILY_*`, 429: they free up as the day moves on) and the engine
  state cap (`QAA_MAX_ENGINE_STATE_MB`).

Each refusal is a `Refused` naming the spec field at fault and the limit, which the API answers as problem+json
and the worker turns into the job's error.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from circuits.cost_estimate import Estimate, combined
from service.api.cost import EstimateError, cost_of, spec_cost
from service.references import RefusedReference, resolve_references
from service.settings import DAY_S, Settings
from service.spec import JobSpec
from service.store import Spend, Store


class Refused(Exception):
    """A job that may not run: `status` (422 or 429), the spec `path` at fault, and why."""

    def __init__(self, status: int, path: str, message: str):
        super().__init__(f"{path}: {message}")
        self.status, self.path, self.message = status, path, message


@dataclass(frozen=True)
class Ceiling:
    """One figure of the estimate against the operator's limit on it."""

    figure: str
    setting: str
    value: float
    limit: float


def uses_worker_token(spec: JobSpec, store: Store, owner: str) -> bool:
    """An `ibm:` job whose owner stored no IBM token would sign in with the workers' own."""
    ibm = spec.quantum is not None and spec.quantum.backend.startswith("ibm:")
    return ibm and not any(info.kind == "ibm" for info in store.describe_credentials(owner))


def worker_token_allowed(owner: str, settings: Settings) -> bool:
    return "*" in settings.ibm_token_owners or owner in settings.ibm_token_owners


def ibm_credentials(store: Store, owner: str, settings: Settings) -> tuple[str | None, str | None]:
    """The IBM Quantum token and instance `owner`'s `ibm:` work signs in with: the owner's stored ones
    (`PUT /v1/credentials/ibm`), else the workers' `QAA_IBM_TOKEN`/`QAA_IBM_INSTANCE` if the operator lets this
    owner use them (`QAA_IBM_TOKEN_OWNERS`). A stored token this process cannot decrypt is refused rather than
    silently signing in as someone else."""
    from service.vault import SecretKeyMissing, SecretUnreadable, secret_box

    if any(info.kind == "ibm" for info in store.describe_credentials(owner)):
        try:
            stored = store.get_credential(owner, "ibm", secret_box(settings, create=False))
        except (SecretKeyMissing, SecretUnreadable) as exc:
            message = f"the owner's stored IBM Quantum token cannot be used here: {exc}"
            raise Refused(422, "quantum.backend", message) from None
        if stored is not None:  # else deleted since the look-up: the workers' own, if the owner may use it
            return stored.token, stored.instance
    if not worker_token_allowed(owner, settings):
        raise Refused(
            422,
            "quantum.backend",
            "this job's owner has no IBM Quantum token stored (PUT /v1/credentials/ibm), and the workers' token "
            "serves only the owners named in QAA_IBM_TOKEN_OWNERS",
        )
    token = settings.ibm_token.get_secret_value() if settings.ibm_token else None
    return token, settings.ibm_instance


def check_references(spec: JobSpec, store: Store, owner: str, settings: Settings) -> tuple[str, str]:
    """(model, dataset) as the worker opens them; `Refused` for a reference this server does not serve."""
    try:
        model, dataset = resolve_references(spec.model, spec.dataset, settings)
    except RefusedReference as exc:
        raise Refused(422, exc.field, exc.message) from None
    if dataset.startswith("ds_") and store.get_dataset(dataset, owner) is None:
        raise Refused(422, "dataset", f"no dataset {dataset!r}; upload one with POST /v1/datasets")
    if uses_worker_token(spec, store, owner) and not worker_token_allowed(owner, settings):
        raise Refused(
            422,
            "quantum.backend",
            f"{spec.quantum.backend} needs your own IBM Quantum token: store it with PUT /v1/credentials/ibm "
            "(the server's token serves only the owners its operator names in QAA_IBM_TOKEN_OWNERS)",
        )
    return model, dataset


#: The files of a saved QAA adapter among a job's artifacts (`circuits.save_qaa`).
ADAPTER_FILES = ("artifacts/adapter_config.json", "artifacts/adapter_model.safetensors")


@dataclass(frozen=True)
class SourceAdapter:
    """The saved adapter a job loads (`adapter_from`, `init_from`): its files and the digests recorded for them."""

    job_id: str
    files: dict[str, tuple[str, str]]  # artifact name -> (path, sha256)


def check_source(spec: JobSpec, store: Store, owner: str) -> SourceAdapter | None:
    """The adapter `spec` loads, if any: a succeeded QAA job of the same owner, for the same model and method
    block, whose adapter files are still there; `Refused` (422 on the field) otherwise."""
    source = spec.source_job
    if source is None:
        return None
    field = "adapter_from" if spec.adapter_from else "init_from"
    job = store.get_job(source, owner)
    if job is None:
        raise Refused(422, field, f"no job {source!r}")
    if job.status != "succeeded":
        raise Refused(422, field, f"job {source} is {job.status}; only a succeeded job's adapter can be loaded")
    trained = JobSpec.model_validate(job.spec)
    if trained.method != spec.method:
        raise Refused(
            422,
            "method",
            f"job {source} trained its adapter with method {trained.method.model_dump(exclude_defaults=True)}; "
            "use the same method block (qaa-client evaluate copies it)",
        )
    if trained.model != spec.model:
        raise Refused(422, "model", f"job {source} adapted {trained.model!r}, not {spec.model!r}")
    artifacts = {a.name: (a.path, a.sha256) for a in store.list_artifacts(source)}
    if any(name not in artifacts for name in ADAPTER_FILES):
        raise Refused(422, field, f"job {source} has no saved adapter any more (its artifacts were deleted)")
    return SourceAdapter(source, {name: artifacts[name] for name in ADAPTER_FILES})


def check_active_jobs(store: Store, owner: str, settings: Settings) -> None:
    active = store.count_active_jobs(owner)
    if active >= settings.max_active_jobs_per_owner:
        raise Refused(
            429,
            "owner",
            f"you have {active} queued or running jobs, the most this server allows "
            f"(QAA_MAX_ACTIVE_JOBS_PER_OWNER={settings.max_active_jobs_per_owner}); wait for one to end or cancel one",
        )


def spend_of(spec: JobSpec, est: Estimate) -> Spend:
    """The estimate as money: QPU seconds count on hardware (`ibm:`) only."""
    ibm = spec.quantum is not None and spec.quantum.backend.startswith("ibm:")
    return Spend(est.circuits, est.shots, est.qpu_seconds if ibm else 0.0)


def check_spend(spend: Spend, engine_bytes: int, settings: Settings) -> None:
    """The per-job ceilings and the engine state cap (422 naming the figure and the setting)."""
    mb = engine_bytes / 2**20
    for c in (
        Ceiling("circuits", "QAA_MAX_JOB_CIRCUITS", spend.circuits, settings.max_job_circuits),
        Ceiling("shots", "QAA_MAX_JOB_SHOTS", spend.shots, settings.max_job_shots),
        Ceiling("QPU seconds", "QAA_MAX_JOB_QPU_SECONDS", spend.qpu_seconds, settings.max_job_qpu_seconds),
        Ceiling("MiB of adapter state", "QAA_MAX_ENGINE_STATE_MB", mb, settings.max_engine_state_mb),
    ):
        if c.value > c.limit:
            path = "training.batch_size" if c.setting == "QAA_MAX_ENGINE_STATE_MB" else "quantum"
            raise Refused(
                422,
                path,
                f"the job's estimated {c.value:,.0f} {c.figure} exceed this server's limit of {c.limit:,.0f} per "
                f"job ({c.setting}); shrink the job (steps, batch_size, max_length, qubits, shots)",
            )


def check_daily(store: Store, owner: str, spend: Spend, settings: Settings, *, counted: bool = False) -> None:
    """The owner's 24-hour ceilings with this job's `spend` added (`counted`: it is already in the store)."""
    since = store.clock() - timedelta(seconds=DAY_S)
    day = store.spend_since(owner, since)
    extra = Spend() if counted else spend
    for c in (
        Ceiling("circuits", "QAA_MAX_OWNER_DAILY_CIRCUITS", day.circuits + extra.circuits,
                settings.max_owner_daily_circuits),
        Ceiling("shots", "QAA_MAX_OWNER_DAILY_SHOTS", day.shots + extra.shots, settings.max_owner_daily_shots),
        Ceiling("QPU seconds", "QAA_MAX_OWNER_DAILY_QPU_SECONDS", day.qpu_seconds + extra.qpu_seconds,
                settings.max_owner_daily_qpu_seconds),
    ):  # fmt: skip
        if c.value > c.limit:
            raise Refused(
                429,
                "quantum",
                f"with this job your estimated {c.figure} over the last 24 hours would be {c.value:,.0f}, above "
                f"this server's limit of {c.limit:,.0f} per owner per day ({c.setting}); try later or shrink the job",
            )


def check_device(config, figures: list[dict], qpu_high: float) -> None:
    """The spec's device budgets on the circuits as they will run: `min_esp` on every circuit, `max_qpu_seconds`
    on the high end of the QPU-seconds range (422 naming the figure and the limit)."""
    for row in figures:
        if config.min_esp is not None and row["esp"] < config.min_esp:
            raise Refused(
                422,
                "quantum.min_esp",
                f"the {row['qubits']}-qubit circuit's estimated success probability on {row['backend']} is "
                f"{row['esp']:.3g}, below min_esp={config.min_esp:g}; use fewer qubits or layers, or another device",
            )
    if config.max_qpu_seconds is not None and qpu_high > config.max_qpu_seconds:
        raise Refused(
            422,
            "quantum.max_qpu_seconds",
            f"the job may take up to {qpu_high:,.0f} QPU seconds, above max_qpu_seconds={config.max_qpu_seconds:g}",
        )


def admit(store: Store, owner: str, spec: JobSpec, settings: Settings) -> Spend | None:
    """The API's admission of a new job: every rule above, in order; returns the spend to record with the job
    (None for a model the API cannot price: its worker prices it from the loaded model and checks it then)."""
    check_references(spec, store, owner, settings)
    check_source(spec, store, owner)
    check_active_jobs(store, owner, settings)
    try:
        cost = spec_cost(spec)
    except EstimateError as exc:
        if exc.path in ("d_in", "adapters"):
            return None
        raise Refused(422, exc.path, str(exc)) from exc
    if cost.over_budget:
        path = "quantum.max_shots" if "max_shots" in cost.over_budget else "quantum.max_circuits"
        raise Refused(422, path, cost.over_budget + "; raise the budget or shrink the job")
    spend = spend_of(spec, combined(cost.estimate, cost.evaluation))
    check_spend(spend, cost.engine_state_bytes, settings)
    check_daily(store, owner, spend, settings)
    if spec.quantum is None:
        return spend
    config = spec.qaa_config()
    if config.min_esp is not None or config.max_qpu_seconds is not None:
        from service.api import hardware

        token, instance = ibm_credentials(store, owner, settings) if config.backend.startswith("ibm:") else (None, None)
        try:
            figures = hardware.circuits_on_backend(config, hardware.register_sizes(config, cost.widths), settings,
                                                   token, instance)  # fmt: skip
        except hardware.HardwareUnavailable as exc:
            raise Refused(422, "quantum.backend", f"the device budgets cannot be checked: {exc}") from None
        check_device(config, figures, hardware.qpu_range(config, per_width_executions(spec, cost.widths), figures)[1])
    return spend


def per_width_executions(spec: JobSpec, widths) -> dict:
    """(executions, runtime jobs) of training + evaluation for each adapter shape, for `hardware.qpu_range`."""
    out = {}
    for width, count in widths.items():
        both = combined(*cost_of(spec, {width: count})[:2])
        out[width] = (both.shots, both.runtime_jobs)
    return out
