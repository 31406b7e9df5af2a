"""The ONNX Runtime sessions: provider and variant choice, warm-up, `run` and `run_lone`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from app.bundle import Bundle, BundleError, Precision, verify_variant

log = logging.getLogger("blink.engine")

PROVIDER_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
PREFERENCE = ("tensorrt", "cuda", "cpu")


class EngineError(Exception):
    """The requested device or variant cannot be served here."""


def choose_device(requested: str, available: Iterable[str]) -> str:
    """`auto` takes the best provider the installed ONNX Runtime offers; others must exist."""
    offered = set(available)
    if requested == "auto":
        return next(d for d in PREFERENCE if PROVIDER_NAMES[d] in offered or d == "cpu")
    if PROVIDER_NAMES[requested] not in offered:
        raise EngineError(
            f"device {requested!r} needs {PROVIDER_NAMES[requested]}, but this ONNX Runtime "
            f"offers only {sorted(offered)}"
        )
    return requested


def cpu_sums_int8_in_32_bits() -> bool:
    """Whether this CPU multiplies u8 x s8 without the 16-bit intermediate sums of plain AVX2
    and AVX-512 (VPMADDUBSW), which saturate for INT8 weights that use the full 8-bit range."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: assume the worst, fp32 is always correct
        return False
    return any(flag in flags for flag in (" avx512_vnni", " avx_vnni", " amx_int8"))


def int8_safe_here(manifest_provenance: dict[str, object]) -> bool:
    """Full-range INT8 weights (recorded by `blink import` on a VNNI machine) answer wrongly on a
    CPU without VNNI; 7-bit weights, the build's default, are safe everywhere."""
    quantization = manifest_provenance.get("quantization")
    if not isinstance(quantization, dict) or quantization.get("weight_range") != "full":
        return True
    return cpu_sums_int8_in_32_bits()


def choose_variant(
    requested: str, device: str, in_bundle: Iterable[str], *, int8_safe: bool = True
) -> Precision:
    """`auto`: int8 on CPU (where its weights are safe here), fp16 on a GPU, when the bundle has
    them; fp32 otherwise."""
    variants = set(in_bundle)
    if not int8_safe and device == "cpu":
        if requested == "auto":
            variants.discard("int8")
        elif requested == "int8":
            log.warning("int8 weights use the full 8-bit range and this CPU has no VNNI")
    if requested != "auto":
        if requested not in variants:
            raise BundleError(
                f"variant {requested!r} is not in the bundle (has {sorted(variants)})"
            )
        return requested  # type: ignore[return-value]
    preferred = "int8" if device == "cpu" else "fp16"
    return preferred if preferred in variants else "fp32"  # type: ignore[return-value]


def batch_buckets(max_batch_size: int) -> list[int]:
    """Powers of two up to the maximum: the shapes a GPU engine is built and captured for."""
    buckets, size = [], 1
    while size < max_batch_size:
        buckets.append(size)
        size *= 2
    return [*buckets, max_batch_size]


def bucket_for(size: int, buckets: list[int]) -> int:
    return next(b for b in buckets if b >= size)


