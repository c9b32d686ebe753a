"""Safe image decoding to 8-bit RGB, the one model-input resize, and cheap image statistics.

Every way an input can be unusable raises :class:`BadImage` with a reason code, so callers can
quarantine it instead of losing it. Dimensions are checked from the header *before* the pixels are
decoded (decompression-bomb guard). 16-bit images are scaled to 8 bits over the full range
(``v * 255 / 65535``), grey is replicated to RGB and alpha is composited on black.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import imagecodecs
import numpy as np
import xxhash
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:
    from medflow.config import DataConfig, IngestConfig

REASONS = (
    "empty_file", "not_an_image", "corrupt", "truncated", "unsupported_bit_depth",
    "unsupported_channels", "multi_frame", "too_small", "too_large", "decompression_bomb", "no_pixel_data",
    "missing_file", "conflicting_labels", "unreadable", "no_label", "not_dicom",
)
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})

_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpeg"), (b"BM", "bmp"),
    (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"),
)
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # IHDR colour type -> samples per pixel
# Our own max_pixels guard runs first; PIL's warning would only repeat it.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class BadImage(Exception):
    """An input that cannot be used; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown quarantine reason {reason!r}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Decoded:
    """A decoded image: ``rgb`` is uint8 H×W×3; the other fields describe the input as found."""

    rgb: np.ndarray
    format: str
    width: int
    height: int
    channels: int
    bit_depth: int
    meta: dict[str, Any] = field(default_factory=dict)  # DICOM: modality, pixel_spacing, ...


def check_dimensions(width: int, height: int, *, max_pixels: int, min_side: int, max_side: int) -> None:
    """Raise BadImage when a header's dimensions are absurd, before any pixel is decoded."""
    if width * height > max_pixels:
        raise BadImage("decompression_bomb", f"{width}x{height} = {width * height} pixels > max_pixels {max_pixels}")
    if max(width, height) > max_side:
        raise BadImage("too_large", f"{width}x{height}: a side exceeds max_side {max_side}")
    if min(width, height) < min_side:
        raise BadImage("too_small", f"{width}x{height}: a side is below min_side {min_side}")


def sniff_format(data: bytes) -> str | None:
    """'png' | 'jpeg' | 'bmp' | 'tiff' | 'dicom' from the leading bytes, else None."""
    if data[128:132] == b"DICM":
        return "dicom"
    for magic, fmt in _MAGIC:
        if data.startswith(magic):
            return fmt
    return None


def _header(data: bytes, fmt: str) -> tuple[int, int, int, str]:
    """(width, height, channels, PIL-style mode) from the header only."""
    if fmt == "png" and len(data) >= 26 and data[12:16] == b"IHDR":
        width, height, depth, ctype = struct.unpack(">IIBB", data[16:26])
        return width, height, _PNG_CHANNELS.get(ctype, 0), f"png{depth}"
    try:
        with Image.open(io.BytesIO(data), formats=("PNG", "JPEG", "BMP", "TIFF")) as im:
            return im.size[0], im.size[1], len(im.getbands()), im.mode
    except Image.DecompressionBombError as e:
        raise BadImage("decompression_bomb", str(e)) from None
    except (UnidentifiedImageError, OSError, ValueError, struct.error, SyntaxError) as e:
        raise BadImage("corrupt", f"unreadable {fmt} header: {e}") from None


def _jpeg_scan_start(data: bytes) -> int:
    """Offset of the main image's first start-of-scan marker (FFDA), found by skipping marker segments by
    their lengths, so a thumbnail inside an APP segment is not taken for it; ``len(data)`` when there is none."""
    i = 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xDA:
            return i
        if marker == 0xFF:  # fill byte
            i += 1
        elif 0xD0 <= marker <= 0xD9 or marker == 0x01:  # markers without a length
            i += 2
        else:
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return len(data)


def _check_complete(data: bytes, fmt: str) -> None:
    """Reject files cut short: no PNG IEND chunk, no JPEG end-of-image marker after the main scan starts.
    Bytes after the end marker (e.g. the video of a phone's "motion photo") are allowed."""
    if (fmt == "png" and data.rfind(b"IEND") < 0) or (  # rfind: the marker sits near the end
            fmt == "jpeg" and data.find(b"\xff\xd9", _jpeg_scan_start(data)) < 0):
        raise BadImage("truncated", f"{fmt} ends before its end marker ({len(data)} bytes)")
    if fmt == "bmp" and len(data) >= 6 and len(data) < struct.unpack("<I", data[2:6])[0]:
        raise BadImage("truncated", f"bmp has {len(data)} of {struct.unpack('<I', data[2:6])[0]} bytes")


