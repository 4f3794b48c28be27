"""The FastAPI application: `create_app()` for tests and embedding, `app` for `uvicorn service.app:app`.

Importing this module reads the settings and nothing else: the store is opened (and migrated) at startup,
and torch, transformers and qiskit are never imported by the API process.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from service import queueing
from service.api import datasets, jobs, system
from service.api.prometheus import LatencyMiddleware, StoreCollector, new_registry
from service.auth import ensure_local_key
from service.problems import install_handlers
from service.settings import Settings, get_settings
from service.spec import JobSpec
from service.store import Store

DASHBOARD_DIR = Path(__file__).resolve().parent / "dashboard"
TITLE = "QAA training service"
VERSION = "0.1.0"


def create_app(settings: Settings | None = None, store: Store | None = None) -> FastAPI:
    """The API. Without `store`, one is opened from `settings` at startup (schema migrated) and closed at
    shutdown; in the embedded default a first start also writes `QAA_HOME/credentials`."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
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
    registry, latency = new_registry()
    registry.register(StoreCollector(lambda: app.state.store, queueing.queue_depths))
    app.state.registry = registry
    app.add_middleware(LatencyMiddleware, histogram=latency)
    install_handlers(app)
    for module in (jobs, datasets, system):
        app.include_router(module.router)

    @app.get("/", include_in_schema=False)
    def dashboard() -> FileResponse:
        return FileResponse(DASHBOARD_DIR / "index.html", media_type="text/html")

    app.mount("/dashboard", StaticFiles(directory=DASHBOARD_DIR), name="dashboard")
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


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
