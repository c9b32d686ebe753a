"""Realistic monitoring batches: held-out images with a controlled shift, written as a class-per-folder
source (PNG, or JPEG for the ``jpeg`` shift) that ``medflow ingest`` / ``medflow monitor`` read.

Shifts (``strength`` 0..1; 0 or ``none`` = the images unchanged):
  stain       colour deconvolution into haematoxylin/eosin/DAB optical densities (Ruifrok & Johnston
              2001), H scaled up and E down, recomposed (another lab's staining)
  brightness  + up to 60 grey levels        contrast    deviations from the mean scaled down to 30 %
  blur        Gaussian, sigma up to 3 px    jpeg        quality 90 -> 5
  resolution  downscaled to 25 % (min 8 px) noise       Gaussian, sigma up to 30 grey levels
  prior       class-prior shift: a seeded class takes over (strength 1 = every image)
``shuffle_labels`` writes images under wrong class folders (labels no longer match: performance drops).
A batch made from the pipeline's own held-out split (``make_batch``, what ``medflow simulate-batch`` runs)
carries a hidden ``.medflow-simulated.json`` (its settings), so retraining never adds it to the training data.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import pandas as pd

from medflow.config import DataConfig, IngestConfig

SIMULATED_MARKER = ".medflow-simulated.json"  # hidden: ingest skips it; retraining refuses the batch

Shift = Literal["none", "stain", "brightness", "contrast", "blur", "jpeg", "resolution", "noise", "prior"]
SHIFTS: tuple[str, ...] = Shift.__args__  # type: ignore[attr-defined]

# Rows: optical density of haematoxylin, eosin, DAB in R, G, B (Ruifrok & Johnston 2001).
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_RGB_FROM_HED /= np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)


def held_out(source: str | Path, manifest_csv: str | Path, splits_csv: str | Path, data: DataConfig,
             ingest_cfg: IngestConfig, *, split: str = "test") -> tuple[list[np.ndarray], list[str]]:
    """Original-resolution RGB images and labels of the ``split`` rows, decoded by ``medflow.data``."""
    from medflow.data.images import decode_array, load_image_file
    from medflow.data.sources import detect_format, list_records

    source = Path(source)
    manifest = pd.read_csv(manifest_csv, dtype={"id": str, "path": str, "label": str})
    splits = pd.read_csv(splits_csv, dtype={"id": str})
    wanted = manifest[manifest["id"].isin(splits.loc[splits["split"] == split, "id"])]
    if wanted.empty:
        raise ValueError(f"{splits_csv}: no {split!r} rows of {manifest_csv}")
    fmt = detect_format(source) if data.format == "auto" else data.format
    records = {r.path: r for r in list_records(source, fmt, data)}
    limits = {"max_pixels": ingest_cfg.max_pixels, "min_side": ingest_cfg.min_side, "max_side": ingest_cfg.max_side}
    images, labels = [], []
    for path, label in zip(wanted["path"], wanted["label"]):
        rec = records.get(path)
        if rec is None:
            raise FileNotFoundError(f"{source}: no longer holds {path} (listed in {manifest_csv})")
        dec = decode_array(rec.array, **limits) if rec.array is not None else load_image_file(rec.file, data, ingest_cfg)
        images.append(dec.rgb)
        labels.append(label)
    return images, labels


def _stain(rgb: np.ndarray, s: float) -> np.ndarray:
    od = -np.log(np.maximum(rgb.astype(np.float64), 1.0) / 255.0)
    hed = od.reshape(-1, 3) @ _HED_FROM_RGB
    hed *= np.array([1.0 + 0.8 * s, 1.0 - 0.5 * s, 1.0])
    out = 255.0 * np.exp(-(hed @ _RGB_FROM_HED))
    return out.reshape(rgb.shape)


def apply_shift(rgb: np.ndarray, shift: str, strength: float, rng: np.random.Generator) -> np.ndarray:
    """One image (uint8 H×W×3) with a pixel-level ``shift`` of ``strength`` 0..1 (``prior``/``jpeg``: unchanged)."""
    s = float(np.clip(strength, 0.0, 1.0))
    if s == 0 or shift in ("none", "prior", "jpeg"):
        return rgb
    x = rgb.astype(np.float64)
    if shift == "stain":
        x = _stain(rgb, s)
    elif shift == "brightness":
        x = x + 60.0 * s
    elif shift == "contrast":
        x = x.mean() + (x - x.mean()) * (1.0 - 0.7 * s)
    elif shift == "blur":
        x = cv2.GaussianBlur(x, (0, 0), sigmaX=3.0 * s)
    elif shift == "noise":
        x = x + rng.normal(0.0, 30.0 * s, size=x.shape)
    elif shift == "resolution":
        h, w = rgb.shape[:2]
        f = 1.0 - 0.75 * s
        size = (max(8, round(w * f)), max(8, round(h * f)))
        return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    else:
        raise ValueError(f"unknown shift {shift!r}; one of {SHIFTS}")
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _choose(labels: np.ndarray, n: int, shift: str, s: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of the batch: uniform without replacement, or prior-shifted towards one class."""
    if shift != "prior" or s == 0:
        return rng.choice(len(labels), n, replace=n > len(labels))
    classes, counts = np.unique(labels, return_counts=True)
    dominant = rng.integers(len(classes))
    target = (1 - s) * counts / counts.sum() + s * (np.arange(len(classes)) == dominant)
    per_class = rng.multinomial(n, target)
    idx = [rng.choice(np.flatnonzero(labels == c), k, replace=k > counts[i])
           for i, (c, k) in enumerate(zip(classes, per_class)) if k]
    return rng.permutation(np.concatenate(idx))


