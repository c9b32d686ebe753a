"""Shared by the serve tests and benchmarks/serve.py: a tiny contract-shaped champion, sample and bomb images."""

from __future__ import annotations

import json
import struct
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "data" / "raw" / "malaria-cells-400"
CLASSES = ["Parasitized", "Uninfected"]
HELD_OUT = 20  # sample_pngs(HELD_OUT): left out of the tiny champion's input profile, as unseen cells


def sample_pngs(n: int) -> list[Path]:
    """``n`` real PNGs from the embedded malaria sample, alternating classes."""
    per_class = [sorted((SAMPLE / c).glob("*.png")) for c in CLASSES]
    files = [f for pair in zip(*per_class) for f in pair][:n]
    assert len(files) == n, f"embedded sample {SAMPLE} has fewer than {n} images"
    return files


def manifest_rows(files: list[Path]) -> list[dict[str, Any]]:
    """The manifest fields ingest records for ``files`` (format, channels, bit depth, statistics, ...)."""
    from medflow.config import DataConfig, IngestConfig
    from medflow.data.ingest import process_record
    from medflow.data.sources import Record

    rows = []
    for f in files:
        fields, _, _, problem = process_record(Record(f.name, f.parent.name, file=str(f)), DataConfig(), IngestConfig())
        assert problem is None and fields is not None, (f, problem)
        rows.append({"id": f"{f.parent.name}/{f.name}", **fields})
    return rows


@lru_cache(maxsize=1)
def sample_profile() -> dict[str, Any]:
    """The input profile `medflow compare` records (:func:`medflow.evaluate.input_profile`) for the embedded
    sample as training data, less the :data:`HELD_OUT` images the tests upload as unseen cells."""
    import pandas as pd

    from medflow.evaluate import input_profile

    held_out = set(sample_pngs(HELD_OUT))
    train = [f for c in CLASSES for f in sorted((SAMPLE / c).glob("*.png")) if f not in held_out]
    return input_profile(pd.DataFrame(manifest_rows(train)))


def make_tiny_champion(out_dir: Path, image_size: int = 32, *, profile: bool = True) -> Path:
    """Save a small functional Keras model (contract layer names) and a champion.json naming it; with
    ``profile``, the record has the sample's :func:`sample_profile` (as `medflow compare` writes it)."""
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((image_size, image_size, 3), dtype="float32")
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="features")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(8, activation="relu", name="embedding")(x)
    outputs = keras.layers.Dense(len(CLASSES), activation="softmax", dtype="float32", name="probs")(x)
    model = keras.Model(inputs, outputs)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / "model.keras"
    model.save(model_path)
    record = {
        "model": "tiny_cnn", "model_path": str(model_path), "classes": CLASSES, "image_size": image_size,
        "channels": 3, "ordered": False, "metric": "macro_f1",
        "metrics": {"macro_f1": 0.61, "accuracy": 0.62, "roc_auc": 0.66, "n": 120},  # a fixture record
        "data_hash": "d" * 8, "params_hash": "p" * 8, "version": "tiny_cnn-0123abcd",
        "created": "2025-01-01T00:00:00+00:00",
    }
    if profile:
        record["input_profile"] = sample_profile()
    champion = out_dir / "champion.json"
    champion.write_text(json.dumps(record))
    return champion


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def png_bytes_with_header(width: int, height: int, idat: bytes) -> bytes:
    """A PNG (8-bit grey) whose IHDR claims width×height, with the given compressed IDAT payload."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def sparse_png(side: int) -> bytes:
    """A real, valid all-black grey PNG of side×side pixels that compresses to a few hundred KB."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte + pixels
    return png_bytes_with_header(side, side, b"".join(comp.compress(row) for _ in range(side)) + comp.flush())
