"""INT8 post-training static quantization with ONNX Runtime: QDQ, per-channel weights.

Activations are unsigned (U8S8): after ReLU they are never negative, so uint8 with zero point 0
uses every code, and ONNX Runtime's x86 kernels are fastest for uint8 x int8.

Weights use 7 bits (`reduce_range`): on x86 without VNNI, the u8 x s8 kernels add pairs of
products in int16 (VPMADDUBSW), which saturates for 8-bit weights and costs full-range weights
accuracy (bench/int8_agreement.py compares the settings; the build's report gives each
variant's accuracy).
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

CALIBRATION_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}


class BatchReader(CalibrationDataReader):
    """Feeds float32 calibration images (NCHW or NHWC) to the calibrator in equal batches.

    Equal, because the histogram calibrators stack every batch's activations into one array.
    """

    def __init__(self, images: np.ndarray, input_name: str, batch_size: int = 64) -> None:
        batch_size = max(
            d for d in range(1, min(batch_size, len(images)) + 1) if len(images) % d == 0
        )
        self.batches = iter([images[i : i + batch_size] for i in range(0, len(images), batch_size)])
        self.input_name = input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {self.input_name: batch}


def quantize_int8(
    source: Path,
    target: Path,
    calibration: np.ndarray,
    *,
    method: str = "percentile",
    input_name: str = "input",
    reduce_range: bool = True,
    quant_format: QuantFormat = QuantFormat.QDQ,
    nodes_to_exclude: list[str] | None = None,
) -> Path:
    """Write the static INT8 (QDQ) version of `source`, calibrated on `calibration` images.

    `reduce_range=False` gives the weights all 8 bits: only safe to serve on CPUs with VNNI
    (or on GPUs), where the products are summed in 32 bits. `nodes_to_exclude` stay fp32.
    """
    extra = {
        # Percentile clips the rare outliers that would otherwise stretch each activation's
        # scale; min-max keeps them and loses resolution for everything else.
        "CalibPercentile": 99.999,
        "CalibMovingAverage": False,
        # Entropy and percentile histograms over every calibration batch at once.
        "CalibTensorRangeSymmetric": False,
        "ActivationSymmetric": False,
        "WeightSymmetric": True,
    }
    # The quantizer warns that pre-processing is advised (our graph is already BN-folded and
    # shape-inferred by the exporter) and prints calibration progress: keep the build's log clean.
    with quiet_logs(), contextlib.redirect_stdout(io.StringIO()):
        quantize_static(
            str(source),
            str(target),
            BatchReader(calibration, input_name),
            quant_format=quant_format,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CALIBRATION_METHODS[method],
            reduce_range=reduce_range,
            nodes_to_exclude=nodes_to_exclude or [],
            extra_options=extra,
        )
    return target


@contextlib.contextmanager
def quiet_logs():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantization_record(
    method: str, images: int, *, full_range: bool, bias_correction: bool
) -> dict:
    """The manifest's `provenance.quantization`; the engine reads `weight_range`."""
    return {
        "method": method,
        "images": images,
        "format": "QDQ",
        "weights": "int8 per channel" + ("" if full_range else " (7-bit range)"),
        # full-range weights saturate on x86 CPUs without VNNI: the engine serves fp32 there
        "weight_range": "full" if full_range else "reduced",
        "activations": "uint8",
        "bias_correction": bias_correction,
        "serve_on": "CPUs with VNNI (AVX-512 VNNI, AVX-VNNI, AMX) or GPUs"
        if full_range
        else "any CPU",
    }
