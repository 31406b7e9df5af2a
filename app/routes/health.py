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
    summary="The model is loaded and warmed up (in every worker); which version each serves",
    responses={503: {"model": ErrorResponse, "description": "Still warming up"}},
)
async def readyz(request: Request) -> dict[str, Any]:
    service = request.app.state.service
    reason = service.not_ready_reason()
    if reason is not None:
        raise NotReady(reason)
    return {"status": "ready", "model": service.model_fields, "workers": service.workers()}
