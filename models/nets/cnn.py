"""The CNN: a small ResNet-style network sized for accuracy per millisecond on CPU.

Shape, for a 28x28 input: a 3x3 stem at full resolution (cheap: one input channel), then stages
that halve the resolution with max-pooling and double the width, each a 3x3 conv followed by
`depth` residual blocks. One linear layer over the flattened final map makes the logits.

Larger inputs (a folder of photos at its own resolution, `for_input`) get a stride-2 stem, which
still sees every pixel, so fine texture reaches the first features at a quarter of the cost,
and a head over the global average *and* the global maximum of the final map: the average
carries what the whole frame shows, the maximum lets one small local detail (a defect a few
pixels wide) decide the answer instead of being averaged away.

Every conv is followed by batch norm and ReLU, so export folds BN into the conv and ONNX Runtime
fuses the ReLU: each layer becomes a single (QLinear)Conv in the served graph. Each residual
block's inner width (`mid`) is independent of the stage width, which is what channel pruning
shrinks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import cast

import torch
from torch import nn


@dataclass
class NetConfig:
    in_channels: int = 1
    classes: int = 10
    input_height: int = 28
    input_width: int = 28
    width: int = 32
    depth: int = 1
    # inner widths of the residual blocks, one per block, after pruning; None = stage width
    mids: list[int] | None = field(default=None)
    stem_stride: int = 1
    # "flatten": a linear layer over the whole final map (small, centred images);
    # "avgmax": over its global average and maximum (any size, details anywhere)
    head: str = "flatten"

    def to_dict(self) -> dict:
        return asdict(self)

    def stage_widths(self) -> list[int]:
        """Widths of the downsampling stages: double each time, until the map is <= 8 pixels."""
        widths: list[int]
        widths, size = [], min(self.input_height, self.input_width) // self.stem_stride
        while size > 8 and len(widths) < 4:
            size //= 2
            widths.append(self.width * 2 ** (len(widths) + 1))
        return widths or [self.width * 2]


# Inputs whose shorter side is at most this keep the full-resolution stem and flattened head.
SMALL_INPUT = 64


def for_input(
    in_channels: int, classes: int, height: int, width: int, *, channels: int, depth: int
) -> NetConfig:
    """The network for one input size: the small-image design up to SMALL_INPUT pixels, the
    strided stem and average-and-maximum head beyond."""
    large = min(height, width) > SMALL_INPUT
    return NetConfig(
        in_channels=in_channels,
        classes=classes,
        input_height=height,
        input_width=width,
        width=channels,
        depth=depth,
        stem_stride=2 if large else 1,
        head="avgmax" if large else "flatten",
    )


class AvgMaxPool(nn.Module):
    """[N, C, H, W] -> [N, 2C]: the global average and the global maximum of each channel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean((2, 3)), x.amax((2, 3))], 1)


def conv_bn(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class Residual(nn.Module):
    """x + BN(conv(ReLU(BN(conv(x))))), then ReLU; `mid` is the prunable inner width."""

    def __init__(self, channels: int, mid: int) -> None:
        super().__init__()
        self.conv1 = conv_bn(channels, mid)
        self.conv2 = nn.Sequential(
            nn.Conv2d(mid, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels)
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.conv2(self.conv1(x)))


class Net(nn.Module):
    def __init__(self, config: NetConfig) -> None:
        super().__init__()
        self.config = config
        widths = config.stage_widths()
        mids = config.mids or [w for w in widths for _ in range(config.depth)]
        if len(mids) != len(widths) * config.depth:
            raise ValueError(f"mids needs {len(widths) * config.depth} values, got {len(mids)}")
        layers: list[nn.Module] = [conv_bn(config.in_channels, config.width, config.stem_stride)]
        previous, blocks = config.width, iter(mids)
        for width in widths:
            layers += [nn.MaxPool2d(2), conv_bn(previous, width)]
            layers += [Residual(width, next(blocks)) for _ in range(config.depth)]
            previous = width
        self.features = nn.Sequential(*layers)
        if config.head == "avgmax":
            self.pool: nn.Module = AvgMaxPool()
            self.classifier = nn.Linear(2 * previous, config.classes)
        else:
            # A linear layer over the whole final map, not over its average: Fashion-MNIST's
            # items are centred, where a feature fires is informative, and this head learns in
            # a fraction of the epochs a global-average-pool head needs.
            shrink = config.stem_stride * 2 ** len(widths)
            cells = (config.input_height // shrink) * (config.input_width // shrink)
            self.pool = nn.Flatten()
            self.classifier = nn.Linear(previous * cells, config.classes)
        self._init_weights()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        # Zero-init the last BN of each residual branch: every block starts as the identity,
        # which lets short schedules use a high learning rate from the first step.
        for module in self.modules():
            if isinstance(module, Residual):
                nn.init.zeros_(cast(nn.BatchNorm2d, module.conv2[1]).weight)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_checkpoint(model: Net, path) -> None:
    torch.save({"config": model.config.to_dict(), "state_dict": model.state_dict()}, path)


def load_checkpoint(path) -> Net:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    model = Net(NetConfig(**checkpoint["config"]))
    model.load_state_dict(checkpoint["state_dict"])
    return model
