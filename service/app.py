"""The FastAPI application: `create_app()` for tests and embedding, `app` for `uvicorn service.app:app`.

Importing this module reads the settings and nothing else: the store is opened (and migrated) at startup,
and torch, transformers and qiskit are never imported by the API process.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import DataError

from service import queueing
from service.api import credentials, datasets, jobs, system
from service.api.prometheus import LatencyMiddleware, StoreCollector, new_registry
from service.auth import ensure_local_key
from service.http_guards import BodyLimit, SecurityHeaders
from service.problems import install_handlers, problem_response
from service.ratelimit import limiters
from service.settings import Settings, get_settings, private_home
from service.spec import JobSpec
from service.store import STORE_UNREACHABLE, Store

log = logging.getLogger("qaa.api")

#: Seconds a client is asked to wait while the job store is unreachable (PostgreSQL restarting, failing over).
STORE_RETRY_AFTER_S = 5
DASHBOARD_DIR = Path(__file__).resolve().parent / "dashboard"
TITLE = "QAA training service"
VERSION = "0.1.0"


def create_app(settings: Settings | None = None, store: Store | None = None) -> FastAPI:
    """The API. Without `store`, one is opened from `settings` at startup (schema migrated) and closed at
    shutdown; in the embedded default a first start also writes `QAA_HOME/credentials`."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        private_home(settings)
        opened = app.state.store is None
        if opened:
            app.state.store = Store.from_settings(settings, migrate=True)
        ensure_local_key(app.state.store, settings)
        try:
            yield
        finally:
            if opened:
                app.state.store.close()
                app.state.store = None

    app = FastAPI(title=TITLE, version=VERSION, lifespan=lifespan)
    app.state.settings = settings
    app.state.store = store
    app.state.backends = None
    app.state.devices = {}  # owner -> (listed at, their IBM devices)
    for action, limiter in limiters(settings).items():
        setattr(app.state, f"{action}_limiter", limiter)
    registry, latency = new_registry()
    registry.register(StoreCollector(lambda: app.state.store, queueing.queue_depths))
    app.state.registry = registry
    app.add_middleware(LatencyMiddleware, histogram=latency)
    app.add_middleware(BodyLimit)
    app.add_middleware(SecurityHeaders)  # outermost: every answer carries the headers, 413s included
    install_handlers(app)
    for error in STORE_UNREACHABLE:
        app.add_exception_handler(error, _store_unavailable)
    app.add_exception_handler(DataError, _unstorable_value)
    for module in (jobs, datasets, credentials, system):
        app.include_router(module.router)

    @app.get("/", include_in_schema=False)
    def dashboard() -> FileResponse:
        return FileResponse(DASHBOARD_DIR / "index.html", media_type="text/html")

    app.mount("/dashboard", StaticFiles(directory=DASHBOARD_DIR), name="dashboard")
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


async def _store_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """The store is down or restarting: a 503 the client may retry (like `/readyz`), not an internal error."""
    log.warning("job store unavailable on %s %s: %s", request.method, request.url.path, type(exc).__name__)
    detail = f"the job store is unavailable; retry in {STORE_RETRY_AFTER_S} s"
    return problem_response(503, detail, headers={"Retry-After": str(STORE_RETRY_AFTER_S)})


async def _unstorable_value(request: Request, exc: Exception) -> JSONResponse:
    """A value the database refuses (PostgreSQL: a NUL character in text). The transaction rolled back, so
    nothing changed; the database's message is not echoed (it may quote the value)."""
    log.info("value refused by the job store on %s %s: %s", request.method, request.url.path, type(exc).__name__)
    return problem_response(400, "the request holds a value the job store cannot keep (e.g. a NUL character)")


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus `JobSpec`, which routes read from the raw body (see `service.api.body`)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        spec = JobSpec.model_json_schema(ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(spec.pop("$defs", {}))
        components["JobSpec"] = spec
        app.openapi_schema = schema
    return app.openapi_schema


app = create_app()
