"""A small typed wrapper over the service's `/v1` HTTP API (README, "API summary").

Every failure becomes one of three exceptions that the CLI maps to exit codes: `Unreachable` (no answer),
`AuthRefused` (401/403) and `ApiError` (any other error answer, carrying the problem+json body, whose
`errors` name the field or line at fault).

Example:
    >>> with ApiClient("http://127.0.0.1:8000", "key") as api:   # doctest: +SKIP
    ...     job = api.submit_job({"model": "builtin:tiny-llama", "dataset": "builtin:restaurants"})
    ...     api.get_job(job["id"])["status"]
    'queued'
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

JSONDict = dict[str, Any]
FINAL_STATES = ("succeeded", "failed", "cancelled")
METRICS_PAGE = 1000


class ClientError(Exception):
    """Base of the errors this module raises."""


class Unreachable(ClientError):
    """No HTTP answer at all: refused connection, DNS failure, timeout."""


class ApiError(ClientError):
    """An error answer. `detail` is the server's message; `errors` its field-level entries, if any."""

    def __init__(self, status: int, detail: str, body: JSONDict | None = None):
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail
        self.body = body or {}

    @property
    def errors(self) -> list[JSONDict]:
        errors = self.body.get("errors")
        return errors if isinstance(errors, list) else []


class AuthRefused(ApiError):
    """401 or 403: the key is missing, unknown, revoked or expired."""


class ApiClient:
    """One connection to the service. Use as a context manager, or call `close()`."""

    def __init__(self, url: str, api_key: str | None, *, timeout: float = 30.0):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url
        self._http = httpx.Client(base_url=url, headers=headers, timeout=timeout)

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # --- transport ------------------------------------------------------------------------------------------

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise Unreachable(f"cannot reach the QAA server at {self.url}: {_reason(exc)}") from exc
        _raise_for_problem(response)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._send(method, path, **kwargs).json()

    # --- jobs -----------------------------------------------------------------------------------------------

    def submit_job(self, spec: JSONDict) -> JSONDict:
        return self._json("POST", "/v1/jobs", json=spec)

    def get_job(self, job_id: str) -> JSONDict:
        return self._json("GET", f"/v1/jobs/{job_id}")

    def list_jobs(self, states: list[str] | None = None, limit: int = 50) -> list[JSONDict]:
        """Up to `limit` of the caller's jobs, newest first, following the cursor across pages."""
        jobs: list[JSONDict] = []
        cursor = None
        while len(jobs) < limit:
            params: dict[str, Any] = {"limit": min(limit - len(jobs), 100), "status": states or []}
            if cursor:
                params["cursor"] = cursor
            page = self._json("GET", "/v1/jobs", params=params)
            jobs += page["jobs"]
            cursor = page.get("next_cursor")
            if not cursor:
                break
        return jobs

    def cancel_job(self, job_id: str) -> JSONDict:
        return self._json("POST", f"/v1/jobs/{job_id}/cancel")

    def metrics_page(self, job_id: str, after_step: int = -1) -> JSONDict:
        return self._json("GET", f"/v1/jobs/{job_id}/metrics", params={"after_step": after_step, "limit": METRICS_PAGE})

    def metrics(self, job_id: str) -> list[JSONDict]:
        """Every metric point of a job, in step order."""
        points: list[JSONDict] = []
        after = -1
        while True:
            page = self.metrics_page(job_id, after)
            points += page["points"]
            if len(page["points"]) < METRICS_PAGE:
                return points
            after = page["next_after_step"]

    def artifacts(self, job_id: str) -> list[JSONDict]:
        return self._json("GET", f"/v1/jobs/{job_id}/artifacts")

    def download_artifact(self, artifact: JSONDict, dest: Path) -> str:
        """Stream one artifact to `dest` (through a `.part` file) and return its SHA-256."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        digest = hashlib.sha256()
        try:
            with self._http.stream("GET", artifact["url"]) as response:
                if response.is_error:
                    response.read()
                    _raise_for_problem(response)
                with part.open("wb") as f:
                    for chunk in response.iter_bytes(1 << 20):
                        digest.update(chunk)
                        f.write(chunk)
        except httpx.TransportError as exc:
            part.unlink(missing_ok=True)
            raise Unreachable(f"download of {artifact['name']} from {self.url} broke off: {_reason(exc)}") from exc
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        part.replace(dest)
        return digest.hexdigest()

    # --- service --------------------------------------------------------------------------------------------

    def estimate(self, spec: JSONDict, *, d_in: int | None = None, adapters: int | None = None) -> JSONDict:
        params = {k: v for k, v in (("d_in", d_in), ("adapters", adapters)) if v is not None}
        return self._json("POST", "/v1/estimate", json=spec, params=params)

    def backends(self) -> list[JSONDict]:
        return self._json("GET", "/v1/backends", timeout=180)

    def upload_dataset(self, path: Path) -> JSONDict:
        """POST a JSONL file as it is, streamed; the server checks it line by line."""
        with path.open("rb") as f:
            return self._json(
                "POST",
                "/v1/datasets",
                params={"name": path.name},
                content=_chunks(f),
                headers={"Content-Type": "application/x-ndjson", "Content-Length": str(path.stat().st_size)},
            )

    def datasets(self) -> list[JSONDict]:
        return self._json("GET", "/v1/datasets")

    def delete_dataset(self, dataset_id: str) -> None:
        self._send("DELETE", f"/v1/datasets/{quote(dataset_id, safe='')}")

    # --- credentials ----------------------------------------------------------------------------------------

    def set_ibm_token(self, token: str, instance: str | None = None) -> JSONDict:
        """PUT the token (in the body only: never in a URL, a log line or an answer)."""
        body = {"token": token, **({"instance": instance} if instance else {})}
        return self._json("PUT", "/v1/credentials/ibm", json=body)

    def credentials(self) -> list[JSONDict]:
        return self._json("GET", "/v1/credentials")

    def delete_ibm_token(self) -> None:
        self._send("DELETE", "/v1/credentials/ibm")


def _chunks(f) -> Iterator[bytes]:
    while chunk := f.read(1 << 20):
        yield chunk


def _reason(exc: httpx.TransportError) -> str:
    if isinstance(exc, httpx.ConnectError):
        return f"connection failed ({exc})" if str(exc) else "connection failed"
    if isinstance(exc, httpx.TimeoutException):
        return "no answer in time"
    return f"{type(exc).__name__}: {exc}"


def _raise_for_problem(response: httpx.Response) -> None:
    if not response.is_error:
        return
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = {}
    if not isinstance(body, dict):
        body = {}
    detail = body.get("detail") if isinstance(body.get("detail"), str) else response.reason_phrase
    kind = AuthRefused if response.status_code in (401, 403) else ApiError
    raise kind(response.status_code, detail or f"HTTP {response.status_code}", body)
