"""`blink build --dataset folder`: a user's class-per-folder photos to a bundle.

The input is the photos' own size (the shorter side capped) and the whole frame; the
candidates (models/train/candidates.py) train within the budget and the best on validation is
published through the common bundle path, with its scores calibrated on held-out images.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from app.bundle import InputSpec
from models.data import datasets
from models.publish.pipeline import BuildError, BuildState, log
from models.train import candidates as cands


def build_folder(state: BuildState) -> Path:
    from models.publish.build_bundle import refuse_unsupported_coverage, write_bundle

    args = state.args
    with state.stage("load data"):
        try:
            dataset = datasets.load(
                "folder",
                args.data_dir,
                test_split=args.test_split,
                seed=args.seed,
                image_size=args.image_size,
            )
            if args.limit:
                dataset = datasets.limit(dataset, args.limit, args.seed)
            indices = state_splits(state, len(dataset.train_labels))
        except datasets.DatasetError as exc:
            raise BuildError(str(exc)) from exc
        refuse_unsupported_coverage(state, len(indices["calibration"]))
        state.input_note = dataset.input_note
        train_index = indices["train"]
        mean, std = datasets.channel_stats(dataset.train_images[train_index])
        log(
            f"{dataset.name}: {len(train_index)} train, {len(indices['val'])} validation, "
            f"{len(indices['calibration'])} calibration, {len(dataset.test_labels)} test images; "
            f"{dataset.input_note}; {len(dataset.skipped)} unreadable file(s) skipped"
        )
    scratch_spec = InputSpec(
        height=dataset.size[0],
        width=dataset.size[1],
        channels=dataset.channels,
        color=dataset.color,
        resize="center_crop",
        crop_fraction=args.crop_fraction or 1.0,
        mean=mean,
        std=std,
    )
    names = candidate_names(args)
    recipe = recipe_from(args)
    decoded = Decoded(dataset, scratch_spec, indices)
    with state.stage("candidates"):
        results = cands.run_candidates(
            names,
            args.budget * 60,
            decoded.splits,
            scratch_spec,
            dataset.labels,
            recipe,
            seed=args.seed,
            precision=args.precision,
        )
    best = cands.chosen(results)
    with state.stage("candidate figures"):
        candidate_figures(results, dataset)
    state.candidates = [r.row() | {"chosen": r is best} for r in results]
    for result in results:
        if result.history:
            state.histories[result.name] = result.history
    state.network = network_record(best)
    state.training = {
        "candidates": names,
        "chosen": best.name,
        "budget_minutes": args.budget,
        "recipe": vars(recipe),
    }
    # what a quantization-aware fallback fine-tunes with
    args.epochs, args.batch_size = best.epochs, recipe.batch_size
    args.lr = recipe.scratch_lr if best.name == cands.SCRATCH else recipe.fine_tune_lr
    state.held_out = (best.splits["val"], best.splits["calibration"])
    log(
        f"chosen: {best.name} (validation macro-F1 {best.val_macro_f1:.4f}, "
        f"accuracy {best.val_accuracy:.4f})"
    )
    splits = (best.splits["train"], best.splits["val"])
    return write_bundle(
        state, dataset, best.model, splits, best.spec.mean, best.spec.std, best.spec
    )


def state_splits(state: BuildState, count: int) -> dict[str, np.ndarray]:
    args = state.args
    train, val, calibration = datasets.held_out_indices(
        count, args.val_split, args.calibration_split, args.seed
    )
    return {"train": train, "val": val, "calibration": calibration}


def candidate_names(args) -> list[str]:
    if args.pretrained:
        return [args.pretrained]
    installed = cands.installed_backbones()
    if not args.candidates:
        return [cands.SCRATCH, *installed]
    names = [name.strip() for name in args.candidates.split(",") if name.strip()]
    known = {cands.SCRATCH, *installed}
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise BuildError(
            f"--candidates {args.candidates!r}: choose from {', '.join(sorted(known))} "
            "(a backbone needs its weights package installed)"
        )
    return names


def recipe_from(args) -> cands.Recipe:
    """The default recipe, with what the command line changed."""
    recipe = cands.Recipe(
        rot90=args.rot90, vflip=args.vflip, noise=args.noise, batch_norm=args.batch_norm
    )
    recipe.flip = not args.no_flip
    if args.epochs:
        recipe.epochs = args.epochs
    if args.width:
        recipe.width = args.width
    if args.depth:
        recipe.depth = args.depth
    return recipe


class Decoded:
    """Training images decoded once per input spec (a backbone reads RGB, normalised its own
    way), split into the build's training, validation and calibration parts."""

    def __init__(self, dataset: datasets.Dataset, spec: InputSpec, indices) -> None:
        self.dataset, self.indices = dataset, indices
        self.cache: dict[str, np.ndarray] = {self.key(spec): dataset.train_images}

    @staticmethod
    def key(spec: InputSpec) -> str:
        return f"{spec.color}{spec.height}x{spec.width}{spec.resize}{spec.crop_fraction}"

    def splits(self, spec: InputSpec) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        key = self.key(spec)
        if key not in self.cache:
            sources = self.dataset.train_sources
            assert sources is not None  # a folder dataset lists its files
            started = time.perf_counter()
            pixels = datasets.decode_files(sources, spec)
            self.cache[key] = datasets.stack([(path, 0) for path in sources], pixels)[0]
            log(f"decoded {len(sources)} images for {key} in {time.perf_counter() - started:.1f}s")
        images, labels = self.cache[key], self.dataset.train_labels
        return {part: (images[index], labels[index]) for part, index in self.indices.items()}


