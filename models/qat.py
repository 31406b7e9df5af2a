"""Quantization-aware fine-tuning: teach the folded network to live on the INT8 grid.

The network is BN-folded first (as exported), then every Conv2d/Linear sees its weights
fake-quantized per output channel (symmetric 7-bit, as models/quantize.py has ONNX Runtime
quantize them) and its input fake-quantized per tensor (uint8 over a running min/max, as the
calibrated activations). After a short fine-tune the fake quantization is removed again; the
float weights that remain sit where static INT8 quantization rounds them to what training saw.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from models.export import fold_batch_norm

WEIGHT_LEVELS = 63  # 7-bit weights, as models/quantize.py asks of ONNX Runtime (reduce_range)


class WeightFakeQuant(nn.Module):
    """Per-output-channel symmetric 7-bit fake quantization of a weight tensor."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        reduce = tuple(range(1, weight.ndim))
        scale = (weight.detach().abs().amax(reduce) / WEIGHT_LEVELS).clamp_min(1e-8)
        zero = torch.zeros(len(scale), dtype=torch.int32, device=weight.device)
        return torch.fake_quantize_per_channel_affine(
            weight, scale, zero, 0, -WEIGHT_LEVELS, WEIGHT_LEVELS
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
