"""Adapter administration: list, load (or hot-swap), unload, set the default."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path

from app.deps import AdminDep, ReadyDep
from app.errors import responses
from app.schemas import (
    AdapterList,
    AdapterName,
    DefaultAdapterResponse,
    LoadAdapterRequest,
    LoadAdapterResponse,
    SetDefaultRequest,
    UnloadResponse,
)

router = APIRouter(prefix="/adapters", tags=["adapters"])
ADMIN = responses(401, 403)


@router.get("", response_model=AdapterList, responses=responses(503))
async def list_adapters(ready: ReadyDep) -> dict[str, Any]:
    """The default adapter, the loaded adapters, and those available in the adapters dirs."""
    return ready.registry.describe()


@router.post(
    "",
    response_model=LoadAdapterResponse,
    dependencies=[AdminDep],
    responses={**ADMIN, **responses(400, 404, 409, 413, 422, 503)},
)
async def load_adapter(body: LoadAdapterRequest, ready: ReadyDep) -> dict[str, Any]:
    """Load an adapter from the adapters dir; unchanged files are a no-op."""
    entry, status = await ready.registry.load(body.name, replace=body.replace)
    return {**entry.describe(), "status": status}


@router.put(
    "/default",
    response_model=DefaultAdapterResponse,
    dependencies=[AdminDep],
    responses={**ADMIN, **responses(404, 413, 422, 503)},
)
async def set_default_adapter(body: SetDefaultRequest, ready: ReadyDep) -> dict[str, str]:
    """Make a loaded adapter (or 'base') the default for requests that name none."""
    return {"default": ready.registry.set_default(body.name)}


@router.delete(
    "/{name}",
    response_model=UnloadResponse,
    dependencies=[AdminDep],
    responses={**ADMIN, **responses(404, 409, 422, 503)},
)
async def unload_adapter(
    name: Annotated[AdapterName, Path(description="A loaded adapter")], ready: ReadyDep
) -> dict[str, Any]:
    """Unload an adapter once in-flight requests that use it are done."""
    detached = await ready.registry.unload(name)
    return {"name": name, "detached": detached}
