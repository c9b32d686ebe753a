"""Memory of streaming the processed shards: N vs 4N images (target: flat, not proportional to the data).

    .venv/bin/python benchmarks/shards_memory.py [--n 3000] [--size 96]

Synthetic uint8 images (random pixels, 3 classes) are written with medflow's ``write_shards`` and read back
with ``shards.dataset`` (batch 32), unshuffled and with a 2 MB shuffle buffer, each in a fresh process with
MALLOC_ARENA_MAX=2 (glibc per-thread arenas of TF's reader threads otherwise add allocator slack). The
figure is the peak RSS growth over the whole stream, measured after 5 warm-up batches, beside the size
of the data it streamed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from medflow.config import DataConfig
from medflow.data.shards import write_shards

MEASURE = """
import json, sys, psutil
from medflow.data import shards
shards.SHUFFLE_BYTES = 2 * 2**20
proc, result = psutil.Process(), {}
for shuffle in (False, True):
    it = shards.dataset(sys.argv[1], "train", batch_size=32, shuffle=shuffle, seed=0).as_numpy_iterator()
    for _ in range(5):  # warm up the pipeline (buffers, kernels)
        next(it)
    base, peak, seen = proc.memory_info().rss, 0, 5 * 32
    for x, _ in it:
        seen += len(x)
        peak = max(peak, proc.memory_info().rss - base)
    result["shuffled" if shuffle else "in order"] = {"seen": seen, "peak": peak}
print(json.dumps(result))
"""


def make_processed(work: Path, n: int, size: int) -> Path:
    """Write ``n`` random images as one train split of shards under ``work/processed``."""
    rng = np.random.default_rng(0)
    np.save(work / "pixels.npy", rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8))
    ids = [f"img{i}.png" for i in range(n)]
    pd.DataFrame({"id": ids, "label": [("a", "b", "c")[i % 3] for i in range(n)], "row": range(n),
                  "group": ids}).to_csv(work / "manifest.csv", index=False)
    pd.DataFrame({"id": ids, "split": "train", "fold": -1}).to_csv(work / "splits.csv", index=False)
    write_shards(work / "manifest.csv", work / "pixels.npy", work / "splits.csv", work / "processed",
                 shard_size=256, data=DataConfig(), progress=False)
    (work / "pixels.npy").unlink()
    return work / "processed"


def measure(processed: Path) -> dict:
    env = os.environ | {"MALLOC_ARENA_MAX": "2", "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, "-c", MEASURE, str(processed)], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3000, help="images in the smaller run (the larger has 4x)")
    ap.add_argument("--size", type=int, default=96, help="image side in pixels")
    args = ap.parse_args()
    mib = 2**20
    results = {}
    for n in (args.n, 4 * args.n):
        with tempfile.TemporaryDirectory(prefix="medflow-shards-mem-") as tmp:
            results[n] = measure(make_processed(Path(tmp), n, args.size))
        data = n * args.size * args.size * 3 / mib
        for mode, r in results[n].items():
            assert r["seen"] == n, f"streamed {r['seen']} of {n} images"
            print(f"N={n:6d} ({data:4.0f} MiB as uint8), {mode:8s}: peak RSS growth {r['peak'] / mib:5.1f} MiB "
                  f"= {r['peak'] / mib / data:.1%} of the data")
    small, large = results[args.n], results[4 * args.n]
    extra = 3 * args.n * args.size * args.size * 3 / mib
    for mode in small:
        grew = (large[mode]["peak"] - small[mode]["peak"]) / mib
        print(f"{mode}: 4N - N peak RSS growth {grew:+.1f} MiB for {extra:.0f} MiB more data "
              f"(target: flat, i.e. far below the data's growth)")

if __name__ == "__main__":
    main()
