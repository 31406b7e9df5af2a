"""An imported model's `report.md`: what was imported, how it is read, and what was measured.

Only measured figures appear: accuracy needs --eval, agreement needs an INT8 variant, known-photo
hits need the sample photos; whatever was not measured is said to be not measured.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import numpy as np

from app.bundle import Manifest, VariantFile
from models.evaluate.report import PLOTS, confusion_table, plot_confusion
from models.publish.pipeline import BuildState


def write_report(directory: Path, manifest: Manifest, state: BuildState, checks) -> None:
    served = "int8" if "int8" in manifest.variants else "fp32"
    lines = [*summary(manifest, state), *variants_table(manifest)]
    lines += measured(manifest, checks, served)
    if served in checks.scores:
        plot_confusion(
            np.asarray(checks.scores[served].confusion),
            manifest.labels,
            f"{served} on the --eval images",
            directory / PLOTS["confusion"],
        )
        lines += ["", f"![confusion matrix]({PLOTS['confusion']})", ""]
        lines += confusion_table(checks.scores[served].confusion, manifest.labels)
    lines += ["", "## Stages", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {s.name} | {s.seconds:.1f} |" for s in state.stages]
    lines += ["", "## Provenance", ""]
    libraries: Any = manifest.provenance.get("libraries", {})
    lines.append(", ".join(f"{k} {v}" for k, v in libraries.items()) + ".")
    (directory / "report.md").write_text("\n".join(lines) + "\n")


def summary(manifest: Manifest, state: BuildState) -> list[str]:
    spec, output = manifest.input, manifest.output
    provenance: dict[str, Any] = manifest.provenance  # JSON the import wrote
    gate = provenance.get("gate", {})
    origin = provenance.get("imported", {})
    what = (
        f"the pretrained backbone `{origin['pretrained']}` ({origin['weights']})"
        if "pretrained" in origin
        else f"`{origin.get('file')}` (sha256 `{str(origin.get('sha256'))[:16]}...`)"
    )
    return [
        f"# {manifest.name} {manifest.version}",
        "",
        f"Imported {manifest.created} from {what} by `blink {' '.join(provenance['argv'])}`.",
        "",
        f"Input `{spec.name}`: {spec.layout}, {spec.height}x{spec.width} {spec.color}, "
        f"{spec.resize} (crop fraction {spec.crop_fraction}), {spec.interpolation}, "
        f"mean {spec.mean}, std {spec.std}. Output `{output.name}`: {output.kind}, "
        f"{len(manifest.labels)} classes.",
        *[f"- {note}" for note in provenance.get("batch", [])],
        *[f"- {note}" for note in provenance.get("notes", [])],
        "",
        f"Gate: **{'passed' if gate.get('passed') else 'FAILED'}**.",
        *[f"- {failure}" for failure in gate.get("failures", [])],
        "",
    ]


def variants_table(manifest: Manifest) -> list[str]:
    lines = [
        "## Variants",
        "",
        "Throughput: ONNX Runtime on CPU, one thread (as the service runs it), best of "
        "interleaved rounds during the import; the machine may have been shared.",
        "",
        "| variant | file | size | batch 1 ms | batch 1 img/s | batch 32 img/s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    variant_files = cast("dict[str, VariantFile]", manifest.variants)
    for variant, metrics in manifest.metrics.items():
        entry = variant_files[variant]
        lines.append(
            f"| {variant} | {entry.file} | {entry.size / 1024:.0f} KiB "
            f"| {metrics['batch1_latency_ms']:.2f} | {metrics['batch1_images_per_s']:.0f} "
            f"| {metrics['batch32_images_per_s']:.0f} |"
        )
    parity = manifest.provenance.get("parity_max_abs_diff")
    if parity is not None:
        lines += ["", f"Export parity: max |torch - ONNX Runtime fp32| difference {parity:.2e}."]
    quantization: Any = manifest.provenance.get("quantization") or {}
    if quantization:
        corrected = (
            ", from a bias-corrected copy (each layer's mean rounding error taken out of its bias)"
            if quantization.get("bias_correction")
            else ""
        )
        lines += [
            "",
            f"INT8: static {quantization['format']}, {quantization['weights']} weights, "
            f"{quantization['activations']} activations, {quantization['method']} calibration on "
            f"{quantization['images']} images{corrected}.",
        ]
    return lines


def measured(manifest: Manifest, checks, served: str) -> list[str]:
    metrics: dict[str, dict[str, Any]] = manifest.metrics
    lines = ["", "## Measured", ""]
    if any("accuracy" in m for m in metrics.values()):
        lines += ["| variant | accuracy | macro F1 |", "|---|---:|---:|"]
        lines += [
            f"| {v} | {100 * m['accuracy']:.2f}% | {m['macro_f1']:.4f} |"
            for v, m in metrics.items()
        ]
        per_class = metrics[served]["per_class"]
        lines += ["", f"Per class ({served}):", "", "| class | precision | recall | F1 |"]
        lines.append("|---|---:|---:|---:|")
        for i, label in enumerate(manifest.labels):
            lines.append(
                f"| {label} | {per_class['precision'][i]:.4f} | {per_class['recall'][i]:.4f} "
                f"| {per_class['f1'][i]:.4f} |"
            )
    else:
        lines.append("Accuracy: not measured (no --eval DIR of labelled images was given).")
    lines.append("")
    for variant, m in metrics.items():
        if "top1_agreement_with_fp32" in m:
            lines.append(
                f"- {variant}: top-1 class agrees with fp32 on "
                f"{100 * m['top1_agreement_with_fp32']:.1f}% of {m['agreement_images']} images"
                + confident_part(m)
            )
        if "known_photos" in m:
            ranks = ", ".join(f"{k} {v}" for k, v in m["known_photo_ranks"].items())
            lines.append(
                f"- {variant}: {m['known_photos_top5']} of {m['known_photos']} sample photos "
                f"have a class that names them in the top 5 (best rank per photo: {ranks})."
            )
    lines += [f"- {note}" for note in checks.notes]
    return lines


def confident_part(metrics: dict) -> str:
    from models.evaluate.metrics import CONFIDENT

    if "top1_agreement_where_fp32_confident" not in metrics:
        return "."
    return (
        f"; on the {metrics['confident_images']} where fp32's top class has probability "
        f"{CONFIDENT} or more, {100 * metrics['top1_agreement_where_fp32_confident']:.1f}%."
    )
