"""Promotion: `blink promote MODEL VERSION` and `POST /admin/promote` move a model's `latest`
to a version that can serve, and rollback is promoting the previous one."""

from __future__ import annotations

import os

from app.cli import main as blink
from app.settings import Settings
from loadtest.versions import add_version
from tests.conftest import running_app
from tests.images import png
from tests.test_reload import repository

PNG = {"content-type": "image/png"}
TOKEN = {"authorization": "Bearer s3cret"}


def test_promote_moves_latest_and_the_previous_version_rolls_back(bundle_dir, tmp_path, capsys):
    repo = repository(tmp_path, bundle_dir, "1", "2")
    add_version(repo, bundle_dir, "3", fault="bad_hash")
    by_name = ["--repository", str(tmp_path)]
    assert blink(["promote", "tiny", "2", *by_name]) == 0
    assert os.readlink(repo / "latest") == "2"
    assert "blink promote tiny 1" in capsys.readouterr().out  # how to roll back
    assert blink(["promote", str(repo), "1"]) == 0  # the rollback, by path
    assert os.readlink(repo / "latest") == "1"
    assert blink(["promote", "tiny", "3", *by_name]) == 2  # its hash does not match: refused
    assert "sha256" in capsys.readouterr().err
    assert blink(["promote", "tiny", "9", *by_name]) == 2
    assert "versions: 1, 2, 3" in capsys.readouterr().err
    assert os.readlink(repo / "latest") == "1"  # nothing moved


async def test_admin_promote_serves_the_version_and_refuses_a_broken_one(bundle_dir, tmp_path):
    repo = repository(tmp_path, bundle_dir, "1", "2")
    add_version(repo, bundle_dir, "3", fault="bad_labels")  # loads, then fails its warm-up
    async with running_app(Settings(model=repo, threads=1, admin_token="s3cret")) as client:
        anonymous = await client.post("/admin/promote", params={"model": "tiny", "version": "2"})
        promoted = await client.post(
            "/admin/promote", params={"model": "tiny", "version": "2"}, headers=TOKEN
        )
        served = await client.post("/classify", content=png(), headers=PNG)
        broken = await client.post(
            "/admin/promote", params={"model": "tiny", "version": "3"}, headers=TOKEN
        )
        still = await client.post("/classify", content=png(), headers=PNG)
        unknown = await client.post(
            "/admin/promote", params={"model": "nope", "version": "2"}, headers=TOKEN
        )
        missing = await client.post(
            "/admin/promote", params={"model": "tiny", "version": "9"}, headers=TOKEN
        )
    assert anonymous.status_code == 401
    assert promoted.status_code == 200 and promoted.json()["previous"] == "1"
    assert promoted.json()["model"] == "tiny" and promoted.json()["version"] == "2"
    assert served.json()["model"]["version"] == "2"
    assert broken.status_code == 422 and broken.json()["result"] == "warm_up_failed"
    assert os.readlink(repo / "latest") == "2"  # moved back to the version that serves
    assert still.json()["model"]["version"] == "2"
    assert unknown.status_code == 404
    assert missing.status_code == 422 and "versions: 1, 2, 3" in missing.json()["error"]["message"]
