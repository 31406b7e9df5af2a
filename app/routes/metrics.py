"""Prometheus exposition."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from app.metrics import CONTENT_TYPE

router = APIRouter(tags=["metrics"])


@router.get(
    "/metrics",
    summary="Prometheus metrics (text exposition format)",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE: {}}}},
)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.registry.metrics.exposition(), media_type=CONTENT_TYPE)
