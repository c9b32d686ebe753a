"""Per-image cost of each ingest step on one thread (malaria sample), beside the raw OpenCV reference.

    .venv/bin/python benchmarks/ingest_steps.py [--size 128] [--repeat 5]

Best of --repeat loops over the 400 PNGs already read into memory (except "read bytes" and the two whole
paths). Shows what ingest adds to decode + resize: the file sha256, the pixel hash and the statistics.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from medflow.config import DataConfig, IngestConfig
from medflow.data import images
from medflow.data.ingest import process_record
from medflow.data.sources import detect_format, list_records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    cv2.setNumThreads(1)
    source, data, cfg = ROOT / "data" / "raw" / "malaria-cells-400", DataConfig(), IngestConfig(image_size=args.size)
    records = list_records(source, detect_format(source), data)
    files = [r.file for r in records]
    blobs = [Path(f).read_bytes() for f in files]
    decoded = [cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR_RGB) for b in blobs]
    limits = {"max_pixels": cfg.max_pixels, "min_side": cfg.min_side, "max_side": cfg.max_side}
    size = (args.size, args.size)

    def raw(f: str) -> np.ndarray:
        img = cv2.imdecode(np.frombuffer(Path(f).read_bytes(), np.uint8), cv2.IMREAD_COLOR)
        return cv2.resize(img, size, interpolation=cv2.INTER_AREA)

    steps: dict[str, Callable[[], object]] = {
        "read bytes": lambda: [Path(f).read_bytes() for f in files],
        "decode (medflow decode_image)": lambda: [images.decode_image(b, **limits) for b in blobs],
        "resize (to_model_input)": lambda: [images.to_model_input(d, args.size, 3) for d in decoded],
        "file sha256": lambda: [hashlib.sha256(b).hexdigest() for b in blobs],
        "pixel hash": lambda: [images.pixel_hash(d) for d in decoded],
        "statistics": lambda: [images.image_stats(d) for d in decoded],
        "whole process_record": lambda: [process_record(r, data, cfg) for r in records],
        "raw reference: read + imdecode + resize": lambda: [raw(f) for f in files],
    }
    print(f"{len(files)} PNGs, {args.size}px, one thread, best of {args.repeat}")
    for name, fn in steps.items():
        best = min(_timed(fn) for _ in range(args.repeat))
        print(f"{name:40s} {best / len(files) * 1e6:7.1f} us/image")


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
