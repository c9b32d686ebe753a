"""Real browser: headless Chromium uploads an embedded sample image and reads the result from the page."""

from __future__ import annotations

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


def test_upload_shows_prediction(server: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    image = Path(shutil.copy(sample_pngs(1)[0], tmp_path / "cell.png"))
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(server)
            expect(page.locator("#notice")).to_contain_text("does not replace, a clinician")
            expect(page.locator("#model-version")).to_have_text("tiny_cnn-0123abcd")
            page.set_input_files("#file", str(image))
            expect(page.locator("#result")).to_be_visible(timeout=30_000)

            predicted = page.locator("#predicted").inner_text()
            bars = page.locator("#probabilities li")
            expect(bars).to_have_count(len(CLASSES))
            proba = {bars.nth(i).get_attribute("data-class"): float(bars.nth(i).get_attribute("data-probability"))
                     for i in range(len(CLASSES))}
            assert set(proba) == set(CLASSES) and abs(sum(proba.values()) - 1) < 1e-5
            assert predicted == max(proba, key=proba.get)
            api = httpx.post(f"{server}/predict", files={"file": image.read_bytes()}).json()
            assert [proba[c] for c in api["classes"]] == pytest.approx(api["probabilities"], abs=1e-6)
            for img in ("#image", "#gradcam"):  # both images decoded and rendered
                assert page.locator(img).evaluate("el => el.complete && el.naturalWidth") == 32
        finally:
            browser.close()
