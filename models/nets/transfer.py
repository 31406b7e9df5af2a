"""An ImageNet-pretrained EfficientNet-Lite backbone with a new head, split into a frozen and
a tuned part (the frozen-feature path trains only the tuned part; a whole-network fine-tune
freezes nothing), and its checkpoint."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models.nets.cnn import AvgMaxPool
from models.publish.pipeline import quiet_stdout

CHECKPOINT_KIND = "transfer"


class InvertedResidual(nn.Module):
    """One EfficientNet-Lite MBConv block, rebuilt from `nn.Sequential` conv-BN-ReLU6 units so
    that export folds its batch norms and QAT finds its convolutions (models/export/onnx.py)."""

    def __init__(self, block: Any) -> None:  # the library's MBConvBlock, untyped
        super().__init__()
        if block.has_se:
            raise ValueError("squeeze-and-excitation blocks are not supported (Lite has none)")
        args = block._block_args
        units: list[nn.Module] = []
        if args.expand_ratio != 1:
            units.append(nn.Sequential(block._expand_conv, block._bn0, nn.ReLU6()))
        units.append(nn.Sequential(block._depthwise_conv, block._bn1, nn.ReLU6()))
        units.append(nn.Sequential(block._project_conv, block._bn2))
        self.units = nn.Sequential(*units)
        self.residual = bool(
            block.id_skip and args.stride == 1 and args.input_filters == args.output_filters
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.units(x)
        return out + x if self.residual else out


class TransferNet(nn.Module):
    """An EfficientNet-Lite backbone split into a frozen and a tuned part, and a new head.

    `tune_last` = every layer (`layer_count`) trains the whole network. `pool` "avgmax" feeds
    the head the global maximum of the features beside their average, so a small local detail
    is not averaged away over a large frame.
    """

    def __init__(
        self, backbone_name: str, labels: list[str], tune_last: int, pool: str = "avg"
    ) -> None:
        super().__init__()
        from models.nets.pretrained import load_backbone

        with quiet_stdout():  # the loader prints a line about the weights
            backbone = load_backbone(backbone_name)
        layers = [
            nn.Sequential(backbone._conv_stem, backbone._bn0, nn.ReLU6()),
            *(InvertedResidual(block) for block in backbone._blocks),
            nn.Sequential(backbone._conv_head, backbone._bn1, nn.ReLU6()),
        ]
        if not 0 <= tune_last <= len(layers):
            raise ValueError(f"tune_last must be in [0, {len(layers)}], not {tune_last}")
        split = len(layers) - tune_last
        self.backbone_name, self.labels, self.tune_last = backbone_name, list(labels), tune_last
        self.pool = pool
        self.frozen = nn.Sequential(*layers[:split])
        pooling: list[nn.Module] = (
            [AvgMaxPool()] if pool == "avgmax" else [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        )
        self.tuned = nn.Sequential(*layers[split:], *pooling)
        features = backbone._fc.in_features * (2 if pool == "avgmax" else 1)
        self.classifier = nn.Linear(features, len(labels))
        for parameter in self.frozen.parameters():
            parameter.requires_grad_(False)
        # "train": batch norm re-estimates its statistics on the photos as the network trains;
        # "frozen": it keeps ImageNet's (the weights still learn)
        self.batch_norm = "train"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.tuned(self.frozen(x)))

    def train(self, mode: bool = True) -> TransferNet:
        super().train(mode)
        if mode and self.batch_norm == "frozen":
            for module in self.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.eval()
        return self

    def lr_groups(self, lr: float) -> list[tuple[list[nn.Parameter], float]]:
        """Discriminative learning rates: the head at `lr`, the tuned layers from `lr` at the
        top down to a tenth of it at the first one (early layers hold the most general
        features and need the least change)."""
        layers = [m for m in self.tuned if any(True for _ in m.parameters())]
        groups = [(list(self.classifier.parameters()), lr)]
        for depth, layer in enumerate(reversed(layers)):
            factor = EARLY_LAYER_LR ** (depth / max(1, len(layers) - 1))
            groups.append((list(layer.parameters()), lr * factor))
        return groups


# The first tuned layer's learning rate, as a fraction of the head's
EARLY_LAYER_LR = 0.1


def layer_count(backbone_name: str) -> int:
    """How many layers `tune_last` can count: the stem, every MBConv block, the head conv."""
    from models.nets.pretrained import load_backbone

    with quiet_stdout():
        backbone = load_backbone(backbone_name)
    return len(backbone._blocks) + 2


def save_checkpoint(model: TransferNet, path) -> None:
    torch.save(
        {
            "kind": CHECKPOINT_KIND,
            "backbone": model.backbone_name,
            "labels": model.labels,
            "tune_last": model.tune_last,
            "pool": model.pool,
            "state_dict": model.state_dict(),
        },
        path,
    )


def load_checkpoint(checkpoint: dict) -> TransferNet:
    model = TransferNet(
        checkpoint["backbone"],
        checkpoint["labels"],
        checkpoint["tune_last"],
        checkpoint.get("pool", "avg"),
    )
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()
