"""Response shapes, for validation of the JSON routes and for the OpenAPI page."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    code: str = Field(examples=["bad_image"])
    message: str = Field(examples=["not a decodable JPEG, PNG, WebP, BMP or GIF image"])


class ErrorResponse(BaseModel):
    error: ErrorDetail


class PredictionOut(BaseModel):
    label: str = Field(examples=["Ankle boot"])
    index: int = Field(examples=[9])
    score: float = Field(examples=[0.973], description="Softmax probability")


class ModelRef(BaseModel):
    name: str = Field(examples=["fashion-mnist"])
    version: str = Field(examples=["20261123T031500Z"])
    variant: str = Field(examples=["int8"])


class ClassifyResponse(BaseModel):
    model: ModelRef
    predictions: list[PredictionOut]


class Status(BaseModel):
    status: str = Field(examples=["ok"])


class WorkerModel(BaseModel):
    pid: int
    name: str
    version: str


class Readiness(BaseModel):
    status: str = Field(examples=["ready"])
    model: ModelRef = Field(description="The version the answering worker serves")
    workers: list[WorkerModel] = Field(
        description="The version each worker process serves (during a reload they may differ)"
    )


class ReloadResult(BaseModel):
    result: str = Field(examples=["success"], description="success, unchanged, load_failed, ...")
    version: str = Field(description="The version serving after the attempt")
    previous: str
    seconds: float
    cpu_seconds: float = Field(description="CPU time spent loading and warming the new version")
    error: str | None = None


class InputOut(BaseModel):
    name: str
    shape: list[int | str] = Field(examples=[["batch", 1, 28, 28]])
    layout: str = Field(examples=["NCHW"])
    color: str
    resize: str = Field(examples=["center_crop"])
    crop_fraction: float = Field(examples=[0.875])
    interpolation: str = Field(examples=["bilinear"])
    mean: list[float]
    std: list[float]


class OutputOut(BaseModel):
    name: str
    kind: str = Field(examples=["logits"], description="logits, or probabilities already")


class Batching(BaseModel):
    policy: str = Field(description="measured or max (BLINK_BATCH_POLICY)")
    batch_cap: int = Field(description="The batcher's largest batch, chosen at warm-up")
    seconds_per_batch: dict[str, float] = Field(
        description="Seconds per batch at each timed batch size (fastest run), measured at warm-up"
    )


class ModelOut(BaseModel):
    name: str
    version: str
    labels: list[str]
    input: InputOut
    output: OutputOut
    variant: str
    provider: str
    max_batch_size: int
    batching: Batching
    metrics: dict[str, Any]


class ModelList(BaseModel):
    models: list[ModelOut]
    workers: list[WorkerModel] = Field(
        description="The version each worker process serves (during a reload they may differ)"
    )
