"""``POST /evaluate`` (multipart) and the evaluation jobs it creates."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.responses import JSONResponse

from app.deps import EvaluationDep, JobsDep
from app.errors import responses
from app.schemas import AdapterName, EvaluationReport, JobAccepted, JobStatus

router = APIRouter(prefix="/evaluate", tags=["evaluate"])


@router.post(
    "",
    response_model=EvaluationReport,
    responses={
        202: {"model": JobAccepted, "description": "Queued as a job"},
        **responses(400, 404, 413, 415, 422, 503),
    },
)
async def evaluate(
    evaluation: EvaluationDep,
    file: Annotated[UploadFile, File(description=".jsonl, .json, .csv, .tsv or .parquet")],
    adapter: Annotated[AdapterName | None, Form()] = None,
    compare_base: Annotated[bool, Form()] = False,
    run_async: Annotated[bool, Form(alias="async")] = False,
) -> Any:
    """Evaluate a labelled file: a report for small files, else a job (202)."""
    status, body = await evaluation.submit(
        file.file,
        file.filename,
        adapter=adapter,
        compare_base=compare_base,
        run_async=run_async,
    )
    if status == 202:
        return JSONResponse(body, status_code=202)
    return body


@router.get("/{job_id}", response_model=JobStatus, responses=responses(404))
def get_job(job_id: str, jobs: JobsDep) -> dict[str, Any]:
    """An evaluation job's status, progress, and result once it succeeded."""
    return jobs.store.get(job_id).public()


@router.delete("/{job_id}", response_model=JobStatus, responses=responses(404, 409))
def cancel_job(job_id: str, jobs: JobsDep) -> dict[str, Any]:
    """Cancel a queued or running evaluation job."""
    return jobs.cancel(job_id).public()
