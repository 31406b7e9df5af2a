"""The frozen-feature path (`--fast`): a new head on cached backbone features, then the last
layers tuned.

The way it is done on CPUs: the backbone's frozen layers see each training image a few times
(its centre view, as served, and a few augmented views) and their outputs are cached
(models/train/features.py). Stage 1 trains a new linear head on the pooled features of every cached
view; stage 2 unfreezes the backbone's last `tune_last` layers and trains them with the head at
a lower learning rate, each epoch on one random cached view per image, starting from the best
head of stage 1. Batch norm keeps its ImageNet statistics throughout (a few hundred images
estimate them worse). Classes are weighted by inverse frequency in the loss, and the weights
kept are those of the best validation epoch of either stage; validation runs on the centre
views, which are exactly what the service feeds.
"""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from app.bundle import InputSpec
from models.data.views import ViewConfig, random_view
from models.nets.transfer import TransferNet
from models.publish.pipeline import log, progress
from models.train import loop as training
from models.train.features import FrozenFeatures, cache_views


@dataclass
class FineTuneConfig:
    views: int = 3  # cached views per training image: the centre view and views - 1 augmented
    head_epochs: int = 40
    head_lr: float = 3e-3
    tune_last: int = 1  # backbone layers tuned in stage 2, counted from the end; 0: head only
    tune_epochs: int = 10
    tune_lr: float = 3e-4  # the backbone's peak; the head's is ten times higher
    batch_size: int = 64
    head_batch_size: int = 256  # a linear layer on cached features: steps, not data, cost time
    weight_decay: float = 1e-2
    label_smoothing: float = 0.1
    seed: int = 0
    precision: str = "auto"
    augment: ViewConfig = field(default_factory=ViewConfig)
    quiet: bool = False


@dataclass
class Cache:
    """Frozen features of the training views and the validation centre views."""

    train: np.ndarray  # float16 [N, views, ...]
    train_labels: torch.Tensor
    val: np.ndarray  # float16 [M, 1, ...]
    val_labels: torch.Tensor


def context_images(sources: list, spec: InputSpec) -> np.ndarray:
    """uint8 NHWC images the augmented views are cut from: the region the service's centre
    crop is taken from (crop fraction 1), at the size that crop is resized from."""
    from models.data.datasets import decode_files, stack

    size = round(spec.height / spec.crop_fraction), round(spec.width / spec.crop_fraction)
    context = spec.model_copy(update={"height": size[0], "width": size[1], "crop_fraction": 1.0})
    pixels = decode_files(sources, context)
    return stack([(path, 0) for path in sources], pixels)[0]


def teacher_logits(model: TransferNet, sources: list) -> np.ndarray:
    """The model's logits for each file, decoded and normalised as the service would."""
    from models.data.datasets import decode_files, stack
    from models.nets.pretrained import pretrained_spec

    spec = pretrained_spec(model.backbone_name).input_spec()
    images = stack([(path, 0) for path in sources], decode_files(sources, spec))[0]
    run = FrozenFeatures(
        model,
        (spec.channels, spec.height, spec.width),
        spec.mean,
        spec.std,
        torch.get_num_threads(),
    )
    return np.concatenate([run(images[i : i + 32]) for i in range(0, len(images), 32)])


def cache_features(model, train_set, contexts, val_set, spec, config) -> Cache:
    rng = np.random.default_rng(config.seed + 3)
    size = (spec.height, spec.width)
    images, labels = train_set

    def train_view(i: int, v: int) -> np.ndarray:
        return images[i] if v == 0 else random_view(contexts[i], size, rng, config.augment)

    features = FrozenFeatures(
        model.frozen,
        (spec.channels, spec.height, spec.width),
        spec.mean,
        spec.std,
        torch.get_num_threads(),
    )
    started = time.perf_counter()
    train = cache_views(
        features, len(labels), config.views, train_view, desc="features", quiet=config.quiet
    )
    val = cache_views(
        features, len(val_set[1]), 1, lambda i, _: val_set[0][i], desc="val features", quiet=True
    )
    log(
        f"features: {len(labels)} x {config.views} training views and {len(val_set[1])} "
        f"validation images in {time.perf_counter() - started:.1f}s"
    )
    return Cache(train, torch.from_numpy(labels), val, torch.from_numpy(val_set[1]))


