"""What an imported model reads and answers: its input spec and output, from the flags where
given, else from what the ONNX graph says; anything that cannot work is refused in one line."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from app.bundle import InputSpec, OutputSpec
from models.export import graph as onnx_graph
from models.publish import import_inputs as inputs
from models.publish.pipeline import BuildError


def describe_input(args, graph: onnx_graph.GraphIO, path: Path) -> InputSpec:
    """The manifest's input spec: the flags, checked against the graph, which fills the gaps."""
    tensor = pick_input(args, graph, path)
    dims = tensor.dims
    if len(dims) != 4:
        raise BuildError(
            f"{path}: input {tensor.name!r} has rank {len(dims)} ({format_dims(dims)}); an "
            "image classifier takes [N, C, H, W] or [N, H, W, C]"
        )
    layout = args.layout or onnx_graph.guess_layout(dims) or "NCHW"
    channel_axis, spatial = (1, (2, 3)) if layout == "NCHW" else (3, (1, 2))
    channels = dims[channel_axis]
    if isinstance(channels, int) and channels not in (1, 3):
        raise BuildError(
            f"{path}: input {tensor.name!r} {format_dims(dims)} has {channels} channels where "
            f"{layout} puts them; expected 1 or 3" + ("" if args.layout else " (try --layout)")
        )
    if args.color and isinstance(channels, int) and channels != {"RGB": 3, "L": 1}[args.color]:
        raise BuildError(
            f"--color {args.color} needs {3 if args.color == 'RGB' else 1} channel(s), but "
            f"{path}'s input {format_dims(dims)} has {channels}"
        )
    color = args.color or ("L" if channels == 1 else "RGB")
    channels = 1 if color == "L" else 3
    height, width = input_size(args, [dims[a] for a in spatial], path)
    default_norm = "imagenet" if color == "RGB" else "unit"
    crop = args.crop_fraction or (0.875 if color == "RGB" else 1.0)
    try:
        return InputSpec(
            name=tensor.name,
            height=height,
            width=width,
            channels=channels,
            color=color,
            resize=args.resize,
            crop_fraction=crop,
            interpolation=args.interpolation,
            mean=inputs.normalisation(args.mean, channels, default_norm, "--mean"),
            std=inputs.normalisation(args.std or args.mean, channels, default_norm, "--std"),
            layout=layout,
        )
    except ValidationError as exc:
        raise BuildError(f"input description is invalid: {exc.errors()[0]['msg']}") from None


def pick_input(args, graph: onnx_graph.GraphIO, path: Path) -> onnx_graph.Tensor:
    names = [t.name for t in graph.inputs]
    if args.input_name:
        if args.input_name not in names:
            raise BuildError(f"{path} has no input {args.input_name!r} (has {names})")
        return next(t for t in graph.inputs if t.name == args.input_name)
    if len(names) != 1:
        raise BuildError(f"{path} has {len(names)} inputs {names}: pick one with --input-name")
    return graph.inputs[0]


def input_size(args, dims: list, path: Path) -> tuple[int, int]:
    fixed = all(isinstance(d, int) and d > 0 for d in dims)
    if args.size:
        size = inputs.parse_size(args.size)
        if fixed and tuple(dims) != size:
            raise BuildError(
                f"--size {args.size} contradicts {path}'s input, fixed at {dims[0]}x{dims[1]}"
            )
        return size
    if not fixed:
        raise BuildError(f"{path}'s input height and width are not fixed: pass --size")
    return dims[0], dims[1]


def describe_output(args, graph: onnx_graph.GraphIO, labels: list[str], path: Path) -> OutputSpec:
    names = [o.name for o in graph.outputs]
    if args.output_name and args.output_name not in names:
        raise BuildError(f"{path} has no output {args.output_name!r} (has {names})")
    tensor = graph.output(args.output_name)
    check_classes(tensor.name, tensor.dims, labels, path)
    guessed = "probabilities" if tensor.name in graph.softmax_outputs else "logits"
    return OutputSpec(name=tensor.name, kind=args.output_kind or guessed)


def check_classes(name: str, dims: list, labels: list[str], path: Path) -> None:
    """The output must be [N, classes] with one label per class."""
    if len(dims) != 2:
        raise BuildError(
            f"{path}: output {name!r} has shape {format_dims(dims)}; a classifier's output "
            "must be [N, classes]"
        )
    if isinstance(dims[1], int) and dims[1] != len(labels):
        raise BuildError(
            f"{path}: output {name!r} has {dims[1]} classes but there are {len(labels)} labels"
        )


def format_dims(dims: list) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"
