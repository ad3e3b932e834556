"""Domain errors. The service maps each class to one HTTP status, in one place."""

from __future__ import annotations

from typing import Any


class NLIError(Exception):
    """Base class of every error this project raises on purpose."""

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}


class ConfigError(NLIError):
    """A setting, recipe value or argument is invalid."""


class ModelLoadError(NLIError):
    """The base model could not be resolved, converted or loaded."""


class NotReadyError(NLIError):
    """The base model is still loading."""


class InputTooLongError(NLIError):
    """A pair does not fit the model's token budget even after truncating the premise."""


class DataError(NLIError):
    """Bad contents in an NLI data file: names the source, row and column where known."""

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        row: int | None = None,
        column: str | None = None,
    ) -> None:
        where = []
        if source:
            where.append(source)
        if row is not None:
            where.append(f"row {row}")
        if column:
            where.append(f"column {column!r}")
        full = f"{', '.join(where)}: {message}" if where else message
        details = {k: v for k, v in (("source", source), ("row", row), ("column", column)) if v}
        super().__init__(full, details=details)
        self.source = source
        self.row = row
        self.column = column


class UnsupportedFileTypeError(NLIError):
    """The file's extension is not one of the supported data formats."""


class PayloadTooLargeError(NLIError):
    """An upload or request body is over its size limit."""


class AdapterError(NLIError):
    """Base class of adapter errors."""


class AdapterNotFoundError(AdapterError):
    """No adapter of that name is loaded or present in the adapters dir."""


class AdapterInvalidError(AdapterError):
    """An adapter folder is malformed: bad manifest, missing or corrupt weights, bad name."""


class BaseModelMismatchError(AdapterInvalidError):
    """The adapter's manifest names a different base model than the one loaded."""


class AdapterConflictError(AdapterError):
    """A name is taken by different files, or the default adapter would be removed."""


class JobNotFoundError(NLIError):
    """No evaluation job with that id."""


class QueueFullError(NLIError):
    """The scoring queue is full; retry later."""
