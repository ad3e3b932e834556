"""``app.serving_stack``: what uvicorn serves with, and the warning for the slow fallback."""

from __future__ import annotations

import importlib.util
import logging

import pytest

from app.serving_stack import FAST, log_serving_stack, serving_stack


def test_the_installed_project_serves_with_httptools_and_uvloop() -> None:
    # Both are project dependencies: an install without them serves ~25% slower per request.
    assert serving_stack() == FAST


@pytest.mark.parametrize(
    ("missing", "stack"),
    [
        ({"httptools"}, {"http": "h11", "loop": "uvloop"}),
        ({"uvloop"}, {"http": "httptools", "loop": "asyncio"}),
        ({"httptools", "uvloop"}, {"http": "h11", "loop": "asyncio"}),
    ],
)
def test_without_the_fast_parts_the_fallback_is_named_in_a_warning(
    missing: set[str],
    stack: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name in missing else find_spec(name)
    )
    with caplog.at_level(logging.INFO, logger="app.serving_stack"):
        assert log_serving_stack() == stack
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert f"serving with {stack['http']} and {stack['loop']}" in record.getMessage()


def test_the_fast_stack_is_logged_as_information(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="app.serving_stack"):
        log_serving_stack()
    (record,) = caplog.records
    assert record.levelno == logging.INFO
    assert record.getMessage() == "serving with httptools and uvloop"
