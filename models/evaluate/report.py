"""The bundle's `report.md` and its plots: curves, confusion matrix, accuracy vs cost."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt
import numpy as np

from app.bundle import Manifest, VariantFile
from models.data.datasets import Dataset
from models.publish.pipeline import BuildState

PLOTS = {
    "curves": "training_curves.png",
    "confusion": "confusion_matrix.png",
    "tradeoff": "accuracy_vs_cost.png",
    "reliability": "reliability.png",
    "misclassified": "misclassified.png",
}
CONTACT_SHEET_MAX = 48  # misclassified test images shown, at most


def write_report(
    directory: Path,
    manifest: Manifest,
    state: BuildState,
    dataset: Dataset,
    logits: dict[str, np.ndarray],
) -> None:
    plot_curves(state.histories, directory / PLOTS["curves"])
    served = "int8" if "int8" in manifest.metrics else "fp32"
    plot_confusion(
        np.asarray(manifest.metrics[served]["confusion_matrix"]),
        manifest.labels,
        f"{served} on the test set",
        directory / PLOTS["confusion"],
    )
    plot_tradeoff(manifest, directory / PLOTS["tradeoff"])
    predicted = logits[served].argmax(1)
    wrong = np.flatnonzero(predicted != dataset.test_labels)
    if len(wrong):
        contact_sheet(dataset, wrong, predicted, directory / PLOTS["misclassified"])
    if manifest.calibration is not None:
        plot_reliability(manifest, logits[served], dataset.test_labels, directory)
    manifest.provenance["stages_seconds"] = {s.name: round(s.seconds, 2) for s in state.stages}
    (directory / "report.md").write_text(markdown(manifest, state, dataset, served))


def plot_curves(histories: dict[str, list[dict]], path: Path) -> None:
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for name, history in histories.items():
        epochs = [h["epoch"] for h in history]
        # markers, so that a one-epoch phase (fine-tuning, QAT) still shows as a point
        loss_axis.plot(
            epochs, [h["train_loss"] for h in history], "o--", ms=3, label=f"{name} train"
        )
        loss_axis.plot(
            epochs, [h["val_loss"] for h in history], "o-", ms=3, label=f"{name} validation"
        )
        accuracy_axis.plot(
            epochs, [h["train_accuracy"] for h in history], "o--", ms=3, label=f"{name} train"
        )
        accuracy_axis.plot(
            epochs, [h["val_accuracy"] for h in history], "o-", ms=3, label=f"{name} validation"
        )
    loss_axis.set(
        xlabel="epoch", ylabel="loss", title="Loss (train: smoothed or distillation loss)"
    )
    accuracy_axis.set(xlabel="epoch", ylabel="accuracy", title="Accuracy")
    for axis in (loss_axis, accuracy_axis):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    save(figure, path)


def plot_confusion(matrix: np.ndarray, labels: list[str], title: str, path: Path) -> None:
    size = max(5.0, 0.6 * len(labels) + 2)
    figure, axis = plt.subplots(figsize=(size, size))
    axis.imshow(matrix, cmap="Blues")
    ticks = range(len(labels))
    axis.set_xticks(ticks, labels, rotation=45, ha="right", fontsize=8)
    axis.set_yticks(ticks, labels, fontsize=8)
    axis.set(xlabel="predicted", ylabel="true", title=title)
    if len(labels) <= 20:
        threshold = matrix.max() / 2
        for (row, column), count in np.ndenumerate(matrix):
            colour = "white" if count > threshold else "black"
            axis.text(column, row, str(count), ha="center", va="center", color=colour, fontsize=7)
    save(figure, path)


def plot_tradeoff(manifest: Manifest, path: Path) -> None:
    figure, (latency_axis, size_axis) = plt.subplots(1, 2, figsize=(11, 4))
    all_metrics: dict[str, dict[str, Any]] = manifest.metrics  # JSON this build wrote
    for variant, metrics in all_metrics.items():
        accuracy = 100 * float(metrics["accuracy"])
        latency = 1000 / float(metrics["batch32_images_per_s"])
        size_kb = float(metrics["size_bytes"]) / 1024
        latency_axis.scatter(latency, accuracy, s=60)
        latency_axis.annotate(
            variant, (latency, accuracy), textcoords="offset points", xytext=(6, 4)
        )
        size_axis.scatter(size_kb, accuracy, s=60)
        size_axis.annotate(variant, (size_kb, accuracy), textcoords="offset points", xytext=(6, 4))
    latency_axis.set(
        xlabel="CPU ms per image at batch 32 (1 thread)",
        ylabel="test accuracy (%)",
        title="Accuracy vs latency",
    )
    size_axis.set(xlabel="file size (KiB)", ylabel="test accuracy (%)", title="Accuracy vs size")
    for axis in (latency_axis, size_axis):
        axis.grid(alpha=0.3)
    save(figure, path)


def plot_reliability(
    manifest: Manifest, outputs: np.ndarray, labels: np.ndarray, directory: Path
) -> None:
    """Accuracy against confidence per bin, before and after temperature scaling."""
    from models.evaluate.calibration import reliability, served_scores

    assert manifest.calibration is not None
    probabilities = manifest.output.kind == "probabilities"
    figure, axis = plt.subplots(figsize=(5.5, 5))
    axis.plot([0, 1], [0, 1], "k:", label="perfectly calibrated")
    for name, temperature in (
        ("plain softmax", 1.0),
        ("calibrated", manifest.calibration.temperature),
    ):
        bins = reliability(served_scores(outputs, temperature, probabilities), labels)
        axis.plot([b[0] for b in bins], [b[1] for b in bins], "o-", ms=4, label=name)
    axis.set(
        xlabel="top-1 score (mean in bin)",
        ylabel="accuracy in bin",
        title="Reliability on the test set",
        xlim=(0, 1.02),
        ylim=(0, 1.02),
    )
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    save(figure, directory / PLOTS["reliability"])


def contact_sheet(dataset: Dataset, wrong: np.ndarray, predicted: np.ndarray, path: Path) -> None:
    """The misclassified test images with their true and predicted classes."""
    shown = wrong[:CONTACT_SHEET_MAX]
    columns = min(6, len(shown))
    rows = -(-len(shown) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.5 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, index in zip(axes.flat, shown, strict=False):
        image = dataset.test_images[index]
        axis.imshow(image[..., 0] if image.shape[2] == 1 else image, cmap="gray", vmin=0, vmax=255)
        axis.set_title(
            f"#{index} true: {dataset.labels[dataset.test_labels[index]]}\n"
            f"predicted: {dataset.labels[predicted[index]]}",
            fontsize=7,
        )
    save(figure, path)


def save(figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def markdown(manifest: Manifest, state: BuildState, dataset: Dataset, served: str) -> str:
    # the manifest keeps metrics and provenance as loosely typed JSON; this build wrote them
    provenance: dict[str, Any] = manifest.provenance
    all_metrics: dict[str, dict[str, Any]] = manifest.metrics
    variant_files = cast("dict[str, VariantFile]", manifest.variants)
    gate = provenance.get("gate", {})
    lines = [
        f"# {manifest.name} {manifest.version}",
        "",
        f"Built {manifest.created} by `blink build {' '.join(state.argv)}`.",
        f"Dataset **{dataset.name}**: {provenance['dataset']['train_images']} training images "
        f"({held_out_phrase(provenance)}) and "
        f"{provenance['dataset']['test_images']} test images, {dataset.size[0]}x{dataset.size[1]}"
        f" {dataset.color}, {len(manifest.labels)} classes (sha256 "
        f"`{provenance['dataset']['sha256'][:16]}...`).",
        f"Network: {provenance.get('params', '?')} parameters, {network_line(state)} in "
        f"{provenance['training']['precision']}, seed {state.args.seed}.",
        *([f"{state.input_note[:1].upper()}{state.input_note[1:]}."] if state.input_note else []),
        *skipped_lines(provenance["dataset"]),
        *[f"Note: {note}." for note in state.notes],
        "",
        f"Accuracy gate: **{'passed' if gate.get('passed') else 'FAILED'}** "
        f"(int8 at most {gate.get('max_int8_drop_points')} points below fp32; every variant at "
        f"least {100 * float(gate.get('min_accuracy', 0)):.1f}%).",
        *[f"- {failure}" for failure in gate.get("failures", [])],
        "",
        "## Variants",
        "",
        "Accuracy on the test set, each image PNG-encoded and run through the service's "
        "preprocessing and engine. Throughput: ONNX Runtime on CPU, one thread (as the "
        "service runs it), best of interleaved rounds in this build.",
        "",
        "| variant | file | size | accuracy | macro F1 | batch 1 img/s | batch 1 ms "
        "| batch 32 img/s | vs fp32 at 32 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = float(all_metrics["fp32"]["batch32_images_per_s"])
    for variant, metrics in all_metrics.items():
        lines.append(
            f"| {variant} | {variant_files[variant].file} "
            f"| {variant_files[variant].size / 1024:.0f} KiB "
            f"| {100 * float(metrics['accuracy']):.2f}% | {float(metrics['macro_f1']):.4f} "
            f"| {metrics['batch1_images_per_s']:.0f} | {metrics['batch1_latency_ms']:.3f} "
            f"| {metrics['batch32_images_per_s']:.0f} "
            f"| {float(metrics['batch32_images_per_s']) / base:.2f}x |"
        )
    lines += [
        "",
        f"Parity: max |torch - ONNX Runtime fp32| logit difference "
        f"{float(provenance.get('parity_max_abs_logit_diff', 0)):.2e}.",
        "",
        f"![accuracy vs cost]({PLOTS['tradeoff']})",
        "",
        f"## Per class ({served})",
        "",
        "| class | precision | recall | F1 |",
        "|---|---:|---:|---:|",
    ]
    per_class = all_metrics[served]["per_class"]
    for i, label in enumerate(manifest.labels):
        lines.append(
            f"| {label} | {per_class['precision'][i]:.4f} | {per_class['recall'][i]:.4f} "
            f"| {per_class['f1'][i]:.4f} |"
        )
    lines += [
        "",
        f"![confusion matrix]({PLOTS['confusion']})",
        "",
        *confusion_table(all_metrics[served]["confusion_matrix"], manifest.labels),
    ]
    matrix = np.asarray(all_metrics[served]["confusion_matrix"])
    if matrix.sum() > np.trace(matrix):
        lines += [
            "",
            f"Misclassified test images (at most {CONTACT_SHEET_MAX}):",
            "",
            f"![misclassified]({PLOTS['misclassified']})",
        ]
    lines += calibration_lines(manifest)
    lines += candidate_lines(state)
    lines += ["", "## Training", "", f"![training curves]({PLOTS['curves']})", ""]
    for name, history in state.histories.items():
        last = history[-1]
        best = max(history, key=lambda h: h["val_accuracy"])
        lines.append(
            f"- {name}: {len(history)} epochs, {sum(h['seconds'] for h in history):.0f} s; "
            f"best validation accuracy {best['val_accuracy']:.4f} (epoch {best['epoch']}), "
            f"last {last['val_accuracy']:.4f}."
        )
    lines += ["", *compression_lines(provenance), "", "## Stages", ""]
    lines += ["| stage | seconds |", "|---|---:|"]
    lines += [f"| {s.name} | {s.seconds:.1f} |" for s in state.stages]
    total = sum(s.seconds for s in state.stages)
    lines += [f"| total (stages above) | {total:.1f} |", ""]
    if "build_seconds" in provenance:
        lines.append(
            f"Whole build, wall clock up to the report: {provenance['build_seconds']:.0f} s "
            "(this machine's cores may have been shared with other work)."
        )
    lines += ["", "## Provenance", ""]
    libraries = provenance.get("libraries", {})
    lines.append(", ".join(f"{k} {v}" for k, v in libraries.items()) + ".")
    return "\n".join(lines) + "\n"


def calibration_lines(manifest: Manifest) -> list[str]:
    calibration = manifest.calibration
    if calibration is None:
        return [
            "",
            "## Calibration",
            "",
            "None: the build held out no calibration split, so scores are the plain softmax "
            "and the service answers no prediction sets.",
        ]
    lines = [
        "",
        "## Calibration and prediction sets",
        "",
        f"Temperature **{calibration.temperature:.4f}** ({calibration.split}). Expected "
        f"calibration error on the test set: {calibration.ece_before:.4f} with the plain "
        f"softmax, {calibration.ece_after:.4f} calibrated.",
        "",
        f"![reliability]({PLOTS['reliability']})",
        "",
        "Prediction sets (`POST /classify?coverage=LEVEL`): every label whose calibrated score "
        "reaches the threshold. On the test set:",
        "",
        "| coverage asked | score threshold | measured coverage | mean set size |",
        "|---:|---:|---:|---:|",
    ]
    for level, threshold in calibration.thresholds.items():
        lines.append(
            f"| {float(level):.0%} | {threshold:.4f} | {calibration.coverage[level]:.2%} "
            f"| {calibration.mean_set_size[level]:.3f} |"
        )
    return lines


def candidate_lines(state: BuildState) -> list[str]:
    if not state.candidates:
        return []
    lines = [
        "",
        "## Candidates",
        "",
        f"Tried within a budget of {state.args.budget:g} min, chosen on validation macro-F1 "
        "(then accuracy; ties go to the cheaper, tried first). Test figures are fp32 in torch, "
        "shown for comparison, never used to choose; cost: fp32 ONNX Runtime, batch 1, one "
        "thread.",
        "",
        "| candidate | input | params | epochs | train s | val macro-F1 | val accuracy "
        "| test accuracy | test macro-F1 | fp32 ms/image | |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in state.candidates:
        if row["skipped"]:
            lines.append(f"| {row['name']} | {row['input']} | | | | | | | | | {row['skipped']} |")
            continue
        lines.append(
            f"| {row['name']} | {row['input']} | {row['params']} | {row['epochs']} "
            f"| {row['train_seconds']:.0f} | {row['val_macro_f1']:.4f} "
            f"| {row['val_accuracy']:.4f} | {row.get('test_accuracy', 0):.4f} "
            f"| {row.get('test_macro_f1', 0):.4f} | {row.get('fp32_batch1_ms', 0):.2f} "
            f"| {'**chosen**' if row['chosen'] else ''} |"
        )
    return lines


def held_out_phrase(provenance: dict) -> str:
    """How much of the training data the build held out, and for what."""
    training = provenance.get("training", {})
    val = training.get("val_split", provenance["dataset"]["val_split"])
    calibration = training.get("calibration_split", 0)
    phrase = f"{val:.0%} of them held out for validation"
    if calibration:
        phrase += f", {calibration:.0%} for calibration"
    return phrase


def network_line(state: BuildState) -> str:
    network, args = state.network, state.args
    if "candidate" in network:
        if network["candidate"] == "scratch":
            return (
                f"the from-scratch CNN (width {network['width']}, depth {network['depth']}, "
                f"stem stride {network['stem_stride']}, {network['head']} head) trained for "
                f"{args.epochs} epochs,"
            )
        return (
            f"{network['backbone']} (ImageNet-pretrained) fine-tuned whole, "
            f"{network['pool']} pooling, for {args.epochs} epochs,"
        )
    if "backbone" in network:
        tuned = f"its last {network['tune_last']} layer(s)" if network["tune_last"] else "no layer"
        return (
            f"{network['backbone']} (ImageNet-pretrained) with a new head, {args.head_epochs} "
            f"head epochs on {args.views} cached view(s) per image, then {tuned} tuned for "
            f"{args.tune_epochs if network['tune_last'] else 0} epochs,"
        )
    return f"width {args.width}, depth {args.depth}; {args.epochs} epochs"


def skipped_lines(dataset: dict) -> list[str]:
    count = dataset.get("skipped_unreadable", 0)
    if not count:
        return []
    return [f"{count} unreadable image file(s) skipped: {', '.join(dataset['skipped_files'])}."]


def confusion_table(matrix: list[list[int]], labels: list[str]) -> list[str]:
    header = "| true \\ predicted | " + " | ".join(str(i) for i in range(len(labels))) + " |"
    rows = [header, "|---|" + "---:|" * len(labels)]
    for i, row in enumerate(matrix):
        rows.append(f"| {i} {labels[i]} | " + " | ".join(str(v) for v in row) + " |")
    return rows


def compression_lines(provenance: dict) -> list[str]:
    compression = provenance.get("compression", {})
    quantization = provenance.get("quantization", {})
    lines = ["## Compression", ""]
    if "distillation" in compression:
        d = compression["distillation"]
        lines.append(
            f"- Distillation from {d['teacher']} ({d['teacher_params']} parameters, validation "
            f"accuracy {d['teacher_val_accuracy']:.4f}): student validation accuracy "
            f"{d.get('student_val_accuracy', float('nan')):.4f}."
        )
    if "pruning" in compression:
        p = compression["pruning"]
        lines.append(
            f"- Channel pruning {p['fraction']:.0%} of each block's inner channels: "
            f"{p['params_before']} -> {p['params_after']} parameters; validation accuracy "
            f"{p['val_accuracy_before']:.4f} before, {p['val_accuracy_pruned']:.4f} right after, "
            f"{p['val_accuracy_fine_tuned']:.4f} after {p['fine_tune_epochs']} fine-tuning "
            f"epoch(s)."
        )
    if quantization:
        line = (
            f"- INT8: static {quantization['format']}, {quantization['weights']} weights, "
            f"{quantization['activations']} activations, {quantization['method']} calibration "
            f"on {quantization['images']} training images."
        )
        if quantization.get("bias_correction"):
            line += " Quantized from a bias-corrected copy (each layer's mean rounding error)."
        if "static_int8_accuracy" in quantization:
            line += (
                f" Quantization-aware training ({quantization['qat']}); static INT8 alone "
                f"scored {100 * quantization['static_int8_accuracy']:.2f}%."
            )
        elif "qat" in quantization:
            line += f" Quantization-aware training ran, but {quantization['qat']}."
        lines.append(line)
    return lines
