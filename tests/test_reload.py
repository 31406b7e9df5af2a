"""Model reload without a restart, against the real app and real bundles.

A repository holds versions copied from the test bundles (loadtest/versions.py); `latest` moves
as `blink build` moves it. A good version is swapped in under load with no failed request, and
answers name the version that served them; requests in flight finish on the version they
started on; a broken version (bad hash, not ONNX, failing warm-up) never replaces the serving one
and is counted with its result.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import time
import weakref
from pathlib import Path

import httpx
import pytest

from app.bundle import point_latest
from app.settings import Settings
from loadtest.versions import FAULTS, add_version
from tests.conftest import live_server, running_app
from tests.images import png
from tests.metrics_text import parse, scrape, value

PNG = {"content-type": "image/png"}


def repository(root: Path, source: Path, *versions: str) -> Path:
    repo = root / "tiny"
    for version in versions:
        add_version(repo, source, version)
    point_latest(repo, versions[0])
    return repo


async def classify(client: httpx.AsyncClient, seed: int = 0) -> tuple[int, str | None]:
    response = await client.post("/classify", content=png(seed), headers=PNG)
    version = response.json()["model"]["version"] if response.status_code == 200 else None
    return response.status_code, version


async def metrics(client: httpx.AsyncClient) -> dict:
    return parse((await client.get("/metrics")).text)


async def test_good_version_is_swapped_in_under_load_without_a_failed_request(bundle_dir, tmp_path):
    repo = repository(tmp_path, bundle_dir, "1", "2")
    async with running_app(Settings(model=repo, threads=1, max_batch_size=4)) as client:
        answers: list[tuple[int, str | None, bool]] = []  # status, version, sent after the swap
        stop, swapped = asyncio.Event(), asyncio.Event()

        async def user(seed: int) -> None:
            while not stop.is_set():
                after = swapped.is_set()
                answers.append((*await classify(client, seed), after))

        users = [asyncio.create_task(user(i)) for i in range(8)]
        await asyncio.sleep(0.3)
        point_latest(repo, "2")
        outcome = await client.app.state.registry.default.reload("test")
        swapped.set()
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*users)
        samples = await metrics(client)
        models = (await client.get("/v1/models")).json()
        ready = (await client.get("/readyz")).json()
    assert outcome.result == "success" and outcome.previous == "1" and outcome.version == "2"
    assert {status for status, _, _ in answers} == {200}
    assert "1" in {v for _, v, after in answers if not after}
    assert {v for _, v, after in answers if after} == {"2"}
    assert value(samples, "blink_model_reloads_total", result="success") == 1
    info = {dict(k[1])["version"]: v for k, v in samples.items() if k[0] == "blink_model_info"}
    assert info == {"2": 1}, "only the serving version is named"
    assert models["models"][0]["version"] == "2"
    assert [w["version"] for w in models["workers"]] == ["2"]
    assert ready["model"]["version"] == "2"


async def test_requests_in_flight_finish_on_the_version_they_started_on(
    slow_bundle_dir, bundle_dir, tmp_path
):
    repo = tmp_path / "tiny"
    add_version(repo, slow_bundle_dir, "slow")  # tens of milliseconds a batch
    add_version(repo, bundle_dir, "fast")
    point_latest(repo, "slow")
    settings = Settings(model=repo, threads=1, max_batch_size=1, request_timeout_ms=30_000)
    async with running_app(settings) as client:
        old = client.app.state.registry.default.current
        early = [asyncio.create_task(classify(client, i)) for i in range(6)]
        while old.active_requests < 6:  # all six read, decoded and queued on the old version
            await asyncio.sleep(0.001)
        point_latest(repo, "fast")
        outcome = await client.app.state.registry.default.reload("test")
        assert not all(t.done() for t in early), "the swap came before the old queue drained"
        late = await classify(client)
        answers = await asyncio.gather(*early)
        for _ in range(200):  # the old version closes once drained
            if old not in client.app.state.registry.default._draining:
                break
            await asyncio.sleep(0.01)
    assert outcome.result == "success"
    assert answers == [(200, "slow")] * 6
    assert late == (200, "fast")
    assert old not in client.app.state.registry.default._draining


@pytest.mark.parametrize("fault", sorted(FAULTS))
async def test_broken_version_never_replaces_the_serving_one(bundle_dir, tmp_path, fault):
    repo = repository(tmp_path, bundle_dir, "1")
    add_version(repo, bundle_dir, "2", fault=fault)
    async with running_app(Settings(model=repo, threads=1, max_batch_size=4)) as client:
        point_latest(repo, "2")
        outcome = await client.app.state.registry.default.reload("test")
        after = await classify(client)
        ready = await client.get("/readyz")
        samples = await metrics(client)
    expected = "warm_up_failed" if fault == "bad_labels" else "load_failed"
    assert outcome.result == expected and outcome.version == "1", outcome
    assert outcome.error
    assert after == (200, "1")
    assert ready.status_code == 200 and ready.json()["model"]["version"] == "1"
    assert value(samples, "blink_model_reloads_total", result=expected) == 1
    assert value(samples, "blink_model_reloads_total", result="success") == 0
    assert value(samples, "blink_ready") == 1


async def test_watcher_follows_the_pointer_and_does_not_retry_a_broken_version(
    bundle_dir, tmp_path
):
    repo = repository(tmp_path, bundle_dir, "1", "3")
    add_version(repo, bundle_dir, "2", fault="bad_hash")
    settings = Settings(model=repo, threads=1, max_batch_size=4, watch_interval_s=0.02)
    async with running_app(settings) as client:

        async def wait_for_reloads(result: str) -> dict:
            for _ in range(500):
                samples = await metrics(client)
                if value(samples, "blink_model_reloads_total", result=result) >= 1:
                    return samples
                await asyncio.sleep(0.01)
            raise AssertionError(f"no reload with result {result}")

        point_latest(repo, "2")
        await wait_for_reloads("load_failed")
        await asyncio.sleep(0.2)  # ten more looks at the same broken version
        broken = await metrics(client)
        still = await classify(client)
        point_latest(repo, "3")
        await wait_for_reloads("success")
        moved = await classify(client)
    assert value(broken, "blink_model_reloads_total", result="load_failed") == 1
    assert still == (200, "1") and moved == (200, "3")


async def test_admin_reload_exists_only_with_a_token_and_checks_it(bundle_dir, tmp_path):
    repo = repository(tmp_path, bundle_dir, "1", "2")
    async with running_app(Settings(model=repo, threads=1)) as client:
        assert (await client.post("/admin/reload")).status_code == 404
    async with running_app(Settings(model=repo, threads=1, admin_token="s3cret")) as client:
        anonymous = await client.post("/admin/reload")
        wrong = await client.post("/admin/reload", headers={"authorization": "Bearer guess"})
        unchanged = await client.post("/admin/reload", headers={"authorization": "Bearer s3cret"})
        point_latest(repo, "2")
        moved = await client.post("/admin/reload", headers={"authorization": "Bearer s3cret"})
        after = await classify(client)
    assert anonymous.status_code == wrong.status_code == 401
    assert anonymous.json()["error"]["code"] == "unauthorized"
    assert unchanged.status_code == 200 and unchanged.json()["result"] == "unchanged"
    assert moved.status_code == 200 and moved.json()["result"] == "success"
    assert moved.json()["previous"] == "1" and after == (200, "2")


def test_sighup_reloads_a_running_server(bundle_dir, tmp_path):
    repo = repository(tmp_path, bundle_dir, "1", "2")
    with live_server(repo, threads=1) as url:
        assert (
            httpx.post(url + "/classify", content=png(), headers=PNG).json()["model"]["version"]
            == "1"
        )
        point_latest(repo, "2")
        pid = httpx.get(url + "/readyz").json()["workers"][0]["pid"]
        os.kill(pid, signal.SIGHUP)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if value(scrape(url), "blink_model_reloads_total", result="success") == 1:
                break
            time.sleep(0.05)
        answer = httpx.post(url + "/classify", content=png(), headers=PNG).json()
    assert answer["model"]["version"] == "2"


@pytest.mark.slow
def test_every_worker_moves_and_says_which_version_it_serves(bundle_dir, tmp_path):
    repo = repository(tmp_path, bundle_dir, "1", "2")
    env = {"TMPDIR": str(tmp_path)}
    with live_server(repo, workers=2, threads=1, watch_interval_s=0.05, env=env) as url:
        before = httpx.get(url + "/readyz").json()["workers"]
        point_latest(repo, "2")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            workers = httpx.get(url + "/v1/models").json()["workers"]
            if [w["version"] for w in workers] == ["2", "2"]:
                break
            time.sleep(0.05)
        samples = scrape(url)
        answers = {
            httpx.post(url + "/classify", content=png(i), headers=PNG).json()["model"]["version"]
            for i in range(10)
        }
    assert [w["version"] for w in before] == ["1", "1"]
    assert [w["version"] for w in workers] == ["2", "2"]
    assert value(samples, "blink_model_reloads_total", result="success") == 2
    assert answers == {"2"}


async def test_a_retired_version_is_freed(bundle_dir, tmp_path):
    """The first version is frozen out of the collector's reach at start-up (gc.freeze), so only
    reference counting can free it: nothing may keep it, nor may it hold itself in a cycle."""
    repo = repository(tmp_path, bundle_dir, "1", "2", "3")
    async with running_app(Settings(model=repo, threads=1)) as client:
        host = client.app.state.registry.default
        retired = []
        for version in ("2", "3"):
            retired.append(weakref.ref(host.current))
            point_latest(repo, version)
            assert (await host.reload("test")).result == "success"
        for _ in range(200):
            if not host._draining:
                break
            await asyncio.sleep(0.01)
        gc.collect()
        assert [ref() for ref in retired] == [None, None]
        assert await classify(client) == (200, "3")
