"""Training on in-memory tensors: augmentation, one-cycle AdamW/SGD, label smoothing, distillation.

The whole training set lives in memory as uint8 (Fashion-MNIST is 47 MB), so augmentation is a
few tensor ops per batch instead of a per-image Python pipeline, far cheaper per batch (the
build's report records the seconds each epoch took).
"""

from __future__ import annotations

import copy
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from models.publish.pipeline import progress

WEIGHT_DECAY = {"adamw": 5e-2, "sgd": 5e-4}  # AdamW's is decoupled, hence much larger


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "adamw"  # or "sgd" (Nesterov momentum)
    lr: float = 4e-3  # peak of the one-cycle schedule
    weight_decay: float = 5e-2
    label_smoothing: float = 0.1
    pad: int = 2  # random crop: pad each side, then crop back to the input size
    pad_mode: str = "constant"  # or "reflect": a shifted image shows no black border
    flip: bool = True
    vflip: bool = False  # vertical flips too
    rot90: bool = False  # quarter turns (square inputs), for data with no up or down
    brightness: float = 0.0  # each image's pixels scaled by a factor in [1 - x, 1 + x]
    contrast: float = 0.0  # its deviations from its mean scaled by a factor in [1 - x, 1 + x]
    noise: float = 0.0  # Gaussian pixel noise, standard deviation in 0..255 units
    erase_p: float = 0.0  # random erasing: chance per image of blanking one rectangle
    balanced: bool = False  # sample each class equally often, whatever its share of images
    ema_epochs: float = 0.0  # time constant of an average of the weights, in epochs; 0: off
    patience: int = 0  # stop after this many epochs without a better validation score; 0: off
    seed: int = 0
    warmup: float = 0.25  # fraction of steps spent rising to the peak learning rate
    distill_alpha: float = 0.5  # weight of the teacher's soft targets when distilling
    temperature: float = 4.0
    precision: str = "auto"  # "auto", "fp32" or "bf16" (autocast; fp16 autocast on CUDA)
    quiet: bool = False


@dataclass
class EpochLog:
    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    lr: float
    seconds: float
    val_macro_f1: float = 0.0


