"""The job spec's reference, generated from its one schema (`service.spec.JobSpec`): `docs/spec.md` for people and
`jobspec.schema.json` for editors (a YAML language server validates a spec file against it). Tests fail when
either differs from what this module generates.

    python -m service.spec_reference        # rewrites both
"""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from service.spec import JobSpec, _models_in

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_PATH = ROOT / "jobspec.schema.json"
DOC_PATH = ROOT / "docs" / "spec.md"
SCHEMA_ID = "https://github.com/qaa-service/qaa/jobspec.schema.json"
#: JSON Schema keywords that bound a value, as the reference writes them.
BOUNDS = {"minimum": ">= {}", "exclusiveMinimum": "> {}", "maximum": "<= {}", "exclusiveMaximum": "< {}",
          "minLength": "length >= {}", "maxLength": "length <= {}", "minItems": ">= {} items",
          "maxItems": "<= {} items"}  # fmt: skip


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a job spec (draft 2020-12, as pydantic writes it)."""
    schema = JobSpec.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID, **schema}


def _type(prop: dict[str, Any]) -> str:
    if "$ref" in prop:
        return f"[{prop['$ref'].rsplit('/', 1)[-1]}](#{prop['$ref'].rsplit('/', 1)[-1].lower()})"
    if "const" in prop:
        return f"`{prop['const']}`"
    if "enum" in prop:
        return " \\| ".join(f"`{v}`" for v in prop["enum"])
    for key in ("anyOf", "oneOf"):
        if key in prop:
            return " or ".join(_type(p) for p in prop[key])
    if prop.get("type") == "array":
        return f"list of {_type(prop.get('items', {}))}"
    return str(prop.get("type", "any"))


def _bounds(prop: dict[str, Any]) -> list[str]:
    found = [fmt.format(prop[key]) for key, fmt in BOUNDS.items() if key in prop]
    for key in ("anyOf", "oneOf"):
        for part in prop.get(key, []):
            found += _bounds(part)
    return found


def _models(model: type[BaseModel], out: dict[str, type[BaseModel]] | None = None) -> dict[str, type[BaseModel]]:
    """Every model of the spec by its schema name (its class name, as pydantic names `$defs`)."""
    out = {} if out is None else out
    out[model.__name__] = model
    for field in model.model_fields.values():
        for sub in _models_in(field.annotation):
            if sub.__name__ not in out:
                _models(sub, out)
    return out


def _default(model: type[BaseModel], key: str) -> str:
    """A field's default as the reference shows it (pydantic's schema leaves out those made by a factory)."""
    field = next(f for name, f in model.model_fields.items() if (f.validation_alias or name) == key or name == key)
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    return "its block's defaults" if isinstance(value, BaseModel) else f"`{json.dumps(value)}`"


def _table(name: str, model: dict[str, Any], cls: type[BaseModel]) -> list[str]:
    lines = [f"### {name}", "", model.get("description", "").strip().split("\n\n")[0].replace("\n", " "), ""]
    lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, prop in model.get("properties", {}).items():
        default = _default(cls, key)
        bounds = _bounds(prop)
        meaning = (prop.get("description", "") + (f" ({', '.join(bounds)})" if bounds else "")).replace("|", r"\|")
        lines.append(f"| `{key}` | {_type(prop)} | {default} | {meaning} |")
    return [*lines, ""]


def markdown() -> str:
    """docs/spec.md: every block of the spec, every key with its type, default, bounds and meaning."""
    schema = json_schema()
    lines = [
        "# Job spec reference",
        "",
        "Generated from `service.spec.JobSpec` by `python -m service.spec_reference` (which also writes",
        "`jobspec.schema.json`); do not edit by hand. Unknown keys are errors that name the nearest allowed key.",
        "`docs/qaa.md` explains the QAA fields; `qaa spec init` writes a commented starter and",
        "`qaa spec validate FILE` checks a file offline with the server's own messages.",
        "",
    ]
    classes = _models(JobSpec)
    lines += _table("JobSpec", schema, JobSpec)
    for name, model in sorted(schema.get("$defs", {}).items()):
        if model.get("type") == "object":
            lines += _table(name, model, classes[name])
    return "\n".join(lines)


def write() -> None:
    SCHEMA_PATH.write_text(json.dumps(json_schema(), indent=2) + "\n")
    DOC_PATH.write_text(markdown())


if __name__ == "__main__":
    write()


#: What `qaa spec init` fills in beyond the defaults: a model and data that run offline.
STARTER = {"name": "my-{kind}-job", "model": "builtin:smollm2-135m", "dataset": "builtin:e2e"}
#: The quantum keys a starter shows (the rest are in docs/spec.md).
STARTER_QUANTUM = ("backend", "shots", "gradient")


def _line(indent: str, key: str, value: Any, comment: str) -> str:
    text = f"{indent}{key}: {json.dumps(value)}"
    return f"{text:<40} # {comment}" if comment else text


def starter(kind: str) -> str:
    """A commented job spec for `method.kind: kind`, every value its default (`qaa spec init`)."""
    from service.spec import METHOD_KINDS

    if kind not in METHOD_KINDS:
        raise ValueError(f"method kind must be one of {', '.join(METHOD_KINDS)}, got {kind!r}")
    classes = _models(JobSpec)
    method = next(m for m in _models_in(JobSpec.model_fields["method"].annotation)
                  if kind in typing.get_args(m.model_fields["kind"].annotation))  # fmt: skip
    lines = [f"# A {kind} job: `qaa-client submit FILE --watch`. Every key, its bounds and more: docs/spec.md."]
    for key, value in STARTER.items():
        lines.append(_line("", key, value.format(kind=kind), JobSpec.model_fields[key].description or ""))
    lines.append("method:")
    lines.append(_line("  ", "kind", kind, ""))
    for key, field in method.model_fields.items():
        if key != "kind":
            lines.append(_line("  ", key, field.get_default(call_default_factory=True), field.description or ""))
    if kind == "qaa":
        lines.append("quantum:                                 # where the circuits run")
        for key in STARTER_QUANTUM:
            field = classes["QuantumOptions"].model_fields[key]
            lines.append(_line("  ", key, field.get_default(call_default_factory=True), field.description or ""))
    for block in ("training", "evaluation"):
        lines.append(f"{block}:")
        for key, field in classes[JobSpec.model_fields[block].annotation.__name__].model_fields.items():
            lines.append(_line("  ", key, field.get_default(call_default_factory=True), field.description or ""))
    return "\n".join(lines) + "\n"
