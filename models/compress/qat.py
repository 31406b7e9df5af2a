"""Quantization-aware fine-tuning: teach the folded network to live on the INT8 grid.

The network is BN-folded first (as exported), then every Conv2d/Linear sees its weights
fake-quantized per output channel (symmetric 7-bit, as models/compress/quantize.py has ONNX Runtime
quantize them) and its input fake-quantized per tensor (uint8 over a running min/max, as the
calibrated activations). After a short fine-tune the fake quantization is removed again; the
float weights that remain sit where static INT8 quantization rounds them to what training saw.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.fusion import fuse_conv_bn_eval

from models.export.onnx import fold_batch_norm

WEIGHT_LEVELS = (
    63  # 7-bit weights, as models/compress/quantize.py asks of ONNX Runtime (reduce_range)
)
FULL_RANGE_LEVELS = 127  # all 8 bits, where the CPU sums INT8 products in 32 bits


def weight_levels(full_range: bool) -> int:
    """The weight grid ONNX Runtime will quantize to: full 8-bit or the reduced 7-bit range."""
    return FULL_RANGE_LEVELS if full_range else WEIGHT_LEVELS


class WeightFakeQuant(nn.Module):
    """Per-output-channel symmetric fake quantization of a weight tensor (7 bits by default)."""

    def __init__(self, levels: int = WEIGHT_LEVELS) -> None:
        super().__init__()
        self.levels = levels

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        reduce = tuple(range(1, weight.ndim))
        scale = (weight.detach().abs().amax(reduce) / self.levels).clamp_min(1e-8)
        zero = torch.zeros(len(scale), dtype=torch.int32, device=weight.device)
        return torch.fake_quantize_per_channel_affine(
            weight, scale, zero, 0, -self.levels, self.levels
        )


class InputFakeQuant:
    """Forward pre-hook: uint8 fake quantization over a running (EMA) min/max of the input."""

    def __init__(self, momentum: float = 0.01) -> None:
        self.momentum = momentum
        self.low: float | None = None
        self.high: float | None = None

    def __call__(self, module: nn.Module, args: tuple[torch.Tensor]) -> tuple[torch.Tensor]:
        (x,) = args
        if module.training:
            low, high = min(0.0, x.min().item()), max(0.0, x.max().item())
            if self.low is None or self.high is None:
                self.low, self.high = low, high
            else:
                self.low += self.momentum * (low - self.low)
                self.high += self.momentum * (high - self.high)
        low, high = self.low or 0.0, max(self.high or 1.0, (self.low or 0.0) + 1e-6)
        scale = (high - low) / 255.0
        zero = round(-low / scale)
        return (torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, 255),)


def prepare(model: nn.Module) -> tuple[nn.Module, list]:
    """A folded copy of `model` with fake quantization on every conv and linear layer."""
    folded = fold_batch_norm(model)
    handles = []
    for module in folded.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            parametrize.register_parametrization(module, "weight", WeightFakeQuant())
            handles.append(module.register_forward_pre_hook(InputFakeQuant()))
    return folded, handles


def finish(model: nn.Module, handles: list) -> nn.Module:
    """Remove the fake quantization, keeping the fine-tuned float weights."""
    for handle in handles:
        handle.remove()
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
    return model.eval()


def fold_efficientnet(model: nn.Module) -> nn.Module:
    """A copy of an EfficientNet(-Lite) with each BatchNorm folded into the conv before it.

    Its convs are attributes, not Sequential members, so the pairs are named here: the stem and
    head, and each block's expansion, depthwise and projection convs.
    """
    folded: Any = copy.deepcopy(model).eval()  # the library's EfficientNet class is untyped
    pairs = [(folded, "_conv_stem", "_bn0"), (folded, "_conv_head", "_bn1")]
    for block in folded._blocks:
        pairs += [
            (block, "_expand_conv", "_bn0"),
            (block, "_depthwise_conv", "_bn1"),
            (block, "_project_conv", "_bn2"),
        ]
    for owner, conv, norm in pairs:
        if hasattr(owner, conv) and hasattr(owner, norm):
            setattr(owner, conv, fuse_conv_bn_eval(getattr(owner, conv), getattr(owner, norm)))
            setattr(owner, norm, nn.Identity())
    return folded


def folded_copy(model: nn.Module) -> nn.Module:
    """A BN-folded copy: the library's EfficientNet by name, anything built of
    `nn.Sequential(conv, bn, ...)` units (the build's CNN, a fine-tuned backbone) generically."""
    return fold_efficientnet(model) if hasattr(model, "_blocks") else fold_batch_norm(model)


def input_ranges(model: nn.Module, layers: Sequence[nn.Module], images: np.ndarray) -> list:
    """Each layer's input (min, max) over `images`, as ONNX Runtime's min-max calibrator sees
    them on the float model; zero is always inside, as in uint8 with a zero point."""
    seen = [[0.0, 0.0] for _ in layers]

    def recorder(index: int):
        def hook(module: nn.Module, args: tuple[torch.Tensor]) -> None:
            seen[index][0] = min(seen[index][0], args[0].min().item())
            seen[index][1] = max(seen[index][1], args[0].max().item())

        return hook

    hooks = [layer.register_forward_pre_hook(recorder(i)) for i, layer in enumerate(layers)]
    with torch.no_grad():
        for start in range(0, len(images), 16):
            model.eval()(torch.from_numpy(images[start : start + 16]))
    for hook in hooks:
        hook.remove()
    return seen


def distill(
    teacher: nn.Module,
    calibration: np.ndarray,
    views: Callable[[int], np.ndarray],
    *,
    steps: int,
    lr: float = 1e-5,
    weight_levels: int = 127,
) -> nn.Module:
    """Label-free quantization-aware fine-tuning: a fake-quantized, BN-folded copy of `teacher`
    learns to match the teacher's own class probabilities on `views(step)` batches.

    No labels are needed, so any unlabelled images of the serving domain will do. Returns the
    folded student with plain float weights, ready for export and static quantization.
    """
    import torch.nn.functional as F

    from models.publish.pipeline import log

    folded: Any = fold_efficientnet(teacher)  # an EfficientNet: its attributes are untyped
    # no stochastic depth or dropout: the student should copy the teacher, not regularise
    folded._global_params = folded._global_params._replace(drop_connect_rate=0.0)
    folded._dropout.p = 0.0
    student, _, handles = fake_quantized(folded, calibration, weight_levels)
    optimizer = torch.optim.Adam(student.parameters(), lr=lr)
    teacher.eval()
    for step in range(steps):
        batch = torch.from_numpy(views(step))
        with torch.no_grad():
            target = F.softmax(teacher(batch), dim=1)
        student.train()
        loss = F.kl_div(F.log_softmax(student(batch), dim=1), target, reduction="batchmean")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == steps - 1:
            log(f"distill step {step}: KL divergence from the teacher {loss.item():.4f}")
    return finish(student, handles)


def fake_quantized(
    folded: nn.Module, calibration: np.ndarray, weight_levels: int, float_first: bool = False
) -> tuple:
    """A copy of a folded network with fake-quantized weights and inputs (ranges: min-max over
    `calibration`), its quantized layers, and the hooks that quantize their inputs; with
    `float_first`, the first layer (the one that reads the image) stays float."""
    model = copy.deepcopy(folded).eval()
    layers = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    layers = layers[1:] if float_first else layers
    handles = []
    for layer, (low, high) in zip(layers, input_ranges(model, layers, calibration), strict=True):
        parametrize.register_parametrization(layer, "weight", WeightFakeQuant(weight_levels))
        observer = InputFakeQuant(momentum=0.0)  # fixed at the calibrated range
        observer.low, observer.high = low, high
        handles.append(layer.register_forward_pre_hook(observer))
    return model, layers, handles


def local_errors(model: nn.Module, layers: list[nn.Module], images: np.ndarray) -> list:
    """Per layer and output channel, the mean of (quantized layer - float layer) on the same
    input, inside the fake-quantized `model`: each layer's own systematic rounding error, not
    the error it inherits from the layers before it."""
    import torch.nn.functional as F

    sums: list = [0.0] * len(layers)
    raw: list = [None] * len(layers)

    def keep_raw(index: int):
        def hook(module: nn.Module, args: tuple[torch.Tensor]) -> None:
            raw[index] = args[0]

        return hook

    def compare(index: int):
        # a parametrized Conv2d or Linear, perhaps the library's (untyped) padded conv
        def hook(module: Any, args: tuple, output: torch.Tensor) -> None:
            weight = module.parametrizations.weight.original
            x = raw[index]
            if isinstance(module, nn.Linear):
                exact = F.linear(x, weight, module.bias)
            else:
                padded = module.static_padding(x) if hasattr(module, "static_padding") else x
                exact = F.conv2d(
                    padded,
                    weight,
                    module.bias,
                    module.stride,
                    module.padding,
                    module.dilation,
                    module.groups,
                )
            difference = output - exact
            if difference.ndim == 4:
                difference = difference.mean((2, 3))
            sums[index] = sums[index] + difference.sum(0)

        return hook

    hooks = [
        layer.register_forward_pre_hook(keep_raw(i), prepend=True) for i, layer in enumerate(layers)
    ]
    hooks += [layer.register_forward_hook(compare(i)) for i, layer in enumerate(layers)]
    with torch.no_grad():
        for start in range(0, len(images), 16):
            model(torch.from_numpy(images[start : start + 16]))
    for hook in hooks:
        hook.remove()
    return [s / len(images) for s in sums]


def bias_corrected(
    teacher: nn.Module,
    calibration: np.ndarray,
    *,
    weight_levels: int = 127,
    float_first: bool = False,
) -> nn.Module:
    """The BN-folded network with each layer's bias shifted by minus its mean rounding error
    under INT8 (weights and inputs fake-quantized as ONNX Runtime will quantize them), measured
    on `calibration` inside the quantized network: error that is systematic, not noise, is
    removed before ONNX Runtime quantizes. Once: a bias shift leaves each layer's own error as
    it was, so a second pass would subtract it twice. `float_first`: the first layer will be left
    unquantized (`nodes_to_exclude`), so its bias keeps its value."""
    folded = folded_copy(teacher)
    float_layers = [m for m in folded.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    float_layers = float_layers[1:] if float_first else float_layers
    quantized, layers, handles = fake_quantized(folded, calibration, weight_levels, float_first)
    errors = local_errors(quantized, layers, calibration)
    with torch.no_grad():
        for layer, error in zip(float_layers, errors, strict=True):
            layer.bias -= error
    for handle in handles:
        handle.remove()
    return folded
