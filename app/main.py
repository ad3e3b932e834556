"""The app factory: settings, lifespan, middleware, routers and error handlers."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from app.errors import COMMON_RESPONSES, install_error_handlers
from app.evaluation import EvaluationService
from app.gc_pauses import GCPauseTimer
from app.jobs import JobStore
from app.metrics import Metrics
from app.middleware import RequestContextMiddleware
from app.routes import adapters, classify, evaluate, health, web
from app.runtime import ModelRuntime
from app.settings import Settings, load_settings
from nli import __version__

logger = logging.getLogger(__name__)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Open the jobs store, start loading the model; on shutdown stop jobs, then the model."""
    settings: Settings = app.state.settings
    store = JobStore(settings.data_dir)
    runtime = ModelRuntime(settings, app.state.metrics, on_fatal=app.state.on_fatal)
    evaluation = EvaluationService(settings, runtime, store, app.state.metrics)
    app.state.runtime = runtime
    app.state.evaluation = evaluation
    gc_timer = GCPauseTimer(app.state.metrics.gc_pauses)
    gc_timer.install()
    runtime.on_ready(lambda _: evaluation.runner.start())
    if settings.api_key is None and settings.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("NLI_API_KEY is not set: admin routes are open to anyone who can connect")
    runtime.start()
    try:
        yield
    finally:
        logger.info("shutting down: stopping jobs, then the model")
        evaluation.runner.stop()
        runtime.stop()
        store.close()
        gc_timer.remove()


def create_app(
    settings: Settings | None = None, *, on_fatal: Callable[[str], None] | None = None
) -> FastAPI:
    """Build the service. ``settings`` defaults to the environment (``NLI_*``); a ``ConfigError``
    on bad values. ``on_fatal(message)`` is called if the model cannot be loaded."""
    settings = settings if settings is not None else load_settings()
    metrics = Metrics()
    app = FastAPI(
        title="NLI classifier",
        summary="Natural language inference with a 4-bit base model and hot-swapped adapters.",
        version=__version__,
        lifespan=lifespan,
        responses=COMMON_RESPONSES,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.on_fatal = on_fatal
    install_error_handlers(app)

    def body_limit(method: str, path: str) -> int:
        if path == "/evaluate" and method == "POST":
            return settings.max_upload_body_bytes
        return settings.max_json_body_bytes

    app.add_middleware(RequestContextMiddleware, metrics=metrics, body_limit=body_limit)
    for module in (classify, evaluate, adapters, health, web):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=web.STATIC_DIR), name="static")
    _document_limits(app, settings)
    return app


def _document_limits(app: FastAPI, settings: Settings) -> None:
    """Write what depends on settings into the OpenAPI schema: limits, and authentication."""
    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = default_openapi()
        components = schema.get("components", {}).get("schemas", {})
        for model in ("PairIn", "ClassifyRequest"):
            for field in ("premise", "hypothesis"):
                prop = components.get(model, {}).get("properties", {}).get(field)
                if prop is not None:
                    prop["maxLength"] = settings.max_text_chars
        pairs = components.get("BatchClassifyRequest", {}).get("properties", {}).get("pairs")
        if pairs is not None:
            pairs["maxItems"] = settings.max_pairs_per_request
        if settings.api_key is None:  # admin routes are open: say so
            schema.get("components", {}).pop("securitySchemes", None)
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    operation.pop("security", None)
                    for code in ("401", "403"):
                        operation.get("responses", {}).pop(code, None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
