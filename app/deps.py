"""Dependencies, as ``Annotated`` aliases. All are ``async`` so none costs a threadpool hop."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.evaluation import EvaluationService
from app.jobs import JobRunner
from app.runtime import ModelRuntime, Ready
from app.settings import Settings


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_runtime(request: Request) -> ModelRuntime:
    return request.app.state.runtime


async def get_ready(request: Request) -> Ready:
    """The loaded model, or 503 with Retry-After while it loads."""
    runtime: ModelRuntime = request.app.state.runtime
    return runtime.require_ready()


async def get_evaluation(request: Request) -> EvaluationService:
    return request.app.state.evaluation


async def get_jobs(request: Request) -> JobRunner:
    evaluation: EvaluationService = request.app.state.evaluation
    return evaluation.runner


_bearer = HTTPBearer(auto_error=False, description="NLI_API_KEY, when the server has one")


async def require_admin(
    settings: Annotated[Settings, Depends(get_settings)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Admin routes need ``Authorization: Bearer <NLI_API_KEY>`` when a key is set."""
    if settings.api_key is None:
        return
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(
            401, "this route needs Authorization: Bearer <key>", {"WWW-Authenticate": "Bearer"}
        )
    expected = settings.api_key.get_secret_value().encode()
    # Constant time, so the answer's timing says nothing about how much of the key matched.
    if not hmac.compare_digest(credentials.credentials.encode(), expected):
        raise HTTPException(403, "the API key is wrong")


SettingsDep = Annotated[Settings, Depends(get_settings)]
RuntimeDep = Annotated[ModelRuntime, Depends(get_runtime)]
ReadyDep = Annotated[Ready, Depends(get_ready)]
EvaluationDep = Annotated[EvaluationService, Depends(get_evaluation)]
JobsDep = Annotated[JobRunner, Depends(get_jobs)]
AdminDep = Depends(require_admin)
