"""Real browser: headless Chromium uploads embedded sample images and reads the result from the page."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from serve_support import CLASSES, make_tiny_champion, sample_pngs

from medflow.config import DataConfig, IngestConfig
from medflow.serve.app import create_app

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
UNRELIABLE = "Prediction not reliable: this image is unlike the training images"

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


@pytest.fixture()
def page(server: str):
    """A Chromium page (1280×900) on the served page, its model loaded; fails the test on any CSP violation."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            pg = browser.new_page(viewport={"width": 1280, "height": 900})
            console: list[str] = []
            pg.on("console", lambda m: console.append(m.text))
            pg.goto(server)
            expect(pg.locator("#model-version")).to_have_text("tiny_cnn-0123abcd")
            yield pg
            refused = [m for m in console if "Content Security Policy" in m]
            assert not refused, f"the page broke its own CSP: {refused}"
        finally:
            browser.close()


def _percent(p: float) -> str:
    """The page's percentages (app.js percent())."""
    return "> 99.9%" if p > 0.999 else "< 0.1%" if p < 0.001 else f"{100 * p:.1f}%"


def _shown_probabilities(page) -> dict[str, float]:
    bars = page.locator("#probabilities li")
    return {bars.nth(i).get_attribute("data-class"): float(bars.nth(i).get_attribute("data-probability"))
            for i in range(bars.count())}


def _api_predict(server: str, data: bytes) -> dict:
    return httpx.post(f"{server}/predict", files={"file": ("x.png", data)}, timeout=60).json()


def _api_probabilities(server: str, data: bytes) -> dict[str, float]:
    r = _api_predict(server, data)
    return dict(zip(r["classes"], r["probabilities"]))


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _grey_gradient(path: Path) -> Path:
    """A horizontal black-to-white ramp: one channel, nothing like a stained cell."""
    path.write_bytes(_png(np.tile(np.linspace(0, 255, 128, dtype=np.uint8), (128, 1))))
    return path


def _upload(page, path: Path) -> None:
    from playwright.sync_api import expect

    page.set_input_files("#file", str(path))
    expect(page.locator("#status")).to_have_text(re.compile(rf"^Classified {re.escape(path.name)} in \d+\.\d s"),
                                                 timeout=30_000)
    expect(page.locator("#result")).to_be_visible()


def _no_horizontal_scroll(page) -> None:
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= page.viewport_size["width"], f"page is {width}px wide at {page.viewport_size['width']}px"


