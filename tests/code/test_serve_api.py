"""The serve JSON API: good images, DICOM, and every kind of bad upload gets a clear 4xx."""

from __future__ import annotations

import base64
import io
import json
import zlib
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from serve_support import (
    CLASSES,
    HELD_OUT,
    make_tiny_champion,
    png_bytes_with_header,
    sample_pngs,
    sample_profile,
    sparse_png,
)

from medflow.config import DataConfig, IngestConfig
from medflow.serve.app import HINTS, NOTICE, create_app

MAX_UPLOAD = 2 * 1024 * 1024
STATIC = Path(__file__).resolve().parents[2] / "src" / "medflow" / "serve" / "static"


@pytest.fixture(scope="module")
def champion(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_champion(tmp_path_factory.mktemp("champion"))


@pytest.fixture(scope="module")
def client(champion: Path) -> TestClient:
    app = create_app(champion, DataConfig(), IngestConfig(image_size=32), max_upload_bytes=MAX_UPLOAD)
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def png_bytes() -> bytes:
    return sample_pngs(1)[0].read_bytes()


def _post(client: TestClient, data: bytes, name: str = "cell.png", ctype: str = "image/png"):
    return client.post("/predict", files={"file": (name, data, ctype)})


def _assert_rejected(resp, status: int | tuple[int, ...], reasons: set[str]) -> dict:
    statuses = status if isinstance(status, tuple) else (status,)
    assert resp.status_code in statuses, (resp.status_code, resp.text[:500])
    body = resp.json()
    assert body["reason"] in reasons, body
    assert isinstance(body["detail"], str) and body["detail"], body
    # what the sender can do, in plain words, beside the technical detail (every upload problem has one)
    assert set(body) == {"detail", "reason", "hint"}, body
    if body["reason"] in HINTS or body["reason"] == "upload_too_large":
        assert isinstance(body["hint"], str) and len(body["hint"]) > 20 and body["hint"] != body["detail"], body
    return body


def _png_size(b64: str) -> tuple[int, int]:
    return Image.open(io.BytesIO(base64.b64decode(b64))).size


def test_predict_real_png_matches_the_model(client: TestClient, champion: Path, png_bytes: bytes) -> None:
    import keras

    from medflow.data.images import decode_image, to_model_input

    resp = _post(client, png_bytes)
    assert resp.status_code == 200, resp.text[:500]
    r = resp.json()
    assert r["classes"] == CLASSES
    assert r["model_version"] == json.loads(champion.read_text())["version"]
    proba = np.array(r["probabilities"])
    assert proba.shape == (2,) and np.all(proba >= 0) and proba.sum() == pytest.approx(1.0, abs=1e-5)
    assert r["predicted"] == CLASSES[int(proba.argmax())] and r["confidence"] == pytest.approx(proba.max())
    assert r["input"]["format"] == "png" and r["notice"] == NOTICE
    assert r["warnings"] == []  # a real cell, like the training images
    assert _png_size(r["image_png_base64"]) == (32, 32) and _png_size(r["gradcam_png_base64"]) == (32, 32)

    model = keras.models.load_model(champion.parent / "model.keras")
    rgb = decode_image(png_bytes, max_pixels=10**8, min_side=1, max_side=10**5).rgb
    expected = model.predict_on_batch(to_model_input(rgb, 32, 3)[None].astype("float32"))[0]
    np.testing.assert_allclose(proba, expected, atol=1e-5)


def test_interactive_docs_are_off_and_the_schema_is_served(client: TestClient) -> None:
    for path in ("/docs", "/redoc"):  # their pages load scripts from a CDN
        assert client.get(path).status_code == 404, path
    assert "/predict" in client.get("/openapi.json").json()["paths"]


def _ct_small() -> bytes:
    import pydicom.data as pydicom_data
    return Path(pydicom_data.get_testdata_file("CT_small.dcm")).read_bytes()


GREY_WARNING = "grayscale (1 channel) but the model was trained on 3-channel (colour) images"


def test_predict_dicom(client: TestClient) -> None:
    resp = _post(client, _ct_small(), name="scan.dcm", ctype="application/dicom")
    assert resp.status_code == 200, resp.text[:500]
    r = resp.json()
    assert r["input"]["format"] == "dicom" and (r["input"]["width"], r["input"]["height"]) == (128, 128)
    assert sum(r["probabilities"]) == pytest.approx(1.0, abs=1e-5)
    # a CT slice is nothing like the malaria cells the model was trained on: predicted, but with warnings
    assert r["warnings"][:3] == ["DICOM CT but the model was trained on PNG images", GREY_WARNING,
                                 "16-bit but the model was trained on 8-bit images"]


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_unseen_cells_get_no_warnings(client: TestClient) -> None:
    """The cells the tiny champion's profile left out (HELD_OUT) match it, both classes."""
    for f in sample_pngs(HELD_OUT)[::4]:
        r = _post(client, f.read_bytes()).json()
        assert r["warnings"] == [], (f.name, r["warnings"])


def test_images_unlike_the_training_data_are_predicted_with_warnings(client: TestClient, png_bytes: bytes) -> None:
    def span(stat: str) -> str:  # the profile's bounds as the warnings print them
        return " to ".join(f"{v:.0f}" if v >= 100 else f"{v:.1f}" for v in sample_profile()["stats"][stat])

    black = _post(client, _png(np.zeros((100, 100, 3), np.uint8)))
    assert black.status_code == 200 and black.json()["predicted"] in CLASSES
    assert black.json()["warnings"] == [
        f"mean brightness 0.0 outside the training range {span('mean')}",
        f"contrast (grey-level std) 0.0 outside the training range {span('std')}",
        f"sharpness (variance of the Laplacian) 0.0 outside the training range {span('sharpness')}"]
    # the same cell in grayscale: its statistics are the colour cell's, its colour is not
    grey = np.asarray(Image.open(io.BytesIO(png_bytes)).convert("L"))
    resp = _post(client, _png(grey))
    assert resp.status_code == 200 and resp.json()["warnings"] == [GREY_WARNING]


def test_a_record_without_input_profile_checks_nothing(tmp_path: Path) -> None:
    """Records written before compare recorded a profile still serve: no check, no warnings."""
    champion = make_tiny_champion(tmp_path, profile=False)
    assert "input_profile" not in json.loads(champion.read_text())
    app = create_app(champion, DataConfig(), IngestConfig(image_size=32))
    with TestClient(app) as c:
        for data in (_ct_small(), _png(np.zeros((64, 64), np.uint8))):
            resp = _post(c, data)
            assert resp.status_code == 200 and resp.json()["warnings"] == [], resp.text[:500]


def test_type_is_sniffed_not_taken_from_the_name(client: TestClient, png_bytes: bytes) -> None:
    as_text = _post(client, png_bytes, name="notes.txt", ctype="text/plain")
    assert as_text.status_code == 200 and as_text.json()["input"]["format"] == "png"
    fake = _post(client, b"%PDF-1.4 definitely not pixels\n" * 20, name="cell.png")
    _assert_rejected(fake, 415, {"not_an_image"})


@pytest.mark.parametrize("name", ["../../etc/passwd.png", "/etc/passwd", "细胞 – ü é.png", "x" * 1000 + ".png",
                                  "noextension", "a\\..\\..\\b.png"])
def test_odd_file_names_are_ignored(client: TestClient, png_bytes: bytes, name: str) -> None:
    reference = _post(client, png_bytes).json()["probabilities"]
    resp = _post(client, png_bytes, name=name)
    assert resp.status_code == 200, resp.text[:500]
    assert resp.json()["probabilities"] == pytest.approx(reference)


def test_concurrent_requests_agree(client: TestClient, png_bytes: bytes) -> None:
    """Requests in parallel (threads off the event loop, one model) give the sequential answer."""
    from concurrent.futures import ThreadPoolExecutor

    reference = _post(client, png_bytes).json()["probabilities"]
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: _post(client, png_bytes), range(12)))
    assert all(r.status_code == 200 for r in responses)
    for r in responses:
        assert r.json()["probabilities"] == pytest.approx(reference, abs=1e-6)


