"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter, Request

from app.errors import NotReady
from app.metrics import ready_workers
from app.schemas import ErrorResponse, Status

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Status, summary="The process is alive")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Status,
    summary="The model is loaded and warmed up (in every worker)",
    responses={503: {"model": ErrorResponse, "description": "Still warming up"}},
)
async def readyz(request: Request) -> dict:
    service = request.app.state.service
    if service.warm_up_error is not None:
        raise NotReady(f"warm-up failed: {service.warm_up_error}")
    if not service.ready:
        raise NotReady("model is warming up")
    # With several workers, any of them may answer this probe: ready means all of them are.
    workers = request.app.state.settings.workers
    if service.metrics.multiprocess and workers > 1 and (warm := ready_workers()) < workers:
        raise NotReady(f"{warm} of {workers} workers have warmed up")
    return {"status": "ready"}
