"""Training-pipeline benchmark: input pipeline, embedding cache, memory vs data size (CPU, one run).

    .venv/bin/python benchmarks/train_pipeline.py [--quick] [--workdir DIR]

Each figure is measured against its reference in the same run, on the malaria sample
(data/raw/malaria-cells-400), made larger with its 8 dihedral variants (rotations by 90° × flip;
variant 0 is the original), written as PNGs to a temp folder so every path reads the same files.

1. Input pipeline, images/s over whole epochs: medflow's training input (``train.datasets``: shuffled
   TFRecord shards + ``augment_dataset``) vs Keras ``ImageDataGenerator.flow_from_directory`` (legacy in
   Keras 3, exported as ``tf.keras.preprocessing.image``) on the same PNGs, same target size and batch
   size, with the equivalent augmentation: horizontal flip, rotation ±36° (= 0.1 turn), zoom 0.1, shift
   0.1, brightness ×[0.9, 1.1] (Keras' RandomBrightness adds ±0.1·255 instead), contrast ±0.1 through
   ``preprocessing_function`` (IDG has no contrast option), reflect fill, bilinear resize. Epochs of
   the pipelines are interleaved so load changes on the shared machine hit all of them alike. The
   tf.data path starts from the processed shards (images decoded and resized once, at ingest — the
   point of the design); a second figure charges the one-time ingest + split + shard cost to the
   epochs measured, a third compares the pipelines without augmentation.
2. Frozen backbone (``effnet_lite0_frozen``, vendored ImageNet weights) trained with medflow's real
   ``train()``: embedding cache (``embed()`` into a fresh cache, then ``train()``) vs the same head trained
   through the frozen backbone every epoch (``use_embedding_cache: false``). Patience > epochs, so both
   run every epoch. Both start with the backbone file not yet loaded in the process. Then ``train()`` once
   more with the cache already there (a later ``dvc repro``: ``data/embeddings`` persists). Then the cold
   comparison again on the sample with 2 dihedral variants per cell (800 images): loading the backbone,
   tracing and saving the model cost both paths the same seconds, which weigh less as the data grows.
3. Memory of ``train()`` for ``basic_cnn`` on N vs 4N images, each in a fresh subprocess with
   MALLOC_ARENA_MAX=2 (glibc per-thread arenas otherwise add run-to-run noise): the kernel's RSS
   high-water mark (``ru_maxrss``, dominated by TensorFlow's mapped libraries) and the peak anonymous
   RSS (heap: tensors, buffers) sampled every 20 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import yaml

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
MALARIA = ROOT / "data" / "raw" / "malaria-cells-400"
AUGMENT = {"flip": True, "rotation": 0.1, "zoom": 0.1, "shift": 0.1, "brightness": 0.1, "contrast": 0.1}
BATCH = 32

FULL = {"copies": 8, "pipe_size": 128, "pipe_epochs": 2, "cache_size": 128, "cache_epochs": 25, "cache_copies": 2,
        "mem_size": 64, "mem_copies": (2, 8), "mem_epochs": 2}
QUICK = {"copies": 2, "pipe_size": 64, "pipe_epochs": 1, "cache_size": 64, "cache_epochs": 3, "cache_copies": 2,
         "mem_size": 32, "mem_copies": (1, 4), "mem_epochs": 1}


# --------------------------------------------------------------------------- data preparation
def replicate(dst: Path, copies: int) -> int:
    """Write the first ``copies`` dihedral variants of every malaria PNG under ``dst/<class>/``."""
    n = 0
    for src in sorted(MALARIA.glob("*/*.png")):
        img = cv2.imread(str(src), cv2.IMREAD_UNCHANGED)
        out = dst / src.parent.name
        out.mkdir(parents=True, exist_ok=True)
        for v in range(copies):
            var = np.rot90(img, v % 4)
            var = np.fliplr(var) if v >= 4 else var
            cv2.imwrite(str(out / f"{src.stem}_v{v}.png"), np.ascontiguousarray(var))
            n += 1
    return n


def params(**overrides: Any) -> Any:
    """params.yaml with ``section.key`` overrides (dotted keys), validated by medflow.config."""
    from medflow.config import parse_params

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"]["extra_sources"] = []
    for key, value in overrides.items():
        *path, last = key.split(".")
        node = raw
        for p in path:
            node = node[p]
        node[last] = value
    return parse_params(raw)


def prepare(raw: Path, work: Path, size: int, *, all_train: bool = False) -> dict:
    """ingest -> split -> write_shards into ``work``; seconds of each step."""
    from medflow.data.ingest import ingest
    from medflow.data.shards import write_shards
    from medflow.data.split import run_split

    p = params(**{"ingest.image_size": size})
    t: dict[str, Any] = {"processed": work / "processed"}
    t0 = time.perf_counter()
    summary = ingest(raw, work / "interim", p.data, p.ingest, progress=False)
    t["ingest"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_split(work / "interim" / "manifest.csv", work / "splits.csv", work / "split_counts.csv", p.split)
    t["split"] = time.perf_counter() - t0
    if all_train:  # the input benchmark iterates every image as training data
        splits = pd.read_csv(work / "splits.csv")
        splits.assign(split="train").to_csv(work / "splits.csv", index=False)
    t0 = time.perf_counter()
    write_shards(work / "interim" / "manifest.csv", work / "interim" / "pixels.npy", work / "splits.csv",
                 t["processed"], shard_size=p.preprocess.shard_size, data=p.data, progress=False)
    t["shards"] = time.perf_counter() - t0
    t["accepted"] = summary["accepted"]
    return t


# --------------------------------------------------------------------------- 1. input pipeline
def tf_data_epochs(processed: Path, augment: dict) -> Any:
    """medflow's training input: ``train.datasets`` (shuffled shards + ``augment_dataset``), train split."""
    from medflow.config import Augment, ModelConfig
    from medflow.train import datasets

    cfg = ModelConfig(architecture="basic_cnn", batch_size=BATCH, augment=Augment(**augment))
    train_ds, _ = datasets(cfg, processed, seed=42)
    return lambda: (int(x.shape[0]) for x, _y in train_ds)


