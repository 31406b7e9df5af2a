"""Many models in one service: a repository of real bundles served by the real app.

Two different models answer on their own routes with the answers their single-model servers
give; one reloads while the other is under load; a broken bundle sits beside a good one; bundles
come and go while the service runs; V2 serves each with the Triton client.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton

from app.bundle import point_latest
from app.settings import Settings
from loadtest.versions import add_version
from tests.conftest import live_server, running_app
from tests.images import png
from tests.metrics_text import parse, scrape, value
from tests.onnx_models import write_bundle

PNG = {"content-type": "image/png"}
SHIRTS = [f"shirt-{i}" for i in range(4)]


@pytest.fixture(scope="module")
def two_bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two models that differ in everything: input, classes and weights."""
    root = tmp_path_factory.mktemp("sources")
    grey = write_bundle(root / "grey" / "1", name="grey")
    colour = write_bundle(
        root / "colour" / "1", name="colour", channels=3, size=16, labels=SHIRTS, seed=7
    )
    return grey, colour


def make_repository(root: Path, sources: dict[str, Path], version: str = "1") -> Path:
    repository = root / "repository"
    for name, source in sources.items():
        add_version(repository / name, source, version)
        point_latest(repository / name, version)
    return repository


@pytest.fixture
def repository(tmp_path: Path, two_bundles: tuple[Path, Path]) -> Path:
    grey, colour = two_bundles
    return make_repository(tmp_path, {"grey": grey, "colour": colour})


async def answers(client: httpx.AsyncClient, path: str, seeds: range) -> list[dict]:
    replies = []
    for seed in seeds:
        response = await client.post(path, content=png(seed, size=20), headers=PNG)
        assert response.status_code == 200, response.text
        replies.append(response.json())
    return replies


async def test_each_model_answers_on_its_own_route_as_its_own_server_does(repository):
    settings = Settings(repository=repository, threads=1)
    async with running_app(settings) as client:
        grey = await answers(client, "/models/grey/classify", range(6))
        colour = await answers(client, "/models/colour/classify", range(6))
        listed = (await client.get("/v1/models")).json()
        ready = (await client.get("/readyz")).json()
        no_default = await client.post("/classify", content=png(0), headers=PNG)
        unknown = await client.post("/models/nope/classify", content=png(0), headers=PNG)
    for name, served in (("grey", grey), ("colour", colour)):
        async with running_app(Settings(model=repository / name, threads=1)) as alone:
            expected = await answers(alone, "/classify", range(6))
        assert [a["predictions"] for a in served] == [a["predictions"] for a in expected]
        assert {a["model"]["name"] for a in served} == {name}
    assert {p["label"] for a in colour for p in a["predictions"]} <= set(SHIRTS)
    assert [(m["name"], m["ready"], m["default"]) for m in listed["models"]] == [
        ("colour", True, False),
        ("grey", True, False),
    ]
    assert listed["failed"] == []
    assert ready["model"] is None
    assert [m["name"] for m in ready["models"]] == ["colour", "grey"]
    assert no_default.status_code == 404
    assert "BLINK_DEFAULT_MODEL" in no_default.json()["error"]["message"]
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "model_not_found"
    assert "colour, grey" in unknown.json()["error"]["message"]


async def test_the_default_model_answers_classify(repository):
    settings = Settings(repository=repository, default_model="colour", threads=1)
    async with running_app(settings) as client:
        plain = await answers(client, "/classify", range(3))
        named = await answers(client, "/models/colour/classify", range(3))
        listed = (await client.get("/v1/models")).json()["models"]
    assert plain == named
    assert [m["name"] for m in listed if m["default"]] == ["colour"]


def test_model_and_repository_together_are_refused(repository):
    with pytest.raises(ValueError, match="either model"):
        Settings(model=repository / "grey", repository=repository)


async def test_one_model_reloads_while_the_other_is_under_load(repository, two_bundles):
    grey_source, _ = two_bundles
    add_version(repository / "grey", grey_source, "2")
    settings = Settings(repository=repository, threads=1, max_batch_size=4)
    async with running_app(settings) as client:
        statuses: dict[str, list[int]] = {"grey": [], "colour": []}
        versions: list[str] = []
        stop = asyncio.Event()

        async def user(name: str, seed: int) -> None:
            while not stop.is_set():
                response = await client.post(
                    f"/models/{name}/classify", content=png(seed), headers=PNG
                )
                statuses[name].append(response.status_code)
                if name == "grey" and response.status_code == 200:
                    versions.append(response.json()["model"]["version"])

        users = [asyncio.create_task(user(n, s)) for n in statuses for s in range(4)]
        await asyncio.sleep(0.3)
        point_latest(repository / "grey", "2")
        registry = client.app.state.registry  # type: ignore[attr-defined]
        (outcome,) = await registry.scan("watch")
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*users)
        samples = parse((await client.get("/metrics")).text)
    assert outcome.result == "success" and outcome.version == "2"
    assert set(statuses["grey"]) == {200} and set(statuses["colour"]) == {200}
    assert len(statuses["colour"]) > 20
    assert versions[0] == "1" and versions[-1] == "2"
    assert value(samples, "blink_model_reloads_total", model="grey", result="success") == 1
    assert value(samples, "blink_model_reloads_total", model="colour", result="success") == 0