def candidate_figures(results: list[cands.Trained], dataset: datasets.Dataset) -> None:
    """Each trained candidate's test accuracy and macro-F1 (fp32, torch) and serving cost
    (fp32 ONNX, batch 1, one thread), for the report's table. The chosen one's served figures
    come later, from the bundle's own variants."""
    import torch

    from models.evaluate import metrics as evaluation

    encoded = evaluation.encoded_test_images(dataset)
    for result in results:
        if result.model is None:
            continue
        inputs = evaluation.preprocess_all(encoded, result.spec)
        with torch.no_grad():
            logits = torch.cat(
                [
                    result.model(torch.from_numpy(inputs[i : i + 64]))
                    for i in range(0, len(inputs), 64)
                ]
            ).numpy()
        scores = evaluation.score(dataset.test_labels, logits.argmax(1), len(dataset.labels))
        result.figures = {
            "test_accuracy": round(scores.accuracy, 6),
            "test_macro_f1": round(float(np.mean(scores.f1)), 6),
            "fp32_batch1_ms": round(batch1_ms(result), 3),
        }


def batch1_ms(result: cands.Trained) -> float:
    """fp32 ONNX Runtime, one thread, batch 1: the candidate's serving cost per image."""
    import tempfile

    from models.evaluate import speed as speeds
    from models.export import onnx as export
    from models.publish.pipeline import quiet_stdout

    spec = result.spec
    shape = (spec.channels, spec.height, spec.width)
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "candidate.onnx"
        with quiet_stdout():
            export.export_onnx(export.fold_batch_norm(result.model), path, shape)
        session = export.session(path, 1)
        name = session.get_inputs()[0].name
        figures = speeds.throughput(
            {"fp32": lambda batch: session.run(None, {name: batch})[0]},
            shape,
            batch_sizes=(1,),
            round_seconds=0.5,
        )
    return figures["fp32"]["batch1_latency_ms"]


def network_record(best: cands.Trained) -> dict[str, object]:
    if best.name == cands.SCRATCH:
        config = best.model.config
        return {
            "candidate": best.name,
            "width": config.width,
            "depth": config.depth,
            "stem_stride": config.stem_stride,
            "head": config.head,
        }
    return {
        "candidate": best.name,
        "backbone": best.name,
        "tuned": "whole network",
        "pool": "avgmax",
    }
