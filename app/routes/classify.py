"""``POST /classify`` and ``POST /classify/batch``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from app.errors import responses
from app.runtime import ModelRuntime
from app.schemas import (
    BatchClassifyRequest,
    BatchClassifyResponse,
    ClassifyRequest,
    ClassifyResponse,
    check_pair_count,
    check_texts,
)
from app.settings import Settings

router = APIRouter(tags=["classify"])


def hot_path_state(request: Request) -> tuple[Settings, ModelRuntime]:
    """The settings and runtime, read off the app instead of through ``app.deps``: FastAPI's
    dependency solving of the two cost ~20 us of the ~120-125 us that the web stack spends on
    a request in process (``python -m bench.route_overhead``, BENCHMARKS.md), time that many
    concurrent clients share with the batching worker under one interpreter lock."""
    state = request.app.state
    return state.settings, state.runtime


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    responses=responses(404, 413, 422, 503),
)
async def classify(body: ClassifyRequest, request: Request) -> dict[str, Any]:
    """Classify one premise/hypothesis pair."""
    settings, runtime = hot_path_state(request)
    check_texts([body], settings.max_text_chars, batch=False)
    results = await runtime.classify(
        [(body.premise, body.hypothesis)], body.adapter, route="/classify"
    )
    return results[0]


@router.post(
    "/classify/batch",
    response_model=BatchClassifyResponse,
    responses=responses(404, 413, 422, 503),
)
async def classify_batch(body: BatchClassifyRequest, request: Request) -> dict[str, Any]:
    """Classify several pairs with one adapter; results in input order."""
    settings, runtime = hot_path_state(request)
    check_pair_count(len(body.pairs), settings.max_pairs_per_request)
    check_texts(body.pairs, settings.max_text_chars, batch=True)
    pairs = [(pair.premise, pair.hypothesis) for pair in body.pairs]
    return {"results": await runtime.classify(pairs, body.adapter, route="/classify/batch")}
