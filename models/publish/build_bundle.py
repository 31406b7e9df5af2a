"""From a trained network to a verified bundle: export, quantize, evaluate, gate, measure, write.

The bundle is assembled in a hidden staging folder next to its final place and renamed into
place when complete, so `<name>/<version>` never exists half-written; `latest` moves only when
the gate passed and the service's own loader and engine accepted the result.
"""

from __future__ import annotations

import datetime as dt
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from app.bundle import (
    MANIFEST_FILE,
    InputSpec,
    Manifest,
    load_bundle,
)
from app.engine import Engine
from models.data.datasets import Dataset
from models.evaluate import metrics as evaluation
from models.nets import cnn as nets
from models.publish.pipeline import (
    VARIANT_FILES,
    BuildError,
    BuildState,
    library_versions,
    log,
    publish,
    quiet_stdout,
    variant_entries,
)

if TYPE_CHECKING:
    from torch import nn

PARITY_BOUND = 1e-3  # max |torch - ONNX Runtime| logit difference tolerated for fp32
PARITY_PIXELS = 2_000_000  # input pixels compared in the parity check (at most 512 images)
# INT8 calibration reads at most this many input pixels by default (1024 28x28 images fit;
# 256 of 250x250): its histograms cost time in proportion, and more say little more
CALIBRATION_PIXELS = 16_000_000
# Each speed round is capped in time, so a 224x224 backbone measures in seconds, not minutes.
SPEED_ROUND_SECONDS = 1.0


def write_bundle(
    state: BuildState,
    dataset: Dataset,
    model,
    splits: tuple,
    mean: list[float],
    std: list[float],
    spec: InputSpec | None = None,
) -> Path:
    """`spec`: the input the model was trained for (a pretrained backbone's); default: the
    dataset's size and colour, centre-cropped, with `mean` and `std`."""
    name, version = state.name, state.version
    spec = spec or InputSpec(
        height=dataset.size[0],
        width=dataset.size[1],
        channels=dataset.channels,
        color=dataset.color,
        resize="center_crop",
        mean=mean,
        std=std,
    )
    return publish(
        state.args.out / name,
        version,
        lambda staging: assemble(state, dataset, model, splits, spec, staging, name, version),
    )


