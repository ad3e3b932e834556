"""One error shape for every error, and the one place that maps domain errors to HTTP codes.

Every error body is ``{"error": {"type", "message", "details"?, "request_id"}}``, FastAPI's own
404/405/422 included. A 500 is logged with its traceback and says nothing about internals.
"""

from __future__ import annotations

import json
import logging
import re
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from nli.errors import (
    AdapterConflictError,
    AdapterInvalidError,
    AdapterNotFoundError,
    DataError,
    InputTooLongError,
    JobNotFoundError,
    ModelLoadError,
    NLIError,
    NotReadyError,
    PayloadTooLargeError,
    QueueFullError,
    UnsupportedFileTypeError,
)

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-ID"
RETRY_AFTER_S = {"not_ready": 5, "queue_full": 1, "resource_exhausted": 1}


class ResourceExhaustedError(NLIError):
    """A pair could not be scored for lack of device memory, even alone."""


class JobConflictError(NLIError):
    """The job is already finished and cannot be cancelled."""


# Most specific first: the first matching class decides.
STATUS_OF: list[tuple[type[NLIError], int, str]] = [
    (DataError, 400, "invalid_data"),
    (AdapterNotFoundError, 404, "adapter_not_found"),
    (AdapterInvalidError, 400, "invalid_adapter"),  # also BaseModelMismatchError
    (AdapterConflictError, 409, "adapter_conflict"),
    (JobNotFoundError, 404, "job_not_found"),
    (JobConflictError, 409, "job_conflict"),
    (PayloadTooLargeError, 413, "payload_too_large"),
    (UnsupportedFileTypeError, 415, "unsupported_file_type"),
    (InputTooLongError, 422, "input_too_long"),
    (NotReadyError, 503, "not_ready"),
    (ModelLoadError, 503, "not_ready"),
    (QueueFullError, 503, "queue_full"),
    (ResourceExhaustedError, 503, "resource_exhausted"),
]
HTTP_TYPES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_file_type",
    422: "validation_error",
    503: "unavailable",
}


class ErrorBody(BaseModel):
    """What went wrong; ``request_id`` matches the ``X-Request-ID`` header and the logs."""

    type: str
    message: str
    details: dict[str, Any] | list[Any] | None = None
    request_id: str


class ErrorResponse(BaseModel):
    """The shape of every error response."""

    error: ErrorBody


def _responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {
        code: {"model": ErrorResponse, "description": HTTPStatus(code).phrase} for code in codes
    }


# Errors every route can answer, declared in OpenAPI so clients and fuzzers know the shape.
COMMON_RESPONSES = _responses(422, 500)
MODEL_RESPONSES = _responses(503)
ADMIN_RESPONSES = _responses(401, 403)


def responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the given error codes, all with the one error shape."""
    return _responses(*codes)


def request_id_of(request: Request) -> str:
    """The id the request-context middleware gave this request."""
    return str(getattr(request.state, "request_id", "") or "-")


def error_content(
    error_type: str, message: str, request_id: str, details: Any = None
) -> dict[str, Any]:
    """The JSON body of an error."""
    body: dict[str, Any] = {"type": error_type, "message": message, "request_id": request_id}
    if details:
        body["details"] = details
    return {"error": body}


def error_bytes(error_type: str, message: str, request_id: str) -> bytes:
    """An error body for responses sent below FastAPI (middleware)."""
    return json.dumps(error_content(error_type, message, request_id)).encode()


def error_response(
    request: Request,
    status: int,
    error_type: str,
    message: str,
    *,
    details: Any = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """A JSON error response in the one shape, carrying the request id."""
    rid = request_id_of(request)
    all_headers = {REQUEST_ID_HEADER: rid, **(headers or {})}
    return JSONResponse(
        error_content(error_type, message, rid, details), status_code=status, headers=all_headers
    )


def classify_error(exc: NLIError) -> tuple[int, str]:
    """HTTP status and error type of a domain error (500 for unmapped ones: those are bugs)."""
    for cls, status, error_type in STATUS_OF:
        if isinstance(exc, cls):
            return status, error_type
    return 500, "internal_error"


async def _nli_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, NLIError)
    status, error_type = classify_error(exc)
    if status == 500:
        return await _unhandled(request, exc)
    headers = {}
    if error_type in RETRY_AFTER_S:
        headers["Retry-After"] = str(RETRY_AFTER_S[error_type])
    if status >= 500:
        logger.info("%s: %s", error_type, exc.message)
    return error_response(
        request, status, error_type, exc.message, details=exc.details or None, headers=headers
    )


def _clean_validation_errors(errors: Any) -> list[dict[str, Any]]:
    # Pydantic echoes the offending input; it can be huge or sensitive, so only say where and why.
    return [
        {"loc": list(err.get("loc", ())), "msg": str(err.get("msg", "")), "type": err.get("type")}
        for err in errors
    ]


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    details = _clean_validation_errors(exc.errors())
    first = details[0] if details else {"loc": [], "msg": "invalid request"}
    where = ".".join(str(part) for part in first["loc"])
    message = f"{where}: {first['msg']}" if where else str(first["msg"])
    return error_response(request, 422, "validation_error", message, details={"errors": details})


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400 and isinstance(exc.__cause__, UnicodeDecodeError):
        # FastAPI answers 400 for a JSON body that is not UTF-8, 422 for one that is not JSON:
        # both are an invalid body here.
        return error_response(request, 422, "validation_error", "the body is not UTF-8 JSON")
    status = exc.status_code
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    message = exc.detail if isinstance(exc.detail, str) else phrase
    if status == 404 and message == "Not Found":
        message = f"no route {request.method} {request.url.path}"
    error_type = HTTP_TYPES.get(status, "error")
    headers = dict(exc.headers or {})
    if status == 405:
        # Starlette names only the first route that matched the path; list them all.
        allowed = _allowed_methods(request)
        if allowed:
            headers["Allow"] = ", ".join(allowed)
    return error_response(request, status, error_type, message, headers=headers)


def _allowed_methods(request: Request) -> list[str]:
    """The documented methods of the request's path (from the OpenAPI schema, built once)."""
    state = request.app.state
    patterns: list[tuple[re.Pattern[str], list[str]]] | None = getattr(
        state, "allowed_methods", None
    )
    if patterns is None:
        patterns = []
        for template, operations in request.app.openapi().get("paths", {}).items():
            source = re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template))
            patterns.append((re.compile(f"^{source}$"), sorted(m.upper() for m in operations)))
        state.allowed_methods = patterns
    for regex, methods in patterns:
        if regex.match(request.url.path):
            return methods
    return []


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    logger.error(
        "unhandled error on %s %s [request %s]",
        request.method,
        request.url.path,
        request_id_of(request),
        exc_info=exc,
    )
    return error_response(
        request, 500, "internal_error", "internal server error; see the server log"
    )


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that give every error the one shape."""
    app.add_exception_handler(NLIError, _nli_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unhandled)