def idg_epochs(raw: Path, size: int, augment: bool, threads: int) -> Any:
    """Keras' ImageDataGenerator (legacy in Keras 3, still exported as tf.keras.preprocessing.image), whole
    epochs of ``next(iterator)``; threads > 1 draw batches concurrently (the iterator's documented
    thread-safe use: index under a lock, load + transform outside it)."""
    import tensorflow as tf

    rng = np.random.default_rng(0)

    def contrast(x: np.ndarray) -> np.ndarray:  # IDG has no contrast option: RandomContrast's formula
        mean = x.mean(axis=(0, 1), keepdims=True)
        return np.clip((x - mean) * rng.uniform(0.9, 1.1) + mean, 0, 255)

    options = dict(horizontal_flip=True, rotation_range=36, zoom_range=0.1, width_shift_range=0.1,
                   height_shift_range=0.1, brightness_range=(0.9, 1.1), fill_mode="reflect",
                   preprocessing_function=contrast) if augment else {}
    gen = tf.keras.preprocessing.image.ImageDataGenerator(**options)
    it = gen.flow_from_directory(str(raw), target_size=(size, size), batch_size=BATCH, class_mode="sparse",
                                 shuffle=True, seed=42, interpolation="bilinear")
    pool = ThreadPoolExecutor(threads)
    return lambda: (len(x) for x, _y in pool.map(lambda _: next(it), range(len(it))))


def interleaved(pipelines: dict[str, Any], epochs: int) -> dict[str, dict]:
    """Run epoch e of every pipeline before epoch e+1 of any, so load changes on a shared box hit all alike."""
    out = {name: {"images": 0, "per_epoch": []} for name in pipelines}
    for _ in range(epochs):
        for name, epoch in pipelines.items():
            t0 = time.perf_counter()
            out[name]["images"] += sum(epoch())
            out[name]["per_epoch"].append(time.perf_counter() - t0)
    for r in out.values():
        r["seconds"] = sum(r["per_epoch"])
        r["rate"] = r["images"] / r["seconds"]
    return out


# --------------------------------------------------------------------------- 2. embedding cache
def bench_retrain(processed: Path, work: Path, epochs: int) -> dict:
    """``train()`` again into a new model folder with the embedding cache of :func:`bench_cache` already
    there (what every `dvc repro` after the first does: ``data/embeddings`` is a persisted output)."""
    from medflow.models.backbones import clear_backbone_cache
    from medflow.train import train

    clear_backbone_cache()  # as in a new process: the backbone is loaded again to assemble the saved model
    name = "effnet_lite0_frozen"
    p = params(**{f"models.{name}.epochs": epochs, "train.patience": epochs + 1})
    t0 = time.perf_counter()
    s = train(name, p, processed, work / "cached" / "embeddings", work / "cached" / "retrain")
    return {"wall": time.perf_counter() - t0, "fit": s["seconds"], "epochs_run": s["epochs_this_run"]}


