"""Training checkpoints: everything a successor worker needs to continue a run exactly.

A checkpoint is a folder `checkpoints/step-000025` holding `state.pt` (trainable tensors, optimizer and
scheduler state, torch RNG states) and `state.json` (step, python/numpy/engine RNG states, metric history,
quantum counters). It is written into a temporary folder and renamed into place, so a folder with a step name
is always complete: a worker killed mid-write leaves only a `.tmp-` folder, removed by the next save.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

PREFIX = "step-"
KEEP = 2


@dataclass
class Checkpoint:
    step: int
    tensors: dict[str, Any]  # trainable, optimizer, scheduler, torch_rng (, cuda_rng)
    meta: dict[str, Any]  # rng, history, usage


def _step_of(path: Path) -> int | None:
    name = path.name
    return int(name[len(PREFIX) :]) if name.startswith(PREFIX) and name[len(PREFIX) :].isdigit() else None


def save(directory: Path, checkpoint: Checkpoint, keep: int = KEEP) -> Path:
    """Write atomically; keep the newest `keep` checkpoints. A checkpoint of the same step already there (a
    racing worker that computed the same state) is left as it is."""
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    target = directory / f"{PREFIX}{checkpoint.step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=directory))
    try:
        torch.save(checkpoint.tensors, tmp / "state.pt")
        (tmp / "state.json").write_text(json.dumps({"step": checkpoint.step, **checkpoint.meta}))
        if not target.exists():
            tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    complete = sorted((p for p in directory.iterdir() if _step_of(p) is not None), key=_step_of)
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def latest(directory: Path) -> Checkpoint | None:
    """The newest complete checkpoint in `directory`, or None."""
    if not directory.is_dir():
        return None
    steps = sorted((p for p in directory.iterdir() if _step_of(p) is not None), key=_step_of)
    if not steps:
        return None
    path = steps[-1]
    meta = json.loads((path / "state.json").read_text())
    tensors = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    return Checkpoint(meta.pop("step"), tensors, meta)


# --- RNG states ---------------------------------------------------------------------------------------------


def capture_rng(model: torch.nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensors, json) of every RNG a training step may draw from: torch (CPU, CUDA), python, numpy, and the
    numpy generators of circuit engines (SPSA directions)."""
    tensors = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda_rng"] = torch.cuda.get_rng_state_all()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": _jsonable(random.getstate()),
        "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
        "engines": {name: rng.bit_generator.state for name, rng in _engine_rngs(model).items()},
    }
    return tensors, state


def restore_rng(model: torch.nn.Module, tensors: dict[str, Any], state: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_rng"])
    if "cuda_rng" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(tensors["cuda_rng"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    for name, rng in _engine_rngs(model).items():
        if name in state["engines"]:
            rng.bit_generator.state = state["engines"][name]


def _engine_rngs(model: torch.nn.Module) -> dict[str, np.random.Generator]:
    """Each adapter engine's generator (SPSA directions) and the one its run's runner draws shot seeds from."""
    found = {}
    for name, module in model.named_modules():
        engine = getattr(module, "engine", None)
        for key, owner in ((name, engine), ("<runner>", getattr(engine, "runner", None))):
            rng = getattr(owner, "rng", None)
            if isinstance(rng, np.random.Generator):
                found[key] = rng
    return found


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, tuple | list) else value
