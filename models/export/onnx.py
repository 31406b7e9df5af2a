"""Torch -> ONNX: fold batch norm, export with a dynamic batch axis, check, compare with torch."""

from __future__ import annotations

import copy
import itertools
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

OPSET = 18
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def fold_batch_norm(model: nn.Module) -> nn.Module:
    """A copy where every Conv2d followed by BatchNorm2d is one Conv2d with a bias.

    Folded before export, the graph the quantizer calibrates is the graph that runs: each conv
    gets one per-channel weight scale for the folded weights, not for weights BN then rescales.
    """
    folded = copy.deepcopy(model).eval()
    for module in folded.modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (name, child), (next_name, after) in itertools.pairwise(children):
            if isinstance(child, nn.Conv2d) and isinstance(after, nn.BatchNorm2d):
                setattr(module, name, fuse_conv_bn_eval(child, after))
                setattr(module, next_name, nn.Identity())
    return folded


class Float16(nn.Module):
    """fp16 weights and arithmetic inside, float32 input and logits outside (the contract)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.half()).float()


def export_onnx(
    model: nn.Module, path: Path, input_shape: tuple[int, int, int], *, fp16: bool = False
) -> Path:
    """Write `model` (already folded) as ONNX with input `input` [batch, C, H, W] -> `logits`."""
    model = model.eval().to("cpu")
    if fp16:
        model = Float16(model).eval()
    example = torch.zeros(2, *input_shape)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        # torch.export's own deprecation notices, not about this model
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=OPSET,
            dynamic_shapes=({0: batch},),
            external_data=False,
            optimize=True,
        )
    assert program is not None  # the dynamo exporter always returns its program
    program.save(str(path), external_data=False)
    proto = onnx.load(str(path))
    proto.graph.name = "blink"
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    return path


def session(path: Path, threads: int = 0) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@torch.no_grad()
def parity(model: nn.Module, path: Path, images: np.ndarray) -> float:
    """Max absolute difference between torch's and ONNX Runtime's logits on float32 NCHW images."""
    expected = model.eval()(torch.from_numpy(images)).numpy()
    (actual,) = session(path).run([OUTPUT_NAME], {INPUT_NAME: images})
    return float(np.abs(expected - actual).max())
