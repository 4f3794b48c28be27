"""`/v1/datasets`: JSONL uploads of `{"prompt": ..., "completion": ...}` examples, one per line.

The body is streamed to a temporary file and refused with 413 as soon as it passes
`settings.max_upload_bytes`; then every line is checked, and the first bad one is a 400 naming it. Only a
fully valid file is renamed into `QAA_HOME/datasets` and registered, so a refused upload leaves nothing.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool

from service.deps import CurrentOwner, SettingsDep, StoreDep
from service.jsonl import JsonlLineError, read_examples
from service.problems import Problem, problem_responses
from service.schemas import DatasetOut
from service.store import new_dataset_id

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


async def _receive(request: Request, dest: Path, limit: int) -> int:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise Problem(413, f"the upload is {declared} bytes; the limit is {limit} bytes (QAA_MAX_UPLOAD_BYTES)")
    size = 0
    with dest.open("wb") as f:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise Problem(413, f"the upload is larger than the limit of {limit} bytes (QAA_MAX_UPLOAD_BYTES)")
            f.write(chunk)
    return size


@router.post(
    "",
    status_code=201,
    openapi_extra=JSONL_BODY,
    responses=problem_responses(400, 413, 422),
    summary="Upload a JSONL dataset of prompt/completion pairs",
)
async def upload_dataset(
    request: Request,
    store: StoreDep,
    settings: SettingsDep,
    owner: CurrentOwner,
    name: Annotated[str, Query(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f]+$")] = "upload.jsonl",
) -> DatasetOut:
    folder = settings.datasets_dir
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=".upload-", suffix=".part")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        size = await _receive(request, tmp, settings.max_upload_bytes)
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
