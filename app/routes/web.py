"""``GET /``: the web page (static files, no build step)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"

router = APIRouter(tags=["web"])


@router.get("/", response_class=FileResponse, include_in_schema=False)
async def index() -> FileResponse:
    """The web page: classify a pair, pick the adapter, evaluate a file."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")
