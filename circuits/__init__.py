"""The quantum layer of the QAA service: config, ansatz, engines, adapters.

Torch and qiskit load lazily, so `circuits.QAAConfig` and `circuits.estimate` stay cheap to import (the API
process
validates specs with them).
"""

from importlib import import_module

from .config import QAAConfig
from .execution import Execution, execution

_LAZY = {
    "QAALayer": ".layer",
    "inject_qaa": ".inject",
    "save_qaa": ".inject",
    "load_qaa": ".inject",
    "trainable_summary": ".inject",
    "qaa_layers": ".inject",
    "estimate": ".cost_estimate",
    "check_budget": ".cost_estimate",
    "usage": ".accounting",
    "Usage": ".accounting",
    "list_backends": ".backends",
}

__all__ = ["Execution", "QAAConfig", "execution", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
