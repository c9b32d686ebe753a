"""Tiny processed-shard folders for model/train tests, written with medflow.data.shards.write_shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from medflow.config import DataConfig
from medflow.data.shards import write_shards


def make_processed(root: Path, counts: dict[str, int], *, size: int = 32, channels: int = 3, seed: int = 0,
                   every: int = 2) -> Path:
    """Write ``root/processed`` with two classes ('a' dark blobs, 'b' bright blobs) and ``counts`` per split.

    Every ``every``-th image of a split is 'b' (2: the classes alternate, balanced), so each split holds both
    classes (a class-dependent signal plus noise). Images whose ids end in the same digit share a slide
    (``group``), across splits.
    """
    rng = np.random.default_rng(seed)
    rows = [(split, int(i % every == every - 1)) for split, n in counts.items() for i in range(n)]
    pixels = rng.integers(0, 60, size=(len(rows), size, size, channels)).astype(np.uint8)
    c = size // 2
    for r, (_, label) in enumerate(rows):
        pixels[r, c - size // 4:c + size // 4, c - size // 4:c + size // 4] += np.uint8(60 + 120 * label)
    ids = [f"img{r:04d}" for r in range(len(rows))]
    interim = root / "interim"
    interim.mkdir(parents=True, exist_ok=True)
    np.save(interim / "pixels.npy", pixels)
    pd.DataFrame({"id": ids, "label": ["ab"[label] for _, label in rows], "row": range(len(rows)),
                  "group": [f"slide{i[-1]}" for i in ids]}).to_csv(interim / "manifest.csv", index=False)
    pd.DataFrame({"id": ids, "split": [s for s, _ in rows]}).to_csv(interim / "splits.csv", index=False)
    out = root / "processed"
    write_shards(interim / "manifest.csv", interim / "pixels.npy", interim / "splits.csv", out,
                 shard_size=16, data=DataConfig(), progress=False)
    return out
