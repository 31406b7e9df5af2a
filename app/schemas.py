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
    score: float = Field(
        examples=[0.973],
        description="Softmax probability, calibrated by the bundle's temperature when it has one",
    )


class ModelRef(BaseModel):
    name: str = Field(examples=["fashion-mnist"])
    version: str = Field(examples=["20261123T031500Z"])
    variant: str = Field(examples=["int8"])


class PredictionSetOut(BaseModel):
    coverage: float = Field(examples=[0.95], description="The coverage level asked for")
    labels: list[str] = Field(
        examples=[["Shirt", "T-shirt/top"]],
        description="Every label whose score reaches the level's calibrated threshold, best "
        "first; the top label alone when none does (never empty)",
    )
    indices: list[int] = Field(examples=[[6, 0]])
    scores: list[float] = Field(examples=[[0.61, 0.33]])


class ClassifyResponse(BaseModel):
    model: ModelRef
    predictions: list[PredictionOut]
    prediction_set: PredictionSetOut | None = Field(
        None,
        description="Only when `coverage` was asked for: the labels that hold the true one for "
        "at least that fraction of images like the calibration split's",
    )


class Status(BaseModel):
    status: str = Field(examples=["ok"])


class WorkerModel(BaseModel):
    pid: int
    name: str
    version: str


class Readiness(BaseModel):
    status: str = Field(examples=["ready"])
    model: ModelRef | None = Field(
        description="The default model (POST /classify) in the answering worker, if there is one"
    )
    models: list[ModelRef] = Field(description="Every model the answering worker serves")
    failed: dict[str, str] = Field(
        description="Models found but not served, with why (the others serve regardless)"
    )
    workers: list[WorkerModel] = Field(
        description="The models and versions each worker process serves (during a reload "
        "they may differ)"
    )


class ReloadResult(BaseModel):
    model: str = Field(description="The model reloaded")
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


class CalibrationOut(BaseModel):
    calibrated: bool = Field(description="false: scores are the plain softmax, no prediction sets")
    temperature: float = Field(examples=[1.4], description="Scores are softmax(logits / this)")
    coverage_levels: list[float] = Field(
        examples=[[0.9, 0.95, 0.99]], description="The levels /classify's `coverage` accepts"
    )
    thresholds: dict[str, float] | None = Field(
        None, description="Score threshold per coverage level, fitted on `split`"
    )
    measured_coverage: dict[str, float] | None = Field(
        None, description="Fraction of test images whose set held the true label, per level"
    )
    mean_set_size: dict[str, float] | None = Field(
        None, description="Mean labels per set on the test images, per level"
    )
    split: str | None = Field(None, description="The split the calibration was fitted on")
    images: int | None = Field(None, description="How many images it was fitted on")
    ece_before: float | None = Field(None, description="Expected calibration error, T = 1")
    ece_after: float | None = Field(None, description="Expected calibration error, fitted T")
    summary: str = Field(description="The above in one sentence")


class ReferenceOut(BaseModel):
    recorded: bool = Field(description="false: the bundle has no reference behaviour")
    split: str | None = Field(None, description="The held-out images it was measured on")
    images: int | None = None
    class_frequencies: list[float] | None = Field(None, description="Share of answers per class")
    score_edges: list[float] | None = Field(None, description="Top-1 score histogram bins")
    score_frequencies: list[float] | None = Field(None, description="Share of answers per bin")
    low_confidence_threshold: float | None = None
    low_confidence_rate: float | None = Field(
        None, description="Share of answers whose top-1 score is below the threshold"
    )
    summary: str


class CandidateOut(BaseModel):
    version: str = Field(description="The candidate's version")
    candidate: str = Field(description="As it was named: a version directory or a bundle path")
    fraction: float = Field(description="Share of requests mirrored (shadow) or answered (canary)")
    series: str = Field(examples=["fashion-mnist:shadow"], description="Its metrics' `model` label")


class ShadowOut(CandidateOut):
    compared: int = Field(description="Answers the shadow computed and compared")
    agreement: float | None = Field(
        None, description="Share of compared answers whose top-1 label both versions agree on"
    )
    shed: int = Field(description="Mirrors not sent: the service was busy or the shadow behind")
    failed: int = Field(description="Mirrors the shadow failed (or ran past their deadline)")


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
    calibration: CalibrationOut
    reference: ReferenceOut
    ready: bool = Field(description="Warmed up and taking requests in the answering worker")
    default: bool = Field(description="Whether POST /classify answers with this model")
    error: str | None = Field(None, description="Why it is not ready, if it is not")
    shadow: ShadowOut | None = Field(None, description="Its shadow version, if one runs")
    canary: CandidateOut | None = Field(None, description="Its canary version, if one runs")
    candidate_errors: dict[str, str] = Field(
        default_factory=dict, description="Why a shadow or canary named by a setting did not start"
    )


class CandidateState(BaseModel):
    model: str
    shadow: ShadowOut | None = None
    canary: CandidateOut | None = None


class FailedModel(BaseModel):
    name: str
    error: str = Field(description="Why the bundle is not served (load or warm-up failure)")


class ModelList(BaseModel):
    models: list[ModelOut]
    failed: list[FailedModel] = Field(
        description="Bundles in the repository that are not served, and why"
    )
    workers: list[WorkerModel] = Field(
        description="The models and versions each worker process serves (during a reload "
        "they may differ)"
    )
