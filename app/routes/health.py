"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter, Request

from app.errors import NotReady
from app.schemas import ErrorResponse, Status

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Status, summary="The process is alive")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Status,
    summary="The model is loaded and warmed up",
    responses={503: {"model": ErrorResponse, "description": "Still warming up"}},
)
async def readyz(request: Request) -> dict:
    service = request.app.state.service
    if service.warm_up_error is not None:
        raise NotReady(f"warm-up failed: {service.warm_up_error}")
    if not service.ready:
        raise NotReady("model is warming up")
    return {"status": "ready"}
