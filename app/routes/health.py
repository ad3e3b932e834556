"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from app.deps import RuntimeDep
from app.errors import responses
from app.metrics import Metrics
from app.schemas import Health, ReadyResponse

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health)
async def health() -> dict[str, str]:
    """The process is alive (the model may still be loading)."""
    return {"status": "ok"}


@router.get("/ready", response_model=ReadyResponse, responses=responses(503))
async def ready(runtime: RuntimeDep) -> dict[str, Any]:
    """The base model is loaded and requests are served (503 with Retry-After until then)."""
    return runtime.describe()


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
)
async def metrics(request: Request) -> Response:
    """Prometheus metrics."""
    collectors: Metrics = request.app.state.metrics
    return Response(collectors.render(), media_type=collectors.content_type)
