"""Quantum accounting: what an engine sent to its backend, per layer and summed per model."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class Usage:
    """Counters an engine adds to on every primitive call; `circuits` counts parameter sets (bindings)
    executed."""

    primitive_calls: int = 0
    circuits: int = 0
    shots: int = 0
    transpile_hits: int = 0
    transpile_misses: int = 0
    qpu_seconds: float = 0.0

    def __add__(self, other: Usage) -> Usage:
        return Usage(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def usage(model) -> Usage:
    """Counters of every circuit-backed QAA layer in `model` (a torch module), summed; zero for `exact`."""
    total = Usage()
    for module in model.modules():
        counters = getattr(getattr(module, "engine", None), "usage", None)
        if isinstance(counters, Usage):
            total = total + counters
    return total