def bench_cache(processed: Path, work: Path, epochs: int, cached: bool) -> dict:
    """Cached: ``embed()`` (fresh cache dir, timed) then ``train()`` (reuses it); uncached: ``train()``.

    Each starts without the backbone that medflow keeps loaded per process (so each pays its one load).
    """
    from medflow.embed import embed
    from medflow.models.backbones import clear_backbone_cache
    from medflow.train import train

    clear_backbone_cache()

    name = "effnet_lite0_frozen"
    p = params(**{f"models.{name}.epochs": epochs, f"models.{name}.use_embedding_cache": cached,
                  "train.patience": epochs + 1})
    out = work / ("cached" if cached else "uncached")
    t0 = time.perf_counter()
    if cached:
        info = embed(name, p, processed, out / "embeddings")
        assert info["cached"] and not info["reused"], info
    embed_s = time.perf_counter() - t0
    s = train(name, p, processed, out / "embeddings", out / "model")
    wall = time.perf_counter() - t0
    return {"wall": wall, "fit": s["seconds"], "embed": embed_s, "epochs_run": s["epochs_this_run"],
            "cache": s["embedding_cache"], "val_loss": s["best"].get("val_loss")}


# --------------------------------------------------------------------------- 3. memory
def _status_kib(*keys: str) -> dict[str, int]:
    """Fields of /proc/self/status in KiB (VmRSS, VmHWM, RssAnon, ...)."""
    lines = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {k: int(lines[k].split()[0]) for k in keys}


def child_train(processed: str, out: str, epochs: int) -> None:
    """Subprocess entry: train basic_cnn; print peak RSS figures (MiB) as JSON on the last line.

    ``hwm``: the kernel's RSS high-water mark (= ru_maxrss; includes TensorFlow's mapped library pages).
    ``anon``: peak anonymous RSS (heap: tensors, buffers) sampled every 20 ms, after imports and during train().
    """
    import threading

    import tensorflow as tf

    from medflow.train import train

    tf.constant(0)
    floor = _status_kib("VmHWM", "RssAnon")
    peak, done = [floor["RssAnon"]], threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], _status_kib("RssAnon")["RssAnon"])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    p = params(**{"models.basic_cnn.epochs": epochs, "train.patience": epochs + 1})
    t0 = time.perf_counter()
    s = train("basic_cnn", p, processed, Path(out) / "embeddings", Path(out) / "model")
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    print(json.dumps({"hwm_floor": floor["VmHWM"] / 1024, "anon_floor": floor["RssAnon"] / 1024,
                      "hwm": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "anon": peak[0] / 1024,
                      "seconds": seconds, "epochs": s["epochs_this_run"], "img_s": s["images_per_second"]}))