def simulate_batch(images: list[np.ndarray], labels: list[str], out_dir: str | Path, *, shift: str = "none",
                   strength: float = 0.5, n: int = 100, seed: int = 0, shuffle_labels: bool = False,
                   mark: bool = False) -> dict[str, Any]:
    """Write ``n`` of ``images`` (RGB uint8) with ``shift`` applied as ``out_dir/<label>/<i>.png|jpg``;
    ``mark``: also write :data:`SIMULATED_MARKER` (the images are the pipeline's own data)."""
    if shift not in SHIFTS:
        raise ValueError(f"unknown shift {shift!r}; one of {SHIFTS}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty")
    rng = np.random.default_rng(seed)
    s = float(np.clip(strength, 0.0, 1.0))
    labels_arr = np.asarray(labels, dtype=object)
    idx = _choose(labels_arr, n, shift, s, rng)
    written = labels_arr[idx]
    if shuffle_labels:
        written = rng.permutation(written)
    quality = round(90 - 85 * s)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    values, counts = np.unique(written, return_counts=True)
    summary = {"out_dir": str(out_dir), "n": len(idx), "shift": shift, "strength": s, "seed": seed,
               "shuffle_labels": shuffle_labels, "per_class": {str(v): int(c) for v, c in zip(values, counts)}}
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        if mark:
            (tmp / SIMULATED_MARKER).write_text(json.dumps(summary, indent=2) + "\n")
        for i, (j, label) in enumerate(zip(idx, written)):
            bgr = cv2.cvtColor(apply_shift(images[j], shift, s, rng), cv2.COLOR_RGB2BGR)
            (tmp / label).mkdir(exist_ok=True)
            if shift == "jpeg":
                ok = cv2.imwrite(str(tmp / label / f"{i:05d}.jpg"), bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
            else:
                ok = cv2.imwrite(str(tmp / label / f"{i:05d}.png"), bgr)
            if not ok:
                raise OSError(f"could not write image {i} to {tmp / label}")
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def simulation_settings(batch: str | Path) -> dict[str, Any] | None:
    """The settings :data:`SIMULATED_MARKER` records when ``batch`` was made by ``medflow simulate-batch``
    ({} when the marker cannot be read); None for any other batch (a file source is never simulated)."""
    marker = Path(batch) / SIMULATED_MARKER
    if not marker.is_file():
        return None
    try:
        settings = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return settings if isinstance(settings, dict) else {}


def make_batch(source: str | Path, manifest_csv: str | Path, splits_csv: str | Path, out_dir: str | Path,
               data: DataConfig, ingest_cfg: IngestConfig, *, split: str = "test", **kwargs: Any) -> dict[str, Any]:
    """``simulate_batch`` from the held-out ``split`` of an ingested source (what `medflow simulate-batch` runs)."""
    images, labels = held_out(source, manifest_csv, splits_csv, data, ingest_cfg, split=split)
    return simulate_batch(images, labels, out_dir, mark=True, **kwargs)
