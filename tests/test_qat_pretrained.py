"""Post-training fixes for the pretrained EfficientNet-Lite: BN folding, bias correction and
self-distillation, on an untrained Lite0 at a small input size (no weights file needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.compress import qat

SIZE = 64


@pytest.fixture(scope="module")
def lite0() -> torch.nn.Module:
    efficientnet = pytest.importorskip("efficientnet_lite_pytorch")
    torch.manual_seed(0)
    model = efficientnet.EfficientNet.from_name("efficientnet-lite0", image_size=SIZE)
    for module in model.modules():  # BN statistics that are not the identity
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
    return model.eval()


def images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (count, 3, SIZE, SIZE)).astype(np.float32)


def test_folding_keeps_the_answers_and_removes_every_batch_norm(lite0) -> None:
    folded = qat.fold_efficientnet(lite0)
    x = torch.from_numpy(images(4))
    with torch.no_grad():
        torch.testing.assert_close(folded(x), lite0(x), atol=1e-4, rtol=1e-4)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in lite0.modules())  # a copy


@pytest.mark.slow
def test_bias_correction_brings_the_quantized_mean_output_back(lite0) -> None:
    calibration = images(8)
    folded = qat.fold_efficientnet(lite0)
    corrected = qat.bias_corrected(lite0, calibration)

    def mean_error(model: torch.nn.Module) -> float:
        quantized, _, _ = qat.fake_quantized(model, calibration, 127)
        x = torch.from_numpy(calibration)
        with torch.no_grad():
            return float((quantized(x).mean(0) - folded(x).mean(0)).abs().mean())

    assert mean_error(corrected) < 0.9 * mean_error(folded)


@pytest.mark.slow
def test_distillation_runs_without_labels_and_returns_plain_float_weights(lite0) -> None:
    calibration = images(8)
    student = qat.distill(lite0, calibration, lambda step: images(4, step + 1), steps=2)
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in student.modules())
    assert not student._forward_pre_hooks and not any(
        m._forward_pre_hooks for m in student.modules()
    )
    assert student(torch.from_numpy(images(2))).shape == (2, 1000)


def test_bias_correction_folds_any_conv_bn_network() -> None:
    """A fine-tuned backbone is built of `Sequential(conv, bn, ReLU6)` units, not the library's
    attributes: it is folded generically and its quantized mean output comes back too."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16)),
        torch.nn.ReLU6(),
        torch.nn.Sequential(
            torch.nn.Conv2d(16, 16, 3, padding=1, groups=16), torch.nn.BatchNorm2d(16)
        ),
        torch.nn.ReLU6(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(16, 4),
    )
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    net.eval()
    calibration = images(16)
    folded = qat.folded_copy(net)
    corrected = qat.bias_corrected(net, calibration)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in corrected.modules())
    x = torch.from_numpy(calibration)

    def mean_error(model: torch.nn.Module) -> float:
        quantized, _, _ = qat.fake_quantized(model, calibration, 127)
        with torch.no_grad():
            return float((quantized(x).mean(0) - folded(x).mean(0)).abs().mean())

    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), atol=1e-4, rtol=1e-4)
    assert mean_error(corrected) < 0.9 * mean_error(folded)
