"""Provider and variant choice, GPU batch buckets, and the CPU session."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from app.bundle import BundleError, load_bundle
from app.engine import (
    Engine,
    EngineError,
    batch_buckets,
    bucket_for,
    choose_device,
    choose_variant,
    cpu_sums_int8_in_32_bits,
    int8_safe_here,
)

CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
HAS_CUDA = CUDA in ort.get_available_providers()


@pytest.mark.parametrize(
    ("requested", "available", "expected"),
    [
        ("auto", [CPU], "cpu"),
        ("auto", [CUDA, CPU], "cuda"),
        ("auto", [TRT, CUDA, CPU], "tensorrt"),
        ("auto", ["AzureExecutionProvider", CPU], "cpu"),
        ("cpu", [TRT, CUDA, CPU], "cpu"),
        ("cuda", [TRT, CUDA, CPU], "cuda"),
    ],
)
def test_choose_device(requested, available, expected):
    assert choose_device(requested, available) == expected


@pytest.mark.parametrize("requested", ["cuda", "tensorrt"])
def test_choose_device_refuses_a_missing_provider(requested):
    with pytest.raises(EngineError, match="offers only"):
        choose_device(requested, [CPU])


@pytest.mark.parametrize(
    ("requested", "device", "variants", "expected"),
    [
        ("auto", "cpu", ["fp32", "int8", "fp16"], "int8"),
        ("auto", "cpu", ["fp32"], "fp32"),
        ("auto", "cuda", ["fp32", "int8", "fp16"], "fp16"),
        ("auto", "tensorrt", ["fp32", "int8"], "fp32"),
        ("fp32", "cpu", ["fp32", "int8"], "fp32"),
    ],
)
def test_choose_variant(requested, device, variants, expected):
    assert choose_variant(requested, device, variants) == expected


def test_full_range_int8_is_not_chosen_on_a_cpu_without_vnni():
    variants = ["fp32", "int8"]
    assert choose_variant("auto", "cpu", variants, int8_safe=False) == "fp32"
    assert choose_variant("int8", "cpu", variants, int8_safe=False) == "int8"  # asked for
    assert choose_variant("auto", "cuda", variants, int8_safe=False) == "fp32"
    assert int8_safe_here({}) and int8_safe_here({"quantization": {"weight_range": "reduced"}})
    full = {"quantization": {"weight_range": "full"}}
    assert int8_safe_here(full) == cpu_sums_int8_in_32_bits()


def test_choose_variant_refuses_one_the_bundle_lacks():
    with pytest.raises(BundleError, match="not in the bundle"):
        choose_variant("fp16", "cpu", ["fp32", "int8"])


def test_batch_buckets():
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 32]
    assert batch_buckets(24) == [1, 2, 4, 8, 16, 24]
    assert batch_buckets(1) == [1]
    assert [bucket_for(n, batch_buckets(24)) for n in (1, 3, 9, 17, 24)] == [1, 4, 16, 24, 24]


def test_cpu_engine_runs_the_chosen_variant(bundle_dir):
    engine = Engine(load_bundle(bundle_dir), device="auto", variant="auto", max_batch_size=4)
    assert (engine.device, engine.variant, engine.provider) == ("cpu", "int8", CPU)
    assert engine.buckets is None  # no padding on CPU
    engine.warm_up()
    batch = np.random.default_rng(0).normal(0, 1, (3, 1, 28, 28)).astype(np.float32)
    logits = engine.run(batch)
    assert logits.shape == (3, 10) and logits.dtype == np.float32


@pytest.mark.parametrize(
    ("threads", "spin_when_alone", "own_session"),
    [(2, True, True), (2, False, False), (1, True, False)],
)
def test_a_lone_request_gets_a_spinning_session_only_where_threads_would_sleep(
    bundle_dir, threads, spin_when_alone, own_session
):
    engine = Engine(
        load_bundle(bundle_dir),
        device="cpu",
        threads=threads,
        spin_when_alone=spin_when_alone,
        max_batch_size=4,
    )
    assert (engine.lone_session is not engine.session) == own_session
    spinning = "session.intra_op.allow_spinning"
    entries = engine.lone_session.get_session_options().get_session_config_entry
    assert entries(spinning) == ("1" if own_session else "0")
    assert engine.session.get_session_options().get_session_config_entry(spinning) == "0"
    engine.warm_up()
    image = np.random.default_rng(0).normal(0, 1, (1, 1, 28, 28)).astype(np.float32)
    np.testing.assert_array_equal(engine.run_lone(image), engine.run(image))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDAExecutionProvider in this ONNX Runtime (no GPU)")
@pytest.mark.parametrize("device", ["cuda", "tensorrt"])
def test_gpu_engine_matches_cpu(bundle_dir, device):
    if device == "tensorrt" and TRT not in ort.get_available_providers():
        pytest.skip("no TensorrtExecutionProvider in this ONNX Runtime")
    bundle = load_bundle(bundle_dir)
    gpu = Engine(bundle, device=device, variant="fp32", max_batch_size=8)
    cpu = Engine(bundle, device="cpu", variant="fp32", max_batch_size=8)
    gpu.warm_up()
    batch = np.random.default_rng(0).normal(0, 1, (5, 1, 28, 28)).astype(np.float32)
    np.testing.assert_allclose(gpu.run(batch), cpu.run(batch), atol=1e-3)
