"""Ingest throughput vs the raw OpenCV limit (2 threads), on the malaria sample and BloodMNIST.

    .venv/bin/python benchmarks/ingest.py [--size 128] [--repeat 7] [--min-time 5] [--no-shards]

raw limit: list files + read bytes + cv2.imdecode + cv2.resize(INTER_AREA) on a 2-thread pool (npz: np.load +
resize, there is nothing to decode). ingest: ``medflow.data.ingest.ingest`` (workers=2), i.e. the same
work plus the file sha256, the pixel hash, statistics, quarantine checks and writing pixels.npy / manifest.csv.
ingest+preprocess: ``ingest`` and the ``preprocess`` stage's ``shards.write_shards`` (fixed-length-record
shards, 2 threads), the two stages that read, decode, resize and store the images. The ``split`` stage between
them (``split.run_split``: no image work, like ``validate``, which is not timed at all) is timed too, and the
figure with it added is printed beside. Every stage runs into empty folders, as under ``dvc repro``.

Best of at least --repeat rounds, and of as many more as it takes for the raw runs to add up to --min-time
seconds (a 0.1 s run's best of 7 swings with the shared machine's load); each round runs raw, ingest, split and
preprocess once, in turn, so load changes hit all of them alike. The median of the rounds' own ratios is
printed beside each best-of ratio.

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


def interleaved(steps: dict[str, Step], repeat: int, min_time: float) -> tuple[dict[str, list[float]],
                                                                              dict[str, list[float]]]:
    """Wall-clock and CPU seconds (all threads) of each step per round, over at least ``repeat`` rounds and
    until the first step's wall times add up to ``min_time``; every round runs each step once, in order, so
    load changes on the shared machine hit all of them alike."""
    wall: dict[str, list[float]] = {k: [] for k in steps}
    cpu: dict[str, list[float]] = {k: [] for k in steps}
    first = next(iter(steps))
    while len(wall[first]) < repeat or sum(wall[first]) < min_time:
        for name, (setup, fn) in steps.items():
            setup()
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    return wall, cpu


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
    from medflow.data.shards import write_shards
    from medflow.data.split import run_split

    cfg = IngestConfig(image_size=size, workers=2)
    n = raw(size)
    with tempfile.TemporaryDirectory(prefix="medflow-bench-") as tmp:
        out = Path(tmp)

        def clear(*paths: Path) -> Callable[[], None]:
            def remove() -> None:
                for p in paths:
                    if p.is_dir():
                        shutil.rmtree(p)
                    elif p.exists():
                        p.unlink()
            return remove

        # each stage writes into an empty folder, as under `dvc repro` (it removes a stage's outputs first)
        steps: dict[str, Step] = {
            "raw": (lambda: None, lambda: raw(size)),
            "ingest": (clear(out / "interim"), lambda: ingest(source, out / "interim", data, cfg, progress=False)),
        }
        if args.shards:
            steps["split"] = (clear(out / "splits.csv", out / "counts.csv"), lambda: run_split(
                out / "interim" / "manifest.csv", out / "splits.csv", out / "counts.csv", SplitConfig()))
            steps["preprocess"] = (clear(out / "processed"), lambda: write_shards(
                out / "interim" / "manifest.csv", out / "interim" / "pixels.npy", out / "splits.csv",
                out / "processed", shard_size=PreprocessConfig().shard_size, workers=PreprocessConfig().workers,
                data=data, progress=False))
        with contextlib.redirect_stderr(io.StringIO()):  # the stages' one-line summaries, once per round
            wall_s, cpu_s = interleaved(steps, args.repeat, args.min_time)
        wall = {k: np.array(v) for k, v in wall_s.items()}
        (t_raw, c_raw), (t_ingest, c_ingest) = ((wall[k].min(), min(cpu_s[k])) for k in ("raw", "ingest"))
        line = (f"{name}: {n} images at {size}px, best of {len(wall['raw'])} rounds | "
                f"raw cv2 decode+resize (2 threads) {n / t_raw:,.0f} img/s | "
                f"ingest {n / t_ingest:,.0f} img/s = {t_raw / t_ingest:.0%} of raw "
                f"(CPU per image {c_ingest / n * 1e6:,.0f} vs {c_raw / n * 1e6:,.0f} us = {c_raw / c_ingest:.0%})")
        if args.shards:
            t_pre, t_split = wall["preprocess"].min(), wall["split"].min()
            both = wall["ingest"] + wall["preprocess"]  # per round
            line += (f" | ingest+preprocess {n / (t_ingest + t_pre):,.0f} img/s = "
                     f"{t_raw / (t_ingest + t_pre):.0%} of raw (preprocess {t_pre * 1e3:,.0f} ms; median of the "
                     f"rounds' ratios {np.median(wall['raw'] / both):.0%}) | with the split stage between them "
                     f"({t_split * 1e3:,.0f} ms) {t_raw / (t_ingest + t_split + t_pre):.0%} (median "
                     f"{np.median(wall['raw'] / (both + wall['split'])):.0%})")
        print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128, help="ingest.image_size (default 128, as params.yaml)")
    parser.add_argument("--repeat", type=int, default=7, help="rounds at least (default 7)")
    parser.add_argument("--min-time", type=float, default=5.0,
                        help="more rounds until the raw runs add up to this many seconds (default 5)")
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
