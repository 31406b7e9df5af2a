"""Tiny real ONNX classifiers and bundles for tests, built with onnx.helper (no torch)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

LABELS = [f"class-{i}" for i in range(10)]


def tiny_cnn(
    channels: int = 1,
    size: int = 28,
    classes: int = 10,
    *,
    seed: int = 0,
    slow_matmul: int = 0,
    widths: tuple[int, ...] = (8, 16),
) -> onnx.ModelProto:
    """Conv 3x3 blocks (stride 2 after the first) with ReLU -> GAP -> Gemm: a real CNN.

    `widths=(32, 64, 128, 192)` gives ~300k parameters, the size of the default build's model.
    `slow_matmul=n` adds an n x n by n x n MatMul scaled by the input's mean, whose cost does not
    depend on the batch size, so tests can hold the engine busy for a known while.
    """
    rng = np.random.default_rng(seed)

    def tensor(name: str, *shape: int, scale: float | None = None) -> onnx.TensorProto:
        fan_in = int(np.prod(shape[1:])) or 1
        std = scale if scale is not None else (2 / fan_in) ** 0.5
        return numpy_helper.from_array(rng.normal(0, std, shape).astype(np.float32), name)

    initializers, nodes, previous, source = [], [], channels, "input"
    for i, width in enumerate(widths):
        initializers += [tensor(f"w{i}", width, previous, 3, 3), tensor(f"b{i}", width, scale=0.1)]
        stride = 1 if i == 0 else 2
        nodes += [
            helper.make_node(
                "Conv",
                [source, f"w{i}", f"b{i}"],
                [f"c{i}"],
                pads=[1, 1, 1, 1],
                strides=[stride] * 2,
            ),
            helper.make_node("Relu", [f"c{i}"], [f"r{i}"]),
        ]
        previous, source = width, f"r{i}"
    initializers += [tensor("wf", classes, previous), tensor("bf", classes, scale=0.1)]
    nodes += [
        helper.make_node("GlobalAveragePool", [source], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node(
            "Gemm", ["flat", "wf", "bf"], ["pre" if slow_matmul else "logits"], transB=1
        ),
    ]
    if slow_matmul:
        big = rng.normal(0, 1 / slow_matmul, (slow_matmul, slow_matmul)).astype(np.float32)
        initializers += [
            numpy_helper.from_array(big, "big"),
            numpy_helper.from_array(np.zeros((), np.float32), "zero"),
        ]
        nodes += [
            helper.make_node("ReduceMean", ["input"], ["m"], keepdims=0),
            helper.make_node("Mul", ["big", "m"], ["scaled"]),
            helper.make_node("MatMul", ["scaled", "big"], ["product"]),
            helper.make_node("ReduceMean", ["product"], ["busy"], keepdims=0),
            # busy * 0 keeps the work in the graph without changing the logits
            helper.make_node("Mul", ["busy", "zero"], ["nothing"]),
            helper.make_node("Add", ["pre", "nothing"], ["logits"]),
        ]
    graph = helper.make_graph(
        nodes,
        "tiny_cnn",
        [
            helper.make_tensor_value_info(
                "input", TensorProto.FLOAT, ["batch", channels, size, size]
            )
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def write_bundle(
    directory: Path,
    *,
    channels: int = 1,
    size: int = 28,
    labels: list[str] | None = None,
    slow_matmul: int = 0,
    widths: tuple[int, ...] = (8, 16),
    seed: int = 0,
    name: str = "tiny",
    version: str = "1",
    extra_variants: tuple[str, ...] = (),
) -> Path:
    """Write a complete bundle (manifest + model files) and return its directory."""
    labels = labels or LABELS
    directory.mkdir(parents=True, exist_ok=True)
    model = tiny_cnn(channels, size, len(labels), seed=seed, slow_matmul=slow_matmul, widths=widths)
    files = {"fp32": "model.onnx"}
    onnx.save(model, directory / files["fp32"])
    if "int8" in extra_variants:
        files["int8"] = "model.int8.onnx"
        quantize_int8(directory / files["fp32"], directory / files["int8"], channels, size)
    variants = {}
    for precision, file in files.items():
        data = (directory / file).read_bytes()
        variants[precision] = {
            "file": file,
            "sha256": hashlib.sha256(data).hexdigest(),
            "size": len(data),
        }
    manifest = {
        "schema": 1,
        "name": name,
        "version": version,
        "created": "2026-11-23T00:00:00Z",
        "labels": labels,
        "input": {
            "name": "input",
            "height": size,
            "width": size,
            "channels": channels,
            "color": "L" if channels == 1 else "RGB",
            "resize": "center_crop",
            "mean": [0.5] * channels,
            "std": [0.25] * channels,
        },
        "output": {"name": "logits", "kind": "logits"},
        "variants": variants,
        "metrics": {p: {"accuracy": 0.1} for p in files},
        "provenance": {"dataset": "synthetic", "seed": seed},
    }
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return directory


def copy_with_reference(source: Path, directory: Path, outputs: np.ndarray) -> Path:
    """A copy of the bundle `source` whose manifest records the reference behaviour of
    `outputs` (its answers to some images, [N, classes]): drift is measured against it."""
    from models.evaluate.reference import reference_behaviour

    directory.mkdir(parents=True)
    for item in source.iterdir():
        (directory / item.name).write_bytes(item.read_bytes())
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["reference"] = reference_behaviour(outputs, "test").model_dump()
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return directory


def write_calibrated_bundle(
    directory: Path, calibration: dict[str, object], model: onnx.ModelProto | None = None
) -> Path:
    """A tiny bundle whose manifest records `calibration` (temperature, conformal thresholds);
    with `model`, that model, whose output is probabilities, replaces the bundle's own."""
    write_bundle(directory)
    manifest = json.loads((directory / "manifest.json").read_text())
    if model is not None:
        onnx.save(model, directory / "model.onnx")
        data = (directory / "model.onnx").read_bytes()
        manifest["variants"]["fp32"].update(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
        manifest["output"] = {"name": "probabilities", "kind": "probabilities"}
    manifest["calibration"] = calibration
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return directory


def quantize_int8(source: Path, target: Path, channels: int, size: int) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    rng = np.random.default_rng(1)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(
                [{"input": rng.normal(0, 1, (4, channels, size, size)).astype(np.float32)}] * 4
            )

        def get_next(self):
            return next(self.batches, None)

    quantize_static(
        str(source), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True
    )


def classifier(
    *,
    layout: str = "NCHW",
    channels: int = 3,
    size: int = 16,
    classes: int = 4,
    batch: int | str = "batch",
    softmax: bool = False,
    batch_in_reshape: bool = False,
    hidden_batch: bool = False,
    seed: int = 0,
) -> onnx.ModelProto:
    """A small conv classifier in the forms models arrive in from other exporters.

    `layout="NHWC"`: the input is [N, H, W, C] and transposed inside (as tf2onnx writes Keras
    models). `batch=1`: the batch size is fixed in the input and output shapes.
    `batch_in_reshape`: the head flattens with Reshape [batch, -1], the batch size written into
    the graph (as tracing exporters do). `hidden_batch`: that shape constant is also read by a
    second Reshape, so no rewrite may touch it. `softmax`: the output is probabilities.
    """
    rng = np.random.default_rng(seed)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        fan_in = int(np.prod(shape[1:])) or 1
        return numpy_helper.from_array(
            rng.normal(0, (2 / fan_in) ** 0.5, shape).astype(np.float32), name
        )

    width = 8
    initializers = [weight("w0", width, channels, 3, 3), weight("wf", classes, width)]
    nodes, source = [], "input"
    if layout == "NHWC":
        nodes.append(helper.make_node("Transpose", ["input"], ["nchw"], perm=[0, 3, 1, 2]))
        source = "nchw"
    nodes += [
        helper.make_node("Conv", [source, "w0"], ["c0"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"]),
        helper.make_node("GlobalAveragePool", ["r0"], ["gap"]),
    ]
    if batch_in_reshape:
        shape = np.array([batch if isinstance(batch, int) else -1, -1], np.int64)
        initializers.append(numpy_helper.from_array(shape, "flat_shape"))
        nodes.append(helper.make_node("Reshape", ["gap", "flat_shape"], ["flat"]))
        if hidden_batch:  # a second reader of the same constant: a no-op on the value
            nodes.append(helper.make_node("Reshape", ["flat", "flat_shape"], ["flat2"]))
    else:
        nodes.append(helper.make_node("Flatten", ["gap"], ["flat"]))
    head = "flat2" if hidden_batch else "flat"
    nodes.append(
        helper.make_node("Gemm", [head, "wf"], ["scores" if softmax else "logits"], transB=1)
    )
    output = "logits"
    if softmax:
        output = "probabilities"
        nodes.append(helper.make_node("Softmax", ["scores"], [output], axis=1))
    shape = [size, size, channels] if layout == "NHWC" else [channels, size, size]
    graph = helper.make_graph(
        nodes,
        "classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, *shape])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, [batch, classes])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model