def class_weights(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """Inverse class frequency, mean 1: each class weighs the same in the loss in total."""
    counts = torch.bincount(labels, minlength=classes).float().clamp_min(1)
    weights = counts.sum() / (classes * counts)
    return weights / weights.mean()


def loss_fn(logits, labels, weights, config: FineTuneConfig) -> torch.Tensor:
    return F.cross_entropy(
        logits.float(), labels, weight=weights, label_smoothing=config.label_smoothing
    )


@torch.no_grad()
def pooled(model: TransferNet, features: np.ndarray) -> torch.Tensor:
    """The tuned part's output (before the head) for float16 frozen features [N, ...]."""
    out = [
        model.tuned(torch.from_numpy(features[i : i + 256]).float())
        for i in range(0, len(features), 256)
    ]
    return torch.cat(out)


def train_head(model: TransferNet, cache: Cache, config: FineTuneConfig, histories):
    """Stage 1: the linear head on the pooled features of every cached view.

    On one thread: its steps are too small to share, and a second thread waiting at every
    step's barrier is what costs when the cores are busy with other work.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fit_head(model, cache, config, histories)
    finally:
        torch.set_num_threads(threads)


def fit_head(model: TransferNet, cache: Cache, config: FineTuneConfig, histories):
    model.eval()
    n, views = cache.train.shape[:2]
    inputs = pooled(model, cache.train.reshape(n * views, *cache.train.shape[2:]))
    targets = cache.train_labels.repeat_interleave(views)
    val_inputs = pooled(model, cache.val[:, 0])
    weights = class_weights(cache.train_labels, model.classifier.out_features)
    head = model.classifier
    optimizer = torch.optim.AdamW(
        head.parameters(), lr=config.head_lr, weight_decay=config.weight_decay
    )
    batch_size = config.head_batch_size
    steps = max(1, len(targets) // batch_size)
    schedule = schedule_for(optimizer, config.head_lr, config.head_epochs * steps)
    generator = torch.Generator().manual_seed(config.seed)
    best = ((-1.0, -1.0), copy.deepcopy(model.state_dict()))
    history = []
    for epoch in range(1, config.head_epochs + 1):
        started = time.perf_counter()
        head.train()
        order = torch.randperm(len(targets), generator=generator)
        total = correct = 0.0
        for step in range(steps):
            index = order[step * batch_size : (step + 1) * batch_size]
            logits = head(inputs[index])
            loss = loss_fn(logits, targets[index], weights, config)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(index)
            correct += (logits.argmax(1) == targets[index]).sum().item()
        head.eval()
        with torch.no_grad():
            val_logits = head(val_inputs)
        seen = steps * batch_size
        entry = epoch_log(epoch, total / seen, correct / seen, val_logits, cache, optimizer)
        entry.seconds = time.perf_counter() - started
        history.append(entry)
        best = keep_best(best, val_logits, cache, model)
    report("head", history, config)
    histories["head"] = [vars(h) for h in history]
    return best


def tune(model: TransferNet, cache: Cache, config: FineTuneConfig, histories, best):
    """Stage 2: the last backbone layers and the head, one random cached view per image."""
    dev = torch.device("cpu")
    amp_dtype = training.autocast_dtype(config.precision, dev)
    weights = class_weights(cache.train_labels, model.classifier.out_features)
    optimizer = torch.optim.AdamW(
        [
            {"params": list(model.tuned.parameters()), "lr": config.tune_lr},
            {"params": list(model.classifier.parameters()), "lr": config.tune_lr * 10},
        ],
        weight_decay=config.weight_decay,
    )
    n, views = cache.train.shape[:2]
    steps = max(1, n // config.batch_size)
    schedule = schedule_for(
        optimizer, [config.tune_lr, config.tune_lr * 10], config.tune_epochs * steps
    )
    generator = torch.Generator().manual_seed(config.seed + 1)
    history = []
    for epoch in range(1, config.tune_epochs + 1):
        started = time.perf_counter()
        model.eval()  # batch norm keeps its statistics; only the weights learn
        order = torch.randperm(n, generator=generator)
        chosen = torch.randint(views, (n,), generator=generator)
        total = correct = 0.0
        bar = progress(steps, f"tune {epoch}/{config.tune_epochs}", quiet=config.quiet)
        for step in bar:
            index = order[step * config.batch_size : (step + 1) * config.batch_size]
            x = torch.from_numpy(cache.train[index.numpy(), chosen[index].numpy()]).float()
            y = cache.train_labels[index]
            with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model.classifier(model.tuned(x))
            loss = loss_fn(logits, y, weights, config)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(index)
            correct += (logits.argmax(1) == y).sum().item()
        with torch.no_grad():
            val_logits = model.classifier(pooled(model, cache.val[:, 0]))
        seen = steps * config.batch_size
        entry = epoch_log(epoch, total / seen, correct / seen, val_logits, cache, optimizer)
        entry.seconds = time.perf_counter() - started
        history.append(entry)
        best = keep_best(best, val_logits, cache, model)
    report("tune", history, config)
    histories["tune"] = [vars(h) for h in history]
    return best


def schedule_for(optimizer, peak, steps: int):
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=peak,
        total_steps=steps,
        pct_start=0.1,
        div_factor=10.0,
        final_div_factor=100.0,
        anneal_strategy="cos",
    )


def epoch_log(epoch, train_loss, train_accuracy, val_logits, cache: Cache, optimizer):
    val_loss = F.cross_entropy(val_logits, cache.val_labels).item()
    val_accuracy = (val_logits.argmax(1) == cache.val_labels).float().mean().item()
    return training.EpochLog(
        epoch=epoch,
        train_loss=train_loss,
        train_accuracy=train_accuracy,
        val_loss=val_loss,
        val_accuracy=val_accuracy,
        lr=optimizer.param_groups[0]["lr"],
        seconds=0.0,
    )


def keep_best(best, val_logits: torch.Tensor, cache: Cache, model: nn.Module):
    """(score, weights) of the better of `best` and the model now. The score is validation
    macro-F1, then accuracy: with imbalanced classes, accuracy alone favours the largest."""
    from models.evaluate.metrics import score

    classes = val_logits.shape[1]
    scores = score(cache.val_labels.numpy(), val_logits.argmax(1).numpy(), classes)
    now = (float(np.mean(scores.f1)), scores.accuracy)
    # ">=": on ties the later epoch wins, since it has seen more of the annealed schedule
    if now >= best[0]:
        return now, copy.deepcopy(model.state_dict())
    return best


def report(stage: str, history, config: FineTuneConfig) -> None:
    if config.quiet or not history:
        return
    best = max(history, key=lambda h: h.val_accuracy)
    last = history[-1]
    print(
        f"{stage}: {len(history)} epochs in {sum(h.seconds for h in history):.1f}s | last: "
        f"loss {last.train_loss:.4f} acc {last.train_accuracy:.4f}, val acc "
        f"{last.val_accuracy:.4f} | best val acc {best.val_accuracy:.4f} (epoch {best.epoch})",
        file=sys.stderr,
    )
