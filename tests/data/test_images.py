"""Decoding, conversion, guards and statistics in medflow.data.images (real bytes, checked by value)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from medflow.config import DataConfig, IngestConfig
from medflow.data.images import (
    STATS,
    BadImage,
    batch_stats,
    decode_image,
    image_stats,
    load_image_file,
    pixel_hash,
    to_model_input,
)

LIMITS = dict(max_pixels=80_000_000, min_side=8, max_side=20000)


def encode(arr: np.ndarray, ext: str) -> bytes:
    ok, buf = cv2.imencode(ext, arr)
    assert ok
    return buf.tobytes()


def pil_bytes(img: Image.Image, fmt: str) -> bytes:
    bio = io.BytesIO()
    img.save(bio, fmt)
    return bio.getvalue()


def png_with_size(width: int, height: int) -> bytes:
    """A valid 16x16 PNG whose IHDR (with a correct CRC) claims another size: a bomb-like header."""
    data = bytearray(encode(np.zeros((16, 16), np.uint8), ".png"))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def reason(data: bytes, **limits: int) -> str:
    with pytest.raises(BadImage) as e:
        decode_image(data, **{**LIMITS, **limits})
    return e.value.reason


@pytest.fixture(scope="module")
def cell_png(malaria_dir: Path) -> bytes:
    return (malaria_dir / "Parasitized" / "C39P4thinF_original_IMG_20150622_105335_cell_16.png").read_bytes()


def test_real_png_decodes_to_rgb(cell_png: bytes) -> None:
    dec = decode_image(cell_png, **LIMITS)
    expected = cv2.cvtColor(cv2.imdecode(np.frombuffer(cell_png, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert (dec.format, dec.width, dec.height, dec.channels, dec.bit_depth) == ("png", 112, 91, 3, 8)
    assert dec.rgb.dtype == np.uint8 and dec.rgb.shape == (91, 112, 3)
    np.testing.assert_array_equal(dec.rgb, expected)


def test_rgb_pngs_decode_through_libspng_to_opencvs_pixels(malaria_dir: Path, cell_png: bytes,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """8-bit RGB PNGs take libspng (imagecodecs): every sample cell decodes to OpenCV's exact pixels; a file
    libspng refuses goes to OpenCV, which still decides (here: corrupt), and a libspng failure is no loss."""
    from medflow.data import images

    files = sorted(malaria_dir.glob("*/*.png"))
    assert len(files) == 400
    for path in files:
        data = path.read_bytes()
        fast = images._decode_rgb8_png(data)
        assert fast is not None, path.name
        np.testing.assert_array_equal(fast, cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB))
    corrupt = bytearray(cell_png)
    corrupt[200:400] = bytes(200)
    assert images._decode_rgb8_png(bytes(corrupt)) is None
    calls = []
    real = cv2.imdecode
    monkeypatch.setattr(images.cv2, "imdecode", lambda *a: calls.append(1) or real(*a))
    assert reason(bytes(corrupt)) == "corrupt" and calls  # OpenCV had the last word
    calls.clear()

    def refuse(_: bytes) -> None:
        raise images.imagecodecs.SpngError("spng_decode_image", 1)

    monkeypatch.setattr(images.imagecodecs, "spng_decode", refuse)
    expected = real(np.frombuffer(cell_png, np.uint8), cv2.IMREAD_COLOR_RGB)
    np.testing.assert_array_equal(decode_image(cell_png, **LIMITS).rgb, expected)
    assert calls  # decoded by OpenCV when libspng fails


@pytest.mark.parametrize("ext,fmt", [(".jpg", "jpeg"), (".bmp", "bmp"), (".tiff", "tiff"), (".png", "png")])
def test_formats_sniffed_by_content(ext: str, fmt: str) -> None:
    bgr = np.zeros((20, 30, 3), np.uint8)
    bgr[..., 0] = 30  # blue
    bgr[..., 1] = np.linspace(60, 120, 30, dtype=np.uint8)  # green ramp
    bgr[..., 2] = 220  # red
    dec = decode_image(encode(bgr, ext), **LIMITS)
    assert (dec.format, dec.width, dec.height, dec.channels) == (fmt, 30, 20, 3)
    if ext == ".jpg":  # lossy: close, and in RGB order
        assert np.abs(dec.rgb.astype(int) - bgr[:, :, ::-1]).max() <= 8
    else:
        np.testing.assert_array_equal(dec.rgb, bgr[:, :, ::-1])


def test_16bit_grey_is_scaled_not_rejected() -> None:
    grey16 = np.array([[0, 257 * 100, 65535, 32768]] * 8, np.uint16)
    grey16 = np.repeat(grey16, 2, axis=1)
    dec = decode_image(encode(grey16, ".png"), **LIMITS)
    assert (dec.bit_depth, dec.channels) == (16, 1)
    np.testing.assert_array_equal(dec.rgb[0, ::2, 0], [0, 100, 255, 128])
    np.testing.assert_array_equal(dec.rgb[..., 0], dec.rgb[..., 2])  # grey replicated


def test_rgba_is_composited_on_black() -> None:
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[:, :4, 3] = 255  # left half opaque
    rgba[:, 4:6, 3] = 0  # transparent
    rgba[:, 6:, 3] = 128  # half
    dec = decode_image(pil_bytes(Image.fromarray(rgba, "RGBA"), "PNG"), **LIMITS)
    assert dec.channels == 4
    np.testing.assert_array_equal(dec.rgb[0, 0], (200, 100, 50))
    np.testing.assert_array_equal(dec.rgb[0, 4], (0, 0, 0))
    np.testing.assert_array_equal(dec.rgb[0, 7], (100, 50, 25))  # round(v * 128/255)


def test_palette_and_grey_pngs() -> None:
    rgb = np.random.default_rng(1).integers(0, 255, (12, 10, 3), np.uint8)
    pal = Image.fromarray(rgb).convert("P")
    dec = decode_image(pil_bytes(pal, "PNG"), **LIMITS)
    assert dec.channels == 1
    np.testing.assert_array_equal(dec.rgb, np.asarray(pal.convert("RGB")))
    grey = decode_image(encode(rgb[..., 0], ".png"), **LIMITS)
    assert grey.channels == 1
    np.testing.assert_array_equal(grey.rgb, np.repeat(rgb[..., :1], 3, axis=2))


def test_bytes_after_the_end_marker_are_allowed_but_a_cut_main_scan_is_not(cell_png: bytes) -> None:
    rgb = np.random.default_rng(2).integers(0, 255, (40, 40, 3), np.uint8)
    jpeg = encode(rgb, ".jpg")
    trailer = b"\x00" * 100 + b"ftypmp42" + bytes(range(256))  # e.g. a motion photo's video after the image
    np.testing.assert_array_equal(decode_image(jpeg + trailer, **LIMITS).rgb, decode_image(jpeg, **LIMITS).rgb)
    np.testing.assert_array_equal(decode_image(cell_png + trailer, **LIMITS).rgb, decode_image(cell_png, **LIMITS).rgb)
    # an APP1 segment holding a whole thumbnail JPEG (with its own end marker) before the main image's scan
    thumb = encode(rgb[:8, :8], ".jpg")
    app1 = b"\xff\xe1" + (len(thumb) + 8).to_bytes(2, "big") + b"Exif\0\0" + thumb
    with_thumb = jpeg[:2] + app1 + jpeg[2:]
    assert decode_image(with_thumb, **LIMITS).rgb.shape == (40, 40, 3)
    assert reason(with_thumb[: len(with_thumb) - len(jpeg) // 3]) == "truncated"  # the thumbnail's marker is no end


def test_bad_inputs_have_reasons(cell_png: bytes) -> None:
    assert reason(b"") == "empty_file"
    assert reason(b"patient notes, not a picture\n" * 10) == "not_an_image"
    assert reason(cell_png[: len(cell_png) // 2]) == "truncated"
    jpeg = encode(np.full((64, 64, 3), 90, np.uint8), ".jpg")
    assert reason(jpeg[: len(jpeg) // 2]) == "truncated"
    corrupt = bytearray(cell_png)
    corrupt[200:400] = bytes(200)  # inside IDAT; the end marker survives
    assert reason(bytes(corrupt)) == "corrupt"
    assert reason(encode(np.random.default_rng(0).random((16, 16), np.float32), ".tiff")) == "unsupported_bit_depth"
    cmyk = Image.fromarray(np.full((16, 16, 3), 120, np.uint8)).convert("CMYK")
    assert reason(pil_bytes(cmyk, "TIFF")) == "unsupported_channels"
    assert reason(encode(np.zeros((4, 4), np.uint8), ".png")) == "too_small"
    assert reason(png_with_size(30000, 16)) == "too_large"
    assert reason(png_with_size(12000, 12000)) == "decompression_bomb"  # 144 M pixels, 100 bytes
    assert reason(cell_png, max_pixels=5000) == "decompression_bomb"  # 112x91 real image, tight guard


def test_load_image_file(tmp_path: Path, cell_png: bytes) -> None:
    data, ingest = DataConfig(), IngestConfig()
    with pytest.raises(BadImage) as e:
        load_image_file(tmp_path / "nope.png", data, ingest)
    assert e.value.reason == "missing_file"
    (tmp_path / "cell.png").write_bytes(cell_png)
    assert load_image_file(tmp_path / "cell.png", data, ingest).width == 112


def test_to_model_input(cell_png: bytes) -> None:
    rgb = decode_image(cell_png, **LIMITS).rgb
    x3 = to_model_input(rgb, 32, 3)
    x1 = to_model_input(rgb, 32, 1)
    assert x3.shape == (32, 32, 3) and x1.shape == (32, 32, 1) and x3.dtype == x1.dtype == np.uint8
    np.testing.assert_array_equal(x3, cv2.resize(rgb, (32, 32), interpolation=cv2.INTER_AREA))
    np.testing.assert_array_equal(x1[..., 0], cv2.cvtColor(x3, cv2.COLOR_RGB2GRAY))
    np.testing.assert_array_equal(to_model_input(rgb, 32, 3), x3)  # deterministic


def test_image_stats_by_value() -> None:
    red = np.zeros((16, 16, 3), np.uint8)
    red[..., 0] = 255
    s = image_stats(red)
    assert (s["mean_r"], s["mean_g"], s["mean_b"]) == (255.0, 0.0, 0.0)
    assert s["mean"] == 76.0 and s["std"] == 0.0 and s["sharpness"] == 0.0  # grey = 0.299 * 255
    checker = np.kron((np.indices((8, 8)).sum(0) % 2) * 255, np.ones((2, 2))).astype(np.uint8)
    c = image_stats(np.repeat(checker[..., None], 3, axis=2))
    assert c["mean"] == 127.5 and c["std"] == 127.5 and c["sharpness"] > 1000


def test_sharpness_laplacian_is_opencvs_laplacian() -> None:
    """The filter2D route gives cv2.Laplacian's int16 values exactly, borders and 1-pixel sides included."""
    from medflow.data.images import _laplacian

    rng = np.random.default_rng(3)
    for h, w in [(1, 1), (1, 7), (7, 1), (2, 2), *rng.integers(1, 70, (60, 2)).tolist()]:
        grey = rng.integers(0, 256, (h, w), dtype=np.uint8)
        np.testing.assert_array_equal(_laplacian(grey), cv2.Laplacian(grey, cv2.CV_16S))


