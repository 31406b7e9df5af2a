"""Service settings, read from `BLINK_*` environment variables."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal, get_args

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.batch_policy import BatchPolicy
from app.candidate_spec import parse_candidates

Device = Literal["auto", "cpu", "cuda", "tensorrt"]
Variant = Literal["auto", "fp32", "int8", "fp16"]
# The one list of each: `blink serve --device/--variant` offers exactly these.
DEVICES: tuple[str, ...] = get_args(Device)
VARIANTS: tuple[str, ...] = get_args(Variant)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BLINK_", extra="ignore", protected_namespaces=())

    model: Path = Field(
        Path("models/repository/fashion-mnist"),
        description="A bundle directory, or a <repository>/<name> directory holding `latest`.",
    )
    repository: Path | None = Field(
        None,
        description="Serve every <repository>/<name> bundle (each at its `latest`) instead of "
        "one `model`; the watcher adds and removes bundles as they come and go.",
    )
    default_model: str = Field(
        "",
        description="The model that answers POST /classify; empty = the only one served "
        "(with several, /classify answers 404 and /models/{name}/classify is the way).",
    )
    cache_bytes: int = Field(
        32 * 1024 * 1024,
        ge=0,
        description="Response cache size per worker (answers to repeated images, LRU); "
        "0 = off. An answer takes about 1 KB, so the default holds some 30,000.",
    )
    device: Device = "auto"
    model_variant: Variant = "auto"
    max_batch_size: int = Field(32, ge=1, le=4096)
    batch_policy: BatchPolicy = Field(
        "measured",
        description="measured: cap batches at the size with the best per-image cost timed during "
        "warm-up (app/batch_policy.py), at most max_batch_size; max: always max_batch_size.",
    )
    max_queue_delay_ms: float = Field(0.0, ge=0, description="Wait this long for fuller batches.")
    queue_capacity: int = Field(1024, ge=1, description="Requests waiting beyond this get 503.")
    engine_slots: int = Field(1, ge=1, le=64, description="Batches in flight at once.")
    inline_max_ms: float = Field(
        10.0,
        ge=0,
        description="A lone request on an idle service runs on the event loop (decode of images "
        "up to 4 MP and inference), without the hops to the decode pool and the engine thread, "
        "while a batch of one takes at most this long; 0 = never.",
    )
    request_timeout_ms: float = Field(
        5000.0,
        gt=0,
        description="Deadline from arrival; a client's X-Request-Timeout-Ms may only shorten it.",
    )
    overload_status: Literal[503, 429] = Field(
        503, description="Status of an overload rejection (not-ready is always 503)."
    )
    max_concurrency: int = Field(
        0, ge=0, description="Requests in progress per worker beyond this are refused; 0 = none."
    )
    reject_hold_ms: float = Field(
        1000.0,
        ge=0,
        lt=5000,  # below uvicorn's keep-alive timeout, which stays armed while not reading
        description="After an overload rejection, do not read that connection for up to this long "
        "(about the queue's drain time), so TCP holds back clients that resend at once; 0 = off.",
    )
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(40_000_000, ge=1, description="Width x height before decoding.")
    decode_threads: int = Field(0, ge=0, description="Decode pool size; 0 = one per usable core.")
    threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads; 0 = cores / workers.")
    spin_when_alone: bool = Field(
        True,
        description="On a CPU with 2+ intra-op threads, a lone request on an idle server runs in a "
        "second session whose threads spin between operators; off saves that session's memory.",
    )
    workers: int = Field(1, ge=1, le=256)
    host: str = "0.0.0.0"
    port: int = Field(8000, ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = False
    watch_interval_s: float = Field(
        0.0,
        ge=0,
        description="Look this often whether `latest` leads to a new version and reload it; "
        "0 = never (SIGHUP or the admin endpoint still reload).",
    )
    monitor: bool = Field(
        True,
        description="Count what each model answers and measure its drift (docs/monitoring.md); "
        "false: neither (the prediction metrics stay at zero).",
    )
    drift_window: int = Field(
        1000,
        ge=10,
        description="Answers in the sliding window whose class mix and top-1 scores are "
        "compared with the bundle's reference (docs/monitoring.md).",
    )
    shadow: str = Field(
        "",
        description="Mirror a fraction of requests to a candidate version, off the response "
        "path: `[MODEL=]CANDIDATE[@FRACTION]`, comma-separated; CANDIDATE is a version "
        "directory of the model or a bundle path, FRACTION 0-1 (default 1); no MODEL: the "
        "default model (docs/candidates.md).",
    )
    canary: str = Field(
        "",
        description="Answer a fraction of requests by a candidate version: "
        "`[MODEL=]CANDIDATE@FRACTION`, comma-separated, as for shadow (docs/candidates.md).",
    )
    canary_key_header: str = Field(
        "X-Canary-Key",
        min_length=1,
        description="Requests carrying this header go to the canary or not by a hash of its "
        "value, so one value (a camera) always sees the same version.",
    )
    admin_token: str = Field(
        "",
        description="Enables the admin routes (reload, promote, shadow, canary) for requests "
        "with `Authorization: Bearer <token>`; empty = they do not exist.",
        repr=False,
    )

    @field_validator("repository", mode="before")
    @classmethod
    def empty_is_none(cls, value: object) -> object:
        return None if value == "" else value  # BLINK_REPOSITORY= means unset, not "."

    @field_validator("shadow", "canary")
    @classmethod
    def candidates_parse(cls, value: str, info: ValidationInfo) -> str:
        parse_candidates(value, fraction_required=info.field_name == "canary")
        return value

    @model_validator(mode="after")
    def one_source(self) -> Settings:
        if self.repository is not None and "model" in self.model_fields_set:
            raise ValueError("set either model (one bundle) or repository (every bundle), not both")
        return self

    def intra_op_threads(self) -> int:
        """Split the usable cores between workers so they do not oversubscribe."""
        if self.threads:
            return self.threads
        return max(1, usable_cores() // self.workers)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@lru_cache
def get_settings() -> Settings:
    return Settings()