def test_upload_and_drop_show_prediction(server: str, page, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    first, second = sample_pngs(2)  # one per class, held out of the profile: no warnings
    image = Path(shutil.copy(first, tmp_path / "cell.png"))
    expect(page.locator("#notice")).to_contain_text("does not replace, a clinician")

    # 1. the file picker
    _upload(page, image)
    expect(page.locator("#probabilities li")).to_have_count(len(CLASSES))
    proba = _shown_probabilities(page)
    assert set(proba) == set(CLASSES) and abs(sum(proba.values()) - 1) < 1e-5
    top = max(proba, key=proba.get)
    assert page.locator("#predicted").inner_text() == top
    assert proba == pytest.approx(_api_probabilities(server, image.read_bytes()), abs=1e-6)
    # a normal result: the class in the heading, no warnings, no demoted "model output" line
    expect(page.locator("#headline")).to_have_text(f"Predicted: {top} ({_percent(proba[top])} confidence)")
    # the answer is also in the status line (read out by screen readers), with the file it belongs to
    expect(page.locator("#status")).to_have_text(re.compile(
        rf"^Classified cell\.png in \d+\.\d s: {top} \({re.escape(_percent(proba[top]))} confidence\)\.$"))
    expect(page.locator("#input-info")).to_contain_text("Uploaded: cell.png (png, ")
    # what the confidence means and that it is no diagnosis, next to the result; the model's date in the header
    expect(page.locator("#confidence-note")).to_contain_text("A high score can still be wrong: on 120 test images "
                                                             "this model was right 62.0% of the time")
    expect(page.locator("#confidence-note")).to_contain_text("Not a diagnosis")
    expect(page.locator("#model-line")).to_have_text("Model tiny_cnn-0123abcd · selected on 2025-01-01 · classes: "
                                                     "Parasitized, Uninfected")
    expect(page.locator("#gradcam-caption")).to_contain_text(f"Grad-CAM for “{top}”")
    expect(page.locator("#spinner")).to_be_hidden()
    expect(page.locator("#error")).to_be_hidden()
    expect(page.locator("#warnings")).to_be_hidden()
    expect(page.locator("#model-output")).to_be_hidden()
    expect(page.locator("#status")).not_to_contain_text("unlike")
    for cls, p in proba.items():
        expect(page.locator(f'#probabilities li[data-class="{cls}"] .pct')).to_have_text(_percent(p))
    for img in ("#image", "#gradcam"):  # both images decoded and rendered
        assert page.locator(img).evaluate("el => el.complete && el.naturalWidth") == 32
    _no_horizontal_scroll(page)

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
    expect(page.locator("#status")).to_have_text(re.compile(r"^Classified dropped\.png in \d+\.\d s: [^(]+ \(.+\)\.$"),
                                                 timeout=30_000)
    assert _shown_probabilities(page) == pytest.approx(expected, abs=1e-6)
    assert page.locator("#predicted").inner_text() == max(expected, key=expected.get)


@pytest.mark.parametrize("width", [1280, 390])
def test_image_unlike_training_data_demotes_prediction(server: str, page, tmp_path: Path, width: int) -> None:
    from playwright.sync_api import expect

    page.set_viewport_size({"width": width, "height": 900})
    grey = _grey_gradient(tmp_path / "gradient.png")
    api = _api_predict(server, grey.read_bytes())
    assert api["warnings"], "a grey ramp must be flagged as unlike the training images"
    _upload(page, grey)

    # warnings box first, then a heading that says the prediction is not reliable; the class only as small print
    expect(page.locator("#warnings")).to_be_visible()
    expect(page.locator("#warning-list li")).to_have_text(api["warnings"])
    expect(page.locator("#headline")).to_have_text(UNRELIABLE)
    expect(page.locator("#headline #predicted")).to_have_count(0)
    output = f"model output: {api['predicted']} ({_percent(api['confidence'])} confidence)"
    expect(page.locator("#model-output")).to_have_text(output)
    expect(page.locator("#model-output #predicted")).to_have_text(api["predicted"])
    expect(page.locator("#result")).to_have_class(re.compile(r"\bunreliable\b"))
    expect(page.locator("#status")).to_contain_text("unlike the training images")
    # the test accuracy is not claimed for an image unlike the test images
    expect(page.locator("#confidence-note")).not_to_contain_text("was right")
    expect(page.locator("#confidence-note")).to_contain_text("say nothing about images unlike its training images")
    box = {s: page.locator(s).bounding_box() for s in ("#warnings", "#headline", "#model-output", "#probabilities")}
    assert box["#warnings"]["y"] < box["#headline"]["y"] < box["#model-output"]["y"] < box["#probabilities"]["y"]
    size = {s: float(page.locator(s).evaluate("el => parseFloat(getComputedStyle(el).fontSize)"))
            for s in ("#headline", "#model-output")}
    assert size["#model-output"] < size["#headline"]
    _no_horizontal_scroll(page)

    # the next, ordinary image gets its confident heading back and no leftover warnings
    cell = Path(shutil.copy(sample_pngs(1)[0], tmp_path / "cell.png"))
    _upload(page, cell)
    expect(page.locator("#headline")).to_have_text(re.compile(r"^Predicted: "))
    expect(page.locator("#warnings")).to_be_hidden()
    expect(page.locator("#model-output")).to_be_hidden()
    expect(page.locator("#result")).not_to_have_class(re.compile(r"\bunreliable\b"))
    expect(page.locator("#confidence-note")).to_contain_text("was right 62.0% of the time")
    _no_horizontal_scroll(page)


def _tiny_png_b64() -> str:
    return base64.b64encode(_png(np.zeros((8, 8, 3), np.uint8))).decode()


def test_probabilities_neutral_and_never_certain(page) -> None:
    from playwright.sync_api import expect

    classes = ["Parasitized", "Uninfected", "Other"]
    body = {"classes": classes, "probabilities": [0.99996, 0.00003, 0.00001], "predicted": "Parasitized",
            "confidence": 0.99996, "image_png_base64": _tiny_png_b64(), "gradcam_png_base64": _tiny_png_b64(),
            "model_version": "tiny_cnn-0123abcd", "warnings": [],
            "input": {"format": "png", "width": 8, "height": 8, "channels": 3, "bit_depth": 8}}
    page.route("**/predict", lambda route: route.fulfill(status=200, content_type="application/json",
                                                         body=json.dumps(body)))
    page.set_input_files("#file", files=[{"name": "sure.png", "mimeType": "image/png", "buffer": b"x"}])
    expect(page.locator("#result")).to_be_visible(timeout=30_000)

    # never "100.0%" / "0.0%"
    expect(page.locator("#headline")).to_have_text("Predicted: Parasitized (> 99.9% confidence)")
    expect(page.locator("#probabilities .pct")).to_have_text(["> 99.9%", "< 0.1%", "< 0.1%"])
    cases = [1.0, 0.99951, 0.9991, 0.999, 0.5, 0.1234, 0.001, 0.00099, 0.0004, 0.0]
    assert page.evaluate("(ps) => ps.map(percent)", cases) == [_percent(p) for p in cases]
    assert [_percent(p) for p in cases] == ["> 99.9%", "> 99.9%", "> 99.9%", "99.9%", "50.0%", "12.3%", "0.1%",
                                             "< 0.1%", "< 0.1%", "< 0.1%"]

    # one neutral (grey) colour for every bar; the top class stands out by weight and an outline, not by colour
    fills = page.locator("#probabilities .bar span").evaluate_all(
        "els => els.map((el) => getComputedStyle(el).backgroundColor)")
    assert len(set(fills)) == 1, fills
    r, g, b = map(int, re.findall(r"\d+", fills[0])[:3])
    assert max(r, g, b) - min(r, g, b) <= 40, f"bar colour {fills[0]} is not neutral"
    style = page.locator("#probabilities li").evaluate_all(
        """els => els.map((li) => ({weight: getComputedStyle(li.querySelector('.name')).fontWeight,
                                    outline: getComputedStyle(li.querySelector('.bar')).outlineStyle}))""")
    assert int(style[0]["weight"]) >= 600 and style[0]["outline"] != "none"
    assert all(int(s["weight"]) < 600 and s["outline"] == "none" for s in style[1:]), style


def test_gradcam_has_colour_scale_of_server_colormap(page, tmp_path: Path) -> None:
    import cv2
    from PIL import Image
    from playwright.sync_api import expect

    from medflow.models.gradcam import GRADCAM_COLORMAP

    assert GRADCAM_COLORMAP == "jet", "the page's colour scale (style.css .scale-bar) draws jet"
    _upload(page, Path(shutil.copy(sample_pngs(1)[0], tmp_path / "cell.png")))
    predicted = page.locator("#predicted").inner_text()
    scale = page.locator("#gradcam-scale")
    expect(scale).to_be_visible()
    expect(scale).to_have_attribute("role", "img")
    expect(scale).to_have_attribute("aria-label", re.compile(r"low influence.*high influence"))
    expect(scale.locator(".scale-labels span")).to_have_text(["low", "high influence"])
    alt = page.locator("#gradcam").get_attribute("alt")
    assert "Grad-CAM" in alt and predicted in alt and "most influenced" in alt, alt

    # the drawn bar, left to right, is OpenCV's COLORMAP_JET (what overlay() paints), 0 → 1
    bar = page.locator("#gradcam-scale .scale-bar")
    rgb = np.asarray(Image.open(io.BytesIO(bar.screenshot())).convert("RGB")).astype(int)
    row = rgb[rgb.shape[0] // 2, 1:-1]  # inside the 1px border
    jet = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[None], cv2.COLORMAP_JET)[0][:, ::-1].astype(int)
    for x in range(2, len(row) - 2):
        expected = jet[round((x + 0.5) / len(row) * 255)]
        assert np.abs(row[x] - expected).max() <= 24, (x, row[x].tolist(), expected.tolist())


def test_metrics_table_has_headers_and_human_labels(page) -> None:
    from playwright.sync_api import expect

    def with_all_metrics(route) -> None:
        model = route.fetch().json()
        model["metric"] = "macro_f1"
        model["metrics"] = {"accuracy": 0.925, "balanced_accuracy": 0.925, "macro_f1": 0.92495, "roc_auc": 0.97833,
                            "qwk": 0.81, "ece": 0.03427, "n_test": 120, "num_params": 3415593,
                            "per_class": {"Parasitized": {"recall": 0.9}}, "macro_f1_ci": [0.88, 0.96]}
        route.fulfill(status=200, content_type="application/json", body=json.dumps(model))

    page.route("**/model", with_all_metrics)
    page.reload()
    table = page.locator("#metrics")
    expect(table.locator("thead th[scope=col]")).to_have_text(["Metric", "Value"])
    expect(table.locator("tbody th[scope=row]")).to_have_text([
        "Accuracy", "Balanced accuracy", "Macro F1 (used to choose the model)", "ROC AUC (one-vs-rest)",
        "Quadratic weighted kappa", "Calibration error (ECE, lower is better)", "Test images", "Parameters"])
    expect(table.locator("tbody td")).to_have_text(["0.925", "0.925", "0.925", "0.978", "0.810", "0.034", "120",
                                                    "3,415,593"])
    assert "_" not in table.inner_text()


def test_file_picker_is_one_keyboard_stop_without_native_control(page, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    # file choosers intercepted from here on: expect_file_chooser() alone switches Playwright's interception on
    # without waiting for it (fire and forget), so a key pressed right after it can open an unintercepted one
    page.on("filechooser", lambda _: None)

    # the native "Choose File / No file chosen" control is hidden from sight, not from keyboards or screen readers
    box = page.locator("#file").bounding_box()
    assert box is not None and box["width"] <= 1 and box["height"] <= 1, box
    expect(page.locator(".button")).to_be_visible()
    expect(page.get_by_label("Choose a file")).to_have_id("file")

    # Tab reaches the file input; the drop zone is no tab stop of its own (it did nothing on Enter/Space)
    assert page.locator("#drop").evaluate("el => el.tabIndex") < 0
    stops = []
    for _ in range(10):
        page.keyboard.press("Tab")
        stops.append(page.evaluate("document.activeElement.id || document.activeElement.tagName"))
        if stops[-1] == "file":
            break
    assert stops[-1] == "file" and "drop" not in stops, stops
    outline = page.locator(".button").evaluate("el => getComputedStyle(el).outlineStyle")
    assert outline != "none", "the focused file input shows no focus ring on its button"

    # Enter and Space open the picker
    cell, second = (Path(shutil.copy(f, tmp_path / f"cell{i}.png")) for i, f in enumerate(sample_pngs(2)))
    for key, image in (("Enter", cell), ("Space", second)):
        with page.expect_file_chooser() as chooser:
            page.keyboard.press(key)
        chooser.value.set_files(str(image))
        expect(page.locator("#status")).to_have_text(re.compile(rf"^Classified {image.name} in \d+\.\d s"),
                                                     timeout=30_000)
        expect(page.locator("#result")).to_be_visible()
        assert page.evaluate("document.activeElement.id") == "file"


def _drop(page, files: dict[str, bytes]) -> None:
    """Drop ``files`` (name -> bytes) onto the drop zone; none: a drop of plain text, as from a web page."""
    transfer = page.evaluate_handle(
        """(files) => {
            const dt = new DataTransfer();
            for (const [name, b64] of Object.entries(files)) {
                dt.items.add(new File([Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))], name, {type: "image/png"}));
            }
            if (dt.items.length === 0) dt.setData("text/plain", "not a file");
            return dt;
        }""", {name: base64.b64encode(data).decode() for name, data in files.items()})
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})


