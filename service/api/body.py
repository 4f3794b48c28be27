"""Reading a job spec from a request body: bounded, JSON-checked, then validated once by `service.spec`.

Routes that take a spec read the raw body themselves rather than letting FastAPI validate it, so the error
paths are exactly `service.spec.validation_errors`'s (`method.qubits`, not `body.method.qaa.qubits`) and
malformed JSON is a 400 that says where it broke.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from pydantic import ValidationError

from service.problems import Problem
from service.spec import JobSpec, parse_spec, validation_errors


async def read_json(request: Request) -> Any:
    """The decoded body; its size is bounded before it gets here (`service.http_guards.BodyLimit`)."""
    body = await request.body()
    if not body:
        raise Problem(400, "the request body is empty; send the job spec as JSON")
    try:
        return json.loads(body)
    except UnicodeDecodeError as exc:
        raise Problem(400, f"the request body is not UTF-8 text: {exc.reason} at byte {exc.start}") from exc
    except json.JSONDecodeError as exc:
        raise Problem(
            400, f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}", line=exc.lineno
        ) from exc
    except RecursionError:  # json.loads recurses once per level: thousands of nested [ or { overflow it
        raise Problem(400, "the JSON nests too deeply") from None


async def read_spec(request: Request) -> JobSpec:
    """The request's job spec, or a 400 (not JSON) / 422 (invalid, with one entry per field at fault)."""
    data = await read_json(request)
    try:
        return parse_spec(data)
    except ValidationError as exc:
        errors = validation_errors(exc)
        raise Problem(422, "; ".join(f"{e['path']}: {e['message']}" for e in errors), errors=errors) from exc


#: `openapi_extra` for routes that read a spec with `read_spec`: documents the body as a JobSpec.
SPEC_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/JobSpec"}}},
    }
}
