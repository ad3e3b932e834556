"""``POST /classify`` and ``POST /classify/batch``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.deps import RuntimeDep, SettingsDep
from app.errors import responses
from app.schemas import (
    BatchClassifyRequest,
    BatchClassifyResponse,
    ClassifyRequest,
    ClassifyResponse,
    check_pair_count,
    check_texts,
)

router = APIRouter(tags=["classify"])


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    responses=responses(404, 413, 422, 503),
)
async def classify(
    body: ClassifyRequest, settings: SettingsDep, runtime: RuntimeDep
) -> dict[str, Any]:
    """Classify one premise/hypothesis pair."""
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
async def classify_batch(
    body: BatchClassifyRequest, settings: SettingsDep, runtime: RuntimeDep
) -> dict[str, Any]:
    """Classify several pairs with one adapter; results in input order."""
    check_pair_count(len(body.pairs), settings.max_pairs_per_request)
    check_texts(body.pairs, settings.max_text_chars, batch=True)
    pairs = [(pair.premise, pair.hypothesis) for pair in body.pairs]
    return {"results": await runtime.classify(pairs, body.adapter, route="/classify/batch")}
