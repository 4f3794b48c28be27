"""`/v1/jobs`: submit, list, inspect and cancel jobs; their metrics and artifacts.

Every lookup is scoped to the caller: another owner's job answers 404 exactly like a job that does not
exist.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse

from service import queueing
from service.admission import Refused, admit
from service.api.body import SPEC_BODY, read_spec
from service.deps import CurrentOwner, SettingsDep, StoreDep
from service.problems import Problem, field_problem, problem_responses
from service.ratelimit import SubmitRateLimited
from service.schemas import ArtifactOut, JobList, JobOut, JobStatusName, JobSummary, MetricsPage
from service.store import Job, Store
from service.store.jobs import MAX_PAGE
from service.store.records import MAX_METRICS_PAGE

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=problem_responses(401))

NOT_FOUND = problem_responses(404)


def owned_job(store: Store, job_id: str, owner: str) -> Job:
    job = store.get_job(job_id, owner)
    if job is None:
        raise Problem(404, f"no job {job_id!r}")
    return job


@router.post(
    "",
    status_code=201,
    openapi_extra=SPEC_BODY,
    responses=problem_responses(400, 413, 422, 429),
    summary="Submit a job: validate the spec, store the job, queue it",
)
async def submit_job(
    request: Request,
    response: Response,
    store: StoreDep,
    settings: SettingsDep,
    owner: CurrentOwner,
    _rate: SubmitRateLimited,
) -> JobOut:
    spec = await read_spec(request)
    try:
        spend = await run_in_threadpool(admit, store, owner, spec, settings)
    except Refused as exc:
        raise field_problem(exc.status, exc.path, exc.message) from None
    job = await run_in_threadpool(queueing.submit_job, store, owner, spec, spend)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return JobOut.from_row(job)


@router.get("", responses=problem_responses(400), summary="The caller's jobs, newest first")
def list_jobs(
    store: StoreDep,
    owner: CurrentOwner,
    status: Annotated[list[JobStatusName] | None, Query(description="Only these states (repeatable).")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    cursor: Annotated[str | None, Query(max_length=500, description="`next_cursor` of the previous page.")] = None,
) -> JobList:
    try:
        page = store.list_jobs(owner, status=status, limit=limit, cursor=cursor)
    except ValueError as exc:
        raise field_problem(400, "cursor", str(exc)) from exc
    return JobList(jobs=[JobSummary.from_row(j) for j in page.jobs], next_cursor=page.next_cursor)


@router.get("/{job_id}", responses=NOT_FOUND, summary="One job: status, progress, usage, evaluation")
def get_job(job_id: str, store: StoreDep, owner: CurrentOwner) -> JobOut:
    return JobOut.from_row(owned_job(store, job_id, owner))


@router.post(
    "/{job_id}/cancel",
    responses=NOT_FOUND,
    summary="Cancel: queued jobs at once, running ones within a step (idempotent)",
)
def cancel_job(job_id: str, store: StoreDep, owner: CurrentOwner) -> JobOut:
    job = store.request_cancel(job_id, owner)
    if job is None:
        raise Problem(404, f"no job {job_id!r}")
    return JobOut.from_row(job)


@router.get("/{job_id}/metrics", responses=NOT_FOUND, summary="Metric points after a step, in step order")
def job_metrics(
    job_id: str,
    store: StoreDep,
    owner: CurrentOwner,
    after_step: Annotated[int, Query(ge=-1, le=2**31 - 1, description="Only steps after this one.")] = -1,
    limit: Annotated[int, Query(ge=1, le=MAX_METRICS_PAGE)] = 1000,
) -> MetricsPage:
    owned_job(store, job_id, owner)
    points = store.metrics_after(job_id, after_step, limit=limit)
    return MetricsPage(points=points, next_after_step=points[-1]["step"] if points else after_step)


@router.get("/{job_id}/artifacts", responses=NOT_FOUND, summary="Files the job produced")
def list_artifacts(job_id: str, store: StoreDep, owner: CurrentOwner) -> list[ArtifactOut]:
    owned_job(store, job_id, owner)
    return [ArtifactOut.from_row(a, job_id) for a in store.list_artifacts(job_id)]


@router.delete(
    "/{job_id}/artifacts",
    status_code=204,
    response_class=Response,
    responses={**NOT_FOUND, **problem_responses(409)},
    summary="Delete a finished job's artifacts (files and entries); the job and its metrics stay",
)
def delete_artifacts(job_id: str, store: StoreDep, owner: CurrentOwner) -> Response:
    job = owned_job(store, job_id, owner)
    if not job.status.is_terminal:
        raise Problem(409, f"job {job_id!r} is {job.status.value}; cancel it or wait for it to end first")
    for artifact in store.delete_artifacts(job_id):
        Path(artifact.path).unlink(missing_ok=True)
    return Response(status_code=204)


def check_artifact_name(name: str) -> None:
    """Names are the relative names the worker registered; anything that could climb out is refused."""
    parts = name.replace("\\", "/").split("/")
    if not name or name.startswith("/") or "\\" in name or "\x00" in name or any(p in ("", ".", "..") for p in parts):
        raise Problem(
            400,
            f"artifact name {name!r} is not allowed: names are relative, without '..', '.', empty parts or "
            "backslashes; GET /v1/jobs/{id}/artifacts lists them",
        )


@router.get(
    "/{job_id}/artifacts/{name:path}",
    response_class=FileResponse,
    responses={**problem_responses(400, 404), 200: {"content": {"application/octet-stream": {}}}},
    summary="Download one artifact (streamed)",
)
def download_artifact(job_id: str, name: str, store: StoreDep, owner: CurrentOwner) -> FileResponse:
    check_artifact_name(name)
    owned_job(store, job_id, owner)
    artifact = store.get_artifact(job_id, name)
    if artifact is None:
        raise Problem(404, f"job {job_id!r} has no artifact {name!r}")
    path = Path(artifact.path)
    if not path.is_file():
        raise Problem(404, f"artifact {name!r} is registered but its file is gone from the server")
    return FileResponse(path, filename=path.name, media_type="application/octet-stream")
