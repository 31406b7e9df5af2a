"""Liveness and readiness."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from app.errors import NotReady
from app.schemas import ErrorResponse, Readiness, Status

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Status, summary="The process is alive")
async def healthz() -> dict[str, Any]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Every model is loaded and warmed up (in every worker); which versions serve",
    description="Ready once no model is still warming up and at least one serves: a bundle that "
    "failed to load or warm up is listed under `failed` and does not hold the others back.",
    responses={503: {"model": ErrorResponse, "description": "Still warming up, or no model"}},
)
async def readyz(request: Request) -> dict[str, Any]:
    registry = request.app.state.registry
    reason = registry.not_ready_reason()
    if reason is not None:
        raise NotReady(reason)
    default = registry.default
    return {
        "status": "ready",
        "model": default.current.model_fields if default is not None else None,
        "models": [host.current.model_fields for _, host in sorted(registry.hosts.items())],
        "failed": registry.failed,
        "workers": registry.workers(),
    }
