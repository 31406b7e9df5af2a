"""A folder build's candidates: each network that could serve the folder, trained within a
share of the time budget and judged on the validation split.

The candidates, cheapest first: the from-scratch CNN at the folder's own resolution, then each
installed ImageNet backbone fine-tuned whole (discriminative learning rates) at the same
resolution. A candidate whose shortest useful schedule does not fit its share of the budget is
skipped; one whose validation score nothing can beat (every validation image right) ends the
search. The best validation macro-F1 is kept (ties: the cheaper, tried first). Every
candidate's figures go to the report, so a user sees what was tried.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app.bundle import InputSpec
from models.publish.pipeline import BuildError, log

# A candidate needs room for this many epochs in its share of the budget, or it is skipped
MIN_EPOCHS = 3
# The backbones shrink their input 32 times; a smaller input leaves them nothing to see
BACKBONE_MIN_SIDE = 32
# The scratch network's share of the budget when backbones follow it; they split the rest
SCRATCH_SHARE = 0.4
SCRATCH = "scratch"


@dataclass
class Recipe:
    """How every candidate trains: the defaults for any folder of photos (docs/build.md)."""

    epochs: int = 30
    batch_size: int = 32
    scratch_lr: float = 2e-3
    fine_tune_lr: float = 1e-3  # the head's peak; the first backbone layer gets a tenth
    weight_decay: float = 5e-2
    fine_tune_weight_decay: float = 1e-2  # pretrained weights: pull them toward zero less
    warmup: float = 0.1
    ema_epochs: float = 1.0
    patience: int = 8
    shift: float = 0.03  # the largest random shift, as a fraction of the shorter side
    flip: bool = True
    vflip: bool = False
    rot90: bool = False
    brightness: float = 0.1
    contrast: float = 0.1
    noise: float = 0.0
    # a backbone's batch norm keeps ImageNet's statistics ("frozen"), or re-estimates them on
    # the photos ("train"): batches of 32 from a few thousand photos estimate them worse
    # (docs/transfer-learning.md measures both)
    batch_norm: str = "frozen"
    width: int = 16
    depth: int = 1


@dataclass
class Trained:
    """One candidate's result: its network, the input it reads, and its figures."""

    name: str
    spec: InputSpec
    model: Any = None  # nn.Module
    splits: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    val_macro_f1: float = -1.0
    val_accuracy: float = -1.0
    seconds: float = 0.0
    epochs: int = 0
    params: int = 0
    history: list[dict] = field(default_factory=list)
    skipped: str = ""  # why it did not train, if it did not
    figures: dict[str, float | str] = field(default_factory=dict)  # test and cost, filled later

    @property
    def score(self) -> tuple[float, float]:
        return self.val_macro_f1, self.val_accuracy

    def row(self) -> dict:
        return {
            "name": self.name,
            "input": f"{self.spec.width}x{self.spec.height} {self.spec.color}",
            "params": self.params,
            "epochs": self.epochs,
            "train_seconds": round(self.seconds, 1),
            "val_macro_f1": round(self.val_macro_f1, 6),
            "val_accuracy": round(self.val_accuracy, 6),
            "skipped": self.skipped,
            **self.figures,
        }


def installed_backbones() -> list[str]:
    """The pretrained backbones whose code and weights are installed, smallest first."""
    from models.nets.pretrained import PRETRAINED, PretrainedUnavailable, weights_path

    found = []
    for name in PRETRAINED:
        try:
            weights_path(name)
        except PretrainedUnavailable:
            continue
        found.append(name)
    try:
        import efficientnet_lite_pytorch  # noqa: F401
    except ImportError:
        return []
    return found


def shares(names: list[str], budget_s: float) -> dict[str, float]:
    """Seconds each candidate may train: the scratch CNN a fixed share, backbones the rest."""
    backbones = [n for n in names if n != SCRATCH]
    if SCRATCH not in names:
        return {n: budget_s / len(backbones) for n in backbones}
    if not backbones:
        return {SCRATCH: budget_s}
    rest = budget_s * (1 - SCRATCH_SHARE) / len(backbones)
    return {SCRATCH: budget_s * SCRATCH_SHARE, **{n: rest for n in backbones}}


def train_config(recipe: Recipe, spec: InputSpec, *, seed: int, precision: str, scratch: bool):
    from models.train import loop as training

    return training.TrainConfig(
        epochs=recipe.epochs,
        batch_size=recipe.batch_size,
        lr=recipe.scratch_lr if scratch else recipe.fine_tune_lr,
        weight_decay=recipe.weight_decay if scratch else recipe.fine_tune_weight_decay,
        pad=max(1, round(recipe.shift * min(spec.height, spec.width))),
        pad_mode="reflect",
        flip=recipe.flip,
        vflip=recipe.vflip,
        rot90=recipe.rot90,
        brightness=recipe.brightness,
        contrast=recipe.contrast,
        noise=recipe.noise,
        balanced=True,
        ema_epochs=recipe.ema_epochs,
        patience=recipe.patience,
        warmup=recipe.warmup,
        seed=seed,
        precision=precision,
    )


