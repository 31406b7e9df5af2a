"""INT8 vs fp32 top-1 agreement of the pretrained EfficientNet-Lite0, by method, on held-out photos.

    python -m bench.int8_agreement                  # post-training settings and noise floors
    python -m bench.int8_agreement --qat-steps 60   # plus self-distilled quantization-aware tuning

The sample photos are split: INT8 is calibrated (and fine-tuned) on crops of the CALIBRATION
photos only; agreement is reported on crops of the HELD_OUT photos (never seen), on crops of
the eight known photos and on crops of all eighteen (as the import's own check), each also by
fp32-confidence band. fp16 and fp32 with one grey level of input noise give the floor: how often
a harmless perturbation flips fp32's top class. Throughput: ONNX Runtime with the engine's
session settings, INT8 against fp32 round by round (models/evaluate/speed.py), one thread.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from app.postprocess import softmax
from models.compress.quantize import quantize_int8, quiet_logs
from models.data import photos
from models.nets.pretrained import export_model, export_onnx, pretrained_spec
from models.publish.import_bundle import bias_corrected_onnx, preprocess_images, write_fp16

NAME = "efficientnet-lite0"
HELD_OUT = ("clock", "china", "motorcycle", "coins", "gravel", "astronaut")
BANDS = ((0.0, 0.2), (0.2, 0.5), (0.5, 1.01))
GREY_LEVEL = 2 / 255  # one 8-bit step of a pixel after mean 0.5, std 0.5


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def input_as_int8(images: np.ndarray, calibration: np.ndarray) -> np.ndarray:
    """The images as the INT8 model's first QuantizeLinear leaves them: uint8 over the min-max
    range of the calibration images (for inputs in [-1, 1]: scale 2/255, zero point 128, so
    every pixel lands half a step off its value)."""
    low, high = min(0.0, float(calibration.min())), max(0.0, float(calibration.max()))
    scale = np.float32((high - low) / 255)
    zero = round(-low / scale)
    return ((np.clip(np.round(images / scale) + zero, 0, 255) - zero) * scale).astype(np.float32)


def logits(path: Path, images: np.ndarray, threads: int = 2) -> np.ndarray:
    run = session(path, threads)
    return np.concatenate(
        [run.run(None, {"input": images[i : i + 16]})[0] for i in range(0, len(images), 16)]
    )


def image_sets(spec, seed: int) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
    everything = photos.all_photos()
    calibration = [p.image for p in everything if p.name not in HELD_OUT]
    held_out = [p.image for p in everything if p.name in HELD_OUT]
    known = [p.image for p in everything if p.expected]
    all_images = [p.image for p in everything]
    calib = preprocess_images(calibration + photos.augmented(calibration, 128, seed), spec)
    crops = {
        "held-out crops": held_out + photos.augmented(held_out, 294, seed + 3),
        "known-photo crops": photos.augmented(known, 160, seed + 2),
        "all crops": photos.augmented(all_images, 300, seed + 1),
    }
    checks = {key: preprocess_images(images, spec) for key, images in crops.items()}
    # the same crops sent as JPEG quality 90 instead of 95: a perturbation cameras make daily
    from models.evaluate.metrics import preprocess_all

    recoded = {
        key: preprocess_all([photos.encode(i, "JPEG", quality=90) for i in images], spec)
        for key, images in crops.items()
    }
    return calib, checks, recoded


def calibration_views(spec, count: int, seed: int) -> np.ndarray:
    calibration = [p.image for p in photos.all_photos() if p.name not in HELD_OUT]
    return preprocess_images(photos.augmented(calibration, count, seed), spec)


def agreement_row(reference: dict, answers: dict) -> dict[str, str]:
    row = {}
    for key, fp32 in reference.items():
        same = answers[key].argmax(1) == fp32.argmax(1)
        row[key] = f"{same.mean():.1%}"
        if key == "held-out crops":
            confidence = softmax(fp32).max(1)
            for low, high in BANDS:
                inside = (confidence >= low) & (confidence < high)
                row[f"held-out p {low:g}-{min(high, 1):g} (n={inside.sum()})"] = (
                    f"{same[inside].mean():.1%}" if inside.any() else "-"
                )
    return row


def throughput_ratio(fp32: Path, int8: Path, spec) -> dict[str, str]:
    from models.evaluate.speed import throughput

    runners = {}
    for name, path in (("fp32", fp32), ("int8", int8)):
        run = session(path, threads=1)
        runners[name] = lambda batch, run=run: run.run(None, {"input": batch})[0]
    speed = throughput(
        runners, spec.sample_shape, batch_sizes=(1, 8), rounds=3, images_per_round=48
    )
    ratio = {
        b: speed["int8"][f"batch{b}_images_per_s"] / speed["fp32"][f"batch{b}_images_per_s"]
        for b in (1, 8)
    }
    return {f"int8/fp32 b{b}": f"{r:.2f}x" for b, r in ratio.items()}


def self_distilled(teacher, spec, calib: np.ndarray, args, target: Path) -> Path:
    """Fine-tune a fake-quantized copy on fresh views of the calibration photos; export it."""
    import torch

    from models.compress import qat

    calibration = [p.image for p in photos.all_photos() if p.name not in HELD_OUT]

    def views(step: int) -> np.ndarray:
        crops = photos.augmented(calibration, args.qat_batch, args.seed + 1000 + step)
        return preprocess_images(crops, spec)

    started = time.perf_counter()
    torch.set_num_threads(2)
    student = qat.distill(teacher, calib, views, steps=args.qat_steps, lr=args.qat_lr)
    print(f"distillation {time.perf_counter() - started:.0f} s", flush=True)
    return export_folded(student, spec, target)


def export_folded(student, spec, target: Path) -> Path:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    raw = target.with_suffix(".raw.onnx")
    export_model(student, spec.height, raw)
    with quiet_logs():
        quant_pre_process(str(raw), str(target))
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--qat-steps", type=int, default=0, help="self-distillation steps (0: skip)"
    )
    parser.add_argument("--qat-batch", type=int, default=16)
    parser.add_argument("--qat-lr", type=float, default=1e-5)
    parser.add_argument("--more-views", type=int, default=512, help="larger calibration set")
    parser.add_argument("--only", nargs="*", help="run only these INT8 settings")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.shape_inference import quant_pre_process

    spec = pretrained_spec(NAME).input_spec()
    work = Path(tempfile.mkdtemp(prefix="int8-agreement-"))
    raw = work / "raw.onnx"
    torch_model = export_onnx(NAME, raw)
    fp32 = work / "fp32.onnx"
    with quiet_logs():
        quant_pre_process(str(raw), str(fp32))
    calib, checks, recoded = image_sets(spec, args.seed)
    reference = {key: logits(fp32, images) for key, images in checks.items()}
    rows: list[tuple[str, dict]] = []

    def report(name: str, answers: dict, model: Path | None = None) -> None:
        row = agreement_row(reference, answers)
        if model is not None:
            row.update(throughput_ratio(fp32, model, spec))
        rows.append((name, row))
        print(name, row, flush=True)

    fp16 = work / "fp16.onnx"
    write_fp16(fp32, fp16)
    report("fp16 (floor)", {k: logits(fp16, v) for k, v in checks.items()})
    rng = np.random.default_rng(args.seed)
    noisy = {
        k: v + rng.normal(0, GREY_LEVEL, v.shape).astype(np.float32) for k, v in checks.items()
    }
    report("fp32, JPEG quality 90 (floor)", {k: logits(fp32, v) for k, v in recoded.items()})
    report("fp32 + 1 grey level of noise (floor)", {k: logits(fp32, v) for k, v in noisy.items()})
    report(
        "fp32, input quantized as INT8 (floor)",
        {k: logits(fp32, input_as_int8(v, calib)) for k, v in checks.items()},
    )

    def int8(name: str, source: Path, images: np.ndarray, **options) -> Path:
        target = work / f"{name.replace(' ', '_').replace('/', '_')}.int8.onnx"
        started = time.perf_counter()
        quantize_int8(
            source,
            target,
            images,
            method=options.pop("method", "minmax"),
            reduce_range=False,
            **options,
        )
        answers = {k: logits(target, v) for k, v in checks.items()}
        report(f"{name} ({time.perf_counter() - started:.0f} s)", answers, target)
        return target

    wanted = lambda name: not args.only or name in args.only  # noqa: E731
    if wanted("minmax"):
        int8("minmax", fp32, calib)
    if wanted("percentile"):
        int8("percentile", fp32, calib, method="percentile")
    if wanted("more"):
        more = np.concatenate([calib, calibration_views(spec, args.more_views, args.seed + 10)])
        int8(f"minmax {len(more)} views", fp32, more)
    if wanted("qoperator"):
        int8("minmax QOperator", fp32, calib, quant_format=QuantFormat.QOperator)
    graph = onnx.load(str(fp32)).graph
    convs = [n.name for n in graph.node if n.op_type in ("Conv", "Gemm")]
    ends = [convs[0], *convs[-2:]]  # the stem, the head conv and the classifier
    if wanted("exclude"):
        int8("minmax, stem+head+fc fp32", fp32, calib, nodes_to_exclude=ends)
    if wanted("percentile-exclude"):
        int8(
            "percentile, stem+head+fc fp32", fp32, calib, method="percentile", nodes_to_exclude=ends
        )
    if wanted("bias") or wanted("bias-percentile"):
        # exactly what `blink import --pretrained` quantizes
        corrected_path = bias_corrected_onnx(torch_model, calib, spec, True, work / "bc.onnx")
        if wanted("bias"):
            int8("bias-corrected, minmax", corrected_path, calib)
        if wanted("bias-percentile"):
            int8("bias-corrected, percentile", corrected_path, calib, method="percentile")
    if wanted("bias-stem"):
        stem_float = bias_corrected_onnx(
            torch_model, calib, spec, True, work / "bc-stem.onnx", float_first=True
        )
        stem = next(n.name for n in onnx.load(str(stem_float)).graph.node if n.op_type == "Conv")
        int8("bias-corrected, stem fp32", stem_float, calib, nodes_to_exclude=[stem])
    if wanted("depthwise"):
        depthwise = [
            n.name
            for n in graph.node
            if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)
        ]
        int8("minmax, depthwise fp32", fp32, calib, nodes_to_exclude=depthwise)
    if args.qat_steps:
        tuned = self_distilled(torch_model, spec, calib, args, work / "tuned.onnx")
        int8(f"self-distilled QAT {args.qat_steps}x{args.qat_batch}", tuned, calib)

    keys = list(dict.fromkeys(k for _, row in rows for k in row))
    print("\n| setting | " + " | ".join(keys) + " |")
    print("|---|" + "---:|" * len(keys))
    for name, row in rows:
        print(f"| {name} | " + " | ".join(row.get(k, "") for k in keys) + " |")


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    main()
