"""Does an input look like the champion's training data? Warnings from the record's ``input_profile``.

The profile (written by :func:`medflow.evaluate.input_profile` from the train split's manifest rows) lists
the formats, channel counts, bit depths and DICOM modalities of the training images and robust bounds of
their statistics. An input is described the same way ingest described those rows: as found (format,
channels, bit depth, modality) and by ingest's own :func:`~medflow.data.images.image_stats` of the decoded
8-bit RGB image at its own size. Every mismatch becomes one human-readable warning; the prediction is still
made (a warning, not a refusal). A record without a profile (written before it existed) checks nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from medflow.data.images import Decoded, image_stats

STAT_LABELS = {
    "mean": "mean brightness",
    "std": "contrast (grey-level std)",
    "sharpness": "sharpness (variance of the Laplacian)",
}
_CHANNEL_KINDS = {1: "grayscale", 2: "grayscale with alpha", 3: "colour", 4: "colour with alpha"}
_FORMAT_NAMES = {"npz": "NumPy-array (npz)"}


def describe(decoded: Decoded) -> dict[str, Any]:
    """What :func:`check_input` compares, as ingest records it in the manifest: format, channels and bit depth
    as found, the DICOM modality (None otherwise) and the statistics of the decoded 8-bit RGB pixels."""
    return {"format": decoded.format, "channels": decoded.channels, "bit_depth": decoded.bit_depth,
            "modality": decoded.meta.get("modality"), **image_stats(decoded.rgb)}


def input_warnings(decoded: Decoded, profile: Mapping[str, Any] | None) -> list[str]:
    """:func:`check_input` of a decoded input; no statistics are computed when there is no profile."""
    return check_input(describe(decoded), profile) if profile else []


def _fmt_name(fmt: str) -> str:
    return _FORMAT_NAMES.get(fmt, fmt.upper())


def _names(values: list[Any], fmt: Any = str) -> str:
    return "/".join(fmt(v) for v in values)


def _number(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}"


def _channels(n: int) -> str:
    return f"{_CHANNEL_KINDS.get(n, 'unusual')} ({n} channel{'' if n == 1 else 's'})"


def check_input(info: Mapping[str, Any], profile: Mapping[str, Any] | None) -> list[str]:
    """Warnings for an input ``info`` (the keys of :func:`describe`, or a manifest row) that does not match
    ``profile``; empty when it matches or when there is no profile.

    * kind: a DICOM input when no training image was DICOM, an ordinary image file when all were, a DICOM
      modality that none had. PNG, JPEG, BMP, TIFF and npz arrays are one kind (the same picture may come in
      any of them; the statistics below judge the content);
    * colour: a grayscale input when every training image was colour (3 or 4 channels), or the reverse;
    * bit depth: one no training image had (a 16-bit file is scaled to 8 bits over the full range);
    * statistics: each of the profile's ``stats`` outside its ``[lo, hi]`` bounds.
    """
    if not profile:
        return []
    warnings: list[str] = []
    fmt = str(info.get("format") or "").lower()
    modality = str(info.get("modality") or "")
    formats = [str(f).lower() for f in profile.get("formats") or []]
    modalities = [str(m) for m in profile.get("modalities") or []]
    if formats:
        if fmt == "dicom" and "dicom" not in formats:
            warnings.append(f"DICOM{' ' + modality if modality else ''} but the model was trained on "
                            f"{_names(formats, _fmt_name)} images")
        elif fmt != "dicom" and set(formats) == {"dicom"}:
            trained = f"DICOM {_names(modalities)}" if modalities else "DICOM"
            warnings.append(f"{_fmt_name(fmt)} image but the model was trained on {trained} images")
        elif fmt == "dicom" and modalities and modality not in modalities:
            warnings.append(f"DICOM {modality or 'without a modality'} but the model was trained on "
                            f"DICOM {_names(modalities)} images")

    trained_channels = sorted({int(c) for c in profile.get("channels") or []})
    channels = info.get("channels")
    if trained_channels and channels is not None:
        colour = int(channels) >= 3
        if all((c >= 3) != colour for c in trained_channels):  # no training image of the input's kind
            warnings.append(f"{_channels(int(channels))} but the model was trained on {_names(trained_channels)}"
                            f"-channel ({'grayscale' if colour else 'colour'}) images")

    depths = sorted({int(b) for b in profile.get("bit_depths") or []})
    depth = info.get("bit_depth")
    if depths and depth is not None and int(depth) not in depths:
        warnings.append(f"{int(depth)}-bit but the model was trained on {_names(depths)}-bit images")

    for name, bounds in (profile.get("stats") or {}).items():
        try:
            value, lo, hi = float(info[name]), float(bounds[0]), float(bounds[1])
        except (KeyError, TypeError, ValueError, IndexError):  # not measured, or not a [lo, hi] pair
            continue
        if not math.isnan(value) and not lo <= value <= hi:
            warnings.append(f"{STAT_LABELS.get(name, name)} {_number(value)} outside the training range "
                            f"{_number(lo)} to {_number(hi)}")
    return warnings
