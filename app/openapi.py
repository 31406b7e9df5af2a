"""The OpenAPI description of POST /classify, which is an ASGI route outside FastAPI's models."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from app.schemas import ClassifyResponse, ErrorResponse

IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp", "image/bmp", "image/gif")
ERRORS = {
    "400": "The body is not a decodable image",
    "413": "The body or the image's pixel count is over the limit",
    "415": "Unsupported Content-Type",
    "422": (
        "Invalid top_k; coverage not a number in (0, 1), not a level the bundle recorded, or "
        "asked of a model without conformal calibration; multipart without a 'file' field"
    ),
    "503": "Queue full or model not ready (see Retry-After)",
    "504": "The request's deadline passed before it could run",
}


def classify_path(schema_ref: str) -> dict[str, Any]:
    binary = {"schema": {"type": "string", "format": "binary"}}
    error = {"application/json": {"schema": {"$ref": schema_ref.format("ErrorResponse")}}}
    return {
        "post": {
            "tags": ["classify"],
            "summary": "Classify one image",
            "description": (
                "Send the image as the raw body (its format is sniffed) or as the `file` field "
                "of multipart/form-data. Answers the top classes, best first (scores calibrated "
                "by the bundle's temperature when it has one), with an `X-Request-ID` (yours, if "
                "you sent one) and a `Server-Timing` header; with `coverage`, a prediction set too."
            ),
            "operationId": "classify",
            "parameters": [
                {
                    "name": "top_k",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "integer", "minimum": 1, "default": 5},
                    "description": "How many classes to return, at most the number of labels.",
                },
                {
                    "name": "coverage",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
                    "example": 0.95,
                    "description": (
                        "Also answer a conformal `prediction_set`: the labels that hold the true "
                        "one for at least this fraction of images like the calibration split's. "
                        "Only the levels the bundle recorded (GET /v1/models, "
                        "`calibration.coverage_levels`); a bundle without calibration refuses it."
                    ),
                },
                {
                    "name": "X-Request-ID",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string"},
                },
            ],
            "requestBody": {
                "required": True,
                "content": {
                    **{t: binary for t in IMAGE_TYPES},
                    "application/octet-stream": binary,
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["file"],
                            "properties": {"file": {"type": "string", "format": "binary"}},
                        }
                    },
                },
            },
            "responses": {
                "200": {
                    "description": "The top classes (`prediction_set` only with `coverage`)",
                    "headers": {
                        "X-Request-ID": {"schema": {"type": "string"}},
                        "Server-Timing": {
                            "schema": {"type": "string"},
                            "example": "decode;dur=0.110, queue;dur=0.020, "
                            "inference;dur=0.400, total;dur=0.700",
                        },
                    },
                    "content": {
                        "application/json": {
                            "schema": {"$ref": schema_ref.format("ClassifyResponse")},
                            "example": {
                                "model": {
                                    "name": "fashion-mnist",
                                    "version": "20261123T031500Z",
                                    "variant": "int8",
                                },
                                "predictions": [
                                    {"label": "Ankle boot", "index": 9, "score": 0.97},
                                    {"label": "Sneaker", "index": 7, "score": 0.02},
                                ],
                                "prediction_set": {
                                    "coverage": 0.95,
                                    "labels": ["Ankle boot"],
                                    "indices": [9],
                                    "scores": [0.97],
                                },
                            },
                        }
                    },
                },
                **{code: {"description": text, "content": error} for code, text in ERRORS.items()},
            },
        }
    }


def build_openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        schema.setdefault("paths", {})["/classify"] = classify_path("#/components/schemas/{}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (ClassifyResponse, ErrorResponse):
            model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(model_schema.pop("$defs", {}))
            components[model.__name__] = model_schema
        app.openapi_schema = schema
    return app.openapi_schema
