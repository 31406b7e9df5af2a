"""Shared fixtures: tiny real bundles, the in-process app, and real uvicorn servers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from asgi_lifespan import LifespanManager

from app.main import create_app
from app.settings import Settings
from loadtest.processes import free_port, stop_process
from tests.onnx_models import write_bundle

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 30.0
# The response cache is off unless a test turns it on (cache_bytes=...): most tests send the
# same few images again and again and count the engine's work on them.
CACHE_OFF = {"BLINK_CACHE_BYTES": "0"}
os.environ.update(CACHE_OFF)


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A grey 28x28 bundle with fp32 and int8 variants."""
    return write_bundle(tmp_path_factory.mktemp("bundle") / "tiny" / "1", extra_variants=("int8",))


@pytest.fixture(scope="session")
def slow_bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle whose every batch costs tens of milliseconds, to hold the engine busy."""
    return write_bundle(tmp_path_factory.mktemp("slow") / "slow" / "1", slow_matmul=2048)


@contextlib.asynccontextmanager
async def running_app(
    settings: Settings, *, wait_ready: bool = True
) -> AsyncIterator[httpx.AsyncClient]:
    """The real app in-process (lifespan included), with an httpx client bound to it."""
    app = create_app(settings)
    async with LifespanManager(app, startup_timeout=60, shutdown_timeout=60) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://blink") as client:
            if wait_ready:
                await wait_until_ready(client, timeout=READY_TIMEOUT_S)
            client.app = app  # type: ignore[attr-defined]
            yield client


async def wait_until_ready(client: httpx.AsyncClient, timeout: float) -> None:
    """Poll /readyz; fail the test, saying what the app answered, if it never becomes ready."""
    deadline = time.monotonic() + timeout
    while (response := await client.get("/readyz")).status_code != 200:
        if time.monotonic() > deadline:
            raise AssertionError(
                f"the app was not ready after {timeout:g} s: "
                f"/readyz answered {response.status_code} {response.text}"
            )
        await asyncio.sleep(0.01)


@pytest.fixture
async def client(bundle_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with running_app(Settings(model=bundle_dir, threads=1)) as c:
        yield c


@contextlib.contextmanager
def live_server(
    model: Path,
    *,
    wait_ready: bool = True,
    timeout: float = 60,
    env: dict[str, str] | None = None,
    **settings: object,
) -> Iterator[str]:
    """`python -m app serve` on a free loopback port; yields its base URL, stops it after."""
    process, url = spawn_server(model, env, **settings)
    try:
        wait_for(url, "/readyz" if wait_ready else "/healthz", process, timeout)
        yield url
    finally:
        stop_process(process)


def spawn_server(
    model: Path, extra_env: dict[str, str] | None = None, **settings: object
) -> tuple[subprocess.Popen, str]:
    """Start `python -m app serve` on a free loopback port with `BLINK_*` settings; no waiting."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BLINK_", "PROMETHEUS_"))}
    env.update(CACHE_OFF)
    env.update(extra_env or {})
    env.update({f"BLINK_{k.upper()}": str(v) for k, v in settings.items()})
    if "repository" not in settings:  # the two are exclusive
        env["BLINK_MODEL"] = str(model)
    env.update(BLINK_HOST="127.0.0.1", BLINK_PORT=str(port))
    # A file, not a pipe: a server that logs more than a pipe holds (64 KiB) while nobody reads
    # it blocks on its next log line, and the test would see a hang the server does not have.
    output = tempfile.TemporaryFile()  # noqa: SIM115 (closed with the process, by stop_process)
    process = subprocess.Popen(
        [sys.executable, "-m", "app", "serve"],
        cwd=ROOT,
        env=env,
        stdout=output,
        stderr=subprocess.STDOUT,
    )
    process.stdout = output  # read with server_output(); stop_process closes it
    return process, f"http://127.0.0.1:{port}"


def server_output(process: subprocess.Popen) -> str:
    """What a spawn_server process has written so far (stdout and stderr)."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    # pread: the server shares the file's offset, so reading must not move it
    return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")


def wait_for(url: str, path: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = server_output(process)
            raise RuntimeError(f"server exited with {process.returncode}:\n{output}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + path, timeout=1).status_code == 200:
                return
        time.sleep(0.05)
    raise TimeoutError(f"{url}{path} not 200 after {timeout}s")


# The unit tier (`pytest -m unit`, under 30 s): one module's logic each (batching policy, V2
# codec, pre- and postprocessing, bundle checks, metrics parity, the settings table, the
# build's calibration arithmetic), no build and no load; run it after every change. Marked
# here, in one list, so the tier is seen in one place.
UNIT_MODULES = frozenset(
    {
        "test_batching",
        "test_v2_codec",
        "test_preprocess",
        "test_postprocess",
        "test_bundle",
        "test_metrics",
        "test_settings_table",
        "test_lock",
        "test_calibration_build",
    }
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.stem in UNIT_MODULES:
            item.add_marker(pytest.mark.unit)