class Engine:
    """An InferenceSession for batches (and, on a multi-threaded CPU, a second one for lone
    requests); `run` maps float32 [N, C, H, W] (or NHWC) to outputs [N, classes]."""

    def __init__(
        self,
        bundle: Bundle,
        *,
        device: str = "auto",
        variant: str = "auto",
        threads: int = 1,
        spin_when_alone: bool = True,
        max_batch_size: int = 32,
        cache_dir: Path | None = None,
    ) -> None:
        manifest = bundle.manifest
        self.device = choose_device(device, ort.get_available_providers())
        self.variant = choose_variant(
            variant,
            self.device,
            manifest.variants,
            int8_safe=int8_safe_here(manifest.provenance),
        )
        path = verify_variant(bundle, self.variant)
        self.input_name = manifest.input.name
        self.output_name = manifest.output.name
        self.input_shape = manifest.input.sample_shape  # (C, H, W), or (H, W, C) for NHWC
        self.max_batch_size = max_batch_size
        self.batch_costs: dict[int, float] = {}  # seconds per batch, filled by warm_up
        # GPUs pad batches to a few sizes so TensorRT profiles and cuDNN plans are reused.
        self.buckets = batch_buckets(max_batch_size) if self.device != "cpu" else None
        providers = self._providers(cache_dir or bundle.directory / ".trt-cache")
        try:
            self.session = ort.InferenceSession(
                str(path), self._session_options(threads, spinning=False), providers=providers
            )
            # A lone request on an idle CPU runs in a second session whose intra-op threads spin
            # between operators (and stop when the run returns): it pays no thread wake-up per
            # operator. Under load the spinning would take the cores that decoding needs, so
            # batches use the first session, whose threads sleep.
            self.lone_session = (
                ort.InferenceSession(
                    str(path), self._session_options(threads, spinning=True), providers=providers
                )
                if spin_when_alone and threads > 1 and self.device == "cpu"
                else self.session
            )
        except Exception as exc:  # ORT raises its own exception types for bad models
            raise BundleError(f"ONNX Runtime cannot load {path}: {exc}") from exc
        self.provider = self.session.get_providers()[0]
        self._check_io(path)
        log.info(
            "engine ready to warm up",
            extra={"provider": self.provider, "variant": self.variant, "threads": threads},
        )

    def run(self, batch: np.ndarray) -> np.ndarray:
        size = len(batch)
        if self.buckets is not None:
            padded = bucket_for(size, self.buckets)
            if padded != size:
                batch = np.concatenate(
                    [batch, np.zeros((padded - size, *batch.shape[1:]), batch.dtype)]
                )
        logits: np.ndarray
        (logits,) = self.session.run([self.output_name], {self.input_name: batch})
        return logits[:size]

    def run_lone(self, batch: np.ndarray) -> np.ndarray:
        """`run` for a lone request on an idle service (see `lone_session`)."""
        logits: np.ndarray
        (logits,) = self.lone_session.run([self.output_name], {self.input_name: batch})
        return logits

    def warm_up(self, timed_repeats: int = 3) -> dict[int, float]:
        """Run every batch size the service will use once, so no request pays for a first run;
        then time the power-of-two sizes (the fastest of up to `timed_repeats` runs: noise only
        adds time): the cost curve, in seconds per batch, that app.batch_policy chooses the
        batcher's cap from."""
        sizes = self.buckets or range(1, self.max_batch_size + 1)
        for size in sizes:
            self.run(np.zeros((size, *self.input_shape), np.float32))
        if self.lone_session is not self.session:
            self.run_lone(np.zeros((1, *self.input_shape), np.float32))
        self.batch_costs = {
            size: self.fastest_run_s(self.run, size, timed_repeats)
            for size in batch_buckets(self.max_batch_size)
        }
        return self.batch_costs

    def fastest_run_s(
        self,
        run: Callable[[np.ndarray], np.ndarray],
        size: int,
        repeats: int,
        budget_s: float = 0.1,
    ) -> float:
        batch = np.zeros((size, *self.input_shape), np.float32)
        times: list[float] = []
        # Long runs vary little: once a size has used its budget, one more sample adds nothing.
        while len(times) < repeats and sum(times) < budget_s:
            started = time.perf_counter()
            run(batch)
            times.append(time.perf_counter() - started)
        return min(times)

    @staticmethod
    def _session_options(threads: int, spinning: bool) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", str(int(spinning)))
        # never between runs: the event loop and the decode pool need the cores then
        options.add_session_config_entry("session.force_spinning_stop", "1")
        return options

    def _providers(self, cache_dir: Path) -> list[str | tuple[str, dict[str, Any]]]:
        if self.device == "tensorrt":
            shape = f"{self.input_name}:{{}}x" + "x".join(map(str, self.input_shape))
            trt = {
                "trt_fp16_enable": self.variant == "fp16",
                "trt_int8_enable": self.variant == "int8",
                "trt_engine_cache_enable": True,
                "trt_engine_cache_path": str(cache_dir),
                "trt_profile_min_shapes": shape.format(1),
                "trt_profile_opt_shapes": shape.format(self.max_batch_size),
                "trt_profile_max_shapes": shape.format(self.max_batch_size),
            }
            return [
                ("TensorrtExecutionProvider", trt),
                "CUDAExecutionProvider",
                "CPUExecutionProvider",
            ]
        if self.device == "cuda":
            return [
                ("CUDAExecutionProvider", {"cudnn_conv_algo_search": "EXHAUSTIVE"}),
                "CPUExecutionProvider",
            ]
        return ["CPUExecutionProvider"]

    def _check_io(self, path: Path) -> None:
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        if self.input_name not in inputs:
            raise BundleError(
                f"{path} has no input named {self.input_name!r} (has {sorted(inputs)})"
            )
        if self.output_name not in outputs:
            raise BundleError(
                f"{path} has no output named {self.output_name!r} (has {sorted(outputs)})"
            )