async def test_a_broken_bundle_beside_a_good_one_is_reported_and_the_good_one_serves(
    tmp_path, two_bundles
):
    grey, colour = two_bundles
    repository = make_repository(tmp_path, {"grey": grey})
    add_version(repository / "colour", colour, "1", fault="bad_hash")
    point_latest(repository / "colour", "1")
    async with running_app(Settings(repository=repository, threads=1)) as client:
        ready = await client.get("/readyz")
        good = await client.post("/classify", content=png(0), headers=PNG)  # the only one served
        broken = await client.post("/models/colour/classify", content=png(0), headers=PNG)
        listed = (await client.get("/v1/models")).json()
        samples = parse((await client.get("/metrics")).text)
        # the broken bundle is taken away: it is no longer reported, and its series go
        shutil.rmtree(repository / "colour")
        await client.app.state.registry.scan("watch")  # type: ignore[attr-defined]
        after = parse((await client.get("/metrics")).text)
        failed_after = (await client.get("/readyz")).json()["failed"]
    assert failed_after == {}
    assert not [key for key in after if ("model", "colour") in key[1]]
    assert ready.status_code == 200
    assert "sha256" in ready.json()["failed"]["colour"]
    assert good.status_code == 200 and good.json()["model"]["name"] == "grey"
    assert broken.status_code == 404 and "sha256" in broken.json()["error"]["message"]
    assert [f["name"] for f in listed["failed"]] == ["colour"]
    assert value(samples, "blink_model_reloads_total", model="colour", result="load_failed") == 1
    assert value(samples, "blink_ready", model="colour") == 0
    assert value(samples, "blink_ready", model="grey") == 1
    assert value(samples, "blink_worker_ready") == 1


async def test_bundles_added_and_removed_at_run_time(tmp_path, two_bundles):
    grey, colour = two_bundles
    repository = make_repository(tmp_path, {"grey": grey})
    settings = Settings(repository=repository, threads=1, watch_interval_s=0.05)
    async with running_app(settings) as client:
        assert (await client.post("/models/colour/classify", content=png(0))).status_code == 404
        # a bundle appears: written beside the repository, then moved in whole
        staging = make_repository(tmp_path / "staging", {"colour": colour})
        (staging / "colour").rename(repository / "colour")
        response = await wait_for_status(client, "/models/colour/classify", 200)
        assert response.json()["model"]["name"] == "colour"

        # under load, it goes: requests already accepted are answered, later ones are 404
        statuses: list[int] = []

        async def user(seed: int) -> None:
            for _ in range(200):
                reply = await client.post("/models/colour/classify", content=png(seed))
                statuses.append(reply.status_code)
                if reply.status_code == 404:
                    return

        users = [asyncio.create_task(user(s)) for s in range(4)]
        await asyncio.sleep(0.1)
        shutil.rmtree(repository / "colour")
        await asyncio.gather(*users)
        listed = (await client.get("/v1/models")).json()["models"]
        for _ in range(200):  # its series go once its last requests are answered
            samples = parse((await client.get("/metrics")).text)
            if not [key for key in samples if ("model", "colour") in key[1]]:
                break
            await asyncio.sleep(0.01)
    assert set(statuses) == {200, 404}  # nothing failed on the way out
    assert statuses.index(404) > 0
    assert [m["name"] for m in listed] == ["grey"]
    # only models that exist have series: the removed one's are gone
    assert not [key for key in samples if ("model", "colour") in key[1]]


async def wait_for_status(client: httpx.AsyncClient, path: str, status: int) -> httpx.Response:
    for _ in range(400):
        response = await client.post(path, content=png(0), headers=PNG)
        if response.status_code == status:
            return response
        await asyncio.sleep(0.025)
    raise AssertionError(f"{path} never answered {status}: {response.status_code} {response.text}")


@pytest.fixture(scope="module")
def repository_server(
    tmp_path_factory: pytest.TempPathFactory, two_bundles: tuple[Path, Path]
) -> Iterator[str]:
    grey, colour = two_bundles
    root = tmp_path_factory.mktemp("served")
    repository = make_repository(root, {"grey": grey, "colour": colour})
    with live_server(repository, threads=1, repository=repository) as url:
        yield url


def test_v2_serves_each_model_to_the_triton_client(repository_server):
    client = triton.InferenceServerClient(repository_server.removeprefix("http://"))
    try:
        assert client.is_server_ready()
        for name, classes in (("grey", 10), ("colour", len(SHIRTS))):
            assert client.is_model_ready(name)
            assert client.get_model_metadata(name)["name"] == name
            image = triton.InferInput("image", [2], "BYTES")
            image.set_data_from_numpy(np.array([png(1), png(2)], dtype=object))
            result = client.infer(name, [image], outputs=[triton.InferRequestedOutput("logits")])
            assert result.as_numpy("logits").shape == (2, classes)
            assert result.get_response()["model_name"] == name
        assert not client.is_model_ready("nope")
    finally:
        client.close()
    samples = scrape(repository_server)
    for name in ("grey", "colour"):
        labels = {"model": name, "route": "/v2/models/{name}/infer", "status": "200"}
        assert value(samples, "blink_requests_total", **labels) == 1


def test_every_worker_serves_every_model(tmp_path, two_bundles):
    grey, colour = two_bundles
    repository = make_repository(tmp_path, {"grey": grey, "colour": colour})
    with live_server(repository, threads=1, workers=2, repository=repository) as url:
        ready = httpx.get(url + "/readyz", timeout=10).json()
        for name in ("grey", "colour"):
            for seed in range(8):  # spread over both workers
                response = httpx.post(
                    f"{url}/models/{name}/classify", content=png(seed), headers=PNG, timeout=10
                )
                assert response.status_code == 200, response.text
                assert response.json()["model"]["name"] == name
        listed = httpx.get(url + "/v1/models", timeout=10).json()
    served = {(w["pid"], w["name"]) for w in ready["workers"]}
    pids = {pid for pid, _ in served}
    assert len(pids) == 2 and served == {(p, n) for p in pids for n in ("grey", "colour")}
    assert [m["name"] for m in listed["models"]] == ["colour", "grey"]
