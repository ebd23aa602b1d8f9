"""The web page in real headless Chromium (Debian's), driven by Playwright, against a real server.

Playwright's own browser download is never used: the test launches /usr/bin/chromium (scripts/setup-system.sh
installs it).  The screenshot lands in artifacts/web-page.png.
"""

from __future__ import annotations

import base64
import io
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support import ROOT
from tests.system import missing

pytestmark = pytest.mark.slow
sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = ROOT / "artifacts"


@pytest.fixture(scope="module")
def page(server_url: str) -> Iterator[sync_api.Page]:
    if not Path(CHROMIUM).exists():
        missing("Chromium", "chromium")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 820})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(server_url + "/")
        page.wait_for_function(
            "document.getElementById('model').textContent.includes('experts')", timeout=15_000
        )
        yield page
        browser.close()
        assert not errors, errors


def wait_answers(page: sync_api.Page, n: int) -> None:
    page.wait_for_function(f"Number(document.body.dataset.answers) >= {n}", timeout=20_000)


def canvas(page: sync_api.Page) -> np.ndarray:
    url = page.evaluate("() => document.getElementById('routing').toDataURL('image/png')")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))


def test_classify_sample_move_slider_clip_and_error(page: sync_api.Page) -> None:
    assert "Mi/4" in page.text_content("#model")

    page.click(".sample[data-src='samples/shirt.png']")
    wait_answers(page, 1)
    dense_capacity = page.text_content("#served-capacity")
    dense_top = page.locator("#predictions li").all_text_contents()
    dense_map = canvas(page)
    assert dense_capacity.startswith("1.000")
    assert len(dense_top) == 5
    assert "0% saved" in page.text_content("#gflops")
    assert dense_map.std() > 10  # an image with patches drawn, not an empty canvas

    page.fill("#capacity", "0.25")  # moving the slider re-asks and redraws
    wait_answers(page, 2)
    assert page.text_content("#capacity-value") == "0.250"
    assert page.text_content("#served-capacity").startswith("0.250")
    assert page.locator("#predictions li").all_text_contents() != dense_top
    cheap_map = canvas(page)
    assert cheap_map.shape == dense_map.shape
    assert np.abs(cheap_map.astype(int) - dense_map.astype(int)).mean() > 5
    assert "% saved" in page.text_content("#gflops")
    assert not page.text_content("#gflops").endswith("(0% saved)")

    # The budget kinds other than the slider's come from /v1/models `budgets.kinds`.
    kinds = page.eval_on_selector_all("#budget-kind option", "options => options.map(o => o.value)")
    assert kinds == ["gflops", "latency_ms"]
    page.select_option("#budget-kind", "latency_ms")
    page.fill("#budget-value", "500")
    wait_answers(page, 3)
    assert page.text_content("#requested") == "latency ≤ 500 ms"
    assert "deadline" in page.text_content("#latency-out")

    page.click("#clear-budget")
    wait_answers(page, 4)
    page.click(".sample[data-kind='clip']")
    wait_answers(page, 5)
    page.wait_for_function("document.body.dataset.state === 'done'")
    clip_map = canvas(page)
    assert clip_map.shape[1] > clip_map.shape[0]  # 8 frames drawn as a 4 x 2 grid of tiles
    assert page.is_hidden("#error")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-page-clip.png"), full_page=True)

    page.click(".sample[data-src='samples/pullover.png']")
    wait_answers(page, 6)
    page.screenshot(path=str(ARTIFACTS / "web-page.png"), full_page=True)

    page.set_input_files("#file", {"name": "notes.png", "mimeType": "image/png", "buffer": b"not an image"})
    page.wait_for_function("document.body.dataset.state === 'error'", timeout=20_000)
    message = page.text_content("#error")
    assert page.is_visible("#error")
    assert "415 unsupported_media_type" in message
    assert "unsupported format" in message
