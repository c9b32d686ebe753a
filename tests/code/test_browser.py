"""Real browser: headless Chromium uploads an embedded sample image and reads the result from the page."""

from __future__ import annotations

import base64
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from serve_support import CLASSES, make_tiny_champion, sample_pngs

from medflow.config import DataConfig, IngestConfig
from medflow.serve.app import create_app

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.browser


def _require_chromium() -> None:
    if Path(CHROMIUM).exists():
        return
    message = f"{CHROMIUM} not found (install Debian's chromium: `make browser-deps`)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture()
def server(tmp_path: Path):
    """uvicorn on 127.0.0.1, a free port, in a thread; stopped after the test."""
    _require_chromium()
    app = create_app(make_tiny_champion(tmp_path), DataConfig(), IngestConfig(image_size=32))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    srv.should_exit = True
    thread.join(timeout=10)
    sock.close()


def _shown_probabilities(page) -> dict[str, float]:  # noqa: ANN001 - playwright Page
    bars = page.locator("#probabilities li")
    return {bars.nth(i).get_attribute("data-class"): float(bars.nth(i).get_attribute("data-probability"))
            for i in range(bars.count())}


def _api_probabilities(server: str, data: bytes) -> dict[str, float]:
    r = httpx.post(f"{server}/predict", files={"file": ("x.png", data)}, timeout=60).json()
    return dict(zip(r["classes"], r["probabilities"]))


def test_upload_and_drop_show_prediction(server: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    first, second = sample_pngs(2)  # one per class
    image = Path(shutil.copy(first, tmp_path / "cell.png"))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(server)
            expect(page.locator("#notice")).to_contain_text("does not replace, a clinician")
            expect(page.locator("#model-version")).to_have_text("tiny_cnn-0123abcd")

            # 1. the file picker
            page.set_input_files("#file", str(image))
            expect(page.locator("#result")).to_be_visible(timeout=30_000)
            expect(page.locator("#probabilities li")).to_have_count(len(CLASSES))
            proba = _shown_probabilities(page)
            assert set(proba) == set(CLASSES) and abs(sum(proba.values()) - 1) < 1e-5
            assert page.locator("#predicted").inner_text() == max(proba, key=proba.get)
            assert proba == pytest.approx(_api_probabilities(server, image.read_bytes()), abs=1e-6)
            for img in ("#image", "#gradcam"):  # both images decoded and rendered
                assert page.locator(img).evaluate("el => el.complete && el.naturalWidth") == 32

            # 2. drag-and-drop of another image onto the drop zone
            expected = _api_probabilities(server, second.read_bytes())
            assert expected != pytest.approx(proba, abs=1e-6), "the two sample images must score differently"
            transfer = page.evaluate_handle(
                """async (b64) => {
                    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
                    const dt = new DataTransfer();
                    dt.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
                    return dt;
                }""", base64.b64encode(second.read_bytes()).decode())
            page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
            expect(page.locator("#status")).to_have_text("Done.", timeout=30_000)
            assert _shown_probabilities(page) == pytest.approx(expected, abs=1e-6)
            assert page.locator("#predicted").inner_text() == max(expected, key=expected.get)
        finally:
            browser.close()