def setup_torch(seed: int, threads: int | None = None) -> None:
    """Seed everything and use every core we were given (torch defaults to physical cores)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
    torch.use_deterministic_algorithms(False)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX-512 BF16 or AMX); elsewhere bf16 would
    run emulated, so fp32 stays the default there."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(precision: str, dev: torch.device) -> torch.dtype | None:
    """The mixed-precision type for training on `dev`, or None for plain fp32.

    On CUDA, fp16 with a gradient scaler. On a CPU with native bf16 (faster per training step
    than fp32: the build's report records the seconds per epoch) bf16, which needs no scaler.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if dev.type == "cuda":
        return torch.float16
    return torch.bfloat16 if native_bf16() else None


def training_precision(precision: str) -> str:
    """What `precision` resolves to on this machine, for the manifest: fp32, bf16 or fp16."""
    dtype = autocast_dtype(precision, device())
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


class Normalize:
    """uint8 NCHW -> float32 NCHW, `(x / 255 - mean) / std`, as the service's preprocessing."""

    def __init__(self, mean: list[float], std: list[float], dev: torch.device) -> None:
        std_t = torch.tensor(std, device=dev).view(1, -1, 1, 1)
        self.scale = 1.0 / (255.0 * std_t)
        self.bias = -torch.tensor(mean, device=dev).view(1, -1, 1, 1) / std_t

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return images.float() * self.scale + self.bias


def to_nchw(images: np.ndarray, dev: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(dev)


class Augment:
    """Label-preserving changes to a uint8 NCHW batch: a random shift (zero or reflected
    padding), flips, quarter turns, brightness and contrast, pixel noise, random erasing.

    Each is off unless configured. Only the shift moves anything out of the frame, at most `pad`
    pixels at one edge (a folder build's is 3% of the shorter side), so a small detail that
    decides a label stays in nearly every augmented image; random erasing, which can hide it,
    is an option for centred objects.
    """

    def __init__(self, config: TrainConfig, generator: torch.Generator) -> None:
        self.config = config
        self.pad, self.flip, self.erase_p = config.pad, config.flip, config.erase_p
        self.generator = generator

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        self.device = batch.device
        config = self.config
        if self.pad:
            batch = self.crop(batch)
        if self.flip:
            batch = self.flipped(batch, 3)
        if config.vflip:
            batch = self.flipped(batch, 2)
        if config.rot90 and batch.shape[2] == batch.shape[3]:
            batch = self.turned(batch)
        if config.brightness or config.contrast or config.noise:
            batch = self.photometric(batch)
        if self.erase_p:
            batch = self.erase(batch)
        return batch

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=self.generator).to(self.device)

    def flipped(self, batch: torch.Tensor, axis: int) -> torch.Tensor:
        flip = self.rand(len(batch)) < 0.5
        return torch.where(flip.view(-1, 1, 1, 1), batch.flip(axis), batch)

    def turned(self, batch: torch.Tensor) -> torch.Tensor:
        turns = (self.rand(len(batch)) * 4).long()
        out = batch.clone()
        for k in range(1, 4):
            chosen = turns == k
            if chosen.any():
                out[chosen] = torch.rot90(batch[chosen], k, (2, 3))
        return out

    def photometric(self, batch: torch.Tensor) -> torch.Tensor:
        """Brightness, contrast and noise in float, rounded back to the pixels' 0..255."""
        config, n = self.config, len(batch)
        pixels = batch.float()
        if config.brightness:
            pixels = pixels * (1 + config.brightness * (2 * self.rand(n) - 1)).view(-1, 1, 1, 1)
        if config.contrast:
            mean = pixels.mean((1, 2, 3), keepdim=True)
            factor = (1 + config.contrast * (2 * self.rand(n) - 1)).view(-1, 1, 1, 1)
            pixels = (pixels - mean) * factor + mean
        if config.noise:
            noise = torch.randn(pixels.shape, generator=self.generator).to(self.device)
            pixels = pixels + config.noise * noise
        return pixels.round_().clamp_(0, 255).to(batch.dtype)

    def crop(self, batch: torch.Tensor) -> torch.Tensor:
        n, _, h, w = batch.shape
        p = self.pad
        if self.config.pad_mode == "reflect":  # reflection is defined on floats only
            padded = F.pad(batch.float(), (p, p, p, p), mode="reflect").to(batch.dtype)
        else:
            padded = F.pad(batch, (p, p, p, p))
        dy = (self.rand(n) * (2 * p + 1)).long()
        dx = (self.rand(n) * (2 * p + 1)).long()
        rows = (dy.view(-1, 1) + torch.arange(h, device=batch.device)).view(n, 1, h, 1)
        cols = (dx.view(-1, 1) + torch.arange(w, device=batch.device)).view(n, 1, 1, w)
        index = torch.arange(n, device=batch.device).view(n, 1, 1, 1)
        channels = torch.arange(batch.shape[1], device=batch.device).view(1, -1, 1, 1)
        return padded[index, channels, rows, cols]

    def erase(self, batch: torch.Tensor) -> torch.Tensor:
        """Blank one rectangle (20-50% of each side) in each chosen image."""
        n, _, h, w = batch.shape
        chosen = self.rand(n) < self.erase_p
        eh = (h * (0.2 + 0.3 * self.rand(n))).long()
        ew = (w * (0.2 + 0.3 * self.rand(n))).long()
        top = (self.rand(n) * (h - eh + 1)).long()
        left = (self.rand(n) * (w - ew + 1)).long()
        ys = torch.arange(h, device=batch.device).view(1, h, 1)
        xs = torch.arange(w, device=batch.device).view(1, 1, w)
        inside = (
            (ys >= top.view(-1, 1, 1))
            & (ys < (top + eh).view(-1, 1, 1))
            & (xs >= left.view(-1, 1, 1))
            & (xs < (left + ew).view(-1, 1, 1))
            & chosen.view(-1, 1, 1)
        )
        return batch.masked_fill(inside.unsqueeze(1), 0)


def one_cycle(optimizer: torch.optim.Optimizer, config: TrainConfig, steps: int):
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=[group["lr"] for group in optimizer.param_groups],  # each group's own peak
        total_steps=steps,
        pct_start=config.warmup,
        div_factor=10.0,
        final_div_factor=100.0,
        anneal_strategy="cos",
        three_phase=False,
    )


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or Nesterov SGD; no weight decay on BN and bias parameters. A model with an
    `lr_groups(lr)` method ([(parameters, peak lr)]) sets a peak per group."""
    lr_groups = getattr(model, "lr_groups", None)
    parts = lr_groups(config.lr) if lr_groups else [(list(model.parameters()), config.lr)]
    groups = []
    for parameters, lr in parts:
        trained = [p for p in parameters if p.requires_grad]
        decay = [p for p in trained if p.ndim > 1]
        no_decay = [p for p in trained if p.ndim <= 1]
        groups += [
            {"params": decay, "weight_decay": config.weight_decay, "lr": lr},
            {"params": no_decay, "weight_decay": 0.0, "lr": lr},
        ]
    groups = [group for group in groups if group["params"]]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.99))


def distill_loss(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, config: TrainConfig
) -> torch.Tensor:
    """Hinton's KD: KL between tempered softmaxes (scaled by T^2) mixed with the hard loss."""
    t = config.temperature
    soft = F.kl_div(
        F.log_softmax(student / t, 1),
        F.log_softmax(teacher / t, 1),
        reduction="batchmean",
        log_target=True,
    ) * (t * t)
    hard = F.cross_entropy(student, labels, label_smoothing=config.label_smoothing)
    return config.distill_alpha * soft + (1 - config.distill_alpha) * hard


@torch.no_grad()
def predict_logits(
    model: nn.Module, images: torch.Tensor, normalize: Normalize, batch_size: int = 250
) -> torch.Tensor:
    """float32 logits of uint8 NCHW images, in eval mode."""
    model.eval()
    out = [
        model(
            normalize(images[start : start + batch_size]).contiguous(
                memory_format=torch.channels_last
            )
        ).float()
        for start in range(0, len(images), batch_size)
    ]
    return torch.cat(out) if out else torch.zeros(0)


def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    normalize: Normalize,
    batch_size: int = 250,
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over uint8 NCHW images."""
    logits = predict_logits(model, images, normalize, batch_size)
    if not len(labels):
        return 0.0, 0.0
    loss = F.cross_entropy(logits, labels).item()
    return loss, (logits.argmax(1) == labels).float().mean().item()


def selection_score(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(macro-F1, accuracy) on validation: what picks the epoch and the candidate kept. With
    imbalanced classes, accuracy alone favours the largest. The macro average runs over the
    classes present in the labels or the predictions: a small validation split may lack one."""
    from models.evaluate.metrics import score

    predicted = logits.argmax(1).numpy()
    scores = score(labels.numpy(), predicted, logits.shape[1])
    present = np.union1d(labels.numpy(), predicted)
    return float(np.mean(np.asarray(scores.f1)[present])), scores.accuracy


class WeightAverage:
    """An exponential moving average of a model's weights and batch-norm statistics."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        pairs = zip(self.model.state_dict().values(), model.state_dict().values(), strict=True)
        for average, current in pairs:
            if average.is_floating_point():
                average.mul_(self.decay).add_(current.detach(), alpha=1 - self.decay)
            else:
                average.copy_(current)


def sample_order(labels: torch.Tensor, balanced: bool, generator: torch.Generator) -> torch.Tensor:
    """An epoch's order of training indices: a permutation, or, balanced, as many draws with
    replacement in which each class is equally likely."""
    if not balanced:
        return torch.randperm(len(labels), generator=generator)
    counts = torch.bincount(labels).float()
    weights = (1.0 / counts.clamp_min(1))[labels]
    return torch.multinomial(weights, len(labels), replacement=True, generator=generator)


def epochs_within(budget_s: float | None, epochs: int, seconds_per_epoch: float) -> int:
    """How many of `epochs` fit in `budget_s` at `seconds_per_epoch` (at least 1)."""
    if budget_s is None or seconds_per_epoch <= 0:
        return epochs
    return max(1, min(epochs, int(budget_s // seconds_per_epoch)))


def train(
    model: nn.Module,
    train_set: tuple[np.ndarray, np.ndarray],
    val_set: tuple[np.ndarray, np.ndarray],
    mean: list[float],
    std: list[float],
    config: TrainConfig,
    *,
    teacher: nn.Module | torch.Tensor | None = None,
    prepare_step: Callable[[nn.Module], None] | None = None,
    desc: str = "train",
) -> tuple[nn.Module, list[EpochLog]]:
    """Train in place; return the model holding the best validation weights, and the log.

    `teacher`: a network run on the same batches, or its logits for each training image
    already computed (a teacher with its own input size and preprocessing). A model with an
    `lr_groups(lr)` method gets its own learning rate per parameter group (a pretrained
    backbone's early layers learn slower than its head).
    """
    dev = device()
    model.to(dev).to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stubs omit memory_format
    if isinstance(teacher, torch.Tensor):
        teacher = teacher.to(dev)
    elif teacher is not None:
        teacher.to(dev).to(memory_format=torch.channels_last).eval()  # type: ignore[call-overload]  # torch's stubs omit memory_format
    images, labels = to_nchw(train_set[0], dev), torch.from_numpy(train_set[1]).to(dev)
    val_images, val_labels = to_nchw(val_set[0], dev), torch.from_numpy(val_set[1]).to(dev)
    normalize = Normalize(mean, std, dev)
    generator = torch.Generator().manual_seed(config.seed)
    augment = Augment(config, generator)
    steps_per_epoch = max(1, len(labels) // config.batch_size)  # drop the ragged last batch
    optimizer = make_optimizer(model, config)
    amp_dtype = autocast_dtype(config.precision, dev)
    scaler = torch.amp.GradScaler(enabled=amp_dtype == torch.float16)
    epochs = config.epochs
    schedule = one_cycle(optimizer, config, epochs * steps_per_epoch)
    average = None
    if config.ema_epochs > 0:
        average = WeightAverage(model, 1 - 1 / max(1.0, config.ema_epochs * steps_per_epoch))
    best_state, best_score, best_epoch, history = None, (-1.0, -1.0), 0, []
    for epoch in range(1, epochs + 1):
        model.train()
        started = time.perf_counter()
        order = sample_order(labels.cpu(), config.balanced, generator).to(dev)
        total_loss, correct, seen = 0.0, 0, 0
        bar = progress(steps_per_epoch, f"{desc} {epoch}/{epochs}", quiet=config.quiet)
        for step in bar:
            index = order[step * config.batch_size : (step + 1) * config.batch_size]
            x = normalize(augment(images[index])).contiguous(memory_format=torch.channels_last)
            y = labels[index]
            with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(x)
                if teacher is not None:
                    if isinstance(teacher, torch.Tensor):
                        target_logits = teacher[index]
                    else:
                        with torch.no_grad():
                            target_logits = teacher(x)
                    loss = distill_loss(logits, target_logits, y, config)
                else:
                    loss = F.cross_entropy(logits, y, label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            if prepare_step is not None:
                prepare_step(model)
            if average is not None:
                average.update(model)
            total_loss += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
        judged = model if average is None else average.model
        val_logits = predict_logits(judged, val_images, normalize)
        score = selection_score(val_logits.cpu(), val_labels.cpu())
        log = EpochLog(
            epoch=epoch,
            train_loss=total_loss / max(1, seen),
            train_accuracy=correct / max(1, seen),
            val_loss=F.cross_entropy(val_logits, val_labels).item(),
            val_accuracy=score[1],
            lr=optimizer.param_groups[0]["lr"],
            seconds=time.perf_counter() - started,
            val_macro_f1=score[0],
        )
        history.append(log)
        if not config.quiet:
            tqdm.write(
                f"{desc} epoch {epoch}/{epochs}: loss {log.train_loss:.4f} "
                f"acc {log.train_accuracy:.4f} | val loss {log.val_loss:.4f} "
                f"acc {log.val_accuracy:.4f} macro-F1 {log.val_macro_f1:.4f} "
                f"| {log.seconds:.1f}s",
                file=sys.stderr,  # with the build's other progress lines, unbuffered
            )
        # ">=": on ties the later epoch wins, since it has seen more of the annealed schedule
        if score >= best_score:
            best_score, best_epoch = score, epoch
            best_state = copy.deepcopy(judged.state_dict())
        elif config.patience and epoch - best_epoch >= config.patience:
            tqdm.write(
                f"{desc}: stopped early, no better validation score since epoch {best_epoch}",
                file=sys.stderr,
            )
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return model.to("cpu").to(memory_format=torch.contiguous_format), history  # type: ignore[call-overload]  # torch's stubs omit memory_format


def step_seconds(model, images, labels, normalize, augment, config, amp_dtype) -> float:
    """Seconds one training step takes: the fastest of three timed steps after a warm-up step
    (other work on the machine only ever slows a step down), on a copy (the model's weights
    and the optimizer's state are untouched)."""
    probe = copy.deepcopy(model).train()
    optimizer = torch.optim.SGD(probe.parameters(), lr=0.0)
    index = torch.arange(min(config.batch_size, len(labels)))
    times = []
    for _ in range(4):
        started = time.perf_counter()
        x = normalize(augment(images[index])).contiguous(memory_format=torch.channels_last)
        with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = F.cross_entropy(probe(x), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        times.append(time.perf_counter() - started)
    return min(times[1:])