@pytest.mark.parametrize("width", [1280, 390])
def test_bad_uploads_say_what_to_do(server: str, page, tmp_path: Path, width: int) -> None:
    """A text file renamed .png, an empty file, a non-file drop and several files: each says what happened and
    what to do; the next good image clears the error."""
    from playwright.sync_api import expect

    page.set_viewport_size({"width": width, "height": 900})
    error = page.locator("#error")
    expect(error).to_have_attribute("role", "alert")
    for name, data in (("notes.png", b"these are my notes, not pixels\n"), ("empty.png", b"")):
        (tmp_path / name).write_bytes(data)
        api = httpx.post(f"{server}/predict", files={"file": (name, data)}, timeout=60).json()
        page.set_input_files("#file", str(tmp_path / name))
        expect(error).to_be_visible(timeout=30_000)
        expect(page.locator("#error-title")).to_have_text(f"Could not analyse {name}.")
        expect(page.locator("#error-hint")).to_have_text(api["hint"])  # the server's plain-words hint
        expect(page.locator("#error-detail")).to_have_text(f"Details: {api['detail']}")
        expect(page.locator("#result")).to_be_hidden()
        expect(page.locator("#status")).to_have_text("")
        expect(page.locator("#spinner")).to_be_hidden()
        _no_horizontal_scroll(page)
    expect(page.locator("#error-hint")).to_contain_text("empty")

    cell, second = sample_pngs(2)
    _upload(page, Path(shutil.copy(cell, tmp_path / "cell.png")))
    expect(error).to_be_hidden()

    _drop(page, {})  # text, not a file
    expect(page.locator("#error-title")).to_have_text("Nothing to analyse.")
    expect(page.locator("#error-hint")).to_contain_text("Drop an image file")

    # several files: the first is analysed and the page says the others were not
    expected = _api_probabilities(server, second.read_bytes())
    _drop(page, {"first.png": second.read_bytes(), "other.png": cell.read_bytes()})
    expect(page.locator("#status")).to_have_text(
        re.compile(r"^Classified first\.png in .*2 files were dropped: .*only this first one is analysed"),
        timeout=30_000)
    expect(error).to_be_hidden()
    assert _shown_probabilities(page) == pytest.approx(expected, abs=1e-6)


