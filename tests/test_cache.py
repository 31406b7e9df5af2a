"""The response cache, as a unit and in the real app: hits, misses, eviction, bypass, reload
invalidation and the coalescing of identical requests (engine runs counted in the metrics)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from app.bundle import point_latest
from app.cache import ENTRY_OVERHEAD_BYTES, ResponseCache, cache_bypassed, entry_bytes
from app.metrics import ServiceMetrics
from app.settings import Settings
from loadtest.versions import add_version
from tests.conftest import running_app
from tests.images import png
from tests.metrics_text import parse, value

PNG = {"content-type": "image/png"}
CACHE_BYTES = 1 << 20


def test_least_recently_used_answers_leave_first_within_the_byte_budget():
    metrics = ServiceMetrics()
    body = b"x" * 100
    cache = ResponseCache(3 * entry_bytes(body), metrics)
    for key in "abc":
        cache.put((key,), body)
    assert cache.get(("a",)) == body  # a is now the most recent: b goes first
    cache.put(("d",), body)
    assert cache.get(("b",)) is None
    assert [cache.get((k,)) is not None for k in "acd"] == [True, True, True]
    assert cache.bytes == 3 * (100 + 32 + ENTRY_OVERHEAD_BYTES) and len(cache) == 3
    assert metrics.cache_evictions._value.get() == 1
    cache.put(("huge",), b"x" * cache.max_bytes)  # larger than the whole cache: not kept
    assert len(cache) == 3


def test_drop_model_forgets_every_version_of_that_model_only():
    cache = ResponseCache(CACHE_BYTES, ServiceMetrics())
    for key in [("a", "1", "int8"), ("a", "2", "int8"), ("b", "1", "int8")]:
        cache.put(key, b"{}")
    assert cache.drop_model("a") == 2
    assert len(cache) == 1 and cache.get(("b", "1", "int8")) == b"{}"
    assert cache.bytes == entry_bytes(b"{}")


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, (False, False)),
        (b"max-age=60", (False, False)),
        (b"no-cache", (True, False)),
        (b"No-Cache, max-age=0", (True, False)),
        (b"no-store", (True, True)),
        (b'private, no-cache="set-cookie"', (True, False)),
    ],
)
def test_cache_control_directives(header, expected):
    assert cache_bypassed(header) == expected


async def post(
    client: httpx.AsyncClient, seed: int = 0, headers: dict | None = None, **kwargs
) -> httpx.Response:
    sent = {**PNG, **(headers or {})}
    response = await client.post("/classify", content=png(seed), headers=sent, **kwargs)
    assert response.status_code == 200, response.text
    return response


async def metrics(client: httpx.AsyncClient) -> dict:
    return parse((await client.get("/metrics")).text)


async def test_a_repeat_is_answered_from_the_cache_with_the_same_body(bundle_dir):
    async with running_app(Settings(model=bundle_dir, threads=1, cache_bytes=CACHE_BYTES)) as c:
        first, second = await post(c), await post(c)
        other_k = await post(c, params={"top_k": 2})
        other_image = await post(c, seed=1)
        samples = await metrics(c)
    assert first.headers["x-cache"] == "miss" and second.headers["x-cache"] == "hit"
    assert second.content == first.content
    timing = second.headers["server-timing"]
    assert timing.startswith("cache;dur=") and "decode" not in timing
    assert other_k.headers["x-cache"] == "miss" and len(other_k.json()["predictions"]) == 2
    assert other_image.headers["x-cache"] == "miss"
    assert value(samples, "blink_cache_lookups_total", result="hit") == 1
    assert value(samples, "blink_cache_lookups_total", result="miss") == 3
    assert value(samples, "blink_batch_size_sum") == 3  # the hit never reached the engine
    assert value(samples, "blink_decode_duration_seconds_count") == 3
    assert value(samples, "blink_cache_entries") == 3
    assert value(samples, "blink_cache_bytes") == sum(
        entry_bytes(r.content) for r in (first, other_k, other_image)
    )


async def test_a_small_cache_evicts_and_counts_it(bundle_dir):
    first_body = None
    async with running_app(Settings(model=bundle_dir, threads=1, cache_bytes=2000)) as c:
        first_body = (await post(c, 0)).content
        for seed in range(1, 6):
            await post(c, seed)
        again = await post(c, 0)
        samples = await metrics(c)
    assert entry_bytes(first_body) * 3 > 2000  # room for two answers
    assert again.headers["x-cache"] == "miss"  # evicted long ago
    assert value(samples, "blink_cache_evictions_total") >= 4
    assert value(samples, "blink_cache_entries") == 2


async def test_no_cache_bypasses_the_lookup_and_no_store_keeps_nothing(bundle_dir):
    async with running_app(Settings(model=bundle_dir, threads=1, cache_bytes=CACHE_BYTES)) as c:
        fresh = await post(c, headers={"cache-control": "no-store"})
        after_no_store = await post(c)
        bypass = await post(c, headers={"cache-control": "no-cache"})
        hit = await post(c)
        samples = await metrics(c)
    assert fresh.headers["x-cache"] == "bypass"
    assert after_no_store.headers["x-cache"] == "miss"
    assert bypass.headers["x-cache"] == "bypass" and "decode" in bypass.headers["server-timing"]
    assert hit.headers["x-cache"] == "hit"
    assert value(samples, "blink_cache_lookups_total", result="bypass") == 2
    assert value(samples, "blink_batch_size_sum") == 3


async def test_a_reload_empties_the_models_cache(bundle_dir, tmp_path):
    repository = tmp_path / "tiny"
    for version in ("1", "2"):
        add_version(repository, bundle_dir, version)
    point_latest(repository, "1")
    settings = Settings(model=repository, threads=1, cache_bytes=CACHE_BYTES)
    async with running_app(settings) as c:
        await post(c)
        assert (await post(c)).headers["x-cache"] == "hit"
        point_latest(repository, "2")
        outcome = await c.app.state.registry.default.reload("test")  # type: ignore[attr-defined]
        emptied = value(await metrics(c), "blink_cache_entries")
        after = await post(c)
    assert outcome.result == "success"
    assert emptied == 0
    assert after.headers["x-cache"] == "miss" and after.json()["model"]["version"] == "2"


async def test_identical_concurrent_misses_run_once(slow_bundle_dir):
    settings = Settings(model=slow_bundle_dir, threads=1, cache_bytes=CACHE_BYTES)
    async with running_app(settings) as c:
        replies = await asyncio.gather(*(post(c, 3) for _ in range(12)))
        samples = await metrics(c)
    assert len({r.content for r in replies}) == 1
    assert sorted(r.headers["x-cache"] for r in replies) == ["coalesced"] * 11 + ["miss"]
    assert value(samples, "blink_batch_size_sum") == 1  # one image ran, for twelve requests
    assert value(samples, "blink_cache_lookups_total", result="coalesced") == 11