def network(name: str, spec: InputSpec, labels: list[str], recipe: Recipe):
    """A fresh network for candidate `name`, reading `spec`'s input."""
    from models.nets import cnn as nets
    from models.nets import transfer

    if name == SCRATCH:
        config = nets.for_input(
            spec.channels,
            len(labels),
            spec.height,
            spec.width,
            channels=recipe.width,
            depth=recipe.depth,
        )
        return nets.Net(config)
    model = transfer.TransferNet(name, labels, transfer.layer_count(name), pool="avgmax")
    model.batch_norm = recipe.batch_norm
    return model


def backbone_spec(name: str, scratch_spec: InputSpec) -> InputSpec:
    """A backbone's input for this folder: its colour and normalisation, at the folder's own
    size, the whole frame."""
    from models.nets.pretrained import pretrained_spec

    return (
        pretrained_spec(name)
        .input_spec()
        .model_copy(
            update={
                "height": scratch_spec.height,
                "width": scratch_spec.width,
                "crop_fraction": 1.0,
                "resize": scratch_spec.resize,
            }
        )
    )


def run_candidates(
    names: list[str],
    budget_s: float,
    images_for: Any,  # (spec) -> {"train": (x, y), "val": (x, y), ...} decoded for that spec
    scratch_spec: InputSpec,
    labels: list[str],
    recipe: Recipe,
    *,
    seed: int,
    precision: str,
) -> list[Trained]:
    """Train each candidate in turn within its share of `budget_s`; returns them all, in order
    (skipped ones included, with the reason)."""
    import torch

    from models.nets import cnn as nets
    from models.train import loop as training

    results: list[Trained] = []
    allowance = shares(names, budget_s)
    started = time.perf_counter()
    for position, name in enumerate(names):
        spec = scratch_spec if name == SCRATCH else backbone_spec(name, scratch_spec)
        result = Trained(name=name, spec=spec)
        results.append(result)
        best = max((r.score for r in results if r.model is not None), default=None)
        if best is not None and best >= (1.0, 1.0):
            result.skipped = "not tried: an earlier candidate got every validation image right"
            continue
        if name != SCRATCH and min(spec.height, spec.width) < BACKBONE_MIN_SIDE:
            result.skipped = f"not tried: inputs under {BACKBONE_MIN_SIDE} px are too small"
            continue
        # its own share, and what the candidates before it left unused
        left = budget_s - (time.perf_counter() - started)
        still_to_come = sum(allowance[n] for n in names[position:])
        share = min(left, allowance[name] + max(0.0, left - still_to_come))
        splits = images_for(spec)
        torch.manual_seed(seed)
        model = network(name, spec, labels, recipe)
        config = train_config(recipe, spec, seed=seed, precision=precision, scratch=name == SCRATCH)
        per_epoch = epoch_seconds(model, splits["train"], spec, config)
        if per_epoch * MIN_EPOCHS > share:
            result.skipped = (
                f"does not fit: {MIN_EPOCHS} epochs take about {per_epoch * MIN_EPOCHS / 60:.1f} "
                f"min, its share of the budget was {share / 60:.1f} min"
            )
            log(f"candidate {name}: {result.skipped}")
            continue
        # a whole schedule that fits, rather than one cut short before its learning rate fell
        config.epochs = training.epochs_within(share, recipe.epochs, per_epoch)
        log(
            f"candidate {name}: {config.epochs} epochs at most, about {per_epoch:.0f}s each "
            f"(share of the budget {share / 60:.1f} min)"
        )
        began = time.perf_counter()
        model, history = training.train(
            model, splits["train"], splits["val"], spec.mean, spec.std, config, desc=name
        )
        best_epoch = max(history, key=lambda h: (h.val_macro_f1, h.val_accuracy, h.epoch))
        result.model, result.splits = model, splits
        result.val_macro_f1, result.val_accuracy = best_epoch.val_macro_f1, best_epoch.val_accuracy
        result.seconds = time.perf_counter() - began
        result.epochs = len(history)
        result.params = nets.parameter_count(model)
        result.history = [vars(h) for h in history]
    trained = [r for r in results if r.model is not None]
    if not trained:
        cheapest = results[0]
        raise BuildError(
            f"a budget of {budget_s / 60:.1f} min fits no candidate ({cheapest.name}: "
            f"{cheapest.skipped}); raise --budget"
        )
    return results


def epoch_seconds(model, train_set, spec: InputSpec, config) -> float:
    """About how long one training epoch of `model` takes here (a few steps, timed)."""
    import torch

    from models.train import loop as training

    dev = torch.device("cpu")
    images = training.to_nchw(train_set[0][: config.batch_size], dev)
    labels = torch.from_numpy(train_set[1][: config.batch_size])
    normalize = training.Normalize(spec.mean, spec.std, dev)
    augment = training.Augment(config, torch.Generator().manual_seed(0))
    amp = training.autocast_dtype(config.precision, dev)
    step = training.step_seconds(model, images, labels, normalize, augment, config, amp)
    steps = max(1, len(train_set[1]) // config.batch_size)
    return step * steps * 1.1


def chosen(results: list[Trained]) -> Trained:
    """The best validation macro-F1, then accuracy; ties go to the earlier (cheaper)."""
    best = None
    for result in results:
        if result.model is not None and (best is None or result.score > best.score):
            best = result
    assert best is not None, "run_candidates returns at least one trained candidate"
    return best
