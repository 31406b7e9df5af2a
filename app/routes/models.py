"""The served model's description."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from app.schemas import ModelList

router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/models", response_model=ModelList, summary="The served model, its labels and input")
async def list_models(request: Request) -> dict[str, Any]:
    service = request.app.state.service
    manifest = service.bundle.manifest
    spec = manifest.input
    return {
        "models": [
            {
                "name": manifest.name,
                "version": manifest.version,
                "labels": manifest.labels,
                "input": {
                    "name": spec.name,
                    "shape": ["batch", *spec.sample_shape],
                    "layout": spec.layout,
                    "color": spec.color,
                    "resize": spec.resize,
                    "crop_fraction": spec.crop_fraction,
                    "interpolation": spec.interpolation,
                    "mean": spec.mean,
                    "std": spec.std,
                },
                "output": {"name": manifest.output.name, "kind": manifest.output.kind},
                "variant": service.engine.variant,
                "provider": service.engine.provider,
                "max_batch_size": service.settings.max_batch_size,
                "batching": {
                    "policy": service.settings.batch_policy,
                    "batch_cap": service.batcher.max_batch_size,
                    "seconds_per_batch": {
                        str(size): s for size, s in service.engine.batch_costs.items()
                    },
                },
                "metrics": manifest.metrics,
            }
        ],
        "workers": service.workers(),
    }
