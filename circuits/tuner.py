"""QAA as a PEFT method: `QAAPeftConfig` (a `PeftConfig`) and `QAAModel` (a `BaseTuner`), in PEFT's tuner registry.

With this module imported (`circuits` imports it on first use of any of these names), the calls an ML engineer
knows from LoRA work for QAA:

    >>> from peft import PeftModel, get_peft_model                                  # doctest: +SKIP
    >>> model = get_peft_model(base, QAAPeftConfig(target_modules=["q_proj", "v_proj"]))  # doctest: +SKIP
    >>> model.print_trainable_parameters(); model.save_pretrained("out")           # doctest: +SKIP
    >>> PeftModel.from_pretrained(base, "out")                                      # doctest: +SKIP

The config holds the adapter's shape only, the fields of `circuits.config.QAAShape` (one source: the job spec's
method block is the same model), plus the initialisation seed. Where the circuits run is chosen per run:
`with circuits.execution(model, QAAConfig(backend="fake:FakeTorino", ...)):`; outside one, on the exact engine.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from peft import PeftConfig
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, PeftType, register_peft_method

from .config import QAAConfig, QAAShape, matches_target
from .inject import ADAPTERS
from .layer import QAALayer

PEFT_NAME = "qaa"


def _shape_field(name: str) -> tuple[str, Any, dataclasses.Field]:
    """A dataclass field mirroring `QAAShape`'s: same default, its description as PEFT's `help` metadata."""
    info = QAAShape.model_fields[name]
    default = (
        {"default_factory": info.default_factory} if info.default_factory is not None else {"default": info.default}
    )
    return name, info.annotation, dataclasses.field(metadata={"help": info.description or ""}, **default)


def _post_init(self: QAAPeftConfig) -> None:
    """Validate once, by `QAAShape` (the job spec's own validators and messages), and keep its normalised values."""
    PeftConfig.__post_init__(self)
    self.peft_type = PeftType.QAA
    shape = QAAShape.model_validate({name: getattr(self, name) for name in QAAShape.model_fields})
    for name in QAAShape.model_fields:
        setattr(self, name, getattr(shape, name))


QAAPeftConfig = dataclasses.make_dataclass(
    "QAAPeftConfig",
    [
        *(_shape_field(name) for name in QAAShape.model_fields),
        ("seed", int, dataclasses.field(default=0, metadata={"help": "Seeds theta and the fixed compression."})),
    ],
    bases=(PeftConfig,),
    namespace={"__post_init__": _post_init, "__module__": __name__},
)
QAAPeftConfig.__doc__ = """The PEFT config of QAA adapters: the fields of `QAAShape` (target_modules, qubits, layers,
entangler, readout, compress, alpha) and `seed`. See docs/qaa.md."""


def peft_config(config: QAAConfig, task_type: str | None = None) -> QAAPeftConfig:
    """The PEFT config of `config`'s adapter shape (its execution fields stay with the run)."""
    return QAAPeftConfig(task_type=task_type, seed=config.seed, **config.model_dump(include=set(QAAShape.model_fields)))


def adapter_config(config: QAAPeftConfig) -> QAAConfig:
    """The `QAAConfig` an adapter is built from: the shape of `config`, the exact engine until a run binds it."""
    return QAAConfig(seed=config.seed, **{name: getattr(config, name) for name in QAAShape.model_fields})


class QAAModel(BaseTuner):
    """Injects `QAALayer`s into the modules `target_modules` names (matched by RE2, as the job spec does)."""

    prefix: str = "qaa_"
    tuner_layer_cls = QAALayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """`<module>.qaa_adapters.<adapter>.<tensor>` -> `<module>.qaa_adapters.<tensor>` (PEFT's extension point for
        the saved key of a model key): an adapter here is a module of several tensors, deeper than PEFT's default
        rule (the adapter name last or second to last) looks."""
        return key.replace(f"{ADAPTERS}{adapter_name}.", ADAPTERS, 1)

    @staticmethod
    def _check_target_module_exists(peft_config: PeftConfig, key: str) -> bool:
        return matches_target(key, peft_config.target_modules)

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        config = adapter_config(peft_config)
        if isinstance(target, QAALayer):
            target.update_layer(adapter_name, config, current_key)
            return
        layer = QAALayer(target, config, name=current_key, adapter_name=adapter_name, bind=False)
        if adapter_name not in self.active_adapters:  # an added adapter does not train until it is set active
            layer.requires_grad_(False)
        self._replace_module(parent, target_name, layer, target)


def _add_peft_type() -> None:
    """PEFT's registry accepts only members of its `PeftType` enum (huggingface/peft#2273: a new method is meant to
    live inside PEFT); QAA is added as the member the enum's class body would have defined."""
    if "QAA" in PeftType.__members__:
        return
    member = str.__new__(PeftType, "QAA")
    member._name_, member._value_, member._sort_order_ = "QAA", "QAA", len(PeftType._member_names_)
    PeftType._member_map_["QAA"] = member
    PeftType._value2member_map_["QAA"] = member
    PeftType._member_names_.append("QAA")
    type.__setattr__(PeftType, "QAA", member)


def register() -> None:
    """Put QAA in PEFT's registry (idempotent): `get_peft_model`, `PeftModel.from_pretrained` and
    `PeftConfig.from_pretrained` then know it."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    _add_peft_type()
    if PeftType.QAA not in PEFT_TYPE_TO_CONFIG_MAPPING:
        register_peft_method(name=PEFT_NAME, config_cls=QAAPeftConfig, model_cls=QAAModel)


register()