def test_oversized_upload_413(client: TestClient) -> None:
    body = _assert_rejected(_post(client, b"\x00" * (MAX_UPLOAD + 1)), 413, {"upload_too_large"})
    assert str(MAX_UPLOAD) in body["detail"]
    assert "2 MB upload limit" in body["hint"]  # MAX_UPLOAD in the unit a person knows


def test_oversized_chunked_upload_413(client: TestClient) -> None:
    """Without Content-Length the limit is enforced while the body streams in."""
    boundary = "b0undary"

    def body():
        yield f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n\r\n".encode()
        for _ in range(MAX_UPLOAD // 65536 + 2):
            yield b"\x00" * 65536
        yield f"\r\n--{boundary}--\r\n".encode()

    headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
    resp = client.post("/predict", content=body(), headers=headers)
    _assert_rejected(resp, 413, {"upload_too_large"})


def test_truncated_png(client: TestClient, png_bytes: bytes) -> None:
    _assert_rejected(_post(client, png_bytes[: len(png_bytes) // 2]), 422, {"truncated", "corrupt"})


def test_empty_upload(client: TestClient) -> None:
    body = _assert_rejected(_post(client, b""), 422, {"empty_file"})
    assert "empty" in body["hint"] and "again" in body["hint"]


def test_every_bad_image_reason_has_a_hint() -> None:
    """Each reason decoding an upload can give (medflow.data.images.REASONS, less the batch-only ones) is explained."""
    from medflow.data.images import REASONS

    batch_only = {"missing_file", "conflicting_labels", "no_label"}  # ingest / `medflow predict`, never an upload
    assert set(REASONS) - batch_only <= set(HINTS)
    assert all(h.endswith(".") and "`" not in h for r, h in HINTS.items() if r not in {"invalid_request", "bad_request"})


def test_server_failure_is_json_with_a_hint(client: TestClient, png_bytes: bytes,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug while predicting: 500 with the usual {detail, reason, hint}, not a plain-text page; nothing leaks."""
    from medflow.serve.predictor import Predictor

    def broken(self, decoded):
        raise RuntimeError("secret /srv/path/model.keras exploded")

    monkeypatch.setattr(Predictor, "predict", broken)
    resp = _post(TestClient(client.app, raise_server_exceptions=False), png_bytes)
    body = _assert_rejected(resp, 500, {"internal_error"})
    assert body["detail"] == "internal server error (RuntimeError)" and "/srv" not in resp.text
    assert "server log" in body["hint"]


def test_header_claims_huge_dimensions(client: TestClient) -> None:
    bomb = png_bytes_with_header(100_000, 100_000, zlib.compress(b"\x00" * 1000))
    _assert_rejected(_post(client, bomb), 413, {"decompression_bomb", "too_large"})


def test_real_sparse_decompression_bomb(client: TestClient) -> None:
    bomb = sparse_png(12_000)  # 144 Mpx > ingest.max_pixels (80 Mpx), each side < max_side
    assert len(bomb) < MAX_UPLOAD
    _assert_rejected(_post(client, bomb), 413, {"decompression_bomb"})


def test_missing_file_is_422(client: TestClient, png_bytes: bytes) -> None:
    body = _assert_rejected(client.post("/predict", data={"other": "x"}), 422, {"invalid_request"})
    assert "body.file" in body["detail"] and "required" in body["detail"].lower()
    # A part without a file name is how a form with no file chosen arrives; the bytes are not echoed.
    resp = _post(client, png_bytes, name="")
    _assert_rejected(resp, 422, {"invalid_request"})
    assert len(resp.content) < 500


def test_two_file_parts_are_refused_not_half_answered(client: TestClient, png_bytes: bytes) -> None:
    files = [("file", ("a.png", png_bytes, "image/png")), ("file", ("b.png", png_bytes, "image/png"))]
    body = _assert_rejected(client.post("/predict", files=files), 422, {"invalid_request"})
    assert "2 'file' parts" in body["detail"]


def test_malformed_multipart_and_unknown_paths(client: TestClient) -> None:
    resp = client.post("/predict", content=b"garbage", headers={"content-type": "multipart/form-data; boundary=zz"})
    _assert_rejected(resp, (400, 422), {"bad_request", "invalid_request"})
    _assert_rejected(client.get("/nope"), 404, {"not_found"})
    _assert_rejected(client.get("/predict"), 405, {"method_not_allowed"})


def test_health_model_openapi(client: TestClient, champion: Path) -> None:
    record = json.loads(champion.read_text())
    health = client.get("/health").json()
    assert health == {"status": "ok", "model_version": record["version"]}
    model = client.get("/model").json()
    assert model["version"] == record["version"] and model["classes"] == CLASSES
    assert model["metrics"] == record["metrics"] and "model_path" not in model
    spec = client.get("/openapi.json").json()
    assert {"/predict", "/health", "/model"} <= set(spec["paths"])
    assert {"413", "415", "422", "500"} <= set(spec["paths"]["/predict"]["post"]["responses"])
    assert {"detail", "reason", "hint"} <= set(spec["components"]["schemas"]["Error"]["properties"])
    assert spec["components"]["schemas"]["Prediction"]["properties"]["warnings"]["type"] == "array"


def test_page_is_self_contained_with_notice(client: TestClient) -> None:
    resp = client.get("/")
    assert resp.status_code == 200 and "text/html" in resp.headers["content-type"]
    assert "does not replace, a clinician" in resp.text
    assert "default-src 'self'" in resp.headers["content-security-policy"]
    for name in ("index.html", "app.js", "style.css"):
        text = (STATIC / name).read_text()
        assert "http://" not in text and "https://" not in text, f"{name} references another origin"
        assert client.get(f"/static/{name}").status_code == 200
    # the warnings box: in the page, filled by app.js (no inline script or style: the CSP forbids them)
    page = (STATIC / "index.html").read_text()
    assert 'id="warnings"' in page and "does not look like the training data" in page
    assert "<script>" not in page and "style=" not in page
    # what the confidence means, not a diagnosis, beside the result; errors announced (role=alert); no favicon request
    assert 'id="confidence-note"' in page and "Not a diagnosis" in page and "can still be wrong" in page
    assert 'id="error" class="error" role="alert"' in page
    assert '<link rel="icon" href="data:,">' in page
    assert "r.warnings" in (STATIC / "app.js").read_text() and ".warnings" in (STATIC / "style.css").read_text()
