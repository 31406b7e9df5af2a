"""`blink import`: an ONNX image classifier (or a pretrained backbone) in, a model bundle out.

Stages: read and check the model -> describe its input (flags, else what the graph says) ->
fp32 (a fixed batch made dynamic and checked) -> INT8 (static, calibrated) and fp16 when
calibration images are given -> evaluate every variant through the service's preprocessing and
engine -> gate -> speed -> manifest, report, `latest`; the same bundle `blink build` writes.

Exit status: 0 imported; 1 the gate failed (the bundle is kept, `latest` is not moved); 2 a
model, labels file or flag that cannot work, said in one line.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import onnx

from models.publish import import_inputs as inputs
from models.publish.pipeline import BuildError, GateFailed

LAYOUTS = ("NCHW", "NHWC")
PRETRAINED_CROPS = 128  # augmented photo crops INT8 is calibrated on, besides the photos


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="blink import",
        description="Turn an ONNX image classifier into a served-ready model bundle.",
    )
    p.add_argument("model", nargs="?", type=Path, help="the .onnx file")
    p.add_argument("--labels", type=Path, help="one label per line, or JSON (list or index->name)")
    p.add_argument(
        "--pretrained",
        metavar="NAME",
        help="instead of a file: an ImageNet backbone from the 'pretrained' extra "
        "(efficientnet-lite0), exported, calibrated on sample photos and checked on them",
    )
    i = p.add_argument_group("input (defaults: what the model's input tensor says)")
    i.add_argument("--input-name", help="default: the model's only image input")
    i.add_argument("--size", help="N or HxW; default: the input's fixed height and width")
    i.add_argument("--color", choices=["RGB", "L"], help="default: RGB for 3 channels, L for 1")
    i.add_argument("--layout", choices=LAYOUTS, help="default: where the 1 or 3 channels sit")
    i.add_argument("--resize", choices=["center_crop", "stretch"], default="center_crop")
    i.add_argument(
        "--crop-fraction",
        type=float,
        help="centre crop: shorter side to size / fraction, then crop (default: 0.875 for RGB, "
        "the ImageNet 256 -> 224 convention; 1.0 for greyscale)",
    )
    i.add_argument("--interpolation", choices=["bilinear", "bicubic"], default="bilinear")
    i.add_argument(
        "--mean",
        help=f"per channel, or a preset ({', '.join(inputs.NORMALISATION)}); pixels are "
        "(x/255 - mean) / std; default: imagenet for RGB, unit for L",
    )
    i.add_argument("--std", help="per channel, or a preset; default: as --mean")
    o = p.add_argument_group("output")
    o.add_argument("--output-name", help="default: the model's first output")
    o.add_argument(
        "--output-kind",
        choices=["logits", "probabilities"],
        help="default: probabilities when the output comes from a Softmax node, else logits",
    )
    v = p.add_argument_group("variants and checks")
    v.add_argument("--calibrate", type=Path, metavar="DIR", help="images for static INT8")
    v.add_argument(
        "--calibration-images",
        type=int,
        help="at most this many (default 512; --pretrained: 128 augmented crops of the photos)",
    )
    v.add_argument(
        "--calibration-method",
        choices=["minmax", "entropy", "percentile"],
        help="default: percentile; --pretrained: minmax (histograms of every activation of "
        "every 224x224 image would not fit in memory)",
    )
    v.add_argument("--no-fp16", action="store_true", help="skip the fp16 (GPU) variant")
    v.add_argument(
        "--eval",
        type=Path,
        metavar="DIR",
        help="class-per-folder labelled images: accuracy on all of them; per class, a quarter "
        "fits the temperature, a quarter the prediction sets' thresholds, and the other half "
        "measures their coverage",
    )
    v.add_argument(
        "--coverage",
        help="with --eval: coverage levels of the prediction sets, comma-separated "
        "(default 0.9,0.95,0.99: those the eval images can support)",
    )
    v.add_argument("--max-int8-drop", type=float, default=0.3, help="in accuracy points")
    v.add_argument("--min-accuracy", type=float, default=0.0, help="a fraction, e.g. 0.9")
    v.add_argument(
        "--min-int8-agreement",
        type=float,
        help="least fraction of check images where INT8's top class is fp32's (default: not gated)",
    )
    v.add_argument("--seed", type=int, default=0)
    out = p.add_argument_group("output bundle")
    out.add_argument("--out", type=Path, default=Path("models/repository"))
    out.add_argument("--name", help="default: the file's name, or imagenet-<backbone>")
    out.add_argument("--version", help="default: UTC time, 20261123T130501Z")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    try:
        bundle = run(args, argv)
    except BuildError as exc:
        print(f"blink import: error: {exc}", file=sys.stderr)
        return 2
    except GateFailed as exc:
        print(f"blink import: gate failed: {exc}", file=sys.stderr)
        return 1
    print(bundle)
    return 0


def run(args: argparse.Namespace, argv: list[str]) -> Path:
    from models.commands.build import parse_coverage
    from models.publish.import_bundle import Source, write_import

    pretrained = bool(args.pretrained)
    args.calibration_method = args.calibration_method or ("minmax" if pretrained else "percentile")
    args.calibration_images = args.calibration_images or (PRETRAINED_CROPS if pretrained else 512)
    if args.calibration_images < 1:
        raise BuildError("--calibration-images must be at least 1")
    args.coverage = parse_coverage(args.coverage) if args.coverage else None
    if args.coverage and args.eval is None:
        raise BuildError("--coverage needs --eval DIR (labelled images to calibrate on)")
    if pretrained:
        source = pretrained_source(args)
        try:
            return write_import(args, argv, source)
        finally:
            source.path.unlink(missing_ok=True)  # the export; the bundle holds its copy
    if args.model is None or args.labels is None:
        raise BuildError("give MODEL.onnx and --labels FILE (or --pretrained NAME)")
    labels = inputs.read_labels(args.labels)
    model = load_model(args.model)
    name = args.name or safe_name(args.model.stem)
    return write_import(args, argv, Source(args.model, model, labels, name))


def pretrained_source(args: argparse.Namespace):
    """Export the backbone next to where the bundle goes; its input spec fills unset flags."""
    from models.nets import pretrained
    from models.publish.import_bundle import Source

    if args.model is not None or args.labels is not None:
        raise BuildError("--pretrained takes no MODEL.onnx or --labels (both come with it)")
    try:
        spec = pretrained.pretrained_spec(args.pretrained)
        labels = pretrained.imagenet_labels()
        name = args.name or f"imagenet-{spec.name}"
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f".{name}.export.onnx"
        torch_model = pretrained.export_onnx(spec.name, path)
    except pretrained.PretrainedUnavailable as exc:
        raise BuildError(str(exc)) from exc
    given = spec.input_spec()
    args.size = args.size or str(given.height)
    args.crop_fraction = args.crop_fraction or given.crop_fraction
    args.mean = args.mean or ",".join(map(str, given.mean))
    args.std = args.std or ",".join(map(str, given.std))
    return Source(path, onnx.load(str(path)), labels, name, torch_model=torch_model)


def load_model(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise BuildError(f"{path}: no such file")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf raises DecodeError, onnx its own types
        raise BuildError(f"{path} is not an ONNX file ({type(exc).__name__})") from exc
    if not model.graph.node or not model.graph.input or not model.graph.output:
        raise BuildError(f"{path} is not an ONNX model (no graph nodes, inputs or outputs)")
    return model


def safe_name(stem: str) -> str:
    """A bundle name the manifest accepts, from a file name."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-._")
    return name or "model"