def test_image_stats_equal_batch_stats() -> None:
    """The per-image path (plain floats) gives exactly the batch path's values (arrays, np.round)."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in rng.integers(1, 40, (200, 2))]
    images += [np.full((5, 7, 3), v, np.uint8) for v in (0, 1, 128, 255)]
    for img in images:
        assert image_stats(img) == dict(zip(STATS, batch_stats(img[None])[0].tolist(), strict=True))
    same = rng.integers(0, 256, (12, 9, 11, 3), dtype=np.uint8)
    assert [image_stats(img) for img in same] == [dict(zip(STATS, row, strict=True))
                                                   for row in batch_stats(same).tolist()]


def test_pixel_hash_is_of_pixels_and_shape_not_bytes(cell_png: bytes) -> None:
    rgb = decode_image(cell_png, **LIMITS).rgb
    as_bmp = encode(rgb[:, :, ::-1], ".bmp")
    assert as_bmp != cell_png
    assert pixel_hash(decode_image(as_bmp, **LIMITS).rgb) == pixel_hash(rgb)
    assert len(pixel_hash(rgb)) == 32 and int(pixel_hash(rgb), 16) >= 0
    changed = rgb.copy()
    changed[0, 0, 0] ^= 1
    assert pixel_hash(changed) != pixel_hash(rgb)
    tall = np.arange(36, dtype=np.uint8).reshape(2, 6, 3)
    assert pixel_hash(tall) != pixel_hash(tall.reshape(6, 2, 3))  # same bytes, other shape
