"""Request and response models. Length limits that come from settings (text length, pairs per
request) are checked by ``check_texts`` and written into the OpenAPI schema by ``main``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from app.settings import ADAPTER_NAME_PATTERN
from nli.labels import Label

# Not empty, not only whitespace: a pattern rather than a validator, so the schema says it too.
Text = Annotated[
    str,
    StringConstraints(min_length=1, pattern=r"\S"),
    Field(description="Text with at least one non-space character."),
]
AdapterName = Annotated[
    str,
    StringConstraints(pattern=ADAPTER_NAME_PATTERN),
    Field(description="An adapter name, or 'base' for the bare base model.", examples=["base"]),
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PairIn(_Strict):
    """One premise/hypothesis pair."""

    premise: Text
    hypothesis: Text


class ClassifyRequest(PairIn):
    """A pair, and the adapter to score it with (default: the current default adapter)."""

    adapter: AdapterName | None = None


class BatchClassifyRequest(_Strict):
    """Pairs scored with one adapter; answered in input order."""

    pairs: list[PairIn] = Field(min_length=1)
    adapter: AdapterName | None = None


class LabelScore(BaseModel):
    label: Label
    score: float


class ClassifyResponse(BaseModel):
    """The predicted label, its probability, all three probabilities in label order."""

    label: Label
    score: float
    scores: list[LabelScore]
    adapter: str
    base_model: str


class BatchClassifyResponse(BaseModel):
    results: list[ClassifyResponse]


class LoadAdapterRequest(_Strict):
    """Load ``<adapters dir>/<name>``; ``replace`` swaps in changed files."""

    name: AdapterName
    replace: bool = False


class SetDefaultRequest(_Strict):
    name: AdapterName


class AdapterInfo(BaseModel):
    name: str
    base_model: str
    size_bytes: int
    source: Literal["adapters_dir", "builtin"]
    fingerprint: str
    prompt_format: int
    created_at: str
    loaded_at: str
    metrics: dict[str, Any]


class LoadAdapterResponse(AdapterInfo):
    status: Literal["loaded", "unchanged", "replaced"]


class AdapterList(BaseModel):
    default: str
    loaded: list[AdapterInfo]
    available: list[str]


class UnloadResponse(BaseModel):
    """``detached`` is false while in-flight work still uses the adapter (freed after it)."""

    name: str
    detached: bool


class DefaultAdapterResponse(BaseModel):
    default: str


class EvaluationReport(BaseModel):
    """``nli.evaluation.evaluate_dataset``'s report, as ``nli-train evaluate`` writes it."""

    model_config = ConfigDict(extra="allow")

    metrics: dict[str, Any]
    base: dict[str, Any] | None
    cases: dict[str, Any] | None
    n: int
    dropped: int
    pairs_per_s: float
    adapter: str
    base_model: str
    source: str
    seconds: float


JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class JobAccepted(BaseModel):
    job_id: str
    status: JobState


class JobProgress(BaseModel):
    done: int
    total: int


class JobError(BaseModel):
    type: str
    message: str


class JobStatus(BaseModel):
    job_id: str
    status: JobState
    progress: JobProgress
    result: EvaluationReport | None
    error: JobError | None
    adapter: str
    compare_base: bool
    source: str
    created_at: str
    started_at: str | None
    finished_at: str | None


class Health(BaseModel):
    status: Literal["ok"]


class ReadyResponse(BaseModel):
    status: Literal["ready"]
    base_model: str
    quantization: str
    dequantized: bool
    device: str
    cuda_graphs: str = Field(
        description="'on', 'off' (disabled, or not on CUDA) or 'failed: <why>' (scoring eagerly)"
    )
    cuda_graphs_recorded: int = Field(
        description="CUDA graphs recorded so far (batch shapes that replay; 0 when off)"
    )
    default_adapter: str


def check_texts(pairs: Sequence[PairIn], max_chars: int, *, batch: bool) -> None:
    """422 in FastAPI's own shape for texts over ``NLI_MAX_TEXT_CHARS``."""
    errors: list[dict[str, Any]] = []
    for index, pair in enumerate(pairs):
        for field in ("premise", "hypothesis"):
            if len(getattr(pair, field)) > max_chars:
                loc: tuple[str | int, ...] = (
                    ("body", "pairs", index, field) if batch else ("body", field)
                )
                errors.append(
                    {
                        "type": "string_too_long",
                        "loc": loc,
                        "msg": f"String should have at most {max_chars} characters",
                        "input": None,
                        "ctx": {"max_length": max_chars},
                    }
                )
    if errors:
        raise RequestValidationError(errors)


def check_pair_count(count: int, max_pairs: int) -> None:
    """422 in FastAPI's own shape for more than ``NLI_MAX_PAIRS_PER_REQUEST`` pairs."""
    if count > max_pairs:
        raise RequestValidationError(
            [
                {
                    "type": "too_long",
                    "loc": ("body", "pairs"),
                    "msg": f"List should have at most {max_pairs} items, not {count}",
                    "input": None,
                    "ctx": {"max_length": max_pairs},
                }
            ]
        )
