"""Job spec files: YAML or JSON on disk, `--set a.b=c` overrides, and local dataset files to upload.

The client does not validate the spec: the server does (one source of truth, `service/spec.py`), and its
422 names the field. This module only turns files and flags into the document that is sent, and refuses
what cannot become one (an unreadable file, broken YAML, a malformed override) with `SpecFileError`.

Override values are read as YAML, so `--set training.steps=50` sets an int, `--set quantum.shots=null` sets
None and `--set method.target_modules=[q_proj,v_proj]` sets a list; quote to keep a string (`--set name='"7"'`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

SpecDoc = dict[str, Any]


class _Loader(yaml.SafeLoader):
    """PyYAML reads YAML 1.1, where `1e-3` is a string; learning rates are written that way, so exponent
    floats without a dot are floats here, as in YAML 1.2 and JSON."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


class SpecFileError(Exception):
    """A spec file or override the client cannot turn into a request."""


def load_spec(path: Path) -> SpecDoc:
    """The mapping in a YAML or JSON file (JSON is YAML, so one parser reads both)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise SpecFileError(f"spec file {path} does not exist") from exc
    except IsADirectoryError as exc:
        raise SpecFileError(f"spec file {path} is a directory") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecFileError(f"cannot read spec file {path}: {exc}") from exc
    try:
        data = _load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecFileError(f"spec file {path} is not valid YAML/JSON{where}: {problem}") from exc
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        raise SpecFileError(f"spec file {path} must hold a mapping (model: ..., dataset: ...), got {got}")
    return data


def apply_overrides(spec: SpecDoc, assignments: list[str]) -> SpecDoc:
    """`spec` with each `dotted.path=value` applied in order; intermediate mappings are created."""
    for assignment in assignments:
        path, sep, raw = assignment.partition("=")
        keys = path.strip().split(".")
        if not sep or not all(k.strip() for k in keys):
            raise SpecFileError(f"--set expects dotted.path=value (like training.steps=50), got {assignment!r}")
        try:
            value = _load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise SpecFileError(f"--set {assignment!r}: the value is not valid YAML ({exc})") from exc
        node = spec
        for depth, key in enumerate(keys[:-1]):
            child = node.setdefault(key.strip(), {})
            if not isinstance(child, dict):
                where = ".".join(keys[: depth + 1])
                raise SpecFileError(f"--set {assignment!r}: {where} is {child!r}, not a mapping")
            node = child
        node[keys[-1].strip()] = value
    return spec


def local_dataset(spec: SpecDoc, spec_path: Path | None) -> Path | None:
    """The local file the spec's `dataset` names, if it is one: relative paths are tried against the working
    directory, then the spec file's folder. Builtin names and `ds_` ids are never files."""
    ref = spec.get("dataset")
    if not isinstance(ref, str) or not ref or ref.startswith(("builtin:", "ds_")):
        return None
    path = Path(ref).expanduser()
    candidates = [path] if path.is_absolute() else [path] + ([spec_path.parent / path] if spec_path else [])
    return next((p for p in candidates if p.is_file()), None)


#: `qaa-client evaluate --mitigation` words and the spec's `quantum.mitigation` fields they set.
MITIGATION_FLAGS = {
    "m3": {"readout": "m3"},
    "trex": {"readout": "trex"},
    "twirling": {"twirling": True},
    "zne": {"zne": {}},
    "dd": {"dynamical_decoupling": "XY4"},
}


def evaluate_spec(trained: SpecDoc, job_id: str, backend: str, *, shots: int | None, mitigation: list[str],
                  samples: int | None) -> SpecDoc:  # fmt: skip
    """The `kind: evaluate` spec of a trained job's adapter on `backend`: the trained job's model, dataset, method
    and training block (its max_length and batch size shape the inputs), a new quantum block."""
    quantum: SpecDoc = {"backend": backend}
    if shots is not None:
        quantum["shots"] = shots
    chosen: SpecDoc = {}
    for word in mitigation:
        if word not in MITIGATION_FLAGS:
            raise SpecFileError(f"--mitigation takes {', '.join(MITIGATION_FLAGS)}; got {word!r}")
        chosen |= MITIGATION_FLAGS[word]
    if chosen:
        quantum["mitigation"] = chosen
    evaluation = dict(trained.get("evaluation") or {})
    if samples is not None:
        evaluation["samples"] = samples
    spec = {key: trained[key] for key in ("model", "dataset", "method", "training") if key in trained}
    name = trained.get("name")
    return {
        **spec,
        **({"name": f"{name} on {backend}"[:200]} if name else {}),
        "kind": "evaluate",
        "adapter_from": job_id,
        "quantum": quantum,
        "evaluation": evaluation,
    }
