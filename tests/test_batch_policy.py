"""The batch-size policy on synthetic cost curves, and the engine's measured curve feeding it."""

from __future__ import annotations

import pytest

from app.batch_policy import batch_cap, best_batch_size, per_image_costs
from app.bundle import load_bundle
from app.engine import Engine
from app.settings import Settings
from tests.conftest import running_app


def curve(per_image_ms: dict[int, float]) -> dict[int, float]:
    """Seconds per batch from milliseconds per image."""
    return {size: ms * size / 1000 for size, ms in per_image_ms.items()}


def test_per_image_costs_divide_by_the_batch_size():
    assert per_image_costs({4: 0.008, 1: 0.003}) == {1: 0.003, 4: 0.002}


def test_gpu_like_curve_falling_all_the_way_takes_the_largest_size():
    falling = curve({1: 2.0, 2: 1.1, 4: 0.6, 8: 0.35, 16: 0.2, 32: 0.12})
    assert best_batch_size(falling) == 32


def test_cpu_like_curve_rising_with_size_stops_before_it_rises():
    # per image: flat up to 4, then dearer as activations outgrow the caches
    rising = curve({1: 4.6, 2: 4.55, 4: 4.6, 8: 5.0, 16: 5.5, 32: 6.2})
    assert best_batch_size(rising) == 4


def test_a_near_tie_goes_to_the_larger_size():
    near_tie = curve({1: 1.0, 2: 1.0, 4: 1.04, 8: 1.2})
    assert best_batch_size(near_tie) == 4
    assert best_batch_size(near_tie, tolerance=0.0) == 2  # exact ties still prefer larger


def test_a_cheaper_small_size_beats_a_dearer_large_one_beyond_the_tolerance():
    assert best_batch_size(curve({1: 1.0, 8: 1.2})) == 1


def test_the_cheapest_point_in_the_middle_is_found():
    assert best_batch_size(curve({1: 3.0, 2: 2.0, 4: 1.0, 8: 1.5, 16: 3.0})) == 4


def test_no_timings_is_an_error_for_the_pure_choice():
    with pytest.raises(ValueError):
        best_batch_size({})


@pytest.mark.parametrize(
    ("policy", "max_batch_size", "costs", "expected"),
    [
        ("measured", 32, curve({1: 1.0, 2: 0.5, 4: 0.9}), 2),
        ("max", 32, curve({1: 1.0, 2: 0.5, 4: 0.9}), 32),  # forced: the setting as given
        ("measured", 16, {}, 16),  # nothing measured: the setting
        ("measured", 3, curve({1: 1.0, 4: 0.1}), 3),  # never above the setting
    ],
)
def test_batch_cap(policy, max_batch_size, costs, expected):
    assert batch_cap(policy, max_batch_size, costs) == expected


def test_engine_warm_up_times_every_bucket_size(bundle_dir):
    engine = Engine(load_bundle(bundle_dir), device="cpu", threads=1, max_batch_size=6)
    costs = engine.warm_up()
    assert sorted(costs) == [1, 2, 4, 6]
    assert all(seconds > 0 for seconds in costs.values())
    assert engine.batch_costs == costs
    assert 1 <= batch_cap("measured", 6, costs) <= 6


@pytest.mark.parametrize("policy", ["measured", "max"])
async def test_served_model_reports_its_cap_and_curve(bundle_dir, policy):
    settings = Settings(model=bundle_dir, threads=1, max_batch_size=8, batch_policy=policy)
    async with running_app(settings) as client:
        (model,) = (await client.get("/v1/models")).json()["models"]
        batcher = client.app.state.registry.default.current.batcher  # type: ignore[attr-defined]
    batching = model["batching"]
    assert batching["policy"] == policy
    assert sorted(batching["seconds_per_batch"], key=int) == ["1", "2", "4", "8"]
    assert batching["batch_cap"] == batcher.max_batch_size
    costs = {int(k): v for k, v in batching["seconds_per_batch"].items()}
    assert batching["batch_cap"] == batch_cap(policy, 8, costs)
    if policy == "max":
        assert batching["batch_cap"] == 8
