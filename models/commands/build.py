"""`blink build` / `python -m models.commands.build`: dataset in, served-ready model bundle out.

Stages: load data -> (train a teacher) -> train -> (prune + fine-tune) -> export fp32 ->
quantize INT8 (QAT fine-tune when static INT8 misses the gate) -> fp16 -> evaluate every variant
through the service's preprocessing and engine -> gate -> speed -> manifest, report, `latest`.

Exit status: 0 built; 1 the accuracy gate failed (the bundle is kept for inspection, `latest`
is not moved); 2 bad arguments or a missing/malformed dataset.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

from models.data.views import ViewConfig
from models.nets.pretrained import PRETRAINED
from models.publish.pipeline import BuildError, BuildState, GateFailed, default_version, log

DEFAULTS = {
    "batch_size": 128,
    "width": 24,
    "depth": 1,
}
# Held-out fractions of the training images. The built-in datasets hold tens of thousands, so a
# small fraction is plenty; a folder needs more for the conformal thresholds of 99% coverage
# (99 images at least).
HELD_OUT = {"folder": (0.1, 0.1), "builtin": (0.025, 0.025)}
DEFAULT_BUDGET_MINUTES = 10.0
# The default schedule, sized for a build budget of about 10 minutes on two cores: 18 epochs where
# training runs in mixed precision (a CPU with native bf16, or CUDA), 6 where it is plain fp32
# (slower per step on the same CPU, and AVX2-only CPUs slower still; the report records each
# stage's seconds). Both are recorded in the manifest.
DEFAULT_EPOCHS = {"mixed": 18, "fp32": 6}
# Transfer learning's defaults, sized to build in under 10 minutes on two cores with the
# textile comparison of docs/transfer-learning.md (2,000 photos).
FINE_TUNE = {"views": 3, "head_epochs": 40, "tune_last": 1, "tune_epochs": 10, "tune_lr": 3e-4}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="blink build",
        description="Train, compress, quantize and export a CNN into a model bundle.",
    )
    data = p.add_argument_group("data")
    data.add_argument(
        "--dataset", choices=["fashion-mnist", "cifar10", "folder"], default="fashion-mnist"
    )
    data.add_argument(
        "--data-dir",
        type=Path,
        help="dataset location (default for fashion-mnist: /usr/share/datasets/fashion-mnist)",
    )
    data.add_argument("--limit", type=int, help="use only N training and N/5 test images")
    data.add_argument(
        "--test-split", type=float, default=0.2, help="folder: fraction of each class for test"
    )
    data.add_argument(
        "--val-split",
        type=float,
        help="fraction of training data for validation: epochs, candidates and the temperature "
        "are chosen on it (default 0.1 for folders, 0.025 for the built-in datasets)",
    )
    data.add_argument(
        "--calibration-split",
        type=float,
        help="fraction of training data held out for the conformal thresholds of prediction "
        "sets, never trained on (default as --val-split; 0: no prediction sets)",
    )
    data.add_argument(
        "--image-size",
        type=int,
        help="folder: resize images to this square size (default: the images' own size, the "
        "shorter side capped at 320)",
    )
    cand = p.add_argument_group("folder candidates (see docs/build.md)")
    cand.add_argument(
        "--budget",
        type=float,
        default=DEFAULT_BUDGET_MINUTES,
        metavar="MINUTES",
        help="training time for every candidate together; each stops early or at its share",
    )
    cand.add_argument(
        "--candidates",
        help="comma-separated: scratch and/or installed backbones, e.g. "
        "scratch,efficientnet-lite0 (default: scratch, then every installed backbone)",
    )
    cand.add_argument(
        "--fast",
        action="store_true",
        help="the frozen-feature path: cached backbone features, a new head and the last "
        "layers tuned (--pretrained, default efficientnet-lite0); for folders too large for "
        "whole-network training in the budget",
    )
    cand.add_argument("--rot90", action="store_true", help="augment with quarter turns")
    cand.add_argument("--vflip", action="store_true", help="augment with vertical flips")
    cand.add_argument("--no-flip", action="store_true", help="no horizontal flips")
    cand.add_argument(
        "--noise", type=float, default=0.0, help="Gaussian pixel noise (0..255 units) to augment"
    )
    cand.add_argument(
        "--batch-norm",
        choices=["frozen", "train"],
        default="frozen",
        help="a fine-tuned backbone's batch norm: ImageNet's statistics kept (default), or "
        "re-estimated on the photos as it trains",
    )
    cand.add_argument(
        "--coverage",
        help="coverage levels of the prediction sets, comma-separated "
        "(default 0.9,0.95,0.99: those the calibration split can support)",
    )
    pre = p.add_argument_group(
        "transfer learning (--dataset folder --pretrained NAME; see docs/transfer-learning.md)"
    )
    pre.add_argument(
        "--pretrained",
        choices=sorted(PRETRAINED),
        help="fine-tune this ImageNet backbone only (the whole network; with --fast, the "
        "frozen-feature path)",
    )
    pre.add_argument(
        "--views",
        type=int,
        default=FINE_TUNE["views"],
        help="cached backbone views per training image: the centre view plus VIEWS-1 "
        "augmented ones (random resized crop, flip, colour jitter)",
    )
    pre.add_argument(
        "--crop-scale",
        type=float,
        default=1.0,
        help="--fast: smallest area fraction a random resized crop keeps (default 1: none, "
        "since a crop can cut off what decides a label; 0.5 for centred objects)",
    )
    pre.add_argument(
        "--crop-fraction",
        type=float,
        help="centre crop of the served input (default 1: the whole frame; ImageNet "
        "backbones were evaluated at 0.875)",
    )
    pre.add_argument("--head-epochs", type=int, default=FINE_TUNE["head_epochs"])
    pre.add_argument(
        "--tune-last",
        type=int,
        default=FINE_TUNE["tune_last"],
        help="backbone layers unfrozen in stage 2, from the end (1: the final 1x1 conv; "
        "2: also the last MBConv block; ...); 0: train the head only",
    )
    pre.add_argument("--tune-epochs", type=int, default=FINE_TUNE["tune_epochs"])
    pre.add_argument(
        "--tune-lr",
        type=float,
        default=FINE_TUNE["tune_lr"],
        help="stage 2 peak learning rate of the backbone layers (the head's is 10x)",
    )
    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, default=Path("models/repository"))
    out.add_argument("--name", help="bundle name (default: the dataset's or the folder's name)")
    out.add_argument("--version", help="bundle version (default: UTC time, 20261123T130501Z)")
    t = p.add_argument_group("training")
    t.add_argument(
        "--epochs",
        type=int,
        help=f"default: {DEFAULT_EPOCHS['mixed']} when training in mixed precision (see "
        f"--precision), else {DEFAULT_EPOCHS['fp32']}",
    )
    t.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    t.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    t.add_argument(
        "--lr", type=float, help="peak one-cycle learning rate (default: 4e-3 AdamW, 0.1 SGD)"
    )
    t.add_argument(
        "--width", type=int, help="stem channels (default 24; 16 for a folder's larger images)"
    )
    t.add_argument("--depth", type=int, help="blocks per stage (default 1)")
    # Off by default: six epochs underfit (train accuracy stays below validation's), and erasing
    # images cost accuracy there (compare the reports of two builds); longer schedules may want it.
    t.add_argument("--erase", type=float, default=0.0, help="random-erasing probability per image")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="training arithmetic; auto: bf16 autocast where the CPU has native bf16 "
        "(AVX-512 BF16, AMX), fp16 autocast on CUDA, else fp32",
    )
    t.add_argument("--threads", type=int, help="torch threads (default: every available core)")
    c = p.add_argument_group("compression")
    c.add_argument(
        "--teacher",
        help="distil from a teacher: 'auto-train' (a 2x wider net trained first) or a "
        "checkpoint.pt from an earlier build (a fine-tuned --pretrained one included)",
    )
    c.add_argument("--prune", type=float, default=0.0, metavar="FRACTION")
    c.add_argument(
        "--calibration-images",
        type=int,
        help="training images INT8 calibration runs (default 1024, fewer for large images: "
        "16 megapixels in all; 64 with --fast, whose activations are far larger)",
    )
    c.add_argument(
        "--calibration-method", choices=["minmax", "entropy", "percentile"], default="percentile"
    )
    c.add_argument("--qat", action="store_true", help="always use quantization-aware training")
    c.add_argument("--no-fp16", action="store_true", help="skip the fp16 (GPU) variant")
    g = p.add_argument_group("gate")
    g.add_argument("--max-int8-drop", type=float, default=0.3, help="in accuracy points")
    g.add_argument("--min-accuracy", type=float, default=0.0, help="a fraction, e.g. 0.9")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    try:
        validate(args)
        bundle = build(args, argv)
    except BuildError as exc:
        print(f"blink build: error: {exc}", file=sys.stderr)
        return 2
    except GateFailed as exc:
        print(f"blink build: accuracy gate failed: {exc}", file=sys.stderr)
        return 1
    print(bundle)
    return 0


def validate(args: argparse.Namespace) -> None:
    from models.evaluate.calibration import DEFAULT_COVERAGE

    if args.lr is None:
        args.lr = {"adamw": 4e-3, "sgd": 0.1}[args.optimizer]
    if (
        (args.epochs is not None and args.epochs < 1)
        or args.batch_size < 1
        or (args.width is not None and args.width < 1)
        or (args.depth is not None and args.depth < 1)
    ):
        raise BuildError("--epochs, --batch-size, --width and --depth must be at least 1")
    if args.budget <= 0:
        raise BuildError(f"--budget must be a positive number of minutes, not {args.budget}")
    args.coverage_given = args.coverage is not None
    args.coverage = parse_coverage(args.coverage) if args.coverage else DEFAULT_COVERAGE
    val, cal = HELD_OUT["folder" if args.dataset == "folder" else "builtin"]
    if args.val_split is None:
        args.val_split = val
    if args.calibration_split is None:
        args.calibration_split = cal
    if args.pretrained and args.candidates:
        raise BuildError("--pretrained names the one candidate; leave out --candidates")
    if args.fast and args.dataset != "folder":
        raise BuildError("--fast needs --dataset folder (a class-per-folder image tree)")
    if args.limit is not None and args.limit < 10:
        raise BuildError("--limit must be at least 10")
    if not 0 <= args.prune < 1:
        raise BuildError(f"--prune must be a fraction in [0, 1), not {args.prune}")
    args.calibration_images_given = args.calibration_images is not None
    if args.calibration_images is None:
        args.calibration_images = 64 if args.pretrained else 1024
    if args.calibration_images < 1:
        raise BuildError("--calibration-images must be at least 1")
    if args.teacher and args.teacher != "auto-train" and not Path(args.teacher).is_file():
        raise BuildError(f"--teacher {args.teacher}: no such checkpoint (or use 'auto-train')")
    if args.fast and not args.pretrained:
        args.pretrained = "efficientnet-lite0"
    if args.pretrained:
        validate_transfer(args)


def parse_coverage(text: str) -> tuple[float, ...]:
    """--coverage '0.9,0.95' as levels, or the one-line error."""
    from models.evaluate.calibration import parse_levels

    try:
        return parse_levels(text)
    except ValueError as exc:
        raise BuildError(f"--coverage: {exc}") from None


def validate_transfer(args: argparse.Namespace) -> None:
    if args.dataset != "folder":
        raise BuildError("--pretrained needs --dataset folder (a class-per-folder image tree)")
    if args.teacher or args.prune:
        raise BuildError("--teacher and --prune apply to the small CNN, not to --pretrained")
    if not 0 < args.crop_scale <= 1 or not 0 < (args.crop_fraction or 1) <= 1:
        raise BuildError("--crop-scale and --crop-fraction must be in (0, 1]")
    if args.views < 1 or args.head_epochs < 1 or args.tune_epochs < 0 or args.tune_last < 0:
        raise BuildError(
            "--views and --head-epochs must be at least 1, --tune-epochs and --tune-last at least 0"
        )


def build(args: argparse.Namespace, argv: list[str]) -> Path:
    # torch is imported here, not at module level, so `blink build --help` stays instant
    import torch

    from models.data import datasets
    from models.nets import cnn as nets
    from models.publish.build_bundle import refuse_unsupported_coverage, write_bundle
    from models.train import loop as training

    state = BuildState(args=args, argv=argv)
    state.name, state.version = bundle_name(args), args.version or default_version()
    if (args.out / state.name / state.version).exists():
        raise BuildError(f"{args.out / state.name / state.version} already exists; pass --version")
    training.setup_torch(args.seed, args.threads)
    state.training_precision = precision = training.training_precision(args.precision)
    state.coverage = args.coverage
    if args.fast:
        return build_transfer(state)
    if args.dataset == "folder" and not (args.teacher or args.prune):
        # distillation and pruning compress the from-scratch CNN: they take the path below
        from models.commands.build_folder import build_folder

        return build_folder(state)
    args.width = args.width or DEFAULTS["width"]
    args.depth = args.depth or DEFAULTS["depth"]
    state.network = {"width": args.width, "depth": args.depth}
    if args.epochs is None:
        args.epochs = DEFAULT_EPOCHS["fp32" if precision == "fp32" else "mixed"]
    log(f"training: {args.epochs} epochs, {precision} arithmetic")
    with state.stage("load data"):
        try:
            dataset = datasets.load(
                args.dataset,
                args.data_dir,
                test_split=args.test_split,
                seed=args.seed,
                image_size=args.image_size,
            )
            if args.limit:
                dataset = datasets.limit(dataset, args.limit, args.seed)
            train_set, val_set, cal_set = held_out(args, dataset.train_images, dataset.train_labels)
        except datasets.DatasetError as exc:
            raise BuildError(str(exc)) from exc
        refuse_unsupported_coverage(state, len(cal_set[1]))
        state.held_out = (val_set, cal_set)
        mean, std = datasets.channel_stats(train_set[0])
        log(
            f"{dataset.name}: {len(train_set[1])} train, {len(val_set[1])} validation, "
            f"{len(cal_set[1])} calibration, {len(dataset.test_labels)} test images of "
            f"{dataset.size} x {dataset.channels}"
        )
    config = nets.for_input(
        dataset.channels,
        len(dataset.labels),
        *dataset.size,
        channels=args.width,
        depth=args.depth,
    )
    train_config = training.TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        lr=args.lr,
        weight_decay=training.WEIGHT_DECAY[args.optimizer],
        erase_p=args.erase,
        seed=args.seed,
        precision=args.precision,
    )

    def fit(model, desc: str, cfg=train_config, teacher=None):
        model, history = training.train(
            model, train_set, val_set, mean, std, cfg, teacher=teacher, desc=desc
        )
        state.histories[desc] = [asdict(h) for h in history]
        return model

    teacher = None
    if args.teacher:
        with state.stage("teacher"):
            teacher, params, teacher_accuracy = teacher_for(
                args, dataset, config, fit, val_set, mean, std
            )
            state.compression["distillation"] = {
                "teacher": args.teacher,
                "teacher_params": params,
                "teacher_val_accuracy": teacher_accuracy,
            }
    with state.stage("train"):
        torch.manual_seed(args.seed)
        model = fit(
            nets.Net(config), "student" if teacher is not None else "train", teacher=teacher
        )
    if teacher is not None:
        state.compression["distillation"]["student_val_accuracy"] = validation_accuracy(
            model, val_set, mean, std
        )
    if args.prune:
        with state.stage("prune"):
            model = prune_and_finetune(model, args, train_config, fit, state, val_set, mean, std)
    return write_bundle(state, dataset, model, (train_set, val_set), mean, std)


def validation_split(args: argparse.Namespace, count: int):
    """(training, validation, calibration) indices of the training images."""
    from models.data import datasets

    return datasets.held_out_indices(count, args.val_split, args.calibration_split, args.seed)


def held_out(args: argparse.Namespace, images, labels):
    """((images, labels) to train on, for validation, for calibration)."""
    train, val, cal = validation_split(args, len(labels))
    return (images[train], labels[train]), (images[val], labels[val]), (images[cal], labels[cal])


def build_transfer(state: BuildState) -> Path:
    """Fine-tune a pretrained backbone on a folder of photos, then the common bundle path."""
    from models.data import datasets
    from models.nets import transfer
    from models.nets.pretrained import pretrained_spec
    from models.publish.build_bundle import refuse_unsupported_coverage, write_bundle
    from models.train import frozen as finetune

    args = state.args
    spec = pretrained_spec(args.pretrained).input_spec()
    spec = spec.model_copy(update={"crop_fraction": args.crop_fraction or 1.0})
    args.epochs, args.lr = args.tune_epochs, args.tune_lr  # what a QAT fallback starts from
    state.network = {"backbone": args.pretrained, "tune_last": args.tune_last}
    config = finetune.FineTuneConfig(
        views=args.views,
        head_epochs=args.head_epochs,
        tune_last=args.tune_last,
        tune_epochs=args.tune_epochs,
        tune_lr=args.tune_lr,
        seed=args.seed,
        precision=args.precision,
        augment=ViewConfig(scale=(args.crop_scale, 1.0)),
    )
    state.training = {
        "stages": "head on cached frozen features, then the last layers tuned",
        **{k: v for k, v in vars(config).items() if k not in ("quiet", "augment")},
        "augment": vars(config.augment),
    }
    log(
        f"fine-tuning {args.pretrained}: head {args.head_epochs} epochs, then the last "
        f"{args.tune_last} layer(s) {args.tune_epochs} epochs, {args.views} view(s) per image"
    )
    with state.stage("load data"):
        try:
            dataset = datasets.load(
                "folder", args.data_dir, test_split=args.test_split, seed=args.seed, spec=spec
            )
            if args.limit:
                dataset = datasets.limit(dataset, args.limit, args.seed)
            train_index, val_index, cal_index = validation_split(args, len(dataset.train_labels))
        except datasets.DatasetError as exc:
            raise BuildError(str(exc)) from exc
        refuse_unsupported_coverage(state, len(cal_index))
        images, labels = dataset.train_images, dataset.train_labels
        train_set = (images[train_index], labels[train_index])
        val_set = (images[val_index], labels[val_index])
        state.held_out = (val_set, (images[cal_index], labels[cal_index]))
        assert dataset.train_sources is not None  # a folder dataset lists its files
        sources = [dataset.train_sources[i] for i in train_index]
        contexts = finetune.context_images(sources, spec) if args.views > 1 else images
        log(
            f"{dataset.name}: {len(train_set[1])} train, {len(val_set[1])} validation, "
            f"{len(dataset.test_labels)} test images; {len(dataset.skipped)} unreadable "
            "file(s) skipped"
        )
    model = transfer.TransferNet(args.pretrained, dataset.labels, args.tune_last)
    with state.stage("features"):
        cache = finetune.cache_features(model, train_set, contexts, val_set, spec, config)
    with state.stage("head"):
        best = finetune.train_head(model, cache, config, state.histories)
    model.load_state_dict(best[1])  # stage 2 starts from the best head, not the last
    if args.tune_last and args.tune_epochs:
        with state.stage("tune"):
            best = finetune.tune(model, cache, config, state.histories, best)
    model.load_state_dict(best[1])
    model.eval()
    del cache
    return write_bundle(state, dataset, model, (train_set, val_set), spec.mean, spec.std, spec)


def bundle_name(args: argparse.Namespace) -> str:
    if args.name:
        return args.name
    if args.dataset == "folder" and args.data_dir is not None:
        return args.data_dir.resolve().name
    return args.dataset


def teacher_for(args, dataset, config, fit, val_set, mean, std):
    """(teacher, its parameter count, its validation accuracy). A fine-tuned backbone teaches
    through its logits on each training image, decoded at its own input size."""
    import torch

    from models.nets import cnn as nets
    from models.nets import transfer
    from models.train import frozen as finetune

    source = args.teacher
    checkpoint = None
    if source != "auto-train":
        checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    if checkpoint is None or checkpoint.get("kind") != transfer.CHECKPOINT_KIND:
        teacher = load_or_train_teacher(source, config, fit)
        accuracy = validation_accuracy(teacher, val_set, mean, std)
        return teacher, nets.parameter_count(teacher), accuracy
    model = transfer.load_checkpoint(checkpoint)
    if dataset.train_sources is None:
        raise BuildError(f"--teacher {source} is a fine-tuned backbone: it teaches folders only")
    if model.labels != dataset.labels:
        raise BuildError(
            f"--teacher {source} was fine-tuned on classes {model.labels}, "
            f"not on this folder's {dataset.labels}"
        )
    logits = torch.from_numpy(finetune.teacher_logits(model, dataset.train_sources))
    train_index, val_index, _ = validation_split(args, len(dataset.train_labels))
    val_logits = logits[val_index]
    accuracy = (val_logits.argmax(1).numpy() == val_set[1]).mean()
    return logits[train_index], nets.parameter_count(model), round(float(accuracy), 6)


def load_or_train_teacher(source: str, config, fit):
    from models.nets import cnn as nets

    if source != "auto-train":
        teacher = nets.load_checkpoint(source)
        shape = ("in_channels", "classes", "input_height", "input_width")
        theirs, ours = teacher.config.to_dict(), config.to_dict()
        if any(theirs[key] != ours[key] for key in shape):
            raise BuildError(
                f"--teacher {source} was trained for {[theirs[k] for k in shape]} "
                f"(channels, classes, height, width); this dataset needs {[ours[k] for k in shape]}"
            )
        return teacher
    wide = nets.NetConfig(**{**config.to_dict(), "width": config.width * 2})
    return fit(nets.Net(wide), "teacher")


def validation_accuracy(model, val_set, mean, std) -> float:
    import torch

    from models.train import loop as training

    dev = torch.device("cpu")
    model = model.to(dev).to(memory_format=torch.channels_last)
    _, accuracy = training.evaluate(
        model,
        training.to_nchw(val_set[0], dev),
        torch.from_numpy(val_set[1]),
        training.Normalize(mean, std, dev),
    )
    model.to(memory_format=torch.contiguous_format)
    return round(accuracy, 6)


def prune_and_finetune(model, args, train_config, fit, state, val_set, mean, std):
    from models.compress.prune import prune_channels
    from models.nets import cnn as nets
    from models.train import loop as training

    before = nets.parameter_count(model), validation_accuracy(model, val_set, mean, std)
    pruned = prune_channels(model, args.prune)
    right_after = validation_accuracy(pruned, val_set, mean, std)
    epochs = max(1, args.epochs // 3)
    cfg = training.TrainConfig(
        **{**asdict(train_config), "epochs": epochs, "lr": train_config.lr / 4}
    )
    pruned = fit(pruned, "prune fine-tune", cfg)
    state.compression["pruning"] = {
        "fraction": args.prune,
        "params_before": before[0],
        "params_after": nets.parameter_count(pruned),
        "val_accuracy_before": before[1],
        "val_accuracy_pruned": right_after,
        "val_accuracy_fine_tuned": validation_accuracy(pruned, val_set, mean, std),
        "fine_tune_epochs": epochs,
        "inner_widths": pruned.config.mids,
    }
    return pruned


if __name__ == "__main__":
    raise SystemExit(main())
