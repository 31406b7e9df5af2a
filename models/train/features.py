"""Frozen backbone features, computed once per image view by ONNX Runtime.

The frozen part of a fine-tuned network never changes, so its output for each view of each
image is computed once and training then runs only the layers that learn. ONNX Runtime runs
the frozen layers several times faster than eager torch on a CPU (depthwise convolutions above
all; see docs/transfer-learning.md), so the frozen part is exported and run there.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from torch import nn
from tqdm import tqdm

from models.export import onnx as export
from models.publish.pipeline import quiet_stdout

BATCH = 32


class FrozenFeatures:
    """uint8 NHWC views -> the frozen module's float output, normalised as the service does."""

    def __init__(
        self,
        module: nn.Module,
        input_shape: tuple[int, int, int],
        mean: list[float],
        std: list[float],
        threads: int,
    ) -> None:
        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory) / "frozen.onnx"
            with quiet_stdout():
                export.export_onnx(export.fold_batch_norm(module), path, input_shape)
            self.session = export.session(path, threads)
        std_ = np.asarray(std, np.float32)
        self.scale = (1.0 / (255.0 * std_)).astype(np.float32)
        self.bias = (-np.asarray(mean, np.float32) / std_).astype(np.float32)

    def __call__(self, views: np.ndarray) -> np.ndarray:
        normalised = views * self.scale + self.bias  # as app.preprocess normalises
        batch = np.ascontiguousarray(normalised.transpose(0, 3, 1, 2))
        (features,) = self.session.run([export.OUTPUT_NAME], {export.INPUT_NAME: batch})
        return features


def cache_views(
    features: FrozenFeatures,
    count: int,
    views: int,
    make_view: Callable[[int, int], np.ndarray],
    *,
    desc: str,
    quiet: bool = False,
) -> np.ndarray:
    """float16 [count, views, ...]: the features of view v of image i, `make_view(i, v)`.

    Stored as float16: half the memory, and far finer than the training noise it feeds.
    """
    cache: np.ndarray | None = None
    pairs = [(i, v) for i in range(count) for v in range(views)]
    bar = tqdm(
        total=len(pairs),
        desc=desc,
        unit="view",
        leave=False,
        disable=True if quiet else None,
        mininterval=1.0,
        dynamic_ncols=True,
    )
    for start in range(0, len(pairs), BATCH):
        chunk = pairs[start : start + BATCH]
        out = features(np.stack([make_view(i, v) for i, v in chunk]))
        if cache is None:
            cache = np.empty((count, views, *out.shape[1:]), np.float16)
        for (i, v), row in zip(chunk, out, strict=True):
            cache[i, v] = row
        bar.update(len(chunk))
    bar.close()
    assert cache is not None, "no views to cache"
    return cache