def bench_memory(processed: Path, out: Path, epochs: int) -> dict:
    env = os.environ | {"MALLOC_ARENA_MAX": "2", "TF_CPP_MIN_LOG_LEVEL": "2"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-train", str(processed), str(out), str(epochs)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                          check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller smoke run (sizes, epochs, images)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the temp data here (default: a temp dir)")
    ap.add_argument("--child-train", nargs=3, metavar=("PROCESSED", "OUT", "EPOCHS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.chdir(ROOT)  # params.yaml paths (vendored weights) are relative to the project root
    if args.child_train:
        child_train(args.child_train[0], args.child_train[1], int(args.child_train[2]))
        return
    cfg = QUICK if args.quick else FULL
    command = ".venv/bin/python benchmarks/train_pipeline.py" + (" --quick" if args.quick else "")
    work = Path(tempfile.mkdtemp(prefix="medflow-bench-", dir=args.workdir))
    start = time.perf_counter()
    print(f"# medflow training-pipeline benchmark ({'quick' if args.quick else 'full'}), {os.cpu_count()} CPUs "
          f"visible, load average {os.getloadavg()[0]:.2f}\n# {command}\n# settings: {cfg}, batch {BATCH}", flush=True)
    try:
        rows = run(cfg, work)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print("\n| figure | medflow | reference | ratio | target |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} |")
    print(f"\ncommand: {command}\ntotal wall time {time.perf_counter() - start:.0f} s, "
          f"load average at the end {os.getloadavg()[0]:.2f}")


def run(cfg: dict, work: Path) -> list[tuple[str, ...]]:
    import tensorflow as tf  # imported (and its runtime started) before any timing

    tf.constant(0)
    rows = []
    # ---- 1. input pipeline
    raw = work / "raw"
    n_raw = replicate(raw, cfg["copies"])
    size, epochs = cfg["pipe_size"], cfg["pipe_epochs"]
    print(f"\n## 1. input pipeline: {n_raw} PNGs ({cfg['copies']} dihedral variants × 400), {size}px, "
          f"batch {BATCH}, {epochs} epoch(s), augmentation {AUGMENT}", flush=True)
    prep = prepare(raw, work / "pipe", size, all_train=True)
    one_time = prep["ingest"] + prep["split"] + prep["shards"]
    print(f"one-time ingest {prep['ingest']:.1f}s + split {prep['split']:.1f}s + shards {prep['shards']:.1f}s "
          f"= {one_time:.1f}s for {prep['accepted']} images", flush=True)
    res = interleaved({"tf.data (medflow)": tf_data_epochs(prep["processed"], AUGMENT),
                       "IDG 1 thread": idg_epochs(raw, size, True, 1),
                       "IDG 2 threads": idg_epochs(raw, size, True, 2)}, epochs)
    plain = interleaved({"tf.data, no augmentation": tf_data_epochs(prep["processed"], {"flip": False}),
                         "IDG 1 thread, no augmentation": idg_epochs(raw, size, False, 1)}, 1)
    for name, r in (res | plain).items():
        print(f"{name:30s} {r['images']} images in {r['seconds']:.1f}s = {r['rate']:.0f} img/s "
              f"(epochs: {', '.join(f'{s:.1f}s' for s in r['per_epoch'])})", flush=True)
    tfd = res.pop("tf.data (medflow)")
    ref_name, ref = max(res.items(), key=lambda kv: kv[1]["rate"])
    rate_all = tfd["images"] / (tfd["seconds"] + one_time)
    rows.append((f"input pipeline img/s, {size}px, augmented, {epochs} epochs (tf.data from shards)",
                 f"{tfd['rate']:.0f}", f"{ref['rate']:.0f} (best IDG: {ref_name})",
                 f"{tfd['rate'] / ref['rate']:.1f}×", "≥ 5×"))
    rows.append((f"same, tf.data charged the one-time ingest+split+shards ({one_time:.1f}s)", f"{rate_all:.0f}",
                 f"{ref['rate']:.0f}", f"{rate_all / ref['rate']:.1f}×", "(context)"))
    tf_plain, idg_plain = plain.values()
    rows.append((f"input pipeline img/s, {size}px, no augmentation, 1 epoch", f"{tf_plain['rate']:.0f}",
                 f"{idg_plain['rate']:.0f} (IDG 1 thread)", f"{tf_plain['rate'] / idg_plain['rate']:.1f}×",
                 "(context)"))
    shutil.rmtree(work / "pipe")

    # ---- 2. embedding cache
    size, epochs = cfg["cache_size"], cfg["cache_epochs"]

    def variants(copies: int) -> Path:
        """The PNG folder with the first ``copies`` dihedral variants of every cell (written once)."""
        if copies == cfg["copies"]:
            return raw
        if not (work / f"raw{copies}").exists():
            replicate(work / f"raw{copies}", copies)
        return work / f"raw{copies}"

    def cold_pair(source: Path, title: str) -> tuple[dict, dict, dict]:
        """Prepare ``source``, then the uncached and the cold cached run on it (printed)."""
        prep = prepare(source, work / "cache", size)
        counts = json.loads((prep["processed"] / "meta.json").read_text())["counts"]
        print(f"\n{title}: {prep['accepted']} images, split {counts}", flush=True)
        unc = bench_cache(prep["processed"], work / "cache", epochs, cached=False)
        cac = bench_cache(prep["processed"], work / "cache", epochs, cached=True)
        for name, r in (("uncached (end to end)", unc), ("embedding cache", cac)):
            print(f"{name:24s} wall {r['wall']:.1f}s = embed {r['embed']:.1f}s + train() {r['wall'] - r['embed']:.1f}s "
                  f"(fit {r['fit']:.1f}s, {r['epochs_run']} epochs, best val_loss {r['val_loss']:.4f})", flush=True)
        return prep, unc, cac

    prep, unc, cac = cold_pair(MALARIA, f"## 2. effnet_lite0_frozen, malaria-400 at {size}px (model input_size "
                                             f"128), {epochs} epochs, patience > epochs")
    rows.append((f"frozen backbone, {epochs} epochs, wall s (cache: embed + train(); ref: train())",
                 f"{cac['wall']:.1f}", f"{unc['wall']:.1f}", f"{unc['wall'] / cac['wall']:.1f}×", "≥ 10×"))
    again = bench_retrain(prep["processed"], work / "cache", epochs)
    print(f"{'retrain, cache present':24s} wall {again['wall']:.1f}s = train() (fit {again['fit']:.1f}s, "
          f"{again['epochs_run']} epochs)", flush=True)
    rows.append(("same, retraining with the cache already computed (later `dvc repro` runs), wall s",
                 f"{again['wall']:.1f}", f"{unc['wall']:.1f}", f"{unc['wall'] / again['wall']:.1f}×", "≥ 10×"))
    rows.append(("same, embed() + model.fit only (train()'s build/hash/save excluded)",
                 f"{cac['embed'] + cac['fit']:.1f}", f"{unc['fit']:.1f}",
                 f"{unc['fit'] / (cac['embed'] + cac['fit']):.1f}×", "(context)"))
    rows.append(("same, model.fit seconds per epoch (head on cache vs through the backbone)",
                 f"{cac['fit'] / cac['epochs_run']:.2f}", f"{unc['fit'] / unc['epochs_run']:.2f}",
                 f"{(unc['fit'] / unc['epochs_run']) / (cac['fit'] / cac['epochs_run']):.0f}×", "(context)"))
    shutil.rmtree(work / "cache")
    # the fixed costs both paths pay (backbone load, traces, saving the model) weigh less on more images
    k = cfg["cache_copies"]
    prep, unc, cac = cold_pair(variants(k), f"same, {k} dihedral variants per cell (grouped by slide)")
    rows.append((f"same on {prep['accepted']} images ({k} variants per cell), cold: embed + train() vs train(), wall s",
                 f"{cac['wall']:.1f}", f"{unc['wall']:.1f}", f"{unc['wall'] / cac['wall']:.1f}×", "(context)"))
    shutil.rmtree(work / "cache")

    # ---- 3. memory
    size, epochs = cfg["mem_size"], cfg["mem_epochs"]
    runs = {}
    for copies in cfg["mem_copies"]:
        prep = prepare(variants(copies), work / f"mem{copies}", size)
        meta = json.loads((prep["processed"] / "meta.json").read_text())
        runs[copies] = bench_memory(prep["processed"], work / f"mem{copies}", epochs) | {
            "n": prep["accepted"], "train": meta["counts"]["train"]}
    (a, ra), (b, rb) = sorted(runs.items())
    print(f"\n## 3. peak RSS of train(basic_cnn), {size}px ingest, {epochs} epoch(s), one subprocess each, "
          "MALLOC_ARENA_MAX=2", flush=True)
    for r in (ra, rb):
        shuffle_mib = r["train"] * size * size * 3 / 2**20
        in_mem_mib = r["n"] * size * size * 3 * 4 / 2**20
        print(f"N={r['n']:5d} (train {r['train']}): peak anonymous RSS {r['anon']:.1f} MiB (after imports "
              f"{r['anon_floor']:.1f}), RSS high-water mark {r['hwm']:.1f} MiB (after imports {r['hwm_floor']:.1f}); "
              f"train() {r['seconds']:.1f}s, {r['img_s']:.0f} img/s; shuffle buffer ≤ {shuffle_mib:.1f} MiB of "
              f"pixels (cap 256 MiB); the whole set as float32 = {in_mem_mib:.0f} MiB", flush=True)
    rows.append((f"peak RSS MiB (high-water mark), train(basic_cnn), N={ra['n']} vs 4N={rb['n']} images",
                 f"{rb['hwm']:.0f} (4N)", f"{ra['hwm']:.0f} (N)", f"{rb['hwm'] / ra['hwm']:.2f}×", "flat (≈ 1×)"))
    rows.append(("same, peak anonymous RSS (heap, sampled 50/s)", f"{rb['anon']:.0f} (4N)", f"{ra['anon']:.0f} (N)",
                 f"{rb['anon'] / ra['anon']:.2f}×", "flat (≈ 1×)"))
    rows.append(("same, anonymous RSS growth during train()", f"{rb['anon'] - rb['anon_floor']:.0f} (4N)",
                 f"{ra['anon'] - ra['anon_floor']:.0f} (N)",
                 f"{(rb['anon'] - rb['anon_floor']) / max(ra['anon'] - ra['anon_floor'], 1e-9):.2f}×", "(context)"))
    return rows


if __name__ == "__main__":
    main()
