"""DICOM -> 8-bit RGB: Hounsfield units, padding as air, window presets, MONOCHROME1 inversion.

CT: stored values go through the modality LUT (RescaleSlope/Intercept) to HU; pixels equal to
PixelPaddingValue (or inside the PixelPaddingRangeLimit range) and HU below -1024 (not a physical
attenuation, e.g. the -2000 ring outside the scan circle) become ``padding_hu`` (air). A window
(level L, width W) maps ``L - W/2 .. L + W/2`` linearly to 0..255, rounded, clipped. Presets are HU
windows and apply to CT only; other modalities use the file's own VOI window, else min-max; a
``custom`` level/width applies to every modality, in its own units (HU for CT). PALETTE COLOR
images go through their colour lookup table (16-bit entries keep their high byte).
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut

from medflow.data.images import BadImage, Decoded, check_dimensions, to_rgb8

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from medflow.config import DicomSource

# (level, width) in HU
PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "soft_tissue": (40.0, 400.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
HU_FLOOR = -1024.0  # below: padding / outside the reconstruction circle


def apply_window(values: np.ndarray, level: float, width: float) -> np.ndarray:
    """Linear window ``level ± width/2`` -> uint8 0..255 (rounded, clipped)."""
    scaled = (np.asarray(values, np.float64) - (level - width / 2.0)) * 255.0 / width
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _padding_mask(ds: Dataset, stored: np.ndarray) -> np.ndarray:
    pad = ds.get("PixelPaddingValue")
    if pad is None:
        return np.zeros(stored.shape, bool)
    limit = ds.get("PixelPaddingRangeLimit")
    if limit is None:
        return stored == pad
    return (stored >= min(pad, limit)) & (stored <= max(pad, limit))


def hounsfield(ds: Dataset, stored: np.ndarray, padding_hu: float) -> np.ndarray:
    """Stored CT values -> float32 HU with padding and sub-air values set to ``padding_hu``."""
    hu = np.asarray(apply_modality_lut(stored, ds), np.float32)
    hu[_padding_mask(ds, stored) | (hu < HU_FLOOR)] = padding_hu
    return hu


def _first(value: object) -> float:
    return float(value[0] if isinstance(value, MultiValue) else value)  # type: ignore[index, arg-type]


def _file_window(ds: Dataset) -> tuple[float, float] | None:
    centre, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if centre is None or width is None or _first(width) <= 0:
        return None
    return _first(centre), _first(width)


def choose_window(ds: Dataset, values: np.ndarray, cfg: DicomSource, *, is_ct: bool) -> tuple[float, float, str]:
    """(level, width, label) for the configured window; the label is stored in the manifest."""
    if cfg.window == "custom":
        return float(cfg.level), float(cfg.width), f"custom:{cfg.level:g}/{cfg.width:g}"  # type: ignore[arg-type]
    if is_ct and cfg.window in PRESETS:
        level, width = PRESETS[cfg.window]
        return level, width, f"{cfg.window}:{level:g}/{width:g}"
    from_file = _file_window(ds)
    if from_file is not None:
        return from_file[0], from_file[1], f"file:{from_file[0]:g}/{from_file[1]:g}"
    lo, hi = float(values.min()), float(values.max())
    width = max(hi - lo, 1.0)
    return lo + width / 2.0, width, f"minmax:{lo:g}/{hi:g}"


def _spacing(ds: Dataset) -> float | None:
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    value = float(spacing[0]) if spacing else 0.0
    return value if value > 0 else None


def _read(data: bytes) -> Dataset:
    try:
        return pydicom.dcmread(io.BytesIO(data))
    except InvalidDicomError as e:
        raise BadImage("not_an_image", f"not a DICOM file: {e}") from None
    except EOFError as e:
        raise BadImage("truncated", f"DICOM ends early: {e}") from None
    except Exception as e:  # pydicom raises many types on malformed files
        raise BadImage("corrupt", f"DICOM could not be parsed: {type(e).__name__}: {e}") from None


def _stored_pixels(ds: Dataset) -> np.ndarray:
    if "PixelData" not in ds:
        raise BadImage("no_pixel_data", "DICOM has no PixelData element")
    bits, samples = int(ds.get("BitsAllocated", 0)), int(ds.get("SamplesPerPixel", 1))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if bits not in (8, 16, 32):
        raise BadImage("unsupported_bit_depth", f"DICOM BitsAllocated {bits}")
    if frames != 1:
        raise BadImage("multi_frame", f"DICOM with {frames} frames (one image per file is supported)")
    if samples not in (1, 3):
        raise BadImage("unsupported_channels", f"DICOM with {samples} samples per pixel")
    if not ds.file_meta.TransferSyntaxUID.is_compressed:
        expected = int(ds.Rows) * int(ds.Columns) * samples * bits // 8
        if len(ds.PixelData) < expected:
            raise BadImage("truncated", f"DICOM PixelData has {len(ds.PixelData)} of {expected} bytes")
    try:
        return ds.pixel_array
    except Exception as e:  # missing codec plugin, corrupt compressed stream, ...
        raise BadImage("unreadable", f"DICOM pixels could not be decoded: {type(e).__name__}: {e}") from None


def _palette_rgb(ds: Dataset, stored: np.ndarray) -> np.ndarray:
    """PALETTE COLOR indices -> uint8 RGB through the file's lookup table."""
    try:
        rgb = apply_color_lut(stored, ds)
    except Exception as e:  # noqa: BLE001 - a missing or malformed lookup table raises many types
        raise BadImage("corrupt", f"DICOM palette could not be applied: {type(e).__name__}: {e}") from None
    bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    return (rgb >> (bits - 8)).astype(np.uint8) if bits > 8 else rgb.astype(np.uint8)


def decode_dicom(data: bytes, cfg: DicomSource, *, max_pixels: int, min_side: int, max_side: int) -> Decoded:
    """Decode one DICOM file to RGB using the configured window; metadata goes to ``meta``."""
    ds = _read(data)
    if "PixelData" in ds:
        check_dimensions(int(ds.Columns), int(ds.Rows), max_pixels=max_pixels, min_side=min_side, max_side=max_side)
    stored = _stored_pixels(ds)
    samples = int(ds.get("SamplesPerPixel", 1))
    modality = str(ds.get("Modality", ""))
    if samples == 3:
        rgb, window = to_rgb8(stored), "none"
    elif ds.get("PhotometricInterpretation") == "PALETTE COLOR":
        rgb, window, samples = _palette_rgb(ds, stored), "palette", 3
    else:
        is_ct = modality == "CT"
        if is_ct:
            values = hounsfield(ds, stored, cfg.padding_hu)
        else:
            values = np.asarray(apply_modality_lut(stored, ds), np.float32)
            pad = _padding_mask(ds, stored)
            if pad.any() and not pad.all():
                values[pad] = values[~pad].min()
        level, width, window = choose_window(ds, values, cfg, is_ct=is_ct)
        grey = apply_window(values, level, width)
        if ds.get("PhotometricInterpretation") == "MONOCHROME1":
            grey = 255 - grey
        rgb = to_rgb8(grey)
    thickness = ds.get("SliceThickness")
    meta = {
        "modality": modality,
        "pixel_spacing": _spacing(ds),
        "slice_thickness": float(thickness) if thickness not in (None, "") else None,
        "window": window,
        "patient_id": str(ds.get("PatientID", "")) or None,
    }
    return Decoded(rgb, "dicom", int(ds.Columns), int(ds.Rows), samples, int(ds.BitsAllocated), meta)
