"""Ingest throughput vs the raw OpenCV limit (2 threads), on the malaria sample and BloodMNIST.

    .venv/bin/python benchmarks/ingest.py [--size 128] [--repeat 7] [--no-shards]

raw limit: list files + read bytes + cv2.imdecode + cv2.resize(INTER_AREA) on a 2-thread pool (npz: np.load +
resize, there is nothing to decode). ingest: ``medflow.data.ingest.ingest`` (workers=2), i.e. the same
work plus the file sha256, the pixel hash, statistics, quarantine checks and writing pixels.npy / manifest.csv.
ingest+preprocess adds ``split.run_split`` and ``shards.write_shards`` (fixed-length-record shards, 2 threads),
each run into empty folders as under ``dvc repro``. Best of --repeat rounds; each round runs raw, ingest and
split+shards once, in turn, so load changes on the shared machine hit all of them alike.

Data: the 400-image malaria sample at --size (params.yaml's 128 px); the same sample as its 8 dihedral
variants (3,200 PNGs, so per-image throughput is measured past the stages' fixed costs); BloodMNIST
(17,092 images; needs ../shared, skipped with a note when missing) at its native 28 px and at --size.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
MALARIA = ROOT / "data" / "raw" / "malaria-cells-400"
BLOOD = ROOT / ".." / "shared" / "datasets" / "medmnist" / "bloodmnist.npz"
BLOOD_NAMES = {"0": "basophil", "1": "eosinophil", "2": "erythroblast", "3": "immature granulocyte",
               "4": "lymphocyte", "5": "monocyte", "6": "neutrophil", "7": "platelet"}


Step = tuple[Callable[[], object], Callable[[], object]]  # (untimed setup, timed work)


def interleaved_best(steps: dict[str, Step], repeat: int) -> dict[str, tuple[float, float]]:
    """Best wall-clock and best CPU seconds (all threads) of each step over ``repeat`` rounds; every round
    runs each step once, in order, so load changes on the shared machine hit all of them alike."""
    wall: dict[str, list[float]] = {k: [] for k in steps}
    cpu: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeat):
        for name, (setup, fn) in steps.items():
            setup()
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    return {k: (min(wall[k]), min(cpu[k])) for k in steps}


def raw_files(root: Path, size: int) -> int:
    files = sorted(str(p) for p in root.glob("*/*.png"))  # listing counts: ingest lists the folder too

    def one(path: str) -> np.ndarray:
        with open(path, "rb") as f:
            img = cv2.imdecode(np.frombuffer(f.read(), np.uint8), cv2.IMREAD_COLOR)
        return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)

    with ThreadPoolExecutor(2) as pool:
        return len(list(pool.map(one, files)))


def raw_npz(size: int) -> int:
    with np.load(BLOOD) as z:
        images = [z[f"{s}_images"] for s in ("train", "val", "test")]
    with ThreadPoolExecutor(2) as pool:
        return sum(len(list(pool.map(lambda a: cv2.resize(a, (size, size), interpolation=cv2.INTER_AREA), imgs)))
                   for imgs in images)


def run(name: str, source: Path, raw: Callable[[int], int], data: object, size: int,
        args: argparse.Namespace) -> None:
    from medflow.config import IngestConfig, PreprocessConfig, SplitConfig
    from medflow.data.ingest import ingest

    cfg = IngestConfig(image_size=size, workers=2)
    n = raw(size)
    with tempfile.TemporaryDirectory(prefix="medflow-bench-") as tmp:
        out = Path(tmp)

        def run_preprocess() -> None:
            from medflow.data.shards import write_shards
            from medflow.data.split import run_split

            run_split(out / "interim" / "manifest.csv", out / "splits.csv", out / "counts.csv", SplitConfig())
            write_shards(out / "interim" / "manifest.csv", out / "interim" / "pixels.npy", out / "splits.csv",
                         out / "processed", shard_size=PreprocessConfig().shard_size,
                         workers=PreprocessConfig().workers, data=data, progress=False)

        # each stage writes into an empty folder, as under `dvc repro` (it removes a stage's outputs first)
        steps: dict[str, Step] = {
            "raw": (lambda: None, lambda: raw(size)),
            "ingest": (lambda: shutil.rmtree(out / "interim", ignore_errors=True),
                       lambda: ingest(source, out / "interim", data, cfg, progress=False)),
        }
        if args.shards:
            steps["pre"] = (lambda: shutil.rmtree(out / "processed", ignore_errors=True), run_preprocess)
        with contextlib.redirect_stderr(io.StringIO()):  # the stages' one-line summaries, once per round
            best = interleaved_best(steps, args.repeat)
        (t_raw, c_raw), (t_ingest, c_ingest) = best["raw"], best["ingest"]
        line = (f"{name}: {n} images at {size}px | raw cv2 decode+resize (2 threads) {n / t_raw:,.0f} img/s | "
                f"ingest {n / t_ingest:,.0f} img/s = {t_raw / t_ingest:.0%} of raw "
                f"(CPU per image {c_ingest / n * 1e6:,.0f} vs {c_raw / n * 1e6:,.0f} us = {c_raw / c_ingest:.0%})")
        if args.shards:
            t_pre = best["pre"][0]
            line += (f" | ingest+preprocess {n / (t_ingest + t_pre):,.0f} img/s = "
                     f"{t_raw / (t_ingest + t_pre):.0%} of raw (split+shards {t_pre * 1e3:,.0f} ms)")
        print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128, help="ingest.image_size (default 128, as params.yaml)")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--no-shards", dest="shards", action="store_false", help="measure ingest alone")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from medflow.config import DataConfig

    if args.shards:
        import tensorflow  # noqa: F401  (imported before timing: its start-up is not ingest cost)

    run("malaria-cells-400", MALARIA, lambda s: raw_files(MALARIA, s), DataConfig(), args.size, args)
    with tempfile.TemporaryDirectory(prefix="medflow-bench-variants-") as tmp:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from train_pipeline import replicate  # the training benchmark's dihedral variants

        variants = Path(tmp)
        replicate(variants, 8)
        run("malaria x8 dihedral variants", variants, lambda s: raw_files(variants, s), DataConfig(), args.size, args)
    if BLOOD.is_file():
        for size in dict.fromkeys((28, args.size)):
            run("bloodmnist", BLOOD, raw_npz, DataConfig(label_names=BLOOD_NAMES), size, args)
    else:
        print(f"bloodmnist: skipped, {BLOOD} not found (../shared is optional)")


if __name__ == "__main__":
    main()
