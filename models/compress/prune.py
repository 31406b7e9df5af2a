"""Structured channel pruning: drop the weakest inner channels of every residual block.

A block's inner width (conv1's outputs, conv2's inputs) is free to shrink; the stage widths are
tied together by the identity paths, so they stay. A channel's strength is the L1 norm of its
filter times the magnitude of its batch-norm scale, i.e. how much it can move the next layer.
"""

from __future__ import annotations

import copy
from typing import cast

import torch
from torch import nn

from models.nets.cnn import Net, NetConfig, Residual


def channel_strength(block: Residual) -> torch.Tensor:
    conv, bn = cast(nn.Conv2d, block.conv1[0]), cast(nn.BatchNorm2d, block.conv1[1])
    return conv.weight.detach().abs().sum((1, 2, 3)) * bn.weight.detach().abs()


def prune_channels(model: Net, fraction: float) -> Net:
    """A new, smaller network keeping the strongest (1 - fraction) inner channels per block."""
    if not 0 <= fraction < 1:
        raise ValueError(f"--prune must be in [0, 1), not {fraction}")
    blocks = [m for m in model.modules() if isinstance(m, Residual)]
    keep = []
    for block in blocks:
        strength = channel_strength(block)
        count = max(1, round(len(strength) * (1 - fraction)))
        keep.append(torch.sort(torch.topk(strength, count).indices).values)
    config = NetConfig(**{**model.config.to_dict(), "mids": [len(k) for k in keep]})
    pruned = Net(config)
    state = copy.deepcopy(model.state_dict())
    new_blocks = [m for m in pruned.modules() if isinstance(m, Residual)]
    names = {id(m): n for n, m in model.named_modules()}
    for old, new, index in zip(blocks, new_blocks, keep, strict=True):
        prefix = names[id(old)]
        conv1, bn1, conv2 = f"{prefix}.conv1.0", f"{prefix}.conv1.1", f"{prefix}.conv2.0"
        state[f"{conv1}.weight"] = state[f"{conv1}.weight"][index]
        for key in ("weight", "bias", "running_mean", "running_var"):
            state[f"{bn1}.{key}"] = state[f"{bn1}.{key}"][index]
        state[f"{conv2}.weight"] = state[f"{conv2}.weight"][:, index]
        del new  # shapes come from the config; the state dict fills them
    pruned.load_state_dict(state)
    return pruned