def test_waiting_shows_progress_and_the_latest_upload_wins(server: str, page, tmp_path: Path) -> None:
    """While /predict runs: a spinner and "Analysing…", "still working" when slow; an earlier upload whose answer
    comes back after a later one's never replaces it."""
    from playwright.sync_api import expect

    first, second = (Path(shutil.copy(f, tmp_path / f"cell{i}.png")) for i, f in enumerate(sample_pngs(2)))
    expected = _api_probabilities(server, second.read_bytes())
    assert expected != pytest.approx(_api_probabilities(server, first.read_bytes()), abs=1e-6)
    # the first /predict answer is held back until the test releases it (and is not cancelled by the page)
    page.evaluate("""() => {
        const real = window.fetch;
        let held = false;
        window.heldSettled = false;
        const release = new Promise((resolve) => { window.releaseHeld = resolve; });
        window.fetch = async (url, options) => {
            if (!String(url).includes("/predict") || held) return real(url, options);
            held = true;
            try { const res = await real(url, { ...options, signal: undefined }); await release; return res; }
            finally { window.heldSettled = true; }
        };
    }""")
    page.clock.install()
    page.set_input_files("#file", str(first))
    expect(page.locator("#status")).to_have_text("Analysing cell0.png…")
    expect(page.locator("#spinner")).to_be_visible()
    expect(page.locator("#result")).to_be_hidden()
    expect(page.locator("#result")).to_have_attribute("aria-busy", "true")
    page.clock.fast_forward(5_000)
    expect(page.locator("#status")).to_contain_text("Still working: the server is busy")

    _upload(page, second)  # chosen while the first is still out
    assert _shown_probabilities(page) == pytest.approx(expected, abs=1e-6)
    page.evaluate("window.releaseHeld()")
    page.wait_for_function("window.heldSettled")
    page.wait_for_timeout(200)  # the held answer's handler has run
    expect(page.locator("#status")).to_have_text(re.compile(r"^Classified cell1\.png in "))
    assert _shown_probabilities(page) == pytest.approx(expected, abs=1e-6)
    expect(page.locator("#spinner")).to_be_hidden()
    expect(page.locator("#error")).to_be_hidden()
    assert page.locator("#result").get_attribute("aria-busy") is None


def test_unreachable_server_and_non_json_errors(page, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    cell = Path(shutil.copy(sample_pngs(1)[0], tmp_path / "cell.png"))
    page.route("**/predict", lambda route: route.fulfill(status=502, content_type="text/html", body="<h1>Bad Gateway"))
    page.set_input_files("#file", str(cell))
    expect(page.locator("#error-title")).to_have_text("Could not analyse cell.png.")
    expect(page.locator("#error-hint")).to_contain_text("The server failed")
    expect(page.locator("#error-detail")).to_have_text("Details: HTTP 502 Bad Gateway")
    page.unroute("**/predict")
    page.route("**/predict", lambda route: route.abort())
    page.set_input_files("#file", str(cell))
    expect(page.locator("#error-title")).to_have_text("Could not analyse cell.png: the server did not answer.")
    expect(page.locator("#error-hint")).to_contain_text("still running")
    expect(page.locator("#spinner")).to_be_hidden()
