"""Which `model` and `dataset` references a server accepts: the operator decides, not the spec.

By default a job names only builtins (`builtin:...`), its owner's uploads (`ds_<id>`, checked against the
store by the API and the worker) and the Hugging Face ids the operator lists in `QAA_HUB_MODELS`. A local path
counts only when it resolves (symlinks and `..` followed) inside a folder of `QAA_LOCAL_MODEL_DIRS` or
`QAA_LOCAL_DATASET_DIRS`. The API refuses anything else at submission (422 naming the field); the worker asks
again before it opens anything and opens the resolved path, so a symlink changed in between leads nowhere new.

A refused path reads the same whether it exists or not: nothing here looks at the file beyond resolving the
links on its way, and no message quotes a file's contents.

Example:
    >>> from service.settings import Settings
    >>> resolve_model("/etc", Settings(local_model_dirs=[]))
    Traceback (most recent call last):
    ...
    service.references.RefusedReference: model: local paths are not accepted here; ...
"""

from __future__ import annotations

import os

from service.settings import Settings
from service.spec import looks_like_path


class RefusedReference(ValueError):
    """A reference this server does not accept; `field` is `model` or `dataset`."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def _inside(ref: str, folders: list[str]) -> str | None:
    """The resolved path of `ref` when it lies inside one of `folders` (each resolved too), else None."""
    real = os.path.realpath(os.path.expanduser(ref))
    for folder in folders:
        root = os.path.realpath(os.path.expanduser(folder))
        if os.path.commonpath([real, root]) == root:
            return real
    return None


def _folders(folders: list[str], setting: str) -> str:
    return f"{setting}: {', '.join(folders)}" if folders else f"{setting} is empty"


def resolve_model(ref: str, settings: Settings) -> str:
    """`ref` as the worker should load it (a resolved path for allowed local models), or `RefusedReference`."""
    if ref.startswith("builtin:"):
        return ref  # which builtins exist is the worker's knowledge; an unknown one fails the job readably
    if looks_like_path(ref):
        resolved = _inside(ref, settings.local_model_dirs)
        if resolved is None:
            raise RefusedReference(
                "model",
                "local paths are not accepted here; name a builtin (builtin:smollm2-135m, builtin:tiny-llama, "
                "builtin:tiny-gpt2) or a model the operator offers, or ask the operator to allow its folder "
                f"({_folders(settings.local_model_dirs, 'QAA_LOCAL_MODEL_DIRS')})",
            )
        return resolved
    if ref in settings.hub_models:
        return ref
    offered = ", ".join(settings.hub_models) or "none"
    raise RefusedReference(
        "model",
        f"{ref!r} is not a model this server offers: builtin:<name>, or a Hugging Face id in QAA_HUB_MODELS "
        f"({offered})",
    )


def resolve_dataset(ref: str, settings: Settings) -> str:
    """`ref` as the worker should open it (a resolved path for allowed files), or `RefusedReference`.

    `ds_<id>` passes here; whether it is the owner's is the store's question (API and worker both ask).
    """
    if ref.startswith(("builtin:", "ds_")):
        return ref
    resolved = _inside(ref, settings.local_dataset_dirs) if os.path.isabs(os.path.expanduser(ref)) else None
    if resolved is None:
        raise RefusedReference(
            "dataset",
            "files on the server are not read for jobs; upload yours with POST /v1/datasets and name it by its "
            "ds_ id (qaa-client submit uploads a local dataset for you), or ask the operator to allow its "
            f"folder ({_folders(settings.local_dataset_dirs, 'QAA_LOCAL_DATASET_DIRS')})",
        )
    return resolved


def resolve_references(model: str, dataset: str, settings: Settings) -> tuple[str, str]:
    """Both references resolved, or the first `RefusedReference`."""
    return resolve_model(model, settings), resolve_dataset(dataset, settings)
