"""Shadow and canary versions: what the shadow is sent and how it is counted, what the canary
answers, how both start and stop (settings, admin routes, promotion)."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydantic import ValidationError

from app import candidate
from app.bundle import load_bundle, point_latest
from app.candidate_spec import CandidateSpec, parse_candidates
from app.engine import Engine
from app.preprocess import Preprocessor
from app.settings import Settings
from loadtest.versions import add_version
from tests.conftest import running_app
from tests.images import png
from tests.metrics_text import parse, value
from tests.onnx_models import write_bundle
from tests.test_monitor import varied
from tests.test_v2_errors import image_request

PNG = {"content-type": "image/png"}
TOKEN = {"authorization": "Bearer s3cret"}


@pytest.fixture
def two_versions(tmp_path: Path, bundle_dir: Path) -> Path:
    """`tiny` at version 1 (latest) and a differently trained version 2 beside it."""
    repo = tmp_path / "tiny"
    add_version(repo, bundle_dir, "1")
    write_bundle(repo / "2", seed=7, version="2")
    point_latest(repo, "1")
    return repo


def top1(bundle: Path, variant: str, bodies: list[bytes]) -> np.ndarray:
    """The labels a bundle's variant answers for `bodies`, computed offline."""
    loaded = load_bundle(bundle)
    preprocessor = Preprocessor(loaded.manifest.input, 10**7)
    engine = Engine(loaded, device="cpu", variant=variant, threads=1)
    tensors = np.concatenate([preprocessor.to_tensor(preprocessor.open_image(b)) for b in bodies])
    labels = np.asarray(loaded.manifest.labels)
    return labels[engine.run(tensors).argmax(axis=1)]


async def scraped(client: httpx.AsyncClient) -> dict:
    return parse((await client.get("/metrics")).text)


