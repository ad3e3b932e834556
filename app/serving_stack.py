"""Which HTTP parser and event loop uvicorn serves with.

uvicorn's ``auto`` choice takes httptools (a C parser) and uvloop where they import, and falls
back to the pure-Python h11 and asyncio otherwise. Both are project dependencies; the fallback
costs ~25% more CPU per request in the event loop (BENCHMARKS.md, "What bounded 64 clients"),
which is what bounds many concurrent clients. Standard library only: the benchmark's client
processes import this too.
"""

from __future__ import annotations

import importlib.util
import logging
import sys

logger = logging.getLogger(__name__)

FAST = {"http": "httptools", "loop": "uvloop"}


def serving_stack() -> dict[str, str]:
    """``{"http": "httptools" | "h11", "loop": "uvloop" | "asyncio"}`` as uvicorn's ``auto``
    would pick them in this environment."""
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    uvloop = (
        sys.platform != "win32"
        and sys.implementation.name == "cpython"
        and importlib.util.find_spec("uvloop") is not None
    )
    return {"http": http, "loop": "uvloop" if uvloop else "asyncio"}


def log_serving_stack() -> dict[str, str]:
    """Log the stack uvicorn will serve with (a warning for the slow fallback); return it."""
    stack = serving_stack()
    if stack == FAST:
        logger.info("serving with %s and %s", stack["http"], stack["loop"])
    else:
        logger.warning(
            "serving with %s and %s: install httptools and uvloop (project dependencies) for "
            "~25%% less CPU per request",
            stack["http"],
            stack["loop"],
        )
    return stack
