"""`GET /`, the page to try the service with: served right, and used in a real headless browser.

The browser test drives Debian's chromium through chromium-driver (`bash scripts/setup.sh
--test` installs both): it picks a real PNG through the page's file input and reads back what
the page shows, checked against the answer the API gives for the same bytes.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import live_server
from tests.images import png
from tests.onnx_models import LABELS

CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM = shutil.which("chromium")


async def test_page_is_served_with_no_external_assets(client: httpx.AsyncClient) -> None:
    response = await client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "max-age" in response.headers["cache-control"]
    assert "default-src 'none'" in response.headers["content-security-policy"]
    html = response.text
    # every link and source is this origin's: nothing from a CDN
    assert re.findall(r"""(?:src|href)\s*=\s*["'](?:https?:)?//""", html) == []
    assert "@import" not in html and "url(" not in html
    for link in ("/docs", "/metrics"):
        assert f'href="{link}"' in html
    assert "/" not in (await client.get("/openapi.json")).json()["paths"]


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not (CHROMEDRIVER and CHROMIUM):
        pytest.skip("needs Debian's chromium and chromium-driver (bash scripts/setup.sh --test)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.mark.slow  # a browser start and a server start: tens of seconds on a busy machine
def test_a_person_classifies_an_image_through_the_page(
    browser: object, bundle_dir: Path, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image = tmp_path / "shirt.png"
    image.write_bytes(png(seed=3))
    driver = browser  # type: ignore[assignment]
    with live_server(bundle_dir, threads=1) as url:
        expected = httpx.post(
            f"{url}/classify?top_k=5",
            content=image.read_bytes(),
            headers={"content-type": "image/png"},
        ).json()
        driver.get(url + "/")  # type: ignore[attr-defined]
        wait = WebDriverWait(driver, 20)
        model_line = wait.until(
            lambda d: (
                d.find_element(By.ID, "model").get_attribute("data-name")
                and d.find_element(By.ID, "model")
            )
        )
        assert "tiny" in model_line.text and "variant" in model_line.text
        driver.find_element(By.ID, "file").send_keys(str(image))  # type: ignore[attr-defined]
        rows = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#predictions .prediction"))
        shown = [
            (
                r.find_element(By.CLASS_NAME, "label").text,
                float(r.find_element(By.CLASS_NAME, "bar").get_attribute("data-score")),
            )
            for r in rows
        ]
        timing = {
            row.get_attribute("data-stage"): float(row.find_elements(By.TAG_NAME, "td")[1].text)
            for row in driver.find_elements(By.CSS_SELECTOR, "#timing tbody tr")  # type: ignore[attr-defined]
        }
        widths = [r.find_element(By.CLASS_NAME, "bar").size["width"] for r in rows]
        errors = driver.get_log("browser")  # type: ignore[attr-defined]

    # the same classes and scores as the API gives for the same bytes, from the tiny bundle
    assert [label for label, _ in shown] == [p["label"] for p in expected["predictions"]]
    assert all(label in LABELS for label, _ in shown)
    assert [score for _, score in shown] == pytest.approx(
        [p["score"] for p in expected["predictions"]]
    )
    # bars as long as their scores: the first the longest, in the same order
    assert widths == sorted(widths, reverse=True) and widths[0] > 0
    assert set(timing) == {"decode", "queue", "inference", "total"}
    assert all(ms >= 0 for ms in timing.values())
    assert timing["total"] >= timing["inference"]
    assert [e for e in errors if e["level"] == "SEVERE"] == []