def to_rgb8(img: np.ndarray, *, bgr: bool = False) -> np.ndarray:
    """uint8/uint16 grey, grey+alpha, RGB or RGBA array -> uint8 H×W×3 RGB."""
    if img.dtype == np.uint16:
        img = cv2.convertScaleAbs(img, alpha=255.0 / 65535.0)
    elif img.dtype != np.uint8:
        raise BadImage("unsupported_bit_depth", f"pixel type {img.dtype}")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise BadImage("unsupported_channels", f"array of shape {img.shape}")
    if img.shape[2] == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB) if bgr else np.ascontiguousarray(img)
    rgb = cv2.cvtColor(img, cv2.COLOR_BGRA2RGB if bgr else cv2.COLOR_RGBA2RGB)
    alpha = img[:, :, 3]
    if alpha.min() == 255:
        return rgb
    return cv2.multiply(rgb, cv2.merge([alpha, alpha, alpha]), scale=1.0 / 255.0)  # over black


def _decode_rgb8_png(data: bytes) -> np.ndarray | None:
    """An 8-bit RGB PNG (colour type 2) decoded by libspng (``imagecodecs``): the same pixels as OpenCV's
    libpng decode (PNG is lossless; tRNS ignored, no gamma applied, as ``IMREAD_COLOR_RGB``), ~25% faster, and
    the GIL is released. None when libspng refuses the file: OpenCV then decodes it or reports it corrupt."""
    try:
        img = imagecodecs.spng_decode(data)
    except imagecodecs.SpngError:
        return None
    return img if img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8 else None


def decode_image(data: bytes, *, max_pixels: int, min_side: int, max_side: int) -> Decoded:
    """Decode PNG/JPEG/BMP/TIFF bytes to RGB, checking header dimensions first."""
    if not data:
        raise BadImage("empty_file", "0 bytes")
    fmt = sniff_format(data)
    if fmt is None or fmt == "dicom":
        raise BadImage("not_an_image", f"no PNG/JPEG/BMP/TIFF or DICOM signature (starts {data[:8]!r})")
    _check_complete(data, fmt)
    width, height, channels, mode = _header(data, fmt)
    check_dimensions(width, height, max_pixels=max_pixels, min_side=min_side, max_side=max_side)
    if mode in ("F", "I") or mode.startswith(("F;", "I;32")):
        raise BadImage("unsupported_bit_depth", f"{fmt} mode {mode} (32-bit samples)")
    if fmt == "tiff" and mode == "CMYK" or channels not in (1, 2, 3, 4):
        raise BadImage("unsupported_channels", f"{fmt} with {channels} channels (mode {mode})")
    # plain 8-bit RGB decodes straight to RGB; anything else keeps its depth and alpha to be converted
    plain = channels == 3 and (fmt == "jpeg" or mode == "png8")
    img = _decode_rgb8_png(data) if plain and fmt == "png" else None
    if img is None:
        flags = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION if plain else cv2.IMREAD_UNCHANGED
        try:
            img = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
        except cv2.error as e:
            raise BadImage("corrupt", f"{fmt} decoder error: {e}") from None
    if img is None:
        raise BadImage("corrupt", f"{fmt} pixel data could not be decoded")
    bit_depth = 16 if img.dtype == np.uint16 else 8
    return Decoded(to_rgb8(img, bgr=not plain), fmt, width, height, channels, bit_depth)


def decode_array(arr: np.ndarray, *, max_pixels: int, min_side: int, max_side: int, fmt: str = "npz") -> Decoded:
    """An in-memory H×W, H×W×1, H×W×3 or H×W×4 (RGB order) uint8/uint16 array -> Decoded."""
    if arr.ndim not in (2, 3):
        raise BadImage("unsupported_channels", f"array of shape {arr.shape}")
    height, width = arr.shape[:2]
    check_dimensions(width, height, max_pixels=max_pixels, min_side=min_side, max_side=max_side)
    channels = 1 if arr.ndim == 2 else arr.shape[2]
    return Decoded(to_rgb8(arr), fmt, width, height, channels, 16 if arr.dtype == np.uint16 else 8)


def is_dicom(data: bytes, name: str = "") -> bool:
    """DICOM by the ``DICM`` magic at byte 128, or by a .dcm/.dicom file name."""
    return data[128:132] == b"DICM" or os.path.splitext(name)[1].lower() in DICOM_SUFFIXES


def decode_any(data: bytes, name: str, data_cfg: DataConfig, ingest_cfg: IngestConfig) -> Decoded:
    """Sniff the content (DICOM or image bytes) and decode it with the configured limits; with
    ``data.format: dicom`` anything else is ``not_dicom``."""
    limits = dict(max_pixels=ingest_cfg.max_pixels, min_side=ingest_cfg.min_side, max_side=ingest_cfg.max_side)
    if data and is_dicom(data, name):
        from medflow.data.dicom import decode_dicom

        return decode_dicom(data, data_cfg.dicom, **limits)
    if data and data_cfg.format == "dicom":
        fmt = sniff_format(data)
        raise BadImage("not_dicom", f"data.format is dicom but this is {f'a {fmt.upper()} image' if fmt else 'not DICOM'}"
                       " (no DICM marker at byte 128); set data.format: auto to read images and DICOM together")
    return decode_image(data, **limits)


