"""The protocol's JSON shapes, for the OpenAPI page and the metadata routes' validation."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ProtocolError(BaseModel):
    error: str = Field(examples=["unknown model 'resnet': this server serves 'fashion-mnist'"])


class ServerMetadata(BaseModel):
    name: str = Field(examples=["blink"])
    version: str = Field(examples=["0.1.0"])
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str = Field(examples=["FP32"])
    shape: list[int] = Field(examples=[[-1, 1, 28, 28]], description="-1: any size")
    parameters: dict[str, Any] | None = Field(
        None, description="the tensor's layout; for encoded images, how they are preprocessed"
    )


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class RequestInput(BaseModel):
    name: str = Field(examples=["image"])
    shape: list[int] = Field(examples=[[1]])
    datatype: str = Field(examples=["BYTES"])
    parameters: dict[str, Any] | None = Field(
        None,
        description="`binary_data_size`: this input's bytes follow the JSON header; "
        '`content_type: "base64"`: JSON BYTES elements are base64 strings',
    )
    data: list[Any] | None = None


class RequestOutput(BaseModel):
    name: str = Field(examples=["probabilities"])
    parameters: dict[str, Any] | None = Field(
        None, description="`binary_data`: true/false; `classification`: k (top-k strings)"
    )


class InferenceRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = Field(
        None,
        description="`binary_data_output`: outputs as binary by default; "
        "`timeout`: deadline in microseconds; `coverage`: a coverage level the bundle recorded "
        "(e.g. 0.95), which adds the `prediction_set` output",
    )
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[ResponseOutput]


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """`model`'s JSON schema with its nested models written in place: a request body that
    FastAPI does not parse itself cannot register them under components."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return resolve(definitions[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved
