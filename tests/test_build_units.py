"""The build's parts on their own: network, augmentation, export, pruning, QAT, gate, speed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from app.bundle import point_latest
from models.compress import prune, qat, quantize
from models.evaluate import metrics as evaluate
from models.evaluate import speed
from models.export import onnx as export
from models.nets import cnn as net
from models.train import loop as train


@pytest.fixture(scope="module")
def trained_like() -> net.Net:
    """A small net with non-trivial batch-norm statistics, as training leaves them."""
    torch.manual_seed(0)
    model = net.Net(net.NetConfig(width=4))
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def exported(trained_like: net.Net, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folded = export.fold_batch_norm(trained_like)
    return export.export_onnx(folded, tmp_path_factory.mktemp("onnx") / "m.onnx", (1, 28, 28))


def images(n: int = 8, shape: tuple[int, ...] = (1, 28, 28)) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).normal(0, 1, (n, *shape)).astype(np.float32))


def test_network_shapes_follow_the_input() -> None:
    assert net.NetConfig(input_height=28, input_width=28).stage_widths() == [64, 128]
    assert net.NetConfig(input_height=32, input_width=32, width=8).stage_widths() == [16, 32]
    assert net.NetConfig(input_height=64, input_width=64, width=8).stage_widths() == [16, 32, 64]
    rgb = net.Net(net.NetConfig(in_channels=3, classes=7, input_height=32, input_width=48, width=4))
    assert rgb(images(2, (3, 32, 48))).shape == (2, 7)


def test_augmentation_keeps_shape_and_changes_pixels() -> None:
    batch = torch.randint(1, 256, (64, 1, 28, 28), dtype=torch.uint8)
    config = train.TrainConfig(pad=2, flip=True, erase_p=1.0)
    out = train.Augment(config, torch.Generator().manual_seed(0))(batch)
    assert out.shape == batch.shape and out.dtype == torch.uint8
    assert (out == 0).any()  # padding and erasing both bring in black pixels
    assert not torch.equal(out, batch)
    plain = train.TrainConfig(pad=0, flip=False, erase_p=0.0)
    assert torch.equal(train.Augment(plain, torch.Generator())(batch), batch)


def test_normalize_matches_the_service(tmp_path: Path) -> None:
    from app.bundle import InputSpec
    from app.preprocess import Preprocessor
    from models.data.datasets import encode_png

    pixels = np.random.default_rng(1).integers(0, 256, (1, 28, 28, 1), dtype=np.uint8)
    spec = InputSpec(height=28, width=28, channels=1, color="L", mean=[0.286], std=[0.353])
    served = Preprocessor(spec)(encode_png(pixels[0]))
    trained = train.Normalize([0.286], [0.353], torch.device("cpu"))(
        train.to_nchw(pixels, torch.device("cpu"))
    )
    np.testing.assert_allclose(trained.numpy(), served, atol=1e-5)


def test_fold_export_and_parity(trained_like: net.Net, exported: Path, tmp_path: Path) -> None:
    folded = export.fold_batch_norm(trained_like)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = images()
    torch.testing.assert_close(folded(x), trained_like(x), atol=1e-5, rtol=1e-5)
    assert export.parity(trained_like, exported, images(3).numpy()) < 1e-4  # dynamic batch
    half = export.export_onnx(folded, tmp_path / "h.onnx", (1, 28, 28), fp16=True)
    (logits,) = export.session(half).run(None, {"input": x.numpy()})
    assert logits.dtype == np.float32  # fp16 inside, float32 at the edges (the contract)
    np.testing.assert_allclose(logits, trained_like(x).detach().numpy(), atol=0.05)


def test_int8_is_qdq_and_close(exported: Path, tmp_path: Path) -> None:
    import onnx

    source = exported
    calibration = images(64).numpy()
    target = quantize.quantize_int8(source, tmp_path / "q.onnx", calibration, method="minmax")
    ops = {node.op_type for node in onnx.load(str(target)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    x = images(16).numpy()
    (full,) = export.session(source).run(None, {"input": x})
    (eight,) = export.session(target).run(None, {"input": x})
    assert np.abs(full - eight).max() < 0.25 * np.abs(full).max()


def test_pruning_keeps_the_strongest_channels(trained_like: net.Net) -> None:
    same = prune.prune_channels(trained_like, 0.0).eval()
    x = images()
    torch.testing.assert_close(same(x), trained_like(x))
    smaller = prune.prune_channels(trained_like, 0.5).eval()
    assert smaller.config.mids == [4, 8]
    assert net.parameter_count(smaller) < net.parameter_count(trained_like)
    assert smaller(x).shape == (8, 10)
    with pytest.raises(ValueError, match="--prune"):
        prune.prune_channels(trained_like, 1.0)


def test_qat_puts_weights_on_the_int8_grid_and_comes_off(trained_like: net.Net) -> None:
    prepared, handles = qat.prepare(trained_like)
    prepared.train()
    prepared(images(16))  # the input observers see a batch
    conv = next(m for m in prepared.modules() if isinstance(m, torch.nn.Conv2d))
    weight = conv.weight  # through the fake-quant parametrization
    scale = weight.detach().abs().amax((1, 2, 3), keepdim=True) / qat.WEIGHT_LEVELS
    steps = weight.detach() / scale
    torch.testing.assert_close(steps, steps.round(), atol=1e-3, rtol=0)
    finished = qat.finish(prepared, handles)
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in finished.modules())
    assert finished(images(2)).shape == (2, 10)


def test_gate() -> None:
    ok = evaluate.gate_failures(
        {"fp32": 0.95, "int8": 0.947, "fp16": 0.95}, max_int8_drop=0.3, min_accuracy=0.9
    )
    assert ok == []  # exactly 0.3 points is allowed
    dropped = evaluate.gate_failures(
        {"fp32": 0.95, "int8": 0.946}, max_int8_drop=0.3, min_accuracy=0
    )
    assert dropped == [
        "int8 test accuracy 94.60% is 0.40 points below fp32 (95.00%); --max-int8-drop is 0.3 "
        "points"
    ]
    low = evaluate.gate_failures({"fp32": 0.5}, max_int8_drop=0.3, min_accuracy=0.9)
    assert low == ["fp32 test accuracy 50.00% is below --min-accuracy 90.00%"]


def test_scores() -> None:
    scores = evaluate.score(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 1]), 3)
    assert scores.accuracy == 0.5
    assert scores.confusion == [[1, 1, 0], [0, 1, 0], [0, 1, 0]]
    assert scores.precision == [1.0, pytest.approx(1 / 3), 0.0]
    assert scores.recall == [0.5, 1.0, 0.0]
    assert scores.f1[2] == 0.0  # no division by zero for a class never predicted


def test_speed_reports_every_variant(exported: Path) -> None:
    session = export.session(exported)

    def run(batch: np.ndarray) -> np.ndarray:
        return session.run(None, {"input": batch})[0]

    result = speed.throughput({"a": run, "b": run}, (1, 28, 28), rounds=1, images_per_round=32)
    for figures in result.values():
        assert figures["batch1_images_per_s"] > 0 and figures["batch32_latency_ms"] > 0


def test_latest_symlink_is_replaced_atomically(tmp_path: Path) -> None:
    (tmp_path / "v1").mkdir()
    (tmp_path / "v2").mkdir()
    point_latest(tmp_path, "v1")
    point_latest(tmp_path, "v2")
    assert (tmp_path / "latest").resolve() == (tmp_path / "v2").resolve()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "v1", "v2"]


def test_checkpoint_round_trip(trained_like: net.Net, tmp_path: Path) -> None:
    """A bundle's checkpoint.pt is what `--teacher PATH` loads."""
    pruned = prune.prune_channels(trained_like, 0.5).eval()
    net.save_checkpoint(pruned, tmp_path / "checkpoint.pt")
    loaded = net.load_checkpoint(tmp_path / "checkpoint.pt").eval()
    assert loaded.config == pruned.config
    x = images(2)
    torch.testing.assert_close(loaded(x), pruned(x))


def test_training_precision_follows_the_option_and_the_cpu() -> None:
    cpu = torch.device("cpu")
    assert train.autocast_dtype("fp32", cpu) is None
    assert train.autocast_dtype("bf16", cpu) is torch.bfloat16
    assert train.autocast_dtype("fp32", torch.device("cuda")) is None
    assert train.autocast_dtype("bf16", torch.device("cuda")) is torch.bfloat16
    assert train.autocast_dtype("auto", torch.device("cuda")) is torch.float16
    native = train.autocast_dtype("auto", cpu)
    assert native is (torch.bfloat16 if train.native_bf16() else None)


def test_bf16_training_learns() -> None:
    """bf16 autocast steps run on any CPU (emulated where not native) and reduce the loss."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 512).astype(np.int64)
    images = np.zeros((512, 28, 28, 1), np.uint8)
    for i, label in enumerate(labels):  # a bright bar whose row is the class: easy to learn
        images[i, 2 + 2 * label : 4 + 2 * label] = 255
    config = train.TrainConfig(epochs=3, batch_size=64, precision="bf16", quiet=True)
    model = net.Net(net.NetConfig(width=4))
    _, history = train.train(
        model, (images, labels), (images[:128], labels[:128]), [0.1], [0.3], config
    )
    assert history[-1].train_loss < history[0].train_loss
    assert history[-1].val_accuracy > 0.5


# --- networks for any input size -----------------------------------------------------------


def test_small_inputs_keep_the_small_image_design() -> None:
    """Up to 64 px: the full-resolution stem and the flattened head, as before the rework
    (307,378 parameters at 28x28, width 24: the default build's network)."""
    config = net.for_input(1, 10, 28, 28, channels=24, depth=1)
    assert (config.stem_stride, config.head) == (1, "flatten")
    assert net.parameter_count(net.Net(config)) == 307_378
    edge = net.for_input(3, 4, 64, 80, channels=8, depth=1)
    assert (edge.stem_stride, edge.head) == (1, "flatten")
    assert net.Net(edge)(images(2, (3, 64, 80))).shape == (2, 4)


def test_larger_inputs_get_a_strided_stem_and_the_avg_max_head() -> None:
    config = net.for_input(3, 5, 65, 96, channels=8, depth=1)
    assert (config.stem_stride, config.head) == (2, "avgmax")
    model = net.Net(config).eval()
    assert isinstance(model.pool, net.AvgMaxPool)
    widest = config.stage_widths()[-1]
    assert model.classifier.in_features == 2 * widest  # average and maximum of each channel
    assert model(images(2, (3, 65, 96))).shape == (2, 5)
    # the head is independent of the input size: any frame size runs
    assert model(images(1, (3, 130, 70))).shape == (1, 5)
    pooled = net.AvgMaxPool()(torch.arange(8.0).view(1, 2, 2, 2))
    assert pooled.tolist() == [[1.5, 5.5, 3.0, 7.0]]


def test_a_small_mark_near_an_edge_reaches_the_avg_max_head() -> None:
    """A 3x3 bright patch in a corner of a 96x96 frame changes the pooled maximum, which the
    average alone would dilute over the whole map."""
    torch.manual_seed(0)
    model = net.Net(net.for_input(1, 2, 96, 96, channels=8, depth=1)).eval()
    plain = torch.zeros(1, 1, 96, 96)
    marked = plain.clone()
    marked[..., 1:4, 92:95] = 4.0
    with torch.no_grad():
        features = [model.pool(model.features(x)) for x in (plain, marked)]
        logits = [model(x) for x in (plain, marked)]
    channels = features[0].shape[1] // 2
    change = (features[1] - features[0]).abs()[0]
    average_change, maximum_change = change[:channels].max(), change[channels:].max()
    assert maximum_change > 0.05
    assert maximum_change > 8 * average_change  # the average spreads it over the whole map
    assert not torch.allclose(logits[0], logits[1], atol=1e-3)


# --- augmentation, sampling, averaging, schedules ------------------------------------------


def test_reflect_padding_never_brings_in_black() -> None:
    white = torch.full((32, 3, 20, 24), 255, dtype=torch.uint8)
    reflect = train.TrainConfig(pad=4, pad_mode="reflect", flip=False)
    assert torch.equal(train.Augment(reflect, torch.Generator().manual_seed(0))(white), white)
    zero = train.TrainConfig(pad=4, pad_mode="constant", flip=False)
    assert (train.Augment(zero, torch.Generator().manual_seed(0))(white) == 0).any()
    # a shifted ramp shows reflected (mirrored) pixels at the border, not zeros
    ramp = torch.arange(1, 21, dtype=torch.uint8).repeat(8, 1, 20, 1)
    shifted = train.Augment(reflect, torch.Generator().manual_seed(1))(ramp)
    assert shifted.min() >= 1 and not torch.equal(shifted, ramp)


def test_quarter_turns_and_vertical_flips_keep_the_pixels() -> None:
    batch = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)
    config = train.TrainConfig(pad=0, flip=False, vflip=True, rot90=True)
    out = train.Augment(config, torch.Generator().manual_seed(0))(batch)
    assert out.shape == batch.shape and out.dtype == torch.uint8
    seen = set()
    for original, augmented in zip(batch, out, strict=True):
        variants = [
            torch.rot90(image, k, (1, 2))
            for image in (original, original.flip(1))
            for k in range(4)
        ]
        matches = [i for i, v in enumerate(variants) if torch.equal(v, augmented)]
        assert matches, "every augmented image is a turned and/or flipped original"
        seen.add(matches[0])
    assert len(seen) > 4  # several of the eight symmetries were drawn
    # quarter turns apply to square inputs only: a wide batch keeps its shape
    wide = torch.randint(0, 256, (8, 1, 12, 20), dtype=torch.uint8)
    turned = train.Augment(train.TrainConfig(pad=0, flip=False, rot90=True), torch.Generator())
    assert torch.equal(turned(wide), wide)


def test_photometric_changes_stay_uint8_pixels() -> None:
    batch = torch.randint(20, 236, (32, 3, 16, 16), dtype=torch.uint8)
    config = train.TrainConfig(pad=0, flip=False, brightness=0.3, contrast=0.3, noise=8.0)
    out = train.Augment(config, torch.Generator().manual_seed(0))(batch)
    assert out.shape == batch.shape and out.dtype == torch.uint8
    difference = (out.float() - batch.float()).abs()
    assert difference.mean() > 2  # changed
    # brightness and contrast scale whole images: each image's mean moves, not each pixel alone
    means = out.float().mean((1, 2, 3)) / batch.float().mean((1, 2, 3))
    assert means.min() < 0.9 and means.max() > 1.1
    bright = train.TrainConfig(pad=0, flip=False, brightness=0.5)
    white = torch.full((16, 1, 4, 4), 250, dtype=torch.uint8)
    assert train.Augment(bright, torch.Generator().manual_seed(0))(white).max() == 255  # clamped


def test_balanced_sampling_draws_each_class_about_equally() -> None:
    labels = torch.tensor([0] * 900 + [1] * 100)
    generator = torch.Generator().manual_seed(0)
    order = train.sample_order(labels, True, generator)
    assert len(order) == len(labels)
    share = labels[order].float().mean().item()  # the minority class's share of the draws
    assert 0.44 < share < 0.56
    plain = train.sample_order(labels, False, generator)
    assert sorted(plain.tolist()) == list(range(1000))  # a permutation: every image once


def test_weight_average_converges_to_a_model_that_stopped_changing() -> None:
    torch.manual_seed(0)
    model = net.Net(net.NetConfig(width=4))
    average = train.WeightAverage(model, decay=0.9)
    assert all(not p.requires_grad for p in average.model.parameters())
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.fill_(0.5)
                module.num_batches_tracked.fill_(7)
    average.update(model)
    first = next(average.model.parameters())
    start = next(model.parameters())
    assert torch.allclose(first, start - 0.9, atol=1e-5)  # one step: 10% of the way
    for _ in range(300):
        average.update(model)
    for mine, theirs in zip(
        average.model.state_dict().values(), model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=0)
    x = images(2)
    torch.testing.assert_close(average.model(x), model.eval()(x), atol=1e-4, rtol=1e-4)


def test_epochs_within_a_budget() -> None:
    assert train.epochs_within(None, 10, 5.0) == 10
    assert train.epochs_within(100.0, 10, 30.0) == 3
    assert train.epochs_within(1000.0, 10, 1.0) == 10  # never more than asked
    assert train.epochs_within(10.0, 10, 30.0) == 1  # at least one
    assert train.epochs_within(100.0, 10, 0.0) == 10


def test_selection_score_ignores_classes_nobody_saw() -> None:
    """A small validation split may lack a class: macro-F1 over the classes in its labels or
    its predictions, so a perfect model scores 1, and a class predicted wrongly still counts."""
    labels = torch.tensor([0, 0, 1, 1])
    perfect = torch.nn.functional.one_hot(labels, 4).float()
    assert train.selection_score(perfect, labels) == (1.0, 1.0)
    wrong = perfect.clone()
    wrong[3] = torch.tensor([0.0, 0.0, 0.0, 1.0])  # a class absent from the labels, predicted
    f1, accuracy = train.selection_score(wrong, labels)
    assert accuracy == 0.75
    # class 0: F1 1; class 1: precision 1, recall 1/2 -> 2/3; class 3: 0; class 2 left out
    assert f1 == pytest.approx((1 + 2 / 3 + 0) / 3)


def test_candidates_share_the_budget_and_the_best_on_validation_is_chosen() -> None:
    from app.bundle import InputSpec
    from models.train import candidates as cands

    assert cands.shares(["scratch"], 100.0) == {"scratch": 100.0}
    assert cands.shares(["scratch", "a", "b"], 100.0) == pytest.approx(
        {"scratch": 40.0, "a": 30.0, "b": 30.0}
    )
    assert cands.shares(["a", "b"], 100.0) == {"a": 50.0, "b": 50.0}
    spec = InputSpec(height=8, width=8, channels=1, color="L", mean=[0.5], std=[0.5])

    def trained(name: str, f1: float, accuracy: float, model: object = "net") -> cands.Trained:
        result = cands.Trained(name=name, spec=spec, model=model)
        result.val_macro_f1, result.val_accuracy = f1, accuracy
        return result

    first, tie, skipped = trained("a", 0.9, 0.9), trained("b", 0.9, 0.9), trained("c", 1, 1, None)
    assert cands.chosen([first, tie, skipped]) is first  # ties: the cheaper, tried first
    better = trained("d", 0.9, 0.95)
    assert cands.chosen([first, better]) is better  # then accuracy
    assert cands.chosen([trained("e", 0.95, 0.5), better]).name == "e"  # macro-F1 first