def load_image_file(path: str | Path, data_cfg: DataConfig, ingest_cfg: IngestConfig) -> Decoded:
    """Read and decode one file (image or DICOM); raise BadImage when it cannot be used."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BadImage("missing_file", str(path)) from None
    except OSError as e:
        raise BadImage("unreadable", f"{path}: {e}") from None
    return decode_any(data, path.name, data_cfg, ingest_cfg)


def to_model_input(rgb: np.ndarray, size: int, channels: int) -> np.ndarray:
    """The one deterministic resize (INTER_AREA) to uint8 (size, size, channels)."""
    if rgb.shape[:2] != (size, size):
        rgb = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)
    if rgb.ndim == 2:
        rgb = cv2.cvtColor(rgb, cv2.COLOR_GRAY2RGB)
    if channels == 1:
        return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)[:, :, None]
    return np.ascontiguousarray(rgb)


STATS = ("mean", "std", "sharpness", "mean_r", "mean_g", "mean_b")
_LAPLACIAN = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], np.float32)


def _laplacian(grey: np.ndarray) -> np.ndarray:
    """``cv2.Laplacian(grey, cv2.CV_16S)`` (aperture 1, reflected borders), the same int16 values, through
    ``filter2D``: ~30% faster on cell-sized images."""
    return cv2.filter2D(grey, cv2.CV_16S, _LAPLACIAN, borderType=cv2.BORDER_REFLECT_101)


def batch_stats(rgb: np.ndarray) -> np.ndarray:
    """Per image of a uint8 N×H×W×3 batch: grey mean/std, sharpness (variance of the Laplacian) and
    per-channel means (0-255), as float64 N×6 in :data:`STATS` order, rounded to 4 decimals.

    Grey conversion and Laplacian are one OpenCV call for the whole batch: the images are stacked into
    one tall picture, each padded by one reflected row above and below so the Laplacian sees the same
    borders (``BORDER_REFLECT_101``) as on the image alone; the padding rows are then dropped.
    """
    n, h, w, _ = rgb.shape
    grey = cv2.cvtColor(rgb.reshape(n * h, w, 3), cv2.COLOR_RGB2GRAY).reshape(n, h, w)
    if n == 1:  # one image: OpenCV's own border handling, no padding copy
        lap = _laplacian(grey[0])[None]
    else:
        padded = np.pad(grey, ((0, 0), (1, 1), (0, 0)), mode="reflect" if h > 1 else "edge")
        lap = _laplacian(padded.reshape(-1, w)).reshape(padded.shape)[:, 1:h + 1]
    # exact integer sums (float64 holds them exactly) combined as OpenCV's meanStdDev / mean and image_stats
    # combine theirs, so the values are bit for bit image_stats' values, without a Python loop per image
    npx, out = h * w, np.empty((n, len(STATS)))
    scale = 1.0 / npx
    g = grey.reshape(n, npx).astype(np.float64)
    lp = lap.reshape(n, npx).astype(np.float64)
    out[:, 0] = g.sum(axis=1) * scale
    out[:, 1] = np.sqrt(np.maximum(np.einsum("ij,ij->i", g, g) * scale - out[:, 0] * out[:, 0], 0.0))
    out[:, 2] = np.einsum("ij,ij->i", lp, lp) / npx - (lp.sum(axis=1) / npx) ** 2
    out[:, 3:] = rgb.reshape(n, npx, 3).sum(axis=1, dtype=np.int64) * scale
    return np.round(out, 4)


def image_stats(rgb: np.ndarray) -> dict[str, float]:
    """:func:`batch_stats` of one uint8 H×W×3 image, by name: the same OpenCV calls and the same rounding
    (``rint(x * 1e4) / 1e4``, as ``np.round``) on plain floats, without batch arrays (ingest's per-image path)."""
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    lap = _laplacian(grey)
    mean, std = cv2.meanStdDev(grey)
    lap_mean = cv2.sumElems(lap)[0] / lap.size
    values = (mean[0, 0], std[0, 0], cv2.norm(lap, cv2.NORM_L2SQR) / lap.size - lap_mean**2, *cv2.mean(rgb)[:3])
    return {k: round(float(v) * 1e4) / 1e4 for k, v in zip(STATS, values, strict=True)}


def pixel_hash(rgb: np.ndarray) -> str:
    """xxh3-128 (32 hex digits) of the decoded 8-bit pixels and their shape: identical pixels hash alike
    whatever the file format or encoder (exact-duplicate detection). A non-cryptographic hash: ~1 µs for
    a 50 kB image against ~30 µs for sha256, and collisions are negligible (2^-64 at 2^32 images)."""
    h = xxhash.xxh3_128(("x".join(map(str, rgb.shape)) + "|").encode())
    h.update(np.ascontiguousarray(rgb).data)
    return h.hexdigest()
