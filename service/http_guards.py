"""Guards every HTTP answer passes through, before routing and authentication: bounded bodies, safe headers.

* `BodyLimit`: a request body is refused with 413 as soon as it is larger than its route's bound (an upload at
  `QAA_MAX_UPLOAD_BYTES`, anything else at `MAX_JSON_BYTES`), whether or not its key is valid: a declared
  `Content-Length` over the bound is answered before one byte is read, and a chunked body is counted as it
  arrives. So no request makes the API hold more than the bound in memory, and an unauthenticated caller
  cannot make it read a 300 MB body before answering 401.
* `SecurityHeaders`: a Content-Security-Policy that lets the dashboard load only its own files and never be
  framed, `nosniff`, and no referrer, on every answer (errors and downloads included). FastAPI's `/docs` page
  loads Swagger UI from its CDN and an inline bootstrap script, so it gets a policy that allows exactly that.
"""

from __future__ import annotations

import json

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.problems import MEDIA_TYPE

#: Largest JSON body of any route (specs, credentials): specs are small; 1 MiB leaves room for comments.
MAX_JSON_BYTES = 1 << 20
UPLOAD_ROUTE = ("POST", "/v1/datasets")

CSP = "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
    "style-src 'self' https://cdn.jsdelivr.net; img-src 'self' data: https://fastapi.tiangolo.com; "
    "frame-ancestors 'none'; base-uri 'none'"
)
DOCS_PATHS = ("/docs", "/redoc")
HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
]


class BodyTooLarge(HTTPException):
    """Raised from `receive` mid-body: an HTTPException, so FastAPI's body parsing passes it on as it is and the
    app's handler answers it as problem+json; the middleware answers it itself if it reaches that far."""

    def __init__(self, limit: int, upload: bool):
        super().__init__(413, _too_large(limit, upload))


def _problem(status: int, detail: str) -> tuple[Message, Message]:
    body = json.dumps({"type": "about:blank", "title": "Content Too Large", "status": status, "detail": detail})
    start = {
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", MEDIA_TYPE.encode()), (b"content-length", str(len(body)).encode())],
    }
    return start, {"type": "http.response.body", "body": body.encode()}


def _too_large(limit: int, upload: bool) -> str:
    what = "the upload" if upload else "the request body"
    setting = " (QAA_MAX_UPLOAD_BYTES)" if upload else ""
    return f"{what} is larger than the limit of {limit} bytes{setting}"


class BodyLimit:
    """Pure ASGI middleware: count the body before the app sees it (see the module docstring)."""

    def __init__(self, app: ASGIApp, json_limit: int = MAX_JSON_BYTES):
        self.app, self.json_limit = app, json_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        upload = (scope["method"], scope["path"].rstrip("/")) == UPLOAD_ROUTE
        limit = scope["app"].state.settings.max_upload_bytes if upload else self.json_limit
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            for message in _problem(413, _too_large(limit, upload)):
                await send(message)
            return
        received = 0
        started = False

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit, upload)
            return message

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except BodyTooLarge as exc:
            if started:
                raise
            for message in _problem(413, exc.detail):
                await send(message)


class SecurityHeaders:
    """Pure ASGI middleware adding the headers of the module docstring to every answer."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        csp = (DOCS_CSP if scope["path"].startswith(DOCS_PATHS) else CSP).encode()

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(b"content-security-policy", csp), *HEADERS]
                message["headers"] = [*message.get("headers", []), *(h for h in extra if h[0] not in present)]
            await send(message)

        await self.app(scope, receive, with_headers)
