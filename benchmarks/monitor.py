"""Batch monitoring: false-alarm rate on clean batches, detection rate per shift and strength, and the
time to monitor a 1,000-image batch.

    .venv/bin/python benchmarks/monitor.py [--clean 20] [--reps 2] [--n 200] [--strengths 0.05 0.1 0.25 1.0]

Data: BloodMNIST (../shared/datasets/medmnist/bloodmnist.npz; 8 classes, 28 px, official random split) —
the first 3,000 train / 300 val images and the whole test split (3,421), ingested by the real
``medflow.data.ingest``. Falls back to the embedded malaria sample (cells as their own groups, so the
split is random) when ../shared is missing. Champion: a small CNN following the model contract
(``features`` / ``embedding`` / ``probs``), trained a few epochs, evaluated on test with
``medflow.evaluate.compute_metrics``. Every batch is simulated from random test images by
``medflow.monitor.simulate`` and monitored by ``medflow.monitor.run.monitor_batch`` with the default
``MonitorConfig``. False alarm = verdict other than ``ok`` on an unshifted batch; detected = verdict
other than ``ok`` on a shifted one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
MALARIA = ROOT / "data" / "raw" / "malaria-cells-400"
BLOOD = ROOT / ".." / "shared" / "datasets" / "medmnist" / "bloodmnist.npz"
BLOOD_NAMES = {"0": "basophil", "1": "eosinophil", "2": "erythroblast", "3": "immature granulocyte",
               "4": "lymphocyte", "5": "monocyte", "6": "neutrophil", "7": "platelet"}
SHIFTS = ("stain", "brightness", "contrast", "blur", "jpeg", "resolution", "noise", "prior")


def small_cnn(num_classes: int, size: int, channels: int):
    """Input -> conv blocks -> 'features' -> GAP -> Dense 'embedding' -> Dense softmax 'probs'."""
    import keras

    inputs = keras.Input((size, size, channels), dtype="float32")
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(32, 3, activation="relu", padding="same")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(64, 3, activation="relu", padding="same")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(64, 3, activation="relu", padding="same", name="features")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(32, activation="relu", name="embedding")(x)
    return keras.Model(inputs, keras.layers.Dense(num_classes, activation="softmax", name="probs")(x))


def prepare(work: Path) -> tuple[object, object, object]:
    """Ingest + split the data, train and evaluate the champion; returns (params, reference, champion_json)."""
    import keras

    from medflow.config import parse_params
    from medflow.data.ingest import ingest
    from medflow.data.split import run_split
    from medflow.evaluate import compute_metrics
    from medflow.monitor.features import ReferenceData

    if BLOOD.is_file():
        source = work / "bloodmnist-bench.npz"
        with np.load(BLOOD) as z:
            np.savez(source, train_images=z["train_images"][:3000], train_labels=z["train_labels"][:3000],
                     val_images=z["val_images"][:300], val_labels=z["val_labels"][:300],
                     test_images=z["test_images"], test_labels=z["test_labels"])
        raw = {"data": {"source": str(source), "label_names": BLOOD_NAMES}, "ingest": {"image_size": 28}}
        epochs, name = 15, "BloodMNIST (3,000 train / 3,421 test, 28 px)"
    else:
        print("note: ../shared/datasets/medmnist/bloodmnist.npz missing; using the embedded malaria sample")
        source = MALARIA
        raw = {"data": {"source": str(source), "group_pattern": None}, "ingest": {"image_size": 32}}
        epochs, name = 30, "malaria sample (400 cells, 32 px)"
    params = parse_params(raw)
    interim = work / "interim"
    summary = ingest(source, interim, params.data, params.ingest, progress=False)
    run_split(interim / "manifest.csv", interim / "splits.csv", work / "counts.csv", params.split)
    classes = summary["classes"]
    df = pd.read_csv(interim / "manifest.csv", dtype={"id": str, "label": str}).merge(
        pd.read_csv(interim / "splits.csv", dtype={"id": str}), on="id")
    pixels = np.load(interim / "pixels.npy")

    def xy(split: str) -> tuple[np.ndarray, np.ndarray]:
        part = df[df["split"] == split]
        return pixels[part["row"].to_numpy()].astype("float32"), part["label"].map(classes.index).to_numpy(int)

    keras.utils.set_random_seed(0)
    model = small_cnn(len(classes), params.ingest.image_size, params.ingest.channels)
    model.compile(optimizer=keras.optimizers.Adam(2e-3), loss="sparse_categorical_crossentropy")
    t0 = time.perf_counter()
    model.fit(*xy("train"), epochs=epochs, batch_size=64, verbose=0)
    train_s = time.perf_counter() - t0
    (work / "models" / "bench").mkdir(parents=True)
    model.save(work / "models" / "bench" / "model.keras")
    xt, yt = xy("test")
    metrics = compute_metrics(yt, model.predict(xt, verbose=0), classes, bootstrap=0)
    champion = {"model": "bench", "model_path": "models/bench/model.keras", "classes": classes,
                "image_size": params.ingest.image_size, "channels": params.ingest.channels, "ordered": False,
                "metric": "macro_f1", "metrics": metrics, "data_hash": "-", "params_hash": "-",
                "version": "bench-0001", "created": "-"}
    (work / "models" / "champion.json").write_text(json.dumps(champion))
    counts = df["split"].value_counts().to_dict()
    print(f"data: {name}; rows per split {counts}; champion trained in {train_s:.1f} s, "
          f"test accuracy {metrics['accuracy']:.3f}, macro F1 {metrics['macro_f1']:.3f}")
    reference = ReferenceData(interim / "manifest.csv", interim / "pixels.npy", interim / "splits.csv")
    return params, reference, work / "models" / "champion.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clean", type=int, default=20, help="clean batches (false-alarm rate)")
    ap.add_argument("--reps", type=int, default=2, help="batches per shift and strength")
    ap.add_argument("--n", type=int, default=200, help="images per batch")
    ap.add_argument("--strengths", type=float, nargs="+", default=[0.05, 0.1, 0.25, 1.0])
    args = ap.parse_args()

    from medflow.monitor import MonitorConfig
    from medflow.monitor.run import monitor_batch
    from medflow.monitor.simulate import held_out, simulate_batch

    with tempfile.TemporaryDirectory(prefix="medflow-bench-monitor-") as tmp:
        work = Path(tmp)
        params, reference, champion = prepare(work)
        images, labels = held_out(params.data.source, reference.manifest, reference.splits, params.data,
                                  params.ingest)
        out_root = work / "monitoring"
        counter = iter(range(10**6))

        def run(shift: str, strength: float, n: int, seed: int) -> tuple[dict, float]:
            batch = work / "batches" / f"b{next(counter):04d}"
            simulate_batch(images, labels, batch, shift=shift, strength=strength, n=n, seed=seed)
            t0 = time.perf_counter()
            s = monitor_batch(batch, champion_json=champion, reference=reference, out_root=out_root, params=params)
            return s, time.perf_counter() - t0

        _, first = run("none", 0.0, args.n, 10_000)  # also builds and caches the reference features
        print(f"monitoring thresholds: {MonitorConfig().model_dump()}")
        print(f"first batch (reference features computed and cached): {first:.1f} s")

        clean = [run("none", 0.0, args.n, seed)[0] for seed in range(args.clean)]
        alarms = [s for s in clean if s["verdict"] != "ok"]
        print(f"\nfalse alarms on clean batches: {len(alarms)}/{len(clean)} = {len(alarms) / len(clean):.1%} "
              f"(target <= 5%), batches of {args.n}")
        for s in alarms:
            print(f"  {s['batch']}: {s['verdict']}: {'; '.join(s['reasons'])}")
        p_min = pd.DataFrame([{g: v["min_p"] for g, v in s["drift"]["groups"].items()} for s in clean])
        print(f"  smallest p-value per group, median over clean batches: {p_min.median().round(4).to_dict()}")

        rows = []
        for shift in SHIFTS:
            for strength in args.strengths:
                results = [run(shift, strength, args.n, 1000 + rep)[0] for rep in range(args.reps)]
                rows.append({"shift": shift, "strength": strength,
                             "detected": sum(s["verdict"] != "ok" for s in results) / len(results),
                             "verdicts": " ".join(s["verdict"] for s in results),
                             "groups": " ".join(sorted({g for s in results for g, v in s["drift"]["groups"].items()
                                                        if v["drifted"]}))})
        table = pd.DataFrame(rows)
        print(f"\ndetection rate per shift and strength ({args.reps} batches of {args.n} each):")
        print(table.pivot(index="shift", columns="strength", values="detected").to_string(float_format="{:.2f}".format))
        print("\nverdicts and drifted groups:")
        print(table.to_string(index=False))

        s, secs = run("none", 0.0, 1000, 20_000)
        print(f"\nmonitor a 1,000-image batch ({os.cpu_count()} CPU cores, reference cached): {secs:.1f} s "
              f"-> verdict {s['verdict']}, report {(out_root / s['batch'] / 'report.html').stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
