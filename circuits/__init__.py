"""The quantum layer of the QAA service: config, ansatz, engines, adapters.

Torch, PEFT and qiskit load lazily, so `circuits.QAAConfig` and `circuits.estimate` stay cheap to import (the API
process validates specs with them). `circuits.QAAPeftConfig` (or `import circuits.tuner`) registers QAA with PEFT.
"""

from importlib import import_module

from .config import QAAConfig, QAAShape
from .execution import Execution, execution

_LAZY = {
    "QAALayer": ".layer",
    "QAAAdapter": ".layer",
    "QAAPeftConfig": ".tuner",
    "QAAModel": ".tuner",
    "inject_qaa": ".inject",
    "save_qaa": ".inject",
    "load_qaa": ".inject",
    "trainable_summary": ".inject",
    "qaa_adapters": ".inject",
    "adapter_state_dict": ".inject",
    "estimate": ".cost_estimate",
    "check_budget": ".cost_estimate",
    "usage": ".accounting",
    "Usage": ".accounting",
    "list_backends": ".backends",
}

__all__ = ["Execution", "QAAConfig", "QAAShape", "execution", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