async def wait_compared(client: httpx.AsyncClient, count: int, timeout: float = 30) -> dict:
    """/v1/models's shadow once it has compared `count` answers (or failed or shed them)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        shadow = (await client.get("/v1/models")).json()["models"][0]["shadow"]
        if shadow["compared"] + shadow["shed"] + shadow["failed"] >= count:
            return shadow
        assert asyncio.get_running_loop().time() < deadline, shadow
        await asyncio.sleep(0.01)


# -- the settings' grammar -----------------------------------------------------------------------


def test_candidate_settings_name_model_version_and_fraction():
    assert parse_candidates("2", fraction_required=False) == [CandidateSpec(None, "2", 1.0)]
    assert parse_candidates("a=2@0.1, b=/x/b=1@1", fraction_required=True) == [
        CandidateSpec("a", "2", 0.1),
        CandidateSpec("b", "/x/b=1", 1.0),
    ]
    for wrong, why in [
        ("2", "name the fraction"),  # a canary says how much it answers
        ("a=2@0", "above 0"),
        ("a=2@nan", "above 0"),
        ("a=@0.5", "version directory or a bundle path"),
        ("a=1@0.1,a=2@0.2", "one candidate per model"),
    ]:
        with pytest.raises(ValidationError, match=why):
            Settings(canary=wrong)


# -- shadow --------------------------------------------------------------------------------------


async def test_shadow_at_100_percent_agrees_exactly_as_offline_and_is_no_client_request(
    two_versions,
):
    bodies = [varied(seed) for seed in range(80)]
    settings = Settings(model=two_versions, threads=1, shadow="2", model_variant="fp32")
    async with running_app(settings) as client:
        model = (await client.get("/v1/models")).json()["models"][0]
        assert model["shadow"]["version"] == "2" and model["shadow"]["series"] == "tiny:shadow"
        answers = []
        for sent, body in enumerate(bodies, 1):  # on an idle service: each mirror is run first
            answers.append(await client.post("/classify", content=body, headers=PNG))
            shadow = await wait_compared(client, sent)
        samples = await scraped(client)
    served = np.asarray([a.json()["predictions"][0]["label"] for a in answers])
    assert {a.json()["model"]["version"] for a in answers} == {"1"}
    variant = model["variant"]
    assert (served == top1(two_versions / "1", variant, bodies)).all()  # answers unchanged
    agreed = int((served == top1(two_versions / "2", variant, bodies)).sum())
    assert 0 < agreed < len(bodies)  # two different models: the comparison means something
    assert shadow["compared"] == len(bodies) and shadow["shed"] == shadow["failed"] == 0
    assert value(samples, "blink_shadow_requests_total", model="tiny", result="compared") == 80
    assert value(samples, "blink_shadow_agreements_total", model="tiny") == agreed
    assert shadow["agreement"] == pytest.approx(agreed / len(bodies), abs=1e-6)
    # the accounting: 80 client requests, all under the serving model, none under the shadow
    assert value(samples, "blink_requests_total", route="/classify", status="200") == 80
    assert value(samples, "blink_requests_total", model="tiny:shadow") == 0
    assert value(samples, "blink_batch_size_sum", model="tiny:shadow") == 80  # it computed them
    for role in ("serving", "shadow"):
        assert value(samples, "blink_shadow_latency_seconds_count", role=role) == 80


async def test_the_answer_does_not_wait_for_a_slow_shadow(tmp_path, bundle_dir):
    repo = tmp_path / "tiny"
    add_version(repo, bundle_dir, "1")
    write_bundle(repo / "slow", slow_matmul=2048, version="slow")  # tens of ms per batch
    point_latest(repo, "1")
    async with running_app(Settings(model=repo, threads=1, shadow="slow")) as client:
        answer = await client.post("/classify", content=png(), headers=PNG)
        at_answer = (await client.get("/v1/models")).json()["models"][0]["shadow"]
        later = await wait_compared(client, 1)
    assert answer.status_code == 200 and answer.json()["model"]["version"] == "1"
    assert at_answer["compared"] == 0  # the answer went out while the shadow still computed
    assert later["compared"] == 1


async def test_shadow_is_shed_while_the_serving_version_is_busy(tmp_path, slow_bundle_dir):
    repo = tmp_path / "slow"
    add_version(repo, slow_bundle_dir, "1")
    add_version(repo, slow_bundle_dir, "2")
    point_latest(repo, "1")
    settings = Settings(model=repo, threads=1, shadow="2", max_batch_size=4)
    async with running_app(settings) as client:
        answers = await asyncio.gather(
            *(client.post("/classify", content=png(i), headers=PNG) for i in range(24))
        )
        shadow = await wait_compared(client, 24)
    assert [a.status_code for a in answers] == [200] * 24
    assert shadow["shed"] > 0  # requests queued behind busy batches: no mirror for those
    assert shadow["compared"] + shadow["shed"] == 24 and shadow["failed"] == 0
    assert shadow["agreement"] == 1.0  # the same model


async def test_shadow_computes_in_the_idle_class_and_backs_off_when_it_waits_for_a_core(
    bundle_dir, monkeypatch
):
    # Woken later than it asked, the thread waited for a core: here every wake counts as late.
    monkeypatch.setattr(candidate, "SHADOW_LATE_WAKE_S", -1.0)
    monkeypatch.setattr(candidate, "SHADOW_BACK_OFF_S", 0.05)
    async with running_app(Settings(model=bundle_dir, threads=1, shadow=str(bundle_dir))) as client:
        answers = [await client.post("/classify", content=png(i), headers=PNG) for i in range(6)]
        shadow = await wait_compared(client, 6)  # the thread has run: its class is set
        (thread,) = [t for t in threading.enumerate() if t.name == "blink-shadow"]
        if sys.platform == "linux":
            assert os.sched_getscheduler(thread.native_id) == os.SCHED_IDLE
    assert [a.status_code for a in answers] == [200] * 6
    assert shadow["compared"] == shadow["failed"] == 0 and shadow["shed"] == 6


async def test_shadow_of_another_bundle_decodes_for_its_own_input(tmp_path, bundle_dir):
    other = write_bundle(tmp_path / "rgb" / "1", channels=3, size=32, name="rgb")
    async with running_app(Settings(model=bundle_dir, threads=1, shadow=str(other))) as client:
        answers = [await client.post("/classify", content=png(i), headers=PNG) for i in range(5)]
        shadow = await wait_compared(client, 5)
    assert [a.status_code for a in answers] == [200] * 5
    assert shadow["compared"] == 5 and shadow["candidate"] == str(other)


async def test_v2_requests_are_mirrored_too_and_a_reload_keeps_the_shadow(two_versions):
    settings = Settings(model=two_versions, threads=1, shadow="1", admin_token="s3cret")
    async with running_app(settings) as client:
        v2 = await client.post("/v2/models/tiny/infer", **image_request(png(1), png(2), png(3)))
        point_latest(two_versions, "2")
        reloaded = await client.post("/admin/reload", headers=TOKEN)
        answer = await client.post("/classify", content=png(4), headers=PNG)
        shadow = await wait_compared(client, 4)
    assert v2.status_code == 200 and reloaded.json()["version"] == "2"
    assert answer.json()["model"]["version"] == "2"
    assert shadow["compared"] == 4 and shadow["version"] == "1"  # still there, after the reload


# -- canary --------------------------------------------------------------------------------------


async def test_canary_answers_its_share_and_a_key_always_sees_the_same_version(two_versions):
    settings = Settings(model=two_versions, threads=1, canary="2@0.3")
    async with running_app(settings) as client:

        async def version(key: str | None, seed: int) -> str:
            headers = {**PNG, **({"x-canary-key": key} if key is not None else {})}
            answer = await client.post("/classify", content=png(seed), headers=headers)
            assert answer.status_code == 200
            return answer.json()["model"]["version"]

        by_key = {f"camera-{k}": await version(f"camera-{k}", k) for k in range(200)}
        again = {key: await version(key, 1000 + i) for i, key in enumerate(list(by_key)[:40])}
        unkeyed = [await version(None, 2000 + i) for i in range(200)]
        v2_answer = await client.post("/v2/models/tiny/versions/2/infer", **image_request(png(3)))
        samples = await scraped(client)
        listed = (await client.get("/v1/models")).json()["models"][0]["canary"]
    assert all(by_key[key] == version for key, version in again.items())  # sticky
    # 30% of 200: 60 ± 6.5; these bounds are 4.6 standard deviations away
    assert 0.15 < list(by_key.values()).count("2") / 200 < 0.45
    assert 0.15 < unkeyed.count("2") / 200 < 0.45
    assert v2_answer.status_code == 200 and v2_answer.json()["model_version"] == "2"
    canary_answers = list(by_key.values()).count("2") + list(again.values()).count("2")
    canary_answers += unkeyed.count("2") + 1
    # every request counted once: the canary's under its own series
    assert value(samples, "blink_requests_total", model="tiny:canary", status="200") == (
        canary_answers
    )
    assert value(samples, "blink_requests_total", status="200") == 441
    assert listed == {"version": "2", "candidate": "2", "fraction": 0.3, "series": "tiny:canary"}


# -- starting, stopping, promoting ---------------------------------------------------------------


async def test_admin_starts_and_stops_candidates_and_promotion_ends_them(two_versions):
    add_version(two_versions, two_versions / "1", "3", fault="bad_labels")
    settings = Settings(model=two_versions, threads=1, admin_token="s3cret", canary="9@0.5")
    async with running_app(settings) as client:
        errors = (await client.get("/v1/models")).json()["models"][0]["candidate_errors"]
        anonymous = await client.post("/admin/shadow", params={"version": "2"})
        missing = await client.post("/admin/shadow", params={"version": "9"}, headers=TOKEN)
        broken = await client.post("/admin/shadow", params={"version": "3"}, headers=TOKEN)
        bad_fraction = await client.post(
            "/admin/canary", params={"version": "2", "fraction": "2"}, headers=TOKEN
        )
        unknown = await client.post(
            "/admin/shadow", params={"version": "2", "model": "nope"}, headers=TOKEN
        )
        await client.post("/admin/shadow", params={"version": "1"}, headers=TOKEN)
        started = await client.post(  # replaces the first: its series go on
            "/admin/shadow", params={"version": "2", "fraction": "0.5"}, headers=TOKEN
        )
        canary = await client.post(
            "/admin/canary", params={"version": "2", "fraction": "1"}, headers=TOKEN
        )
        by_canary = await client.post("/classify", content=png(), headers=PNG)
        series_on = await scraped(client)
        stopped = await client.delete("/admin/canary", headers=TOKEN)
        by_serving = await client.post("/classify", content=png(), headers=PNG)
        series_off = await scraped(client)
        promoted = await client.post(
            "/admin/promote", params={"model": "tiny", "version": "2"}, headers=TOKEN
        )
        after = (await client.get("/v1/models")).json()["models"][0]
    assert "9" in errors["canary"]
    assert anonymous.status_code == 401
    assert missing.status_code == 422 and "no bundle '9'" in missing.json()["error"]["message"]
    assert broken.status_code == 422 and "labels" in broken.json()["error"]["message"]
    assert bad_fraction.status_code == 422
    assert unknown.status_code == 404
    assert started.status_code == 200 and started.json()["shadow"]["fraction"] == 0.5
    assert canary.json()["canary"]["version"] == "2"
    assert by_canary.json()["model"]["version"] == "2"
    assert value(series_on, "blink_ready", model="tiny:canary") == 1
    assert value(series_on, "blink_ready", model="tiny:shadow") == 1
    assert stopped.json()["canary"] is None and stopped.json()["shadow"] is not None
    assert by_serving.json()["model"]["version"] == "1"
    assert not [k for k in series_off if ("model", "tiny:canary") in k[1]]  # its series went
    assert promoted.status_code == 200
    assert after["version"] == "2" and after["shadow"] is None  # it serves now: shadow done
