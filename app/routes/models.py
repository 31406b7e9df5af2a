"""The served model's description."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from app.bundle import Calibration, Reference
from app.registry import ModelRegistry
from app.schemas import ModelList
from app.service import ModelService

router = APIRouter(prefix="/v1", tags=["models"])


@router.get(
    "/models",
    response_model=ModelList,
    summary="The served models: version, variant, provider, readiness, labels and input",
)
async def list_models(request: Request) -> dict[str, Any]:
    registry: ModelRegistry = request.app.state.registry
    return {
        "models": [
            {
                **describe(host.current, host is registry.default),
                **host.candidates(),
                "candidate_errors": host.candidate_errors,
            }
            for _, host in sorted(registry.hosts.items())
        ],
        "failed": [{"name": n, "error": e} for n, e in sorted(registry.failed.items())],
        "workers": registry.workers(),
    }


def describe(service: ModelService, default: bool) -> dict[str, Any]:
    manifest = service.bundle.manifest
    spec = manifest.input
    return {
        "name": service.name,
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
            "seconds_per_batch": {str(size): s for size, s in service.engine.batch_costs.items()},
        },
        "metrics": manifest.metrics,
        "calibration": calibration_fields(manifest.calibration),
        "reference": reference_fields(manifest.reference),
        "ready": service.ready,
        "default": default,
        "error": service.not_ready_reason(),
    }


def reference_fields(reference: Reference | None) -> dict[str, Any]:
    """The held-out behaviour the bundle recorded (what drift is measured against), or none."""
    if reference is None:
        return {
            "recorded": False,
            "summary": "no reference behaviour in the bundle (build with labelled data, or "
            "blink import --eval): nothing to compare its answers with",
        }
    return {
        "recorded": True,
        "split": reference.split,
        "images": reference.images,
        "class_frequencies": reference.class_frequencies,
        "score_edges": reference.score_edges,
        "score_frequencies": reference.score_frequencies,
        "low_confidence_threshold": reference.low_confidence_threshold,
        "low_confidence_rate": reference.low_confidence_rate,
        "summary": f"measured on {reference.images} held-out images: "
        f"{reference.low_confidence_rate:.1%} of answers below a top-1 score of "
        f"{reference.low_confidence_threshold:g}",
    }


def calibration_fields(calibration: Calibration | None) -> dict[str, Any]:
    """What the bundle's calibration makes of the scores, or that it has none."""
    if calibration is None:
        return {
            "calibrated": False,
            "temperature": 1.0,
            "coverage_levels": [],
            "summary": "no calibration in the bundle: scores are the plain softmax and "
            "prediction sets are unavailable (build with labelled data, or blink import --eval)",
        }
    levels = sorted(calibration.thresholds, key=float)
    if levels:
        sets = f"prediction sets at coverage {', '.join(levels)} (query coverage=LEVEL)"
    else:
        sets = "no conformal thresholds, so prediction sets are unavailable"
    return {
        "calibrated": True,
        "temperature": calibration.temperature,
        "coverage_levels": [float(level) for level in levels],
        "thresholds": calibration.thresholds,
        "measured_coverage": calibration.coverage,
        "mean_set_size": calibration.mean_set_size,
        "split": calibration.split,
        "images": calibration.images,
        "ece_before": calibration.ece_before,
        "ece_after": calibration.ece_after,
        "summary": f"scores are calibrated with temperature {calibration.temperature:g}; {sets}",
    }