def assemble(state, dataset, model, splits, spec: InputSpec, directory: Path, name, version):
    from models.evaluate import report
    from models.evaluate import speed as speeds
    from models.export import onnx as export

    args = state.args
    (train_set, _) = splits
    mean, std = spec.mean, spec.std
    with state.stage("preprocess test images"):
        inputs = evaluation.preprocess_all(evaluation.encoded_test_images(dataset), spec)
    input_shape = (spec.channels, spec.height, spec.width)
    # torch runs the parity batch eagerly: a few dozen 224x224 images say as much as 512 small
    parity_count = max(8, min(512, PARITY_PIXELS // (spec.height * spec.width)))
    with state.stage("export fp32"):
        folded = export.fold_batch_norm(model)
        with quiet_stdout():
            export.export_onnx(folded, directory / VARIANT_FILES["fp32"], input_shape)
        parity = export.parity(model, directory / VARIANT_FILES["fp32"], inputs[:parity_count])
        log(f"parity: max |torch - onnxruntime| logit difference {parity:.2e}")
        if parity > PARITY_BOUND:
            raise BuildError(f"ONNX export differs from torch by {parity:.2e} (> {PARITY_BOUND})")
    save_checkpoint(model, directory / "checkpoint.pt")
    count = args.calibration_images
    if not getattr(args, "calibration_images_given", True):  # large images: fewer say as much
        count = min(count, max(64, CALIBRATION_PIXELS // (spec.height * spec.width)))
    calibration = calibration_images(train_set, spec, count, args.seed)
    variants = ["fp32", "int8"] + ([] if args.no_fp16 else ["fp16"])
    if not args.no_fp16:
        with state.stage("export fp16"), quiet_stdout():
            export.export_onnx(folded, directory / VARIANT_FILES["fp16"], input_shape, fp16=True)
    with state.stage("quantize int8"):
        quantization = quantize(model, directory, calibration, args.calibration_method, qat=False)
    provisional = make_manifest(state, dataset, spec, directory, variants, name, version, {})
    accuracy, scores, logits = evaluate_variants(
        state, provisional, directory, variants, dataset, inputs
    )
    failures = evaluation.gate_failures(
        accuracy, max_int8_drop=args.max_int8_drop, min_accuracy=args.min_accuracy
    )
    if args.qat or evaluation.int8_drop(accuracy) > args.max_int8_drop:
        static_int8 = directory / ".static.int8.onnx"
        shutil.copyfile(directory / VARIANT_FILES["int8"], static_int8)
        val_set = splits[1]
        static_val = validation_accuracy(static_int8, val_set, spec)
        static = quantization
        quantization = {
            **static,
            "static_int8_accuracy": accuracy["int8"],
            "qat": "forced by --qat" if args.qat else "static INT8 missed the gate",
        }
        with state.stage("quantization-aware training"):
            qat_model = quantization_aware(state, model, splits, mean, std)
            quantization.update(
                quantize(qat_model, directory, calibration, args.calibration_method, qat=True)
            )
        provisional = make_manifest(state, dataset, spec, directory, variants, name, version, {})
        after = evaluate_variants(state, provisional, directory, ["int8"], dataset, inputs, "QAT")
        qat_val = validation_accuracy(directory / VARIANT_FILES["int8"], val_set, spec)
        # chosen on the validation split, not on the test set the gate reads
        if args.qat or qat_val >= static_val:
            for found, new in zip((accuracy, scores, logits), after, strict=True):
                found.update(new)
        else:
            static_int8.replace(directory / VARIANT_FILES["int8"])
            restored = make_manifest(state, dataset, spec, directory, variants, name, version, {})
            (directory / MANIFEST_FILE).write_text(restored.dump())  # the static file's hash
            quantization = {
                **static,
                "qat": f"static INT8 missed the gate; QAT's validation accuracy {qat_val:.2%} "
                f"was below static INT8's {static_val:.2%}, which is kept",
            }
        static_int8.unlink(missing_ok=True)
        failures = evaluation.gate_failures(
            accuracy, max_int8_drop=args.max_int8_drop, min_accuracy=args.min_accuracy
        )
    score_calibration = None
    if state.held_out is not None:
        with state.stage("calibrate scores"):
            score_calibration = calibrate_scores(state, directory, spec, logits, dataset)
    with state.stage("speed"):
        bundle = load_bundle(directory)  # the provisional manifest of the last evaluation
        engines = {v: Engine(bundle, device="cpu", variant=v, threads=1) for v in variants}
        speed = speeds.throughput(
            {v: e.run for v, e in engines.items()}, input_shape, round_seconds=SPEED_ROUND_SECONDS
        )
    manifest = make_manifest(
        state,
        dataset,
        spec,
        directory,
        variants,
        name,
        version,
        metrics={
            v: {
                **scores[v].to_metrics(),
                **speed[v],
                "size_bytes": (directory / VARIANT_FILES[v]).stat().st_size,
            }
            for v in variants
        },
    )
    manifest.calibration = score_calibration
    images = len(dataset.test_labels)
    manifest.reference = test_reference(variants, logits, score_calibration, images)
    manifest.provenance["parity_max_abs_logit_diff"] = parity
    manifest.provenance["quantization"] = quantization
    manifest.provenance["gate"] = {
        "max_int8_drop_points": args.max_int8_drop,
        "min_accuracy": args.min_accuracy,
        "passed": not failures,
        "failures": failures,
    }
    manifest.provenance["params"] = nets.parameter_count(model)
    manifest.provenance["build_seconds"] = round(time.perf_counter() - state.started, 1)
    (directory / MANIFEST_FILE).write_text(manifest.dump())
    with state.stage("report"):
        report.write_report(directory, manifest, state, dataset, logits)
    (directory / MANIFEST_FILE).write_text(manifest.dump())  # with the report's timings
    return manifest, failures


def test_reference(variants, logits, calibration, images: int):
    """The served variant's answers on the test split, as the service scores them."""
    from models.evaluate.reference import reference_behaviour

    variant = served_variant(variants)
    temperature = calibration.temperature if calibration is not None else 1.0
    split = f"test split ({images} images), {variant} outputs"
    return reference_behaviour(logits[variant], split, temperature=temperature)


def served_variant(variants) -> str:
    """The variant the service answers with on a CPU by default."""
    return "int8" if "int8" in variants else "fp32"


def calibrate_scores(state: BuildState, directory: Path, spec: InputSpec, logits, dataset):
    """The manifest's `calibration`, fitted on the served variant's outputs: the temperature
    on the validation split, the conformal thresholds on the calibration split, the figures
    on the test split. None when there is no calibration split; levels it is too small for
    are left out (one asked for by name was refused when the splits were made:
    `refuse_unsupported_coverage`)."""
    from models.evaluate import calibration as calib

    assert state.held_out is not None  # the caller checked
    (val_images, val_labels), (cal_images, cal_labels) = state.held_out
    levels = calib.supported_levels(state.coverage, len(cal_labels))
    message = coverage_shortfall(state.coverage, len(cal_labels))
    if message is not None and len(cal_labels):
        log(f"{message}; left out")
        state.notes.append(message + "; left out")
    if not levels:
        return None
    bundle = load_bundle(directory)
    variant = served_variant(bundle.manifest.variants)
    fit = (evaluation.predict(bundle, variant, normalised(val_images, spec)), val_labels)
    conformal = (evaluation.predict(bundle, variant, normalised(cal_images, spec)), cal_labels)
    result = calib.calibrate(
        fit,
        conformal,
        (logits[variant], dataset.test_labels),
        levels,
        split=f"temperature: validation split ({len(val_labels)} images); thresholds: "
        f"calibration split ({len(cal_labels)} images); {variant} outputs",
    )
    log(
        f"calibration: temperature {result.temperature:.3f}, ECE {result.ece_before:.4f} -> "
        f"{result.ece_after:.4f}; coverage on test "
        + ", ".join(f"{k}: {v:.3f}" for k, v in result.coverage.items())
    )
    return result


def coverage_shortfall(levels: tuple[float, ...], images: int) -> str | None:
    """Why a calibration split of `images` cannot support every one of `levels`, or None."""
    from models.evaluate import calibration as calib

    missing = sorted(set(levels) - set(calib.supported_levels(levels, images)))
    if not missing:
        return None
    return (
        f"too few images for the calibration split: coverage {missing[-1]} needs at least "
        f"{calib.images_needed(missing[-1])}, the split holds {images} (raise "
        "--calibration-split or add images)"
    )


def refuse_unsupported_coverage(state: BuildState, images: int) -> None:
    """A --coverage level asked for by name that the calibration split cannot support is
    refused; called as soon as the splits are known, before anything trains."""
    message = coverage_shortfall(state.coverage, images)
    if message is not None and getattr(state.args, "coverage_given", False):
        raise BuildError(message)


def save_checkpoint(model, path: Path) -> None:
    from models.nets import transfer

    if isinstance(model, transfer.TransferNet):
        transfer.save_checkpoint(model, path)
    else:
        nets.save_checkpoint(model, path)


def validation_accuracy(path: Path, val_set, spec: InputSpec) -> float:
    """Top-1 accuracy of an ONNX variant on the validation split, normalised as served."""
    from models.export import onnx as export

    images, labels = val_set
    inputs = normalised(images, spec)
    session = export.session(path)
    name = session.get_inputs()[0].name
    batches = [inputs[i : i + 64] for i in range(0, len(inputs), 64)]
    predicted = np.concatenate([session.run(None, {name: b})[0].argmax(1) for b in batches])
    return float(np.mean(predicted == labels))


def calibration_images(train_set, spec: InputSpec, count: int, seed: int) -> np.ndarray:
    """A seeded sample of training images, normalised as the service normalises."""
    images, _ = train_set
    pick = np.sort(np.random.default_rng(seed + 2).permutation(len(images))[:count])
    return normalised(images[pick], spec)


def normalised(images: np.ndarray, spec: InputSpec) -> np.ndarray:
    """uint8 [N, H, W, C] as the model's float32 [N, C, H, W] input, as the service normalises."""
    mean = np.asarray(spec.mean, np.float32)
    std = np.asarray(spec.std, np.float32)
    scale, bias = 1.0 / (255.0 * std), -mean / std
    chosen = images.astype(np.float32) * scale + bias
    return np.ascontiguousarray(chosen.transpose(0, 3, 1, 2))


def quantize(model, directory: Path, calibration: np.ndarray, method: str, *, qat: bool) -> dict:
    """Write the INT8 variant; returns the manifest's record of how.

    A fine-tuned backbone (depthwise convolutions, few weights per channel) loses most to
    rounding: it gets all 8 bits of weight where the CPU sums INT8 products in 32 bits, and is
    quantized from a copy whose biases absorb each layer's mean rounding error
    (models/compress/qat.py: bias_corrected; measured in docs/transfer-learning.md).
    """
    from app.engine import cpu_sums_int8_in_32_bits
    from models.compress import qat as qat_tools
    from models.compress.quantize import quantization_record, quantize_int8
    from models.export import onnx as export
    from models.nets import transfer

    depthwise = isinstance(model, transfer.TransferNet)
    full_range = depthwise and cpu_sums_int8_in_32_bits()
    correct = depthwise and not qat  # QAT has already trained the weights for the grid
    source = directory / VARIANT_FILES["fp32"]
    if qat or correct:  # the fp32 variant stays the trained network
        source = directory / ".to-quantize.onnx"
        if correct:
            levels = qat_tools.weight_levels(full_range)
            model = qat_tools.bias_corrected(model, calibration, weight_levels=levels)
        with quiet_stdout():
            export.export_onnx(model, source, tuple(calibration.shape[1:]))
    try:
        quantize_int8(
            source,
            directory / VARIANT_FILES["int8"],
            calibration,
            method=method,
            reduce_range=not full_range,
        )
    finally:
        if source.name.startswith("."):
            source.unlink(missing_ok=True)
    return quantization_record(
        method, len(calibration), full_range=full_range, bias_correction=correct
    )


def quantization_aware(
    state: BuildState,
    model: nn.Module,
    splits: tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
    mean: list[float],
    std: list[float],
) -> nn.Module:
    from models.compress import qat
    from models.train import loop as training

    args = state.args
    prepared, handles = qat.prepare(model)
    cfg = training.TrainConfig(
        epochs=max(1, args.epochs // 6),
        batch_size=args.batch_size,
        lr=args.lr / 20,
        seed=args.seed,
        warmup=0.1,
        precision="fp32",  # fake quantization rounds to int8 steps that bf16 cannot resolve
    )
    prepared, history = training.train(prepared, *splits, mean, std, cfg, desc="qat")
    state.histories["qat"] = [asdict(h) for h in history]
    return qat.finish(prepared, handles)


def evaluate_variants(
    state, provisional: Manifest, directory: Path, variants, dataset, inputs, note: str = ""
):
    """Accuracy, scores and logits of each variant, run by the service's engine.

    The engine loads bundles, so the files are first described by a manifest without metrics.
    """
    (directory / MANIFEST_FILE).write_text(provisional.dump())
    bundle = load_bundle(directory)
    accuracy, scores, logits = {}, {}, {}
    for variant in variants:
        with state.stage(f"evaluate {variant}" + (f" ({note})" if note else "")):
            logits[variant] = evaluation.predict(bundle, variant, inputs)
            scores[variant] = evaluation.score(
                dataset.test_labels, logits[variant].argmax(1), len(dataset.labels)
            )
            accuracy[variant] = scores[variant].accuracy
            log(f"{variant} test accuracy {accuracy[variant]:.4f}")
    return accuracy, scores, logits


def make_manifest(state, dataset, spec, directory, variants, name, version, metrics) -> Manifest:
    args = state.args
    return Manifest(
        name=name,
        version=version,
        created=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        labels=dataset.labels,
        input=spec,
        variants=variant_entries(directory, variants),
        metrics=metrics,
        provenance={
            "dataset": {
                "name": dataset.name,
                "kind": args.dataset,
                "sha256": dataset.sha256,
                "files": dataset.files,
                "train_images": len(dataset.train_labels),
                "test_images": len(dataset.test_labels),
                "limit": args.limit,
                "val_split": args.val_split,
                "skipped_unreadable": len(dataset.skipped),
                "skipped_files": dataset.skipped,
            },
            "seed": args.seed,
            "epochs": args.epochs,
            "argv": state.argv,
            "network": state.network,
            "training": (
                state.training
                or {
                    "batch_size": args.batch_size,
                    "optimizer": args.optimizer,
                    "lr": args.lr,
                    "erase": args.erase,
                }
            )
            | {
                "precision": state.training_precision,
                "val_split": args.val_split,
                "calibration_split": args.calibration_split,
            },
            "libraries": library_versions(),
            "stages_seconds": {s.name: round(s.seconds, 2) for s in state.stages},
            "compression": state.compression,
        },
    )
