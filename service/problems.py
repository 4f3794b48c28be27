"""Errors as `application/problem+json` (RFC 9457): every failure names what was wrong, and where.

Routes raise `Problem`; the handlers below turn it, FastAPI's own HTTP and validation errors, and anything
unexpected into the same body shape. An unexpected error answers 500 without its message (it may hold paths
or secrets); the traceback goes to the log.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

MEDIA_TYPE = "application/problem+json"

log = logging.getLogger("qaa.api")


class Problem(Exception):
    """An error answer. `extra` members (`errors`, `line`, `checks`, ...) go into the body beside `detail`."""

    def __init__(self, status: int, detail: str, *, headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers
        self.extra = extra

    def response(self) -> JSONResponse:
        return problem_response(self.status, self.detail, headers=self.headers, **self.extra)


def field_problem(status: int, path: str, message: str) -> Problem:
    """A problem about one input, named by `path` (`dataset`, `quantum.max_circuits`, `cursor`)."""
    return Problem(status, f"{path}: {message}", errors=[{"path": path, "message": message, "type": "value_error"}])


def problem_response(status: int, detail: str, *, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    body = {"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status, "detail": detail}
    body.update(extra)
    return JSONResponse(body, status_code=status, headers=headers, media_type=MEDIA_TYPE)


def field_errors(errors: list[dict[str, Any]]) -> list[dict[str, str]]:
    """FastAPI's parameter errors as `{"path", "message", "type"}` (the shape of `spec.validation_errors`)."""
    return [
        {"path": ".".join(str(part) for part in err["loc"]), "message": err["msg"], "type": err["type"]}
        for err in errors
    ]


async def _on_problem(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Problem)
    return exc.response()


async def _on_http(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).description
    return problem_response(exc.status_code, detail, headers=exc.headers)


async def _on_validation(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = field_errors(list(exc.errors()))
    detail = "; ".join(f"{e['path']}: {e['message']}" for e in errors)
    return problem_response(422, detail, errors=errors)


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem_response(500, "internal error; the server log has the details")


def install_handlers(app: FastAPI) -> None:
    app.add_exception_handler(Problem, _on_problem)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(Exception, _on_unexpected)


#: OpenAPI description of a problem body, for the `responses=` of routes.
PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "path": {"type": "string"},
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                },
            },
        },
        "line": {"type": "integer"},
    },
    "additionalProperties": True,
}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` entries declaring problem+json bodies for `statuses`."""
    return {
        status: {
            "description": HTTPStatus(status).phrase,
            "content": {MEDIA_TYPE: {"schema": PROBLEM_SCHEMA}},
        }
        for status in statuses
    }
