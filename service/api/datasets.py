"""`/v1/datasets`: JSONL uploads of `{"prompt": ..., "completion": ...}` examples, one per line; list; delete.

The body is streamed to a temporary file and refused with 413 as soon as it passes
`settings.max_upload_bytes` (`service.http_guards`); then every line is checked, and the first bad one is a 400
naming it. The owner's quotas (`QAA_MAX_DATASETS_PER_OWNER`, `QAA_MAX_DATASET_BYTES_PER_OWNER`) are checked
before and after the body arrives. Only a fully valid file within them is renamed into `QAA_HOME/datasets` and
registered, so a refused upload leaves nothing. A dataset a queued or running job names cannot be deleted.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool

from service.deps import CurrentOwner, SettingsDep, StoreDep
from service.jsonl import JsonlLineError, read_examples
from service.problems import Problem, problem_responses
from service.ratelimit import UploadRateLimited
from service.schemas import DatasetOut
from service.settings import Settings
from service.store import Store, new_dataset_id

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], responses=problem_responses(401))

JSONL_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/x-ndjson": {"schema": {"type": "string", "format": "binary"}},
            "application/jsonl": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def check_jsonl(path: Path) -> int:
    """Count the examples in a JSONL file, or raise a 400 naming the first bad line. Blank lines are skipped."""
    try:
        with path.open("rb") as f:
            rows = sum(1 for _ in read_examples(f))
    except JsonlLineError as exc:
        raise Problem(400, str(exc), line=exc.line) from exc
    if rows == 0:
        raise Problem(400, "the upload holds no examples; send one JSON object per line", line=0)
    return rows


async def _receive(request: Request, dest: Path) -> int:
    """Stream the body to `dest`; its size is bounded at `QAA_MAX_UPLOAD_BYTES` by `http_guards.BodyLimit`."""
    size = 0
    with dest.open("wb") as f:
        async for chunk in request.stream():
            size += len(chunk)
            f.write(chunk)
    return size


@router.post(
    "",
    status_code=201,
    openapi_extra=JSONL_BODY,
    responses=problem_responses(400, 413, 422, 429),
    summary="Upload a JSONL dataset of prompt/completion pairs",
)
async def upload_dataset(
    request: Request,
    store: StoreDep,
    settings: SettingsDep,
    owner: CurrentOwner,
    _rate: UploadRateLimited,
    name: Annotated[str, Query(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f]+$")] = "upload.jsonl",
) -> DatasetOut:
    await run_in_threadpool(check_quota, store, owner, settings, 0)
    folder = settings.datasets_dir
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=".upload-", suffix=".part")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        size = await _receive(request, tmp)
        await run_in_threadpool(check_quota, store, owner, settings, size)
        rows = await run_in_threadpool(check_jsonl, tmp)
        dataset_id = new_dataset_id()
        path = folder / f"{dataset_id}.jsonl"
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    try:
        dataset = await run_in_threadpool(
            lambda: store.create_dataset(owner, name, rows=rows, size=size, path=str(path), dataset_id=dataset_id)
        )
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return DatasetOut.from_row(dataset)


@router.get("", summary="The caller's datasets, newest first")
def list_datasets(store: StoreDep, owner: CurrentOwner) -> list[DatasetOut]:
    return [DatasetOut.from_row(d) for d in store.list_datasets(owner)]


@router.delete(
    "/{dataset_id}",
    status_code=204,
    response_class=Response,
    responses=problem_responses(404, 409),
    summary="Delete one of your datasets (its file too), unless a queued or running job names it",
)
def delete_dataset(
    dataset_id: Annotated[str, PathParam(min_length=1, max_length=100, description="The id POST /v1/datasets gave.")],
    store: StoreDep,
    owner: CurrentOwner,
) -> Response:
    if store.get_dataset(dataset_id, owner) is None:
        raise Problem(404, f"no dataset {dataset_id!r}")
    users = store.active_jobs_naming(owner, dataset_id)
    if users:
        raise Problem(409, f"dataset {dataset_id!r} is named by jobs that have not ended: {', '.join(users[:5])}")
    dataset = store.delete_dataset(dataset_id, owner)
    if dataset is not None:
        Path(dataset.path).unlink(missing_ok=True)
    return Response(status_code=204)


def check_quota(store: Store, owner: str, settings: Settings, incoming: int) -> None:
    """The owner's dataset count and bytes, with an upload of `incoming` bytes added (422 naming the limit)."""
    count, used = store.dataset_usage(owner)
    if incoming == 0 and count >= settings.max_datasets_per_owner:
        raise Problem(
            422,
            f"you keep {count} datasets, the most this server allows (QAA_MAX_DATASETS_PER_OWNER="
            f"{settings.max_datasets_per_owner}); delete one with DELETE /v1/datasets/{{id}}",
        )
    if used + incoming > settings.max_dataset_bytes_per_owner:
        raise Problem(
            422,
            f"your datasets would take {used + incoming} bytes, more than this server allows per owner "
            f"(QAA_MAX_DATASET_BYTES_PER_OWNER={settings.max_dataset_bytes_per_owner}); delete some first",
        )
